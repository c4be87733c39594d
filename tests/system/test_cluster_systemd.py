"""The cluster as a real Proxmox host serves it, under a booted systemd (see guest.py): no
`nodes:` in the config, /etc/pve in pmxcfs's modes and owners, each node's host key only in
nodes/<node>/ssh_known_hosts (RSA, no final newline), pvecm refusing anyone but root. Every
remote node is reached as `.members` alone allows: root on port 22 of the address listed there.

The tests run in file order against one guest: install, serve the members, a node joins, a
clean-up request takes the key off one node.
"""
import json

import pytest

import gojson
import pulse_sensor_proxy as psp
from conftest import wait_for
from guest import (FIXTURES, GUEST_DISKS, GUEST_INSTALLER, GUEST_PYZ, LOCAL_NODE, NODE_ADDRESSES,
                   NODES, REMOTE_NODES, ROOT_KEY_FILES, booted_guest, node_root_home)
from pulse_temperature import parse_temperature

ACCOUNT = "pulse-sensor-proxy"
CONFIG = "/etc/pulse-sensor-proxy/config.yaml"
PINS = "/var/lib/pulse-sensor-proxy/known_hosts"
AS_ACCOUNT = f"setpriv --reuid {ACCOUNT} --regid {ACCOUNT} --init-groups"
# A Proxmox VE 9 node (lm-sensors 3.6.2, which prints NaN), running before it joins the cluster.
JOINING = "pve4"
JOINING_ADDRESS = "10.99.0.4"
JOINING_SAMPLE = "lm-sensors/3.6.2-nan.txt"


@pytest.fixture(scope="module")
def guest():
    with booted_guest(lambda machine: machine.add_node(JOINING, JOINING_SAMPLE, JOINING_ADDRESS)) \
            as machine:
        yield machine


@pytest.fixture(scope="module")
def installed(guest):
    result = guest.run(f"bash {GUEST_INSTALLER} --pyz {GUEST_PYZ} --standalone")
    guest.main_pid = service_pid(guest)
    return result


def service_pid(guest):
    return guest.out(f"systemctl show -p MainPID --value {ACCOUNT}").strip()


def call(guest, method, node=None):
    """One request through the daemon's socket; the answer decoded as Pulse's Go client does."""
    command = f"pulse-sensor-proxy call {method} --raw" + (f" --node {node}" if node else "")
    return gojson.check_reply(guest.run(command, check=False).stdout)


def temperature(guest, node):
    """(sensors part, [(device, temperature, standbySkipped)]) of a node's answer, as Pulse
    reads it (the default config has disk temperatures on)."""
    reply = call(guest, "get_temperature", node)
    assert reply["success"], reply
    sensors, _, wrapped = parse_temperature(reply["data"]["temperature"])
    assert wrapped, reply
    disks = gojson.decode(reply["data"]["temperature"])["smart"]
    return sensors, [(d["device"], d["temperature"], d["standbySkipped"]) for d in disks]


def sample(name):
    """A sensors sample as lm-sensors meant it: an unreadable value (NaN) is none."""
    return json.loads((FIXTURES / "sensors" / name).read_text(), parse_constant=lambda _: None)


def assert_nothing_pinned(guest):
    """Every host key came from the cluster's files: trust on first use never ran."""
    assert not guest.path(PINS).exists(), guest.path(PINS).read_text()
    assert "Pinned host key" not in guest.out(f"journalctl -u {ACCOUNT} -o cat")


def test_pvecm_refuses_the_service_account_as_proxmox_does(guest, installed):
    # pve-cluster's PVE::CLI::pvecm setup_environment -> pve-common's PVE::RESTEnvironment
    # setup_default_cli_env: die "please run as root\n" for any effective uid but 0.
    refused = guest.run(f"{AS_ACCOUNT} pvecm nodes", check=False)
    assert refused.returncode != 0
    assert (refused.stdout, refused.stderr) == ("", "please run as root\n")
    assert "pve3" in guest.out("pvecm nodes")


def test_the_config_names_no_nodes(guest, installed):
    assert "nodes:" not in guest.path(CONFIG).read_text()


def test_the_account_reads_the_members_but_not_priv(guest, installed):
    assert "www-data" in guest.out(f"id -nG {ACCOUNT}").split()
    assert guest.out("stat -c '%a %U %G' /etc/pve/.members /etc/pve/priv") == \
        "440 root www-data\n700 root root\n"
    guest.run(f"{AS_ACCOUNT} cat /etc/pve/.members >/dev/null")
    assert guest.run(f"{AS_ACCOUNT} cat /etc/pve/priv/known_hosts", check=False).returncode == 1


def test_keys_push_reached_each_nodes_own_root(guest, installed):
    line = call(guest, "ensure_cluster_keys")["data"]["authorized_key"]
    assert line.startswith(f'from="10.99.0.1/32",command="{psp.SMART_PROGRAM}",restrict,')
    for node in NODES:
        assert line in guest.path(ROOT_KEY_FILES[node]).read_text().splitlines(), node


