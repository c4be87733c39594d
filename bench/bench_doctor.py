#!/usr/bin/env python3
"""`doctor` wall time on a 32-node cluster with one black-holed node.

Real sshd nodes on loopback (tests/sshnodes.py) and a real daemon, all inside a private network
namespace, where iptables drops every packet to and from one node's port (a node that vanished
from the network: no refusal, no answer). The host keys are pinned and the daemon's key is
installed on every node first, so the dead node is the only FAIL. Needs root (accounts, sshd,
iptables in the namespace).

    .venv/bin/python bench/bench_doctor.py [--nodes 32] [--runs 3]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import MODULE, PYTHON, DaemonProcess  # noqa: E402
from sshnodes import NetNamespace, NodeSet, SshLab  # noqa: E402

LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}


def doctor_run(config_path):
    """(seconds, exit status, findings) of one `doctor --json`."""
    start = time.perf_counter()
    out = subprocess.run([PYTHON, str(MODULE), "doctor", "--json", "--config", str(config_path)],
                         capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    return seconds, out.returncode, [json.loads(line) for line in out.stdout.splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with NetNamespace() as netns, tempfile.TemporaryDirectory(prefix="bench-doctor-") as work:
        node_set = NodeSet(SshLab(), args.nodes)
        nodes = netns.run(node_set.start)
        try:
            Path(work).chmod(0o755)
            config = {"nodes": {f"n{i + 1}": {"host": n.host, "port": n.port, "user": n.user}
                                for i, n in enumerate(nodes)},
                      "rate_limit": LIMITS, "ssh": {"connect_timeout": 5, "command_timeout": 10}}
            daemon = netns.run(DaemonProcess(work, config).start)
            try:
                public = (daemon.ssh_dir / "id_ed25519.pub").read_text().strip()
                for node in nodes:
                    node.authorize(public)
                for name in config["nodes"]:      # pins every host key (trust on first use)
                    reply = daemon.rpc("get_temperature", {"node": name})
                    assert reply["success"], reply
                dead = nodes[len(nodes) // 2]
                netns.black_hole(dead.port)
                times = []
                for _ in range(args.runs):
                    seconds, status, findings = netns.run(doctor_run, daemon.config_path)
                    failed = [(f["check"], f["target"]) for f in findings if f["status"] == "FAIL"]
                    assert status == 1 and failed == [("reach", f"n{len(nodes) // 2 + 1}")], failed
                    times.append(seconds)
                print(f"doctor, {len(nodes)} nodes, 1 black-holed (connect_timeout 5 s), "
                      f"{args.runs} runs: wall median {statistics.median(times):.2f} s, "
                      f"max {max(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)}), "
                      f"{len(findings)} checks each")
            finally:
                daemon.stop()
        finally:
            node_set.close()

if __name__ == "__main__":
    main()
