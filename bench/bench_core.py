#!/usr/bin/env python3
"""Benchmark of the core daemon: latency, throughput, start-up, `version`, idle memory.

Starts its own daemon (temporary directory, limits raised so the limiter does not measure
itself) and talks to it over its Unix socket only. Every figure is printed with the command
that reproduces it. Targets: p50 <= 0.5 ms, >= 5,000 requests/s, socket ready <= 1 s,
`version` <= 100 ms and idle RSS <= 40 MB (both run from bytecode, as the pyz runs them; the
RSS of a Python that only imports the runtime dependencies is printed beside it); one
connection per request >= 80 % of a minimal asyncio Protocol server's rate
(bench/minimal_server.py), measured in the same run with the same client processes,
alternating which server goes first.

    python bench/bench_core.py [--requests 2000] [--clients 10] [--rounds 3]
        [--before OLD/pulse_sensor_proxy.py] [--starts 10] [--versions 20]
"""
import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import MODULE, PYTHON, DaemonProcess, wait_for  # noqa: E402  (the tests' real-process daemon)

REQUEST = b'{"correlation_id":"5f0c2a8e-3b1d-4c6e-9a7f-1e2d3c4b5a69","method":"get_status","params":null}\n'
BENCH_LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}


def command(extra=""):
    return f"{PYTHON} bench/{Path(sys.argv[0]).name}{extra}"


def report(name, value, target=None, ok=None):
    mark = "" if ok is None else ("  ok" if ok else "  MISSED")
    goal = f"  (target {target})" if target else ""
    print(f"{name:<48} {value}{goal}{mark}", flush=True)


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def read_line(sock, buffer=b""):
    while b"\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a full reply")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    if b'"success":true' not in line:
        raise RuntimeError(f"unexpected reply {line[:200]!r}")
    return rest


def one_shot(path):
    """One request the way Pulse sends it: connect, one line, read one line, close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(REQUEST)
        read_line(sock)


class KeepAlive:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""

    def request(self):
        self.sock.sendall(REQUEST)
        self.buffer = read_line(self.sock, self.buffer)

    def close(self):
        self.sock.close()


def latencies(path, count, keep_alive):
    client = KeepAlive(path) if keep_alive else None
    send = client.request if client else (lambda: one_shot(path))
    for _ in range(min(200, count)):
        send()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        send()
        samples.append(time.perf_counter() - start)
    if client:
        client.close()
    return samples


def _client_worker(tasks, out):
    """One client process for every run: (path, count, keep_alive, start_at) in, span out."""
    for path, count, keep_alive, start_at in iter(tasks.get, None):
        client = KeepAlive(path) if keep_alive else None
        while time.time() < start_at:
            time.sleep(0.001)
        began = time.perf_counter()
        for _ in range(count):
            if client:
                client.request()
            else:
                one_shot(path)
        if client:
            client.close()
        out.put((began, time.perf_counter()))


class Clients:
    """`count` client processes (each its own pid: its own limiter bucket), kept for all runs
    so that every server is measured with the same processes."""

    def __init__(self, count):
        self.tasks = [multiprocessing.Queue() for _ in range(count)]
        self.out = multiprocessing.Queue()
        self.procs = [multiprocessing.Process(target=_client_worker, args=(tasks, self.out))
                      for tasks in self.tasks]
        for proc in self.procs:
            proc.start()

    def throughput(self, path, per_client, keep_alive):
        """Requests/s of all the processes at once against `path`."""
        start_at = time.time() + 0.3
        for tasks in self.tasks:
            tasks.put((path, per_client, keep_alive, start_at))
        spans = [self.out.get(timeout=120) for _ in self.tasks]
        elapsed = max(end for _, end in spans) - min(begin for begin, _ in spans)
        return len(self.tasks) * per_client / elapsed

    def close(self):
        for tasks in self.tasks:
            tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=30)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alternating_rates(clients, servers, rounds, per_client, keep_alive):
    """({name: [rate per round]}, {name: [server CPU µs per request, per round]}) with the
    order of the servers ({name: (socket path, pid)}) rotated every round."""
    names = list(servers)
    rates, cpu = {name: [] for name in names}, {name: [] for name in names}
    requests = len(clients.tasks) * per_client
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            path, pid = servers[name]
            began = cpu_seconds(pid)
            rates[name].append(clients.throughput(path, per_client, keep_alive))
            cpu[name].append((cpu_seconds(pid) - began) / requests * 1e6)
    return rates, cpu


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def time_to_ready(base, starts):
    """Seconds from spawning `serve` to the socket accepting (key already on disk)."""
    samples = []
    for index in range(starts):
        daemon = DaemonProcess(base / f"start{index % 2}", {"rate_limit": BENCH_LIMITS})
        daemon.base.mkdir(exist_ok=True)
        daemon.start(wait=False)    # warms the key on the first round of each dir
        daemon.wait_ready()
        daemon.stop()
    for index in range(starts):
        daemon = DaemonProcess(base / f"start{index % 2}", {"rate_limit": BENCH_LIMITS})
        began = time.perf_counter()
        daemon.start(wait=False)
        wait_for(lambda: _accepts(daemon.socket), timeout=30, what="the socket")
        samples.append(time.perf_counter() - began)
        daemon.stop()
    return samples


def _accepts(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def version_times(runs, program=MODULE):
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([PYTHON, str(program), "version"], check=True, capture_output=True)
        samples.append(time.perf_counter() - began)
    return samples


def start_minimal_server(base):
    path = base / "minimal.sock"
    proc = subprocess.Popen([PYTHON, str(ROOT / "bench" / "minimal_server.py"), str(path)])
    wait_for(lambda: _accepts(path), timeout=30, what="the minimal server")
    return proc, str(path)


def bytecode_launcher(base):
    """A launcher that imports the module from bytecode, as the pyz runs it (build_zipapp.sh
    packs the module's .pyc). Run from the .py, every start compiles all of it: `version` pays
    the compile, and a daemon keeps the compiler's garbage in its heap (about 18 MB of RSS that
    no installed daemon has)."""
    import importlib.util
    import py_compile
    import shutil
    home = base / "bytecode"
    home.mkdir()
    source = home / MODULE.name
    shutil.copy(MODULE, source)
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)),
                       doraise=True)
    launcher = home / "launch.py"
    launcher.write_text(f"import sys\nsys.path.insert(0, {str(home)!r})\n"
                        "import pulse_sensor_proxy\nsys.exit(pulse_sensor_proxy.main())\n")
    return launcher


@contextlib.contextmanager
def daemons_from(program):
    """DaemonProcess starts `program` instead of the project's module meanwhile."""
    import conftest
    saved, conftest.MODULE = conftest.MODULE, Path(program)
    try:
        yield
    finally:
        conftest.MODULE = saved


