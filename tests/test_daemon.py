"""The daemon as a real process: wire conformance, peers by SO_PEERCRED, limits, life cycle."""
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import urllib.request
import uuid

import pytest

import pulse_sensor_proxy as psp
from conftest import (CID, MODULE, PYTHON, READER_UID, as_uid, free_port, metric_samples,
                      metrics_text, rpc, run_cli, send_raw, wait_for)

def lines_of(data):
    return [json.loads(line) for line in data.decode().splitlines()]


# -- wire conformance -----------------------------------------------------------------------------


def test_get_status_exactly_as_pulse_sends_it(daemon):
    request = json.dumps({"correlation_id": CID, "method": "get_status", "params": None})
    raw = send_raw(daemon.socket, request.encode() + b"\n", shutdown=True)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    reply = json.loads(raw)
    assert set(reply) == {"correlation_id", "success", "data"}
    assert reply["correlation_id"] == CID and reply["success"] is True
    data = reply["data"]
    public = (daemon.ssh_dir / "id_ed25519.pub").read_text().strip()
    assert data["public_key"] == public and public.startswith("ssh-ed25519 ")
    assert data["ssh_dir"] == str(daemon.ssh_dir) and data["socket"] == str(daemon.socket)
    assert data["version"] == __import__("pulse_sensor_proxy").__version__
    assert data["uptime_seconds"] >= 0
    assert data["peer"] == {"uid": 0, "gid": 0, "pid": data["peer"]["pid"],
                            "capabilities": ["admin", "cleanup", "read"]}
    assert data["capabilities"] == ["admin", "cleanup", "read"], "top level too, as the original answered"


# One get_status exchange by any uid's python3, the reply's bytes as they came.
CALL_RAW = f"""import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{{"correlation_id": "{CID}", "method": "get_status"}}\\n')
data = b""
while not data.endswith(b"\\n"):
    data += sock.recv(65536)
sys.stdout.buffer.write(data)
"""


def test_get_status_is_the_json_encoders_text(daemon_factory):
    """get_status is built as text from parts encoded once: byte for byte what encoding its
    fields would give, for root and for a read-only uid."""
    daemon = daemon_factory({"allowed_peers": [{"uid": READER_UID, "capabilities": ["read"]}]})
    for uid in (None, READER_UID):
        request = {"correlation_id": CID, "method": "get_status"}
        if uid is None:
            raw = send_raw(daemon.socket, json.dumps(request).encode() + b"\n", shutdown=True)
        else:
            raw = subprocess.run(
                as_uid(uid) + ["/usr/bin/python3", "-I", "-c", CALL_RAW, str(daemon.socket)],
                capture_output=True, timeout=30, check=True).stdout
        reply = json.loads(raw)
        assert reply["data"]["peer"]["uid"] == (uid or 0)
        assert raw == json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def test_keep_alive_answers_in_order(daemon):
    requests = [{"correlation_id": str(uuid.uuid4()), "method": m}
                for m in ("get_status", "nope", "get_status")]
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    replies = lines_of(send_raw(daemon.socket, payload, shutdown=True))
    assert [r["correlation_id"] for r in replies] == [r["correlation_id"] for r in requests]
    assert [r["success"] for r in replies] == [True, False, True]
    assert replies[1]["error"] == "unknown method" and "data" not in replies[1]


