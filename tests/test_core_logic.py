"""Pure logic, tested directly: config, peers, rate limits, request parsing, metrics."""
import json
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pulse_sensor_proxy as psp
from conftest import CID, ROOT

# -- configuration ------------------------------------------------------------------------------


def test_empty_config_gives_documented_defaults():
    config = psp.validate_config(None)
    assert config["metrics_address"] == "127.0.0.1:9127"
    assert config["rate_limit"] == {"per_minute": 60, "burst": 20, "max_concurrent": 10,
                                    "per_node_per_minute": 60, "per_node_burst": 4}
    assert config["node_min_interval_seconds"] == 2
    assert config["allow_idmapped_root"] is True
    assert config["socket_path"] == "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
    assert config["allowed_peers"] == []


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(psp.ConfigError) as err:
        psp.validate_config({"alowed_peers": []}, source="c.yaml")
    assert err.value.problems == ["c.yaml: unknown key 'alowed_peers' (did you mean 'allowed_peers'?)"]


def test_every_problem_is_reported_at_once():
    with pytest.raises(psp.ConfigError) as err:
        psp.validate_config({"log_level": "loud", "metrics_address": "nowhere",
                             "rate_limit": {"burst": 0, "per_minut": 3},
                             "allowed_source_subnets": ["10.0.0.0/33"]})
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5, text
    assert "log_level: got 'loud', expected one of debug, info, warning, error" in text
    assert "metrics_address: got 'nowhere'" in text
    assert "rate_limit.burst: got 0, expected an integer >= 1" in text
    assert "rate_limit: unknown key 'per_minut' (did you mean 'per_minute'?)" in text
    assert "allowed_source_subnets: got ['10.0.0.0/33']" in text


@pytest.mark.parametrize("value, expected", [
    (["192.168.1.5"], ["192.168.1.5/32"]),
    (["fd00::1"], ["fd00::1/128"]),
    (["10.0.0.0/8", "10.0.0.0/8"], ["10.0.0.0/8"]),
    ([" 192.168.0.0/24 "], ["192.168.0.0/24"]),
])
def test_subnets_are_normalized(value, expected):
    assert psp.validate_config({"allowed_source_subnets": value})["allowed_source_subnets"] == expected


@pytest.mark.parametrize("peers, fragment", [
    ([{"uid": -1}], "allowed_peers[0].uid: got -1, expected an integer >= 0"),
    ([{"uids": "5-1"}], "allowed_peers[0].uids: got '5-1'"),
    ([{"uid": 1, "uids": "1-2"}], "allowed_peers[0]: needs exactly one of 'uid' or 'uids'"),
    ([{"uid": 1, "capabilities": ["root"]}], "allowed_peers[0].capabilities: got ['root']"),
    ([{"uid": 1, "gid": "x"}], "allowed_peers[0].gid: got 'x'"),
    ([{"uid": 1, "name": "x"}], "allowed_peers[0]: unknown key 'name'"),
    (["1001"], "allowed_peers[0]: got '1001', expected a mapping"),
    ({"uid": 1}, "allowed_peers: got {'uid': 1}, expected a list"),
])
def test_bad_peers_are_explained(peers, fragment):
    with pytest.raises(psp.ConfigError) as err:
        psp.validate_config({"allowed_peers": peers})
    assert any(fragment in p for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("value", [True, 1, "yes", None])
def test_booleans_must_be_booleans(value):
    if value is True:
        assert psp.validate_config({"allow_idmapped_root": value})["allow_idmapped_root"] is True
        return
    with pytest.raises(psp.ConfigError, match="expected true or false"):
        psp.validate_config({"allow_idmapped_root": value})


@pytest.mark.parametrize("address, ok", [
    ("127.0.0.1:9127", True), ("[::1]:9127", True), ("localhost:1", True), ("disabled", True),
    ("0.0.0.0:0", False), ("127.0.0.1:65536", False), ("example.com:80", False), (9127, False),
    ("127.0.0.1", False),
])
def test_metrics_address(address, ok):
    if ok:
        assert psp.validate_config({"metrics_address": address})["metrics_address"] == address
    else:
        with pytest.raises(psp.ConfigError):
            psp.validate_config({"metrics_address": address})


def test_top_level_must_be_a_mapping():
    with pytest.raises(psp.ConfigError, match="expected a mapping of keys at the top level, got list"):
        psp.validate_config([1, 2])


def test_yaml_errors_point_at_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("log_level: info\nallowed_peers: [\n")
    with pytest.raises(psp.ConfigError) as err:
        psp.load_config(str(path), environ={})
    assert f"{path}: line 3" in err.value.problems[0] and "invalid YAML" in err.value.problems[0]


def test_a_yaml_escape_beyond_unicode_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b'"\\U00110000"')
    with pytest.raises(psp.ConfigError) as err:
        psp.load_config(str(path), environ={})
    assert err.value.problems == [f"{path}: invalid YAML: chr() arg not in range(0x110000)"]


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("log_level: info\nlog_level: debug\n")
    with pytest.raises(psp.ConfigError, match="duplicate key 'log_level'"):
        psp.load_config(str(path), environ={})


