"""Shared helpers for the scripts/bench_*.py benchmarks (not a benchmark itself).

Everything runs on 127.0.0.1 inside a temporary folder that is removed at the
end. Node processes are real `python -m node run` processes, set up the way
tests/conftest.py does it (CABINET_KDF=min, CABINET_PASSPHRASE, contacts
exchanged through exported descriptor files).

Run directly, this module is the baseline HTTP sink used by bench_delivery.py
and bench_small.py:

    python scripts/bench_common.py sink PORT [DIR]

a bare aiohttp server whose handler reads the request body with iter_any,
discards it and answers 200 with a short body. With DIR, requests to /store
also write the body to a file in DIR and fsync it (then delete it): an
informational floor for "receive and store durably" on this machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PASSPHRASE = "bench passphrase"
MiB = 1 << 20


# --- environment ---------------------------------------------------------------

def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABINET_")}
    env.update(CABINET_KDF="min", CABINET_PASSPHRASE=PASSPHRASE, PYTHONUNBUFFERED="1")
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    env.update(extra)
    return env


def use_bench_env() -> None:
    """Make this process behave like the node processes (fast KDF, known passphrase)."""
    for k in [k for k in os.environ if k.startswith("CABINET_")]:
        del os.environ[k]
    os.environ.update(CABINET_KDF="min", CABINET_PASSPHRASE=PASSPHRASE)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, AttributeError):
        kib = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f"{kib // 1024} MiB RAM"
    return (f"{os.cpu_count()} CPU(s) ({len(os.sched_getaffinity(0))} usable), {cpu}, {mem}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (everything on the machine), from /proc/stat."""
    def sample():
        with open("/proc/stat", encoding="ascii") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Benchmarks on a shared box: wait (up to max_wait s) until the CPUs are mostly idle."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    note = "" if busy <= threshold else "  (WARNING: other work is running, numbers will be noisy)"
    print(f"   CPU busy before start: {100 * busy:.0f}%, load average {os.getloadavg()[0]:.2f}{note}", flush=True)


def code_version() -> str:
    """Which node code is measured: the commit, and whether node/ has uncommitted changes."""
    snap = ROOT / "SNAPSHOT"            # a `git archive` copy made for a clean run, if any
    if snap.exists():
        return f"{ROOT} (snapshot of {snap.read_text().strip()})"
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "node"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    return f"{ROOT} at {rev or '?'}" + (" + uncommitted changes in node/" if dirty else "")


def header(title: str, quiet_wait: float = 0) -> None:
    print(f"== {title}")
    print(f"   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  |  {machine()}")
    print(f"   code: {code_version()}")
    wait_quiet(quiet_wait)


