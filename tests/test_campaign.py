"""The hostile-input campaign: fuzzing, floods, slow clients, bad configuration, resource bounds.

Every suite is seeded and bounded. The default counts fit CI; `pytest --long` (or PSP_LONG=1)
raises them to the figures published in docs/reliability.md. Timing figures live in
bench/bench_campaign.py; here only what must hold is asserted.
"""
import json
import os
import selectors
import signal
import socket
import subprocess
import time
import uuid

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

import gojson
import request_oracle as oracle
import pulse_sensor_proxy as psp
from conftest import (CID, MODULE, PYTHON, READER_UID, ROOT, STRANGER_UID, as_uid, fd_count, free_port,
                      metric_samples, rpc, run_cli, send_raw, wait_for)

OPEN_LIMITS = {"per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 1000}
VALID = b'{"correlation_id":"%s","method":"get_status","params":null}' % CID.encode()
ERRORS = set(psp.ERROR_RESULTS)


def seeded(examples):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def unlabelled(daemon, name):
    return metric_samples(daemon)[(name, ())]


def assert_no_tracebacks(daemon):
    text = daemon.log_text()
    assert "Traceback" not in text, text[text.find("Traceback") - 500:][:3000]
    failures = [r for r in daemon.log_records() if r.get("level") == "error"
                and not r["msg"].startswith("Reload failed")]
    assert not failures, failures[:3]


# -- 1. request fuzzing ---------------------------------------------------------------------------

METHOD_NAMES = sorted(psp.METHODS) + sorted(psp.METHOD_ALIASES) + [
    "", "GET_STATUS", "get_status ", "__class__", "rm -rf /", "get_status\x00"]
# Tokens the mutator splices into valid requests: every class of input the issue names.
SPECIALS = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999999", b"-0", b"9" * 4300, b"9" * 5000, b"0.1e-999999",
    b"[" * 100, b"[" * 20000, b'{"a":' * 1000, b"\x00", b"\\u0000", b"\\ud800", b"\\udfff\\ud800",
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xf4\x90\x80\x80",
    b'"method":"get_status",', b'"method":"nope",', b'"params":{},', b'"params":[],',
    b'"correlation_id":"x",', b"\n", b"\r", b"\r\n", b"\t\x0b\x0c ", b'"', b"\\", b"}", b"]", b",",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", b"GET /metrics HTTP/1.0\r\n\r\n",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


@st.composite
def request_objects(draw):
    """JSON documents shaped like requests, with every field possibly of the wrong type."""
    obj = {}
    if draw(st.booleans()):
        obj["correlation_id"] = draw(st.uuids().map(str) | json_values)
    if draw(st.integers(0, 9)):
        obj["method"] = draw(st.sampled_from(METHOD_NAMES) | json_values)
    if draw(st.booleans()):
        obj["params"] = draw(st.none() | json_values | st.dictionaries(
            st.sampled_from(["node", "pad"]) | st.text(max_size=8), json_values, max_size=4))
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))   # NaN/Infinity for float specials
    return text.encode("utf-8", "surrogatepass")               # lone surrogates: invalid UTF-8


@st.composite
def mutated_requests(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("flip", "insert", "delete", "repeat", "truncate")))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(SPECIALS) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 16))] * draw(st.integers(2, 500))
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def sized_line(size):
    """A valid get_status request exactly `size` bytes long (before the newline)."""
    prefix, suffix = b'{"method":"get_status","params":{"pad":"', b'"}}'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


boundary_lines = st.sampled_from([16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1]).map(sized_line)