def test_binary_and_huge_files_are_refused(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(psp.ConfigError, match="not UTF-8"):
        psp.load_config(str(binary), environ={})
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (psp.MAX_CONFIG_BYTES + 1))
    with pytest.raises(psp.ConfigError, match="larger than"):
        psp.load_config(str(huge), environ={})


def test_missing_file_means_defaults(tmp_path):
    config = psp.load_config(str(tmp_path / "absent.yaml"), environ={})
    assert config["log_level"] == "info"


def test_environment_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("allowed_source_subnets: [10.0.0.0/8]\n")
    config = psp.load_config(str(path), environ={
        psp.ENV_SOCKET: "/tmp/x.sock", psp.ENV_SSH_DIR: "/tmp/ssh",
        psp.ENV_METRICS_ADDR: "disabled", psp.ENV_ALLOWED_SUBNETS: "192.168.1.0/24, 10.0.0.0/8"})
    assert config["socket_path"] == "/tmp/x.sock"
    assert config["ssh_dir"] == "/tmp/ssh"
    assert config["metrics_address"] == "disabled"
    assert config["allowed_source_subnets"] == ["10.0.0.0/8", "192.168.1.0/24"]
    with pytest.raises(psp.ConfigError, match=r"\$PULSE_SENSOR_PROXY_METRICS_ADDR: got 'x'"):
        psp.load_config(str(path), environ={psp.ENV_METRICS_ADDR: "x"})


def test_merge_adds_once_and_keeps_everything_else():
    raw = {"log_level": "debug", "allowed_source_subnets": ["10.0.0.0/8"],
           "allowed_peers": [{"uid": 1001, "capabilities": ["read", "admin"]}]}
    merged = psp.merge_config(raw, ["10.0.0.0/8", "192.168.1.7"], ["100000-165535"])
    assert merged == {"log_level": "debug",
                      "allowed_source_subnets": ["10.0.0.0/8", "192.168.1.7/32"],
                      "allowed_peers": [{"uid": 1001, "capabilities": ["read", "admin"]},
                                        {"uids": "100000-165535", "capabilities": ["read"]}]}
    assert psp.merge_config(merged, ["192.168.1.7/32"], ["100000-165535"]) == merged
    assert raw["allowed_source_subnets"] == ["10.0.0.0/8"], "the input must not be modified"


def test_merge_gives_cleanup_to_a_range_once():
    raw = {"allowed_peers": [{"uid": 1001}, {"uids": "100000-165535", "capabilities": ["read"]}]}
    merged = psp.merge_config(raw, (), ["100000-165535"], cleanup_ranges=["100000-165535", "1001"])
    assert merged["allowed_peers"] == [{"uid": 1001, "capabilities": ["read", "cleanup"]},
                                       {"uids": "100000-165535", "capabilities": ["read", "cleanup"]}]
    assert psp.merge_config(merged, (), ["100000-165535"], cleanup_ranges=["100000-165535"]) == merged
    assert raw["allowed_peers"][1] == {"uids": "100000-165535", "capabilities": ["read"]}, \
        "the input must not be modified"
    fresh = psp.merge_config({}, (), ["200000-265535"], cleanup_ranges=["200000-265535"])
    assert fresh["allowed_peers"] == [{"uids": "200000-265535", "capabilities": ["read", "cleanup"]}]
    config = psp.validate_config(fresh)
    assert psp.peer_capabilities(200001, 200001, 999, config["allowed_peers"], []) == \
        frozenset({"read", "cleanup"})


