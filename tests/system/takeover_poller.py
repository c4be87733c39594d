"""Pulse's poll of one node from inside a container, across a switch of the proxy behind the
socket: `python3 takeover_poller.py SOCKET NODE`. get_temperature on a new connection, as
Pulse's client calls it (pulse_client.call_once), every POLL seconds; when the socket does not
take the connection, again within RETRY seconds, so the end of a gap is seen at once. One JSON line per call: "t"
(CLOCK_MONOTONIC, the host's clock too), "ok", and "detail": a digest of the temperature text
(which proxy answered) or the error. Standard library only."""
import hashlib
import json
import sys
import time

import pulse_client

POLL = 0.4       # below the original's rate limit (per_peer_interval_ms: 333) with a margin
RETRY = 0.02


def one_call(socket_path, node):
    """(ok, detail, whether to retry at once)."""
    try:
        reply = pulse_client.call_once(socket_path, "get_temperature", {"node": node}, timeout=5)
    except OSError as exc:
        return False, type(exc).__name__, True
    except ValueError as exc:
        return False, f"bad reply: {exc}", False
    if not reply.get("success"):
        return False, reply.get("error", ""), False
    text = str((reply.get("data") or {}).get("temperature"))
    return True, hashlib.sha256(text.encode()).hexdigest()[:12], False


def main(socket_path, node):
    while True:
        started = time.monotonic()
        ok, detail, again = one_call(socket_path, node)
        print(json.dumps({"t": started, "ok": ok, "detail": detail}), flush=True)
        time.sleep(RETRY if again else POLL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