def installed_rss(base, launcher):
    """RSS (KiB) of the daemon run from bytecode after start-up + 20 requests: on its first
    start (the key is generated, which loads asyncssh as the first node read does), and on a
    restart (key on disk, no node read yet)."""
    figures = {}
    with daemons_from(launcher):
        for start in ("first start", "restart"):
            daemon = DaemonProcess(base / "installed", {"rate_limit": BENCH_LIMITS}).start()
            try:
                for _ in range(20):
                    one_shot(str(daemon.socket))
                figures[start] = rss_kib(daemon.proc.pid)
            finally:
                daemon.stop()
    return figures


DEPENDENCIES_ONLY = ("import asyncio, json, socket, ssl, yaml, asyncssh\n"
                     "print(next(line.split()[1] for line in open('/proc/self/status')\n"
                     "           if line.startswith('VmRSS:')))")


def dependencies_rss():
    """RSS (KiB) of a Python that imports the daemon's runtime dependencies and nothing of the
    module: the floor under the daemon's idle RSS once asyncssh is loaded."""
    out = subprocess.run([PYTHON, "-c", DEPENDENCIES_ONLY], check=True, capture_output=True,
                         text=True)
    return int(out.stdout)


def start_before_daemon(base, module):
    """The same bench's daemon, but from another copy of the module (the code before a change)."""
    daemon = DaemonProcess(base / "before", {"rate_limit": BENCH_LIMITS})
    daemon.base.mkdir()
    with daemons_from(module):
        daemon.start()
    return daemon


