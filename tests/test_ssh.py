"""get_temperature, register_nodes and ensure_cluster_keys against real OpenSSH test nodes."""
import concurrent.futures
import json
import os
import signal
import subprocess

import pytest

import pulse_sensor_proxy as psp
import gojson
from conftest import FAST_LIMITS, metric_samples, on_node, rpc, temperature, wait_for
from sshnodes import FIXTURES_DIR, make_keypair

PVE_FIXTURES = FIXTURES_DIR.parent / "pve"


def fixture_json(name):
    return json.loads((FIXTURES_DIR / f"{name}.json").read_text())


def test_temperature_over_ssh_is_the_nodes_sensors_json(cluster):
    daemon, (node,) = cluster(1)
    node.set_mode("fixture", "amd-k10temp-gpu")
    reply = temperature(daemon, "n1")
    assert reply["success"], reply
    data = reply["data"]
    assert isinstance(data["temperature"], str), "Pulse parses a string"
    assert json.loads(data["temperature"]) == fixture_json("amd-k10temp-gpu")
    assert (data["node"], data["source"], data["cached"]) == ("n1", "ssh", False)
    assert node.execs() == ["sensors -j"]
    assert daemon.rpc("get_temp", {"node": "n1"})["success"], "the alias Pulse uses"


def test_no_sensors_is_an_empty_success(cluster):
    daemon, (node,) = cluster(1)
    node.set_mode("nosensors")
    reply = temperature(daemon, "n1")
    assert reply["success"] and json.loads(reply["data"]["temperature"]) == {}


def test_one_login_serves_many_requests(cluster):
    daemon, (node,) = cluster(1)
    for _ in range(20):
        assert temperature(daemon, "n1")["success"]
    assert node.exec_count() == 20
    assert node.accepted_publickey_count() == 1


def test_restarted_sshd_is_reconnected_transparently(cluster):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, "n1")["success"]
    node.restart()
    reply = temperature(daemon, "n1")
    assert reply["success"], reply
    assert node.accepted_publickey_count() == 2


def test_from_option_excluding_us_refuses_the_key(cluster):
    daemon, (node,) = cluster(1, authorize=False)
    node.authorize(daemon.public_key, source="192.0.2.1")
    reply = temperature(daemon, "n1")
    assert not reply["success"]
    assert "permission denied (publickey) on n1" in reply["error"]
    assert node.exec_count() == 0


def test_output_over_the_cap(cluster):
    daemon, (node,) = cluster(1, ssh={"max_output_bytes": 65536})
    node.set_mode("huge", 10_000_000)
    assert temperature(daemon, "n1")["error"].startswith(on_node("n1", "sensors -j output too large"))
    node.set_mode("fixture", "intel-coretemp-nvme")
    assert temperature(daemon, "n1")["success"], "the node works again afterwards"


def test_non_json_output(cluster):
    daemon, (node,) = cluster(1)
    node.set_mode("garbage")
    assert temperature(daemon, "n1")["error"] == on_node("n1", "invalid sensors output")
    node.set_mode("exit", 3)
    assert temperature(daemon, "n1")["error"] == on_node("n1", "sensors -j exited with status 3")
    node.set_mode("fixture", "intel-coretemp-nvme")
    assert temperature(daemon, "n1")["success"]
    assert node.accepted_publickey_count() == 1, "bad output is no reason to log in again"


def test_command_timeout_leaves_other_nodes_unaffected(cluster):
    daemon, (slow, healthy) = cluster(2, ssh={"command_timeout": 1})
    slow.set_mode("sleep", 30)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(temperature, daemon, "n1")
        assert temperature(daemon, "n2")["success"]
        assert stuck.result(timeout=20)["error"] == on_node("n1", "sensors -j timed out after 1 s")


