#!/usr/bin/env python3
"""Pulse's poll loop at 64 nodes every 5 s, in real time, against the default limits.

A real `serve` process with the default config (rate limits, node_min_interval_seconds),
8 loopback sshd serving 8 node names each (the tests' `sensors` stand-in, which logs every
run), and one Pulse process (tests/pulse_client.py, its retries and
its switch-off rule) under a container root's uid polling all 64 names at once every
--interval seconds. Reports the served fraction, the refusals, `sensors -j` runs per node per
minute, and the daemon's CPU share (its utime + stime over the wall time of the polls).
Needs root (test accounts, sshd). Loopback only.

    .venv/bin/python bench/bench_pulse_poll.py [--cycles 12] [--interval 5]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_core import command, cpu_seconds, report  # noqa: E402
from conftest import ROOT, DaemonProcess, as_uid  # noqa: E402
from sshnodes import NodeSet, SshLab  # noqa: E402

SSHDS, NAMES_PER_SSHD, CONTAINER_ROOT = 8, 8, 100000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="psp-bench-poll-"))
    work.chmod(0o755)
    with NodeSet(SshLab(), SSHDS) as sshds:
        names = {f"pve{i + 1:02d}": sshds[i % SSHDS] for i in range(SSHDS * NAMES_PER_SSHD)}
        (work / "subuid").write_text(f"root:{CONTAINER_ROOT}:65536\n")
        daemon = DaemonProcess(work, {"log_level": "warning", "subuid_file": str(work / "subuid"),
                               "nodes": {name: {"host": n.host, "port": n.port, "user": n.user}
                                         for name, n in names.items()}}).start()
        try:
            public = (daemon.ssh_dir / "id_ed25519.pub").read_text()
            for node in sshds:
                node.authorize(public)
            pulse = subprocess.Popen(as_uid(CONTAINER_ROOT) + [
                "/usr/bin/python3", "-E", "-s", str(ROOT / "tests" / "pulse_client.py"),
                str(daemon.socket)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            runs_before = {node.user: node.exec_count() for node in sshds}
            cpu_before, began = cpu_seconds(daemon.proc.pid), time.monotonic()
            totals = {"answered": 0, "asked": 0, "rate_limited": 0, "transport_failures": 0,
                      "cached": 0}
            for cycle in range(args.cycles):
                due = began + cycle * args.interval
                time.sleep(max(0.0, due - time.monotonic()))     # Pulse's poll timer
                pulse.stdin.write(json.dumps(sorted(names)) + "\n")
                pulse.stdin.flush()
                summary = json.loads(pulse.stdout.readline())
                totals["asked"] += len(names)
                for key in ("answered", "rate_limited", "transport_failures", "cached"):
                    totals[key] += summary[key]
            time.sleep(max(0.0, began + args.cycles * args.interval - time.monotonic()))
            wall = time.monotonic() - began
            cpu = cpu_seconds(daemon.proc.pid) - cpu_before
            pulse.stdin.close()
            pulse.wait(timeout=30)
            runs = sum(node.exec_count() - runs_before[node.user] for node in sshds)
        finally:
            daemon.stop()
    print(f"# {command(f' --cycles {args.cycles} --interval {args.interval:g}')}: "
          f"{len(names)} nodes, {args.cycles} polls every {args.interval:g} s, {wall:.1f} s")
    report("served fraction", f"{totals['answered']}/{totals['asked']} "
           f"({100 * totals['answered'] / totals['asked']:.1f} %)", "100 %",
           totals["answered"] == totals["asked"])
    report("rate limit exceeded / transport failures",
           f"{totals['rate_limited']} / {totals['transport_failures']}", "0 / 0",
           totals["rate_limited"] == totals["transport_failures"] == 0)
    report("answered from the last reading (cached)", str(totals["cached"]))
    report("sensors -j runs per node per minute", f"{runs / len(names) / (wall / 60):.1f}",
           f"<= {60 / max(args.interval, 2.0):.0f}")
    report("daemon CPU share", f"{100 * cpu / wall:.2f} % of one core ({cpu:.2f} s in {wall:.1f} s)")


if __name__ == "__main__":
    main()
