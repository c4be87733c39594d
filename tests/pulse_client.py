"""Pulse's temperature client (v4.25 through v5.0.17) as issue 11 describes it, for the tests.

Written from that description of `internal/tempproxy/client.go` and
`internal/monitoring/temperature.go`, not from their code: the daemon is tested against how
the client behaves, not against our idea of it.

* `classify(error)`: the class Pulse gives an error string, by case-insensitive substring, in
  this order: 1 node, 2 rate limit, 3 auth (exact strings, or containing "admin capability"),
  4 ssh, 5 sensor, 6 anything else.
* `call(...)`: one request on a new connection per attempt; classes 4 and 6 are retried
  (4 attempts, 100 ms x 2^n between them). When every attempt fails the client ends with
  "max retries exhausted", a transport failure: for class 6 as the issue says, and for class 4
  too, as the end of client.go's retry loop does whatever the class was.
* `Collector`: Pulse's bookkeeping per poll: a transport failure (class 2, or retries
  exhausted) counts towards switching the proxy off for every node (3 of them); any other
  failure counts against that host only.

Run as a program (`python3 pulse_client.py SOCKET`), it is one Pulse process: each line on
stdin is a JSON list of node names, polled at once as one cycle; it prints one JSON summary
per cycle. Standard library only, so the system python3 runs it under any uid.
"""
import json
import socket
import sys
import threading
import time

import gojson  # Pulse decodes replies with Go's encoding/json

NODE, RATE, AUTH, SSH, SENSOR, OTHER = 1, 2, 3, 4, 5, 6
RETRIED = {SSH, OTHER}
TRANSPORT = {RATE, OTHER}          # what counts towards switching the proxy off for every node
ATTEMPTS = 4
BACKOFF = 0.1
DISABLE_AFTER = 3


def classify(error):
    text = error.lower()
    if any(word in text for word in ("rejected by validator", "not in allowlist", 'node "')):
        return NODE
    if "rate limit" in text:
        return RATE
    if error in ("unauthorized", "method requires host-level privileges",
                 "method requires admin capability") or "admin capability" in text:
        return AUTH
    if any(word in text for word in ("ssh", "connection", "timeout")):
        return SSH
    if any(word in text for word in ("sensor", "temperature")):
        return SENSOR
    return OTHER


def call_once(socket_path, method, params, timeout=30.0):
    return exchange(socket_path, json.dumps({"method": method, "params": params}), timeout)


def exchange(socket_path, line, timeout=30.0):
    """One line out and one line back on a new connection, as Pulse sends each request: the
    reply as Go's decoder takes it."""
    return gojson.check_reply(exchange_bytes(socket_path, line, timeout))


def exchange_bytes(socket_path, line, timeout=30.0):
    """`exchange`'s reply as it came, undecoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


class Outcome:
    """What one call came to: `data` on success, else the last error, its class, and whether
    Pulse counts it as a transport failure."""

    def __init__(self, data=None, error=None, attempts=1, exhausted=False):
        self.data, self.error, self.attempts = data, error, attempts
        self.kind = classify(error) if error is not None else None
        self.transport = exhausted or self.kind in TRANSPORT


def call(socket_path, method, params, sleep=time.sleep):
    for attempt in range(1, ATTEMPTS + 1):
        reply = call_once(socket_path, method, params)
        if reply.get("success"):
            return Outcome(data=reply.get("data"), attempts=attempt)
        error = reply.get("error", "")
        if classify(error) not in RETRIED:
            return Outcome(error=error, attempts=attempt)
        if attempt < ATTEMPTS:
            sleep(BACKOFF * 2 ** (attempt - 1))
    return Outcome(error=error, attempts=ATTEMPTS, exhausted=True)


class Collector:
    """Pulse's per-process temperature state: transport failures switch the proxy off."""

    def __init__(self):
        self.lock = threading.Lock()
        self.transport_failures = 0
        self.disabled = False

    def record(self, outcome):
        with self.lock:
            if outcome.data is not None:
                self.transport_failures = 0
            elif outcome.transport:
                self.transport_failures += 1
                if self.transport_failures >= DISABLE_AFTER:
                    self.disabled = True


def poll_cycle(socket_path, nodes, collector):
    """Every node at once, as Pulse's poll does; a summary of what came back."""
    results = {}

    def one(node):
        outcome = call(socket_path, "get_temperature", {"node": node})
        collector.record(outcome)
        results[node] = outcome

    threads = [threading.Thread(target=one, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes = list(results.values())
    return {"answered": sum(o.data is not None for o in outcomes),
            "cached": sum(bool(o.data and o.data.get("cached")) for o in outcomes),
            "attempts": sum(o.attempts for o in outcomes),
            "errors": sorted({o.error for o in outcomes if o.error}),
            "rate_limited": sum(o.kind == RATE for o in outcomes),
            "transport_failures": sum(o.transport for o in outcomes),
            "disabled": collector.disabled}


def main(socket_path):
    collector = Collector()
    for line in sys.stdin:
        print(json.dumps(poll_cycle(socket_path, json.loads(line), collector)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
