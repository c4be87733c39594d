#!/usr/bin/env python3
"""Node faults: how long each takes to fail, and a healthy node's latency while faulty nodes
are polled (tests/test_faults.py asserts the rest).

Everything runs in a private network namespace (the black hole is an iptables rule there): a
daemon, one healthy node (forced command `cat` of a sensors sample, so its own cost is small)
and one node per fault, all connected before the faults are injected.

  (1) time to fail: the first three get_temperature of each faulty node (the first one on its
      open connection; the third opens the breaker), all faults at once.
  (2) the healthy node's get_temperature round trip, one connection per request as Pulse does:
      p50/p99 with the faulty nodes idle, then while each faulty node is polled by its own
      thread (a request, its answer, --interval seconds, again). The breaker cool-down is short
      by default so that nearly every poll meets the fault itself, not the breaker.

Needs root (test accounts, sshd, namespaces). Loopback inside the namespace only.

    .venv/bin/python bench/bench_faults.py [--samples 2000] [--timeout 2] [--interval 0.05]
                                           [--cooldown 0.01] [--poll FAULT]...
"""
import argparse
import collections
import concurrent.futures
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_core import DaemonProcess, command, percentile, report  # noqa: E402
from bench_ssh import LIMITS, authorize  # noqa: E402
from conftest import rpc  # noqa: E402
from sshnodes import NetNamespace, NodeSet, SshLab  # noqa: E402
from test_faults import FAULTS  # noqa: E402  (the same faults the tests inject)

import pulse_sensor_proxy as psp  # noqa: E402


def temperature(daemon, name):
    """get_temperature of the node configured for `name` (a fault's name, or "healthy")."""
    return rpc(daemon.socket, {"method": "get_temperature", "params": {"node": node_name(name)}})


def node_name(name):
    return name.replace(" ", "-")


def timed(daemon, name):
    began = time.perf_counter()
    reply = temperature(daemon, name)
    return time.perf_counter() - began, reply


def healthy_latencies(daemon, samples):
    times = []
    for _ in range(samples):
        took, reply = timed(daemon, "healthy")
        if not reply["success"]:
            raise SystemExit(f"the healthy node failed: {reply}")
        times.append(took)
    return times


def time_to_fail(daemon, names):
    def first_failures(name):
        runs = [timed(daemon, name) for _ in range(psp.BREAKER_THRESHOLD)]
        if any(reply["success"] for _, reply in runs):
            raise SystemExit(f"{name} did not fail: {runs}")
        return [(took, reply["error"]) for took, reply in runs]

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(first_failures, names)))


def poll_until(daemon, name, stop, interval, outcomes):
    while not stop.is_set():
        reply = temperature(daemon, name)
        outcomes[name]["ok" if reply["success"] else reply["error"].split(":")[0]] += 1
        stop.wait(interval)


def start_daemon(work, nodes, args):
    config = {"nodes": {node_name(name): {"host": n.host, "port": n.port, "user": n.user}
                        for name, n in zip(["healthy", *FAULTS], nodes)},
              "rate_limit": LIMITS, "log_level": "warning", "breaker_cooldown_seconds": args.cooldown,
              "ssh": {"connect_timeout": args.timeout, "command_timeout": args.timeout}}
    work.mkdir()
    work.chmod(0o755)
    daemon = DaemonProcess(work, config).start()
    public = (daemon.ssh_dir / "id_ed25519.pub").read_text()
    authorize(nodes[0], public)
    for node in nodes[1:]:
        node.authorize(public)
    return daemon


def run(ns, args, work):
    lab = SshLab()
    with NodeSet(lab, 1 + len(FAULTS)) as nodes:
        daemon = start_daemon(work / "daemon", nodes, args)
        try:
            for name in ["healthy", *FAULTS]:
                for _ in range(5):                      # connected, host key pinned, warm
                    assert temperature(daemon, name)["success"], name
            idle = healthy_latencies(daemon, args.samples)
            for fault, node in zip(FAULTS.values(), nodes[1:]):
                fault.inject(node, ns)
            failures = time_to_fail(daemon, list(FAULTS))
            stop, outcomes = threading.Event(), {name: collections.Counter() for name in args.poll}
            pollers = [threading.Thread(target=poll_until, args=(daemon, name, stop, args.interval, outcomes))
                       for name in args.poll]
            for poller in pollers:
                poller.start()
            try:
                time.sleep(args.timeout)                # every poller's first request under way
                during = healthy_latencies(daemon, args.samples)
            finally:
                stop.set()
                for poller in pollers:
                    poller.join()
        finally:
            daemon.stop()
    return idle, failures, during, outcomes


def ms(seconds):
    return f"{seconds * 1000:.2f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=2.0, help="connect and command timeout")
    parser.add_argument("--interval", type=float, default=0.05, help="pause between a faulty node's polls")
    parser.add_argument("--cooldown", type=float, default=0.01, help="breaker_cooldown_seconds")
    parser.add_argument("--poll", action="append", choices=list(FAULTS), metavar="FAULT",
                        help="poll only this faulty node (repeatable; default: all of " +
                        ", ".join(FAULTS) + ")")
    args = parser.parse_args()
    args.poll = args.poll or list(FAULTS)
    with tempfile.TemporaryDirectory(prefix="psp-bench-") as tmp, NetNamespace() as ns:
        Path(tmp).chmod(0o755)
        idle, failures, during, outcomes = ns.run(run, ns, args, Path(tmp))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; connect/command timeout "
          f"{args.timeout:g} s, breaker cool-down {args.cooldown:g} s, polls every {args.interval:g} s")
    for name, runs in failures.items():
        report(f"time to fail: {name}", ", ".join(ms(took) for took, _ in runs))
        report("", f"({runs[0][1]} / {runs[-1][1]})")
    report("healthy p50 / p99, faulty nodes idle",
           f"{ms(percentile(idle, 0.5))} / {ms(percentile(idle, 0.99))}")
    p99_ratio = percentile(during, 0.99) / percentile(idle, 0.99)
    report("healthy p50 / p99, faulty nodes polled",
           f"{ms(percentile(during, 0.5))} / {ms(percentile(during, 0.99))} ({p99_ratio:.2f}x idle p99)")
    for name, counts in outcomes.items():
        report(f"polls meanwhile: {name}", ", ".join(f"{n} {what}" for what, n in counts.most_common()))
    options = (f" --samples {args.samples} --timeout {args.timeout:g} --interval {args.interval:g}"
               f" --cooldown {args.cooldown:g}")
    if len(args.poll) < len(FAULTS):
        options += "".join(f" --poll '{name}'" for name in args.poll)
    print(f"  command: {command(options)}")


if __name__ == "__main__":
    main()
