"""A host the original proxy's installer (Pulse v5.0.17) set up, taken over by the real
installer under a booted systemd (Debian 12 in systemd-nspawn standing in for host pve1 of a
3-node cluster; see guest.py).

Before the boot the guest gets what the original leaves, from tests/fixtures/original (each
file citing the lines of the original's installer that write it): its account and
directories, its units as its installer writes them (service, self-heal timer and clean-up
path enabled), its binary (a stand-in serving the socket as the original does, one JSON line
per connection), its helpers and installer copy, its key, its config in its vocabulary with
allowed_nodes.yaml, its key line on every node beside foreign lines, and container 105 with
its mount line (no `optional`), /etc/pulse/.env and Pulse's drop-in. After the boot its
self-heal timer fires every second (a drop-in under /run: the real one waits 5 minutes; the
stand-in logs every run), and a poller in the container reads /mnt/pulse-proxy/... as Pulse
does, throughout.

The tests run in file order against one guest: dry run, take-over, checks, second run, going back.
"""
import json
import os
import shutil
import subprocess

import pytest

import pulse_sensor_proxy as psp
from conftest import wait_for
from guest import (ADDRESS, GUEST_INSTALLER, GUEST_PYZ, LOCAL_NODE, NODE_ADDRESSES, REPO,
                   ROOT_KEY_FILES, booted_guest)

ORIGINAL = REPO / "tests/fixtures/original"
ACCOUNT = "pulse-sensor-proxy"
CTID = 105
CT_ROOT_UID = 100000
INSTALL = f"bash {GUEST_INSTALLER} --pyz {GUEST_PYZ} --ctid {CTID}"
KEY = "/var/lib/pulse-sensor-proxy/ssh/id_ed25519"
CONFIG = "/etc/pulse-sensor-proxy/config.yaml"
SOCKET = "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
CT_SOCKET = "/mnt/pulse-proxy/pulse-sensor-proxy.sock"
CT_CONF_PATH = f"/etc/pve/lxc/{CTID}.conf"
SELFHEAL_LOG = "/var/log/pulse-selfheal-standin.log"
POLLER_LOG = "/root/poller.log"
# Not under /usr: pct exec binds the host's /usr over the container's.
CLIENT_DIR = "/opt/pulse-test"
BACKUPS = "/var/backups/pulse-sensor-proxy"

ORIGINAL_UNITS = ("pulse-sensor-proxy.service", "pulse-sensor-proxy-selfheal.service",
                  "pulse-sensor-proxy-selfheal.timer", "pulse-sensor-cleanup.path",
                  "pulse-sensor-cleanup.service")
# guest path -> fixture (install-sensor-proxy.sh v5.0.17 lines 754-761: INSTALL_ROOT and the
# files under it; temp-wrapper.sh, the forced command of older releases, beside them).
ORIGINAL_FILES = {
    "/opt/pulse/sensor-proxy/bin/pulse-sensor-proxy": "bin/pulse-sensor-proxy",
    "/opt/pulse/sensor-proxy/bin/pulse-sensor-wrapper.sh": "bin/pulse-sensor-wrapper.sh",
    "/opt/pulse/sensor-proxy/bin/pulse-sensor-cleanup.sh": "bin/pulse-sensor-cleanup.sh",
    "/opt/pulse/sensor-proxy/bin/pulse-sensor-proxy-selfheal.sh": "bin/pulse-sensor-proxy-selfheal.sh",
    "/opt/pulse/sensor-proxy/install-sensor-proxy.sh": "bin/install-sensor-proxy.sh",
    "/usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh": "bin/pulse-sensor-wrapper.sh",
    **{f"/etc/systemd/system/{unit}": f"units/{unit}" for unit in ORIGINAL_UNITS},
}
# Its base config (lines 1849-1863), then what its installer appends: this host's subnet
# (lines 229-231), the allow-list file reference and the control-plane block (lines 1792-1797).
ORIGINAL_CONFIG = f"""# Pulse Temperature Proxy Configuration
allowed_peer_uids: [1000]

# Allow ID-mapped root (LXC containers with sub-UID mapping)
allow_idmapped_root: true
allowed_idmap_users:
  - root

metrics_address: "127.0.0.1:9127"

rate_limit:
  per_peer_interval_ms: 333
  per_peer_burst: 10
allowed_source_subnets:
    - {ADDRESS}/32
allowed_nodes_file: "/etc/pulse-sensor-proxy/allowed_nodes.yaml"

# Pulse control plane configuration (auto-generated)
pulse_control_plane:
  url: "http://10.99.0.50:7655"
  token_file: "/etc/pulse-sensor-proxy/.pulse-control-token"
  refresh_interval: 60
"""
ALLOWED_NODES = "allowed_nodes:\n  - pve1\n  - pve2\n  - pve3\n"
# The original's key line on the nodes: its forced command and options (lines 3044-3045, with
# the marker `# pulse-managed-key`), an older release's wrapper, a plain `sensors -j`.
ORIGINAL_OPTIONS = "no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty"
ORIGINAL_LINE = {
    "pve1": 'command="/opt/pulse/sensor-proxy/bin/pulse-sensor-wrapper.sh",' + ORIGINAL_OPTIONS + " {key} # pulse-managed-key",
    "pve2": 'command="/usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh",' + ORIGINAL_OPTIONS + " {key} # pulse-proxy-key",
    "pve3": 'command="sensors -j",' + ORIGINAL_OPTIONS + " {key}",
}
# The container as the original's installer leaves it: its mount line (line 3200), the socket
# in Pulse's .env (lines 273-283, 0600) and Pulse's drop-in (lines 3364-3367).
ORIGINAL_ENTRY = "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir 0 0"
ENTRY = "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0"
CT_CONF = ("arch: amd64\nhostname: pulse\nostype: debian\nrootfs: local-lvm:vm-105-disk-0,size=8G\n"
           f"unprivileged: 1\n{ORIGINAL_ENTRY}\n")
