# Kiln's Python code-context driver: one long-lived interpreter per context,
# run as an ordinary exec in the sandbox (see executor/src/contexts/mod.rs).
#
# Requests arrive on stdin, one JSON object a line: {"code": "...", "n": 1}.
# Everything the host reads comes from the original fd 1, one JSON object a
# line:
#   {"ready": {...}}                         once, when the driver is set up
#   {"started": n}                           the cell runs (SIGINT reaches it)
#   {"stream": "stdout"|"stderr", "data": s} output of the running cell
#   {"display": {"mime/type": data, ...}}     rich output (display(), figures)
#   {"done": {"status": "ok"|"error"|"interrupted", "result": bundle|null,
#             "error": {"name", "value", "traceback"}|null}}
# fds 1 and 2 themselves become pipes drained by threads, so the output of
# child processes a cell starts is captured too and can never corrupt the
# channel. SIGINT while a cell runs raises KeyboardInterrupt in it; while
# idle it is ignored.
import ast, base64, builtins, codecs, io, json, linecache, os, signal, sys, threading, traceback, types

_ctl = os.fdopen(os.dup(1), "wb", buffering=0)
_ctl_lock = threading.Lock()


def _send(msg):
    line = (json.dumps(msg) + "\n").encode()
    with _ctl_lock:
        _ctl.write(line)


# A marker written into each output pipe after a cell: once the drain thread
# has seen it, everything the cell wrote before it has been forwarded.
_MARK = b"\x00\x1bkiln-cell-end\x1b\x00"


class _Drain(threading.Thread):
    def __init__(self, name, fd):
        super().__init__(daemon=True)
        self.stream, self.fd = name, fd
        self.synced = threading.Semaphore(0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def emit(self, raw, final=False):
        text = self.decoder.decode(raw, final)
        if text:
            _send({"stream": self.stream, "data": text})

    def run(self):
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                return
            pending += chunk
            while True:
                i = pending.find(_MARK)
                if i < 0:
                    break
                self.emit(pending[:i], final=True)
                pending = pending[i + len(_MARK):]
                self.synced.release()
            # Hold back a tail that may be the start of a marker.
            keep = 0
            for k in range(min(len(_MARK) - 1, len(pending)), 0, -1):
                if _MARK.startswith(pending[-k:]):
                    keep = k
                    break
            self.emit(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep:]


def _redirect(fd, name):
    r, w = os.pipe()
    os.dup2(w, fd)
    os.close(w)
    d = _Drain(name, r)
    d.start()
    return d


_drains = [_redirect(1, "stdout"), _redirect(2, "stderr")]
sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)


def _sync():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    for fd, d in zip((1, 2), _drains):
        try:
            os.write(fd, _MARK)
        except OSError:
            continue
        # Bounded: a cell that closed or replaced fd 1 or 2 must not hang
        # the context.
        d.synced.acquire(timeout=2)


def _b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def _figure_png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return _b64(buf.getvalue())


def _bundle(value):
    """The MIME bundle of a value: text/plain always, richer forms when the
    object offers them (IPython's _repr_*_ protocol, matplotlib figures)."""
    out = {}
    for mime, attr, binary in (
        ("image/png", "_repr_png_", True),
        ("image/jpeg", "_repr_jpeg_", True),
        ("image/svg+xml", "_repr_svg_", False),
        ("text/html", "_repr_html_", False),
        ("text/markdown", "_repr_markdown_", False),
        ("application/json", "_repr_json_", False),
    ):
        fn = getattr(type(value), attr, None)
        if fn is None:
            continue
        try:
            data = fn(value)
        except Exception:
            continue
        if data is None:
            continue
        if isinstance(data, tuple):
            data = data[0]
        if binary:
            out[mime] = _b64(data)
        elif mime == "application/json" and not isinstance(data, str):
            out[mime] = json.dumps(data)
        else:
            out[mime] = str(data)
    if "image/png" not in out and type(value).__module__.startswith("matplotlib.figure"):
        try:
            out["image/png"] = _figure_png(value)
        except Exception:
            pass
    try:
        out["text/plain"] = repr(value)
    except Exception as e:
        out["text/plain"] = "<repr failed: %r>" % (e,)
    return out


def display(*objs):
    """Sends each object's rich forms to the caller as a display result."""
    _sync()
    for o in objs:
        _send({"display": _bundle(o)})


builtins.display = display


def _open_figures():
    # Figures a cell left open (plt.plot without plt.show) come back as
    # PNG displays, as in a notebook; they are closed afterwards.
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            _send({"display": {"image/png": _figure_png(plt.figure(num)), "text/plain": "<Figure %d>" % num}})
        plt.close("all")
    except Exception as e:
        _send({"stream": "stderr", "data": "rendering figures failed: %r\n" % (e,)})


_main = types.ModuleType("__main__")
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
_ns = _main.__dict__
_running = False


def _on_sigint(signum, frame):
    if _running:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_sigint)


def _cell_traceback(e):
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def _run(code, n):
    global _running
    name = "<cell %d>" % n
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    result = None
    try:
        _running = True
        # From here on SIGINT interrupts the cell; the host waits for this
        # before it sends one.
        _send({"started": n})
        tree = ast.parse(code, name)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), _ns)
        if last is not None:
            value = eval(compile(last, name, "eval"), _ns)
            _running = False
            if value is not None:
                _ns["_"] = value
                result = _bundle(value)
                if "image/png" in result and type(value).__module__.startswith("matplotlib.figure"):
                    # Shown as the result; not again as an open figure.
                    sys.modules["matplotlib.pyplot"].close(value)
        _running = False
        status, error = "ok", None
    except BaseException as e:
        _running = False
        if isinstance(e, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "error"
        tb = _cell_traceback(e)
        try:
            sys.stderr.write(tb)
        except Exception:
            pass
        error = {"name": type(e).__name__, "value": str(e), "traceback": tb}
    _open_figures()
    _sync()
    return {"status": status, "result": result, "error": error}


def _serve():
    cwd = os.environ.pop("KILN_CONTEXT_CWD", "")
    if cwd:
        os.chdir(cwd)
    sys.path.insert(0, os.getcwd())
    _send({"ready": {"python": sys.version.split()[0], "pid": os.getpid(), "cwd": os.getcwd()}})
    stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    while True:
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return
        try:
            req = json.loads(line)
            done = _run(req["code"], req.get("n", 0))
        except KeyboardInterrupt:
            # An interrupt that landed between cells' bookkeeping.
            done = {"status": "interrupted", "result": None, "error": None}
        _send({"done": done})


_serve()
os._exit(0)