def read_reply(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "closed before a whole reply"
        data += chunk
    return json.loads(data)


def test_a_connection_answered_as_it_was_accepted_is_read_again(daemon):
    """A request already queued when its connection is accepted is answered at once, and the
    connection is only looked at again later (with the next connections accepted, or on its
    own on an idle daemon): a second and third request on it are answered all the same."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        for _ in range(3):
            cid = str(uuid.uuid4())
            sock.sendall(json.dumps({"correlation_id": cid, "method": "get_status"}).encode() + b"\n")
            reply = read_reply(sock)
            assert reply["correlation_id"] == cid and reply["success"]


def test_a_request_sent_after_the_connection_was_accepted_is_answered(daemon_factory):
    """A connection with nothing to read yet when it is accepted is watched for its request
    (at once: only one that was answered waits to be looked at again)."""
    port = free_port()
    daemon = daemon_factory({"metrics_address": f"127.0.0.1:{port}"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        wait_for(lambda: metric_samples(daemon)[("pulse_proxy_connections", ())] == 1,
                 what="the connection accepted, its request not yet sent")
        sock.sendall(json.dumps({"correlation_id": CID, "method": "get_status"}).encode() + b"\n")
        assert read_reply(sock)["correlation_id"] == CID


def test_a_request_is_in_the_audit_log_before_its_reply_is_sent(daemon_factory):
    """Connections accepted together are answered together, their records written in one go
    before any of their replies: a client that reads the log as soon as it has its reply
    finds its request there, however many others were answered with it."""
    daemon = daemon_factory({"rate_limit": {"per_minute": 100000, "burst": 10000}})

    def client(_):
        late = []
        for _ in range(40):
            cid = str(uuid.uuid4())
            assert rpc(daemon.socket, {"correlation_id": cid, "method": "get_status"})["success"]
            if cid not in daemon.log_text():
                late.append(cid)
        return late

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        late = [cid for found in pool.map(client, range(8)) for cid in found]
    assert late == [], f"{len(late)} replies came before their records"


def test_a_kept_alive_connection_idle_past_the_read_timeout_is_closed_without_a_word(daemon):
    """The first request is answered at once; the wait for a second one has READ_TIMEOUT, and
    its end is no refusal (nothing was sent), unlike a first request that never comes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(4 * psp.READ_TIMEOUT)
        sock.connect(str(daemon.socket))
        sock.sendall(json.dumps({"correlation_id": CID, "method": "get_status"}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(65536)
        assert json.loads(data)["success"]
        assert sock.recv(4096) == b"", "closed, and nothing more written"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(4 * psp.READ_TIMEOUT)
        sock.connect(str(daemon.socket))
        assert json.loads(sock.recv(4096))["error"] == "read timeout", "a first request is owed"
    daemon.wait_log(lambda r: r.get("error") == "read timeout", "the first request's refusal")
    assert [r.get("corr_id") for r in daemon.log_records() if r.get("error")] == [None]


def test_missing_or_bad_correlation_id_gets_a_fresh_uuid(daemon):
    for value in (None, "not-a-uuid"):
        reply = daemon.rpc("get_status", correlation_id=value)
        assert str(uuid.UUID(reply["correlation_id"])) == reply["correlation_id"]
        assert reply["correlation_id"] != value


def test_curl_form(daemon):
    out = subprocess.run(["curl", "-s", "-i", "--unix-socket", str(daemon.socket),
                          "-d", '{"method":"get_status"}', "http://localhost/"],
                         capture_output=True, check=True, timeout=20).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["data"]["peer"]["uid"] == 0


@pytest.mark.parametrize("body, status, error", [
    ('{"method":"get_status"', 400, "invalid request format"),
    ('{"method":"nope"}', 200, "unknown method"),
    ("", 400, "empty request"),
])
def test_curl_errors(daemon, body, status, error):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket",
                          str(daemon.socket), "-d", body, "http://localhost/"],
                         capture_output=True, text=True, check=True, timeout=20).stdout
    payload, code = out.rsplit("\n", 1)
    assert int(code) == status
    assert json.loads(payload)["error"] == error


def test_http_body_too_large(daemon):
    body = b'{"method":"get_status","params":{"x":"' + b"a" * 17000 + b'"}}'
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    out = send_raw(daemon.socket, head + body)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert json.loads(out.partition(b"\r\n\r\n")[2])["error"] == "payload too large"


@pytest.mark.parametrize("payload, error", [
    (b"\n", "empty request"),
    (b"{nope\n", "invalid request format"),
    (b'{"method": "get_status", "params": [1]}\n', "invalid request format"),
    (b'{"method": "get_status", "method": "x"}\n', "invalid request format"),
    (b'"just a string"\n', "invalid request format"),
    (b'{"method": "rm -rf /"}\n', "unknown method"),
])
def test_wire_errors(daemon, payload, error):
    reply = lines_of(send_raw(daemon.socket, payload, shutdown=True))
    assert reply[0]["success"] is False and reply[0]["error"] == error
    assert "Traceback" not in json.dumps(reply)


@pytest.mark.parametrize("size, too_large", [(16 * 1024, False), (16 * 1024 + 1, True)])
def test_line_size_limit(daemon, size, too_large):
    prefix = b'{"method":"get_status","params":{"pad":"'
    suffix = b'"}}'
    line = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    assert len(line) == size
    reply = lines_of(send_raw(daemon.socket, line + b"\n", shutdown=True))[0]
    if too_large:
        assert reply["error"] == "payload too large"
    else:
        assert reply["success"] is True


def test_unterminated_huge_line_is_cut_off(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        sock.sendall(b"{" * 40000)
        reply = sock.recv(65536)
        assert json.loads(reply)["error"] == "payload too large"
        assert sock.recv(65536) == b"", "the daemon closes after an oversized line"


def test_read_timeout(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        sock.sendall(b'{"method":')
        reply = json.loads(sock.recv(65536))
        assert reply["error"] == "read timeout"
        assert sock.recv(65536) == b""
    daemon.wait_log(lambda r: r.get("error") == "read timeout", "the read timeout audit record")


def test_http_read_timeout_is_an_http_answer(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "read timeout"


def test_257th_connection_displaces_the_longest_waiting_one(daemon_factory):
    daemon = daemon_factory({"metrics_address": f"127.0.0.1:{free_port()}"})

    def connections():
        return metric_samples(daemon)[("pulse_proxy_connections", ())]

    wait_for(lambda: connections() == 0, what="the readiness probe's connection to close")
    held = []
    try:
        for _ in range(256):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(str(daemon.socket))
            held.append(sock)
        wait_for(lambda: connections() == 256, what="256 open connections")
        assert daemon.rpc("get_status")["success"], "a newcomer is served at the cap"
        assert json.loads(held[0].recv(4096))["error"] == "server busy"
        assert held[0].recv(4096) == b"", "and the longest waiting connection is closed"
        wait_for(lambda: connections() == 255, what="the displaced connection to go")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: connections() == 0, what="connections to close")


# -- peers ---------------------------------------------------------------------------------------


def test_uid_matrix(daemon_factory):
    daemon = daemon_factory({"allowed_peers": [{"uid": READER_UID}]}, start=False)
    (daemon.base / "subuid").write_text("root:100000:65536\n")
    daemon.start()
    admin = {"method": "ensure_cluster_keys"}
    assert daemon.rpc("get_status")["success"]

    stranger = rpc(daemon.socket, {"method": "get_status"}, uid=4242)
    assert stranger["success"] is False and stranger["error"] == "unauthorized"
    record = daemon.wait_log(lambda r: r.get("uid") == 4242, "the refusal in the audit log")
    assert record["error"] == "unauthorized" and record["pid"] > 0 and record["gid"] == 4242

    configured = rpc(daemon.socket, {"method": "get_status"}, uid=READER_UID)
    assert configured["success"] and configured["data"]["peer"]["capabilities"] == ["read"]
    assert rpc(daemon.socket, admin, uid=READER_UID)["error"] == psp.E_FORBIDDEN

    container_root = rpc(daemon.socket, {"method": "get_status"}, uid=100000)
    assert container_root["data"]["peer"] == {
        "uid": 100000, "gid": 100000, "pid": container_root["data"]["peer"]["pid"],
        "capabilities": ["read"]}
    assert rpc(daemon.socket, admin, uid=165535)["error"] == psp.E_FORBIDDEN
    assert rpc(daemon.socket, {"method": "get_status"}, uid=165536)["error"] == "unauthorized"


def test_unauthorized_peer_is_disconnected(daemon):
    script = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
              "s.sendall(b'{\"method\":\"get_status\"}\\n{\"method\":\"get_status\"}\\n')\n"
              "d=b''\nwhile True:\n c=s.recv(4096)\n if not c: break\n d+=c\nprint(d.decode())")
    out = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                          "/usr/bin/python3", "-I", "-c", script, str(daemon.socket)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    replies = [json.loads(line) for line in out.split("\n") if line.strip()]
    assert [r["error"] for r in replies] == ["unauthorized"], "one answer, then the close"


def test_daemon_own_uid_is_admin(daemon_factory):
    daemon = daemon_factory(uid=4300)
    mine = rpc(daemon.socket, {"method": "get_status"}, uid=4300)
    assert mine["data"]["peer"]["capabilities"] == ["admin", "cleanup", "read"]
    assert rpc(daemon.socket, {"method": "get_status"}, uid=4301)["error"] == "unauthorized"
    assert daemon.rpc("get_status")["data"]["peer"]["capabilities"] == ["admin", "cleanup", "read"]
    private = daemon.ssh_dir / "id_ed25519"
    assert private.stat().st_uid == 4300


def test_idmapped_container_root_from_a_real_user_namespace(daemon_factory):
    """Root inside a user namespace mapped like a Proxmox container (0 -> 100000, 65536 ids)."""
    daemon = daemon_factory(start=False)
    (daemon.base / "subuid").write_text("root:100000:65536\n")
    daemon.start()
    child_code = (
        "import ctypes, os, socket, sys\n"
        "assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"   # CLONE_NEWUSER
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"              # the parent has written our uid/gid maps
        "os.setgid(0); os.setuid(0)\n"        # root of the namespace = host uid 100000
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"method\":\"get_status\"}\\n')\n"
        "print(os.getuid(), s.recv(65536).decode())\n")
    child = subprocess.Popen(["/usr/bin/python3", "-I", "-c", child_code, str(daemon.socket)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child.pid}/{name}", "w") as handle:
                handle.write("0 100000 65536\n")
        out, err = child.communicate("go\n", timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, err
    inner_uid, reply = out.split(" ", 1)
    assert inner_uid == "0"
    peer = json.loads(reply)["data"]["peer"]
    assert (peer["uid"], peer["gid"], peer["capabilities"]) == (100000, 100000, ["read"])


# -- rate limits -----------------------------------------------------------------------------------


def test_the_request_after_a_burst_is_refused(daemon):
    # The defaults for a daemon that knows one node (this host).
    _, burst, _ = psp.peer_allowance(psp.DEFAULT_CONFIG["rate_limit"], 1)
    payload = b'{"method":"get_status"}\n' * (burst + 1)
    replies = lines_of(send_raw(daemon.socket, payload, shutdown=True))
    assert [r["success"] for r in replies] == [True] * burst + [False]
    assert replies[-1]["error"] == "rate limit exceeded"
    record = daemon.wait_log(lambda r: r.get("msg") == "Rate limit exceeded", "the rate-limit log line")
    assert record["uid"] == 0 and record["pid"] == os.getpid()
    assert rpc(daemon.socket, {"method": "get_status"}, uid=0)["success"], "another pid, another bucket"


# -- metrics and health ----------------------------------------------------------------------------


def test_metrics_endpoint_with_promtool(daemon_factory):
    port = free_port()
    daemon = daemon_factory({"metrics_address": f"127.0.0.1:{port}"})
    daemon.rpc("get_status")
    daemon.rpc("get_temp", {"node": "pve1"})
    daemon.rpc("made_up_method")
    text = metrics_text(daemon)
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = metric_samples(daemon, text)
    assert samples[("pulse_proxy_rpc_requests_total", (("method", "get_status"), ("result", "success")))] == 1
    assert samples[("pulse_proxy_rpc_requests_total", (("method", "get_temperature"), ("result", "error")))] == 1
    assert samples[("pulse_proxy_rpc_requests_total", (("method", "unknown"), ("result", "invalid")))] == 1
    assert ("pulse_proxy_rpc_latency_seconds_bucket", (("le", "+Inf"), ("method", "get_status"))) in samples
    assert samples[("pulse_proxy_queue_depth", ())] == 0
    assert ("pulse_proxy_build_info", (("version", "0.1.0"),)) in samples

    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10))
    assert health["status"] == "ok" and health["version"] == "0.1.0"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert err.value.code == 404
    os.unlink(daemon.ssh_dir / "id_ed25519.pub")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
    assert err.value.code == 503


def test_metrics_listener_cuts_off_slow_and_malformed_clients(daemon_factory):
    port = free_port()
    daemon_factory({"metrics_address": f"127.0.0.1:{port}"})
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")       # and never finishes the head
        assert sock.recv(4096) == b"", "closed at the read timeout"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"X" * 20000)
        assert sock.recv(4096) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 405 ")


# -- life cycle -----------------------------------------------------------------------------------


def test_key_is_generated_with_modes_and_never_overwritten(daemon_factory):
    daemon = daemon_factory()
    private = daemon.ssh_dir / "id_ed25519"
    assert stat.S_IMODE(daemon.ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((daemon.ssh_dir / "id_ed25519.pub").stat().st_mode) == 0o640
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    check = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True)
    assert check.stdout.split()[:2] == (daemon.ssh_dir / "id_ed25519.pub").read_text().split()[:2]
    before = private.read_bytes()
    assert daemon.stop() == 0
    daemon.start()
    assert private.read_bytes() == before


def test_stale_socket_is_replaced_but_other_files_are_not(daemon_factory):
    daemon = daemon_factory(start=False)
    run = daemon.base / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(daemon.socket))
    stale.close()
    daemon.start()
    assert daemon.rpc("get_status")["success"]
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o777
    assert daemon.stop() == 0
    assert not daemon.socket.exists(), "SIGTERM removes the socket"

    for make in (lambda p: p.write_text("precious"), lambda p: p.symlink_to("/etc/passwd")):
        make(daemon.socket)
        daemon.start(wait=False)
        assert daemon.proc.wait(timeout=20) == 1
        assert "refusing to remove it" in daemon.log_text()
        assert daemon.socket.is_symlink() or daemon.socket.read_text() == "precious"
        daemon.socket.unlink()
    assert (daemon.base / "run").exists()


