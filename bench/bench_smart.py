#!/usr/bin/env python3
"""get_temperature p50 with and without disk temperatures, on a warm node.

Two daemons read the same loopback sshd node through the same forced command (the SMART
program of the key line, with the smartctl and lsblk stand-ins of tests/sshnodes.py serving
the smartctl 7.x fixtures of tests/fixtures/smart): one with `disk_temperatures: false`, one
with `true`. After warm-up (connection made, first SMART read done) their requests alternate,
so load on the machine hits both alike; the difference is what merging the cached SMART list
costs an answer (target <= 0.5 ms). Needs root (test accounts, sshd).

    .venv/bin/python bench/bench_smart.py [--requests 2000] [--min-interval 2]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import pulse_sensor_proxy as psp  # noqa: E402
from conftest import DaemonProcess, rpc  # noqa: E402
from sshnodes import NodeSet, SshLab  # noqa: E402

LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}
SMART = HERE.parent / "tests" / "fixtures" / "smart"
DISKS = {"sda": ("sata-temperature-current.out", 0), "sdb": ("ata-attribute-194.out", 64),
         "sdc": ("standby.out", 2), "sdd": ("usb-bridge.out", 1), "sde": ("sas.out", 0),
         "nvme0n1": ("nvme.out", 0)}


def output(name):
    return "".join(line for line in (SMART / name).read_text().splitlines(keepends=True)
                   if not line.startswith("#"))


def start(work, node, disk_temperatures, min_interval):
    work.mkdir()
    work.chmod(0o755)
    config = {"nodes": {"n1": {"host": node.host, "port": node.port, "user": node.user}},
              "rate_limit": LIMITS, "log_level": "warning", "disk_temperatures": disk_temperatures,
              "node_min_interval_seconds": min_interval}
    daemon = DaemonProcess(work, config).start()
    daemon.line = psp.authorized_keys_line((daemon.ssh_dir / "id_ed25519.pub").read_text(),
                                           ["127.0.0.1"], disk_temperatures=True)
    return daemon


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--min-interval", type=float, default=2.0,
                        help="node_min_interval_seconds of both daemons (0: sensors -j every time)")
    args = parser.parse_args()
    request = {"method": "get_temperature", "params": {"node": "n1"}}
    samples = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="psp-bench-") as tmp, \
            NodeSet(SshLab(), 1) as (node,):
        node.set_disks("".join(f"{name} disk\n" for name in DISKS),
                       {name: (output(f), status) for name, (f, status) in DISKS.items()})
        daemons = {flag: start(Path(tmp) / f"smart-{flag}", node, flag, args.min_interval)
                   for flag in samples}
        try:
            node.write_authorized_keys("".join(d.line + "\n" for d in daemons.values()))
            for daemon in daemons.values():
                for _ in range(5):
                    assert rpc(daemon.socket, request)["success"]
            disks = json.loads(rpc(daemons[True].socket, request)["data"]["temperature"])["smart"]
            assert len(disks) == 5, disks
            for _ in range(args.requests):
                for flag, daemon in daemons.items():
                    begin = time.perf_counter()
                    reply = rpc(daemon.socket, request)
                    samples[flag].append(time.perf_counter() - begin)
                    assert reply["success"], reply
        finally:
            for daemon in daemons.values():
                daemon.stop()
    off, on = (statistics.median(samples[flag]) * 1000 for flag in (False, True))
    print(f"command: {' '.join(sys.argv)}")
    print(f"get_temperature p50, warm node, {args.requests} requests each, alternating "
          f"(node_min_interval_seconds {args.min_interval:g}):")
    print(f"  disk_temperatures false: {off:.3f} ms")
    print(f"  disk_temperatures true:  {on:.3f} ms ({len(disks)} disks from cache)")
    print(f"  SMART part adds: {on - off:+.3f} ms (target <= 0.5 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
