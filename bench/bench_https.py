#!/usr/bin/env python3
"""HTTPS mode against the socket, same node, same daemon:

  (a) the socket's get_temperature, warm (one connection per request, as Pulse's client does),
  (b) GET /temps over one kept-alive TLS connection, warm (as Pulse's HTTP client does),
  (c) GET /temps with a new TLS connection (full handshake) per request.

The node is a loopback sshd whose forced command is a plain `cat` of a sensors sample, so the
node's own cost is small and the same for every row. Needs root (test accounts, sshd).

    .venv/bin/python bench/bench_https.py [--requests 500]
"""
import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pulse_sensor_proxy as psp  # noqa: E402
from bench_ssh import LIMITS, authorize, ms, percentile, proxy_latencies  # noqa: E402
from conftest import DaemonProcess  # noqa: E402
from pulse_https_client import PulseHttpClient  # noqa: E402
from sshnodes import NodeSet, SshLab, free_port  # noqa: E402


def start_daemon(work, node):
    work.mkdir()
    work.chmod(0o755)
    (work / "tls").mkdir()
    cert, key = psp.generate_certificate(["localhost"], ["127.0.0.1"])
    (work / "tls" / "server.crt").write_bytes(cert)
    (work / "tls" / "server.key").write_bytes(key)
    token = base64.urlsafe_b64encode(os.urandom(32)).decode()
    (work / "token").write_text(token)
    port = free_port()
    config = {"nodes": {"n1": {"host": node.host, "port": node.port, "user": node.user}},
              "rate_limit": LIMITS, "log_level": "warning", "http_enabled": True,
              "http_listen_addr": f"127.0.0.1:{port}",
              "http_tls_cert": str(work / "tls" / "server.crt"),
              "http_tls_key": str(work / "tls" / "server.key"),
              "http_auth_token_file": str(work / "token"),
              "http_allowed_clients": ["127.0.0.1/32"]}
    daemon = DaemonProcess(work, config).start()
    authorize(node, (daemon.ssh_dir / "id_ed25519.pub").read_text())
    return daemon, f"https://127.0.0.1:{port}", token


def https_latencies(url, token, requests, keep_alive):
    client = PulseHttpClient(url, token)
    for _ in range(5):
        client.temperature("n1")
    samples = []
    for _ in range(requests):
        if not keep_alive:
            client.close()
        start = time.perf_counter()
        client.temperature("n1")
        samples.append(time.perf_counter() - start)
    client.close()
    return samples


def row(name, samples):
    return f"{name}: p50 {ms(statistics.median(samples))}, p99 {ms(percentile(samples, 99))}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="psp-bench-") as tmp, \
            NodeSet(SshLab(), 1) as nodes:
        daemon, url, token = start_daemon(Path(tmp) / "daemon", nodes[0])
        try:
            socket_path = proxy_latencies(daemon, args.requests)
            kept = https_latencies(url, token, args.requests, keep_alive=True)
            fresh = https_latencies(url, token, args.requests, keep_alive=False)
        finally:
            daemon.stop()
    print(f"command: {' '.join(sys.argv)}")
    print(row(f"(a) socket get_temperature, warm ({args.requests})", socket_path))
    print(row(f"(b) HTTPS /temps, one kept-alive TLS connection ({args.requests})", kept))
    print(row(f"(c) HTTPS /temps, new TLS connection each ({args.requests})", fresh))
    print(f"    full handshake costs about {ms(statistics.median(fresh) - statistics.median(kept))} "
          "at p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
