"""The real installer, the real units and the real binary under a booted systemd (Debian 12 in
systemd-nspawn) that stands in for Proxmox host pve1 of a 3-node cluster; see guest.py.

The tests run in file order against one guest: install, check, reinstall, rotate, uninstall.
"""
import json
import shutil
import subprocess

import pytest
import yaml

import gojson
import pulse_sensor_proxy as psp
from conftest import wait_for
from guest import (ADDRESS, GUEST_DISKS, GUEST_INSTALLER, GUEST_PYZ, LOCAL_NODE, NODE_KEY_FILES,
                   NODES, REMOTE_NODES, REPO, booted_guest)

ACCOUNT = "pulse-sensor-proxy"
SOCKET = "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
# Inside a container: outside /run, which the container's own systemd covers with a tmpfs.
CT_SOCKET = "/mnt/pulse-proxy/pulse-sensor-proxy.sock"
INSTALL = f"bash {GUEST_INSTALLER} --pyz {GUEST_PYZ}"
CT_CALL = f"env SHIV_ROOT=/tmp/shiv PULSE_SENSOR_PROXY_SOCKET={CT_SOCKET} pulse-sensor-proxy call"
LEGACY_KEY = "/root/.ssh/id_ed25519"
CONFIG = "/etc/pulse-sensor-proxy/config.yaml"
CURRENT_PUB = "/var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub"
# What the installer finds as this host's address (vmbr0), when not given --allowed-subnets.
HOST_SUBNET = f"{ADDRESS}/32"

# 105: a fresh unprivileged container. 106: what an older installer left (an mp0 mount point,
# a snapshot) and a custom uid map. 107: privileged.
CT105 = "arch: amd64\nhostname: pulse\nostype: debian\nrootfs: local-lvm:vm-105-disk-0,size=8G\nunprivileged: 1\n"
CT106 = ("arch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n"
         "parent: pre\nunprivileged: 1\nlxc.idmap: u 0 200000 65536\nlxc.idmap: g 0 200000 65536\n\n"
         "[pre]\narch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n"
         "snaptime: 1760000000\nunprivileged: 1\n")
CT107 = "arch: amd64\nhostname: old\nrootfs: local-lvm:vm-107-disk-0,size=8G\n"

# Written by the test before the install: the merge must keep all of it. The admin identity is
# the default (root's ~/.ssh/id_*); the rotation test's poller asks more than 20 times a minute.
# Every poll reaches its node (no answers from the per-node interval's last reading), so that
# the rotation test sees the daemon pick up the new key on a real connection.
FIXTURE_CONFIG = ("log_level: debug\nrate_limit: {per_minute: 6000, burst: 100}\n"
                  "node_min_interval_seconds: 0\nnodes:\n"
                  f"  {LOCAL_NODE}: {{host: {ADDRESS}}}\n" +
                  "".join(f"  {name}: {{host: {ADDRESS}, port: {port}, user: {name}}}\n"
                          for name, port in REMOTE_NODES.items()))


@pytest.fixture(scope="module")
def guest():
    def setup(machine):
        machine.write(CONFIG, FIXTURE_CONFIG, 0o640)
        legacy = machine.add_container(105, CT105) / LEGACY_KEY.lstrip("/")
        machine.add_container(106, CT106)
        machine.add_container(107, CT107)
        machine.legacy_private = plant_legacy_key(machine, legacy)

    with booted_guest(setup) as machine:
        yield machine


def plant_legacy_key(machine, key):
    """Container 105 holds the SSH key it used before the proxy, authorized on every node.
    Returns the private key's bytes."""
    key.parent.mkdir(mode=0o700, parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@pulse", "-f", str(key)],
                   check=True)
    for path in (key.parent, key, key.with_suffix(".pub")):
        shutil.chown(path, 100000, 100000)
    line = 'command="sensors -j",no-pty ' + key.with_suffix(".pub").read_text()
    for path in NODE_KEY_FILES.values():
        with open(machine.path(path), "a") as keys:
            keys.write(line)
    return key.read_bytes()


def node_keys(machine):
    """Every node's authorized_keys, {node: text}."""
    return {node: machine.path(path).read_text() for node, path in NODE_KEY_FILES.items()}


