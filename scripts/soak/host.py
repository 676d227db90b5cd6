"""The host side of the soak: the `kiln serve` processes it starts (by pid,
never by name), the sandbox records they keep, what a daemon costs over time
(descriptors, threads, RSS), and what was left behind (processes, cgroups,
mounts, files).

Only things the soak made itself are touched: its own daemons, sandboxes
recorded in its own state directories with one of its daemons as owner,
cgroups under its own parent.
"""

import json
import os
import signal
import subprocess
import time

CGROUP_ROOTS = [
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/cpuacct",
]


def start_time(pid):
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid, start):
    return start is not None and start_time(pid) == start


class Daemon:
    """One `kiln serve` the soak started: its pid and start time, its
    address, its scope (state directory, cgroup parent) and its logs."""

    def __init__(self, name, binary, scope, args, env, logdir, pidfile):
        self.name = name
        self.binary = binary
        self.scope = scope
        self.args = args
        self.env = env
        self.logdir = logdir
        self.pidfile = pidfile
        self.proc = None
        self.start = None
        self.addr = None
        self.generation = 0

    def spawn(self, within=60):
        """Starts the daemon and waits (bounded) for its "listening on"."""
        self.generation += 1
        out = os.path.join(self.logdir, f"{self.name}.{self.generation}.stdout")
        err = os.path.join(self.logdir, f"{self.name}.{self.generation}.stderr")
        cmd = [
            self.binary, "serve", "--bind", "127.0.0.1:0",
            "--state-dir", self.scope.state_dir,
            "--cgroup-parent", self.scope.cgroup_parent,
        ] + self.args
        with open(out, "wb") as o, open(err, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                         env=self.env)
        self.start = start_time(self.proc.pid)
        with open(self.pidfile, "a") as f:
            f.write(f"{self.proc.pid} {self.start}\n")
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                with open(out) as f:
                    line = f.readline()
            except OSError:
                line = ""
            if line.startswith("listening on http://"):
                self.addr = line.strip().removeprefix("listening on http://")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise SoakError(f"{self.name}: kiln serve did not start in {within} s; see {err}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a crash would; waits for the exit."""
        if self.running() and alive(self.proc.pid, self.start):
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=30)

    def term(self, within=60):
        """SIGTERM (drain), then SIGKILL past `within`; returns the exit code."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SoakError(f"{self.name}: did not exit within {within} s of SIGTERM")

    def metrics(self):
        """The daemon's /metrics as {name{labels}: value}."""
        import http.client
        c = http.client.HTTPConnection(self.addr, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            k, v = line.rsplit(" ", 1)
            try:
                out[k] = float(v)
            except ValueError:
                pass
        return out


class SoakError(Exception):
    pass


class Scope:
    """A daemon's private corner: state directory and cgroup parent."""

    def __init__(self, state_dir, cgroup_parent):
        self.state_dir = state_dir
        self.cgroup_parent = cgroup_parent
        os.makedirs(state_dir, exist_ok=True)
        os.chmod(state_dir, 0o755)

    def records(self):
        """The sandbox records in the state directory (any backend)."""
        out = []
        for backend in ("jails",):
            d = os.path.join(self.state_dir, backend)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                try:
                    with open(os.path.join(d, n, "record.json")) as f:
                        out.append(json.load(f))
                except (OSError, ValueError):
                    # Being written or removed right now.
                    continue
        return out

    def cgroups(self):
        out = []
        for root in CGROUP_ROOTS:
            p = os.path.join(root, self.cgroup_parent)
            try:
                out += [os.path.join(p, e) for e in os.listdir(p)
                        if os.path.isdir(os.path.join(p, e))]
            except OSError:
                pass
        return out

    def remove_cgroup_parent(self):
        for root in CGROUP_ROOTS:
            try:
                os.rmdir(os.path.join(root, self.cgroup_parent))
            except OSError:
                pass


def kill_random_agent(rng, scopes, daemons):
    """SIGKILLs the init (the agent) of one random sandbox recorded in the
    soak's own state directories whose owner is one of the soak's running
    daemons, checked by pid *and* start time. Returns what was killed, or
    None when no sandbox qualified."""
    owners = {(d.pid, d.start) for d in daemons if d.running()}
    candidates = []
    for s in scopes:
        for r in s.records():
            o = r.get("owner", {})
            if (o.get("pid"), o.get("start")) not in owners:
                continue
            for p in r.get("processes", []):
                if alive(p["pid"], p["start"]):
                    candidates.append((r["id"], p["pid"], p["start"]))
    if not candidates:
        return None
    candidates.sort()
    sid, pid, start = rng.choice(candidates)
    if not alive(pid, start):
        return None
    os.kill(pid, signal.SIGKILL)
    return {"sandbox": sid, "pid": pid}


def sample(pid):
    """(open descriptors, threads, RSS in KiB) of `pid`, None if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return fds, threads, rss
    except (OSError, ValueError):
        return None


def processes_in(cgroup_parent, needles):
    """Pids of processes in a cgroup under `cgroup_parent`, or whose command
    line mentions one of `needles` (the soak's own paths)."""
    me = os.getpid()
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open(f"/proc/{e}/cgroup") as f:
                cg = f.read()
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        in_group = any(line.split(":", 2)[-1].startswith(f"/{cgroup_parent}/")
                       or line.split(":", 2)[-1].strip() == f"/{cgroup_parent}"
                       for line in cg.splitlines())
        if in_group or any(n in cmd for n in needles):
            out.append((int(e), cmd[:120]))
    return out


def mounts_mentioning(needles):
    with open("/proc/self/mountinfo") as f:
        return [l.strip() for l in f if any(n in l for n in needles)]


def files_under(path):
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.join(root, d) for d in dirs]
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def leftovers(scopes, tmpdir, tmp_before, pids, workdir):
    """Everything the soak's daemons left once they exited: processes,
    cgroups, mounts, sandbox files in the state directories, files in the
    daemons' TMPDIR, and new entries in /tmp naming one of their pids."""
    left = {}
    procs = []
    for s in scopes:
        procs += processes_in(s.cgroup_parent, [workdir])
    if procs:
        left["processes"] = procs
    cg = [c for s in scopes for c in s.cgroups()]
    if cg:
        left["cgroups"] = cg
    m = mounts_mentioning([workdir] + [s.cgroup_parent for s in scopes])
    if m:
        left["mounts"] = m
    files = [f for s in scopes for f in files_under(os.path.join(s.state_dir, "jails"))]
    if files:
        left["state_files"] = files
    t = files_under(tmpdir)
    if t:
        left["tmpdir_files"] = t
    new_tmp = sorted(set(os.listdir("/tmp")) - tmp_before)
    ours = [n for n in new_tmp if any(str(p) in n for p in pids)]
    if ours:
        left["tmp_files"] = ours
    return left, new_tmp


def wait_until(pred, within, step=0.1):
    """Polls `pred` until true or `within` seconds; returns its last value."""
    deadline = time.monotonic() + within
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)
