#!/usr/bin/env python3
"""sensors -j over SSH, side by side against the same loopback sshd:

  (a) a fresh `ssh` process per request (how the original proxy works),
  (b) the proxy's get_temperature end to end over its socket, warm (persistent connection),
      interleaved one by one with
  (f) the floor: the bench's own persistent asyncssh connection to the same sshd, a new exec
      channel per request, with the proxy's choice of ciphers (what the proxy cannot do with
      less), alternating which goes first;
      the proxy's overhead over it at p50 and p99, split into time inside its handler (its
      audit record's latency_ms) and outside (accept, framing, reply), and the daemon's CPU
      seconds per 1,000 readings,
  (c) 32 sshd nodes polled at once through the proxy, warm: wall time per round.

The proxy reads the node on every request here (node_min_interval_seconds 0). (a), (b) and (f)
log in with a key whose forced command is a plain `cat` of a sensors sample,
so the node's own cost is the same and small (the tests' stand-in script forks several
processes per run). Needs root (test accounts, sshd). Loopback only; bounded loops.

    .venv/bin/python bench/bench_ssh.py [--requests 200] [--nodes 32] [--rounds 20]
"""
import argparse
import asyncio
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import gojson  # noqa: E402
from bench_core import cpu_seconds  # noqa: E402
from conftest import DaemonProcess, psp, rpc  # noqa: E402
from pulse_client import exchange_bytes  # noqa: E402
from sshnodes import FIXTURES_DIR, NodeSet, SshLab, make_keypair, restricted_key_line, ssh_command  # noqa: E402

LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}
CORR = "00000000-0000-4000-8000-{:012d}"


SAMPLE = FIXTURES_DIR / "intel-coretemp-nvme.json"


def percentile(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def authorize(node, public_key):
    node.write_authorized_keys(restricted_key_line(public_key, f"cat {SAMPLE}") + "\n")


def fresh_ssh_latencies(node, work, requests):
    key = make_keypair(work / "fresh-key")
    authorize(node, key.public_line)
    known_hosts = work / "known_hosts"
    known_hosts.write_text(node.known_hosts_text())
    argv = ssh_command(node, key.private_path, known_hosts, "sensors", "-j")
    argv[1:1] = ["-o", "KexAlgorithms=curve25519-sha256"]   # what asyncssh negotiates
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, timeout=60)
        samples.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"ssh failed: {result.stderr.decode(errors='replace')}")
    return samples


def ms(seconds):
    return f"{seconds * 1000:.2f} ms"


def start_daemon(work, nodes):
    config = {"nodes": {f"n{i + 1}": {"host": n.host, "port": n.port, "user": n.user}
                        for i, n in enumerate(nodes)},
              "rate_limit": LIMITS, "log_level": "info", "node_min_interval_seconds": 0}
    work.mkdir()
    work.chmod(0o755)
    daemon = DaemonProcess(work, config).start()
    public = (daemon.ssh_dir / "id_ed25519.pub").read_text()
    for node in nodes:
        authorize(node, public)
    return daemon


class Floor:
    """The bench's own persistent asyncssh connection: one exec channel per request."""

    def __init__(self, node, work):
        import asyncssh
        key = make_keypair(work / "floor-key")
        node.write_authorized_keys(node.authorized_keys_path.read_text()
                                   + restricted_key_line(key.public_line, f"cat {SAMPLE}") + "\n")
        self.loop = asyncio.new_event_loop()
        known = asyncssh.import_known_hosts(node.known_hosts_text())
        self.conn = self.loop.run_until_complete(asyncssh.connect(
            node.host, node.port, username=node.user, client_keys=[str(key.private_path)],
            known_hosts=known, agent_path=None, encryption_algs=psp.SSH_CIPHERS))

    def request(self):
        result = self.loop.run_until_complete(self.conn.run("sensors -j", encoding=None))
        if result.exit_status != 0 or not result.stdout:
            raise SystemExit(f"floor request failed: {result.stderr!r}")

    def close(self):
        self.conn.close()
        self.loop.run_until_complete(self.conn.wait_closed())
        self.loop.close()


def timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def proxy_and_floor(daemon, floor, requests):
    """(proxy samples, floor samples, {corr id: proxy sample}, CPU s) interleaved one by one.

    A proxy sample is the socket exchange, as the floor's is its channel's: each reply is
    decoded and checked (as Go's decoder would take it) once the clock has stopped."""
    replies = []

    def proxy(index):
        line = json.dumps({"correlation_id": CORR.format(index), "method": "get_temperature",
                           "params": {"node": "n1"}})
        replies.append(exchange_bytes(daemon.socket, line))
    for index in range(5):                   # warm: connections made, host key pinned
        proxy(index)
        floor.request()
    pooled, floors, by_id = [], [], {}
    cpu_before = cpu_seconds(daemon.proc.pid)
    for index in range(requests):
        if index % 2:
            floors.append(timed(floor.request))
        pooled.append(timed(lambda: proxy(index)))
        by_id[CORR.format(index)] = pooled[-1]
        if not index % 2:
            floors.append(timed(floor.request))
    cpu = cpu_seconds(daemon.proc.pid) - cpu_before
    for reply in map(gojson.check_reply, replies):
        assert reply["success"], reply
    return pooled, floors, by_id, cpu


def handler_times(daemon, by_id):
    """The handler's own time (audit latency_ms) of each of the requests in `by_id`."""
    times = {}
    for record in daemon.log_records():
        if record.get("corr_id") in by_id and "latency_ms" in record:
            times[record["corr_id"]] = record["latency_ms"] / 1000
    missing = set(by_id) - set(times)
    if missing:
        raise SystemExit(f"{len(missing)} requests without an audit record")
    return times


def poll_rounds(daemon, count, rounds):
    names = [f"n{i + 1}" for i in range(count)]

    def one(name):
        reply = rpc(daemon.socket, {"method": "get_temperature", "params": {"node": name}})
        assert reply["success"], reply
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(one, names))           # warm
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(one, names))
            samples.append(time.perf_counter() - start)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    lab = SshLab()
    with tempfile.TemporaryDirectory(prefix="psp-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        with NodeSet(lab, args.nodes) as nodes:
            start_nodes = time.perf_counter() - started
            fresh = fresh_ssh_latencies(nodes[0], work, args.requests)
            daemon = start_daemon(work / "daemon", nodes)
            floor = Floor(nodes[0], work)
            try:
                pooled, floors, by_id, cpu = proxy_and_floor(daemon, floor, args.requests)
                rounds = poll_rounds(daemon, args.nodes, args.rounds)
            finally:
                floor.close()
                daemon.stop()
            inside = handler_times(daemon, by_id)
    outside = [by_id[corr] - inside[corr] for corr in by_id]
    p50, p99 = statistics.median, lambda samples: percentile(samples, 99)
    print(f"command: {' '.join(sys.argv)}")
    print(f"starting {args.nodes} sshd nodes: {start_nodes:.2f} s")
    print(f"(a) fresh ssh per request ({args.requests}): p50 {ms(p50(fresh))}, "
          f"p99 {ms(p99(fresh))}")
    print(f"(f) floor: own asyncssh connection, new channel ({args.requests}, interleaved): "
          f"p50 {ms(p50(floors))}, p99 {ms(p99(floors))}")
    print(f"(b) proxy get_temperature, warm ({args.requests}, interleaved): "
          f"p50 {ms(p50(pooled))}, p99 {ms(p99(pooled))}")
    for name, stat in (("p50", p50), ("p99", p99)):
        print(f"    overhead over the floor at {name}: {ms(stat(pooled) - stat(floors))} "
              f"(inside the handler {ms(stat(list(inside.values())) - stat(floors))}, "
              f"outside {ms(stat(outside))})" + ("  (target <= 1 ms)" if name == "p50" else ""))
    print(f"    daemon CPU (user + sys) per 1,000 get_temperature: "
          f"{cpu * 1000 / args.requests:.2f} s")
    print(f"    speed-up over ssh per request at p50: {p50(fresh) / p50(pooled):.0f}x "
          "(target >= 30x)")
    print(f"(c) {args.nodes} nodes polled at once, warm ({args.rounds} rounds): "
          f"p50 {ms(p50(rounds))}, max {ms(max(rounds))} (target <= 150 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
