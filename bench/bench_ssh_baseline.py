#!/usr/bin/env python3
"""Baseline: one fresh `ssh` process per request against one loopback test node.

This is how the original proxy fetched `sensors -j`; the daemon's pooled
asyncssh client is measured against these figures.  Also times starting 32
test nodes.  Needs root (see tests/sshnodes.py).

    python bench/bench_ssh_baseline.py [--requests 200] [--nodes 32]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sshnodes import NodeSet, SshLab, SshNode, make_keypair, ssh_command  # noqa: E402


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def fresh_ssh_latencies(lab: SshLab, work: Path, requests: int, kex: str | None) -> list[float]:
    key = make_keypair(work / "key")
    known_hosts = work / "known_hosts"
    with SshNode(lab) as node:
        node.authorize(key.public_line)
        known_hosts.write_text(node.known_hosts_text())
        argv = ssh_command(node, key.private_path, known_hosts, "sensors", "-j")
        if kex:
            argv[1:1] = ["-o", f"KexAlgorithms={kex}"]
        samples = []
        for _ in range(requests):
            start = time.perf_counter()
            result = subprocess.run(argv, capture_output=True, timeout=60)
            samples.append(time.perf_counter() - start)
            if result.returncode != 0:
                raise SystemExit(f"ssh failed: {result.stderr.decode(errors='replace')}")
        if node.exec_count() != requests:
            raise SystemExit(f"expected {requests} runs on the node, saw {node.exec_count()}")
    return samples


def node_start_seconds(lab: SshLab, count: int) -> float:
    start = time.perf_counter()
    with NodeSet(lab, count):
        elapsed = time.perf_counter() - start
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=32)
    args = parser.parse_args()
    lab = SshLab()
    # OpenSSH's default key exchange (sntrup761x25519) costs far more CPU than
    # curve25519, which is what asyncssh negotiates without liboqs: show both.
    for kex in (None, "curve25519-sha256"):
        with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
            ms = [s * 1000 for s in fresh_ssh_latencies(lab, Path(tmp), args.requests, kex)]
        print(f"fresh ssh per request, kex {kex or 'OpenSSH default'}, {args.requests} sequential requests, "
              f"1 loopback node:")
        print(f"  p50 {percentile(ms, 50):.1f} ms  p99 {percentile(ms, 99):.1f} ms  "
              f"mean {statistics.mean(ms):.1f} ms  max {max(ms):.1f} ms  "
              f"{len(ms) / (sum(ms) / 1000):.1f} req/s")
    print(f"start {args.nodes} nodes: {node_start_seconds(lab, args.nodes):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
