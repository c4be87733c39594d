"""Pulse's client finding the socket, as issue 20 describes internal/tempproxy/client.go
NewClient: $PULSE_SENSOR_PROXY_SOCKET when set, else /run/pulse-sensor-proxy/pulse-sensor-proxy.sock
if it exists (stat, so a link is followed), else /mnt/pulse-proxy/pulse-sensor-proxy.sock if it
exists, else the /run path. Pulse v4.24.0-rc.1's client knows only the first two.

Run inside a container next to tests/pulse_client.py (its requests) and tests/gojson.py (how
Pulse decodes the replies), standard library only:
`python3 pulse_socket_lookup.py NODE [PATH]` asks get_status and get_temperature for NODE
through PATH, or through the path the lookup picks, and prints one JSON line:
{"path": ..., "get_status": reply, "get_temperature": reply} or {"path": ..., "error": ...}.
"""
import json
import os
import sys

from pulse_client import call_once

RUN_SOCKET = "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
CONTAINER_SOCKET = "/mnt/pulse-proxy/pulse-sensor-proxy.sock"


def socket_path():
    if os.environ.get("PULSE_SENSOR_PROXY_SOCKET"):
        return os.environ["PULSE_SENSOR_PROXY_SOCKET"]
    for path in (RUN_SOCKET, CONTAINER_SOCKET):
        if os.path.exists(path):
            return path
    return RUN_SOCKET


def main(node, path=None):
    path = path or socket_path()
    try:
        print(json.dumps({"path": path, "get_status": call_once(path, "get_status", {}),
                          "get_temperature": call_once(path, "get_temperature", {"node": node})}))
    except OSError as exc:
        print(json.dumps({"path": path, "error": f"{type(exc).__name__}: {exc}"}))


if __name__ == "__main__":
    main(*sys.argv[1:])