def test_second_daemon_on_the_same_socket_refuses(daemon_factory, daemon):
    other = daemon_factory(daemon.config, subdir="second", start=False)
    other.start(wait=False)
    assert other.proc.wait(timeout=20) == 1
    assert "already serving" in other.log_text()
    assert daemon.rpc("get_status")["success"]


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(daemon):
    assert rpc(daemon.socket, {"method": "get_status"}, uid=READER_UID)["error"] == "unauthorized"
    daemon.write_config(dict(daemon.config, allowed_peers=[{"uid": READER_UID}]))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(lambda r: r.get("msg") == "Configuration reloaded", "the reload")
    assert rpc(daemon.socket, {"method": "get_status"}, uid=READER_UID)["success"]

    daemon.write_config(text="allowed_peers: [{uid: -5}]\nbogus: 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    failed = daemon.wait_log(lambda r: r.get("msg", "").startswith("Reload failed"), "the failed reload")
    assert any("bogus" in p for p in failed["error"])
    assert rpc(daemon.socket, {"method": "get_status"}, uid=READER_UID)["success"], "old config kept"
    assert daemon.proc.poll() is None


def test_sigterm_exits_zero_and_notifies_systemd(daemon_factory, base_dir):
    notify_path = base_dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    try:
        daemon = daemon_factory(start=False)
        daemon.env["NOTIFY_SOCKET"] = str(notify_path)
        daemon.start(wait=False)
        assert notify.recv(4096) == b"READY=1"
        assert daemon.rpc("get_status")["success"], "READY=1 means the socket accepts"
        daemon.proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert daemon.proc.wait(timeout=20) == 0
    finally:
        notify.close()


def test_bad_config_exits_1_with_the_problem(daemon_factory):
    daemon = daemon_factory(start=False)
    daemon.config["rate_limt"] = {}
    daemon.start(wait=False)
    assert daemon.proc.wait(timeout=20) == 1
    assert "unknown key 'rate_limt' (did you mean 'rate_limit'?)" in daemon.log_text()
    assert "Traceback" not in daemon.log_text()


# -- command line ---------------------------------------------------------------------------------


def test_version_does_not_import_dependencies():
    out = subprocess.run([PYTHON, "-X", "importtime", str(MODULE), "version"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("pulse-sensor-proxy 0.1.0 (")
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert not imported & {"asyncssh", "yaml", "cryptography", "asyncio"}, imported


def test_call_command(daemon):
    out = run_cli("call", "get_status", "--socket", str(daemon.socket))
    assert out.returncode == 0 and json.loads(out.stdout)["data"]["peer"]["uid"] == 0
    out = run_cli("call", "nope", "--socket", str(daemon.socket), "--raw")
    assert out.returncode == 1 and json.loads(out.stdout)["error"] == "unknown method"
    out = run_cli("call", "get_status", "--socket", str(daemon.base / "missing.sock"))
    assert out.returncode == 1 and "no socket at" in out.stderr
    out = run_cli("call", "get_status", "--param", "oops")
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr


def test_config_validate_command(base_dir):
    good = base_dir / "good.yaml"
    good.write_text("allowed_source_subnets: [10.0.0.0/8]\nallowed_peers:\n  - uids: 100000-165535\n")
    out = run_cli("config", "validate", "--config", str(good))
    assert (out.returncode, out.stdout) == (0, "OK\n")
    bad = base_dir / "bad.yaml"
    bad.write_text("log_level: chatty\nmetrics_adress: x\n")
    out = run_cli("config", "validate", "--config", str(bad))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{bad}: log_level: got 'chatty', expected one of debug, info, warning, error",
        f"{bad}: unknown key 'metrics_adress' (did you mean 'metrics_address'?)"]
    out = run_cli("config", "validate", "--config", str(good),
                  env={"PULSE_SENSOR_PROXY_ALLOWED_SUBNETS": "300.1.1.1"})
    assert out.returncode == 1 and "PULSE_SENSOR_PROXY_ALLOWED_SUBNETS" in out.stdout


def test_config_merge_command(base_dir):
    path = base_dir / "config.yaml"
    path.write_text("log_level: debug\n")
    path.chmod(0o640)
    out = run_cli("config", "merge", "--config", str(path), "--add-subnet", "10.1.0.0/16",
                  "--add-peer-uids", "100000-165535")
    assert out.returncode == 0 and "100000-165535" in out.stdout
    assert path.read_text() == "log_level: debug\n", "without --write nothing changes"
    args = ["config", "merge", "--config", str(path), "--add-subnet", "10.1.0.0/16",
            "--add-peer-uids", "100000-165535", "--write"]
    assert run_cli(*args).stdout == f"config: updated {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert run_cli(*args).stdout == "config: unchanged\n"
    assert run_cli("config", "validate", "--config", str(path)).returncode == 0
    out = run_cli("config", "merge", "--config", str(path), "--add-subnet", "nope", "--write")
    assert out.returncode == 1 and "expected a CIDR" in out.stderr


def test_usage_errors_exit_2():
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("config").returncode == 2
    help_text = run_cli("--help")
    assert help_text.returncode == 0 and "demo" in help_text.stdout


def test_demo_serves_without_root_paths(base_dir):
    demo_dir = base_dir / "demo"
    proc = subprocess.Popen([PYTHON, str(MODULE), "demo", "--dir", str(demo_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sock = demo_dir / "run" / "pulse-sensor-proxy.sock"
        wait_for(lambda: sock.exists(), what="the demo socket")
        wait_for(lambda: rpc(sock, {"method": "get_status"})["success"], what="get_status")
        reply = rpc(sock, {"method": "get_status"})
        assert reply["data"]["ssh_dir"] == str(demo_dir / "ssh")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "call get_status --socket" in err and "curl -s --unix-socket" in err
    shutil.rmtree(demo_dir)


def test_a_full_log_pipe_never_blocks_the_loop_and_every_drop_is_reported():
    """Nobody reads the audit pipe: log() returns at once, at most MAX_AUDIT_BUFFER bytes wait,
    and once the pipe is read again the records that did not fit are reported by count."""
    import asyncio
    read_fd, write_fd = os.pipe()
    log = psp.AuditLog("info", stream=os.fdopen(write_fd, "w"))
    records = 30_000        # ~2.5 MB of lines: more than the pipe and the buffer hold

    async def scenario():
        loop = asyncio.get_running_loop()
        log.write_from_loop(loop)
        for number in range(records):
            log.log("info", "RPC request", number=number)
        assert len(log.pending) <= psp.MAX_AUDIT_BUFFER and log.dropped > 0
        dropped = log.dropped
        received, reported = bytearray(), asyncio.Event()

        def read():
            received.extend(os.read(read_fd, 1 << 20))
            if b"Audit records dropped" in received and received.endswith(b"\n"):
                reported.set()

        loop.add_reader(read_fd, read)
        try:
            await asyncio.wait_for(reported.wait(), timeout=60)
        finally:
            loop.remove_reader(read_fd)
        return dropped, [json.loads(line) for line in bytes(received).splitlines()]

    try:
        dropped, lines = asyncio.run(scenario())
    finally:
        os.close(read_fd)
    report = lines[-1]
    assert (report["msg"], report["count"]) == ("Audit records dropped: the log pipe was full", dropped)
    written = [line["number"] for line in lines[:-1]]
    assert len(written) + dropped == records and written == sorted(written)
    assert log.dropped_total == dropped


@pytest.mark.parametrize("command", [["serve"], ["config", "merge"], ["config", "migrate"],
                                     ["config", "get", "log_level"], ["nodes"], ["keys", "status"],
                                     ["tls", "init"]])
def test_config_problems_are_printed_one_way(base_dir, command):
    """Every command names a config problem the same way: the program, the file, the key."""
    bad = base_dir / "bad.yaml"
    bad.write_text("log_level: chatty\n")
    out = run_cli(*command, "--config", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"pulse-sensor-proxy: {bad}: log_level: got 'chatty', expected one of debug, info, " \
        "warning, error\n" in out.stderr, out.stderr


@pytest.mark.parametrize("args, message", [
    (["call", "m", "--param", "novalue"], "--param novalue: expected KEY=VALUE or KEY:=JSON"),
    (["call", "m", "--token-file", "t"], "--token-file and --fingerprint go with --url"),
    (["call", "m", "--url", "http://x", "--token-file", "t"], "--url: expected https://HOST:PORT"),
    (["keys", "revoke", "--fingerprint", "MD5:x"], "--fingerprint: expected SHA256: and 43 base64"),
    (["rotate-keys", "--check", "--dry-run"], "--check runs alone"),
    (["tls", "init", "--address", "nope"], "--address: 'nope' does not appear to be an IPv4"),
])
def test_usage_errors_are_argparses(args, message):
    """Exit 2 with the subcommand's usage line, as argparse reports every other usage error."""
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.startswith("usage: pulse-sensor-proxy "), out.stderr
    assert f"error: {message}" in out.stderr


def test_units_without_a_writable_dir_is_one_line(base_dir):
    out = run_cli("units", "--write", str(base_dir / "missing"))
    assert (out.returncode, out.stderr) == (1, f"pulse-sensor-proxy: error: cannot write "
                                            f"{base_dir / 'missing'}/pulse-sensor-proxy-cleanup.path: "
                                            "No such file or directory\n")