def test_tcp_that_never_speaks_ssh_fails_within_connect_timeout(cluster, tarpit, stalling_sshd):
    daemon, (healthy,) = cluster(1, ssh={"connect_timeout": 1})
    config = dict(daemon.config)
    config["nodes"] = dict(config["nodes"], pit={"host": "127.0.0.1", "port": tarpit.port},
                           stall={"host": "127.0.0.1", "port": stalling_sshd.port})
    daemon.write_config(config)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(lambda r: r.get("msg") == "Configuration reloaded", "the reload")
    healthy.authorize(daemon.public_key)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pit = pool.submit(temperature, daemon, "pit")
        stall = pool.submit(temperature, daemon, "stall")
        assert temperature(daemon, "n1")["success"], "a healthy node answers meanwhile"
        assert pit.result(timeout=20)["error"] == on_node(
            "pit", f"ssh: cannot connect to 127.0.0.1:{tarpit.port}: no SSH answer within 1 s")
        assert stall.result(timeout=20)["error"].endswith("no SSH answer within 1 s")


def test_changed_host_key_is_refused_and_counted(cluster):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, "n1")["success"]
    known_hosts = daemon.base / "state" / "known_hosts"
    assert node.host_public_key in known_hosts.read_text(), "pinned on first use"
    node.rotate_host_key()
    reply = temperature(daemon, "n1")
    assert reply["error"] == on_node("n1", "ssh: host key changed for n1")
    record = daemon.wait_log(lambda r: r.get("msg", "").startswith("HOST KEY CHANGED"), "the alarm")
    assert record["level"] == "error" and record["node"] == "n1"
    assert metric_samples(daemon)[("pulse_proxy_hostkey_changes_total", (("node", "n1"),))] == 1
    assert node.exec_count() == 1, "nothing ran on the impostor"


def test_strict_policy_trusts_only_known_hosts_files(cluster, base_dir):
    pve = base_dir / "pve"
    (pve / "priv").mkdir(parents=True)
    daemon, (known, unknown) = cluster(2, host_key_policy="strict", pve_dir=str(pve))
    assert temperature(daemon, "n2")["error"] == \
        on_node("n2", "ssh: unknown host key for n2 (host_key_policy: strict)")
    (pve / "priv" / "known_hosts").write_text(f"n1 {known.host_public_key}\n")
    assert temperature(daemon, "n1")["success"], "Proxmox's cluster file is trusted"
    assert not (daemon.base / "state" / "known_hosts").exists(), "strict never pins"


def test_cluster_per_node_host_keys_are_trusted_before_tofu(cluster, base_dir):
    """pve-cluster (Setup.pm ssh_create_node_known_hosts) writes `NODE KEY`, no final newline."""
    pve = base_dir / "pve"
    (pve / "nodes" / "n1").mkdir(parents=True)
    daemon, (node, _) = cluster(2, host_key_policy="strict", pve_dir=str(pve))
    (pve / "nodes" / "n1" / "ssh_known_hosts").write_text(f"n1 {node.host_public_key}")
    assert temperature(daemon, "n1")["success"]
    assert temperature(daemon, "n2")["error"] == 'node "n2": ssh: unknown host key for n2 (host_key_policy: strict)'
    assert not (daemon.base / "state" / "known_hosts").exists(), "nothing pinned"


def test_undecodable_cluster_line_is_skipped_with_a_warning(cluster, base_dir):
    pve = base_dir / "pve"
    (pve / "priv").mkdir(parents=True)
    daemon, (node,) = cluster(1, host_key_policy="strict", pve_dir=str(pve))
    known = pve / "priv" / "known_hosts"
    known.write_text(f"old ssh-future AAAAnotakey\nn1 {node.host_public_key}\n")
    assert temperature(daemon, "n1")["success"], "the line after the undecodable one counts"
    record = daemon.wait_log(lambda r: r.get("msg", "").startswith("Skipped a known_hosts line"),
                             "the warning")
    assert (record["path"], record["line"]) == (str(known), 1)