def test_subuid_parsing():
    text = "root:100000:65536\nalice:165536:65536\nroot:200000:10\n# comment\nroot:x:1\n"
    assert psp.parse_subuid(text) == [(100000, 165535), (200000, 200009)]
    # shadow's subid lookup takes the owner by name or by uid
    assert psp.parse_subuid("0:100000:65536\n1000:300000:65536\n") == [(100000, 165535)]


# -- peers ----------------------------------------------------------------------------------------

PEERS = psp.validate_config({"allowed_peers": [
    {"uid": 1001}, {"uids": "2000-2999", "gid": 50, "capabilities": ["read", "admin"]}]})["allowed_peers"]
RANGES = [(100000, 165535)]


@pytest.mark.parametrize("uid, gid, expected", [
    (0, 0, {"read", "admin", "cleanup"}),
    (999, 999, {"read", "admin", "cleanup"}),            # the daemon's own uid in these cases
    (1001, 1001, {"read"}),
    (2500, 50, {"read", "admin", "cleanup"}),
    (2500, 51, set()),                         # gid must match when configured
    (100000, 100000, {"read"}),                # container root: read, never admin
    (165535, 0, {"read"}),
    (165536, 0, set()),
    (4242, 4242, set()),
])
def test_peer_capabilities(uid, gid, expected):
    assert psp.peer_capabilities(uid, gid, 999, PEERS, RANGES) == expected


def test_idmapped_root_off_means_no_range():
    assert psp.peer_capabilities(100000, 100000, 999, PEERS, []) == set()


# -- rate limiting --------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_burst_then_refusal_then_refill():
    clock = Clock()
    limiter = psp.RateLimiter(per_minute=20, burst=10, max_concurrent=100, clock=clock)
    peer = (1001, 42)
    assert not limiter.exhausted(peer), "an unknown peer has a full bucket"
    for _ in range(10):
        assert not limiter.exhausted(peer)
        assert limiter.acquire(peer)
        limiter.release(peer)
    assert limiter.exhausted(peer) and limiter.exhausted(peer), "exhausted() takes nothing"
    assert not limiter.acquire(peer), "the 11th request of a burst is refused"
    assert limiter.acquire((1001, 43)), "another pid has its own bucket"
    clock.now += 2.9
    assert limiter.exhausted(peer)
    assert not limiter.acquire(peer), "less than one token after 2.9 s at 20/min"
    clock.now += 0.2
    assert not limiter.exhausted(peer)
    assert limiter.acquire(peer), "one token is back after 3 s"
    limiter.release(peer)
    clock.now += 3600
    for _ in range(10):
        assert limiter.acquire(peer)
        limiter.release(peer)
    assert not limiter.acquire(peer), "refill stops at the burst size"


def test_concurrency_cap():
    limiter = psp.RateLimiter(per_minute=6000, burst=100, max_concurrent=2, clock=Clock())
    assert limiter.acquire("p") and limiter.acquire("p")
    assert not limiter.acquire("p")
    assert not limiter.exhausted("p"), "in flight is not out of tokens: no wait for that"
    limiter.release("p")
    assert limiter.acquire("p")


def test_idle_peers_are_forgotten():
    clock = Clock()
    limiter = psp.RateLimiter(per_minute=20, burst=10, max_concurrent=10, clock=clock)
    for pid in range(10_000):
        assert limiter.acquire((100000, pid))
        limiter.release((100000, pid))
    assert len(limiter.entries) <= psp.RateLimiter.MAX_ENTRIES
    clock.now += 31       # buckets are full again after burst / rate = 30 s
    limiter.acquire((1, 1))
    assert len(limiter.entries) == 1


