"""The socket where Pulse looks for it, inside a real LXC container whose init is systemd.

Debian's lxc runs an unprivileged container on this machine (a Debian 12 rootfs from the tests'
debootstrap cache, its owners shifted by 100000; lxc.idmap u/g 0 100000 65536, as Proxmox
maps an unprivileged container), configured with the line the installer wrote into
/etc/pve/lxc/110.conf, and the files it pushed into the container, in an installer run
against container 110 of a booted guest standing in for Proxmox host pve1 (guest.py; there
container 110 is the pct stand-in's). The proxy runs in that guest under its real unit, so
`systemctl restart` is systemd's own. The guest's /run/pulse-sensor-proxy is this machine's
/run/pulse-sensor-proxy: the directory itself, attached here from the guest's mount namespace
(open_tree + move_mount), as LXC binds the host's directory into the container. Unix sockets
are found by path across network namespaces, and the guest has no user namespace, so the
daemon sees the container's root as uid 100000, which the installer allowed for 110.

Inside, as the container's root (lxc-attach), a client written from issue 20's description of
Pulse's (pulse_socket_lookup.py) reads get_status and get_temperature through each path Pulse's
clients try. With the line the installer wrote before (container path run/pulse-sensor-proxy),
the container's systemd covers the mount with its /run tmpfs, and the socket is not there.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import wait_for
from guest import GUEST_INSTALLER, GUEST_PACKAGES, GUEST_PYZ, LOCAL_NODE, REPO, booted_guest
from rootfs import cached_rootfs, fresh_copy

CTID = 110
ROOT_UID = 100000
CT_CONF = ("arch: amd64\nhostname: pulse\nostype: debian\nrootfs: local-lvm:vm-110-disk-0,size=8G\n"
           "unprivileged: 1\nlxc.idmap: u 0 100000 65536\nlxc.idmap: g 0 100000 65536\n")
ENTRY = "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0"
OLD_ENTRY = "lxc.mount.entry: /run/pulse-sensor-proxy run/pulse-sensor-proxy none bind,create=dir,optional 0 0"
RUN_DIR = "/run/pulse-sensor-proxy"
RUN_SOCKET = f"{RUN_DIR}/pulse-sensor-proxy.sock"
MNT_SOCKET = "/mnt/pulse-proxy/pulse-sensor-proxy.sock"
PUSHED = ("/etc/tmpfiles.d/pulse-sensor-proxy.conf",
          "/etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf")
CLIENT_DIR = "/usr/local/lib/pulse-test"
CLIENT = f"python3 {CLIENT_DIR}/pulse_socket_lookup.py {LOCAL_NODE}"
LOOKUP_OUT = "/run/pulse-lookup.json"
# Pulse's service as its installer writes it (install.sh, v5.0.17: EnvironmentFile=-/etc/pulse/.env),
# running the client once instead of Pulse: what it reads is what Pulse's service would.
PULSE_UNIT = f"""[Unit]
Description=Pulse Monitoring Server (stand-in: one socket lookup and one round of requests)

[Service]
Type=oneshot
ExecStart=/usr/bin/{CLIENT}
StandardOutput=truncate:{LOOKUP_OUT}
Environment="PULSE_DATA_DIR=/etc/pulse"
EnvironmentFile=-/etc/pulse/.env
"""
POLL_LOG, POLL_STOP = "/root/poll.log", "/root/poll.stop"
# A poll loop as Pulse's runs one: a new connection per request, get_temperature of this host,
# each outcome one line ("ok"/"error", the time) until POLL_STOP exists.
POLLER = f"""import os, sys, time
sys.path.insert(0, "{CLIENT_DIR}")
from pulse_client import call_once   # Pulse's request, decoded as its Go client does
log = open("{POLL_LOG}", "a", buffering=1)
while not os.path.exists("{POLL_STOP}"):
    try:
        reply = call_once("{MNT_SOCKET}", "get_temperature", {{"node": "{LOCAL_NODE}"}}, timeout=10)
        outcome = "ok" if reply["success"] else "error"
    except (OSError, ValueError):
        outcome = "error"
    log.write(f"{{outcome}} {{time.monotonic():.3f}} {{os.getpid()}}\\n")
    time.sleep(0.1)  # pacing within the rate limit, not synchronisation