def proxy_lines(text):
    return [line for line in text.splitlines() if line.endswith(" pulse-sensor-proxy")]


def config_subnets(machine):
    return yaml.safe_load(machine.path(CONFIG).read_text())["allowed_source_subnets"]


def assert_nodes_hold_the_line_the_daemon_reports(machine):
    """Each node has exactly one line of the proxy's, for its current key, restricted to the
    config's subnets, and it is the line the daemon itself reports (ensure_cluster_keys)."""
    reported = json.loads(machine.out("pulse-sensor-proxy call ensure_cluster_keys --raw"))
    expected = reported["data"]["authorized_key"]
    key = machine.out(f"cat {CURRENT_PUB}").split()[1]
    assert f'from="{",".join(config_subnets(machine))}",command="{psp.SMART_PROGRAM}",restrict,' \
        in expected
    assert key in expected
    for node, text in node_keys(machine).items():
        assert proxy_lines(text) == [expected], node


@pytest.fixture(scope="module")
def first_install(guest):
    refused = guest.run(f"{INSTALL} --ctid 105,107", check=False)
    result = guest.run(f"{INSTALL} --ctid 105,106", check=False)
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
    config = yaml.safe_load(guest.path(CONFIG).read_text())
    assert config["log_level"] == "debug"
    assert config["rate_limit"] == {"per_minute": 6000, "burst": 100}
    assert config["nodes"] == yaml.safe_load(FIXTURE_CONFIG)["nodes"]
    assert [peer["uids"] for peer in config["allowed_peers"]] == ["100000-165535", "200000-265535"]


def test_config_names_the_hosts_address_the_nodes_see(guest, first_install):
    """Without --allowed-subnets the installer puts this host's address into the config, since
    the daemon's sandbox hides /proc/net from its own detection."""
    _, result = first_install
    assert config_subnets(guest) == [HOST_SUBNET]
    assert f"this host's addresses {HOST_SUBNET} " in result.stdout


def test_every_node_holds_the_line_the_daemon_reports(guest, first_install):
    assert_nodes_hold_the_line_the_daemon_reports(guest)


def test_container_configs(guest, first_install):
    conf105 = guest.path("/etc/pve/lxc/105.conf").read_text()
    assert conf105 == CT105 + ("lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy "
                               "none bind,create=dir,optional 0 0\n")
    conf106 = guest.path("/etc/pve/lxc/106.conf").read_text()
    assert conf106 == CT106.replace(
        "mp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\nparent",
        "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0\nparent")
    assert "reboot 105" in guest.out("cat /var/lib/pct-shim/pct.log")


def test_documented_socket_paths_exist_in_the_containers(guest, first_install):
    docs = (REPO / "README.md").read_text()
    assert "lxc.mount.entry: /run/pulse-sensor-proxy mnt/pulse-proxy none bind,create=dir,optional 0 0" in docs
    assert CT_SOCKET in docs
    guest.run(f"pct exec 105 -- test -S {CT_SOCKET}")
    guest.run(f"pct exec 106 -- test -S {CT_SOCKET}")


def test_legacy_key_moved_out_of_the_container_and_revoked(guest, first_install):
    _, result = first_install
    assert f"container 105: key {LEGACY_KEY} moved" in result.stdout
    for path in (LEGACY_KEY, LEGACY_KEY + ".pub"):
        assert not guest.path(f"/var/lib/pct-shim/105/rootfs{path}").exists(), path
    backup = "/var/backups/pulse-sensor-proxy/ct105/root_.ssh_id_ed25519"
    assert guest.out(f"stat -c '%a %U' {backup} /var/backups/pulse-sensor-proxy/ct105").split() == \
        ["600", "root", "700", "root"]
    assert guest.path(backup).read_bytes() == guest.legacy_private
    assert "root@pulse" in guest.path(backup + ".pub").read_text()
    for node, text in node_keys(guest).items():
        assert "root@pulse" not in text, node
    assert "could not revoke" not in result.stderr


def test_container_uid_gets_status(guest, first_install):
    status = json.loads(guest.out(f"pct exec 105 -- {CT_CALL} get_status --raw"))
    assert status["success"] is True