@st.composite
def http_lookalikes(draw):
    verb = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH",
                                 b"post", b"BREW", b"PRI"]))
    target = draw(st.sampled_from([b"/", b"/metrics", b"*", b"http://localhost/", b"/" + b"a" * 9000]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/1"]))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    body = draw(st.sampled_from([VALID, b"", sized_line(16 * 1024 + 1)]) | request_objects()
                | st.binary(max_size=64))
    length = draw(st.sampled_from([str(len(body)).encode(), str(len(body) + 5).encode(), b"0",
                                   b"-1", b"1e3", b"\xb2", b"\xd9\xa1", b"9" * 5000, b" 5",
                                   b"0x10", b"99999", b""]))
    headers = [b"Host: localhost"]
    if draw(st.integers(0, 3)):
        headers.append(b"Content-Length: " + length)
    headers += draw(st.lists(st.sampled_from([
        b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Content-Length: 3", b"NoColon",
        b" Leading: space", b"X: " + b"y" * 17000, b":empty-name", b"Connection: keep-alive",
        b"X-\xff\x00: \xc0"]), max_size=3))
    return verb + b" " + target + b" " + version + eol + b"".join(h + eol for h in headers) + eol + body


hostile_payloads = st.one_of(request_objects(), json_values.map(lambda v: json.dumps(v).encode()),
                             st.binary(max_size=256), mutated_requests(), boundary_lines,
                             http_lookalikes())


KNOWN_METHODS = set(psp.METHODS) | set(psp.METHOD_ALIASES)


def allowed_answers(line):
    return oracle.allowed_answers(line, KNOWN_METHODS)


def assert_specific(reply):
    """success:false with an error that names what was wrong (never a generic failure)."""
    assert reply["success"] is False and "data" not in reply, reply
    error = reply["error"]
    assert isinstance(error, str) and error and error != psp.E_INTERNAL, reply
    assert len(error) < 200 and "Traceback" not in error, reply
    assert str(uuid.UUID(reply["correlation_id"])) == reply["correlation_id"]


def check_line_reply(line, reply):
    allowed = allowed_answers(line)
    if reply["success"]:
        assert allowed & {oracle.SERVED, oracle.ANY_SPECIFIC}, (line[:200], allowed, reply)
        if oracle.SERVED in allowed:
            assert reply["data"]["version"] == psp.__version__, reply
    else:
        assert_specific(reply)
        assert oracle.ANY_SPECIFIC in allowed or reply["error"] in allowed, (line[:200], allowed, reply)


def check_stream_reply(payload, data):
    """Replies to a payload sent on a fresh connection and then half-closed."""
    assert b"Traceback" not in data
    if data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    if data.startswith(b"HTTP/"):
        head, sep, body = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        status = int(head.split(b" ")[1])
        length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
        assert int(length[0].split(b":")[1]) == len(body), data[:300]
        reply = gojson.check_reply(body.decode())
        if status != 200 or not reply["success"]:
            assert_specific(reply)
        assert status == (psp.status_for_error(reply.get("error")) if not reply["success"] else 200)
        return
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    replies = data.split(b"\n")[:-1]
    assert len(replies) <= payload.count(b"\n") + 1
    for raw in replies:
        reply = gojson.check_reply(raw.decode())
        if not reply["success"]:
            assert_specific(reply)


class KeepAlive:
    """One long-lived connection: one line out, one line back.

    The daemon rightly closes a connection idle for READ_TIMEOUT; one that has been idle
    for half of that (the fuzzer paused, the machine was busy) is replaced before use.
    """

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.connect()

    def connect(self):
        if self.sock:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)      # a hang fails the test instead of stalling it
        self.sock.connect(str(self.path))
        self.buffer = b""
        self.used = time.monotonic()

    def ask(self, line):
        if time.monotonic() - self.used > psp.READ_TIMEOUT / 2:
            self.connect()
        self.used = time.monotonic()
        self.sock.sendall(line + b"\n")
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"the daemon closed a keep-alive connection after {line[:200]!r}"
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n")
        self.used = time.monotonic()
        return gojson.check_reply(reply.decode())

    def close(self):
        self.sock.close()


def fits_one_line(payload):
    return b"\n" not in payload and len(payload) <= psp.MAX_REQUEST_BYTES


@pytest.mark.parametrize("line, answers", [
    (b' {"method":"get_status"}\x0b', {oracle.SERVED}),
    (b'{"method":"get_status","params":null,"correlation_id":9}', {oracle.SERVED}),
    (b"\t \r", {oracle.EMPTY}),
    (b'{"method":"get_temperature","params":{"node":"x"}}', {oracle.ANY_SPECIFIC}),
    (b'{"method":"nope"}', {oracle.UNKNOWN_METHOD}),
    (b'{"method":"get_status","method":"get_status"}', {oracle.INVALID}),
    (b'{"method":"get_status","params":{"\\ud83d\\ude00":1,"\xf0\x9f\x98\x80":2}}', {oracle.INVALID}),
    (b'{"method":"get_status","params":{"\\ud800":1}}', {oracle.SERVED}),
    (b'\xef\xbb\xbf{"method":"get_status"}', {oracle.INVALID}),
    (b'{"method":"get_status","n":NaN}', {oracle.INVALID}),
    (b'{"method":"get_status","n":01}', {oracle.INVALID}),
    (b'{"method":"get_status","n":1e999999}', {oracle.SERVED}),
    (b'{"method":"get_status","n":' + b"9" * 4300 + b"}", {oracle.SERVED}),
    (b'{"method":"get_status","n":' + b"9" * 4301 + b"}", {oracle.INVALID}),
    (b'{"method":"get_status","params":[]}', {oracle.INVALID}),
    (b'{"method":"get_status","s":"a\x01"}', {oracle.INVALID}),
    (b'{"method":"get_status","s":"\xed\xa0\x80"}', {oracle.INVALID}),
    (b'{"method":"get_status"} x', {oracle.INVALID}),
    (b'{"method":"get_status","a":' + b"[" * 101 + b"]" * 101 + b"}", {oracle.SERVED, oracle.INVALID}),
    (b'["get_status"]', {oracle.INVALID}),
])
def test_the_oracle_reads_the_protocols_rules(line, answers):
    assert allowed_answers(line) == answers