def footer() -> None:
    print(f"   load average at the end: {os.getloadavg()[0]:.2f} (1 min)")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Abort the whole run (cleanly, through the finally blocks) after `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"benchmark time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def temp_dir(keep: bool = False):
    d = Path(tempfile.mkdtemp(prefix="cabinet-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"(kept {d})")
        else:
            import shutil
            shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_file(path: Path, size: int, piece: int = 4 * MiB) -> Path:
    """A file of random (incompressible) bytes; written once, then read from the page cache."""
    block = os.urandom(piece)
    with open(path, "wb") as fh:
        left = size
        n = 0
        while left:
            # vary each block cheaply so the file is not one block repeated
            b = block if n % 2 == 0 else block[::-1]
            fh.write(b[:left])
            left -= min(left, len(b))
            n += 1
    return path


def prime_page_cache(folder: Path, nbytes: int) -> None:
    """Write then delete `nbytes` of scratch, so that the next big writes find free page-cache pages.

    On a VM with a free-page-reporting balloon (virtio_balloon, e.g. Firecracker),
    memory the guest freed more than ~2 s ago has been handed back to the host,
    and the first write into it runs at the host's page-fault speed (measured
    ~450-550 MiB/s here, against ~5,500 MiB/s for a write into pages freed a moment
    ago). That is the VM, not the code under test, and it would hit only the
    side that writes to disk. Priming right before each timed run removes it;
    pass --no-prime to measure the machine as it is.
    """
    block = bytes(4 * MiB)
    path = folder / ".prime"
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(block[:left])
            left -= len(block)
    path.unlink()


def warm(path: Path) -> None:
    """Read a file once so every measurement sees it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(8 * MiB):
            pass


def rate(nbytes: int, seconds: float) -> float:
    """MiB/s."""
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def verdict(ratio: float, target: float, above: bool = True) -> str:
    ok = ratio >= target if above else ratio <= target
    return "MET" if ok else "MISSED"


# --- /proc memory ----------------------------------------------------------------

def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM etc. in KiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("Vm"):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def peak_rss_mib(pid: int | str = "self") -> float:
    return proc_status(pid)["VmHWM"] / 1024


def rss_mib(pid: int | str = "self") -> float:
    return proc_status(pid)["VmRSS"] / 1024


def thread_cpu(pid: int | str = "self") -> dict[int, float]:
    """CPU seconds (user + system) used so far by each thread of a process, by thread ID."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            raw = open(f"{base}/{tid}/stat", encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def process_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system) of a whole process, threads that have ended included."""
    raw = open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace").read()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict[int, float], after: dict[int, float], pid: int) -> str:
    """"main 0.52 s, other threads 0.31 s, 0.02 s": CPU used between two thread_cpu() samples.

    Threads that ended in between are not in the second sample (see process_cpu for totals).
    """
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sorted((v - before.get(k, 0.0) for k, v in after.items() if k != pid), reverse=True)
    others = [o for o in others if o >= 0.005]
    return f"main {main:.2f} s" + ("" if not others else ", other threads " + ", ".join(f"{o:.2f} s" for o in others))


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --- profiles ----------------------------------------------------------------------

def summarize_pyspy(path: Path, top: int = 15) -> str:
    """Summarise a `py-spy record -f raw` file: where the CPU samples are, by leaf frame and by thread.

    py-spy only counts threads that are on a CPU (idle threads are left out),
    so the shares are shares of busy time, summed over threads.
    """
    leaf: dict[str, int] = {}
    total = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        # name the leaf by function and file:line, shortened to the project-relative path
        f = frames[-1]
        f = re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+|main)/", "(", f)
        leaf[f] = leaf.get(f, 0) + count
    if not total:
        return "     (no samples)"
    rows = sorted(leaf.items(), key=lambda kv: -kv[1])[:top]
    out = [f"     {total} samples on CPU; top leaf frames (self time):"]
    out += [f"     {100 * c / total:5.1f}%  {name[:140]}" for name, c in rows]
    return "\n".join(out)


def pyspy() -> str:
    return str(Path(sys.executable).with_name("py-spy"))


def pyspy_args() -> list[str]:
    """Extra py-spy options from $BENCH_PYSPY_ARGS, e.g. "--idle --threads" for wall-clock stacks per thread."""
    return os.environ.get("BENCH_PYSPY_ARGS", "").split()


def pyspy_wrap(out: Path) -> list[str]:
    """Prefix for a command line: run it under `py-spy record`, raw stacks to `out`."""
    return [pyspy(), "record", "--nonblocking", "-r", "250", "-f", "raw", *pyspy_args(), "-o", str(out), "--"]


class SelfProfile:
    """py-spy attached to this very process for the duration of a block (nothing if out is None)."""

    def __init__(self, out: Path | str | None) -> None:
        self.out, self.proc = out, None

    def __enter__(self):
        if self.out:
            self.proc = subprocess.Popen([pyspy(), "record", "--nonblocking", "-r", "250", "-f", "raw",
                                          *pyspy_args(), "-o", str(self.out), "--pid", str(os.getpid())],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)          # let it attach
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- node processes --------------------------------------------------------------

def cli(data: Path, *args: str, timeout: float = 120) -> str:
    cmd = [sys.executable, "-m", "node", *args, "--data", str(data)]
    p = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"cabinet {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


@dataclass
class NodeProc:
    """A practice's data folder and, while started, its `cabinet run` process."""

    data: Path
    name: str
    port: int
    node_id: str = ""
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def init(self) -> "NodeProc":
        out = cli(self.data, "init", "--name", self.name, "--listen", f"127.0.0.1:{self.port}")
        self.node_id = next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("Node ID:"))
        return self

    def start(self, timeout: float = 30, wrap: list[str] | None = None) -> "NodeProc":
        cmd = (wrap or []) + [sys.executable, "-m", "node", "run", "--data", str(self.data)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if "listening on" in line:
                # keep draining its output so the pipe never fills up and blocks the node
                import threading
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.proc.kill()
        raise RuntimeError(f"node {self.name} did not start:\n{''.join(self.log)}")

    def _drain(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        with contextlib.suppress(ValueError, OSError):
            for line in proc.stdout:
                self.log.append(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def node_pid(self) -> int:
        """The python process running the node (the child when started under a wrapper such as py-spy)."""
        pid = self.pid
        for _ in range(3):
            with contextlib.suppress(OSError):
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                if b"node.faces.cli" in cmdline and not any(b"py-spy" in c for c in cmdline[:1]):
                    return pid
            try:
                children = open(f"/proc/{pid}/task/{pid}/children").read().split()
            except OSError:
                return pid
            if not children:
                return pid
            pid = int(children[0])
        return pid

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        target = self.node_pid()
        if target != self.proc.pid:
            os.kill(target, signal.SIGTERM)   # under a wrapper (py-spy): stop the node, the wrapper follows
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code


def introduce(a: NodeProc, b: NodeProc) -> None:
    """Each adds the other as a contact from its exported descriptor file (as in tests/conftest.py)."""
    for x, y in ((a, b), (b, a)):
        f = x.data.parent / f"{x.data.name}.descriptor"
        cli(x.data, "id", "--export", str(f))
        cli(y.data, "contact", "add", str(f), "--id", x.node_id)


def make_pair(root: Path, sender_name: str = "Dr Anne Martin",
              receiver_name: str = "Dr Paul Durand") -> tuple[NodeProc, NodeProc]:
    gp = NodeProc(root / "gp", sender_name, free_port()).init()
    cardio = NodeProc(root / "cardio", receiver_name, free_port()).init()
    introduce(gp, cardio)
    return gp, cardio


# --- baseline sink server --------------------------------------------------------

@dataclass
class Sink:
    port: int
    proc: subprocess.Popen
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_sink(store_dir: Path | None = None, timeout: float = 20, tls: bool = False) -> Sink:
    """The bare aiohttp server; with `tls`, behind the node's own TLS 1.3 server context (a fresh
    identity's certificate), so that a baseline pays what TLS costs a node and nothing else."""
    port = free_port()
    extra = [str(store_dir) if store_dir else "-"] + (["tls"] if tls else [])
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), "sink", str(port), *extra], cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening" in line:
            return Sink(port, proc, tls)
        if not line:
            break
    proc.kill()
    raise RuntimeError("baseline sink server did not start")


def _serve_sink(port: int, store_dir: str | None = None, tls: bool = False) -> None:
    import asyncio

    from aiohttp import web
    context = None
    if tls:
        sys.path.insert(0, str(ROOT))
        from node.core.identity import Identity
        from node.transport.tls import ServerTLS
        context = ServerTLS(Identity.generate(), int(time.time() * 1000)).context

    async def swallow(request: web.Request) -> web.Response:
        n = 0
        if request.path == "/store" and store_dir:
            # informational variant: also write the body to disk and fsync it (blocking, in the loop)
            path = os.path.join(store_dir, f"sink-{os.getpid()}-{time.monotonic_ns()}")
            with open(path, "wb") as fh:
                async for piece in request.content.iter_any():
                    n += len(piece)
                    fh.write(piece)
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(path)
        else:
            async for piece in request.content.iter_any():
                n += len(piece)
        return web.Response(body=str(n).encode())

    async def main() -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", swallow)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=512, ssl_context=context).start()
        print(f"sink listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) in (3, 4, 5) and sys.argv[1] == "sink":
        _serve_sink(int(sys.argv[2]), sys.argv[3] if len(sys.argv) >= 4 and sys.argv[3] != "-" else None,
                    tls=sys.argv[4:] == ["tls"])
    else:
        print(__doc__)
        sys.exit(2)
