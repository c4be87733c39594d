"""The daemon against Pulse's client as it ships (v4.25 through v5.0.17): its error classes.

`pulse_client.py` models that client from issue 11's description; docs/protocol.md's error table
promises a class for every error; here the errors the daemon really produces (from real sshd
nodes, real sockets and peers) are put through the model and held to that promise.
"""
import re

import pytest

import pulse_sensor_proxy as psp
import pulse_client as pulse
from conftest import READER_UID, ROOT, rpc, send_raw, temperature

PER_NODE = pulse.NODE


def documented_error_table():
    """[(regex for the error, class number)] from docs/protocol.md's error table."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (\d) [a-z ]+ \|", text, re.MULTILINE)
    assert len(rows) >= 10, "the protocol's error table not found"
    table = []
    for pattern, kind in rows:
        parts = re.split(r"<[a-z]+>", pattern)
        table.append((re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL), int(kind)))
    return table


def promised_class(error, table):
    matches = {kind for regex, kind in table if regex.fullmatch(error)}
    assert len(matches) == 1, f"the error table has {len(matches)} classes for {error!r}"
    return matches.pop()


@pytest.mark.parametrize("error, kind", [
    ('node "a" said: rate limit', pulse.NODE), ("rate limit exceeded", pulse.RATE),
    ("Rate Limit", pulse.RATE), ("unauthorized", pulse.AUTH), ("unauthorized peer", pulse.OTHER),
    ("needs admin capability", pulse.AUTH), ("SSH down", pulse.SSH), ("read timeout", pulse.SSH),
    ("connection lost", pulse.SSH), ("sensors failed", pulse.SENSOR), ("unknown node", pulse.OTHER),
    ("forbidden: method requires admin", pulse.OTHER), ("no temperature", pulse.SENSOR),
])
def test_the_model_sorts_as_the_issue_describes(error, kind):
    assert pulse.classify(error) == kind


def node_errors(cluster):
    """{what: the error the daemon answered} for every way one node can fail, for real."""
    daemon, nodes = cluster(6, authorize=False, ssh={"connect_timeout": 3, "command_timeout": 1,
                                                     "max_output_bytes": 1024 * 1024},
                            breaker_cooldown_seconds=600)
    timed_out, no_key, down, failing, garbage, huge = nodes
    for node in (timed_out, down, failing, garbage, huge):
        node.authorize(daemon.public_key)
    errors = {}
    assert temperature(daemon, "n1")["success"]         # pins n1's host key
    timed_out.set_mode("sleep", 5)
    errors["sensors timed out"] = temperature(daemon, "n1")["error"]
    timed_out.set_mode("fixture", "intel-coretemp-nvme")
    timed_out.rotate_host_key()
    errors["host key changed"] = temperature(daemon, "n1")["error"]
    errors["key not installed"] = temperature(daemon, "n2")["error"]
    down.stop()
    errors["ssh down"] = temperature(daemon, "n3")["error"]
    for _ in range(psp.BREAKER_THRESHOLD - 1):
        temperature(daemon, "n3")
    errors["breaker open"] = temperature(daemon, "n3")["error"]
    failing.set_mode("exit", 3)
    errors["sensors failed"] = temperature(daemon, "n4")["error"]
    garbage.set_mode("garbage")
    errors["invalid output"] = temperature(daemon, "n5")["error"]
    huge.set_mode("huge", 2 * 1024 * 1024)
    errors["output too large"] = temperature(daemon, "n6")["error"]
    errors["unknown node"] = temperature(daemon, "pve9")["error"]
    errors["invalid name"] = temperature(daemon, "a;b")["error"]
    errors["no name"] = temperature(daemon, None)["error"]
    return daemon, errors


def wire_errors(daemon):
    """{what: error} for what the socket answers before any method runs."""
    errors = {"not JSON": rpc(daemon.socket, "{nope")["error"],
              "empty line": send_raw(daemon.socket, b"\n", shutdown=True),
              "unknown method": daemon.rpc("frobnicate")["error"],
              "read-only peer, admin method": daemon.rpc("ensure_cluster_keys", uid=READER_UID)["error"],
              "no capability": daemon.rpc("get_status", uid=4242)["error"]}
    errors["empty line"] = psp.E_EMPTY if psp.E_EMPTY.encode() in errors["empty line"] else "?"
    return errors


def test_every_error_lands_in_the_class_the_protocol_promises(cluster):
    daemon, per_node = node_errors(cluster)
    table = documented_error_table()
    for what, error in per_node.items():
        kind = pulse.classify(error)
        print(f"{kind} {what}: {error}")
        assert kind == promised_class(error, table), (what, error)
        assert kind == PER_NODE, f"{what}: {error!r} is class {kind}, not a node error"
    # The wire's fixed strings: every one the daemon has, each as the protocol promises it.
    fixed = set(psp.ERROR_RESULTS) | {psp.E_INTERNAL}
    for error in fixed:
        kind = pulse.classify(error)
        print(f"{kind} {error}")
        assert kind == promised_class(error, table), error
    assert {e for e in fixed if pulse.classify(e) in pulse.TRANSPORT - {pulse.OTHER}} == \
        {psp.E_RATE_LIMITED}, "rate limit exceeded is the one error that stops every node"


def test_peer_errors_on_the_socket_are_as_documented(cluster):
    daemon, _ = cluster(1, allowed_peers=[{"uid": READER_UID}])
    table = documented_error_table()
    for what, error in wire_errors(daemon).items():
        assert error in psp.ERROR_RESULTS, (what, error)
        assert pulse.classify(error) == promised_class(error, table), (what, error)
    assert pulse.classify(daemon.rpc("ensure_cluster_keys", uid=READER_UID)["error"]) == pulse.AUTH
    assert pulse.classify(daemon.rpc("get_status", uid=4242)["error"]) == pulse.AUTH


def test_node_text_cannot_say_rate_limit():
    error = psp.node_error_text("pve1", "sensors -j exited with status 1: Rate limit reached")
    assert pulse.classify(error) == pulse.NODE and "rate limit" not in error.lower()




# -- names as Pulse sends them: the host part of the node's API URL ------------------------------

def test_fqdn_address_and_resolved_names_reach_the_node(cluster):
    daemon, (node,) = cluster(1, local_sensors=False)       # so `localhost` is not this host
    for sent in ("n1", "N1", "n1.example.lan", "127.0.0.1", "localhost"):
        reply = temperature(daemon, sent)
        assert reply["success"] and reply["data"]["source"] == "ssh", (sent, reply)
    assert node.exec_count() == 5
    for sent in ("n2.example.lan", "no-such-node.invalid", "10.9.8.7"):
        assert temperature(daemon, sent)["error"] == f'node "{sent}" not in allowlist (known: n1)'


def test_resolution_is_cached_bounded_and_matches_only_addresses():
    import asyncio
    clock = [0.0]
    names = psp.NameResolver(clock=lambda: clock[0])
    inventory = [psp.Node("pve1", "127.0.0.1"), psp.Node("pve2", "pve2.example.lan")]
    found = asyncio.run(names.addresses("localhost"))
    assert "127.0.0.1" in found and psp.node_at(found, inventory).name == "pve1"
    assert asyncio.run(names.addresses("no-such-node.invalid")) == frozenset()
    names.cache["localhost"] = (clock[0] + 1, frozenset({"192.0.2.9"}))
    assert asyncio.run(names.addresses("localhost")) == {"192.0.2.9"}, "answered from the cache"
    clock[0] += 2
    assert "127.0.0.1" in asyncio.run(names.addresses("localhost")), "looked up again after the TTL"
    for index in range(psp.NameResolver.MAX_NAMES + 10):
        names.cache[f"n{index}"] = (clock[0] + 100, frozenset())
    asyncio.run(names.addresses("another-name.invalid"))     # a new name: the table is full
    assert len(names.cache) <= psp.NameResolver.MAX_NAMES