def test_the_oracles_errors_are_rows_of_the_protocols_table():
    table = (ROOT / "docs" / "protocol.md").read_text()
    for name, error in (("EMPTY", psp.E_EMPTY), ("INVALID", psp.E_INVALID),
                        ("UNKNOWN_METHOD", psp.E_UNKNOWN_METHOD)):
        assert getattr(oracle, name) == error
        assert f"\n| `{error}` | 6 other |" in table, error


def test_parse_request_agrees_with_the_spec(scale):
    """The pure parser over the same inputs the wire fuzzer sends, line by line."""
    @seeded(scale(2000, 100_000))
    @given(hostile_payloads)
    @example(b"\xff\xfe" + VALID)
    @example(b'{"method": "get_status", "params": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}")
    @example(b'{"method": "get_status", "params": {"n": 1e999999}}')
    def check(payload):
        for line in payload.split(b"\n"):
            allowed = allowed_answers(line)
            try:
                corr_id, method, params = psp.parse_request(line)
            except psp.RequestError as exc:
                assert exc.args[0] in allowed, (line[:200], exc.args, allowed)
                continue
            assert isinstance(method, str) and isinstance(params, dict)
            assert str(uuid.UUID(corr_id)) == corr_id
            parsed_as = (oracle.SERVED if method == "get_status" else
                         oracle.ANY_SPECIFIC if method in KNOWN_METHODS else oracle.UNKNOWN_METHOD)
            assert parsed_as in allowed, (line[:200], method, allowed)

    check()


def test_wire_fuzzing(daemon_factory, scale):
    """Hostile inputs over the real socket: specific errors or clean closes, never a crash."""
    daemon = daemon_factory({"rate_limit": OPEN_LIMITS})
    pid = daemon.proc.pid
    fds_before = fd_count(pid)
    counts = {"keep-alive": 0, "fresh": 0}
    conn = KeepAlive(daemon.socket)
    assert conn.ask(VALID)["success"]       # later lines are never taken for an HTTP head

    @seeded(scale(2500, 100_000))
    @given(payload=hostile_payloads, partial=st.integers(0, 9))
    def send(payload, partial):
        if fits_one_line(payload) and partial:
            counts["keep-alive"] += 1
            check_line_reply(payload, conn.ask(payload))
        else:
            counts["fresh"] += 1
            check_stream_reply(payload, send_raw(daemon.socket, payload, timeout=15, shutdown=True))
        assert daemon.proc.poll() is None, "the daemon died"

    try:
        send()
    finally:
        conn.close()
    print(f"wire fuzzing: {counts} inputs")
    assert sum(counts.values()) >= scale(2500, 100_000)
    assert daemon.rpc("get_status")["success"]
    wait_for(lambda: fd_count(pid) <= fds_before, what="the daemon's fds back to the baseline")
    assert_no_tracebacks(daemon)


@pytest.mark.parametrize("length, status", [
    (b"\xb2", 400),                          # "²": str.isdigit() says yes, int() says no
    (b"\xd9\xa1", 400),                      # an Arabic-Indic digit in UTF-8
    (b"9" * 5000, 413),                      # more digits than int() converts
    (b"0" * 5000 + b"23", 200),              # leading zeros are still a number
])
def test_http_content_length_is_ascii_digits(daemon, length, status):
    body = b'{"method":"get_status"}'
    out = send_raw(daemon.socket, b"POST / HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert_no_tracebacks(daemon)


# -- 2. flood -------------------------------------------------------------------------------------

HOSTILE = os.path.join(os.path.dirname(__file__), "hostile_peer.py")
FLOOD_LIMITS = {"per_minute": 60, "burst": 20, "max_concurrent": 4}


def hostile(daemon, mode, first, second, uid=None):
    prefix = as_uid(uid) if uid is not None else []
    return subprocess.Popen(prefix + [PYTHON, HOSTILE, mode, str(daemon.socket), str(first),
                                      str(second)], stdout=subprocess.PIPE, text=True)


def ask_while(attacker, banner, ask, most=15, pace=0.05):
    """Answers to `ask()` (another peer) taken while `attacker` runs, once it printed `banner`.

    At most `most` (that peer's own bucket holds about 20); `pace` seconds apart at most. Only
    answers that came back while the attack still ran are returned.
    """
    assert attacker.stdout.readline() == banner + "\n"
    during = []
    while attacker.poll() is None and len(during) < most:
        reply = ask()
        if attacker.poll() is None:
            during.append(reply)
        try:
            attacker.wait(timeout=pace)
        except subprocess.TimeoutExpired:
            pass
    return during


def peer_records(daemon, uid):
    return [r for r in daemon.log_records() if r.get("uid") == uid]


@pytest.mark.parametrize("mode", ["flood", "flood-connect"])
def test_flood_is_limited_and_another_peer_is_served(daemon_factory, mode):
    """8 threads of one pid: on keep-alive connections, or a new connection per request."""
    port = free_port()
    daemon = daemon_factory({"rate_limit": FLOOD_LIMITS, "metrics_address": f"127.0.0.1:{port}"})
    pid = daemon.proc.pid
    rss_before = proc_status(pid, "VmRSS")
    began = time.monotonic()
    flood = subprocess.Popen([PYTHON, HOSTILE, mode, str(daemon.socket), "10000", "8"],
                             stdout=subprocess.PIPE, text=True)
    during = ask_while(flood, "flooding", lambda: daemon.rpc("get_status"))
    counts = json.loads(flood.communicate(timeout=120)[0])
    elapsed = time.monotonic() - began
    print(f"{mode}: {counts} in {elapsed:.2f} s; the other peer asked {len(during)} times during it; "
          f"RSS +{proc_status(pid, 'VmRSS') - rss_before} KiB")
    assert flood.returncode == 0 and sum(counts.values()) == 10_000
    assert set(counts) <= {"served", psp.E_RATE_LIMITED}
    # The daemon knows one node (this host); its allowance grows with the nodes it knows.
    per_minute, burst, _ = psp.peer_allowance(dict(psp.DEFAULT_CONFIG["rate_limit"], **FLOOD_LIMITS), 1)
    assert burst <= counts["served"] <= burst + per_minute / 60 * elapsed + 1
    assert during and all(reply["success"] for reply in during)
    assert unlabelled(daemon, "pulse_proxy_rate_limit_hits_total") == counts[psp.E_RATE_LIMITED]
    assert proc_status(pid, "VmRSS") - rss_before <= 5 * 1024, "RSS grew by more than 5 MB"
    assert daemon.rpc("get_status")["success"]
    assert_no_tracebacks(daemon)


def test_one_connection_pipelining_invalid_lines_is_charged_and_others_are_served(daemon_factory):
    """A read-only uid pipelines {"method":"x"} on one keep-alive connection as fast as it can:
    each line costs it a token like a valid request, so once its burst is gone it waits its
    turn, and another peer is answered every time it asks meanwhile."""
    port = free_port()
    daemon = daemon_factory({"rate_limit": FLOOD_LIMITS, "metrics_address": f"127.0.0.1:{port}",
                             "allowed_peers": [{"uid": READER_UID}]})
    began = time.monotonic()
    flood = hostile(daemon, "pipeline", 2000, 1, uid=READER_UID)
    during = ask_while(flood, "flooding", lambda: daemon.rpc("get_status"))
    counts = json.loads(flood.communicate(timeout=120)[0])
    elapsed = time.monotonic() - began
    print(f"pipelined invalid flood: {counts} in {elapsed:.2f} s; other peer {len(during)} answers")
    assert flood.returncode == 0 and counts == {psp.E_UNKNOWN_METHOD: 2000}
    assert during and all(reply["success"] for reply in during), during
    metrics = metric_samples(daemon)
    assert metrics[("pulse_proxy_refused_requests_total", (("result", "invalid"),))] == 2000
    per_minute, burst, _ = psp.peer_allowance(dict(psp.DEFAULT_CONFIG["rate_limit"], **FLOOD_LIMITS), 1)
    charged_out = metrics[("pulse_proxy_rate_limit_hits_total", ())]
    assert charged_out >= 2000 - burst - per_minute / 60 * elapsed - 1, "the flood was not charged"
    daemon.stop()       # writes the last summary line
    records = peer_records(daemon, READER_UID)
    assert len(records) <= 2 + 2 * elapsed / psp.REFUSAL_SUMMARY_INTERVAL, records[:5]
    assert sum(r.get("count", 1) for r in records) == 2000, "a refusal went unrecorded"
    assert_no_tracebacks(daemon)


def test_connections_that_never_read_are_closed_and_another_peer_is_served(daemon_factory):
    """256 connections from one pid pipeline get_status and never read an answer: each is
    closed once its answer waited WRITE_TIMEOUT, and gives way at the cap meanwhile."""
    port = free_port()
    daemon = daemon_factory({"rate_limit": OPEN_LIMITS, "metrics_address": f"127.0.0.1:{port}",
                             "log_level": "warning"})
    pid = daemon.proc.pid
    rss_before = proc_status(pid, "VmRSS")
    stall = hostile(daemon, "stall", psp.MAX_CONNECTIONS, 1000)
    rss = [rss_before]

    def ask():
        rss.append(proc_status(pid, "VmRSS"))
        return daemon.rpc("get_status")

    served = ask_while(stall, "stalled", ask, most=1000, pace=0.5)
    result = json.loads(stall.communicate(timeout=120)[0])
    timeouts = metric_samples(daemon)[("pulse_proxy_write_timeouts_total",
                                       (("listener", "socket"),))]
    print(f"stalled connections: {result}, {timeouts:g} by the write deadline; other peer "
          f"{sum(r['success'] for r in served)}/{len(served)}; RSS peak +{max(rss) - rss_before} KiB")
    assert stall.returncode == 0 and result == {"closed": psp.MAX_CONNECTIONS}
    assert len(served) >= 3 and all(reply["success"] for reply in served), served
    assert timeouts >= psp.MAX_CONNECTIONS - len(served), "each check evicts one at most"
    assert max(rss) - rss_before <= 64 * 1024, "RSS grew by more than 64 MB"
    assert daemon.rpc("get_status")["success"]
    assert_no_tracebacks(daemon)


def test_a_refused_uids_flood_costs_the_log_summary_lines(daemon_factory):
    """A uid with no capability floods with a new connection per request: every refusal is
    counted, but the log gets the first in full and one summary line per interval."""
    daemon = daemon_factory({"rate_limit": FLOOD_LIMITS})
    began = time.monotonic()
    flood = hostile(daemon, "flood-connect", 2000, 4, uid=STRANGER_UID)
    assert flood.stdout.readline() == "flooding\n"
    counts = json.loads(flood.communicate(timeout=120)[0])
    elapsed = time.monotonic() - began
    assert counts == {psp.E_UNAUTHORIZED: 2000}
    daemon.stop()
    records = peer_records(daemon, STRANGER_UID)
    summaries = [r for r in records if r["msg"] == "Requests refused"]
    print(f"refused flood: {len(records)} audit lines for 2000 refusals in {elapsed:.2f} s")
    assert len(records) <= 2 + 2 * elapsed / psp.REFUSAL_SUMMARY_INTERVAL, records[:5]
    assert sum(r.get("count", 1) for r in records) == 2000, "a refusal went unrecorded"
    assert all(r["first_error"] == r["last_error"] == psp.E_UNAUTHORIZED for r in summaries)
    assert_no_tracebacks(daemon)


# -- 3. slow clients ------------------------------------------------------------------------------


def hold_slow_clients(connect, count, on_tick):
    """Open `count` connections; even ones send nothing, odd ones one byte a second.

    Waits (reading with a timeout, never sleeping) until the daemon has closed every one;
    `on_tick()` runs once a second meanwhile. Returns what each connection received.
    """
    selector = selectors.DefaultSelector()
    received, drip = {}, set()
    for index in range(count):
        sock = connect()
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        received[index] = b""
        if index % 2:
            drip.add(sock)
    deadline = time.monotonic() + 4 * psp.READ_TIMEOUT
    next_tick = time.monotonic()
    try:
        while selector.get_map():
            assert time.monotonic() < deadline, "connections open long after the read timeout"
            if time.monotonic() >= next_tick:
                for sock in list(drip):
                    try:
                        sock.send(b"{")
                    except OSError:
                        drip.discard(sock)
                on_tick()
                next_tick += 1.0
            for key, _ in selector.select(timeout=max(0.0, next_tick - time.monotonic())):
                try:
                    chunk = key.fileobj.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[key.data] += chunk
                else:
                    selector.unregister(key.fileobj)
                    drip.discard(key.fileobj)
                    key.fileobj.close()
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
    return received


# Every fd the daemon may hold beyond its baseline: the capped connections, plus those accepted
# in the current event-loop pass that are being answered `server busy` and closed (at most the
# listen backlog, 512, whatever a pass accepts), plus the metrics listener's own cap: 800, under
# the soft RLIMIT_NOFILE of 1024 systemd gives a service unless the unit sets LimitNOFILE.
FD_BOUND = psp.MAX_CONNECTIONS + 512 + psp.MAX_METRICS_CONNECTIONS


def test_slow_clients_are_cut_off_and_others_are_served(daemon_factory, scale):
    port = free_port()
    daemon = daemon_factory({"rate_limit": OPEN_LIMITS, "metrics_address": f"127.0.0.1:{port}"})
    pid = daemon.proc.pid
    wait_for(lambda: unlabelled(daemon, "pulse_proxy_connections") == 0, what="no connections")
    baseline = fd_count(pid)
    peak, served = [baseline], []

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        peak.append(fd_count(pid))
        return sock

    def on_tick():
        peak.append(fd_count(pid))
        served.append(daemon.rpc("get_status")["success"])
        assert unlabelled(daemon, "pulse_proxy_connections") <= psp.MAX_CONNECTIONS + 1

    count = scale(1000, 1000)
    received = hold_slow_clients(connect, count, on_tick)
    outcomes = {}
    for data in received.values():
        assert data.count(b"\n") == 1, data[:200]
        error = json.loads(data)["error"]
        outcomes[error] = outcomes.get(error, 0) + 1
    print(f"slow clients: {outcomes}; daemon fds baseline {baseline}, peak {max(peak)}; "
          f"other peer served {sum(served)}/{len(served)}")
    assert set(outcomes) <= {psp.E_BUSY, psp.E_READ_TIMEOUT} and sum(outcomes.values()) == count
    assert outcomes[psp.E_READ_TIMEOUT] <= psp.MAX_CONNECTIONS
    assert len(served) >= 3 and all(served), "another peer is served throughout"
    assert max(peak) <= baseline + FD_BOUND
    wait_for(lambda: fd_count(pid) <= baseline, what="the daemon's fds back to the baseline")
    assert_no_tracebacks(daemon)


def test_slow_metrics_clients_are_cut_off_and_scrapes_succeed(daemon_factory, scale):
    port = free_port()
    daemon = daemon_factory({"metrics_address": f"127.0.0.1:{port}"})
    pid = daemon.proc.pid
    wait_for(lambda: unlabelled(daemon, "pulse_proxy_connections") == 0, what="no connections")
    baseline = fd_count(pid)
    peak, scrapes = [baseline], []

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        peak.append(fd_count(pid))
        return sock

    def on_tick():
        peak.append(fd_count(pid))
        scrapes.append(("pulse_proxy_connections", ()) in metric_samples(daemon))

    received = hold_slow_clients(connect, scale(300, 1000), on_tick)
    print(f"slow metrics clients: fds baseline {baseline}, peak {max(peak)}; "
          f"scrapes {sum(scrapes)}/{len(scrapes)}")
    assert not any(received.values()), "an unfinished request head gets no answer"
    assert len(scrapes) >= 3 and all(scrapes)
    assert max(peak) <= baseline + FD_BOUND
    wait_for(lambda: fd_count(pid) <= baseline, what="the daemon's fds back to the baseline")
    assert_no_tracebacks(daemon)


# -- 5. bad configuration -------------------------------------------------------------------------

valid_configs = st.fixed_dictionaries({}, optional={
    "allowed_source_subnets": st.lists(st.ip_addresses().map(str) | st.sampled_from(
        ["10.0.0.0/8", "192.168.1.0/24", "fd00::/8"]), max_size=4),
    "metrics_address": st.just("disabled") | st.integers(1, 65535).map("127.0.0.1:{}".format),
    "allowed_peers": st.lists(st.integers(0, 2**32 - 1).map(lambda uid: {"uid": uid})
                              | st.integers(0, 2**31).map(lambda low: {"uids": f"{low}-{low + 65535}",
                                                                       "capabilities": ["read"]}),
                              max_size=3),
    "allow_idmapped_root": st.booleans(),
    "rate_limit": st.fixed_dictionaries({}, optional={
        "per_minute": st.integers(1, 10**6), "burst": st.integers(1, 1000),
        "max_concurrent": st.integers(1, 100)}),
    "log_level": st.sampled_from(sorted(psp.LOG_LEVELS)),
    "subuid_file": st.just("/etc/subuid"),
})
wrong_configs = st.dictionaries(st.sampled_from(sorted(psp.CONFIG_CHECKS)) | st.text(max_size=12),
                                json_values, max_size=4)
YAML_SPECIALS = ["&a ", "*a", "*nope", "!!python/object/apply:os.system ['true']", "? [a]\n: 1\n",
                 "? {a: 1}\n: 2\n", "{", "[" * 3000, "\t", "\x00", "\ufeff", "%YAML 1.1\n---\n",
                 "--- \n", "!!binary aGVsbG8=", "<<: *a\n", "log_level: info\n", ": :", "- -",
                 "'", '"\\x', "\u2028", "1e999999", ".nan", "0o777", "2026-01-01"]


@st.composite
def mutated_yaml(draw):
    text = yaml.safe_dump(draw(valid_configs | wrong_configs))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(YAML_SPECIALS) | st.text(max_size=4)) + text[at:]
    return text.encode("utf-8", "surrogatepass")


config_documents = st.one_of(valid_configs.map(yaml.safe_dump).map(str.encode),
                             wrong_configs.map(yaml.safe_dump).map(str.encode),
                             mutated_yaml(), st.binary(max_size=300))


def alias_bomb(levels=9):
    """A few hundred bytes of YAML whose value is 9**levels strings when expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\nallowed_peers: *a{levels - 1}\n").encode()


def many_subnets(count):
    return ("allowed_source_subnets:\n" + "".join(
        f"  - 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n" for i in range(count))).encode()


PATHOLOGICAL_CONFIGS = {
    "alias bomb": alias_bomb(),
    "alias bomb as a key": alias_bomb().replace(b"allowed_peers: *a8", b"? *a8\n: 1"),
    "unhashable key": b"? [a]\n: 1\n",
    "subnets filling 1 MiB": many_subnets(psp.MAX_CONFIG_BYTES // 22),
    "1 MiB + 1": b"#" * psp.MAX_CONFIG_BYTES + b"\n",
    "deep nesting": b"log_level: " + b"[" * 100_000,
    "binary": bytes(range(256)) * 64,
    "NUL in a path": b'socket_path: "/run/a\\0b"\n',
}


def assert_config_outcome(path, config_or_error):
    """A config either loads or fails with one sentence per problem, each naming the file."""
    if isinstance(config_or_error, psp.ConfigError):
        problems = config_or_error.problems
        assert problems and all(isinstance(p, str) and p.startswith(str(path)) for p in problems)
        assert all(len(p) < 400 and "Traceback" not in p for p in problems), problems
    else:
        assert set(config_or_error) >= set(psp.DEFAULT_CONFIG)


def load_or_error(path):
    try:
        return psp.load_config(str(path), environ={})
    except psp.ConfigError as exc:
        return exc


def test_generated_configs_load_or_explain(base_dir, scale):
    path = base_dir / "config.yaml"

    @seeded(scale(1000, 20_000))
    @given(config_documents)
    def check(document):
        path.write_bytes(document)
        assert_config_outcome(path, load_or_error(path))

    check()


def assert_cli_outcome(path, out):
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    if out.returncode == 0:
        assert out.stdout.endswith("OK\n")
    else:
        assert out.returncode == 1
        problems = out.stdout.splitlines()
        assert problems and all(p.startswith(str(path)) for p in problems), out.stdout


def test_config_validate_and_serve_on_pathological_files(base_dir):
    env = {"PULSE_SENSOR_PROXY_SOCKET": str(base_dir / "run" / "s.sock"),
           "PULSE_SENSOR_PROXY_SSH_DIR": str(base_dir / "state" / "ssh"),
           "PULSE_SENSOR_PROXY_METRICS_ADDR": "disabled"}
    for name, document in PATHOLOGICAL_CONFIGS.items():
        path = base_dir / f"{name.replace(' ', '-')}.yaml"
        path.write_bytes(document)
        validate = run_cli("config", "validate", "--config", str(path))
        assert_cli_outcome(path, validate)
        serve = subprocess.Popen([PYTHON, str(MODULE), "serve", "--config", str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, **env))
        if validate.returncode == 0:
            wait_for(lambda: serve.poll() is None and rpc(env["PULSE_SENSOR_PROXY_SOCKET"], {
                "method": "get_status"})["success"] if os.path.exists(env["PULSE_SENSOR_PROXY_SOCKET"])
                else False, timeout=60, what=f"serve with {name}")
            serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
        assert "Traceback" not in err, (name, err)
        assert serve.returncode == validate.returncode, (name, err)
        if serve.returncode:
            assert err.splitlines() == [f"pulse-sensor-proxy: {p}"
                                        for p in validate.stdout.splitlines()], name


def test_config_validate_cli_on_generated_files(base_dir, scale):
    path = base_dir / "config.yaml"

    @seeded(scale(25, 500))
    @given(config_documents)
    def check(document):
        path.write_bytes(document)
        assert_cli_outcome(path, run_cli("config", "validate", "--config", str(path)))

    check()


def test_sighup_with_bad_files_keeps_the_running_config(daemon_factory, scale):
    daemon = daemon_factory({"allowed_peers": [{"uid": READER_UID}]})
    good = daemon.config_path.read_bytes()
    refused = []

    @seeded(scale(12, 200))
    @given(wrong_configs.map(yaml.safe_dump).map(str.encode) | mutated_yaml() | st.binary()
           | st.sampled_from(list(PATHOLOGICAL_CONFIGS.values())))
    def reload_with(document):
        daemon.config_path.write_bytes(document)
        try:
            psp.load_config(str(daemon.config_path), environ={})
            return              # a valid document: not the subject here
        except psp.ConfigError:
            pass
        failed = sum(r.get("msg", "").startswith("Reload failed") for r in daemon.log_records())
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(r.get("msg", "").startswith("Reload failed")
                             for r in daemon.log_records()) > failed, what="the refused reload")
        assert daemon.proc.poll() is None
        refused.append(document)

    reload_with()
    print(f"SIGHUP: {len(refused)} bad files refused")
    assert len(refused) >= scale(12, 200) // 2
    assert rpc(daemon.socket, {"method": "get_status"}, uid=READER_UID)["success"], "old config kept"
    daemon.config_path.write_bytes(good)
    assert_no_tracebacks(daemon)


# -- 6. resource bounds ---------------------------------------------------------------------------


def test_limiter_table_stays_bounded_with_100000_peers():
    clock = [0.0]
    limiter = psp.RateLimiter(per_minute=20, burst=10, max_concurrent=10, clock=lambda: clock[0])
    sizes = []
    for pid in range(100_000):
        clock[0] += 0.001           # 100,000 peers in 100 s: none idle long enough to be forgotten
        assert limiter.acquire((100000, pid))
        limiter.release((100000, pid))
        sizes.append(len(limiter.entries))
    assert max(sizes) <= psp.RateLimiter.MAX_ENTRIES


def test_no_growth_or_leak_under_many_requests_and_pids(daemon_factory, scale):
    port = free_port()
    daemon = daemon_factory({"rate_limit": OPEN_LIMITS, "metrics_address": f"127.0.0.1:{port}"})
    pid = daemon.proc.pid
    conn = KeepAlive(daemon.socket)
    for _ in range(2000):           # warm up allocator arenas and caches
        assert conn.ask(VALID)["success"]
    wait_for(lambda: unlabelled(daemon, "pulse_proxy_connections") == 1, what="only our connection")
    fds, threads, rss = fd_count(pid), proc_status(pid, "Threads"), proc_status(pid, "VmRSS")

    requests = scale(20_000, 100_000)
    for index in range(requests):
        if index % 10:
            assert conn.ask(VALID)["success"]
        else:
            assert rpc(daemon.socket, VALID.decode())["success"]
    rss_requests = proc_status(pid, "VmRSS") - rss
    conn.close()

    pids = scale(1000, 10_000)
    out = subprocess.run([PYTHON, HOSTILE, "pids", str(daemon.socket), str(pids), "8"],
                         capture_output=True, text=True, timeout=600, check=True)
    churn = json.loads(out.stdout)
    rss_pids = proc_status(pid, "VmRSS") - rss
    print(f"resource bounds: RSS +{rss_requests} KiB after {requests} requests, "
          f"+{rss_pids} KiB after {churn['distinct_pids']} pids too; fds {fds}, threads {threads}")
    assert churn["served"] == pids and churn["distinct_pids"] == pids
    assert rss_requests <= 5 * 1024 and rss_pids <= 5 * 1024
    wait_for(lambda: fd_count(pid) <= fds, what="the daemon's fds back to the baseline")
    assert proc_status(pid, "Threads") == threads
    wait_for(lambda: unlabelled(daemon, "pulse_proxy_connections") == 0, what="no connection tasks left")
    assert unlabelled(daemon, "pulse_proxy_queue_depth") == 0
    assert_no_tracebacks(daemon)


def test_out_of_file_descriptors_is_logged_and_survived(daemon):
    """With fewer fds than the connection cap (a low LimitNOFILE), accept() fails with EMFILE."""
    pid = daemon.proc.pid
    subprocess.run(["prlimit", f"--pid={pid}", "--nofile=40:40"], check=True)
    held = []
    try:
        for _ in range(60):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(str(daemon.socket))     # queued by the kernel past the daemon's fds
            held.append(sock)
        record = daemon.wait_log(lambda r: "out of system resource" in r.get("msg", ""),
                                 "the EMFILE record")
        assert "Too many open files" in record["error"]
    finally:
        for sock in held:
            sock.close()
    assert daemon.rpc("get_status")["success"]
    assert "Traceback" not in daemon.log_text()
