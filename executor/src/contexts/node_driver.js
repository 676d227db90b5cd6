// Kiln's Node.js code-context driver: the same line protocol as
// python_driver.py (see its header). Cells run in one vm context, so
// `var`, `let`, `const`, functions and required modules persist; the
// completion value of a cell (its last expression) comes back as
// text/plain (util.inspect), awaited first when it is a promise. SIGINT
// during a cell interrupts it (vm's breakOnSigint); while idle it is
// ignored. Output goes through process.stdout/stderr, which are replaced
// by writers of framed lines; a child process that writes to fd 1 itself
// appears as plain lines, which the host takes as stdout.
"use strict";
const fs = require("fs");
const vm = require("vm");
const util = require("util");
const readline = require("readline");

function send(msg) {
  const b = Buffer.from(JSON.stringify(msg) + "\n");
  let off = 0;
  while (off < b.length) {
    try {
      off += fs.writeSync(1, b, off);
    } catch (e) {
      if (e.code !== "EAGAIN") throw e;
    }
  }
}

// Output is forwarded while a cell runs. Between cells (timers, promises
// settling later) nobody reads the channel on the host, so what is written
// then is kept, up to BETWEEN_MAX characters, and goes out with the next
// cell; the rest is dropped and counted.
const BETWEEN_MAX = 64 * 1024;
let forwarding = false;
let between = [];
let betweenChars = 0;
let betweenDropped = 0;

function forward(stream, text) {
  if (forwarding) {
    send({ stream, data: text });
  } else if (betweenChars + text.length <= BETWEEN_MAX) {
    between.push({ stream, data: text });
    betweenChars += text.length;
  } else {
    betweenDropped += text.length;
  }
}

function startForwarding() {
  forwarding = true;
  for (const m of between) send(m);
  if (betweenDropped) {
    send({ stream: "stderr", data: "[kiln: " + betweenDropped + " characters written between cells were dropped]\n" });
  }
  between = [];
  betweenChars = 0;
  betweenDropped = 0;
}

function writer(stream) {
  return function (chunk, encoding, cb) {
    const text = typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8");
    if (text) forward(stream, text);
    if (typeof encoding === "function") encoding();
    else if (typeof cb === "function") cb();
    return true;
  };
}
process.stdout.write = writer("stdout");
process.stderr.write = writer("stderr");

const cwd = process.env.KILN_CONTEXT_CWD;
delete process.env.KILN_CONTEXT_CWD;
if (cwd) process.chdir(cwd);

function bundle(value) {
  const out = {};
  try {
    out["text/plain"] = util.inspect(value, { depth: 4, maxArrayLength: 200 });
  } catch (e) {
    out["text/plain"] = "<inspect failed: " + e + ">";
  }
  return out;
}

const scope = {
  require, console, process, Buffer, URL, TextEncoder, TextDecoder,
  setTimeout, setInterval, setImmediate, clearTimeout, clearInterval, clearImmediate,
  display: (...objs) => objs.forEach((o) => forwarding && send({ display: bundle(o) })),
};
scope.global = scope;
scope.globalThis = scope;
const context = vm.createContext(scope);

process.on("SIGINT", () => {});
process.on("uncaughtException", (e) => {
  forward("stderr", "uncaught exception outside a cell: " + (e && e.stack ? e.stack : String(e)) + "\n");
});
process.on("unhandledRejection", (e) => {
  forward("stderr", "unhandled rejection: " + (e && e.stack ? e.stack : String(e)) + "\n");
});

function cellError(e) {
  const name = e && e.name ? String(e.name) : "Error";
  const value = e && e.message !== undefined ? String(e.message) : String(e);
  // The driver's own frames say nothing about the cell.
  const stack = e && e.stack ? String(e.stack) : name + ": " + value;
  const traceback = stack
    .split("\n")
    .filter((l) => !/\(node:|node:vm|node:internal|\.kiln-context-node\.js|node_driver\.js/.test(l))
    .join("\n");
  return { name, value, traceback };
}

async function run(code, n) {
  startForwarding();
  try {
    return await runCell(code, n);
  } finally {
    forwarding = false;
  }
}

async function runCell(code, n) {
  let value;
  send({ started: n });
  try {
    value = vm.runInContext(code, context, { filename: "<cell " + n + ">", breakOnSigint: true });
    if (value && typeof value.then === "function") value = await value;
  } catch (e) {
    const err = cellError(e);
    const interrupted = /interrupted by `SIGINT`/.test(err.value);
    if (interrupted) err.name = "Interrupted";
    forward("stderr", err.traceback + "\n");
    return { status: interrupted ? "interrupted" : "error", result: null, error: err };
  }
  return { status: "ok", result: value === undefined ? null : bundle(value), error: null };
}

send({ ready: { node: process.version, pid: process.pid, cwd: process.cwd() } });
const rl = readline.createInterface({ input: process.stdin, terminal: false });
let queue = Promise.resolve();
rl.on("line", (line) => {
  queue = queue.then(async () => {
    let done;
    try {
      const req = JSON.parse(line);
      done = await run(req.code, req.n || 0);
    } catch (e) {
      done = { status: "error", result: null, error: cellError(e) };
    }
    send({ done });
  });
});
rl.on("close", () => queue.then(() => process.exit(0)));
