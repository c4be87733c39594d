"""HTTPS mode: a real TLS listener on loopback, real TLS clients (Python ssl, curl), real sshd."""
import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import warnings

import pytest

import pulse_sensor_proxy as psp
from conftest import metric_samples, run_cli, wait_for
from pulse_https_client import ProxyError, PulseHttpClient
from sshnodes import free_port
from test_ssh import fixture_json


def pulse_token():
    """A token as Pulse's register endpoint makes it: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def write_tls(directory):
    directory.mkdir(exist_ok=True)
    cert, key = psp.generate_certificate(["localhost"], ["127.0.0.1"])
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    return cert


@pytest.fixture
def https(cluster, base_dir):
    """`https(count, **config)`: sshd nodes and a daemon serving HTTPS on a loopback port."""

    def make(count=1, **config):
        port = free_port()
        token = pulse_token()
        (base_dir / "token").write_text(token + "\n")
        (base_dir / "token").chmod(0o640)
        cert = write_tls(base_dir / "tls")
        settings = {"http_enabled": True, "http_listen_addr": f"127.0.0.1:{port}",
                    "http_tls_cert": str(base_dir / "tls" / "server.crt"),
                    "http_tls_key": str(base_dir / "tls" / "server.key"),
                    "http_auth_token_file": str(base_dir / "token"),
                    "http_allowed_clients": ["127.0.0.0/8"]}
        settings.update(config)
        daemon, nodes = cluster(count, **settings)
        daemon.url, daemon.token, daemon.port, daemon.cert = f"https://127.0.0.1:{port}", token, \
            port, cert
        return daemon, nodes

    return make


def raw_get(daemon, path, headers=None, source="127.0.0.1", context=None):
    """(status, JSON body) of one GET with exactly these headers."""
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=context, timeout=15,
                                       source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_pulse_reads_a_nodes_sensors_json_over_one_kept_alive_connection(https):
    daemon, (node,) = https(1)
    node.set_mode("fixture", "amd-k10temp-gpu")
    client = PulseHttpClient(daemon.url, daemon.token)
    assert client.temperature("n1") == fixture_json("amd-k10temp-gpu")
    first = client.conn.sock
    assert client.temperature("n1") == fixture_json("amd-k10temp-gpu")
    assert client.conn.sock is first, "the connection is kept alive, as Pulse keeps it"
    assert first.version() in ("TLSv1.2", "TLSv1.3") and first.selected_alpn_protocol() is None
    assert client.healthy()
    assert node.execs() == ["sensors -j", "sensors -j"]
    samples = metric_samples(daemon)
    assert samples[("pulse_proxy_http_requests_total", (("path", "/temps"), ("status", "200")))] == 2
    assert samples[("pulse_proxy_http_latency_seconds_count", (("path", "/temps"),))] == 2
    record = daemon.wait_log(lambda r: r.get("msg") == "HTTPS request" and r.get("node") == "n1",
                             "the audit record")
    assert record["client"] == "127.0.0.1" and record["status"] == 200
    assert daemon.token not in daemon.log_text()


def test_curl_with_the_pinned_public_key(https):
    daemon, (node,) = https(1)
    node.set_mode("fixture", "intel-coretemp-nvme")
    _, pin = psp.cert_fingerprints(daemon.cert)
    out = subprocess.run(["curl", "-sS", "-k", "--pinnedpubkey", pin, "--tlsv1.2",
                          "-H", f"Authorization: Bearer {daemon.token}",
                          "-H", "Accept: application/json", f"{daemon.url}/temps?node=n1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(json.loads(out.stdout)["temperature"]) == fixture_json("intel-coretemp-nvme")
    wrong = "sha256//" + base64.b64encode(b"\0" * 32).decode()
    refused = subprocess.run(["curl", "-sS", "-k", "--pinnedpubkey", wrong, f"{daemon.url}/health"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 90, refused.stderr     # curl: SSL public key does not match


@pytest.mark.parametrize("headers, message", [
    ({}, "missing authorization header"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid authorization format"),
    ({"Authorization": "Bearer"}, "invalid authorization format"),
    ({"Authorization": "Bearer " + "x" * 44}, "invalid token"),
])
def test_token_checks_say_which(https, headers, message):
    daemon, _ = https(1)
    assert raw_get(daemon, "/temps?node=n1", headers) == (401, {"error": message})
    assert raw_get(daemon, "/health", headers) == (401, {"error": message})
    refusal = daemon.wait_log(lambda r: r.get("status") == 401, "the refusal's audit record")
    assert (refusal["client"], refusal["error"], refusal["path"]) == ("127.0.0.1", message, "/temps")
    status, body = raw_get(daemon, "/temps?node=n1", bearer(daemon.token))
    assert status == 200 and "temperature" in body


def test_a_bad_token_is_not_retried_by_pulse(https):
    daemon, _ = https(1)
    client = PulseHttpClient(daemon.url, "y" * 44)
    with pytest.raises(ProxyError) as caught:
        client.temperature("n1")
    assert caught.value.status == 401 and client.attempts == 1


def test_unknown_node_is_403_node_not_allowed(https):
    daemon, _ = https(1)
    status, body = raw_get(daemon, "/temps?node=elsewhere", bearer(daemon.token))
    assert status == 403 and body["error"].startswith("node not allowed: ")
    assert raw_get(daemon, "/temps?node=../x", bearer(daemon.token))[0] == 400
    assert raw_get(daemon, "/temps", bearer(daemon.token)) == \
        (400, {"error": "missing 'node' query parameter"})


def test_ssh_failure_is_5xx_with_the_error(https):
    daemon, (node,) = https(1, authorize=False)
    client = PulseHttpClient(daemon.url, daemon.token)
    with pytest.raises(ProxyError) as caught:
        client.temperature("n1")
    assert caught.value.status == 502 and "permission denied" in caught.value.message
    assert client.attempts == 3, "Pulse retries a 5xx"


def test_source_outside_the_allowed_list_is_403_before_the_token(https):
    daemon, _ = https(1, http_allowed_clients=["127.0.0.1/32"])
    for headers in ({}, bearer(daemon.token)):
        assert raw_get(daemon, "/health", headers, source="127.0.0.2") == \
            (403, {"error": "source not allowed"})
    assert raw_get(daemon, "/health", bearer(daemon.token))[0] == 200


def test_without_http_allowed_clients_allowed_source_subnets_decide(https):
    daemon, _ = https(1, http_allowed_clients=[], allowed_source_subnets=["127.0.0.3/32"])
    assert raw_get(daemon, "/health", bearer(daemon.token), source="127.0.0.3")[0] == 200
    assert raw_get(daemon, "/health", bearer(daemon.token), source="127.0.0.2")[0] == 403


def test_a_flood_from_one_address_is_429_while_another_is_served(https):
    daemon, _ = https(1, rate_limit={"per_minute": 0.001, "burst": 3, "max_concurrent": 3,
                                     "per_node_per_minute": 0, "per_node_burst": 0})
    statuses = [raw_get(daemon, "/health", bearer(daemon.token), source="127.0.0.2")[0]
                for _ in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert raw_get(daemon, "/health", bearer(daemon.token), source="127.0.0.2") == \
        (429, {"error": "rate limit exceeded"})
    assert raw_get(daemon, "/health", bearer(daemon.token), source="127.0.0.3")[0] == 200
    limited = daemon.wait_log(lambda r: r.get("msg") == "Rate limit exceeded", "the 429 record")
    assert (limited["client"], limited["status"]) == ("127.0.0.2", 429)


def tls_client(maximum):
    """A client that offers TLS 1.0 up to `maximum` and nothing newer."""
    warnings.simplefilter("ignore", DeprecationWarning)     # TLS 1.0/1.1 on purpose
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")      # so that this client can offer TLS 1.1
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = maximum
    return context


def test_tls_1_1_is_refused_and_1_2_accepted(https):
    daemon, _ = https(1)
    with pytest.raises(ssl.SSLError):       # the server ends the handshake
        raw_get(daemon, "/health", bearer(daemon.token), context=tls_client(ssl.TLSVersion.TLSv1_1))
    assert raw_get(daemon, "/health", bearer(daemon.token),
                   context=tls_client(ssl.TLSVersion.TLSv1_2))[0] == 200


def http_connections(daemon):
    return metric_samples(daemon)[("pulse_proxy_http_connections", ())]


def test_a_handshake_that_never_finishes_is_closed_and_frees_its_slot(https):
    daemon, _ = https(1)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=psp.READ_TIMEOUT + 10) as sock:
        sock.sendall(b"\x16\x03\x01")         # the start of a ClientHello, then nothing
        wait_for(lambda: http_connections(daemon) == 1, what="the connection to be counted")
        assert sock.recv(1024) == b"", "closed by the daemon"
    wait_for(lambda: http_connections(daemon) == 0, what="the slot to be freed")


def test_a_thousand_slow_tls_clients_leave_temps_answering(https):
    daemon, _ = https(1)
    slow = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.sendall(b"\x16\x03\x01")
            slow.append(sock)
        client = PulseHttpClient(daemon.url, daemon.token)
        assert client.temperature("n1")
        assert http_connections(daemon) <= psp.MAX_HTTPS_CONNECTIONS
    finally:
        for sock in slow:
            sock.close()


def test_head_and_body_limits(https):
    daemon, _ = https(1)
    headers = dict(bearer(daemon.token), **{"X-Filler": "a" * psp.MAX_HTTP_HEAD_BYTES})
    assert raw_get(daemon, "/health", headers)[0] == 431
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=context, timeout=15)
    conn.request("GET", "/health", headers=dict(bearer(daemon.token), **{
        "Content-Length": str(psp.MAX_REQUEST_BYTES + 1)}))
    assert conn.getresponse().status == 413
    conn.close()


@pytest.mark.parametrize("drop, message", [
    ("http_tls_cert", "http_tls_cert: "), ("http_tls_key", "http_tls_key: "),
    ("http_auth_token_file", "no token"), ("short", "needs at least 32"),
])
def test_serve_refuses_https_mode_without_cert_key_or_token(base_dir, drop, message):
    write_tls(base_dir / "tls")
    (base_dir / "token").write_text("short-token\n" if drop == "short" else pulse_token())
    config = {"socket_path": str(base_dir / "run" / "s.sock"), "ssh_dir": str(base_dir / "ssh"),
              "metrics_address": "disabled", "http_enabled": True,
              "http_listen_addr": f"127.0.0.1:{free_port()}",
              "http_tls_cert": str(base_dir / "tls" / "server.crt"),
              "http_tls_key": str(base_dir / "tls" / "server.key"),
              "http_auth_token_file": str(base_dir / "token")}
    if drop in ("http_tls_cert", "http_tls_key"):
        os.unlink(config[drop])
    elif drop == "http_auth_token_file":
        del config[drop]
    (base_dir / "config.yaml").write_text(json.dumps(config))
    out = run_cli("serve", "--config", str(base_dir / "config.yaml"), timeout=30)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (base_dir / "ssh").exists(), "nothing created"


def test_the_originals_inline_token_is_accepted_with_a_warning(https):
    daemon, _ = https(1, http_auth_token_file=None, http_auth_token="z" * 40)
    assert raw_get(daemon, "/health", bearer("z" * 40))[0] == 200
    assert any("http_auth_token is inline" in r["msg"] for r in daemon.log_records())


def test_tls_init_creates_once_and_prints_the_served_fingerprint(https, base_dir):
    daemon, _ = https(1)
    tls = base_dir / "mine"
    config = base_dir / "tls-config.yaml"
    config.write_text(json.dumps({"http_tls_cert": str(tls / "server.crt"),
                                  "http_tls_key": str(tls / "server.key")}))
    out = run_cli("tls", "init", "--config", str(config), "--address", "192.0.2.7")
    assert out.returncode == 0, out.stderr
    key_mode = (tls / "server.key").stat().st_mode & 0o777
    assert key_mode == 0o640
    before = (tls / "server.crt").read_bytes(), (tls / "server.key").read_bytes()
    fingerprint, pin = psp.cert_fingerprints(before[0])
    assert f"fingerprint: {fingerprint}" in out.stdout and pin in out.stdout
    again = run_cli("tls", "init", "--config", str(config))
    assert again.returncode == 0 and "unchanged" in again.stdout and fingerprint in again.stdout
    assert ((tls / "server.crt").read_bytes(), (tls / "server.key").read_bytes()) == before
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(before[0])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.0.2.7" in [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == psp.CERT_DAYS


def served_fingerprint(daemon):
    return psp.cert_fingerprints(ssl.get_server_certificate(("127.0.0.1", daemon.port)).encode())[0]


def test_sighup_picks_up_a_new_certificate_and_keeps_the_socket(https, base_dir):
    daemon, _ = https(1)
    old = psp.cert_fingerprints(daemon.cert)[0]
    assert served_fingerprint(daemon) == old
    new = write_tls(base_dir / "tls")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(lambda r: r.get("msg") == "Configuration reloaded", "the reload")
    assert served_fingerprint(daemon) == psp.cert_fingerprints(new)[0] != old
    assert daemon.rpc("get_status")["success"], "the socket still answers"


def test_call_url_speaks_https_mode_and_pins(https, base_dir):
    daemon, _ = https(1)
    fingerprint = psp.cert_fingerprints(daemon.cert)[0]
    token_file = str(base_dir / "token")
    out = run_cli("call", "get_temperature", "--node", "n1", "--url", daemon.url,
                  "--token-file", token_file, "--fingerprint", fingerprint, "--raw")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"] == "n1"
    wrong = "SHA256:" + ":".join(["00"] * 32)
    refused = run_cli("call", "get_status", "--url", daemon.url, "--token-file", token_file,
                      "--fingerprint", wrong)
    assert refused.returncode == 1 and "nothing was sent" in refused.stderr
    health = [r for r in daemon.log_records() if r.get("path") == "/health"]
    assert health == [], "the pin is checked before any request"


def test_the_originals_http_keys_validate_and_env_overrides_apply(base_dir):
    original = {"http_enabled": True, "http_listen_addr": "[::]:8443",
                "http_tls_cert": "/etc/pulse-sensor-proxy/tls/server.crt",
                "http_tls_key": "/etc/pulse-sensor-proxy/tls/server.key",
                "http_auth_token": "t" * 44}
    path = base_dir / "config.yaml"
    path.write_text(json.dumps(original))
    out = run_cli("config", "validate", "--config", str(path))
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout
    config = psp.load_config(str(path), environ={"PULSE_SENSOR_PROXY_HTTP_ADDR": "127.0.0.1:9443",
                                                 "PULSE_SENSOR_PROXY_HTTP_ENABLED": "false"})
    assert (config["http_listen_addr"], config["http_enabled"]) == ("127.0.0.1:9443", False)
    path.write_text(json.dumps(dict(original, http_auth_token="secret-but-short")))
    out = run_cli("config", "validate", "--config", str(path))
    assert out.returncode == 1 and "at least 32 characters" in out.stdout
    assert "secret-but-short" not in out.stdout, "a token is never echoed"


def test_config_merge_sets_keys_and_defaults_only_where_absent():
    raw = {"log_level": "debug", "http_listen_addr": "[::]:8443"}
    merged = psp.merge_config(raw, set_keys=[("http_enabled", True)],
                              default_keys=[("http_listen_addr", "0.0.0.0:8443")])
    assert merged == {"log_level": "debug", "http_listen_addr": "[::]:8443", "http_enabled": True}
    assert psp.parse_settings(["http_allowed_clients=[10.0.0.5/32]"]) == \
        [("http_allowed_clients", ["10.0.0.5/32"])]
    with pytest.raises(ValueError, match="did you mean 'http_enabled'"):
        psp.parse_settings(["http_enable=true"])