def test_pin_that_disagrees_with_the_cluster_is_the_changed_key_alarm(cluster, base_dir):
    pve = base_dir / "pve"
    (pve / "nodes" / "n1").mkdir(parents=True)
    daemon, (node,) = cluster(1, pve_dir=str(pve))
    assert temperature(daemon, "n1")["success"], "pinned on first use"
    node.rotate_host_key()
    (pve / "nodes" / "n1" / "ssh_known_hosts").write_text(f"n1 {node.host_public_key}")
    assert temperature(daemon, "n1")["error"] == 'node "n1": ssh: host key changed for n1'
    assert node.exec_count() == 1


@pytest.mark.parametrize("node, line", [
    (psp.Node("pve2"), "pve2"),                              # by name alone, as the original's allowed_nodes
    (psp.Node("pve2", "10.99.0.2"), "10.99.0.2"),
    (psp.Node("pve2", "pve2.lab"), "pve2.lab"),
    (psp.Node("pve2", "10.99.0.2", 2202), "[10.99.0.2]:2202"),
])
def test_known_host_keys_of_a_node_by_name_address_or_host(tmp_path, node, line):
    """A node given by name has no address yet: asyncssh takes only an IP literal as one."""
    key = " ".join(make_keypair(tmp_path).public_line.split()[:2])
    matcher, _ = psp.parse_known_hosts(f"{line} {key}\nother {key}\n")
    trusted, revoked = psp.known_host_keys(matcher, node, node.port or 22)
    assert [k.export_public_key().decode().strip() for k in trusted] == [key] and revoked == []
    assert psp.known_host_keys(matcher, psp.Node("pve3"), 22) == ([], [])


def test_corrupt_known_hosts_fails_closed(cluster):
    daemon, (node,) = cluster(1)
    (daemon.base / "state" / "known_hosts").write_text("[127.0.0.1]:1 ssh-ed25519 !!!notbase64\n")
    reply = temperature(daemon, "n1")
    assert reply["error"].startswith(on_node("n1", "ssh: cannot use ")) and node.exec_count() == 0


@pytest.mark.parametrize("name", ["a;b", "$(id)", "-oProxyCommand=x", "x" * 65, "", "pvé", "..",
                                  "a..b", ".hidden", "n1 ", "n1\n", "../etc", "[n1]"])
def test_invalid_node_names_are_refused_before_any_io(cluster, name):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, name)["error"] == \
        f'node "{psp.sanitize_label(name)}" rejected by validator: invalid node name (expected a ' \
        "host name or an IP address)"
    assert node.exec_count() == 0 and node.accepted_publickey_count() == 0


def test_non_string_node_is_invalid(cluster):
    daemon, _ = cluster(1)
    for value in (None, 5, ["n1"]):
        assert temperature(daemon, value)["error"].startswith('node "" rejected by validator')


def test_unknown_node_is_refused_in_strict_mode(cluster):
    daemon, _ = cluster(1)
    assert temperature(daemon, "pve9")["error"] == 'node "pve9" not in allowlist (known: n1)'
    assert temperature(daemon, "10.1.2.3")["error"] == 'node "10.1.2.3" not in allowlist (known: n1)'


def test_concurrent_requests_for_one_node_share_one_exec(cluster):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, "n1")["success"]         # connection made before the burst
    node.set_mode("sleep", 2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: rpc(daemon.socket, {"method": "get_temperature",
                                                             "params": {"node": "n1"}}, uid=0),
                                range(8)))
    assert all(r["success"] for r in replies), replies
    assert node.exec_count() == 2, "one run for the eight concurrent requests"


def test_breaker_opens_fails_fast_and_recovers(cluster):
    daemon, (node,) = cluster(1, breaker_cooldown_seconds=1)
    node.stop()
    errors = [temperature(daemon, "n1")["error"] for _ in range(3)]
    assert all(e.startswith(on_node("n1", f"ssh: cannot connect to 127.0.0.1:{node.port}")) for e in errors), errors
    fast = temperature(daemon, "n1")["error"]
    assert fast == on_node("n1", "unavailable (breaker open after 3 failures in a row): "
                           + errors[-1][len(on_node("n1", "")):])
    samples = metric_samples(daemon)
    assert samples[("pulse_proxy_node_breaker_open", (("node", "n1"),))] == 1
    assert samples[("pulse_proxy_node_up", (("node", "n1"),))] == 0
    node.start()
    wait_for(lambda: temperature(daemon, "n1")["success"], what="the half-open probe to succeed")
    samples = metric_samples(daemon)
    assert samples[("pulse_proxy_node_breaker_open", (("node", "n1"),))] == 0
    assert samples[("pulse_proxy_node_up", (("node", "n1"),))] == 1
    assert samples[("pulse_proxy_ssh_requests_total", (("node", "n1"), ("result", "breaker_open")))] >= 1