def report_rates(rates, cpu, clients, label, keep_alive):
    """Each server's median rate, rounds and CPU per request; the daemon's rate as a share of
    the others'."""
    medians = {name: statistics.median(samples) for name, samples in rates.items()}
    for name, samples in rates.items():
        if name == "daemon":
            report(f"throughput, {clients} client processes, {label}", f"{medians[name]:,.0f} req/s",
                   ">= 5,000 req/s", medians[name] >= 5000)
        else:
            report(f"  {name}, {label}", f"{medians[name]:,.0f} req/s")
        print(f"    rounds: {', '.join(f'{rate:,.0f}' for rate in samples)}; its CPU per "
              f"request {statistics.median(cpu[name]):.0f} us")
    share = 100 * medians["daemon"] / medians["minimal server"]
    if keep_alive:
        report(f"  daemon / minimal server, {label}", f"{share:.0f} %")
    else:
        report(f"  daemon / minimal server, {label}", f"{share:.0f} %", ">= 80 %", share >= 80)
    if "before" in medians:
        report(f"  daemon / before, {label}", f"{100 * medians['daemon'] / medians['before']:.0f} %")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput runs per server, alternating which goes first")
    parser.add_argument("--before", metavar="MODULE",
                        help="also measure a daemon run from this copy of pulse_sensor_proxy.py")
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--versions", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="psp-bench-"))
    base.chmod(0o755)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; daemon {MODULE}")
    daemon = DaemonProcess(base / "serve", {"rate_limit": BENCH_LIMITS})
    daemon.base.mkdir()
    daemon.start()
    path = str(daemon.socket)
    minimal, minimal_path = start_minimal_server(base)
    before = start_before_daemon(base, args.before) if args.before else None
    clients = Clients(args.clients)
    try:
        for _ in range(20):
            one_shot(path)
        report("idle RSS after start-up + 20 requests, from the .py",
               f"{rss_kib(daemon.proc.pid) / 1024:.1f} MB")
        for keep_alive, label in ((False, "one connection per request"), (True, "keep-alive")):
            samples = latencies(path, args.requests, keep_alive)
            p50, p99 = percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000
            report(f"get_status p50, {label}", f"{p50:.3f} ms", "<= 0.5 ms", p50 <= 0.5)
            report(f"get_status p99, {label}", f"{p99:.3f} ms")
        print(f"  command: {command(f' --requests {args.requests}')}")
        servers = {"daemon": (path, daemon.proc.pid), "minimal server": (minimal_path, minimal.pid)}
        if before:
            servers["before"] = (str(before.socket), before.proc.pid)
        for keep_alive, label in ((False, "one connection per request"), (True, "keep-alive")):
            rates, cpu = alternating_rates(clients, servers, args.rounds, args.per_client,
                                           keep_alive)
            report_rates(rates, cpu, args.clients, label, keep_alive)
        extra = f" --before {args.before}" if args.before else ""
        print(f"  command: {command(f' --clients {args.clients} --per-client {args.per_client}')}"
              f" --rounds {args.rounds}{extra}")
        report("RSS after the runs above", f"{rss_kib(daemon.proc.pid) / 1024:.1f} MB")
    finally:
        clients.close()
        minimal.terminate()
        minimal.wait()
        if before:
            before.stop()
        daemon.stop()
    (base / "installed").mkdir()
    launcher = bytecode_launcher(base)
    rss = installed_rss(base, launcher)
    report("idle RSS from bytecode, asyncssh loaded (first start)",
           f"{rss['first start'] / 1024:.1f} MB", "<= 40 MB", rss["first start"] <= 40 * 1024)
    report("idle RSS from bytecode, restart before a node read", f"{rss['restart'] / 1024:.1f} MB")
    report("  RSS of the dependencies alone (asyncio, ssl, yaml, asyncssh)",
           f"{dependencies_rss() / 1024:.1f} MB")
    print(f"  command: {command()}")
    ready = statistics.median(time_to_ready(base, args.starts))
    report(f"process start -> socket accepts, median of {args.starts}", f"{ready * 1000:.0f} ms",
           "<= 1 s", ready <= 1.0)
    print(f"  command: {command(f' --starts {args.starts}')}")
    version = statistics.median(version_times(args.versions))
    report(f"`version` wall time from the .py, median of {args.versions}",
           f"{version * 1000:.1f} ms")
    version = statistics.median(version_times(args.versions, launcher))
    report(f"`version` wall time from bytecode, median of {args.versions}",
           f"{version * 1000:.1f} ms", "<= 100 ms", version <= 0.1)
    print(f"  command: {command(f' --versions {args.versions}')}")


if __name__ == "__main__":
    main()