def test_container_uid_reads_every_node(guest, first_install):
    for ctid in (105, 106):
        for node in NODES:
            guest.run(f"pct exec {ctid} -- {CT_CALL} get_temperature --node {node}")
    reply = guest.out(f"pct exec 105 -- {CT_CALL} get_temperature --node pve1 --raw")
    assert "coretemp" in reply
    # this host's disks: its daemon's account opens none (see guest.SMARTCTL); the root
    # pulse-sensor-proxy-smart.service read them into its state dir, where the daemon takes them
    answer = gojson.decode(gojson.decode(reply)["data"]["temperature"])
    assert [(d["device"], d["temperature"], d["standbySkipped"]) for d in answer["smart"]] == GUEST_DISKS
    assert guest.out("stat -c '%a %U' /var/lib/pulse-sensor-proxy-smart/local") == "644 root\n"
    assert guest.out("systemctl is-enabled pulse-sensor-proxy-smart.timer").strip() == "enabled"
    # the nodes' keys came from the cluster's nodes/<node>/ssh_known_hosts: nothing was pinned
    assert not guest.path("/var/lib/pulse-sensor-proxy/known_hosts").exists()


def test_other_uid_is_refused(guest, first_install):
    result = guest.run("setpriv --reuid 4242 --regid 4242 --clear-groups "
                       "env SHIV_ROOT=/tmp/shiv-4242 pulse-sensor-proxy call get_status", check=False)
    assert result.returncode == 1
    assert "success" not in result.stdout or '"success": false' in result.stdout


def test_metrics_answer(guest, first_install):
    metrics = guest.out("python3 -c 'import urllib.request; "
                        "print(urllib.request.urlopen(\"http://127.0.0.1:9127/metrics\").read().decode())'")
    assert "pulse_proxy_build_info" in metrics


def test_doctor_reports_all_ok_after_the_install(guest, first_install):
    def doctor(*args):
        result = guest.run("pulse-sensor-proxy doctor --ctid 105 --json " + " ".join(args),
                           check=False)
        return result, [json.loads(line) for line in result.stdout.splitlines()]

    # pve3 is the cluster's node without sensors (guest.NODES): left out here, named below
    result, findings = doctor("--node pve1", "--node pve2")
    assert [f for f in findings if f["status"] != "ok"] == [], result.stdout + result.stderr
    assert result.returncode == 0
    assert {"service", "original", "config", "socket", "container", "ct-mount", "ct-uids",
            "ct-running", "ct-socket", "key", "sensors", "metrics"} <= {f["check"] for f in findings}
    assert {f["target"] for f in findings if f["check"] == "sensors"} == {"pve1", "pve2"}
    result, findings = doctor()
    assert [(f["check"], f["target"]) for f in findings if f["status"] != "ok"] == \
        [("sensors", "pve3")], result.stdout
    assert result.returncode == 1


def tree_state(guest):
    return guest.out(
        "find /etc/pulse-sensor-proxy /etc/systemd/system /etc/pve /usr/local/bin /var/lib/pulse-sensor-proxy "
        "/var/backups/pulse-sensor-proxy /home/*/.ssh -xdev -printf '%p %m %u %T@\\n' | sort; "
        "md5sum /etc/pulse-sensor-proxy/config.yaml /etc/pve/lxc/*.conf /usr/local/bin/pulse-sensor-proxy "
        "/etc/pve/priv/authorized_keys /home/*/.ssh/authorized_keys; "
        "systemctl show -p MainPID --value pulse-sensor-proxy; cat /var/lib/pct-shim/pct.log")


def test_second_install_changes_nothing(guest, first_install):
    before = tree_state(guest)
    result = guest.run(f"{INSTALL} --ctid 105,106")
    assert "Nothing to change: everything was already in place." in result.stdout
    assert "changed  " not in result.stdout
    assert tree_state(guest) == before


def test_container_starts_with_the_proxy_stopped(guest, first_install):
    # The runtime directory outlives a stop (RuntimeDirectoryPreserve=yes); a node the proxy
    # was never installed on has none.
    guest.run("systemctl stop pulse-sensor-proxy && rm -r /run/pulse-sensor-proxy")
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