def test_new_key_on_disk_is_used_for_new_connections(cluster, base_dir):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, "n1")["success"]
    fresh = make_keypair(base_dir / "fresh")
    node.write_authorized_keys("")
    node.authorize(fresh.public_line)
    key = daemon.ssh_dir / "id_ed25519"
    os.replace(fresh.private_path, key)
    reply = temperature(daemon, "n1")
    assert reply["success"], reply
    assert node.accepted_publickey_count() == 2


def test_node_min_interval_answers_from_the_last_reading(cluster):
    daemon, (node,) = cluster(1, node_min_interval_seconds=3600)
    first, second = temperature(daemon, "n1"), temperature(daemon, "n1")
    assert (first["data"]["cached"], second["data"]["cached"]) == (False, True)
    assert node.exec_count() == 1


def test_local_node_reads_sensors_without_ssh(daemon):
    reply = temperature(daemon, "localhost")
    assert reply["success"], reply
    assert reply["data"]["source"] == "local"
    assert isinstance(json.loads(reply["data"]["temperature"]), dict)


def test_register_nodes_and_ensure_cluster_keys(cluster):
    daemon, (good, missing) = cluster(2, authorize=False)
    good.authorize(daemon.public_key)
    registered = daemon.rpc("register_nodes")["data"]["nodes"]
    assert [(n["name"], n["ssh_ready"]) for n in registered] == [("n1", True), ("n2", False)]
    assert "permission denied" in registered[1]["error"]

    data = daemon.rpc("ensure_cluster_keys")["data"]
    assert (data["success_count"], data["total_count"]) == (1, 2)
    assert data["results"]["n1"] == {"success": True}
    assert "run `pulse-sensor-proxy keys push` as root" in data["results"]["n2"]["error"]
    assert data["authorized_key"] == (
        'from="127.0.0.1/32",command="sensors -j",restrict,no-port-forwarding,'
        "no-X11-forwarding,no-agent-forwarding,no-pty "
        + " ".join(daemon.public_key.split()[:2]) + " pulse-sensor-proxy")


def test_ensure_cluster_keys_is_admin_only(cluster):
    daemon, _ = cluster(1, allowed_peers=[{"uid": 1001}])
    assert rpc(daemon.socket, {"method": "register_nodes"}, uid=1001)["success"]
    assert rpc(daemon.socket, {"method": "ensure_cluster_keys"}, uid=1001)["error"] == \
        "method requires admin capability"


def test_members_file_is_the_inventory(daemon_factory, base_dir, ssh_node):
    pve = base_dir / "pve"
    pve.mkdir()
    members = {"nodename": "pve1", "version": 7,
               "cluster": {"name": "lab", "version": 3, "nodes": 2, "quorate": 1},
               "nodelist": {"pve1": {"id": 1, "online": 1, "ip": "192.0.2.11"},
                            "pve2": {"id": 2, "online": 1, "ip": "127.0.0.1"}}}
    (pve / ".members").write_text(json.dumps(members))
    daemon = daemon_factory({"pve_dir": str(pve), "rate_limit": FAST_LIMITS,
                             "ssh": {"port": ssh_node.port, "user": ssh_node.user}})
    ssh_node.authorize((daemon.ssh_dir / "id_ed25519.pub").read_text())
    reply = temperature(daemon, "127.0.0.1")
    assert reply["success"] and reply["data"]["source"] == "ssh", "by address: pve2 over SSH"
    assert temperature(daemon, "pve2")["success"]
    assert temperature(daemon, "pve3")["error"] == 'node "pve3" not in allowlist (known: pve1, pve2)'