def test_busy_peers_are_kept_while_in_flight():
    clock = Clock()
    limiter = psp.RateLimiter(per_minute=20, burst=10, max_concurrent=1, clock=clock)
    assert limiter.acquire("busy")
    clock.now += 3600
    limiter.acquire("other")
    assert not limiter.acquire("busy"), "its in-flight request still counts"


# -- requests ------------------------------------------------------------------------------------



def test_parse_a_pulse_request():
    line = json.dumps({"correlation_id": CID, "method": "get_temp", "params": {"node": "pve1"}})
    assert psp.parse_request(line.encode()) == (CID, "get_temp", {"node": "pve1"})


def test_correlation_id_is_replaced_unless_uuid():
    for bad in (None, "abc", 12, "x" * 100, {"a": 1}):
        corr, _, _ = psp.parse_request(json.dumps({"method": "m", "correlation_id": bad}).encode())
        assert corr != bad and str(psp.uuid.UUID(corr)) == corr
    assert psp.parse_request(json.dumps({"method": "m", "correlation_id": CID.upper()}).encode())[0] == CID


@pytest.mark.parametrize("line, error", [
    (b"", psp.E_EMPTY), (b"   \r", psp.E_EMPTY),
    (b"not json", psp.E_INVALID), (b"[1]", psp.E_INVALID), (b'"s"', psp.E_INVALID),
    (b'{"method": 5}', psp.E_INVALID), (b'{"params": {}}', psp.E_INVALID),
    (b'{"method": "m", "params": [1]}', psp.E_INVALID),
    (b'{"method": "m", "method": "n"}', psp.E_INVALID),
    (b'{"method": "m", "params": {"x": NaN}}', psp.E_INVALID),
    (b'{"method": "m", "params": {"x": Infinity}}', psp.E_INVALID),
    (b'{"method": "\xff"}', psp.E_INVALID),
    (b"[" * 100000 + b"]" * 100000, psp.E_INVALID),
    (b'{"method": "m", "params": {"n": ' + b"9" * 5000 + b"}}", psp.E_INVALID),
])
def test_bad_requests(line, error):
    with pytest.raises(psp.RequestError) as err:
        psp.parse_request(line)
    assert err.value.args[0] == error


def test_invalid_request_still_echoes_its_correlation_id():
    with pytest.raises(psp.RequestError) as err:
        psp.parse_request(json.dumps({"correlation_id": CID, "method": 1}).encode())
    assert (err.value.args, err.value.corr_id) == ((psp.E_INVALID,), CID)


def test_response_shape():
    ok = json.loads(psp.response_line(CID, data={"a": 1}))
    assert ok == {"correlation_id": CID, "success": True, "data": {"a": 1}}
    bad = json.loads(psp.response_line(CID, error="boom"))
    assert bad == {"correlation_id": CID, "success": False, "error": "boom"}


def test_http_statuses():
    assert psp.status_for_error(psp.E_TOO_LARGE) == 413
    assert psp.status_for_error(psp.E_INVALID) == 400
    assert psp.status_for_error(psp.E_RATE_LIMITED) == 429
    assert psp.status_for_error(psp.E_UNAUTHORIZED) == 403
    assert psp.status_for_error("ssh: host key changed for pve1") == 200