CT_FILES = {
    "/etc/pulse/.env": f"PULSE_SENSOR_PROXY_SOCKET={CT_SOCKET}\n",
    "/etc/systemd/system/pulse.service": "[Unit]\nDescription=Pulse Monitoring Server\n\n[Service]\n"
                                         "EnvironmentFile=-/etc/pulse/.env\nExecStart=/opt/pulse/bin/pulse\n",
    "/etc/systemd/system/pulse.service.d/10-pulse-proxy.conf":
        f"[Service]\nEnvironment=PULSE_SENSOR_PROXY_SOCKET={CT_SOCKET}\n",
    f"{CLIENT_DIR}/pulse_client.py": (REPO / "tests/pulse_client.py").read_text(),
    f"{CLIENT_DIR}/gojson.py": (REPO / "tests/gojson.py").read_text(),
    f"{CLIENT_DIR}/takeover_poller.py": (REPO / "tests/system/takeover_poller.py").read_text(),
}
# The timer as the test runs it: every second instead of 2 minutes after boot and every 5.
FAST_TIMER = "[Timer]\nOnBootSec=\nOnUnitActiveSec=\nOnActiveSec=1s\nOnUnitActiveSec=1s\nAccuracySec=1ms\n"
# Every path the take-over may touch, for the dry run's before-and-after listing.
LISTED = ("/opt/pulse", "/usr/local/libexec/pulse-sensor-proxy", "/usr/local/bin", "/etc/systemd/system",
          "/etc/pulse-sensor-proxy", "/var/lib/pulse-sensor-proxy", BACKUPS, CT_CONF_PATH,
          f"/var/lib/pct-shim/{CTID}/rootfs/etc", *ROOT_KEY_FILES.values())


