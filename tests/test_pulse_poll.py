"""Pulse's poll loop against the default limits: one Pulse process, 64 nodes, every 5 s.

The daemon runs in this process (psp.Daemon on a real socket) on a clock the test moves, so
"every 5 s" takes no wall-clock time; the nodes are real sshd (8 of them, each serving 8 node
names); Pulse is pulse_client.py, one process under a container root's uid, retrying as its
client does.
"""
import asyncio
import concurrent.futures
import json
import os
import subprocess
import threading

import pytest

import pulse_sensor_proxy as psp
from conftest import ROOT, as_uid, rpc

NAMES_PER_SSHD = 8
SSHDS = 8
POLL_INTERVAL = 5.0                 # Pulse's PVE_POLLING_INTERVAL as users set it
CONTAINER_ROOT = 100000
CLIENT = ROOT / "tests" / "pulse_client.py"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class InProcessDaemon:
    """psp.Daemon serving a real Unix socket from an event loop thread of this process."""

    def __init__(self, config_path, clock, log_path):
        self.config = psp.load_config(str(config_path), environ={})
        self.log_stream = open(log_path, "a")
        log = psp.AuditLog("warning", stream=self.log_stream)
        psp.KeyStore(self.config["ssh_dir"]).ensure_current(log)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            self.daemon = psp.Daemon(self.config, log, clock=clock)
            self.server = await psp.start_socket_server(self.daemon, self.config["socket_path"])
            os.chmod(self.config["socket_path"], psp.SOCKET_MODE)

        self.run(start())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def ssh_runs(self, name):
        return self.daemon.metrics.values["pulse_proxy_ssh_requests_total"].get(
            (name, "success"), 0)

    def close(self):
        async def stop():
            self.server.close()
            await self.daemon.pool.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.log_stream.close()


@pytest.fixture
def poll_lab(ssh_nodes, base_dir):
    """`poll_lab()` with the default limits, or `poll_lab(rate_limit={...})`."""
    made = []

    def make(**settings):
        made.append(start_poll_lab(ssh_nodes, base_dir, settings))
        return made[-1]

    yield make
    for daemon, _, pulse, _, _ in made:
        pulse.stdin.close()
        pulse.wait(timeout=30)
        daemon.close()


def start_poll_lab(ssh_nodes, base_dir, settings):
    sshds = ssh_nodes(SSHDS)
    names = {f"pve{i + 1:02d}": sshds[i % SSHDS] for i in range(SSHDS * NAMES_PER_SSHD)}
    (base_dir / "run").mkdir()
    (base_dir / "subuid").write_text(f"root:{CONTAINER_ROOT}:65536\n")
    config = {"socket_path": str(base_dir / "run" / "pulse-sensor-proxy.sock"),
              "ssh_dir": str(base_dir / "state" / "ssh"), "metrics_address": "disabled",
              "allowed_source_subnets": ["127.0.0.1"], "subuid_file": str(base_dir / "subuid"),
              "disk_temperatures": False,     # counts sensors runs: no SMART sessions
              "nodes": {name: {"host": node.host, "port": node.port, "user": node.user}
                        for name, node in names.items()}, **settings}
    (base_dir / "config.yaml").write_text(json.dumps(config))
    clock = Clock()
    daemon = InProcessDaemon(base_dir / "config.yaml", clock, base_dir / "daemon.log")
    public_key = (base_dir / "state" / "ssh" / "id_ed25519.pub").read_text().strip()
    for node in sshds:
        node.authorize(public_key)
    pulse = subprocess.Popen(as_uid(CONTAINER_ROOT) + ["/usr/bin/python3", "-E", "-s", str(CLIENT),
                                                       config["socket_path"]],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return daemon, clock, pulse, names, sshds


def poll(pulse, names):
    pulse.stdin.write(json.dumps(sorted(names)) + "\n")
    pulse.stdin.flush()
    return json.loads(pulse.stdout.readline())


def test_one_pulse_polling_64_nodes_every_5_s_is_answered_in_full(poll_lab):
    daemon, clock, pulse, names, sshds = poll_lab()
    interval = psp.DEFAULT_CONFIG["node_min_interval_seconds"]
    assert POLL_INTERVAL > interval, "each poll is due a fresh reading"
    cycles = 4
    for cycle in range(1, cycles + 1):
        clock.now += POLL_INTERVAL
        summary = poll(pulse, names)
        print(f"cycle {cycle}: {summary}")
        assert summary["answered"] == len(names), summary
        assert (summary["rate_limited"], summary["transport_failures"], summary["errors"]) == \
            (0, 0, []), summary
        assert summary["attempts"] == len(names), "nothing needed a retry"
        assert summary["cached"] == 0 and not summary["disabled"]
        assert all(daemon.ssh_runs(name) == cycle for name in names), "one run per node per poll"
    assert [node.exec_count() for node in sshds] == [cycles * NAMES_PER_SSHD] * SSHDS

    # Within the per-node interval, however often anyone asks, the last reading answers.
    clock.now += interval / 2
    again = poll(pulse, names)
    assert (again["answered"], again["cached"], again["rate_limited"]) == (len(names), len(names), 0)
    assert [node.exec_count() for node in sshds] == [cycles * NAMES_PER_SSHD] * SSHDS
    assert all(daemon.ssh_runs(name) == cycles for name in names)
    # Another peer asking as fast as it can changes nothing on the nodes either.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda name: rpc(daemon.config["socket_path"], {
            "method": "get_temperature", "params": {"node": name}}), sorted(names) * 3))
    assert all(r["success"] and r["data"]["cached"] for r in replies)
    assert [node.exec_count() for node in sshds] == [cycles * NAMES_PER_SSHD] * SSHDS


def test_the_limits_of_before_switched_pulse_off(poll_lab):
    """The test above can fail: under the fixed 20 a minute, burst 10 of before, it does."""
    daemon, clock, pulse, names, _ = poll_lab(rate_limit={
        "per_minute": 20, "burst": 10, "per_node_per_minute": 0, "per_node_burst": 0})
    clock.now += POLL_INTERVAL
    summary = poll(pulse, names)
    assert summary["answered"] < len(names) and summary["rate_limited"] > 0
    assert summary["disabled"], "three rate-limit refusals switch Pulse's proxy use off"
