#!/usr/bin/env python3
"""Timing figures of the hostile-input campaign (tests/test_campaign.py asserts the rest).

Flood: one peer (one pid) sends 10,000 get_status requests as fast as it can over 8
keep-alive connections while another peer (another pid) measures its own get_status round
trips, one connection per request as Pulse does; the same measurement without the flood is
the idle reference. Target: p99 during the flood <= 2x the idle p99.

    python bench/bench_campaign.py [--flood 10000] [--samples 500]
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import PYTHON, Daemon, command, one_shot, percentile, report, rss_kib  # noqa: E402

HOSTILE = Path(__file__).resolve().parents[1] / "tests" / "hostile_peer.py"


def _measure(path, samples, out):
    """Round trips of one pid (its own limiter bucket), sent back through `out`."""
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        one_shot(path)
        times.append(time.perf_counter() - began)
    out.put(times)


def measure_in_new_pid(path, samples):
    """(round trips, pid) of a fresh process's samples."""
    out = multiprocessing.Queue()
    proc = multiprocessing.Process(target=_measure, args=(path, samples, out))
    proc.start()
    times = out.get(timeout=300)
    proc.join(timeout=30)
    return times, proc.pid


def daemon_side(log_path, pid):
    """The daemon's own handling time (audit latency_ms) of one pid's requests, in seconds:
    tells time spent in the daemon from time the client waited for a CPU."""
    times = []
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        if record.get("pid") == pid and "latency_ms" in record:
            times.append(record["latency_ms"] / 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    # The measuring peer's own bucket must hold its samples; the flooder's holds the same.
    limits = {"per_minute": 1200, "burst": args.samples + 200, "max_concurrent": 10}
    base = Path(tempfile.mkdtemp(prefix="psp-bench-"))
    base.chmod(0o755)
    daemon = Daemon(base, {"rate_limit": limits})
    daemon.start()
    path = str(daemon.socket)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; rate_limit {limits}")
    try:
        for _ in range(3):          # warm up the daemon and the page cache
            measure_in_new_pid(path, 200)
        idle, idle_pid = measure_in_new_pid(path, args.samples)
        rss_before = rss_kib(daemon.proc.pid)
        began = time.perf_counter()
        flood = subprocess.Popen([PYTHON, str(HOSTILE), "flood", path, str(args.flood), "8"],
                                 stdout=subprocess.PIPE, text=True)
        assert flood.stdout.readline() == "flooding\n"
        during, during_pid = measure_in_new_pid(path, args.samples)
        still_flooding = flood.poll() is None
        counts = json.loads(flood.communicate(timeout=300)[0])
        elapsed = time.perf_counter() - began
        rss_after = rss_kib(daemon.proc.pid)
    finally:
        daemon.stop()
    idle_p99, flood_p99 = percentile(idle, 0.99) * 1000, percentile(during, 0.99) * 1000
    inside_idle, inside_flood = (daemon_side(daemon.log_path, pid) for pid in (idle_pid, during_pid))
    report("other peer get_status p50 idle", f"{percentile(idle, 0.5) * 1000:.3f} ms")
    report("other peer get_status p99 idle", f"{idle_p99:.3f} ms")
    report("other peer get_status p50 during the flood", f"{percentile(during, 0.5) * 1000:.3f} ms")
    report("other peer get_status p99 during the flood", f"{flood_p99:.3f} ms "
           f"({flood_p99 / idle_p99:.2f}x idle)", "<= 2x idle", flood_p99 <= 2 * idle_p99)
    report("  of which inside the daemon, p99 idle / flood",
           f"{percentile(inside_idle, 0.99) * 1000:.3f} / {percentile(inside_flood, 0.99) * 1000:.3f} ms")
    report("measured entirely during the flood", "yes" if still_flooding else
           "NO (the flood ended first: raise --flood)")
    report(f"flood of {args.flood}: answers", json.dumps(counts))
    report("flood duration", f"{elapsed:.2f} s ({args.flood / elapsed:,.0f} req/s offered)")
    report("daemon RSS before -> after the flood", f"{rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB")
    print(f"  command: {command(f' --flood {args.flood} --samples {args.samples}')}")


if __name__ == "__main__":
    main()