def test_register_nodes_lists_every_member(guest, installed):
    reply = call(guest, "register_nodes")
    assert reply["success"], reply
    assert [(n["name"], n["host"], n["source"], n["ssh_ready"]) for n in reply["data"]["nodes"]] == \
        [(node, NODE_ADDRESSES[node], "local" if node == LOCAL_NODE else "ssh", True)
         for node in NODES]


def test_get_temperature_reads_the_remote_members_with_their_disks(guest, installed):
    for node in REMOTE_NODES:
        assert temperature(guest, node) == (sample(NODES[node][0]), GUEST_DISKS), node
    assert_nothing_pinned(guest)


def test_a_node_that_joins_is_served_without_a_restart(guest, installed):
    refused = call(guest, "get_temperature", JOINING)
    assert not refused["success"] and "not in allowlist" in refused["error"], refused
    # What pmxcfs shows once `pvecm add` ran on the new node: its host key, then the membership.
    guest.publish_host_key(JOINING)
    guest.members([*NODES, JOINING], version=8)
    push = guest.run("pulse-sensor-proxy keys push")
    key = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub").split()[1]
    assert key in guest.path(f"{node_root_home(JOINING)}/.ssh/authorized_keys").read_text(), \
        push.stdout + push.stderr

    def served():
        reply = call(guest, "get_temperature", JOINING)
        return reply if reply["success"] else None

    wait_for(served, timeout=60, what=f"{JOINING} served after it joined .members")
    assert temperature(guest, JOINING) == (sample(JOINING_SAMPLE), GUEST_DISKS)
    assert [n["name"] for n in call(guest, "register_nodes")["data"]["nodes"]] == [*NODES, JOINING]
    assert service_pid(guest) == guest.main_pid, "the daemon was restarted"
    assert_nothing_pinned(guest)


def test_request_cleanup_revokes_the_key_on_that_node_only(guest, installed):
    # Pulse's request_cleanup from root: the daemon only writes the request; the .path unit
    # starts the root oneshot, which takes the proxy's line off pve2's authorized_keys.
    key = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub").split()[1]
    files = {**{node: guest.path(ROOT_KEY_FILES[node]) for node in NODES},
             JOINING: guest.path(f"{node_root_home(JOINING)}/.ssh/authorized_keys")}
    before = {node: path.read_bytes() for node, path in files.items()}
    assert key.encode() in before["pve2"]
    guest.run("systemctl is-active --quiet pulse-sensor-proxy-cleanup.path")
    reply = gojson.check_reply(guest.out(
        "pulse-sensor-proxy call request_cleanup --param host=pve2 --param reason=test --raw"))
    assert reply["success"] and reply["data"] == {"queued": True}, reply
    request = guest.path("/var/lib/pulse-sensor-proxy/cleanup-request.json")

    def done():
        # the oneshot is activating while it works: the key may be gone before it has finished
        state = guest.out("systemctl show -p ActiveState --value pulse-sensor-proxy-cleanup.service")
        return state == "inactive\n" and key.encode() not in files["pve2"].read_bytes()

    wait_for(done, timeout=60, what="the cleanup unit removing the key from pve2, then ending")
    assert not request.exists()
    kept = b"".join(line for line in before["pve2"].splitlines(keepends=True)
                    if key.encode() not in line)
    assert files["pve2"].read_bytes() == kept
    assert kept.startswith(b"ssh-ed25519 ") and b"root@pve1" in kept  # root's own line stays
    for node in files.keys() - {"pve2"}:
        assert files[node].read_bytes() == before[node], node
    assert not guest.path("/var/lib/pulse-sensor-proxy/cleanup-request.json.processing").exists()
    journal = guest.out("journalctl -u pulse-sensor-proxy-cleanup.service -o cat")
    assert "pve2" in journal, journal
    assert guest.out("systemctl show -p Result --value pulse-sensor-proxy-cleanup.service") == \
        "success\n"


def test_a_request_queued_while_the_path_unit_was_stopped_is_acted_on_at_its_start(guest, installed):
    key = guest.out("cat /var/lib/pulse-sensor-proxy/ssh/id_ed25519.pub").split()[1]
    pve3 = guest.path(ROOT_KEY_FILES["pve3"])
    assert key in pve3.read_text()
    guest.run("systemctl stop pulse-sensor-proxy-cleanup.path")
    reply = gojson.check_reply(guest.out(
        "pulse-sensor-proxy call request_cleanup --param host=pve3 --raw"))
    assert reply["success"], reply
    request = guest.path("/var/lib/pulse-sensor-proxy/cleanup-request.json")
    assert request.exists() and key in pve3.read_text()   # nothing watches it: nothing acted
    guest.run("systemctl start pulse-sensor-proxy-cleanup.path")   # as at the next boot
    wait_for(lambda: key not in pve3.read_text(), timeout=60,
             what="the request acted on once the path unit started")
