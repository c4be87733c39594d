#!/usr/bin/env python3
"""Timing figures of the hostile-input campaign (tests/test_campaign.py asserts the rest).

Flood: one peer (one pid) sends 10,000 get_status requests as fast as it can over 8 (or
--connections) keep-alive connections (or, with --new-connections, from as many threads with
a new connection per request) while another peer measures its own get_status round trips, one connection per request as Pulse does; the same measurement without the flood is
the idle reference. Target: p99 during the flood <= 2x the idle p99.

Both peers get the same limits, the shipped defaults unless --burst/--per-minute say
otherwise, so the measuring peer takes its samples from a new pid (a new bucket) every
`burst` requests; forking and each new process's first round trip (cold caches) are not
timed. A large --burst measures something else: a peer served at full speed within its
limits, which the daemon shares fairly with the other.

With --pipelined-invalid the flooder is a read-only uid (4401) pipelining `{"method":"x"}` on
ONE keep-alive connection as fast as the socket takes them: refusals cost tokens too.

    python bench/bench_campaign.py [--flood 10000] [--connections 8] [--new-connections]
                                   [--pipelined-invalid] [--samples 2000] [--burst N]
                                   [--per-minute N]
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
from bench_core import PYTHON, DaemonProcess, command, one_shot, percentile, report, rss_kib  # noqa: E402
from pulse_sensor_proxy import DEFAULT_CONFIG  # noqa: E402

DEFAULT_LIMITS = DEFAULT_CONFIG["rate_limit"]

HOSTILE = Path(__file__).resolve().parents[1] / "tests" / "hostile_peer.py"
READ_ONLY_UID = 4401


def _measure(path, samples, out):
    """Round trips of one pid (its own limiter bucket) after one untimed, sent through `out`."""
    one_shot(path)
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        one_shot(path)
        times.append(time.perf_counter() - began)
    out.put(times)


def measure_in_new_pids(path, samples, per_pid):
    """(round trips, pids): `samples` round trips, `per_pid` - 1 timed from each new process."""
    times, pids = [], set()
    while len(times) < samples:
        out = multiprocessing.Queue()
        proc = multiprocessing.Process(target=_measure,
                                       args=(path, min(per_pid - 1, samples - len(times)), out))
        proc.start()
        times += out.get(timeout=300)
        proc.join(timeout=30)
        pids.add(proc.pid)
    return times, pids


def daemon_side(log_path, pids):
    """The daemon's own handling time (audit latency_ms) of these pids' requests, in seconds:
    from the request line read to the answer, so it leaves out the wait to be accepted."""
    times = []
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        if record.get("pid") in pids and "latency_ms" in record:
            times.append(record["latency_ms"] / 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8,
                        help="the flooder's connections (threads) at a time")
    parser.add_argument("--new-connections", action="store_true",
                        help="the flooder opens a new connection for every request")
    parser.add_argument("--pipelined-invalid", action="store_true",
                        help="the flooder pipelines invalid lines on one connection, as a read-only uid")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=DEFAULT_LIMITS["burst"])
    parser.add_argument("--per-minute", type=float, default=DEFAULT_LIMITS["per_minute"])
    args = parser.parse_args()
    if args.burst < 2:
        parser.error("--burst must be at least 2: each measuring pid spends one untimed request")
    limits = dict(DEFAULT_LIMITS, burst=args.burst, per_minute=args.per_minute)
    base = Path(tempfile.mkdtemp(prefix="psp-bench-"))
    base.chmod(0o755)
    daemon = DaemonProcess(base, {"rate_limit": limits, "allowed_peers": [{"uid": READ_ONLY_UID}]})
    daemon.start()
    path = str(daemon.socket)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; rate_limit {limits}")
    try:
        for _ in range(3):          # warm up the daemon and the page cache
            measure_in_new_pids(path, 200, args.burst)
        idle, idle_pids = measure_in_new_pids(path, args.samples, args.burst)
        rss_before = rss_kib(daemon.proc.pid)
        began = time.perf_counter()
        if args.pipelined_invalid:
            argv = ["setpriv", "--reuid", str(READ_ONLY_UID), "--regid", str(READ_ONLY_UID),
                    "--clear-groups", PYTHON, str(HOSTILE), "pipeline", path, str(args.flood), "1"]
        else:
            argv = [PYTHON, str(HOSTILE), "flood-connect" if args.new_connections else "flood",
                    path, str(args.flood), str(args.connections)]
        flood = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert flood.stdout.readline() == "flooding\n"
        during, during_pids = measure_in_new_pids(path, args.samples, args.burst)
        still_flooding = flood.poll() is None
        counts = json.loads(flood.communicate(timeout=300)[0])
        elapsed = time.perf_counter() - began
        rss_after = rss_kib(daemon.proc.pid)
    finally:
        daemon.stop()
    idle_p99, flood_p99 = percentile(idle, 0.99) * 1000, percentile(during, 0.99) * 1000
    inside_idle, inside_flood = (daemon_side(daemon.log_path, pids)
                                 for pids in (idle_pids, during_pids))
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
    report("flood duration", f"{elapsed:.2f} s ({args.flood / elapsed:,.0f} req/s answered)")
    report("daemon RSS before -> after the flood", f"{rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB")
    limit_flags = "" if limits == DEFAULT_LIMITS else \
        f" --burst {args.burst} --per-minute {args.per_minute:g}"
    new = " --new-connections" if args.new_connections else \
        " --pipelined-invalid" if args.pipelined_invalid else ""
    print(f"  command: {command(f' --flood {args.flood} --connections {args.connections}')}"
          f"{new} --samples {args.samples}{limit_flags}")


if __name__ == "__main__":
    main()