# Runs in container 105 (uid 100000): rounds of get_temperature for every node given, each
# asked as Pulse's client asks it (pulse_client.call_once, copied next to it) and printed as one
# JSON line with the phase the test wrote into /tmp/poll.phase.
POLLER = r"""
import json, os, sys, time
sys.path.insert(0, "/tmp")
from pulse_client import call_once   # Pulse's request, decoded as its Go client does
while not os.path.exists("/tmp/poll.stop"):
    with open("/tmp/poll.phase") as handle:
        phase = handle.read().strip()
    for node in sys.argv[1:]:
        try:
            reply = call_once("/mnt/pulse-proxy/pulse-sensor-proxy.sock", "get_temperature",
                              {"node": node})
            ok, error = reply.get("success") is True, reply.get("error")
        except (OSError, ValueError) as exc:
            ok, error = False, repr(exc)
        print(json.dumps({"phase": phase, "node": node, "ok": ok, "error": error}), flush=True)
    time.sleep(0.05)  # pacing under the configured rate limit, not synchronisation
"""


def poll_results(guest):
    text = guest.path("/root/poll.out").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def rounds_in(results, phase):
    """How many answers for every node were successes in this phase (full rounds)."""
    return min(sum(1 for r in results if r["phase"] == phase and r["node"] == node and r["ok"])
               for node in NODES)


def test_rotation_service_rotates_while_temperatures_keep_flowing(guest, first_install):
    before = guest.out(f"cat {CURRENT_PUB}").split()[1]
    reconnects = guest.out("journalctl -u pulse-sensor-proxy -o cat").count("SSH key changed on disk")
    ct_tmp = guest.path("/var/lib/pct-shim/105/rootfs/tmp")
    (ct_tmp / "poll.py").write_text(POLLER)
    for helper in ("gojson.py", "pulse_client.py"):
        shutil.copy(REPO / "tests" / helper, ct_tmp / helper)
    (ct_tmp / "poll.phase").write_text("before")
    guest.run(f"pct exec 105 -- python3 /tmp/poll.py {' '.join(NODES)} >/root/poll.out 2>&1 & "
              "echo $! >/root/poll.pid")
    try:
        wait_for(lambda: rounds_in(poll_results(guest), "before") >= 1,
                 what="temperatures before the rotation", timeout=60)
        (ct_tmp / "poll.phase").write_text("during")
        rotation = guest.run("systemctl start pulse-sensor-proxy-key-rotation.service", check=False)
        (ct_tmp / "poll.phase").write_text("after")
        wait_for(lambda: rounds_in(poll_results(guest), "after") >= 1,
                 what="temperatures after the rotation", timeout=60)
    finally:
        (ct_tmp / "poll.stop").touch()
        guest.run("while kill -0 $(cat /root/poll.pid) 2>/dev/null; do sleep 0.1; done", timeout=60)
    journal = guest.out("journalctl -u pulse-sensor-proxy-key-rotation -o cat")
    assert rotation.returncode == 0, rotation.stderr + journal
    results = poll_results(guest)
    assert [r for r in results if not r["ok"]] == [], guest.out("journalctl -u pulse-sensor-proxy -o cat | tail -60")
    assert rounds_in(results, "during") >= 1, "no poll ran while the key was rotated"
    after = guest.out(f"cat {CURRENT_PUB}").split()[1]
    assert after != before
    assert guest.out("journalctl -u pulse-sensor-proxy -o cat").count("SSH key changed on disk") > reconnects
    for node, text in node_keys(guest).items():
        assert before not in text, node
    assert_nodes_hold_the_line_the_daemon_reports(guest)
    assert guest.out("systemctl show -p Result --value pulse-sensor-proxy-key-rotation").strip() == "success"