# -- parsing of Proxmox's node sources (fixtures in their real formats) --------------------------

PVECM_NODES = """
Membership information
----------------------
    Nodeid      Votes Name
         1          1 pve1 (local)
         2          1 pve2
         3          1 pve3.example.com
"""


def test_parse_pvecm_nodes():
    local, nodes = psp.parse_pvecm_nodes(PVECM_NODES)
    assert local == "pve1"
    assert [n.name for n in nodes] == ["pve1", "pve2", "pve3.example.com"]


@pytest.mark.parametrize("fixture, local, names", [
    ("plain.txt", "pve1", ["pve1", "pve2", "pve3.example.com"]),
    ("qdevice.txt", "pve1", ["pve1", "pve2"]),
    ("hex-votes.txt", "192.0.2.11", ["192.0.2.11", "pve2"]),
    ("not-root.txt", None, []),
    ("no-cluster.txt", None, []),
])
def test_parse_pvecm_nodes_in_every_shape(fixture, local, names):
    text = (PVE_FIXTURES / "pvecm" / fixture).read_text()
    found_local, nodes = psp.parse_pvecm_nodes(text)
    assert (found_local, [n.name for n in nodes]) == (local, names)
    assert "Qdevice" not in [n.name for n in nodes]


@pytest.mark.parametrize("fixture, local, nodes", [
    ("cluster.json", "pve1",
     [("pve1", "192.0.2.11"), ("pve2", "192.0.2.12"), ("pve3", "192.0.2.13")]),
    ("node-without-ip.json", "pve2", [("pve1", "pve1"), ("pve2", "192.0.2.12")]),
    ("standalone.json", "pve", [("pve", "pve")]),
])
def test_parse_members_as_pmxcfs_writes_it(fixture, local, nodes):
    found_local, found = psp.parse_members((PVE_FIXTURES / "members" / fixture).read_text())
    assert (found_local, [(n.name, n.host) for n in found]) == (local, nodes)


def test_parse_members():
    local, nodes = psp.parse_members(json.dumps({
        "nodename": "pve2", "version": 12,
        "nodelist": {"pve1": {"id": 1, "online": 1, "ip": "10.0.0.1"},
                     "pve2": {"id": 2, "online": 0, "ip": "fd00::2"},
                     "bad;name": {"id": 3, "online": 1, "ip": "10.0.0.3"}}}))
    assert local == "pve2"
    assert [(n.name, n.host) for n in nodes] == [("pve1", "10.0.0.1"), ("pve2", "fd00::2")]
    standalone = psp.parse_members('{"nodename": "solo", "version": 1}')
    assert standalone[0] == "solo" and [n.name for n in standalone[1]] == ["solo"]
    with pytest.raises(ValueError):
        psp.parse_members("[]")


def test_resolve_node_order():
    nodes = [psp.Node("pve1", "10.0.0.1"), psp.Node("pve2", "10.0.0.2", local=True)]
    assert psp.resolve_node("PVE1", nodes, set(), True).name == "pve1"
    assert psp.resolve_node("10.0.0.2", nodes, set(), True).name == "pve2"
    assert psp.resolve_node("localhost", nodes, {"localhost"}, True).name == "pve2"
    assert psp.resolve_node("other", nodes, set(), False).host == "other"
    assert psp.resolve_node("OTHER", nodes, set(), False).name == "other"
    with pytest.raises(psp.RequestError, match='node "other" not in allowlist \\(known: pve1, pve2\\)'):
        psp.resolve_node("other", nodes, set(), True)