def prepare_original(machine):
    """The guest as the original's installer leaves a host (before the boot)."""
    machine.chroot("useradd", "--system", "--user-group", "--no-create-home", "--shell",
                   "/usr/sbin/nologin", ACCOUNT)  # line 1312
    # lines 1569-1581
    machine.chroot("install", "-d", "-o", ACCOUNT, "-g", ACCOUNT, "-m", "0750", "/var/lib/pulse-sensor-proxy")
    machine.chroot("install", "-d", "-o", ACCOUNT, "-g", ACCOUNT, "-m", "0700", "/var/lib/pulse-sensor-proxy/ssh")
    machine.chroot("install", "-d", "-o", ACCOUNT, "-g", ACCOUNT, "-m", "0755", "/etc/pulse-sensor-proxy")
    # The key its daemon made (ssh.go: ed25519, comment "pulse-sensor-proxy").
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ACCOUNT,
                    "-f", str(machine.path(KEY))], check=True)
    for path, text, mode in ((CONFIG, ORIGINAL_CONFIG, 0o644),
                             ("/etc/pulse-sensor-proxy/allowed_nodes.yaml", ALLOWED_NODES, 0o644),
                             ("/etc/pulse-sensor-proxy/ctid", f"{CTID}\n", 0o644),
                             ("/etc/pulse-sensor-proxy/.pulse-control-token", "control-token\n", 0o600)):
        machine.write(path, text, mode)
    machine.chroot("chown", "-R", f"{ACCOUNT}:{ACCOUNT}", "/var/lib/pulse-sensor-proxy", "/etc/pulse-sensor-proxy")
    for path, fixture in ORIGINAL_FILES.items():
        target = machine.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ORIGINAL / fixture, target)
        target.chmod(0o644 if "/systemd/" in path else 0o755)
    # The original reaches the nodes by the names in allowed_nodes.yaml (ssh root@NAME), so on
    # a host it serves they resolve; here through /etc/hosts, as Proxmox's docs set it up.
    with open(machine.path("/etc/hosts"), "a") as hosts:
        hosts.write("".join(f"{address} {name}\n" for name, address in NODE_ADDRESSES.items() if name != LOCAL_NODE))
    # What pmxcfs provides on Proxmox, named in the original's unit's ReadOnlyPaths=.
    machine.write("/etc/tmpfiles.d/pve-cluster-standin.conf", "d /run/pve-cluster 0755 root root -\n")
    machine.chroot("systemctl", "enable", "pulse-sensor-proxy.service", "pulse-sensor-proxy-selfheal.timer",
                   "pulse-sensor-cleanup.path")
    public = machine.path(f"{KEY}.pub").read_text().split()
    machine.original_key = " ".join(public[:2]) + " " + ACCOUNT
    foreign = machine.path("/root/.ssh/id_ed25519.pub").read_text().split()[1]
    for node, path in ROOT_KEY_FILES.items():
        # A key of another proxy with the same comment and marker, and an admin's key.
        lines = [f'command="/opt/pulse/sensor-proxy/bin/pulse-sensor-wrapper.sh",{ORIGINAL_OPTIONS} '
                 f"ssh-ed25519 {foreign} {ACCOUNT} # pulse-managed-key",
                 ORIGINAL_LINE[node].format(key=machine.original_key),
                 f"ssh-ed25519 {foreign} admin@{node}"]
        with open(machine.path(path), "a") as keys:
            keys.write("\n".join(lines) + "\n")
    rootfs = machine.add_container(CTID, CT_CONF)
    for path, text in CT_FILES.items():
        target = rootfs / path.lstrip("/")
        missing = [parent for parent in target.parents if not parent.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        for created in (target, *missing):
            os.lchown(created, CT_ROOT_UID, CT_ROOT_UID)
    rootfs.joinpath("etc/pulse/.env").chmod(0o600)


@pytest.fixture(scope="module")
def guest():
    with booted_guest(prepare_original) as machine:
        machine.key_bytes = machine.path(KEY).read_bytes()
        machine.key_files = {node: machine.path(path).read_text() for node, path in ROOT_KEY_FILES.items()}
        # Under the booted guest's /run (a tmpfs), so written from inside.
        dropins = "/run/systemd/system/pulse-sensor-proxy-selfheal.timer.d"
        machine.run(f"mkdir -p {dropins} && cat >{dropins}/10-every-second.conf <<'EOF'\n{FAST_TIMER}EOF\n"
                    "systemctl daemon-reload && systemctl restart pulse-sensor-proxy-selfheal.timer")
        wait_for(lambda: len(selfheal_runs(machine)) >= 2, timeout=30, what="the self-heal stand-in to run")
        machine.run("systemd-run --quiet --unit=pulse-poller -p StandardOutput=file:" + POLLER_LOG +
                    f" pct exec {CTID} -- python3 {CLIENT_DIR}/takeover_poller.py {CT_SOCKET} {LOCAL_NODE}")
        wait_for(lambda: sum(call["ok"] for call in poller_calls(machine)) >= 3, timeout=30,
                 what="the poller in the container to read the original")
        yield machine


def selfheal_runs(machine):
    """When the self-heal stand-in ran (seconds since the epoch), from its log."""
    path = machine.path(SELFHEAL_LOG)
    text = path.read_text() if path.exists() else ""
    return [float(line.split()[0]) for line in text.splitlines() if line.endswith(" ran")]


def poller_calls(machine):
    path = machine.path(POLLER_LOG)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def monotonic(machine):
    return float(machine.out("python3 -c 'import time; print(time.monotonic())'"))


def listing(machine):
    """Every path the take-over may touch: path, mode, owner, size, mtime and content hash."""
    return machine.out(
        f"find {' '.join(LISTED)} -printf '%p %m %u:%g %s %T@\\n' 2>/dev/null | sort; "
        f"find {' '.join(LISTED)} -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum")


def fingerprint(machine):
    return machine.out(f"ssh-keygen -lf {KEY}.pub").split()[1]


@pytest.fixture(scope="module")
def dry_run(guest):
    before, key_fingerprint = listing(guest), fingerprint(guest)
    result = guest.run(f"{INSTALL} --dry-run")
    return before, key_fingerprint, result


def test_dry_run_prints_every_step_and_changes_nothing(guest, dry_run):
    before, _, result = dry_run
    assert listing(guest) == before
    for unit in ORIGINAL_UNITS[1:]:
        assert f"would    original proxy: {unit} stopped and disabled" in result.stdout
    for path in ORIGINAL_FILES:
        if "wrapper" not in path and not path.endswith("/pulse-sensor-proxy.service"):
            assert f"would    original proxy: {path} moved to {BACKUPS}/original-" in result.stdout, path
    assert "nothing was changed" in result.stdout
    assert guest.out("systemctl is-active pulse-sensor-proxy-selfheal.timer").strip() == "active"


@pytest.fixture(scope="module")
def takeover(guest, dry_run):
    started = monotonic(guest)
    result = guest.run(INSTALL, check=False)
    ended = monotonic(guest)
    return started, ended, result


def test_takeover_succeeds_and_says_how_to_go_back(takeover):
    _, _, result = takeover
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr, result.stderr
    for unit in ORIGINAL_UNITS[1:]:
        assert f"changed  original proxy: {unit} stopped and disabled" in result.stdout
    assert "original proxy taken over: its key kept (SHA256:" in result.stdout
    assert f"  moved to {BACKUPS}/original-" in result.stdout
    assert "  to go back: install-sensor-proxy.sh --uninstall --restore-original" in result.stdout


def test_self_heal_never_fired_after_it_was_stopped(guest, takeover):
    """Every run of the self-heal stand-in began before its service was stopped (the timer
    first: a start it had queued just before runs, and is stopped with the service), and its
    units are gone; it never found the service missing or failed."""
    stopped = max(int(json.loads(line)["__REALTIME_TIMESTAMP"]) / 1e6 for line in guest.out(
        "journalctl -o json --no-pager -u pulse-sensor-proxy-selfheal.timer "
        "-u pulse-sensor-proxy-selfheal.service").splitlines())
    runs = selfheal_runs(guest)
    assert runs and max(runs) < stopped, (max(runs), stopped)
    assert "would reinstall" not in guest.path(SELFHEAL_LOG).read_text()
    for unit in ("pulse-sensor-proxy-selfheal.timer", "pulse-sensor-proxy-selfheal.service",
                 "pulse-sensor-cleanup.path"):
        state = guest.run(f"systemctl show -p LoadState -p ActiveState {unit}").stdout
        assert "LoadState=not-found" in state and "ActiveState=inactive" in state, (unit, state)


def test_key_kept_byte_for_byte(guest, takeover, dry_run):
    _, key_fingerprint, _ = dry_run
    assert guest.path(KEY).read_bytes() == guest.key_bytes
    assert fingerprint(guest) == key_fingerprint


def test_every_node_line_upgraded_in_place_and_foreign_lines_kept(guest, takeover):
    ours = json.loads(guest.out("pulse-sensor-proxy call ensure_cluster_keys --raw"))["data"]["authorized_key"]
    assert f'from="{ADDRESS}/32",command="{psp.SMART_PROGRAM}",restrict,' in ours
    assert guest.original_key in ours
    for node, path in ROOT_KEY_FILES.items():
        old_line = ORIGINAL_LINE[node].format(key=guest.original_key)
        expected = guest.key_files[node].replace(old_line + "\n", ours + "\n")
        assert expected != guest.key_files[node]
        assert guest.path(path).read_text() == expected, node


def test_original_files_moved_to_one_backup(guest, takeover):
    backups = sorted(guest.path(BACKUPS).glob("original-*"))
    assert len(backups) == 1
    for path, fixture in ORIGINAL_FILES.items():
        assert (backups[0] / path.lstrip("/")).read_bytes() == (ORIGINAL / fixture).read_bytes(), path
        if not path.endswith("/pulse-sensor-proxy.service"):
            assert not guest.path(path).exists(), path
    assert not guest.path("/opt/pulse/sensor-proxy").exists()
    assert guest.path(f"{CONFIG}.bak").read_text() == ORIGINAL_CONFIG
    assert guest.path("/etc/pulse-sensor-proxy/allowed_nodes.yaml").read_text() == ALLOWED_NODES


def test_container_keeps_its_path_gains_optional_and_is_not_restarted(guest, takeover):
    _, _, result = takeover
    assert guest.path(CT_CONF_PATH).read_text() == CT_CONF.replace(ORIGINAL_ENTRY, ENTRY)
    assert "gains `optional` (the mount is unchanged: no restart)" in result.stdout
    log = guest.path("/var/lib/pct-shim/pct.log")
    assert f"reboot {CTID}" not in (log.read_text() if log.exists() else "")
    rootfs = guest.path(f"/var/lib/pct-shim/{CTID}/rootfs")
    assert (rootfs / "etc/pulse/.env").read_text() == CT_FILES["/etc/pulse/.env"]
    assert f"ok       container {CTID}: Pulse will use {CT_SOCKET}" in result.stdout


def test_pulse_poll_answered_across_the_switch(guest, takeover, capsys):
    """The poller saw the original answer before the run and this proxy after it; the calls
    that failed all fall in one window inside the run: the restart's."""
    started, ended, _ = takeover
    wait_for(lambda: any(call["ok"] and call["t"] > ended for call in poller_calls(guest)),
             timeout=30, what="an answer after the installer's run")
    calls = poller_calls(guest)
    answers = [call for call in calls if call["ok"]]
    before = [call for call in answers if call["t"] < started]
    after = [call for call in answers if call["t"] > ended]
    assert before and after
    assert {call["detail"] for call in before}.isdisjoint({call["detail"] for call in after}), \
        "the original's stand-in before, this proxy after"
    failed = [call for call in calls if not call["ok"]]
    assert all(started <= call["t"] <= ended for call in failed), failed
    if failed:
        first, last = failed[0]["t"], failed[-1]["t"]
        assert not [call for call in answers if first < call["t"] < last], "one window, not several"
    gap = max(later["t"] - earlier["t"] for earlier, later in zip(answers, answers[1:]))
    window = (min(call["t"] for call in answers if call["t"] > failed[-1]["t"]) - failed[0]["t"]) if failed else 0.0
    with capsys.disabled():
        print(f"\ntake-over: longest gap between answers {gap * 1000:.0f} ms (poll interval 400 ms); "
              f"{len(failed)} failed calls in {window * 1000:.0f} ms; installer run {ended - started:.1f} s")


def test_second_run_changes_nothing(guest, takeover):
    result = guest.run(INSTALL)
    assert "Nothing to change: everything was already in place." in result.stdout
    assert "original proxy" not in result.stdout.replace("ok       original proxy: nothing of it left", "")


def test_restore_original_brings_its_files_back(guest, takeover):
    guest.run("systemctl stop pulse-poller")
    runs = len(selfheal_runs(guest))
    result = guest.run(f"bash {GUEST_INSTALLER} --uninstall --restore-original")
    assert f"restoring the original proxy from {BACKUPS}/original-" in result.stdout
    for path, fixture in ORIGINAL_FILES.items():
        assert guest.path(path).read_bytes() == (ORIGINAL / fixture).read_bytes(), path
    assert guest.path(CONFIG).read_text() == ORIGINAL_CONFIG
    assert guest.path(KEY).read_bytes() == guest.key_bytes
    assert not guest.path("/usr/local/bin/pulse-sensor-proxy").exists()
    assert guest.path(CT_CONF_PATH).read_text() == CT_CONF.replace(ORIGINAL_ENTRY, ENTRY)
    for unit in ("pulse-sensor-proxy.service", "pulse-sensor-proxy-selfheal.timer", "pulse-sensor-cleanup.path"):
        assert guest.out(f"systemctl is-enabled {unit}").strip() == "enabled", unit
    wait_for(lambda: len(selfheal_runs(guest)) > runs, timeout=30, what="the original's self-heal to run again")
    ask = (f"pct exec {CTID} -- python3 -c 'import sys; sys.path.insert(0, \"{CLIENT_DIR}\"); "
           f"import pulse_client; print(pulse_client.call_once(\"{CT_SOCKET}\", \"get_status\", {{}}))'")
    wait_for(lambda: "v5.0.17 (stand-in)" in guest.run(ask, check=False).stdout, timeout=30,
             what="the original's stand-in to answer in the container again")
    assert not list(guest.path(BACKUPS).glob("original-*"))