def test_rotation_timer_and_new_subnets_on_request(guest, first_install):
    """A later run with --enable-rotation-timer and --allowed-subnets: the timer is on, the
    subnet joins the config, and every node's line is rewritten to match."""
    guest.run(f"{INSTALL} --ctid 105,106 --enable-rotation-timer --allowed-subnets 10.99.0.0/24")
    assert guest.out("systemctl is-enabled pulse-sensor-proxy-key-rotation.timer").strip() == "enabled"
    assert guest.out("systemctl show -p NextElapseUSecRealtime --value pulse-sensor-proxy-key-rotation.timer").strip()
    assert config_subnets(guest) == [HOST_SUBNET, "10.99.0.0/24"]
    assert_nodes_hold_the_line_the_daemon_reports(guest)
    for node in NODES:
        guest.run(f"pct exec 105 -- {CT_CALL} get_temperature --node {node}")


# -- HTTPS mode: a Pulse on another machine --------------------------------------------------

HTTP_INSTALL = f"{INSTALL} --ctid 105,106 --http-mode"
TOKEN_FILE = "/etc/pulse-sensor-proxy/http-token"


def fake_pulse(guest, name, *instances):
    """The register fixture, running in the guest; returns its URL and state directory."""
    state = f"/root/{name}"
    guest.run(f"mkdir -p {state}")
    shutil.copy(REPO / "tests/system/pulse_register_fixture.py", guest.path("/root/register.py"))
    port = {"gone": 7601, "other": 7602, "pulse": 7603}[name]
    guest.run(f"systemd-run --quiet --unit fake-{name} /usr/bin/python3 /root/register.py {port} "
              f"{state} {' '.join(instances)}")
    wait_for(lambda: guest.path(f"{state}/ready").exists(), what=f"fake Pulse {name}")
    return f"http://127.0.0.1:{port}", guest.path(state)


