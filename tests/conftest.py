"""Shared fixtures: a real daemon process, real Unix sockets, real peers under other uids."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest_plugins = ["sshfixtures"]

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "pulse_sensor_proxy.py"
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pulse_sensor_proxy as psp  # noqa: E402  (the imports below need the paths above)
import gojson  # noqa: E402
from pulse_client import exchange  # noqa: E402
from sshnodes import free_port, make_keypair  # noqa: E402

CID = "5f0c2a8e-3b1d-4c6e-9a7f-1e2d3c4b5a69"    # a correlation id as Pulse sends one (a UUID4)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="run the campaign suites at their full counts (same as PSP_LONG=1)")


@pytest.fixture
def scale(request):
    """scale(quick, full): the count for this run."""
    full = request.config.getoption("--long") or os.environ.get("PSP_LONG") == "1"
    return lambda quick, long: long if full else quick


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate, timeout=15.0, what="condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def base_dir():
    """A temp dir every uid may traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="psp-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def send_raw(sock_path, payload, timeout=20.0, shutdown=False):
    """Write bytes to the socket and read until the daemon closes (or a line for one request)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(payload)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


def rpc(sock_path, request, uid=None, gid=None):
    """One request the way Pulse sends it: one line, one line back; as `uid` when given."""
    line = request if isinstance(request, str) else json.dumps(request)
    if uid is None:
        return exchange(sock_path, line, timeout=20)
    # As another uid, through the operators' own client (`call` needs only the standard
    # library, so the system python3 runs it for any uid).
    params = dict(request.get("params") or {})
    args = [request["method"]] + [f"--param={key}:={json.dumps(value)}" for key, value in params.items()]
    out = subprocess.run(as_uid(uid, gid) + ["/usr/bin/python3", "-I", str(MODULE), "call", *args,
                                             "--socket", str(sock_path), "--raw"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout, f"call printed nothing: {out.stderr}"
    return gojson.check_reply(out.stdout)


def run_cli(*args, env=None, timeout=60):
    """`pulse-sensor-proxy ARGS` as a process; never tied to a systemd of the caller's."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("NOTIFY_SOCKET", None)
    return subprocess.run([PYTHON, str(MODULE), *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def as_uid(uid, gid=None, groups=()):
    gid = uid if gid is None else gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


class DaemonProcess:
    """`pulse-sensor-proxy serve` as a real process with its own config, socket and key dir."""

    def __init__(self, base, config=None, uid=None, env=None):
        self.base = Path(base)
        self.socket = self.base / "run" / "pulse-sensor-proxy.sock"
        self.ssh_dir = self.base / "state" / "ssh"
        self.config_path = self.base / "config.yaml"
        self.log_path = self.base / "daemon.log"
        self.uid = uid
        self.groups = ()          # supplementary groups, as the unit's SupplementaryGroups=
        self.config = {"socket_path": str(self.socket), "ssh_dir": str(self.ssh_dir),
                       "metrics_address": "disabled", "allowed_source_subnets": ["127.0.0.1"],
                       "subuid_file": str(self.base / "subuid"),
                       # today's `sensors -j` path unless a test asks for disk temperatures:
                       # the stand-in nodes count every session, and SMART adds one.
                       "disk_temperatures": False}
        self.config.update(config or {})
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc = None

    def write_config(self, config=None, text=None):
        self.config_path.write_text(text if text is not None else json.dumps(config or self.config))
        self.config_path.chmod(0o644)

    def start(self, wait=True):
        self.write_config()
        (self.base / "run").mkdir(exist_ok=True)
        (self.base / "state").mkdir(exist_ok=True)
        prefix = []
        if self.uid is not None:
            for path in (self.base / "run", self.base / "state"):
                if path.stat().st_uid != self.uid:      # a read-only state dir is already
                    os.chown(path, self.uid, self.uid)
            prefix = as_uid(self.uid, groups=self.groups)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(prefix + [PYTHON, str(MODULE), "serve", "--config",
                                               str(self.config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self):
        def ready():
            assert self.proc.poll() is None, f"daemon exited:\n{self.log_text()}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(str(self.socket))
                    return True
                except OSError:
                    return False
        wait_for(ready, what="the daemon's socket")

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def log_records(self):
        records = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def wait_log(self, predicate, what):
        return wait_for(lambda: next((r for r in self.log_records() if predicate(r)), None),
                        what=what)

    def rpc(self, method, params=None, uid=None, gid=None, **extra):
        return rpc(self.socket, dict({"method": method, "params": params}, **extra), uid, gid)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None


@pytest.fixture
def daemon_factory(base_dir):
    started = []

    def make(config=None, uid=None, env=None, subdir=None, start=True):
        base = base_dir / subdir if subdir else base_dir
        base.mkdir(exist_ok=True)
        base.chmod(0o755)
        daemon = DaemonProcess(base, config, uid, env)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()


# --- a daemon and real sshd nodes --------------------------------------------------------------

FAST_LIMITS = {"per_minute": 1000000, "burst": 100000, "max_concurrent": 100}
# Tests that count a node's `sensors -j` runs ask again at once and expect a new run.
EVERY_TIME = {"node_min_interval_seconds": 0}


@pytest.fixture
def cluster(daemon_factory, ssh_nodes):
    """`cluster(3)`: that many sshd nodes (n1, n2, ...) and a daemon that knows them, with the
    daemon's key installed on each (restricted as in production) unless authorize=False."""

    def make(count=3, authorize=True, ssh=None, **config):
        nodes = ssh_nodes(count)
        settings = {"nodes": {f"n{i + 1}": {"host": node.host, "port": node.port, "user": node.user}
                              for i, node in enumerate(nodes)},
                    "rate_limit": FAST_LIMITS, "metrics_address": f"127.0.0.1:{free_port()}",
                    "ssh": dict({"connect_timeout": 3, "command_timeout": 4}, **(ssh or {})),
                    **EVERY_TIME}
        settings.update(config)
        daemon = daemon_factory(settings)
        daemon.public_key = (daemon.ssh_dir / "id_ed25519.pub").read_text().strip()
        if authorize:
            for node in nodes:
                node.authorize(daemon.public_key)
        return daemon, nodes

    return make


def on_node(name, error):
    """A per-node error as the wire carries it: the node's name first (see node_error_text)."""
    return f'node "{name}": {error}'


def temperature(daemon, node, **extra):
    return daemon.rpc("get_temperature", dict({"node": node}, **extra))


def metrics_text(daemon):
    """GET /metrics of a daemon whose config has a metrics_address."""
    url = f"http://{daemon.config['metrics_address']}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def metric_samples(daemon, text=None):
    """{(name, ((label, value), ...)): value} of a scrape (or of `text`, one already taken);
    an unlabelled metric is (name, ())."""
    text = metrics_text(daemon) if text is None else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


SERVICE_UID = 4300
# Peers of the tests' configs run under these uids, far from the node accounts of sshnodes.py
# (uids from 1001 up), which kills whatever runs as an account it hands out again.
READER_UID, CLEANER_UID, STRANGER_UID = 4401, 4402, 4403   # read-only; cleanup; no capability


class Lab:
    """Nodes with an admin key, a daemon running as a service uid, and the key CLI."""

    def __init__(self, daemon, nodes, admin):
        self.daemon, self.nodes, self.admin = daemon, nodes, admin
        self.state = daemon.base / "state"

    def cli(self, *args, uid=None, env=None):
        return subprocess.run((as_uid(uid) if uid is not None else []) +
                              [PYTHON, str(MODULE), *args, "--config", str(self.daemon.config_path)],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, **(env or {})))

    def push(self, *extra):
        out = self.cli("keys", "push", *extra)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def current_public(self):
        return (self.daemon.ssh_dir / "id_ed25519.pub").read_text().strip()

    def temperatures(self):
        return [self.daemon.rpc("get_temperature", {"node": f"n{i + 1}"})
                for i in range(len(self.nodes))]

    def all_temperatures_work(self):
        replies = self.temperatures()
        assert all(r["success"] for r in replies), replies
        return True

    def keys_on(self, node):
        text = node.authorized_keys_path.read_text() if node.authorized_keys_path.exists() else ""
        return [psp.parse_authorized_key(line)[2] for line in text.splitlines()
                if psp.parse_authorized_key(line)]

    def admin_line(self):
        return self.admin.public_line + "\n"


@pytest.fixture
def lab(daemon_factory, ssh_nodes, base_dir):
    """`lab(3)`: nodes whose account accepts an admin key (root's, as on Proxmox), a daemon
    running as SERVICE_UID, and the daemon's key pushed with `keys push` unless push=False."""

    def make(count=3, push=True, **settings):
        nodes = ssh_nodes(count)
        admin = make_keypair(base_dir / "admin", comment="root@pve")
        for node in nodes:
            node.write_authorized_keys(admin.public_line + "\n")
        config = {"nodes": {f"n{i + 1}": {"host": n.host, "port": n.port, "user": n.user}
                            for i, n in enumerate(nodes)},
                  "admin_identity": [str(admin.private_path)], "rate_limit": FAST_LIMITS,
                  "ssh": {"connect_timeout": 5, "command_timeout": 5}, **EVERY_TIME, **settings}
        daemon = daemon_factory(config, uid=SERVICE_UID)
        result = Lab(daemon, nodes, admin)
        if push:
            result.push()
        return result

    return make


# --- the pyz -----------------------------------------------------------------------------------

BUILD = ROOT / "build_zipapp.sh"
ARCHES = ("x86_64", "aarch64")


def build_pyz(out_dir, *args):
    """Run build_zipapp.sh with this test run's Python (it has shiv); return the process."""
    return subprocess.run([str(BUILD), "--python", PYTHON, "--out", str(out_dir), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def pyz_dir():
    """Both architectures' pyz, built once per test session, in a directory every uid can reach."""
    out = Path(tempfile.mkdtemp(prefix="psp-pyz-"))
    out.chmod(0o755)
    result = build_pyz(out)
    assert result.returncode == 0, result.stderr
    yield out
    shutil.rmtree(out)


@pytest.fixture(scope="session")
def pyz(pyz_dir):
    """The pyz for this machine's architecture."""
    return pyz_dir / f"pulse-sensor-proxy-{os.uname().machine}.pyz"
