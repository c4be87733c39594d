"""The real installer, the real units and the real binary under a booted systemd (Debian 12 in
systemd-nspawn) that stands in for Proxmox host pve1 of a 3-node cluster; see guest.py.

The tests run in file order against one guest: install, check, reinstall, rotate, uninstall.
Assertions that need parts of the daemon not yet built skip, naming what they wait for (found
from the daemon's own --help), and run by themselves once it has them.
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from guest import NODES, REPO, Guest
from rootfs import cached_rootfs, fresh_copy

ACCOUNT = "pulse-sensor-proxy"
SOCKET = "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
GUEST_PYZ = "/root/pulse-sensor-proxy.pyz"
INSTALL = f"bash /root/install-sensor-proxy.sh --pyz {GUEST_PYZ}"
CT_CALL = "env SHIV_ROOT=/tmp/shiv pulse-sensor-proxy call"
LEGACY_KEY = "/root/.ssh/id_ed25519"

# 105: a fresh unprivileged container. 106: what an older installer left (an mp0 mount point,
# a snapshot) and a custom uid map. 107: privileged.
CT105 = "arch: amd64\nhostname: pulse\nostype: debian\nrootfs: local-lvm:vm-105-disk-0,size=8G\nunprivileged: 1\n"
CT106 = ("arch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n"
         "parent: pre\nunprivileged: 1\nlxc.idmap: u 0 200000 65536\nlxc.idmap: g 0 200000 65536\n\n"
         "[pre]\narch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n"
         "snaptime: 1760000000\nunprivileged: 1\n")
CT107 = "arch: amd64\nhostname: old\nrootfs: local-lvm:vm-107-disk-0,size=8G\n"

NODE_CONFIG = "".join(
    f"  {name}: {{host: 127.0.0.1, port: {port}, user: node{number}}}\n"
    for number, (name, (_, port)) in enumerate(NODES.items(), start=1))
# Written by the test before the install: the merge must keep all of it.
FIXTURE_CONFIG = 'log_level: debug\nallowed_source_subnets: ["127.0.0.0/8"]\n'
FIXTURE_NODES_CONFIG = f"local_sensors: false\nadmin_identity: [/root/.ssh/id_ed25519]\nnodes:\n{NODE_CONFIG}"


def artefact():
    """The binary under test: the pyz that ./build_zipapp.sh builds, once that script exists;
    until then the module itself, with its dependencies from Debian's packages in the guest."""
    if (REPO / "build_zipapp.sh").exists():
        pyz = REPO / "dist/pulse-sensor-proxy-x86_64.pyz"
        subprocess.run([str(REPO / "build_zipapp.sh")], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        return pyz, ()
    return REPO / "pulse_sensor_proxy.py", ("python3-asyncssh", "python3-cffi-backend", "python3-yaml")


@pytest.fixture(scope="module")
def guest():
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: ./dev.sh setup installs it")
    binary, packages = artefact()
    workdir = Path(tempfile.mkdtemp(prefix="pulse-guest-", dir="/var/tmp"))
    root = workdir / "root"
    root.mkdir()
    fresh_copy(cached_rootfs(("procps",) + packages), root)
    with open(workdir / "console.log", "w") as log:
        machine = Guest(root, log)
        try:
            machine.prepare()
            shutil.copy(REPO / "install-sensor-proxy.sh", machine.path("/root/install-sensor-proxy.sh"))
            shutil.copy(binary, machine.path(GUEST_PYZ))
            machine.proxy_help = subprocess.run([sys.executable, str(binary), "--help"],
                                                capture_output=True, text=True).stdout
            config = FIXTURE_CONFIG
            if has_command(machine, "keys"):
                config += FIXTURE_NODES_CONFIG
            machine.write("/etc/pulse-sensor-proxy/config.yaml", config, 0o640)
            legacy = machine.add_container(105, CT105) / LEGACY_KEY.lstrip("/")
            machine.add_container(106, CT106)
            machine.add_container(107, CT107)
            plant_legacy_key(machine, legacy)
            machine.boot()
            yield machine
        finally:
            machine.poweroff()
            shutil.rmtree(workdir, ignore_errors=True)


def plant_legacy_key(machine, key):
    """Container 105 holds the SSH key it used before the proxy, authorized on every node."""
    key.parent.mkdir(mode=0o700, parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@pulse", "-f", str(key)],
                   check=True)
    for path in (key.parent, key, key.with_suffix(".pub")):
        shutil.chown(path, 100000, 100000)
    line = 'command="sensors -j",no-pty ' + key.with_suffix(".pub").read_text()
    for number in range(1, len(NODES) + 1):
        with open(machine.path(f"/home/node{number}/.ssh/authorized_keys"), "a") as keys:
            keys.write(line)


def has_command(machine, command):
    """Whether the daemon under test lists this subcommand in its --help."""
    return re.search(rf"^\s+{re.escape(command)}\s", machine.proxy_help, re.M) is not None


def needs(machine, command):
    """Skip unless the daemon under test has this subcommand."""
    if not has_command(machine, command):
        pytest.skip(f"needs `{command}` from main")


def node_keys(machine):
    return machine.out("cat /home/node*/.ssh/authorized_keys")


@pytest.fixture(scope="module")
def first_install(guest):
    refused = guest.run(f"{INSTALL} --ctid 105,107", check=False)
    result = guest.run(f"{INSTALL} --ctid 105,106 --allowed-subnets 127.0.0.1/32", check=False)
    return refused, result


def test_privileged_container_refused_and_nothing_installed(guest, first_install):
    refused, _ = first_install
    assert refused.returncode == 1
    assert "container 107 is privileged" in refused.stderr
    assert guest.path("/etc/pve/lxc/107.conf").read_text() == CT107


def test_install_succeeds(first_install):
    _, result = first_install
    assert result.returncode == 0, result.stdout + result.stderr
    assert "changed  binary /usr/local/bin/pulse-sensor-proxy" in result.stdout
    assert "check:  pulse-sensor-proxy call get_status" in result.stdout


def test_units_verify(guest, first_install):
    result = guest.run("systemd-analyze verify /etc/systemd/system/pulse-sensor-proxy.service "
                       "/etc/systemd/system/pulse-sensor-proxy-key-rotation.service "
                       "/etc/systemd/system/pulse-sensor-proxy-key-rotation.timer", check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_service_runs_as_its_account_under_the_unit(guest, first_install):
    assert guest.out("systemctl is-active pulse-sensor-proxy").strip() == "active"
    pid = guest.out("systemctl show -p MainPID --value pulse-sensor-proxy").strip()
    uid = guest.out(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status").strip()
    assert guest.out(f"getent passwd {uid} | cut -d: -f1").strip() == ACCOUNT
    assert guest.out(f"getent passwd {ACCOUNT} | cut -d: -f6,7").strip() == "/nonexistent:/usr/sbin/nologin"
    assert guest.out(f"id -gn {ACCOUNT}").strip() == ACCOUNT


@pytest.mark.parametrize("path, expected", [
    ("/var/lib/pulse-sensor-proxy", f"750 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh", f"700 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh/id_ed25519", f"600 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub", f"640 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh.d", f"750 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh.d/next", f"750 {ACCOUNT} {ACCOUNT}"),
    ("/var/lib/pulse-sensor-proxy/ssh.d/prev", f"750 {ACCOUNT} {ACCOUNT}"),
    ("/etc/pulse-sensor-proxy", f"750 root {ACCOUNT}"),
    ("/etc/pulse-sensor-proxy/config.yaml", f"640 root {ACCOUNT}"),
    ("/run/pulse-sensor-proxy", f"775 {ACCOUNT} {ACCOUNT}"),
    (SOCKET, f"777 {ACCOUNT} {ACCOUNT}"),
    ("/usr/local/bin/pulse-sensor-proxy", "755 root root"),
    ("/var/cache/pulse-sensor-proxy", f"700 {ACCOUNT} {ACCOUNT}"),
    ("/var/backups/pulse-sensor-proxy", "700 root root"),
])
def test_path_owner_and_mode(guest, first_install, path, expected):
    assert guest.out(f"stat -c '%a %U %G' {path}").strip() == expected


def test_config_merged_keeping_the_admins_lines(guest, first_install):
    config = guest.path("/etc/pulse-sensor-proxy/config.yaml").read_text()
    assert "log_level: debug" in config
    assert 'allowed_source_subnets:\n- 127.0.0.0/8' in config or "127.0.0.0/8" in config
    needs(guest, "keys")
    for name, (_, port) in NODES.items():
        assert name in config and str(port) in config
    for uid_range in ("100000-165535", "200000-265535"):
        assert uid_range in config
    assert "127.0.0.1/32" in config


def test_container_configs(guest, first_install):
    conf105 = guest.path("/etc/pve/lxc/105.conf").read_text()
    assert conf105 == CT105 + ("lxc.mount.entry: /run/pulse-sensor-proxy run/pulse-sensor-proxy "
                               "none bind,create=dir,optional 0 0\n")
    conf106 = guest.path("/etc/pve/lxc/106.conf").read_text()
    assert conf106 == CT106.replace(
        "mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\nparent",
        "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0\nparent")
    assert "reboot 105" in guest.out("cat /var/lib/pct-shim/pct.log")


def test_documented_socket_paths_exist_in_the_containers(guest, first_install):
    docs = (REPO / "docs-install.md").read_text()
    assert "lxc.mount.entry: /run/pulse-sensor-proxy run/pulse-sensor-proxy none bind,create=dir,optional 0 0" in docs
    assert SOCKET in docs
    guest.run(f"pct exec 105 -- test -S {SOCKET}")
    guest.run("pct exec 106 -- test -S /mnt/pulse-proxy/pulse-sensor-proxy.sock")


def test_legacy_key_moved_out_of_the_container(guest, first_install):
    _, result = first_install
    assert f"container 105: key {LEGACY_KEY} moved" in result.stdout
    assert not guest.path(f"/var/lib/pct-shim/105/rootfs{LEGACY_KEY}").exists()
    backup = "/var/backups/pulse-sensor-proxy/ct105/root_.ssh_id_ed25519"
    assert guest.out(f"stat -c '%a %U' {backup}").strip() == "600 root"
    needs(guest, "keys")
    assert "root@pulse" not in node_keys(guest)


def test_container_uid_gets_status(guest, first_install):
    status = json.loads(guest.out(f"pct exec 105 -- {CT_CALL} get_status --raw"))
    assert status["success"] is True


def test_container_uid_reads_every_node(guest, first_install):
    needs(guest, "keys")
    for ctid, socket in ((105, SOCKET), (106, "/mnt/pulse-proxy/pulse-sensor-proxy.sock")):
        for node in NODES:
            guest.run(f"pct exec {ctid} -- {CT_CALL} get_temperature --node {node} --socket {socket}")
    reply = guest.out(f"pct exec 105 -- {CT_CALL} get_temperature --node pve1 --raw")
    assert "coretemp" in reply


def test_other_uid_is_refused(guest, first_install):
    result = guest.run(f"setpriv --reuid 4242 --regid 4242 --clear-groups "
                       f"env SHIV_ROOT=/tmp/shiv-4242 pulse-sensor-proxy call get_status", check=False)
    assert result.returncode == 1
    assert "success" not in result.stdout or '"success": false' in result.stdout


def test_metrics_answer(guest, first_install):
    metrics = guest.out("python3 -c 'import urllib.request; "
                        "print(urllib.request.urlopen(\"http://127.0.0.1:9127/metrics\").read().decode())'")
    assert "pulse_proxy_build_info" in metrics


def tree_state(guest):
    return guest.out(
        "find /etc/pulse-sensor-proxy /etc/systemd/system /etc/pve /usr/local/bin /var/lib/pulse-sensor-proxy "
        "/var/backups/pulse-sensor-proxy -xdev -printf '%p %m %u %T@\\n' | sort; "
        "md5sum /etc/pulse-sensor-proxy/config.yaml /etc/pve/lxc/*.conf /usr/local/bin/pulse-sensor-proxy; "
        "systemctl show -p MainPID --value pulse-sensor-proxy; cat /var/lib/pct-shim/pct.log")


def test_second_install_changes_nothing(guest, first_install):
    before = tree_state(guest)
    result = guest.run(f"{INSTALL} --ctid 105,106 --allowed-subnets 127.0.0.1/32")
    assert "Nothing to change: everything was already in place." in result.stdout
    assert "changed  " not in result.stdout
    assert tree_state(guest) == before


def test_container_starts_with_the_proxy_stopped(guest, first_install):
    guest.run("systemctl stop pulse-sensor-proxy && test ! -e /run/pulse-sensor-proxy")
    try:
        guest.run("pct stop 105 && pct start 105 && pct stop 106 && pct start 106")
    finally:
        guest.run("systemctl start pulse-sensor-proxy")


def test_failed_upgrade_rolls_back(guest, first_install):
    """A new binary that runs but cannot serve: the installer puts the working one back."""
    guest.write("/root/broken.pyz", "#!/usr/bin/env python3\nimport sys\n"
                "print('pulse-sensor-proxy 9.9.9') if sys.argv[1:] == ['version'] else sys.exit(1)\n")
    good = guest.out("md5sum < /usr/local/bin/pulse-sensor-proxy")
    result = guest.run("bash /root/install-sensor-proxy.sh --pyz /root/broken.pyz --standalone", check=False)
    assert result.returncode == 1
    assert "rolled back" in result.stderr
    assert guest.out("md5sum < /usr/local/bin/pulse-sensor-proxy") == good
    guest.run(f"systemctl is-active pulse-sensor-proxy && test -S {SOCKET}")


def test_rotation_keeps_temperatures_flowing(guest, first_install):
    needs(guest, "rotate-keys")
    before = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub")
    guest.run("(for i in $(seq 40); do pct exec 105 -- "
              f"{CT_CALL} get_temperature --node pve2 >/dev/null || echo FAIL; done) >/tmp/during.log 2>&1 & "
              "echo $! >/tmp/during.pid")
    guest.run("systemctl start pulse-sensor-proxy-key-rotation.service")
    guest.run("while kill -0 $(cat /tmp/during.pid) 2>/dev/null; do sleep 0.2; done")
    assert "FAIL" not in guest.out("cat /tmp/during.log")
    after = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub")
    assert after != before
    keys = node_keys(guest)
    assert after.split()[1] in keys
    for node in NODES:
        guest.run(f"pct exec 105 -- {CT_CALL} get_temperature --node {node}")


def test_rotation_timer_enabled_on_request(guest, first_install):
    guest.run(f"{INSTALL} --ctid 105,106 --enable-rotation-timer")
    assert guest.out("systemctl is-enabled pulse-sensor-proxy-key-rotation.timer").strip() == "enabled"
    assert guest.out("systemctl show -p NextElapseUSecRealtime --value pulse-sensor-proxy-key-rotation.timer").strip()


def test_uninstall_leaves_nothing_behind(guest, first_install):
    proxy_key = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub").split()[1]
    result = guest.run("bash /root/install-sensor-proxy.sh --uninstall")
    assert "kept: " in result.stdout
    for path in ("/etc/systemd/system/pulse-sensor-proxy.service",
                 "/etc/systemd/system/pulse-sensor-proxy-key-rotation.service",
                 "/etc/systemd/system/pulse-sensor-proxy-key-rotation.timer",
                 "/usr/local/bin/pulse-sensor-proxy", "/run/pulse-sensor-proxy"):
        assert not guest.path(path).exists(), path
    assert "pulse-sensor-proxy" not in guest.out("systemctl list-units --all --no-legend 'pulse-sensor-proxy*'")
    assert guest.path("/etc/pve/lxc/105.conf").read_text() == CT105
    assert "[pre]\narch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n" in \
        guest.path("/etc/pve/lxc/106.conf").read_text()
    guest.run("pct stop 105 && pct start 105")
    assert guest.path("/var/lib/pulse-sensor-proxy/ssh/id_ed25519").exists()
    needs(guest, "keys")
    assert proxy_key not in node_keys(guest)


def test_purge_then_standalone_install(guest, first_install):
    guest.run("bash /root/install-sensor-proxy.sh --uninstall --purge")
    for path in ("/var/lib/pulse-sensor-proxy", "/etc/pulse-sensor-proxy"):
        assert not guest.path(path).exists()
    assert guest.run(f"getent passwd {ACCOUNT}", check=False).returncode == 2
    guest.run("mv /etc/pve /etc/pve.cluster && mv /usr/local/sbin/pvecm /usr/local/sbin/pvecm.off")
    try:
        result = guest.run(f"{INSTALL} --standalone")
        assert "standalone (no Proxmox VE)" in result.stdout
        assert "needs its own proxy" in result.stdout
        assert json.loads(guest.out("pulse-sensor-proxy call get_status --raw"))["success"] is True
        guest.run("bash /root/install-sensor-proxy.sh --uninstall --purge")
    finally:
        guest.run("mv /etc/pve.cluster /etc/pve && mv /usr/local/sbin/pvecm.off /usr/local/sbin/pvecm")