def test_call_params():
    request = psp.build_call_request("get_temp", "pve1", ["a=1", "b:=2", "c:=[1]", "d=x:=y"])
    assert request["params"] == {"a": "1", "b": 2, "c": [1], "d": "x:=y", "node": "pve1"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        psp.build_call_request("m", None, ["novalue"])
    with pytest.raises(ValueError, match="not JSON"):
        psp.build_call_request("m", None, ["k:=nope"])
    assert psp.build_call_request("m", None, [])["params"] is None


# -- metrics ------------------------------------------------------------------------------------


def test_recent_gauges_hold_what_a_counter_gained_in_the_last_ten_minutes():
    now = [6000.0]
    metrics = psp.Metrics(clock=lambda: now[0])
    metrics.declare("counter", "hits_total", "hits", ("node",))
    metrics.declare_recent("hits_total", "hits_recent", "hits lately")

    def recent():
        families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
        return {s.labels["node"]: s.value for s in families["hits_recent"].samples}

    metrics.inc("hits_total", ("n1",), 3)
    now[0] += 300
    metrics.inc("hits_total", ("n1",))
    metrics.inc("hits_total", ("n2",), 0)        # an amount of 0 only declares the series
    assert recent() == {"n1": 4.0}
    now[0] += 300                                 # the first 3 fall out of the window
    assert recent() == {"n1": 1.0}
    now[0] += 3600
    for _ in range(20):                           # slots of long ago are dropped as new ones come
        metrics.inc("hits_total", ("n1",))
        now[0] += 60
    # the window is this minute and the nine before it: this one has had none yet
    assert recent() == {"n1": 9.0} and len(metrics.recent["hits_total"][1][("n1",)]) <= 10
    assert metrics.values["hits_total"] == {("n1",): 24.0, ("n2",): 0.0}


def test_metrics_render_parses_with_prometheus_parser():
    metrics = psp.new_metrics()
    metrics.inc("pulse_proxy_rpc_requests_total", ("get_status", "success"))
    metrics.observe("pulse_proxy_rpc_latency_seconds", 0.0007, ("get_status",))
    metrics.observe("pulse_proxy_rpc_latency_seconds", 3.0, ("get_status",))
    metrics.inc("pulse_proxy_ssh_requests_total", ('we"ird\\node\n', "error"))
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    assert families["pulse_proxy_rpc_requests"].samples[0].value == 1
    hist = {(s.name, s.labels.get("le")): s.value for s in families["pulse_proxy_rpc_latency_seconds"].samples}
    assert hist[("pulse_proxy_rpc_latency_seconds_bucket", "0.001")] == 1
    assert hist[("pulse_proxy_rpc_latency_seconds_bucket", "+Inf")] == 2
    assert math.isclose(hist[("pulse_proxy_rpc_latency_seconds_sum", None)], 3.0007)
    assert families["pulse_proxy_build_info"].samples[0].labels == {"version": psp.__version__}
    node = families["pulse_proxy_ssh_requests"].samples[0].labels["node"]
    assert node == 'we"ird\\node'


def test_metric_label_values_are_bounded():
    metrics = psp.Metrics(max_label_values=3)
    metrics.declare("counter", "c_total", "c", ("node",))
    for index in range(100):
        metrics.inc("c_total", (f"n{index}",))
    assert len(metrics.values["c_total"]) == 4
    assert metrics.values["c_total"][("other",)] == 97


def test_sanitize_label():
    assert psp.sanitize_label("pve1.example.com") == "pve1.example.com"
    assert psp.sanitize_label("$(id);x") == "__id__x"
    assert len(psp.sanitize_label("a" * 500)) == 64


def test_a_method_over_the_handler_timeout_answers_timeout(monkeypatch):
    """Dispatcher.handle in-process with a method that never ends (no real method can be made to
    take 30 s without waiting 30 s)."""
    import asyncio

    async def endless(daemon, peer, params, corr_id):
        await asyncio.Event().wait()

    monkeypatch.setitem(psp.METHODS, "get_status", (psp.CAP_READ, endless))
    monkeypatch.setattr(psp, "HANDLER_TIMEOUT", 0.05)
    config = dict(psp.validate_config({"allowed_source_subnets": ["127.0.0.1"]}), config_path="x")
    peer = psp.Peer(0, 0, 1, frozenset(psp.CAPABILITIES))

    async def ask():
        daemon = psp.Daemon(config, psp.AuditLog("error"))
        request = b'{"method": "get_status"}'
        return await asyncio.wait_for(daemon.dispatcher.handle(peer, request, 0.0), 20)

    corr_id, error, reply = asyncio.run(ask())
    assert error == "timeout" and json.loads(reply)["error"] == "timeout"


def test_the_example_config_is_valid():
    config = psp.load_config(str(ROOT / "examples" / "config.yaml"), environ={})
    assert config["allowed_source_subnets"] == ["192.168.10.0/24"]


def test_the_wait_over_the_limit_is_shared_and_gives_way_at_the_cap(monkeypatch):
    """SocketListener.pause_over_limit in-process: each request of a peer over its limit waiting
    lengthens the wait (so refusals reach the loop at a bounded rate however many connections
    flood), and a waiting connection is idle, so at the connection cap it is the one that gives
    way."""
    import asyncio

    waits, all_waiting = [], []

    async def recorded_sleep(delay):
        waits.append(delay)
        if len(waits) == 3:
            all_waiting[0].set()
        await asyncio.Event().wait()        # still waiting when evicted

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    monkeypatch.setattr(psp.random, "random", lambda: 0.5)     # the jitter's middle: factor 1
    config = dict(psp.validate_config({"allowed_source_subnets": ["127.0.0.1"]}), config_path="x")
    peer = psp.Peer(100000, 100000, 4242, frozenset(psp.CAPABILITIES))

    class Writer:
        """The connection, as far as the wait and giving way use it."""
        data = b""
        task = None

        def write(self, data):
            self.data += data

        def unsent(self):
            return 0            # nothing of a reply is left unread

        def close(self):
            pass

    async def scenario():
        daemon = psp.Daemon(config, psp.AuditLog("error"))
        writers = [Writer() for _ in range(3)]
        all_waiting.append(asyncio.Event())

        async def refused_connection(writer):
            await daemon.socket.pause_over_limit(writer, peer)

        tasks = [asyncio.create_task(refused_connection(writer)) for writer in writers]
        for writer, task in zip(writers, tasks):
            writer.task = task
        await all_waiting[0].wait()
        assert waits == [psp.RATE_LIMIT_PAUSE * n for n in (1, 2, 3)]
        assert daemon.socket.pausing == 3 and list(daemon.socket.slots.waiting) == writers
        assert daemon.socket.slots.give_way()
        await asyncio.wait([tasks[0]])
        assert tasks[0].cancelled() and daemon.socket.pausing == 2
        assert json.loads(writers[0].data)["error"] == psp.E_BUSY
        assert writers[1].data == writers[2].data == b""
        for task in tasks[1:]:
            task.cancel()
        await asyncio.wait(tasks[1:])
        return daemon.socket.pausing

    assert asyncio.run(scenario()) == 0


def test_a_bug_in_a_connection_callback_costs_that_connection_only(monkeypatch, tmp_path):
    """The socket's callbacks answer get_status without a task; an exception there (a bug)
    is logged and aborts its connection, and the next connection is served."""
    import asyncio
    import io

    config = dict(psp.validate_config({"allowed_source_subnets": ["127.0.0.1"],
                                       "ssh_dir": str(tmp_path / "ssh")}), config_path="x")
    stream = io.StringIO()
    real_prepare = psp.Dispatcher.prepare
    broken = [True]

    def prepare(self, peer, line, started):
        if broken[0]:
            raise RuntimeError("a bug")
        return real_prepare(self, peer, line, started)

    monkeypatch.setattr(psp.Dispatcher, "prepare", prepare)

    async def ask(path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(json.dumps({"correlation_id": CID, "method": "get_status"}).encode() + b"\n")
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        return reply

    async def scenario():
        daemon = psp.Daemon(config, psp.AuditLog("info", stream=stream))
        path = str(tmp_path / "s.sock")
        server = await psp.start_socket_server(daemon, path)
        try:
            first = await ask(path)
            broken[0] = False
            second = await ask(path)
        finally:
            server.close()
        return first, second, daemon.socket.slots.open

    first, second, still_open = asyncio.run(scenario())
    assert first == b"", "the connection of the failed callback is cut"
    assert json.loads(second)["success"] is True
    assert still_open == 0
    failures = [json.loads(line) for line in stream.getvalue().splitlines()
                if "Connection handler failed" in line]
    assert len(failures) == 1 and "RuntimeError: a bug" in failures[0]["error"]
