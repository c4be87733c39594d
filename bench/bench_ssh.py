#!/usr/bin/env python3
"""sensors -j over SSH, side by side against the same loopback sshd:

  (a) a fresh `ssh` process per request (how the original proxy works),
  (b) the proxy's get_temperature end to end over its socket, warm (persistent connection),
  (c) 32 sshd nodes polled at once through the proxy, warm: wall time per round.

Both (a) and (b) log in with a key whose forced command is a plain `cat` of a sensors sample,
so the node's own cost is the same and small (the tests' stand-in script forks several
processes per run). Needs root (test accounts, sshd). Loopback only; bounded loops.

    .venv/bin/python bench/bench_ssh.py [--requests 200] [--nodes 32] [--rounds 20]
"""
import argparse
import concurrent.futures
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from conftest import Daemon, rpc  # noqa: E402
from sshnodes import FIXTURES_DIR, NodeSet, SshLab, make_keypair, restricted_key_line, ssh_command  # noqa: E402

LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}


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
              "rate_limit": LIMITS, "log_level": "warning"}
    work.mkdir()
    work.chmod(0o755)
    daemon = Daemon(work, config).start()
    public = (daemon.ssh_dir / "id_ed25519.pub").read_text()
    for node in nodes:
        authorize(node, public)
    return daemon


def proxy_latencies(daemon, requests):
    request = {"method": "get_temperature", "params": {"node": "n1"}}
    for _ in range(5):                       # warm: connection made, host key pinned
        assert rpc(daemon.socket, request)["success"]
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        reply = rpc(daemon.socket, request)
        samples.append(time.perf_counter() - start)
        assert reply["success"], reply
    return samples


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
            try:
                pooled = proxy_latencies(daemon, args.requests)
                rounds = poll_rounds(daemon, args.nodes, args.rounds)
            finally:
                daemon.stop()
    print(f"command: {' '.join(sys.argv)}")
    print(f"starting {args.nodes} sshd nodes: {start_nodes:.2f} s")
    print(f"(a) fresh ssh per request ({args.requests}): p50 {ms(statistics.median(fresh))}, "
          f"p99 {ms(percentile(fresh, 99))}")
    print(f"(b) proxy get_temperature, warm ({args.requests}): p50 {ms(statistics.median(pooled))}, "
          f"p99 {ms(percentile(pooled, 99))}")
    print(f"    speed-up at p50: {statistics.median(fresh) / statistics.median(pooled):.0f}x "
          "(target >= 30x)")
    print(f"(c) {args.nodes} nodes polled at once, warm ({args.rounds} rounds): "
          f"p50 {ms(statistics.median(rounds))}, max {ms(max(rounds))} (target <= 150 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