def test_every_name_of_this_host_is_one_node():
    remote = [psp.Node("pve1", "10.0.0.1")]
    names = {"localhost", "127.0.0.1", "pve9"}
    spellings = ["localhost", "LOCALHOST", "LocalHost", "127.0.0.1", "PVE9", "pve9"]
    resolved = {psp.resolve_node(psp.requested_node(s), remote, names, True, "pve9").name
                for s in spellings}
    assert resolved == {"pve9"}
    for dotted in ("localhost.", "LOCALHOST.", "pve9."):
        with pytest.raises(psp.RequestError, match="rejected by validator"):
            psp.requested_node(dotted)


@pytest.mark.parametrize("value, expected", [
    ("pve1", "pve1"), ("pve-1.example.com", "pve-1.example.com"), ("192.168.1.10", "192.168.1.10"),
    ("[fd00::1]", "fd00::1"), ("FD00:0::1", "fd00::1"), ("_x", "_x"), ("a" * 64, "a" * 64),
])
def test_valid_node_names(value, expected):
    assert psp.validate_node_name(value) == expected


def test_sensors_output_interpretation():
    no_sensors = (FIXTURES_DIR / "no-sensors.json").read_bytes()
    assert psp.interpret_sensors_output(no_sensors, b"No sensors found!\n", 1) == ("{\n\n}", [])
    with pytest.raises(psp.NodeError, match="exited with status 1: boom"):
        psp.interpret_sensors_output(b"{}", b"boom\n", 1)
    with pytest.raises(psp.NodeError, match="invalid sensors output"):
        psp.interpret_sensors_output(b"[1, 2]", b"", 0)
    with pytest.raises(psp.NodeError, match="without an exit status"):
        psp.interpret_sensors_output(b"{}", b"", None)


LM_SENSORS = FIXTURES_DIR / "lm-sensors"


@pytest.mark.parametrize("fixture, repairs", [
    ("3.6.0-valid.json", []), ("3.6.0-empty-chip.txt", ["empty_chip"]),
    ("3.6.0-write-only.txt", ["write_only_label"]), ("3.6.2-compact.json", []),
    ("3.6.2-nan.txt", ["non_finite"]),
])
def test_sensors_output_of_each_lm_sensors_version(fixture, repairs):
    text, made = psp.interpret_sensors_output((LM_SENSORS / fixture).read_bytes(), b"", 0)
    assert made == repairs
    decoded = gojson.decode(text)
    composite = decoded["nvme-pci-0200"]["Composite"]
    assert composite["temp1_input"] == 36.85 and composite["temp1_max"] == 81.85
    if fixture == "3.6.2-nan.txt":
        assert composite["temp1_min"] is None
    if fixture == "3.6.0-empty-chip.txt":
        assert decoded["nvme-pci-0100"] == {"Adapter": "PCI adapter"}


def test_a_repaired_output_is_served_and_counted_per_node_and_repair(cluster):
    daemon, (node, healthy) = cluster(2)
    node.set_mode("fixture", LM_SENSORS / "3.6.0-empty-chip.txt")
    for _ in range(2):
        reply = temperature(daemon, "n1")
        assert reply["success"], reply
        assert gojson.decode(reply["data"]["temperature"])["nvme-pci-0100"] == \
            {"Adapter": "PCI adapter"}
    assert temperature(daemon, "n2")["success"]
    counted = {labels: value for (name, labels), value in metric_samples(daemon).items()
               if name == "pulse_proxy_sensors_repairs_total"}
    assert counted == {(("node", "n1"), ("repair", "empty_chip")): 2}


@pytest.mark.parametrize("raw", [
    (LM_SENSORS / "3.6.0-other-damage.txt").read_bytes(),
    b'{"a":{"Adapter": "x",\n   "b": 1,}}',
    b'{"chip":{"f":{"temp1_input": 36.850(Composite)}}}',     # not at lm-sensors' indentation
    b'{"chip":{"f":{"temp1_input": 1.5}}} trailing',
])
def test_sensors_output_other_damage_still_fails(raw):
    with pytest.raises(psp.OutputError, match="^invalid sensors output$"):
        psp.interpret_sensors_output(raw, b"", 0)