"""
# What pve-container generates for an unprivileged Debian container (src/PVE/LXC.pm
# update_lxc_config: the ostype's common config and userns.conf, then each raw lxc.* key of
# the container's config as "KEY = VALUE"). No network; AppArmor left out, as this machine
# has none to load a profile into.
LXC_CONFIG = """lxc.include = /usr/share/lxc/config/common.conf
lxc.include = /usr/share/lxc/config/userns.conf
lxc.arch = amd64
lxc.uts.name = pulse
lxc.rootfs.path = dir:{rootfs}
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.log.file = {log}
lxc.idmap = u 0 100000 65536
lxc.idmap = g 0 100000 65536
{mount_entry}
"""
# Attaches directory SOURCE of process PID's mount namespace at TARGET in this one: a clone
# of the mount taken inside that namespace (open_tree), moved here (move_mount). A plain bind
# mount refuses a source in another mount namespace.
ATTACH_FROM_NAMESPACE = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result < 0:
        sys.exit(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result
pid, source, target = sys.argv[1:4]
here = os.open("/proc/self/ns/mnt", os.O_RDONLY)
check(libc.setns(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY), 0x00020000), "setns")
tree = check(libc.syscall(428, -100, source.encode(), 1 | 0o2000000), "open_tree")  # OPEN_TREE_CLONE
check(libc.setns(here, 0x00020000), "setns back")
os.chdir("/")
check(libc.syscall(429, tree, b"", -100, target.encode(), 4), "move_mount")  # F_EMPTY_PATH
"""


def shift_owners(root, offset):
    """Every file's uid and gid + OFFSET, keeping set-id bits (chown clears them)."""
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        os.lchown(path, info.st_uid + offset, info.st_gid + offset)
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o6000:
            path.chmod(stat.S_IMODE(info.st_mode))