@pytest.mark.parametrize("name, instances, message", [
    ("gone", ("gone",), "switched off (410)"),
    ("other", ("pve9=elsewhere",), "no PVE instance for node 'pve1' (pve_instance_not_found)"),
])
def test_http_mode_refused_registration_changes_nothing(guest, first_install, name, instances,
                                                        message):
    url, state = fake_pulse(guest, name, *instances)
    before = tree_state(guest)
    result = guest.run(f"{HTTP_INSTALL} --pulse-server {url}", check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert json.loads((state / "requests.jsonl").read_text()) == \
        {"hostname": "pve1", "proxy_url": f"https://{ADDRESS}:8443", "mode": "http"}
    assert tree_state(guest) == before


def test_http_mode_registers_and_stores_the_answered_token(guest, first_install):
    url, state = fake_pulse(guest, "pulse", "pve1=cluster-a")
    result = guest.run(f"{HTTP_INSTALL} --pulse-server {url}")
    assert "registered with " + url + " as PVE instance 'cluster-a'" in result.stdout
    answered = (state / "tokens").read_text().split()
    assert len(answered) == 1 and len(answered[0]) == 44
    assert guest.path(TOKEN_FILE).read_text().strip() == answered[0]
    assert guest.out(f"stat -c '%a %U %G' {TOKEN_FILE} /etc/pulse-sensor-proxy/tls/server.key") == \
        f"640 root {ACCOUNT}\n640 root {ACCOUNT}\n"
    fingerprint = guest.out("pulse-sensor-proxy tls init --config " + CONFIG).split("fingerprint: ")[1].split()[0]
    assert f"HTTPS mode: https://{ADDRESS}:8443   certificate {fingerprint}" in result.stdout
    assert answered[0] not in result.stdout, "a registered token is not printed"
    guest.test_fingerprint = fingerprint


def test_a_client_on_the_host_reads_temperatures_over_https(guest, first_install):
    out = guest.out(f"pulse-sensor-proxy call get_temperature --node pve2 --url https://{ADDRESS}:8443 "
                    f"--token-file {TOKEN_FILE} --fingerprint {guest.test_fingerprint} --raw")
    sample = json.loads((REPO / "tests/fixtures/sensors" / NODES["pve2"][0]).read_text())
    answer = gojson.decode(gojson.decode(out)["temperature"])
    assert answer["sensors"] == sample
    assert [(d["device"], d["temperature"], d["standbySkipped"]) for d in answer["smart"]] == GUEST_DISKS
    for helper in ("pulse_https_client.py", "gojson.py"):
        shutil.copy(REPO / "tests" / helper, guest.path(f"/root/{helper}"))
    script = ("import json, sys; sys.path.insert(0, '/root'); from pulse_https_client import PulseHttpClient; "
              f"c = PulseHttpClient('https://{ADDRESS}:8443', open('{TOKEN_FILE}').read().strip()); "
              "print(json.dumps([c.temperature(n) for n in ('pve1', 'pve2', 'pve3')]))")
    replies = json.loads(guest.out(f'python3 -c "{script}"'))
    assert replies[1]["sensors"] == sample and replies[2]["sensors"] == {}


def test_http_mode_second_run_changes_nothing(guest, first_install):
    url, state = "http://127.0.0.1:7603", guest.path("/root/pulse")
    before = tree_state(guest)
    result = guest.run(f"{HTTP_INSTALL} --pulse-server {url}")
    assert "Nothing to change: everything was already in place." in result.stdout
    assert tree_state(guest) == before
    assert len((state / "requests.jsonl").read_text().splitlines()) == 1, "not registered again"


def test_uninstall_leaves_nothing_behind(guest, first_install):
    keys = [guest.out(f"cat /var/lib/pulse-sensor-proxy/{slot}/id_ed25519.pub").split()[1]
            for slot in ("ssh", "ssh.d/prev")]
    result = guest.run("bash /root/install-sensor-proxy.sh --uninstall")
    assert "kept: " in result.stdout
    assert "could not revoke" not in result.stderr
    for path in ("/etc/systemd/system/pulse-sensor-proxy.service",
                 "/etc/systemd/system/pulse-sensor-proxy-key-rotation.service",
                 "/etc/systemd/system/pulse-sensor-proxy-key-rotation.timer",
                 "/etc/systemd/system/pulse-sensor-proxy-smart.service",
                 "/etc/systemd/system/pulse-sensor-proxy-smart.timer",
                 "/usr/local/bin/pulse-sensor-proxy", "/run/pulse-sensor-proxy",
                 "/etc/pulse-sensor-proxy/http-token", "/etc/pulse-sensor-proxy/tls"):
        assert not guest.path(path).exists(), path
    assert "pulse-sensor-proxy" not in guest.out("systemctl list-units --all --no-legend 'pulse-sensor-proxy*'")
    assert guest.path("/etc/pve/lxc/105.conf").read_text() == CT105
    assert "[pre]\narch: amd64\nhostname: pulse-b\nmp0: /run/pulse-sensor-proxy,mp=/mnt/pulse-proxy\n" in \
        guest.path("/etc/pve/lxc/106.conf").read_text()
    guest.run("pct stop 105 && pct start 105")
    assert guest.path("/var/lib/pulse-sensor-proxy/ssh/id_ed25519").exists()
    for node, text in node_keys(guest).items():
        assert proxy_lines(text) == [], node
        assert not any(key in text for key in keys), node
        assert "root@pve1" in text, f"{node}: root's own key must stay"
    assert guest.out("ls -A /etc/pve/priv /home/*/.ssh | grep -c lock || true").strip() == "0"


def test_purge_then_standalone_install(guest, first_install):
    guest.run("bash /root/install-sensor-proxy.sh --uninstall --purge")
    for path in ("/var/lib/pulse-sensor-proxy", "/etc/pulse-sensor-proxy",
                 "/var/lib/pulse-sensor-proxy-smart", "/var/cache/pulse-sensor-proxy-smart"):
        assert not guest.path(path).exists(), path
    assert guest.run(f"getent passwd {ACCOUNT}", check=False).returncode == 2
    guest.run("mv /etc/pve /etc/pve.cluster && mv /usr/local/sbin/pvecm /usr/local/sbin/pvecm.off")
    try:
        result = guest.run(f"{INSTALL} --standalone")
        assert "standalone (no Proxmox VE)" in result.stdout
        assert config_subnets(guest) == [HOST_SUBNET]
        assert "needs its own proxy" in result.stdout
        assert json.loads(guest.out("pulse-sensor-proxy call get_status --raw"))["success"] is True
        guest.run("bash /root/install-sensor-proxy.sh --uninstall --purge")
    finally:
        guest.run("mv /etc/pve.cluster /etc/pve && mv /usr/local/sbin/pvecm.off /usr/local/sbin/pvecm")