def test_sensors_output_repeated_label_keeps_the_last_value():
    raw = b'{"c":{"Core 0":{"t": 1.0},"Core 0":{"t": 2.0}}}'
    text, made = psp.interpret_sensors_output(raw, b"", 0)
    assert made == ["duplicate_key"] and gojson.decode(text) == {"c": {"Core 0": {"t": 2.0}}}


def test_sensors_output_numbers_beyond_float64_become_null():
    huge = "1" + "0" * 400
    raw = f'{{"c":{{"f":{{"temp1_input": 1e400, "temp1_max": -{huge}, "temp1_crit": 1e308}}}}}}'
    text, made = psp.interpret_sensors_output(raw.encode(), b"", 0)
    assert made == ["non_finite"]
    assert gojson.decode(text) == {"c": {"f": {"temp1_input": None, "temp1_max": None,
                                               "temp1_crit": 1e308}}}


@pytest.mark.parametrize("literal, kept", [
    ("9" * 308, True), ("9" * 309, False), ("9" * 308 + ".5", True), ("9" * 309 + ".5", False),
    ("1.797e308", True), ("1.798e308", False), ("36.850", True), ("-0", True),
])
def test_sensors_output_numbers_at_the_float64_edge(literal, kept):
    """Whatever way a number is read, what is handed on is what Go's float64 holds, or null."""
    text, made = psp.interpret_sensors_output(f'{{"c":{{"f":{{"t": {literal}}}}}}}'.encode(), b"", 0)
    value = gojson.decode(text)["c"]["f"]["t"]
    assert (float(value) == float(literal) and made == []) if kept else (value is None and made == ["non_finite"])


def test_go_decoder_helper_is_strict():
    for text in ('{"a": NaN}', '{"a": Infinity}', '{"a": 1,}', '{"a": 1, "a": 2}', "[1,]",
                 '{"a": 1e400}', '{"a": -1e309}', '{"a": 1' + "0" * 400 + "}"):
        with pytest.raises(gojson.GoDecodeError):
            gojson.decode(text)
    assert gojson.decode('{"a": [1, null]}') == {"a": [1, None]}


def test_config_for_nodes_is_validated():
    with pytest.raises(psp.ConfigError) as err:
        psp.validate_config({"nodes": {"a;b": {}, "ok": {"host": "$(id)", "port": 0, "usr": "x"}},
                             "ssh": {"connect_timeout": 0, "max_output_bytes": 10},
                             "host_key_policy": "yolo"})
    text = "\n".join(err.value.problems)
    for fragment in ("nodes: 'a;b' is not a valid node name", "nodes.ok.host: got '$(id)'",
                     "nodes.ok.port: got 0", "nodes.ok: unknown key 'usr' (did you mean 'user'?)",
                     "ssh.connect_timeout: got 0, expected a number > 0",
                     "ssh.max_output_bytes: got 10, expected an integer >= 1024",
                     "host_key_policy: got 'yolo', expected tofu or strict"):
        assert fragment in text, text


def test_http_form_waits_for_a_slow_node_beyond_the_read_timeout(cluster):
    """The 5 s read timeout is for the request to arrive, not for the answer."""
    daemon, (node,) = cluster(1, ssh={"command_timeout": 15})
    node.set_mode("sleep", 6)
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "30", "--unix-socket", str(daemon.socket),
                          "-d", '{"method":"get_temperature","params":{"node":"n1"}}',
                          "http://localhost/"], capture_output=True, timeout=60).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), out
    assert json.loads(body)["success"] is True


def test_sigterm_lets_an_in_flight_request_finish(cluster):
    daemon, (node,) = cluster(1)
    assert temperature(daemon, "n1")["success"]
    node.set_mode("sleep", 2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(temperature, daemon, "n1")
        wait_for(lambda: node.exec_count() == 2, what="the request to reach the node")
        daemon.proc.send_signal(signal.SIGTERM)
        assert pending.result(timeout=30)["success"], "answered before the daemon exits"
    assert daemon.proc.wait(timeout=30) == 0
    assert not daemon.socket.exists()