def put(rootfs, path, text, uid=ROOT_UID):
    """Write a file into ROOTFS as the container's root writes it (parents created likewise)."""
    target = rootfs / path.lstrip("/")
    missing = [parent for parent in target.parents if not parent.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    for created in [target, *missing]:
        os.lchown(created, uid, uid)


class Lxc:
    """One container of Debian's lxc, LXCPATH/NAME, booted with systemd."""

    def __init__(self, lxcpath, name, mount_entry, files):
        self.lxcpath, self.name = lxcpath, name
        directory = lxcpath / name
        self.rootfs = directory / "rootfs"
        self.log = directory / "lxc.log"
        self.rootfs.mkdir(parents=True)
        fresh_copy(cached_rootfs(GUEST_PACKAGES), self.rootfs)
        shift_owners(self.rootfs, ROOT_UID)
        for path, text in {**files, "/etc/systemd/system/pulse.service": PULSE_UNIT,
                           f"{CLIENT_DIR}/pulse_client.py": (REPO / "tests/pulse_client.py").read_text(),
                           f"{CLIENT_DIR}/gojson.py": (REPO / "tests/gojson.py").read_text(),
                           f"{CLIENT_DIR}/poll.py": POLLER,
                           f"{CLIENT_DIR}/pulse_socket_lookup.py":
                               (REPO / "tests/system/pulse_socket_lookup.py").read_text()}.items():
            put(self.rootfs, path, text)
        # Proxmox's "lxc.mount.entry: X" is LXC's "lxc.mount.entry = X"
        (directory / "config").write_text(LXC_CONFIG.format(
            rootfs=self.rootfs, log=self.log, mount_entry=mount_entry.replace(": ", " = ", 1)))

    def lxc(self, tool, *args, check=True):
        result = subprocess.run([f"lxc-{tool}", "-n", self.name, "-P", str(self.lxcpath), *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise AssertionError(f"lxc-{tool} {args} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}\nlxc.log:\n{log}")
        return result

    def attach(self, command, check=True):
        """COMMAND (sh) inside, as the container's root, with a clean environment; its stdout."""
        return self.lxc("attach", "--clear-env", "--set-var", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                        "--", "/bin/sh", "-c", command, check=check).stdout

    def start(self):
        self.lxc("start", "-d")

        def booted():
            state = self.lxc("attach", "--clear-env", "--", "/bin/systemctl", "is-system-running",
                             "--wait", check=False).stdout.strip()
            return state in ("running", "degraded")
        wait_for(booted, timeout=120, what=f"container {self.name} to boot")
        assert self.attach("cat /proc/1/comm").strip() == "systemd"

    def stop(self):
        if "RUNNING" in self.lxc("info", "-s", check=False).stdout:
            self.lxc("stop", "-t", "60")


@pytest.fixture(scope="module")
def guest():
    def setup(machine):
        rootfs = machine.add_container(CTID, CT_CONF)
        put(rootfs, "/etc/systemd/system/pulse.service", PULSE_UNIT)

    with booted_guest(setup) as machine:
        yield machine


@pytest.fixture(scope="module")
def installed(guest):
    return guest.run(f"bash {GUEST_INSTALLER} --pyz {GUEST_PYZ} --ctid {CTID}")


@pytest.fixture(scope="module")
def host_run_dir(guest, installed):
    """The guest's runtime directory, attached at this machine's /run/pulse-sensor-proxy."""
    target = Path(RUN_DIR)
    if target.exists():
        pytest.fail(f"{RUN_DIR} exists on this machine already: a proxy or a run of this test holds it")
    target.mkdir()
    try:
        subprocess.run([sys.executable, "-c", ATTACH_FROM_NAMESPACE, str(guest.pid), RUN_DIR, RUN_DIR],
                       check=True, capture_output=True, text=True)
        assert (target / "pulse-sensor-proxy.sock").is_socket()
        yield target
    finally:
        subprocess.run(["umount", "--lazy", RUN_DIR], capture_output=True)
        target.rmdir()


@pytest.fixture(scope="module")
def lxcpath():
    if shutil.which("lxc-start") is None:
        raise RuntimeError("lxc is missing: ./dev.sh setup installs it")
    path = Path(tempfile.mkdtemp(prefix="pulse-lxc-", dir="/var/tmp"))
    path.chmod(0o755)  # the container's root (uid 100000) reaches its rootfs through it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def containers_line(guest):
    lines = [line for line in guest.path(f"/etc/pve/lxc/{CTID}.conf").read_text().splitlines()
             if line.startswith("lxc.mount.entry:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def container(guest, host_run_dir, lxcpath):
    """Booted with the line the installer wrote and the files it pushed into container 110."""
    shim = guest.path(f"/var/lib/pct-shim/{CTID}/rootfs")
    files = {path: (shim / path.lstrip("/")).read_text() for path in PUSHED}
    ct = Lxc(lxcpath, "pulse", containers_line(guest), files)
    try:
        ct.start()
        yield ct
    finally:
        ct.stop()


def read_through_every_path(ct):
    """{how: reply} for each way Pulse's clients find the socket: Pulse's service (its
    environment), the lookup without the variable, and each of the two paths."""
    ct.attach("systemctl start pulse.service")
    replies = {"pulse.service": json.loads(ct.attach(f"cat {LOOKUP_OUT}")),
               "lookup": json.loads(ct.attach(CLIENT))}
    for path in (RUN_SOCKET, MNT_SOCKET):
        replies[path] = json.loads(ct.attach(f"{CLIENT} {path}"))
    return replies


def every_path_reads(ct):
    replies = read_through_every_path(ct)
    for reply in replies.values():
        if "error" in reply or not (reply["get_status"]["success"] and reply["get_temperature"]["success"]):
            return None
    return replies


def test_the_installer_wrote_the_line_and_checked_from_inside(guest, installed):
    assert containers_line(guest) == ENTRY
    assert f"files inside containers (--uninstall removes them): {CTID}:{PUSHED[0]} {CTID}:{PUSHED[1]}" \
        in installed.stdout
    assert (f"ok       container {CTID}: Pulse will use {MNT_SOCKET} (pulse.service's "
            "PULSE_SENSOR_PROXY_SOCKET)") in installed.stdout


def test_every_path_reads_inside_the_container(container):
    replies = every_path_reads(container)
    assert replies, read_through_every_path(container)
    assert replies["pulse.service"]["path"] == MNT_SOCKET    # the drop-in's variable
    assert replies["lookup"]["path"] == RUN_SOCKET           # the link tmpfiles.d made at boot
    assert "coretemp" in json.dumps(replies[MNT_SOCKET]["get_temperature"]["data"])
    assert container.attach(f"readlink {RUN_DIR}").strip() == "/mnt/pulse-proxy"


def test_the_line_before_this_issue_leaves_no_socket_inside(guest, host_run_dir, lxcpath):
    """Regression: the container's systemd mounts its /run tmpfs over the bind mount."""
    old = Lxc(lxcpath, "pulse-old", OLD_ENTRY, {})
    try:
        old.start()
        assert old.attach(f"test -S {RUN_SOCKET} || echo absent").strip() == "absent"
        reply = json.loads(old.attach(f"{CLIENT} {RUN_SOCKET}"))
        assert reply["error"].startswith("FileNotFoundError"), reply
        assert "tmpfs" in old.attach("findmnt -n -o FSTYPE /run")
    finally:
        old.stop()


def main_pid(guest):
    return guest.out("systemctl show -p MainPID --value pulse-sensor-proxy").strip()


def test_a_poller_inside_reads_on_across_a_restart_of_the_proxy(guest, container):
    """One poll loop in the container, started before `systemctl restart` and running on: it
    gets answers again through the same mount, with no restart of the container."""
    log = container.rootfs / POLL_LOG.lstrip("/")

    def outcomes():
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    def oks(rows):
        return [row for row in rows if row[0] == "ok"]

    container.attach(f"setsid python3 {CLIENT_DIR}/poll.py </dev/null >/dev/null 2>&1 &")
    try:
        wait_for(lambda: len(oks(outcomes())) >= 3, timeout=60, what="the poller's answers before")
        before = main_pid(guest)
        guest.run("systemctl restart pulse-sensor-proxy")
        assert main_pid(guest) not in (before, "0")
        restarted = len(outcomes())
        wait_for(lambda: len(oks(outcomes()[restarted:])) >= 3, timeout=60,
                 what="the poller's answers after the restart")
    finally:
        container.attach(f"touch {POLL_STOP}")
    rows = outcomes()
    assert len({row[2] for row in rows}) == 1, "one poller process throughout"
    times = [float(row[1]) for row in oks(rows)]
    gap = max(later - earlier for earlier, later in zip(times, times[1:]))
    failed = len(rows) - len(oks(rows))
    print(f"poller across systemctl restart: {len(rows)} polls, {failed} failed, longest gap "
          f"between answers {gap * 1000:.0f} ms")


def test_reads_on_across_a_restart_of_the_proxy(guest, container):
    before = main_pid(guest)
    guest.run("systemctl restart pulse-sensor-proxy")
    assert main_pid(guest) not in (before, "0")
    wait_for(lambda: every_path_reads(container), timeout=60, what="every path to read after the restart")


def test_reads_on_across_a_stop_and_start_of_the_proxy(guest, container):
    guest.run("systemctl stop pulse-sensor-proxy")
    assert "error" in read_through_every_path(container)[MNT_SOCKET]
    guest.run("systemctl start pulse-sensor-proxy")
    wait_for(lambda: every_path_reads(container), timeout=60, what="every path to read after the start")


def test_reads_on_across_a_reboot_of_the_container(container):
    container.stop()
    container.start()
    wait_for(lambda: every_path_reads(container), timeout=60, what="every path to read after the reboot")
    assert container.attach(f"readlink {RUN_DIR}").strip() == "/mnt/pulse-proxy"
