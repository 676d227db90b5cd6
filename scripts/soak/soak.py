"""The chaos soak's orchestrator (run by scripts/soak.sh, which documents
it): the AMQP half with its seeded chaos schedule, the HTTP half with the
daemon's descriptors, threads and RSS sampled every second, the checks of
both, and the clean-up of everything the soak made, even when it fails.

Everything lives under the soak's own names: a work directory
/run/kiln-soak-<tag> (state directories, the daemons' TMPDIR, a private
RabbitMQ node's data), cgroup parents kiln-soak-<tag>-<daemon>, and a
RabbitMQ node of its own (kiln-soak-<tag>@localhost on free loopback ports)
so that restarting the broker disturbs no one else on the machine.
"""

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import amqp_half  # noqa: E402
import host  # noqa: E402
import http_half  # noqa: E402
import plot  # noqa: E402
from host import SoakError  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Broker:
    """A RabbitMQ node of the soak's own, started, stopped and restarted by
    scripts/rabbitmq.sh with the node name, ports and data directory in its
    environment (the Debian package's scripts read them)."""

    def __init__(self, workdir, tag):
        self.dir = os.path.join(workdir, "rabbitmq")
        self.env_file = os.path.join(workdir, "broker.env")
        if os.path.exists(self.env_file):
            with open(self.env_file) as f:
                self.vars = json.load(f)
        else:
            port, dist = free_port(), free_port()
            self.vars = {
                "RABBITMQ_NODENAME": f"kiln-soak-{tag}@localhost",
                "RABBITMQ_NODE_PORT": str(port),
                "RABBITMQ_DIST_PORT": str(dist),
                "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
                "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
                "RABBITMQ_PID_FILE": os.path.join(self.dir, "pid"),
            }
            with open(self.env_file, "w") as f:
                json.dump(self.vars, f)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.vars['RABBITMQ_NODE_PORT']}/%2f"

    def script(self, cmd, within=240):
        env = dict(os.environ, **self.vars)
        r = subprocess.run(["bash", os.path.join(REPO, "scripts/rabbitmq.sh"), cmd], env=env,
                           capture_output=True, text=True, timeout=within)
        if r.returncode != 0:
            raise SoakError(f"scripts/rabbitmq.sh {cmd} (soak node) failed: {r.stdout}{r.stderr}")

    def start(self):
        for d in ("mnesia", "log"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        # The broker drops to the package's `rabbitmq` user.
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for d in ("mnesia", "log"):
            shutil.chown(os.path.join(self.dir, d), "rabbitmq", "rabbitmq")
        self.script("start")

    def stop(self):
        self.script("stop")

    def beam_pid(self):
        try:
            with open(self.vars["RABBITMQ_PID_FILE"]) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Soak:
    def __init__(self, a):
        self.a = a
        self.tag = a.tag
        self.workdir = f"/run/kiln-soak-{self.tag}"
        os.makedirs(self.workdir, exist_ok=True)
        # The jails' ids must be able to search the state directories below.
        os.chmod(self.workdir, 0o755)
        self.tmpdir = os.path.join(self.workdir, "tmp")
        os.makedirs(self.tmpdir, exist_ok=True)
        self.out = a.out
        self.logdir = os.path.join(self.out, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.pidfile = os.path.join(self.workdir, "pids")
        self.bin = os.path.join(a.bin_dir, "kiln")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env["TMPDIR"] = self.tmpdir
        env.setdefault("RUST_LOG", "warn")
        self.env = env
        self.daemons = []
        self.scopes = []
        self.report = {"seed": a.seed, "jobs_per_half": a.jobs, "tag": self.tag,
                       "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                       "load_at_start": loadavg()}
        self.failures = []
        self.tmp_before = set(os.listdir("/tmp"))

    def daemon(self, name, args):
        scope = host.Scope(os.path.join(self.workdir, f"state-{name}"),
                           f"kiln-soak-{self.tag}-{name}")
        d = host.Daemon(name, self.bin, scope, args, self.env, self.logdir, self.pidfile)
        self.daemons.append(d)
        self.scopes.append(scope)
        return d

    def fail(self, what):
        log(f"FAIL: {what}")
        self.failures.append(what)

    # ------------------------------------------------------------------ AMQP

    def amqp(self):
        a = self.a
        rng = random.Random(a.seed)
        n = a.jobs
        t_start = time.monotonic()
        broker = Broker(self.workdir, self.tag)
        log(f"starting the soak's own RabbitMQ node {broker.vars['RABBITMQ_NODENAME']}"
            f" on 127.0.0.1:{broker.vars['RABBITMQ_NODE_PORT']}")
        broker.start()
        names = amqp_half.Names(self.tag)
        conn = amqp_half.pika.BlockingConnection(amqp_half.pika.URLParameters(broker.url))
        names.declare(conn.channel())
        conn.close()

        capacity = (4, 4)  # max_running, queue_depth: a node holds at most 8 messages
        node_args = names.serve_args(broker.url) + [
            "--pool-runtimes", "bash,python", "--min-idle", "2",
            "--max-running", str(capacity[0]), "--queue-depth", str(capacity[1]),
        ]
        ex = {k: self.daemon(f"amqp-{k}", node_args) for k in ("a", "b")}
        for d in ex.values():
            d.spawn()
        log(f"executors up: a pid {ex['a'].pid} at {ex['a'].addr}, b pid {ex['b'].pid}"
            f" at {ex['b'].addr}")

        # The chaos schedule, by progress (the fraction of jobs answered), so
        # that one seed gives the same run whatever the machine's speed.
        plan = []
        for lo, hi in ((0.12, 0.30), (0.58, 0.78)):
            plan.append((rng.uniform(lo, hi), "kill-executor", rng.choice("ab"),
                         round(rng.uniform(0.5, 3.0), 2)))
        plan.append((rng.uniform(0.38, 0.50), "restart-broker", None, None))
        plan.append((rng.uniform(0.45, 0.55), "poison-burst", None, None))
        agent_kills = 3 if a.short else 12
        for _ in range(agent_kills):
            plan.append((rng.uniform(0.05, 0.95), "kill-agent", None, None))
        plan.sort(key=lambda p: p[0])
        log("chaos plan (progress, action, target, pause s): "
            + "; ".join(f"{p:.3f} {act}{' ' + t if t else ''}{f' {s}s' if s else ''}"
                        for p, act, t, s in plan))
        self.report["amqp_plan"] = [[round(p, 4), act, t, s] for p, act, t, s in plan]

        jobs = []
        for i in range(n):
            body, expected = amqp_half.job_for(i, rng)
            jobs.append((f"soak-{self.tag}-{i}", json.dumps(body).encode(), expected))
        per_kind = 3 if a.short else 10
        poison = []
        for k in range(per_kind):
            for kind, make, field in amqp_half.POISON_KINDS:
                pid = f"poison-{self.tag}-{kind}-{k}"
                poison.append((pid, make(pid), kind, field))

        ledger = amqp_half.Ledger()
        deadline = time.monotonic() + (240 if a.short else 240 + n * 0.1)
        # In a short run the jobs would be through before the chaos: pace them.
        rate = 5.0 if a.short else 0.0
        producer = amqp_half.Producer(broker.url, names, ledger, jobs, window=64, rate=rate,
                                      deadline=deadline, log=log)
        producer.start()
        chaos_log = []
        windows = []
        agents_killed = 0
        last_answered, last_change = 0, time.monotonic()
        pending = list(plan)
        try:
            while True:
                if producer.errors:
                    raise SoakError(f"producer: {producer.errors}")
                answered = ledger.answered()
                if answered != last_answered:
                    last_answered, last_change = answered, time.monotonic()
                frac = sum(1 for m in ledger.answered_ids.copy() if m in ledger.jobs) / n
                while pending and pending[0][0] <= frac:
                    p, act, target, pause = pending.pop(0)
                    t = time.monotonic() - t_start
                    began = time.time()
                    if act == "kill-executor":
                        d = ex[target]
                        old = (d.pid, d.start)
                        held = _held(d)
                        d.kill()
                        time.sleep(pause)
                        d.spawn()
                        # The new process reaps the dead one's sandboxes at start-up.
                        reaped = host.wait_until(
                            lambda: not [r for r in d.scope.records()
                                         if (r["owner"]["pid"], r["owner"]["start"]) == old],
                            30)
                        if not reaped:
                            self.fail(f"executor {target}'s sandboxes from before its SIGKILL"
                                      " were not reaped within 30 s of its restart")
                        what = (f"SIGKILL executor {target} (pid {old[0]}, prefetch {held}"
                                f"), restarted after {pause} s as pid {d.pid}")
                    elif act == "restart-broker":
                        t0 = time.monotonic()
                        broker.stop()
                        broker.start()
                        what = f"broker restarted in {time.monotonic() - t0:.1f} s"
                    elif act == "poison-burst":
                        producer.urgent.extend(poison)
                        what = f"{len(poison)} poison messages queued for publishing"
                    else:
                        k = host.kill_random_agent(rng, [d.scope for d in ex.values()],
                                                   list(ex.values()))
                        if k:
                            agents_killed += 1
                        what = (f"SIGKILL agent pid {k['pid']} of sandbox {k['sandbox']}"
                                if k else "no sandbox to kill an agent in")
                    line = (f"t={t:6.1f}s (epoch {time.time():.1f}) progress={frac:.3f}"
                            f" {what}")
                    chaos_log.append(line)
                    log(line)
                    if act in ("kill-executor", "restart-broker"):
                        self._wait_connected(ex.values(), 120)
                        windows.append((act, began, time.time()))
                all_sent = set(ledger.jobs) | set(ledger.poison)
                if (not pending and producer.done_publishing()
                        and len(all_sent) == n + len(poison)
                        and ledger.answered() == len(all_sent)):
                    break
                if time.monotonic() - last_change > 180:
                    raise SoakError(f"no reply for 180 s; {ledger.answered()} of"
                                    f" {n + len(poison)} answered")
                if time.monotonic() > deadline:
                    raise SoakError(f"deadline: {ledger.answered()} of {n + len(poison)}"
                                    " answered")
                time.sleep(0.1)
            elapsed = time.monotonic() - t_start
            # Late duplicates have a moment to show up.
            time.sleep(3)
            metrics = {k: d.metrics() for k, d in ex.items()}
        finally:
            producer.stop.set()
            producer.publisher.join(timeout=30)
            producer.collector.join(timeout=30)
        for k, d in ex.items():
            code = d.term(within=60)
            if code != 0:
                self.fail(f"executor {k} exited {code} after SIGTERM")
        dead = amqp_half.drain_dead_letters(broker.url, names)
        left_q = {q: amqp_half.queue_depth(broker.url, q) for q in (names.queue, names.replies)}
        rep, fails = amqp_half.check(ledger, dead, agents_killed, windows, sum(capacity))
        for f in fails:
            self.fail(f"amqp: {f}")
        if any(left_q.values()):
            self.fail(f"amqp: messages left in queues: {left_q}")
        rep["left_in_queues"] = left_q
        rep["seconds"] = round(elapsed, 1)
        rep["jobs_per_second"] = round(n / elapsed, 1)
        rep["chaos"] = chaos_log
        rep["producer_reconnects"] = producer.reconnects
        keys = ["kiln_amqp_messages_consumed_total", "kiln_amqp_messages_redelivered_total",
                "kiln_amqp_results_republished_total", "kiln_amqp_duplicates_suppressed_total",
                "kiln_amqp_messages_requeued_total", "kiln_amqp_consumer_reconnects_total",
                "kiln_amqp_messages_acked_total"]
        rep["executor_metrics_at_end"] = {
            k: {key: sum(v for mk, v in m.items() if mk.split("{")[0] == key) for key in keys}
            for k, m in metrics.items()}
        self.report["amqp"] = rep
        left, new_tmp = host.leftovers([d.scope for d in ex.values()], self.tmpdir,
                                       self.tmp_before, self.all_pids(), self.workdir)
        rep["leftovers"] = left
        if left:
            self.fail(f"amqp: leftovers {left}")
        broker.stop()
        log(f"AMQP half: {rep['answered']}/{n} answered in {elapsed:.0f} s,"
            f" {rep['extra_results']} duplicates, outcomes {rep['outcomes']}")

    def _wait_connected(self, daemons, within):
        def connected():
            try:
                return all(d.metrics().get("kiln_amqp_connected") == 1.0 for d in daemons)
            except OSError:
                return False
        if not host.wait_until(connected, within, step=0.25):
            raise SoakError(f"executors not connected to the broker within {within} s")

    # ------------------------------------------------------------------ HTTP

    def http(self):
        a = self.a
        rng = random.Random(a.seed + 1)
        n = a.jobs
        # The results kept for GET /v1/jobs/{id} are capped (results_max):
        # the warm-up fills that store, so that what follows is steady state.
        results_max = 1000 if n >= 3000 else 100
        warmup = min(n // 2, results_max + results_max // 2)
        # Two pooled runtimes, each holding at most max_running + min_idle + 2.
        pool_cap = 2 * (4 + 2 + 2)
        d = self.daemon("http", [
            "--pool-runtimes", "bash,python", "--min-idle", "2",
            "--max-running", "4", "--queue-depth", "16",
            "--results-max", str(results_max),
        ])
        d.spawn()
        log(f"HTTP daemon pid {d.pid} at {d.addr}")
        jobs = []
        for i in range(n):
            kind = http_half.kind_of(rng)
            body, check = http_half.job(i, kind, rng)
            jobs.append((i, kind, body, check))

        csv_path = os.path.join(self.out, "http-daemon.csv")
        samples = []
        stop = threading.Event()
        progress = [0]
        marks = []
        t0 = time.monotonic()

        def sampler():
            with open(csv_path, "w") as f:
                f.write("t_s,fds,threads,rss_kib,jobs_done\n")
                while not stop.is_set():
                    s = host.sample(d.pid)
                    if s is None:
                        break
                    row = (round(time.monotonic() - t0, 2), *s, progress[0])
                    samples.append(row)
                    f.write(",".join(map(str, row)) + "\n")
                    f.flush()
                    stop.wait(1.0)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        deadline = time.monotonic() + (300 if a.short else 120 + n * 0.1)
        concurrency = 6
        try:
            log(f"HTTP warm-up: {warmup} jobs")
            c1, f1, l1, b1 = http_half.run_jobs(d.addr, jobs[:warmup], concurrency, deadline,
                                                progress)
            before = self._idle(d, pool_cap, samples, marks, "idle after warm-up", t0)
            log(f"HTTP load: {n - warmup} jobs")
            load_from = time.monotonic() - t0
            c2, f2, l2, b2 = http_half.run_jobs(d.addr, jobs[warmup:], concurrency, deadline,
                                                progress)
            load_to = time.monotonic() - t0
            marks.append((load_from, "load"))
            marks.append((load_to, "end of load"))
            after = self._idle(d, pool_cap, samples, marks, "idle after load", t0)
        finally:
            stop.set()
            th.join(timeout=5)
        counts = c1 + c2
        failures = f1 + f2
        lat = {k: l1.get(k, []) + l2.get(k, []) for k in set(l1) | set(l2)}
        elapsed = load_to
        for fl in failures[:20]:
            self.fail(f"http: job {fl[0]} ({fl[1]}): {fl[2]}")
        if len(failures) > 20:
            self.fail(f"http: {len(failures) - 20} more failed jobs")
        code = d.term(within=60)
        if code != 0:
            self.fail(f"http daemon exited {code} after SIGTERM")
        left, new_tmp = host.leftovers([d.scope], self.tmpdir, self.tmp_before,
                                       self.all_pids(), self.workdir)
        if left:
            self.fail(f"http: leftovers {left}")

        load = [s for s in samples if load_from <= s[0] <= load_to]
        flat = flatness(before, after, load)
        for what in flat["failures"]:
            self.fail(f"http: {what}")
        svg = os.path.join(self.out, "http-daemon.svg")
        plot.write_svg(svg, samples, marks,
                       f"kiln serve during {n} HTTP jobs (seed {a.seed}): descriptors, threads, RSS")
        self.report["http"] = {
            "jobs": n, "warmup_jobs": warmup, "results_max": results_max,
            "concurrency": concurrency,
            "by_kind": dict(counts), "failed": len(failures), "busy_429": b1 + b2,
            "seconds": round(elapsed, 1),
            "latency_p50_ms": {k: round(1000 * statistics.median(v), 1) for k, v in lat.items()},
            "idle_before": before, "idle_after": after, "flatness": flat,
            "leftovers": left, "new_tmp_entries_not_ours": [e for e in new_tmp
                                                           if e not in left.get("tmp_files", [])],
            "csv": csv_path, "svg": svg,
        }
        log(f"HTTP half: {sum(counts.values())} jobs {dict(counts)} in {elapsed:.0f} s,"
            f" {len(failures)} failed; idle before {before}, after {after}")

    def _idle(self, d, pool_cap, samples, marks, label, t0):
        """The daemon at rest in a state that can be compared: a burst of
        6 Bash and 6 Python jobs at once leaves the pool holding the same
        sandboxes every time (it keeps what it lent, up to its cap); then
        the runtime's idle blocking threads time out (10 s) and the median
        of 5 samples a second apart is taken."""
        client = http_half.Client(d.addr)
        burst = [threading.Thread(target=client.request, args=("POST", "/v1/jobs", body))
                 for body in [{"runtime": "bash", "code": "sleep 0.5"}] * 6
                 + [{"runtime": "python", "code": "import time; time.sleep(0.5)"}] * 6]
        for t in burst:
            t.start()
        for t in burst:
            t.join(timeout=60)
        time.sleep(12)
        marks.append((time.monotonic() - t0, label))
        got = []
        for _ in range(5):
            got.append(host.sample(d.pid))
            time.sleep(1)
        sandboxes = len(d.scope.records())
        cgroups = len({os.path.basename(c) for c in d.scope.cgroups()})
        if not 1 <= sandboxes <= pool_cap or cgroups != sandboxes:
            self.fail(f"http: {label}: {sandboxes} sandboxes and {cgroups} sandbox cgroups"
                      f" alive; the pool keeps between 1 and {pool_cap}, each with its group")
        return {"fds": int(statistics.median(g[0] for g in got)),
                "threads": int(statistics.median(g[1] for g in got)),
                "rss_kib": int(statistics.median(g[2] for g in got)),
                "sandboxes": sandboxes}

    def all_pids(self):
        pids = []
        try:
            with open(self.pidfile) as f:
                pids = [int(l.split()[0]) for l in f if l.strip()]
        except OSError:
            pass
        return pids


def _held(d):
    try:
        m = d.metrics()
        return int(m.get("kiln_amqp_prefetch", 0))
    except OSError:
        return "?"


# How much the daemon may differ between the idle point after the warm-up
# and the idle point after the load, and between the first and the last
# tenth of the load. Why these numbers: at idle the daemon holds a fixed set
# of descriptors (listener, epoll, per pooled sandbox its control socket,
# pidfd and cgroup files) and a fixed set of threads (async workers; the
# blocking pool's idle threads exit after 10 s, which the idle wait covers),
# so anything above a jitter of 2 means one leaked per few thousand jobs.
# RSS is what glibc's allocator holds, not live data: freed memory stays in
# its arenas, so RSS moves with the peak of in-flight work; 10% or 8 MiB
# (whichever is larger) is well above that noise and well below a leak of
# 1 KiB per job over 10,000 jobs (10 MiB).
IDLE_FDS, IDLE_THREADS = 2, 2
# How many sandboxes the idle burst leaves pooled varies by one now and
# then (a sandbox that reaches its pool's max_uses during the burst is
# retired, not returned; which jobs queue behind max_running is timing).
# Each pooled jail holds 5 descriptors in the daemon (its control socket,
# pidfd, cgroup files; measured: 66 -> 71 descriptors for 11 -> 12
# sandboxes), so the idle points compare descriptors net of that.
PER_SANDBOX_FDS = 5
RSS_SHARE, RSS_FLOOR_KIB = 0.10, 8 * 1024
LOAD_FDS, LOAD_THREADS = 8, 4


def flatness(before, after, load):
    out = {"failures": [], "rule": (
        f"idle after load <= idle after warm-up + {IDLE_FDS} fds (net of {PER_SANDBOX_FDS} per"
        f" pooled sandbox more or fewer, at most 2), + {IDLE_THREADS} threads,"
        f" + max({int(RSS_SHARE * 100)}%, {RSS_FLOOR_KIB // 1024} MiB) RSS; median of the last"
        f" tenth of the load <= median of the first tenth + {LOAD_FDS} fds, + {LOAD_THREADS}"
        " threads, + the same RSS margin")}

    def rss_margin(base):
        return max(RSS_SHARE * base, RSS_FLOOR_KIB)

    pooled = after["sandboxes"] - before["sandboxes"]
    out["pool_difference"] = pooled
    if abs(pooled) > 2:
        out["failures"].append(f"the pool held {before['sandboxes']} sandboxes at the first"
                               f" idle point and {after['sandboxes']} at the second")
    if after["fds"] - PER_SANDBOX_FDS * pooled > before["fds"] + IDLE_FDS:
        out["failures"].append(f"descriptors at idle grew {before['fds']} -> {after['fds']}"
                               f" ({pooled:+d} pooled sandboxes)")
    if after["threads"] > before["threads"] + IDLE_THREADS:
        out["failures"].append(f"threads at idle grew {before['threads']} -> {after['threads']}")
    if after["rss_kib"] > before["rss_kib"] + rss_margin(before["rss_kib"]):
        out["failures"].append(f"RSS at idle grew {before['rss_kib']} -> {after['rss_kib']} KiB")
    if len(load) >= 20:
        k = max(3, len(load) // 10)
        first, last = load[:k], load[-k:]
        med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
        out["load_first_tenth"] = {"fds": med(first, 1), "threads": med(first, 2),
                                   "rss_kib": med(first, 3)}
        out["load_last_tenth"] = {"fds": med(last, 1), "threads": med(last, 2),
                                  "rss_kib": med(last, 3)}
        f, l = out["load_first_tenth"], out["load_last_tenth"]
        if l["fds"] > f["fds"] + LOAD_FDS:
            out["failures"].append(f"descriptors under load grew {f['fds']} -> {l['fds']}")
        if l["threads"] > f["threads"] + LOAD_THREADS:
            out["failures"].append(f"threads under load grew {f['threads']} -> {l['threads']}")
        if l["rss_kib"] > f["rss_kib"] + rss_margin(f["rss_kib"]):
            out["failures"].append(f"RSS under load grew {f['rss_kib']} -> {l['rss_kib']} KiB")
    return out


def cleanup(tag, bin_dir):
    """Removes everything the soak made, from its records alone (so the
    shell's trap can call it after the orchestrator died): the daemons it
    started (by pid and start time), their sandboxes (`kiln reap`), the
    cgroup parents, its RabbitMQ node and the work directory. Returns what
    could not be removed (the work directory then stays, for `kiln reap`)."""
    workdir = f"/run/kiln-soak-{tag}"
    if not os.path.isdir(workdir):
        return []
    daemons = []
    try:
        with open(os.path.join(workdir, "pids")) as f:
            daemons = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        pass
    for pid, start in daemons:
        if host.alive(pid, start):
            os.kill(pid, 9)
    # `kiln reap` takes only records whose owner is gone, and a SIGKILLed
    # daemon stays (a zombie) until its parent waits for it.
    host.wait_until(lambda: not any(host.alive(p, s) for p, s in daemons), 30)
    left = []
    for e in sorted(os.listdir(workdir)):
        if not e.startswith("state-"):
            continue
        name = e.removeprefix("state-")
        scope = host.Scope(os.path.join(workdir, e), f"kiln-soak-{tag}-{name}")
        if scope.records() or scope.cgroups():
            subprocess.run([os.path.join(bin_dir, "kiln"), "reap", "--state-dir",
                            scope.state_dir, "--cgroup-parent", scope.cgroup_parent],
                           timeout=60, capture_output=True)
        scope.remove_cgroup_parent()
        left += scope.cgroups() + [r["id"] for r in scope.records()]
    if os.path.exists(os.path.join(workdir, "broker.env")):
        b = Broker(workdir, tag)
        try:
            b.stop()
        except (SoakError, subprocess.TimeoutExpired):
            pid = b.beam_pid()
            if pid:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
    if left:
        print(f"soak clean-up: left {left}; records kept in {workdir} for `kiln reap`",
              file=sys.stderr)
        return left
    shutil.rmtree(workdir, ignore_errors=True)
    return []


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=10000)
    p.add_argument("--short", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--halves", default="amqp,http")
    p.add_argument("--cleanup-only", action="store_true")
    a = p.parse_args()
    if a.cleanup_only:
        return 1 if cleanup(a.tag, a.bin_dir) else 0
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    os.makedirs(a.out, exist_ok=True)
    s = Soak(a)
    log(f"seed {a.seed} (rerun with --seed {a.seed}), {a.jobs} jobs per half, work dir"
        f" {s.workdir}, results in {a.out}; load {loadavg()}")
    t = time.monotonic()
    try:
        for half in a.halves.split(","):
            getattr(s, half)()
    except SoakError as e:
        s.fail(str(e))
    except Exception as e:  # reported, and the clean-up still runs
        s.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        for d in s.daemons:
            if d.running():
                d.kill()
        not_removed = cleanup(a.tag, a.bin_dir)
        if not_removed:
            s.fail(f"clean-up could not remove {not_removed}")
        s.report["seconds"] = round(time.monotonic() - t, 1)
        s.report["load_at_end"] = loadavg()
        s.report["failures"] = s.failures
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(s.report, f, indent=1, default=str)
    log(f"report: {os.path.join(a.out, 'report.json')}")
    if s.failures:
        log(f"{len(s.failures)} failures:")
        for f in s.failures:
            log(f"  - {f}")
        return 1
    log(f"passed in {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
