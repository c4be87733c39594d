#!/usr/bin/env python3
"""pulse-sensor-proxy: the host-side bridge between Pulse and the `sensors -j` of Proxmox nodes.

Pulse usually runs in an unprivileged LXC container. To show temperatures it needs `sensors -j`
from every cluster node over SSH, and an SSH key inside the container would let a compromised
container walk the cluster. This daemon keeps the only key on the host instead:

* it serves a Unix socket (default ``/run/pulse-sensor-proxy/pulse-sensor-proxy.sock``) and
  authenticates every peer by the kernel's ``SO_PEERCRED`` (uid, gid, pid);
* peers send one JSON object per line and get one JSON object per line back::

      -> {"correlation_id": "<uuid>", "method": "get_status", "params": null}
      <- {"correlation_id": "<uuid>", "success": true, "data": {...}}
      <- {"correlation_id": "<uuid>", "success": false, "error": "rate limit exceeded"}

  The same JSON may also arrive as the body of an HTTP/1.x request on the socket
  (``curl --unix-socket SOCK -d '{"method":"get_status"}' http://localhost/``);
* every peer is rate limited (token bucket per uid+pid), every request is written to an audit
  log (JSON lines on stdout, journald keeps them), and a Prometheus endpoint
  (``http://127.0.0.1:9127/metrics``, ``/health``) reports what happens.

Commands (``pulse-sensor-proxy --help`` lists their options)::

    serve                     run the daemon (the default command)
    version                   print the version and exit
    call METHOD [--node N]    send one request to a running daemon, pretty-print the answer
    config validate           check a config file; prints every problem, or OK
    config migrate [--write]  rewrite a config of the original proxy in this one's vocabulary
    config merge              add subnets / peer uid ranges to a config file (used by the installer)
    doctor                    check every link from Pulse to each node's sensors; change nothing
    demo                      run the daemon with every path under ./demo-run (no root, no Proxmox)

Methods and the capability each needs::

    get_status                   read   version, public key, paths, uptime, the caller's identity
    get_temperature (get_temp)   read   `sensors -j` of one node (and its disks' SMART temperatures)
    register_nodes               read   the known nodes and whether the key works on each
    ensure_cluster_keys          admin  per node: is the proxy's key accepted? (+ the line to install)
    request_cleanup {host}       cleanup  queue the removal of the proxy's key from a node (admin too)

Peers: uid 0 and the daemon's own uid get read+admin; ``allowed_peers`` in the config grants
uids or uid ranges; uids inside a range that ``/etc/subuid`` gives to ``root`` (the uids of
unprivileged containers' root) get read when ``allow_idmapped_root`` is true. Anyone else is
refused with ``unauthorized``.

Configuration: ``/etc/pulse-sensor-proxy/config.yaml`` (or ``$PULSE_SENSOR_PROXY_CONFIG``); a
missing file means the defaults in ``DEFAULT_CONFIG`` below. docs/configuration.md documents
every key.

The module reads top-down: constants, configuration, pure logic (peers, rate limiting, request
validation, nodes, SMART, metrics), then I/O (audit log, keys on disk, nodes over SSH, the key
commands), the request path (connections, the wire, the dispatcher, the socket and metrics
listeners, the daemon that wires them, the methods, HTTPS mode), and the command line last.
Start at `Daemon` to see how the parts fit, and at `SocketListener` for the path of one
request: `answer_at_once` for a method that answers at once, `converse` for the rest
(`SocketAcceptor` and `SocketTransport` bring it the socket's bytes).
"""
import argparse
import base64
import bisect
import contextlib
import difflib
import errno
import functools
import hashlib
import hmac
import http
import importlib
import ipaddress
import itertools
import json
import math
import os
import random
import re
import reprlib
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
import types
import typing
import uuid

__version__ = "0.1.0"
# build_zipapp.sh rewrites these two lines in the copy it packages.
BUILD_COMMIT = "source"
BUILD_DATE = ""



class _LazyModule:
    """A module imported on first attribute use: `version` and `--help` must not pay for it."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = importlib.import_module(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


asyncio = _LazyModule("asyncio")

# ---------------------------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------------------------

PROG = "pulse-sensor-proxy"
DEFAULT_CONFIG_PATH = "/etc/pulse-sensor-proxy/config.yaml"
DEFAULT_SOCKET_PATH = "/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
DEFAULT_SSH_DIR = "/var/lib/pulse-sensor-proxy/ssh"
KEY_NAME = "id_ed25519"
KEY_COMMENT = "pulse-sensor-proxy"

ENV_CONFIG = "PULSE_SENSOR_PROXY_CONFIG"
ENV_SOCKET = "PULSE_SENSOR_PROXY_SOCKET"
ENV_SSH_DIR = "PULSE_SENSOR_PROXY_SSH_DIR"
ENV_METRICS_ADDR = "PULSE_SENSOR_PROXY_METRICS_ADDR"
ENV_ALLOWED_SUBNETS = "PULSE_SENSOR_PROXY_ALLOWED_SUBNETS"
# The original's names for the HTTPS mode's overrides, plus one for the token file.
ENV_HTTP = {"PULSE_SENSOR_PROXY_HTTP_ENABLED": "http_enabled",
            "PULSE_SENSOR_PROXY_HTTP_ADDR": "http_listen_addr",
            "PULSE_SENSOR_PROXY_HTTP_TLS_CERT": "http_tls_cert",
            "PULSE_SENSOR_PROXY_HTTP_TLS_KEY": "http_tls_key",
            "PULSE_SENSOR_PROXY_HTTP_AUTH_TOKEN_FILE": "http_auth_token_file"}

MAX_REQUEST_BYTES = 16 * 1024      # one request line (or HTTP head, or HTTP body)
READ_TIMEOUT = 5.0                 # for a whole request to arrive
HANDLER_TIMEOUT = 30.0             # for a method to answer
READ_BUFFER_BYTES = 4 * MAX_REQUEST_BYTES   # read ahead of a connection, then it is held off
MAX_CONNECTIONS = 256              # simultaneous socket connections
MAX_CACHED_PEERS = 4096            # (uid, gid) -> capabilities, per config: Dispatcher.peer
SOCKET_BACKLOG = 512               # connections the kernel queues for the socket
ACCEPT_BATCH = 4                   # accepted per loop pass: see SocketAcceptor
LOOK_AGAIN_AFTER = 0.002           # an answered connection is watched by the loop this late
ACCEPT_RETRY_DELAY = 1.0           # accepting pauses this long after a refused accept (EMFILE)
SHUTDOWN_GRACE = 10.0              # in-flight requests may finish for this long on SIGTERM
RATE_LIMIT_PAUSE = 0.002           # x requests waiting: Daemon.pause_over_limit
WRITE_TIMEOUT = 10.0               # for a reply to be read by its peer: Connection.drain
REFUSAL_SUMMARY_INTERVAL = 10.0    # refusals of one peer are logged once per interval
MAX_AUDIT_BUFFER = 1024 * 1024     # audit bytes waiting for the log pipe: AuditLog
MAX_CONFIG_BYTES = 1024 * 1024
MAX_METRICS_CONNECTIONS = 32
DEFAULT_TLS_DIR = "/etc/pulse-sensor-proxy/tls"
MAX_HTTPS_CONNECTIONS = 256        # simultaneous HTTPS connections, handshakes included
MAX_HTTP_HEAD_BYTES = 8192         # request line and headers of one HTTPS request
HTTPS_IDLE_TIMEOUT = 120.0         # a keep-alive connection between requests (Pulse: 90 s)
MIN_TOKEN_LENGTH = 32
CERT_DAYS = 825
SOCKET_DIR_MODE = 0o775            # container uids must traverse it; SO_PEERCRED decides access
SOCKET_MODE = 0o777

CAP_READ, CAP_ADMIN, CAP_CLEANUP = "read", "admin", "cleanup"
CAPABILITIES = (CAP_READ, CAP_ADMIN, CAP_CLEANUP)
CLEANUP_REQUEST = "cleanup-request.json"   # in the state dir; a root .path unit acts on it
MAX_CLEANUP_HOSTS = 64             # hosts one pending request may hold

# The wire's error strings. Each maps to the `result` label of metrics and audit records and,
# for the HTTP form, to a status code. Pulse's client sorts errors by words in them (README,
# "Errors"): per-node errors say `node "NAME"`, `ssh` or `sensors`, never `rate limit`, which
# is kept for the one error that concerns every node: the peer itself is over its allowance.
E_TOO_LARGE = "payload too large"
E_READ_TIMEOUT = "read timeout"
E_INVALID = "invalid request format"
E_EMPTY = "empty request"
E_UNKNOWN_METHOD = "unknown method"
E_TIMEOUT = "timeout"
E_BUSY = "server busy"
E_UNAUTHORIZED = "unauthorized"
E_FORBIDDEN = "method requires admin capability"       # Pulse's auth class, verbatim
E_FORBIDDEN_CLEANUP = "method requires cleanup or admin capability"
E_RATE_LIMITED = "rate limit exceeded"
E_INTERNAL = "internal error"
ERROR_RESULTS = {
    E_TOO_LARGE: ("invalid", 413), E_READ_TIMEOUT: ("timeout", 408), E_INVALID: ("invalid", 400),
    E_EMPTY: ("invalid", 400), E_UNKNOWN_METHOD: ("invalid", 200), E_TIMEOUT: ("timeout", 200),
    E_BUSY: ("busy", 503), E_UNAUTHORIZED: ("unauthorized", 403),
    E_FORBIDDEN: ("forbidden", 403), E_FORBIDDEN_CLEANUP: ("forbidden", 403),
    E_RATE_LIMITED: ("rate_limited", 429),
}
# Requests refused before any work: each costs its peer a limiter token all the same.
CHARGED_REFUSALS = {E_INVALID, E_EMPTY, E_UNKNOWN_METHOD, E_FORBIDDEN, E_FORBIDDEN_CLEANUP,
                    E_UNAUTHORIZED}
# Refusals that RefusalSummary folds into one log line per peer and interval.
REFUSALS = CHARGED_REFUSALS | {E_TOO_LARGE, E_READ_TIMEOUT, E_BUSY, E_RATE_LIMITED}

DEFAULT_CONFIG = {
    "allowed_source_subnets": [],
    "metrics_address": "127.0.0.1:9127",
    "allowed_peers": [],
    "allow_idmapped_root": True,
    "rate_limit": {"per_minute": 60, "burst": 20, "max_concurrent": 10,
                   "per_node_per_minute": 60, "per_node_burst": 4},
    "log_level": "info",
    "socket_path": DEFAULT_SOCKET_PATH,
    "ssh_dir": DEFAULT_SSH_DIR,
    "subuid_file": "/etc/subuid",
    "nodes": {},
    "pve_dir": "/etc/pve",
    "strict_node_validation": True,
    "local_sensors": True,
    "host_key_policy": "tofu",
    "ssh": {"user": "root", "port": 22, "connect_timeout": 5.0, "command_timeout": 10.0,
            "max_output_bytes": 1024 * 1024},
    "breaker_cooldown_seconds": 30.0,
    "node_min_interval_seconds": 2.0,
    "admin_identity": ["/root/.ssh/id_ed25519", "/root/.ssh/id_ecdsa", "/root/.ssh/id_rsa"],
    "http_enabled": False,
    "http_listen_addr": "0.0.0.0:8443",
    "http_tls_cert": DEFAULT_TLS_DIR + "/server.crt",
    "http_tls_key": DEFAULT_TLS_DIR + "/server.key",
    "http_auth_token_file": None,
    "http_auth_token": None,
    "http_allowed_clients": [],
    "disk_temperatures": True,
    "smart_interval": 1800.0,
    "local_smart_file": "/var/lib/pulse-sensor-proxy-smart/local",
}
SENSORS_COMMAND = "sensors -j"
# AES-GCM first, then asyncssh's defaults: a reading is a handful of packets each way, and
# asyncssh's chacha20-poly1305 builds a cipher context per packet (about 12 us a packet against
# about 2 us for AES-GCM, which OpenSSL runs in hardware on every CPU Proxmox supports).
SSH_CIPHERS = "^aes256-gcm@openssh.com,aes128-gcm@openssh.com"
# With disk_temperatures the key line forces this program instead of `sensors -j`. Its only
# input is a choice between two fixed modes: SSH_ORIGINAL_COMMAND exactly `smart` reads SMART,
# anything else is `sensors -j` (`{}`, no sensors, where lm-sensors is not installed). It is
# POSIX sh with coreutils and util-linux only: no jq, no Python on the node. `case` words are
# not split or globbed, and device names come from the node's kernel, never from the client.
# Disks (lsblk type `disk`, but not zram, rbd, nbd or drbd, which lsblk also types `disk`) are
# read one at a time, each `smartctl` bounded by `timeout`; `-n standby` never wakes a drive.
# Each disk's raw output is framed by `@@disk NAME` and `@@status N` lines (a JSON line never
# starts with `@`); parse_smart_report turns the frames into DISK objects on the proxy.
# No double quote or backslash inside: the text sits in command="..." as it is.
SMART_COMMAND = "smart"
SMART_DISK_SECONDS = 5
SMART_PROGRAM = (
    "case $SSH_ORIGINAL_COMMAND in smart) lsblk -dn -o NAME,TYPE | while read -r name type; do "
    "case $type:$name in disk:zram*|disk:rbd*|disk:nbd*|disk:drbd*) ;; disk:*) echo @@disk $name; "
    f"timeout -k 1 {SMART_DISK_SECONDS} smartctl -n standby -i -A --json=o /dev/$name; "
    "status=$?; echo; echo @@status $status;; esac; done;; "
    "*) command -v sensors >/dev/null || { echo {}; exit 0; }; exec sensors -j;; esac")
SMART_READ_TIMEOUT = 120.0         # one node's whole SMART read (disks x SMART_DISK_SECONDS)
SMART_MAX_OUTPUT = 8 * 1024 * 1024  # --json=o carries the text output too: ~40 KB per disk
SMART_RETRY = 60.0                 # after a failed SMART read, before the next try
# This host's disks: the daemon's sandbox (no capabilities, a private /dev) opens none, so
# pulse-sensor-proxy-smart.service reads them as root with only CAP_SYS_RAWIO/CAP_SYS_ADMIN
# and block devices, into `local_smart_file`; the daemon re-reads that file when it changes.
SMART_LOCAL_UNIT = "pulse-sensor-proxy-smart.service"
SMART_LOCAL_TIMER = "pulse-sensor-proxy-smart.timer"
LOCAL_SMART_RECHECK = 10.0         # seconds between looks at local_smart_file's mtime
LOCAL_SMART_SLACK = 120.0          # smart-local reads again once the file is this near due
LOCAL_SMART_STALE = 900.0          # past smart_interval: the timer (every 5 min) has stopped
BREAKER_THRESHOLD = 3              # consecutive failures that open a node's breaker
BREAKER_MAX_FACTOR = 8             # the cool-down doubles per failed probe, up to this factor
INVENTORY_RECHECK = 2.0            # seconds between mtime checks of the node sources
E_INVALID_NODE = "invalid node name"
KNOWN_NODES_SHOWN = 8              # names listed in a `not in allowlist` error
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every reason, one sentence each."""

    def __init__(self, problems):
        super().__init__("; ".join(problems))
        self.problems = problems


def _bounded_repr():
    shape = reprlib.Repr()
    shape.maxlevel, shape.maxstring, shape.maxother = 3, 60, 60
    return shape


_SHORT_REPR = _bounded_repr()


def _describe(value):
    """A short repr; bounded work too (YAML aliases can make a small file a huge value)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_bool(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _check_abs_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("expected an absolute path")
    return os.path.normpath(value)


def _check_paths(value):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected an absolute path or a list of them")
    return [_check_abs_path(item) for item in items]


def _check_log_level(value):
    if not isinstance(value, str) or value not in LOG_LEVELS:
        raise ValueError("expected one of " + ", ".join(LOG_LEVELS))
    return value


def parse_network(text):
    """A CIDR or a bare address as a network; bare addresses become /32 or /128."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected a CIDR or an IP address such as 192.168.1.0/24")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("expected a CIDR or an IP address such as 192.168.1.0/24") from None


def _check_subnets(value):
    if not isinstance(value, list):
        raise ValueError("expected a list of CIDRs or IP addresses")
    networks = dict.fromkeys(parse_network(item) for item in value)   # ordered, de-duplicated
    return [str(n) for n in networks]


def parse_host_port(text):
    """`host:port` or `[v6]:port` as (host, port); host must be an IP literal or localhost."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text or "")
    if not match:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:9127), [V6]:PORT or 'disabled'")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected an IP address or localhost as host, got {host!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError("expected a port between 1 and 65535")
    return host, port


def _check_metrics_address(value):
    if value == "disabled":
        return value
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT or 'disabled'")
    parse_host_port(value)
    return value


def parse_uid_range(value):
    """`1001`, `"1001"` or `"100000-165535"` as an inclusive (low, high) pair."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,10}(-\d{1,10})?", value.strip()):
        low, _, high = value.strip().partition("-")
        low, high = int(low), int(high or low)
    else:
        raise ValueError("expected a uid or a range such as \"100000-165535\"")
    if not 0 <= low <= high <= 0xFFFFFFFF:
        raise ValueError("expected 0 <= first uid <= last uid <= 4294967295")
    return low, high


def _int_at_least(minimum):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value
    return check


def _check_peers(value):
    if not isinstance(value, list):
        raise ValueError("expected a list of {uid: N} or {uids: \"LOW-HIGH\"} entries")
    peers, problems = [], []
    for index, entry in enumerate(value):
        where = f"allowed_peers[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: got {_describe(entry)}, expected a mapping such as {{uid: 1001}}")
            continue
        unknown = sorted(set(entry) - {"uid", "uids", "gid", "capabilities"})
        if unknown:
            problems.append(f"{where}: unknown key {unknown[0]!r} (known: uid, uids, gid, capabilities)")
        if ("uid" in entry) == ("uids" in entry):
            problems.append(f"{where}: needs exactly one of 'uid' or 'uids'")
            continue
        key = "uid" if "uid" in entry else "uids"
        try:
            if key == "uid":
                uid = _int_at_least(0)(entry["uid"])
                uids = (uid, uid)
            else:
                uids = parse_uid_range(entry["uids"])
        except ValueError as exc:
            problems.append(f"{where}.{key}: got {_describe(entry[key])}, {exc}")
            continue
        gid = entry.get("gid")
        if gid is not None:
            try:
                _int_at_least(0)(gid)
            except ValueError as exc:
                problems.append(f"{where}.gid: got {_describe(gid)}, {exc}")
                continue
        caps = entry.get("capabilities", [CAP_READ])
        if not isinstance(caps, list) or not caps or any(c not in CAPABILITIES for c in caps):
            problems.append(f"{where}.capabilities: got {_describe(caps)}, expected a list of "
                            "read, admin and/or cleanup")
            continue
        peers.append({"uids": uids, "gid": gid, "capabilities": frozenset(caps)})
    if problems:
        raise ConfigError(problems)
    return peers


def _check_number(value, minimum=0.0, strict=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value != float("inf") and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"expected a number {'>' if strict else '>='} {minimum:g}")
    return float(value)


def _check_port(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("expected a port between 1 and 65535")
    return value


def _check_user(value):
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", value):
        raise ValueError("expected a login name such as root")
    return value


def _check_mapping(value, checks, where):
    """Validate the sub-keys of a mapping; returns the checked values (no defaults)."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with " + ", ".join(checks))
    checked, problems = {}, []
    for key, item in value.items():
        if key not in checks:
            problems.append(f"{where}: unknown key {key!r}{_suggest(key, checks)}")
            continue
        try:
            checked[key] = checks[key](item)
        except ValueError as exc:
            problems.append(f"{where}.{key}: got {_describe(item)}, {exc}")
    if problems:
        raise ConfigError(problems)
    return checked


def _positive(value):
    return _check_number(value, 0, strict=True)


RATE_LIMIT_CHECKS = {"per_minute": _positive, "burst": _int_at_least(1),
                     "max_concurrent": _int_at_least(1), "per_node_per_minute": _check_number,
                     "per_node_burst": _int_at_least(0)}
SSH_CHECKS = {"user": _check_user, "port": _check_port, "connect_timeout": _positive,
              "command_timeout": _positive, "max_output_bytes": _int_at_least(1024)}


def _check_rate_limit(value):
    return dict(DEFAULT_CONFIG["rate_limit"], **_check_mapping(value, RATE_LIMIT_CHECKS, "rate_limit"))


def _check_ssh(value):
    return dict(DEFAULT_CONFIG["ssh"], **_check_mapping(value, SSH_CHECKS, "ssh"))


def _check_nodes(value):
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of node name to {host, port, user}")
    nodes, problems = {}, []
    for name, entry in value.items():
        where = f"nodes.{name}"
        try:
            validate_node_name(name)
        except RequestError:
            problems.append(f"nodes: {_describe(name)} is not a valid node name "
                            "(1-64 of A-Z a-z 0-9 . _ -)")
            continue
        try:
            checked = _check_mapping(entry if entry is not None else {},
                                     {"host": _check_host, "port": _check_port, "user": _check_user},
                                     where)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except ValueError as exc:
            problems.append(f"{where}: got {_describe(entry)}, {exc}")
            continue
        nodes[name] = checked
    if problems:
        raise ConfigError(problems)
    return nodes


def _check_host(value):
    try:
        return validate_node_name(value)
    except RequestError:
        raise ValueError("expected a host name or an IP address") from None


def _check_listen_address(value):
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT such as 0.0.0.0:8443 or [::]:8443")
    parse_host_port(value)
    return value


def _optional(check):
    return lambda value: None if value is None else check(value)


def _check_token(value):
    # ConfigError, not ValueError: the message must not quote the value (it is a secret).
    if not isinstance(value, str) or len(value.strip()) < MIN_TOKEN_LENGTH:
        raise ConfigError([f"http_auth_token: expected a token of at least {MIN_TOKEN_LENGTH} "
                           "characters"])
    return value.strip()


def _check_interval(value):
    try:
        seconds = parse_duration(value)
    except (ValueError, OverflowError):     # OverflowError: an integer no float holds
        raise ValueError("expected seconds or a duration such as 30m") from None
    if not math.isfinite(seconds) or seconds < 60:
        raise ValueError("expected at least 60 seconds (each read costs every disk a query)")
    return seconds


def _check_host_key_policy(value):
    if value not in ("tofu", "strict"):
        raise ValueError("expected tofu or strict")
    return value


CONFIG_CHECKS = {
    "allowed_source_subnets": _check_subnets,
    "metrics_address": _check_metrics_address,
    "allowed_peers": _check_peers,
    "allow_idmapped_root": _check_bool,
    "rate_limit": _check_rate_limit,
    "log_level": _check_log_level,
    "socket_path": _check_abs_path,
    "ssh_dir": _check_abs_path,
    "subuid_file": _check_abs_path,
    "nodes": _check_nodes,
    "pve_dir": _check_abs_path,
    "strict_node_validation": _check_bool,
    "local_sensors": _check_bool,
    "host_key_policy": _check_host_key_policy,
    "ssh": _check_ssh,
    "breaker_cooldown_seconds": _positive,
    "node_min_interval_seconds": _check_number,
    "admin_identity": _check_paths,
    "http_enabled": _check_bool,
    "http_listen_addr": _check_listen_address,
    "http_tls_cert": _check_abs_path,
    "http_tls_key": _check_abs_path,
    "http_auth_token_file": _optional(_check_abs_path),
    "http_auth_token": _optional(_check_token),
    "http_allowed_clients": _check_subnets,
    "disk_temperatures": _check_bool,
    "smart_interval": _check_interval,
    "local_smart_file": _check_abs_path,
}


def _suggest(key, known):
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(raw, source="config"):
    """Check a parsed YAML document and return the effective config (defaults filled in).

    Pure: every problem is collected and raised together as one ConfigError.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping of keys at the top level, "
                           f"got {type(raw).__name__}"])
    config, problems = {}, []
    for key, value in raw.items():
        check = CONFIG_CHECKS.get(key)
        if check is None:
            problems.append(f"{source}: unknown key {_describe(key)}{_suggest(key, CONFIG_CHECKS)}")
            continue
        try:
            config[key] = check(value)
        except ConfigError as exc:
            problems.extend(f"{source}: {p}" for p in exc.problems)
        except ValueError as exc:
            problems.append(f"{source}: {key}: got {_describe(value)}, {exc}")
    if problems:
        raise ConfigError(problems)
    for key, default in DEFAULT_CONFIG.items():
        if key not in config:
            config[key] = CONFIG_CHECKS[key](default)
    return config


def _yaml_loader():
    """yaml.SafeLoader that refuses duplicate keys (a silently ignored duplicate hides edits)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue    # SafeLoader's construct_mapping reports it with its position
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return yaml, StrictLoader


def read_config_file(path):
    """The raw YAML document of `path` ({} when the file does not exist)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is this a config file?"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    yaml, loader = _yaml_loader()
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None
    except ValueError as exc:       # PyYAML's scanner calls chr() on escapes such as "\U00110000"
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None


def read_optional_text(path):
    """A small text file's contents, or None when it does not exist."""
    try:
        with open(path) as handle:
            return handle.read(MAX_CONFIG_BYTES)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def read_translated_config(path):
    """The config file in our vocabulary, and the notes on what was translated or ignored."""
    raw, notes, problems = translate_original(read_config_file(path), read_optional_text)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return raw, notes


def load_config(path=None, environ=None):
    """Read, translate, validate and apply environment overrides; returns the effective config
    (with `config_notes`: what of the original proxy's vocabulary was translated or ignored)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    raw, notes = read_translated_config(path)
    config = validate_config(raw, source=path)
    overrides = {ENV_SOCKET: "socket_path", ENV_SSH_DIR: "ssh_dir",
                 ENV_METRICS_ADDR: "metrics_address"}
    problems = []
    for env, key in overrides.items():
        if environ.get(env):
            try:
                config[key] = CONFIG_CHECKS[key](environ[env])
            except ValueError as exc:
                problems.append(f"${env}: got {_describe(environ[env])}, {exc}")
    for env, key in ENV_HTTP.items():
        if environ.get(env):
            value = environ[env].strip()
            if key == "http_enabled":
                value = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                         "no": False}.get(value.lower(), value)
            try:
                config[key] = CONFIG_CHECKS[key](value)
            except ValueError as exc:
                problems.append(f"${env}: got {_describe(environ[env])}, {exc}")
    if environ.get(ENV_ALLOWED_SUBNETS):
        items = [s for s in environ[ENV_ALLOWED_SUBNETS].split(",") if s.strip()]
        try:
            config["allowed_source_subnets"] = _check_subnets(config["allowed_source_subnets"] + items)
        except ValueError as exc:
            problems.append(f"${ENV_ALLOWED_SUBNETS}: got {_describe(environ[ENV_ALLOWED_SUBNETS])}, {exc}")
    if problems:
        raise ConfigError(problems)
    config["config_path"] = path
    config["config_notes"] = notes
    return config


def merge_config(raw, add_subnets=(), add_peer_ranges=(), set_keys=(), default_keys=(),
                 cleanup_ranges=()):
    """Return `raw` with subnets and read-only peer uid ranges added (each only once), the
    `cleanup` capability given to the peers of `cleanup_ranges` (their entry added when
    missing), the (key, value) pairs of `set_keys` set and those of `default_keys` set where
    absent.

    Everything else in the document stays as it is; used by the installer so re-running it
    adds what a new container needs without touching the admin's own edits.
    """
    merged = dict(raw or {})
    merged.update(set_keys)
    for key, value in default_keys:
        merged.setdefault(key, value)
    subnets = list(merged.get("allowed_source_subnets") or [])
    known = {str(parse_network(s)) for s in subnets if isinstance(s, str)}
    for item in add_subnets:
        network = str(parse_network(item))
        if network not in known:
            subnets.append(network)
            known.add(network)
    if subnets:
        merged["allowed_source_subnets"] = subnets
    peers = list(merged.get("allowed_peers") or [])
    present = {_peer_entry_range(entry) for entry in peers} - {None}
    for item in add_peer_ranges:
        low, high = parse_uid_range(item)
        if (low, high) not in present:
            peers.append({"uids": f"{low}-{high}", "capabilities": [CAP_READ]})
            present.add((low, high))
    for item in cleanup_ranges:
        low, high = parse_uid_range(item)
        index = next((i for i, entry in enumerate(peers)
                      if _peer_entry_range(entry) == (low, high)), None)
        if index is None:
            peers.append({"uids": f"{low}-{high}", "capabilities": [CAP_READ, CAP_CLEANUP]})
            continue
        caps = list(peers[index].get("capabilities") or [CAP_READ])
        if CAP_CLEANUP not in caps:       # a new dict: `raw` is compared with the result
            peers[index] = dict(peers[index], capabilities=caps + [CAP_CLEANUP])
    if peers:
        merged["allowed_peers"] = peers
    return merged


def _peer_entry_range(entry):
    """The (low, high) uids of one raw allowed_peers entry; None when it names none."""
    if not isinstance(entry, dict):
        return None
    try:
        return parse_uid_range(entry.get("uids", entry.get("uid")))
    except ValueError:
        return None


def parse_subuid(text, user="root", uid=0):
    """The (low, high) uid ranges /etc/subuid gives `user`, whose uid is `uid`.

    Lines are `name:start:count`, where shadow's subid lookup also takes the owner as a number.
    """
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if (len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit()
                and parts[2].isdigit()):
            start, count = int(parts[1]), int(parts[2])
            if count > 0:
                ranges.append((start, start + count - 1))
    return ranges


def detect_host_networks():
    """This host's global addresses as /32 and /128 networks (from /proc, no subprocess)."""
    networks = []
    try:
        with open("/proc/net/fib_trie") as handle:
            lines = handle.read().splitlines()
        for previous, line in zip(lines, lines[1:]):
            if line.strip() == "/32 host LOCAL":
                networks.append(ipaddress.ip_network(previous.split()[-1]))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as handle:
            for line in handle:
                raw = line.split()[0]
                networks.append(ipaddress.ip_network(
                    ipaddress.ip_address(":".join(raw[i:i + 4] for i in range(0, 32, 4)))))
    except OSError:
        pass
    return usable_networks(networks)


def usable_networks(networks):
    """NETWORKS (host networks) other hosts can see this one by: no loopback, link-local,
    multicast or unspecified address, each once, in their order."""
    usable = []
    for network in networks:
        address = network.network_address
        if not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified) and network not in usable:
            usable.append(network)
    return [str(n) for n in usable]


def ip_addr_networks(text):
    """The host networks in `ip -j addr show` output, in the order of the links (the first is
    the one other hosts most likely know this host by)."""
    networks = []
    for link in json.loads(text or "[]"):
        for info in link.get("addr_info", []):
            try:
                networks.append(ipaddress.ip_network(info.get("local", "").split("%")[0]))
            except ValueError:
                continue
    return networks


# ---------------------------------------------------------------------------------------------
# Configuration: the original proxy's vocabulary
# ---------------------------------------------------------------------------------------------

ALL_UIDS = "0-4294967295"
DURATION_UNITS = {"h": 3600.0, "ms": 0.001, "m": 60.0, "s": 1.0, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
DURATION_PART = r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)"
# Keys of the original whose function nothing here has: accepted, with why they are ignored.
ORIGINAL_IGNORED = {
    "pulse_control_plane": "nothing here takes the node list from Pulse; the nodes come from the "
                           "cluster (/etc/pve/.members) or `nodes:`",
    "write_timeout": "answers are written without a configurable deadline here",
}


def parse_duration(value):
    """Seconds of a Go duration (`5s`, `1m30s`, `500ms`) or a plain number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and re.fullmatch(f"({DURATION_PART})+", value.strip()):
        return sum(float(n) * DURATION_UNITS[u] for n, u in re.findall(DURATION_PART, value))
    raise ValueError("expected a duration such as 5s, 500ms or 1m30s")


def parse_allowed_nodes_file(text):
    """The original's allowed_nodes file: a YAML list, or a mapping with `allowed_nodes:`."""
    yaml, loader = _yaml_loader()
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError:
        raise ValueError("not YAML") from None
    if isinstance(data, dict):
        data = data.get("allowed_nodes")
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("expected a list of nodes or `allowed_nodes:` with one")
    return data


def translate_original(raw, read_text):
    """A config in the original proxy's vocabulary, in ours: (document, notes, problems).

    `notes` name each translation and each ignored key, one sentence each; `read_text(path)`
    reads the file `allowed_nodes_file` names (None when it does not exist). Keys of neither
    vocabulary pass through for validate_config to refuse.
    """
    if not isinstance(raw, dict):
        return raw, [], []
    doc, notes, problems = dict(raw), [], []

    def note(key, text):
        notes.append(f"{key}: {text}")

    listed = doc.get("allowed_peers")
    # absent: the original's allowed_peer_uids/gids below become the whole list
    peers = list(listed or []) if listed is None or isinstance(listed, list) else listed
    if isinstance(listed, list):
        for index, entry in enumerate(peers):
            caps = entry.get("capabilities") if isinstance(entry, dict) else None
            if isinstance(caps, list) and "write" in caps:
                kept = [c for c in caps if c != "write"] or [CAP_READ]
                peers[index] = dict(entry, capabilities=kept)
                note(f"allowed_peers[{index}].capabilities", "`write` dropped: no method of the "
                     "original needed it beyond read")
        doc["allowed_peers"] = peers
    for key, field in (("allowed_peer_uids", "uid"), ("allowed_peer_gids", "gid")):
        if key not in doc:
            continue
        values = doc.pop(key) or []
        if not isinstance(values, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            problems.append(f"{key}: got {_describe(values)}, expected a list of ids")
            continue
        if not isinstance(peers, list):
            continue
        for value in values:
            entry = {"uid": value} if field == "uid" else {"uids": ALL_UIDS, "gid": value}
            peers.append(dict(entry, capabilities=[CAP_READ, CAP_ADMIN]))
        if values:
            doc["allowed_peers"] = peers
            note(key, f"now allowed_peers entries with read and admin, as the original granted "
                 f"({', '.join(map(str, values))})")
        else:
            note(key, "empty; dropped")
    if "allowed_idmap_users" in doc:
        users = doc.pop("allowed_idmap_users")
        if users in (None, [], ["root"]):
            note("allowed_idmap_users", "dropped: allow_idmapped_root uses root's /etc/subuid "
                 "ranges, as this setting did")
        else:
            note("allowed_idmap_users", f"ignored: only root's /etc/subuid ranges are read here, "
                 f"not those of {_describe(users)}")
    if doc.get("metrics_address") in ("default", ""):
        doc["metrics_address"] = DEFAULT_CONFIG["metrics_address"]
        note("metrics_address", f"`default` is {DEFAULT_CONFIG['metrics_address']}")
    if "read_timeout" in doc:
        value = doc.pop("read_timeout")
        try:
            seconds = parse_duration(value)
            note("read_timeout", f"ignored: a request must arrive within {READ_TIMEOUT:g} s here"
                 + ("" if seconds == READ_TIMEOUT else f", not {seconds:g} s"))
        except ValueError as exc:
            problems.append(f"read_timeout: got {_describe(value)}, {exc}")
    if "max_ssh_output_bytes" in doc:
        value = doc.pop("max_ssh_output_bytes")
        ssh = doc.get("ssh") if isinstance(doc.get("ssh"), dict) else {}
        doc["ssh"] = dict(ssh, max_output_bytes=value)
        note("max_ssh_output_bytes", "now ssh.max_output_bytes")
    if "require_proxmox_hostkeys" in doc:
        value = doc.pop("require_proxmox_hostkeys")
        if isinstance(value, bool):
            doc.setdefault("host_key_policy", "strict" if value else "tofu")
            note("require_proxmox_hostkeys", f"now host_key_policy: {doc['host_key_policy']}")
        else:
            problems.append(f"require_proxmox_hostkeys: got {_describe(value)}, expected true or false")
    translate_allowed_nodes(doc, read_text, note, problems)
    limits = doc.get("rate_limit")
    if isinstance(limits, dict) and {"per_peer_interval_ms", "per_peer_burst"} & set(limits):
        limits = dict(limits)
        interval = limits.pop("per_peer_interval_ms", None)
        if interval is not None:
            if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
                limits["per_minute"] = round(60000 / interval, 3)
            else:
                problems.append(f"rate_limit.per_peer_interval_ms: got {_describe(interval)}, "
                                "expected milliseconds > 0")
        if "per_peer_burst" in limits:
            limits["burst"] = limits.pop("per_peer_burst")
        doc["rate_limit"] = limits
        note("rate_limit", "per_peer_interval_ms and per_peer_burst are now per_minute and burst "
             "(a peer's allowance also grows with the known nodes)")
    if doc.get("strict_node_validation") is False and "nodes" in doc:
        doc["strict_node_validation"] = True
        note("strict_node_validation", "true: the original refused nodes outside allowed_nodes "
             "whatever this said, and allowed_nodes is `nodes:` here")
    if "cache_ttl_seconds" in doc:
        doc.setdefault("node_min_interval_seconds", doc.pop("cache_ttl_seconds"))
        note("cache_ttl_seconds", "now node_min_interval_seconds")
    if doc.get("http_auth_token") == "":
        doc.pop("http_auth_token")
        note("http_auth_token", "empty, as the original's installer left it: no token set "
             "(http_auth_token_file is where this proxy reads one)")
    for key, why in ORIGINAL_IGNORED.items():
        if key in doc:
            doc.pop(key)
            note(key, f"ignored: {why}")
    return doc, notes, problems


def translate_allowed_nodes(doc, read_text, note, problems):
    """allowed_nodes (and the file allowed_nodes_file names) as `nodes:`."""
    if "allowed_nodes" not in doc and "allowed_nodes_file" not in doc:
        return
    entries = doc.pop("allowed_nodes", None) or []
    path = doc.pop("allowed_nodes_file", None)
    if not isinstance(entries, list):
        problems.append(f"allowed_nodes: got {_describe(entries)}, expected a list of nodes")
        entries = []
    if path is not None:
        try:
            text = read_text(_check_abs_path(path))
            if text is None:
                note("allowed_nodes_file", f"{path} does not exist; no nodes from it")
            else:
                listed = parse_allowed_nodes_file(text)
                entries = entries + listed
                note("allowed_nodes_file", f"{len(listed)} nodes read from {path} into nodes:")
        except (ValueError, OSError) as exc:
            problems.append(f"allowed_nodes_file: {path}: {exc}")
    nodes = dict(doc.get("nodes") or {}) if isinstance(doc.get("nodes"), dict) else {}
    skipped = []
    for entry in entries:
        try:
            nodes.setdefault(validate_node_name(str(entry).strip()), None)
        except RequestError:
            skipped.append(str(entry))
    if skipped:
        note("allowed_nodes", "entries that are not a node name or address ignored (the known "
             f"nodes are the allowlist here): {', '.join(skipped[:8])}")
    if nodes:
        doc["nodes"] = nodes
        note("allowed_nodes", f"now nodes: {', '.join(list(nodes)[:8])}"
             + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else ""))
    elif entries or path is not None:
        note("allowed_nodes", "no nodes listed; the cluster's nodes are used")


# ---------------------------------------------------------------------------------------------
# Pure logic: peers and capabilities
# ---------------------------------------------------------------------------------------------


def peer_capabilities(uid, gid, own_uid, allowed_peers, idmapped_ranges):
    """The capabilities a peer has (empty frozenset: unauthorized).

    `allowed_peers` is the validated config list; `idmapped_ranges` the subuid ranges of root
    (only passed when allow_idmapped_root is on): container root gets read, never admin.
    """
    if uid == 0 or uid == own_uid:
        return frozenset(CAPABILITIES)
    caps = set()
    for entry in allowed_peers:
        low, high = entry["uids"]
        if low <= uid <= high and (entry["gid"] is None or entry["gid"] == gid):
            caps |= entry["capabilities"]
    if any(low <= uid <= high for low, high in idmapped_ranges):
        caps.add(CAP_READ)
    if CAP_ADMIN in caps:
        caps.add(CAP_CLEANUP)       # as in the original: admin peers may ask for a clean-up
    return frozenset(caps)


# ---------------------------------------------------------------------------------------------
# Pure logic: rate limiting
# ---------------------------------------------------------------------------------------------


def peer_allowance(limits, nodes):
    """(per minute, burst, in flight) one peer may use when `nodes` nodes are known.

    Pulse asks for every node on every poll, from one process: what it may ask grows with
    the cluster. The nodes themselves are protected separately (node_min_interval_seconds).
    """
    return (limits["per_minute"] + limits["per_node_per_minute"] * nodes,
            limits["burst"] + limits["per_node_burst"] * nodes,
            limits["max_concurrent"] + nodes)


class RateLimiter:
    """Token bucket per peer key (uid, pid) plus a cap on requests in flight per peer.

    Buckets refill at per_minute/60 tokens a second up to `burst`, both following
    peer_allowance for the number of known nodes (`node_count()`). An entry that is full and
    idle is the same as no entry, so such entries are dropped: memory follows the peers that
    are active, not the pids ever seen. `clock` is injectable so tests need no sleeps.
    """

    MAX_ENTRIES = 8192

    def __init__(self, per_minute, burst, max_concurrent, clock=time.monotonic,
                 per_node_per_minute=0.0, per_node_burst=0, node_count=lambda: 0):
        self.limits = {"per_minute": per_minute, "burst": burst, "max_concurrent": max_concurrent,
                       "per_node_per_minute": per_node_per_minute, "per_node_burst": per_node_burst}
        self.node_count = node_count
        self.nodes = None
        self.clock = clock
        self.entries = {}           # key -> [tokens, last_refill, in_flight]
        self._next_sweep = 0.0
        self.fit()

    def fit(self):
        """Follow the number of known nodes (cheap: the inventory re-reads its sources rarely)."""
        nodes = self.node_count()
        if nodes != self.nodes:
            self.nodes = nodes
            per_minute, burst, self.max_concurrent = peer_allowance(self.limits, nodes)
            self.rate, self.burst = per_minute / 60.0, float(burst)

    def _refilled(self, key):
        """The peer's entry, its tokens brought up to now (a new peer starts with a full burst)."""
        self.fit()
        now = self.clock()
        if now >= self._next_sweep or len(self.entries) >= self.MAX_ENTRIES:
            self._sweep(now)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = [self.burst, now, 0]
        else:
            entry[0], entry[1] = self._tokens(entry, now), now
        return entry

    def acquire(self, key):
        """Take a token and an in-flight slot; False when the peer is over either limit."""
        entry = self._refilled(key)
        if entry[0] < 1.0 or entry[2] >= self.max_concurrent:
            return False
        entry[0] -= 1.0
        entry[2] += 1
        return True

    def charge(self, key):
        """Take a token for a request that is refused anyway (invalid, unknown, forbidden,
        unauthorized): it cost the loop as much as a valid one. False when none was left."""
        entry = self._refilled(key)
        if entry[0] < 1.0:
            return False
        entry[0] -= 1.0
        return True

    def exhausted(self, key):
        """True when the peer's next request would be refused for want of a token (takes none;
        the node count is followed by `acquire`)."""
        entry = self.entries.get(key)
        return entry is not None and self._tokens(entry, self.clock()) < 1.0

    def _tokens(self, entry, now):
        """The entry's tokens at `now`: refilled since its last update, up to the burst."""
        return min(self.burst, entry[0] + (now - entry[1]) * self.rate)

    def release(self, key):
        entry = self.entries.get(key)
        if entry is not None and entry[2] > 0:
            entry[2] -= 1

    def _sweep(self, now):
        full_after = self.burst / self.rate if self.rate > 0 else float("inf")
        self.entries = {key: entry for key, entry in self.entries.items()
                        if entry[2] > 0 or now - entry[1] < full_after}
        if len(self.entries) >= self.MAX_ENTRIES:
            # Still full of active peers: forget the longest-idle half rather than grow.
            keep = sorted(self.entries.items(), key=lambda item: item[1][1])[self.MAX_ENTRIES // 2:]
            self.entries = dict(keep)
        self._next_sweep = now + 10.0


# ---------------------------------------------------------------------------------------------
# Pure logic: requests and responses
# ---------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request that is answered with success:false and this message; `corr_id` is the
    request's own correlation id when it could be read before the request was refused."""

    def __init__(self, message, corr_id=None):
        super().__init__(message)
        self.corr_id = corr_id


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _unique_object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_reject_constant)


def parse_request(line):
    """Decode one request line: (correlation_id, method, params) or RequestError.

    Strict JSON only (no NaN/Infinity, no duplicate keys), an object with a string `method`
    and an object-or-null `params`. The correlation id is kept only when it is a UUID; it is
    returned even when the request is otherwise invalid, so the error can echo it.
    """
    text = line.strip()
    if not text:
        raise RequestError(E_EMPTY)
    try:
        request = STRICT_JSON.decode(text.decode("utf-8"))
    except (ValueError, RecursionError):
        raise RequestError(E_INVALID) from None
    if not isinstance(request, dict):
        raise RequestError(E_INVALID)
    corr_id = normalize_correlation_id(request.get("correlation_id"))
    method, params = request.get("method"), request.get("params")
    if not isinstance(method, str) or not (params is None or isinstance(params, dict)):
        raise RequestError(E_INVALID, corr_id=corr_id)
    return corr_id, method, params or {}


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalize_correlation_id(value):
    if isinstance(value, str) and len(value) <= 64:
        if CANONICAL_UUID.fullmatch(value):
            return value        # what str(uuid.UUID(value)) gives, without building one
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    return str(uuid.uuid4())


COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)  # data is a tree


class EncodedJSON(str):
    """JSON text a method built itself from parts it encoded once: a reply takes it as it is."""


@functools.lru_cache(maxsize=16)
def capabilities_json(capabilities):
    return COMPACT_JSON.encode(sorted(capabilities))


def response_line(corr_id, data=None, error=None):
    """One reply line; `corr_id` is a normalized UUID, so it needs no escaping."""
    if error is None:
        body = data if type(data) is EncodedJSON else COMPACT_JSON.encode(data)
        return f'{{"correlation_id":"{corr_id}","success":true,"data":{body}}}\n'.encode()
    return f'{{"correlation_id":"{corr_id}","success":false,"error":' \
           f'{COMPACT_JSON.encode(error)}}}\n'.encode()


HTTP_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH) \S+ HTTP/1\.[01]\r?")
def http_response(status, body, content_type="application/json"):
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


def parse_http_head(head_lines):
    """Header names (lower-case) to values from the lines after the request line."""
    headers = {}
    for raw in head_lines:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise RequestError(E_INVALID)
        headers[name.lower()] = value.strip()
    return headers


class HttpRefusal(Exception):
    """An HTTPS request answered with `status` and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_https_request(head):
    """(method, path, query dict, headers, keep_alive) of one request head (bytes, no CRLFCRLF)."""
    import urllib.parse

    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpRefusal(400, "malformed request line")
    try:
        headers = parse_http_head(line for line in lines[1:] if line)
    except RequestError:
        raise HttpRefusal(400, "malformed header") from None
    target = parts[1].decode("latin-1")
    path, _, query = target.partition("?")
    try:
        params = urllib.parse.parse_qs(query, max_num_fields=16)
    except ValueError:
        raise HttpRefusal(400, "too many query parameters") from None
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if parts[2] == b"HTTP/1.1" else connection == "keep-alive"
    return parts[0].decode("latin-1"), path, {k: v[0] for k, v in params.items()}, headers, \
        keep_alive


def check_bearer(header, token):
    """None when `header` carries `token`; else the refusal, saying which way it is wrong."""
    if header is None:
        return "missing authorization header"
    scheme, _, given = header.partition(" ")
    if scheme != "Bearer" or not given:
        return "invalid authorization format"
    if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
        return "invalid token"
    return None


def address_allowed(address, networks):
    """Is the client address (an IPv4-mapped one as IPv4) inside one of `networks`?"""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return any(ip in network for network in networks)


def https_response(status, data, keep_alive):
    body = json.dumps(data, separators=(",", ":")).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + body


def status_for_error(error):
    return ERROR_RESULTS.get(error, ("error", 200))[1]


def result_for_error(error):
    return ERROR_RESULTS.get(error, ("error", 200))[0]


def sanitize_label(value, limit=64):
    """A metric label or log field made of safe characters only, bounded in length."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", str(value))[:limit]


# ---------------------------------------------------------------------------------------------
# Pure logic: nodes, `sensors -j` output, authorized_keys lines
# ---------------------------------------------------------------------------------------------

NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def validate_node_name(value):
    """A node as Pulse names it (host part of its API URL): a name or an IP literal.

    Returns the canonical form; RequestError(invalid node name) for anything else, before any
    I/O. Nothing a peer sends reaches a shell, but names that look like options (`-o...`),
    paths (`..`) or carry other characters are refused anyway.
    """
    if not isinstance(value, str):
        raise RequestError(E_INVALID_NODE)
    literal = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if literal != value or not NODE_NAME.fullmatch(value) or ".." in value or value.endswith("."):
        raise RequestError(E_INVALID_NODE)
    return value


class InvalidNodeName(RequestError):
    """A node name a peer sent that is no name or address (see requested_node)."""


def requested_node(value):
    """validate_node_name for a name a peer sent; the refusal names it, in Pulse's words."""
    try:
        return validate_node_name(value)
    except RequestError:
        shown = sanitize_label(value) if isinstance(value, str) else ""
        raise InvalidNodeName(f'node "{shown}" rejected by validator: {E_INVALID_NODE} (expected '
                           "a host name or an IP address)") from None


def unknown_node_error(requested, inventory):
    names = [node.name for node in inventory]
    known = ", ".join(names[:KNOWN_NODES_SHOWN]) or "none"
    if len(names) > KNOWN_NODES_SHOWN:
        known += f", and {len(names) - KNOWN_NODES_SHOWN} more"
    return RequestError(f'node "{requested}" not in allowlist (known: {known})')


class Node:
    """One place `sensors -j` can be read: over SSH (host, port, user) or locally."""
    __slots__ = ("name", "host", "port", "user", "local")

    def __init__(self, name, host=None, port=None, user=None, local=False):
        self.name, self.host, self.port, self.user, self.local = name, host or name, port, user, local

    def __repr__(self):
        return f"Node({self.name!r}, {self.host!r}, {self.port!r}, {self.user!r}, local={self.local})"


def parse_members(text):
    """Proxmox's /etc/pve/.members: (this node's name, [Node, ...]); invalid entries skipped."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    local = data.get("nodename") if isinstance(data.get("nodename"), str) else None
    nodes = []
    nodelist = data.get("nodelist") if isinstance(data.get("nodelist"), dict) else {}
    for name, info in nodelist.items():
        ip = info.get("ip") if isinstance(info, dict) else None
        try:
            nodes.append(Node(validate_node_name(name), validate_node_name(ip) if ip else None))
        except RequestError:
            continue
    if not nodes and local:
        nodes.append(Node(validate_node_name(local)))
    return local, nodes


QUORUM_ROW = re.compile(r"(0x[0-9a-fA-F]+|\d+)\s+\d+\s+(.*?)((?:\s+\((?:local|votes \d+)\))*)")
QUORUM_FLAGS = re.compile(r"[A-Z]+(?:,[A-Z]+)*")


def parse_pvecm_nodes(text):
    """`pvecm nodes` output: (local node's name or None, [Node, ...]).

    pvecm execs `corosync-quorumtool -l`: a header `Nodeid Votes [Qdevice] Name`, then one row
    per node (`1 1 pve1 (local)`, node ids decimal or `0x...`). With a QDevice the extra column
    holds flags (`A,V,NMW`, `NR`) and the device has its own row, node id 0, named `Qdevice`:
    it is no node. A row only counts under its header, so error texts yield no nodes.
    """
    local, nodes, qdevice_column = None, [], None
    for line in text.splitlines():
        fields = line.split()
        if fields[:2] == ["Nodeid", "Votes"]:
            qdevice_column = "Qdevice" in fields[2:-1]
            continue
        match = QUORUM_ROW.fullmatch(line.strip())
        if qdevice_column is None or not match or int(match.group(1), 0) == 0:
            continue
        columns = match.group(2).split()
        if qdevice_column and len(columns) == 2 and QUORUM_FLAGS.fullmatch(columns[0]):
            columns = columns[1:]
        if len(columns) != 1:
            continue
        try:
            name = validate_node_name(columns[0])
        except RequestError:
            continue
        nodes.append(Node(name))
        if "(local)" in match.group(3):
            local = name
    return local, nodes


def resolve_node(requested, inventory, local_names, strict, local_name="localhost"):
    """The Node a request means: an inventory member by name, by address, by the first label
    of an FQDN (`pve1.example.lan` is pve1), then this host. (Pulse sends the host part of a
    node's API URL.) `requested` is already validated; unknown names are refused when `strict`.
    Every spelling of one node is one Node name (names are case-blind, as DNS is; every name
    of this host is `local_name`), so it has one single flight, breaker and metric series.
    """
    key = requested.lower()
    for node in inventory:
        if node.name.lower() == key:
            return node
    for node in inventory:
        if node.host.lower() == key:
            return node
    label = key.split(".")[0]
    if label != key and not is_address(key):
        for node in inventory:
            if node.name.lower() == label:
                return node
    if key in local_names:
        return next((n for n in inventory if n.local), Node(local_name, local=True))
    if strict:
        raise unknown_node_error(requested, inventory)
    return Node(key)


def is_address(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def node_at(addresses, inventory):
    """The known node whose host is one of `addresses` (IP literals), or None."""
    return next((node for node in inventory if node.host in addresses), None)


class ProxyError(Exception):
    """A failure this program reports as one line of text; the subclasses say what failed.
    Every boundary turns what a dependency raises (asyncssh, OSError, yaml) into one of them."""


class NodeError(ProxyError):
    """Reading a node failed: `sensors -j` or its SMART list; the message says `ssh` (the
    connection) or `sensors` (the command). On the wire node_error_text puts the node's name
    first."""


class KeyCommandError(ProxyError):
    """A key command (keys push/revoke/status, rotate-keys, cleanup) could not do its work:
    the key slots on this host, the admin identity, or a node's authorized_keys."""


def output_too_large(limit, what="sensors -j"):
    return f"{what} output too large (over {limit} bytes)"


RATE_LIMIT_WORDS = re.compile(r"rate(\s*)limit", re.IGNORECASE)


def node_error_text(name, text):
    """A per-node error for the wire: `node "NAME": ...`, which Pulse files under that node
    and does not retry. (Its client retries ssh errors, and one that fails every attempt ends
    as "max retries exhausted", a failure that switches the proxy off for every node.) Text
    from the node (stderr, an sshd's disconnect reason) cannot add the words `rate limit`."""
    return f'node "{name}": ' + RATE_LIMIT_WORDS.sub("rate-limit", text)[:500]


class BreakerOpen(NodeError):
    """The node failed repeatedly and is not tried until its cool-down ends."""


class OutputError(NodeError):
    """`sensors -j` ran but what it printed is unusable: the connection itself is fine."""


E_SENSORS_OUTPUT = "invalid sensors output"
E_OLD_KEY_LINE = ("the node answered the smart read with something else: its authorized_keys "
                  "line predates disk temperatures (run `pulse-sensor-proxy keys push`)")

# The two defects of lm-sensors 3.6.0's `sensors -j` (prog/sensors/main.c, chips.c), fixed in
# 3.6.1, repaired in exactly their printed shapes: a chip whose features are all ignored leaves
# the comma after its Adapter line (`"Adapter": "PCI adapter",\n   }`), and a subfeature without
# the read flag prints `(label)` straight after the previous value (`"temp1_input": 36.850(Composite)`).
# Each shape is looked for only where its marker, a text it cannot match without, is present.
SENSORS_REPAIRS = (
    ("empty_chip", '",\n   }', re.compile(r'^(      "Adapter": "[^"\n]*"),(\n   \})', re.M),
     r"\1\2"),
    ("write_only_label", "(", re.compile(r'^(         "[^"\n]+": -?\d+\.\d{3})\([^()\n]*\)', re.M),
     r"\1"),
)
# A number that float64 may not hold has an exponent or hundreds of digits; output without one
# is read by the decoder's own float and int, which then agree with Go's float64, at C speed.
MAYBE_BEYOND_FLOAT64 = re.compile(r"\d[eE]|\d{300}")


def interpret_sensors_output(stdout, stderr, status):
    """(the `sensors -j` JSON text of a run, names of the repairs made), or NodeError.

    lm-sensors on a machine without sensors prints `{}` (with a blank line), `No sensors
    found!` on stderr and exits 1: that is a node with no temperatures, not a failure. The
    text handed on is strict JSON that any decoder reads alike: 3.6.2 prints `NaN` (and could
    print `inf`) for unreadable values, which become `null`, as does a number no float64 holds;
    a label printed twice keeps its
    last value, as Go's encoding/json would.
    """
    text = stdout.decode("utf-8", "replace").strip()
    no_sensors = status == 1 and b"No sensors found" in stderr
    if status is None:
        raise OutputError("sensors -j ended without an exit status")
    if status != 0 and not no_sensors:
        detail = stderr.decode("utf-8", "replace").strip().splitlines()
        raise OutputError(f"sensors -j exited with status {status}"
                         + (f": {detail[0][:200]}" if detail else ""))
    repairs = []
    for name, marker, shape, replacement in SENSORS_REPAIRS:
        if marker in text:
            text, count = shape.subn(replacement, text)
            if count:
                repairs.append(name)
    rewrites = []

    def last_value_wins(pairs):
        if len({key for key, _ in pairs}) != len(pairs):
            rewrites.append("duplicate_key")
        return dict(pairs)

    def null_constant(name):
        rewrites.append("non_finite")

    def float64(literal):
        # Go's encoding/json refuses a number beyond float64 (Python reads it as inf): null too.
        value = float(literal)
        if math.isinf(value):
            return null_constant(literal)
        return value

    def float64_int(literal):
        return float64(literal) if len(literal) > 300 else int(literal)

    numbers = {"parse_float": float64, "parse_int": float64_int} \
        if MAYBE_BEYOND_FLOAT64.search(text) else {}
    try:
        parsed = json.loads(text, object_pairs_hook=last_value_wins, parse_constant=null_constant,
                            **numbers)
    except (ValueError, RecursionError):
        raise OutputError(E_SENSORS_OUTPUT) from None
    if not isinstance(parsed, dict):
        raise OutputError(E_SENSORS_OUTPUT)
    if rewrites:
        text = json.dumps(parsed)
        repairs.extend(dict.fromkeys(rewrites))
    return text, repairs


# ---------------------------------------------------------------------------------------------
# Pure logic: SMART reports (the node program's `smart` mode) into Pulse's DISK objects
# ---------------------------------------------------------------------------------------------

SMART_FRAME = re.compile(r"@@(disk) (\S+)|@@(status) (\S+)")
BLOCK_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
# smartctl -n: `jinf("Device is in %s mode, exit(%d)\n", ...)` (ataprint.cpp, scsiprint.cpp)
STANDBY_MESSAGE = re.compile(r"Device is in \S.* mode, exit\(\d+\)")
EXIT_OPEN_FAILED = 0x2             # smartctl: device open failed, or in a low-power mode (-n)
EXIT_UNUSABLE = 0x1 | 0x2          # command line or device open failed: no data follows
TIMEOUT_STATUSES = {124: "timed out", 137: "timed out (killed)"}   # coreutils timeout -k


def _integer(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _object(value):
    """A JSON object of smartctl's output, or {} where it printed something else."""
    return value if isinstance(value, dict) else {}


def disk_temperature(doc):
    """°C from one smartctl JSON document: `temperature.current`, else ATA attribute 194's raw
    value, else the NVMe health log's; None where none is a plausible integer.

    Attribute 194's raw value often packs min/max into its upper bytes ("26 (Min/Max 13/41)"
    is 176094511130); like smartmontools' ata_return_temperature_value, only the low 16 bits
    count, and only 1..127 is a temperature."""
    current = _integer(_object(doc.get("temperature")).get("current"))
    if current is not None:
        return current
    table = _object(doc.get("ata_smart_attributes")).get("table")
    for attribute in table if isinstance(table, list) else []:
        if _object(attribute).get("id") == 194:
            raw = _integer(_object(attribute.get("raw")).get("value"))
            if raw is not None and 0 < raw & 0xFFFF < 128:
                return raw & 0xFFFF
    return _integer(_object(doc.get("nvme_smart_health_information_log")).get("temperature"))


def _text(value):
    return value.strip() if isinstance(value, str) else ""


def disk_wwn(wwn):
    """`0x` + 16 hex digits from smartctl's {naa, oui, id}, as lsblk and Proxmox print it."""
    if not isinstance(wwn, dict):
        return ""
    naa, oui, ident = (_integer(wwn.get(k)) for k in ("naa", "oui", "id"))
    if naa is None or oui is None or ident is None or not (0 <= naa < 16 and 0 <= oui < 1 << 24
                                                           and 0 <= ident < 1 << 36):
        return ""
    return f"0x{naa:x}{oui:06x}{ident:09x}"


def rfc3339(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def smart_disk(name, status, text, read_at):
    """(DISK object, None) or (None, why not) for one disk's frame of the smart report.

    A drive in standby is reported as such (smartctl left it asleep); a disk that gave no
    temperature is left out, as Pulse would show it as 0 °C."""
    device = "/dev/" + name
    if status is None:
        return None, "smart report ended inside this disk's frame"
    if status in TIMEOUT_STATUSES:
        return None, f"smartctl {TIMEOUT_STATUSES[status]} after {SMART_DISK_SECONDS} s"
    if status == 127:
        return None, "smartctl is not installed (apt install smartmontools)"
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return None, f"smartctl printed no JSON (exit status {status})"
    messages = _object(doc.get("smartctl")).get("messages")
    messages = [_text(_object(m).get("string")) for m in
                (messages if isinstance(messages, list) else [])]
    if status & EXIT_OPEN_FAILED and any(STANDBY_MESSAGE.fullmatch(m) for m in messages):
        return {"device": device, "temperature": None, "lastUpdated": rfc3339(read_at),
                "standbySkipped": True}, None
    if status & EXIT_UNUSABLE:
        detail = next((m for m in messages if m), "")
        return None, f"smartctl exit status {status}" + (f": {detail[:200]}" if detail else "")
    temperature = disk_temperature(doc)
    if temperature is None:
        return None, "no temperature in smartctl's output"
    kind = _object(doc.get("device")).get("type")
    # SCSI/SAS disks name their model in scsi_model_name (smartctl 7.x scsiprint.cpp).
    model = next(filter(None, (_text(doc.get(k)) for k in
                               ("model_name", "scsi_model_name", "model_family"))), "")
    return {"device": device, "serial": _text(doc.get("serial_number")),
            "wwn": disk_wwn(doc.get("wwn")), "model": model, "type": _text(kind),
            "temperature": temperature, "lastUpdated": rfc3339(read_at),
            "standbySkipped": False}, None


def parse_smart_report(stdout, read_at):
    """([DISK objects], [(device, why it is missing)]) from the node program's smart output.

    Pure: `read_at` (epoch seconds) is when the report was read, each DISK's lastUpdated."""
    disks, missing = [], []
    name, body = None, []

    def close(status):
        disk, why = smart_disk(name, status, "\n".join(body), read_at)
        if disk is not None:
            disks.append(disk)
        else:
            missing.append(("/dev/" + name, why))

    for line in stdout.decode("utf-8", "replace").splitlines():
        frame = SMART_FRAME.fullmatch(line)
        if frame and frame[1]:
            if name is not None:
                close(None)
            name, body = frame[2], []
            if not BLOCK_DEVICE.fullmatch(name):
                missing.append((name[:64], "not a block device name"))
                name = None
        elif frame and name is not None:
            close(int(frame[4]) if re.fullmatch(r"[0-9]{1,3}", frame[4]) else None)
            name = None
        elif name is not None:
            body.append(line)
    if name is not None:
        close(None)
    return disks, missing


def with_smart(sensors_text, smart_json):
    """The answer Pulse's parser reads as its wrapper form, from two texts json.dumps or
    interpret_sensors_output made (each one JSON value, so the whole is one too)."""
    return '{"sensors": ' + sensors_text + ', "smart": ' + smart_json + "}"


def authorized_keys_line(public_key, subnets, disk_temperatures=False):
    """The line that pins our key on a node to `sensors -j` (or, with disk temperatures, to
    SMART_PROGRAM) from our subnets only.

    `restrict` disables every optional feature, including ones OpenSSH adds later; the
    explicit no-* options repeat it for auditors who grep for them (as the hardening guide
    does) and for older servers.
    """
    key_type, key_data = public_key.split()[:2]
    command = SMART_PROGRAM if disk_temperatures else SENSORS_COMMAND
    options = [f'from="{",".join(subnets)}"', f'command="{command}"', "restrict",
               "no-port-forwarding", "no-X11-forwarding", "no-agent-forwarding", "no-pty"]
    return f"{','.join(options)} {key_type} {key_data} {KEY_COMMENT}"


KEY_TYPE = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|"
                      r"sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)(-cert-v01@openssh\.com)?")


def parse_authorized_key(line):
    """(options, key type, base64 key, comment) of one authorized_keys line.

    None for blank lines, comments and anything unreadable: such lines are never touched.
    Options end at the first whitespace outside double quotes (OpenSSH's rule).
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    options, rest = "", text
    if not KEY_TYPE.fullmatch(text.split(None, 1)[0]):
        index, quoted = 0, False
        while index < len(text) and (quoted or not text[index].isspace()):
            if text[index] == "\\" and quoted:
                index += 1
            elif text[index] == '"':
                quoted = not quoted
            index += 1
        options, rest = text[:index], text[index:].strip()
    fields = rest.split(None, 2)
    if len(fields) < 2 or not KEY_TYPE.fullmatch(fields[0]):
        return None
    return options, fields[0], fields[1], fields[2] if len(fields) > 2 else ""


def key_fingerprint(public_key):
    """`SHA256:...` of `type base64 [comment]`, as ssh-keygen -l prints it."""
    import base64
    import hashlib
    blob = base64.b64decode(public_key.split()[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _fingerprint_or_none(key):
    try:
        return key_fingerprint("x " + key)
    except ValueError:
        return None


def journal_problem(entry, fingerprints):
    """Why a rotation journal cannot be acted on, or None: it must name a known operation and
    step, and its old and new keys must be among `fingerprints` (the keys in the slots)."""
    if not isinstance(entry, dict) or entry.get("op") not in ("rotate", "rollback"):
        return "not a rotation journal"
    if entry.get("step") not in ("pushing", "swapping", "removing"):
        return f"unknown step {_describe(entry.get('step'))}"
    for field in ("old", "new"):
        line = entry.get(field)
        fields = line.split() if isinstance(line, str) else []
        if len(fields) < 2 or _fingerprint_or_none(fields[1]) not in fingerprints:
            return f"its {field} key is not one of the key slots"
    return None


def edit_authorized_keys(data, add_line=None, remove_keys=()):
    """authorized_keys bytes with `add_line` present once and lines of `remove_keys` (base64
    keys or SHA256 fingerprints) gone.

    Returns (new bytes, [(action, base64 key)]). Only lines whose key is ours are added,
    replaced (a legacy or outdated line of our key is upgraded in place, keeping its line
    ending) or removed; every other byte stays as it was. When the file does not end with a
    newline our line goes first, so not even a foreign line's missing newline changes.
    """
    add_key = parse_authorized_key(add_line)[2] if add_line else None
    out, changes, present = [], [], False
    for raw in data.splitlines(keepends=True):
        parsed = parse_authorized_key(raw.decode("utf-8", "replace"))
        key = parsed[2] if parsed else None
        if key is not None and (key in remove_keys or _fingerprint_or_none(key) in remove_keys):
            changes.append(("removed", key))
            continue
        if key is not None and key == add_key:
            if present:
                changes.append(("removed duplicate", key))
                continue
            present = True
            body = raw.rstrip(b"\r\n")
            if body != add_line.encode():
                out.append(add_line.encode() + (raw[len(body):] or b"\n"))
                changes.append(("upgraded", key))
                continue
        out.append(raw)
    if add_line and not present:
        line = add_line.encode() + b"\n"
        if out and not out[-1].endswith(b"\n"):
            out.insert(0, line)
        else:
            out.append(line)
        changes.append(("added", add_key))
    return b"".join(out), changes


# ---------------------------------------------------------------------------------------------
# Pure logic: metrics (Prometheus text format 0.0.4)
# ---------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
# The *_recent gauges: what a counter gained in the last RECENT_SECONDS, kept in one-minute
# slots, so `doctor` can tell a flood going on now from one last week without a Prometheus.
RECENT_SECONDS, RECENT_SLOT = 600, 60


class Metrics:
    """A tiny registry: counters, gauges and histograms keyed by label tuples.

    Label values come from bounded sets (known methods, sanitized node names capped at
    `max_label_values` per metric, then "other") so a hostile peer cannot grow it.
    """

    def __init__(self, max_label_values=256, clock=time.monotonic):
        self.families = {}          # name -> (type, help, label_names)
        self.values = {}            # name -> {label_values: number | [bucket_counts, sum, count]}
        self.max_label_values = max_label_values
        self.clock = clock
        self.recent = {}            # counter name -> (gauge name, {label_values: {slot: amount}})

    def declare(self, kind, name, help_text, labels=()):
        self.families[name] = (kind, help_text, tuple(labels))
        self.values[name] = {}

    def declare_recent(self, counter, gauge, help_text):
        """GAUGE, with COUNTER's labels: what COUNTER gained in the last RECENT_SECONDS."""
        self.declare("gauge", gauge, help_text, self.families[counter][2])
        self.recent[counter] = (gauge, {})

    def _oldest_slot(self):
        return int(self.clock() // RECENT_SLOT) - RECENT_SECONDS // RECENT_SLOT + 1

    def _remember(self, name, labels, amount):
        slots = self.recent[name][1].setdefault(labels, {})
        slot = int(self.clock() // RECENT_SLOT)
        slots[slot] = slots.get(slot, 0.0) + amount
        if len(slots) > RECENT_SECONDS // RECENT_SLOT:
            oldest = self._oldest_slot()
            for gone in [s for s in slots if s < oldest]:
                del slots[gone]

    def _update_recent(self):
        oldest = self._oldest_slot()
        for gauge, by_labels in self.recent.values():
            self.values[gauge] = {labels: sum(v for s, v in slots.items() if s >= oldest)
                                  for labels, slots in by_labels.items()}

    def _series(self, name, labels):
        series = self.values[name]
        if labels not in series and len(series) >= self.max_label_values:
            labels = tuple("other" for _ in labels)
        return series, labels

    def inc(self, name, labels=(), amount=1.0):
        series, labels = self._series(name, labels)
        series[labels] = series.get(labels, 0.0) + amount
        if amount and name in self.recent:
            self._remember(name, labels, amount)

    def set(self, name, value, labels=()):
        series, labels = self._series(name, labels)
        series[labels] = float(value)

    def observe(self, name, value, labels=()):
        """Count `value` in the first bucket it fits (render adds them up, as `le` wants)."""
        series, labels = self._series(name, labels)
        entry = series.get(labels)
        if entry is None:
            entry = series[labels] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0]
        entry[0][bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        entry[1] += value
        entry[2] += 1

    def render(self):
        self._update_recent()
        out = []
        for name, (kind, help_text, label_names) in self.families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self.values[name].items()):
                pairs = list(zip(label_names, labels))
                if kind == "histogram":
                    buckets, total, count = value
                    for bound, bucket in zip(LATENCY_BUCKETS, itertools.accumulate(buckets)):
                        out.append(f"{name}_bucket{_labels(pairs + [('le', repr(bound))])} {bucket}")
                    out.append(f"{name}_bucket{_labels(pairs + [('le', '+Inf')])} {count}")
                    out.append(f"{name}_sum{_labels(pairs)} {_number(total)}")
                    out.append(f"{name}_count{_labels(pairs)} {count}")
                else:
                    out.append(f"{name}{_labels(pairs)} {_number(value)}")
        return "\n".join(out) + "\n"


def _label_value(value):
    """Escaped as the text format wants: backslash and quote escaped, newlines dropped."""
    return str(value).replace("\\", "\\\\").replace("\n", "").replace('"', '\\"')


def _labels(pairs):
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in pairs) + "}"


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def new_metrics():
    metrics = Metrics()
    metrics.declare("counter", "pulse_proxy_rpc_requests_total", "RPC requests by method and result",
                    ("method", "result"))
    metrics.declare("histogram", "pulse_proxy_rpc_latency_seconds", "RPC handling time", ("method",))
    metrics.declare("counter", "pulse_proxy_ssh_requests_total", "sensors -j fetches by node and result",
                    ("node", "result"))
    metrics.declare_recent("pulse_proxy_ssh_requests_total", "pulse_proxy_ssh_requests_recent",
                           f"sensors -j fetches by node and result in the last {RECENT_SECONDS // 60} "
                           "minutes")
    metrics.declare("histogram", "pulse_proxy_ssh_latency_seconds", "sensors -j fetch time", ("node",))
    metrics.declare("gauge", "pulse_proxy_queue_depth", "RPC requests being handled now")
    metrics.declare("counter", "pulse_proxy_rate_limit_hits_total", "Requests refused by rate limits")
    metrics.declare_recent("pulse_proxy_rate_limit_hits_total", "pulse_proxy_rate_limit_hits_recent",
                           f"Requests refused by rate limits in the last {RECENT_SECONDS // 60} minutes")
    metrics.declare("counter", "pulse_proxy_refused_requests_total", "Invalid, unknown, "
                    "forbidden and unauthorized requests (each costs its peer a token)",
                    ("result",))
    metrics.declare("counter", "pulse_proxy_write_timeouts_total", "Connections closed because "
                    "the peer did not read its reply in time", ("listener",))
    metrics.declare("counter", "pulse_proxy_audit_dropped_total", "Audit records the log pipe "
                    "could not take (reported in the log once it drains)")
    metrics.declare("gauge", "pulse_proxy_connections", "Open socket connections")
    metrics.declare("gauge", "pulse_proxy_node_up", "1 when the last sensors -j read worked",
                    ("node",))
    metrics.declare("gauge", "pulse_proxy_node_breaker_open", "1 while the node's breaker is open",
                    ("node",))
    metrics.declare("counter", "pulse_proxy_hostkey_changes_total", "Connections refused because "
                    "a node's host key changed", ("node",))
    metrics.declare("counter", "pulse_proxy_http_requests_total", "HTTPS requests by path and status",
                    ("path", "status"))
    metrics.declare("histogram", "pulse_proxy_http_latency_seconds", "HTTPS request handling time",
                    ("path",))
    metrics.declare("gauge", "pulse_proxy_http_connections", "Open HTTPS connections")
    metrics.declare("counter", "pulse_proxy_sensors_repairs_total", "sensors -j outputs made "
                    "strict JSON (lm-sensors 3.6.0 defects, NaN, repeated labels)", ("node", "repair"))
    metrics.declare("counter", "pulse_proxy_smart_refresh_total", "SMART reads of a node's disks "
                    "by result", ("node", "result"))
    metrics.declare("gauge", "pulse_proxy_smart_age_seconds", "Age of the node's last SMART data "
                    "(merged into every answer until the next read)", ("node",))
    metrics.declare("gauge", "pulse_proxy_build_info", "Build information", ("version",))
    metrics.set("pulse_proxy_queue_depth", 0)
    metrics.set("pulse_proxy_connections", 0)
    metrics.set("pulse_proxy_http_connections", 0)
    metrics.inc("pulse_proxy_rate_limit_hits_total", amount=0)
    metrics.inc("pulse_proxy_audit_dropped_total", amount=0)
    metrics.set("pulse_proxy_build_info", 1, (__version__,))
    return metrics


# ---------------------------------------------------------------------------------------------
# I/O: audit log
# ---------------------------------------------------------------------------------------------


class AuditLog:
    """JSON lines on a stream (stdout; journald keeps them). Never given key material.

    Writes are synchronous until `write_from_loop` hands the stream to the event loop: then a
    slow log pipe never blocks the loop. Up to MAX_AUDIT_BUFFER bytes wait for the pipe; a
    record that does not fit is counted, and the count is logged once the pipe takes records
    again, so none is lost without a trace.
    """

    def __init__(self, level="info", stream=None):
        self.level = LOG_LEVELS[level]
        self.stream = stream or sys.stdout
        self.fd = self.loop = None
        self.pending = bytearray()
        self.waiting_for_pipe = False   # a writer is registered with the loop
        self.held = False           # records wait for `flush` (SocketAcceptor's batch)
        self.dropped = 0            # since the last report
        self.dropped_total = 0
        self.second, self.stamp = None, None
        # one encoder, not one per record (json.dumps builds one for non-default arguments)
        self.encode = json.JSONEncoder(separators=(",", ":"), default=str,
                                       check_circular=False).encode

    def timestamp(self):
        """RFC 3339 UTC to the second, formatted once per second (a record per request)."""
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self.stamp

    def log(self, level, msg, **fields):
        if LOG_LEVELS[level] < self.level:
            return
        record = {"ts": self.timestamp(), "level": level, "msg": msg}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        self.write(record)

    def write(self, record):
        """One record as it is: `ts`, `level` and `msg` first, no None values (`log` builds
        it; the dispatcher builds its own, one per request)."""
        line = self.encode(record) + "\n"
        if self.fd is not None:
            self.emit(line.encode())
            return
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass    # a closed or full log pipe must not take requests down with it

    def write_from_loop(self, loop):
        """From now on write without blocking, the rest waiting in a bounded buffer."""
        try:
            self.stream.flush()
            fd = self.stream.fileno()
            os.set_blocking(fd, False)
        except (OSError, ValueError, AttributeError):
            return      # not a file (a test's StringIO): keep writing synchronously
        self.fd, self.loop = fd, loop

    def emit(self, data):
        if len(self.pending) + len(data) > MAX_AUDIT_BUFFER:
            self.dropped += 1
            self.dropped_total += 1
            return
        self.pending += data
        if not self.held:
            self.flush()

    def flush(self):
        while self.pending:
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                if self.loop.is_closed() or self.waiting_for_pipe:
                    return
                self.loop.add_writer(self.fd, self.flush)
                self.waiting_for_pipe = True
                return
            except OSError:
                self.pending.clear()        # the pipe is gone: nothing will take them
                return
            del self.pending[:written]
        if self.waiting_for_pipe:
            self.waiting_for_pipe = False
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_writer(self.fd)
        self.report_dropped()

    def write_synchronously(self):
        """Back to blocking writes (the loop is ending): what waits is written now."""
        if self.fd is None:
            return
        if self.waiting_for_pipe:
            self.waiting_for_pipe = False
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_writer(self.fd)
        os.set_blocking(self.fd, True)
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.write(fd, self.pending)
        self.pending.clear()
        self.report_dropped()

    def report_dropped(self):
        if self.dropped:
            count, self.dropped = self.dropped, 0
            self.log("warning", "Audit records dropped: the log pipe was full", count=count)


# ---------------------------------------------------------------------------------------------
# I/O: TLS material and the HTTPS token
# ---------------------------------------------------------------------------------------------


def tls_server_context(cert_path, key_path):
    """The HTTPS listener's context: TLS 1.2 or later, no compression, HTTP/1.1 only."""
    import ssl

    for what, path in (("http_tls_cert", cert_path), ("http_tls_key", key_path)):
        if not os.path.exists(path):
            raise ConfigError([f"{what}: {path} does not exist; create it with "
                               f"`{PROG} tls init` (as root)"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_path, key_path)
    except OSError as exc:
        raise ConfigError([f"http_tls_cert/http_tls_key: cannot read {exc.filename or cert_path}: "
                           f"{exc.strerror}"]) from None
    except ssl.SSLError as exc:
        raise ConfigError([f"http_tls_cert {cert_path} and http_tls_key {key_path}: not a "
                           f"matching PEM certificate and key ({exc.reason or exc})"]) from None
    return context


def read_http_token(config, log):
    """The bearer token Pulse must send: from http_auth_token_file, or inline (with a warning)."""
    path = config["http_auth_token_file"]
    if path:
        try:
            with open(path, "rb") as handle:
                token = handle.read(4096).decode("utf-8", "replace").strip()
        except OSError as exc:
            raise ConfigError([f"http_auth_token_file: cannot read {path}: {exc.strerror}"]) from None
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError([f"http_auth_token_file: {path} holds {len(token)} characters; the "
                               f"token needs at least {MIN_TOKEN_LENGTH}"])
        return token
    if config["http_auth_token"]:
        log.log("warning", "http_auth_token is inline in the config; move it to a file (mode "
                "0640) named by http_auth_token_file")
        return config["http_auth_token"]
    raise ConfigError(["http_enabled is true but there is no token: set http_auth_token_file "
                       f"to a file with a token of at least {MIN_TOKEN_LENGTH} characters"])


def cert_fingerprints(cert_pem):
    """(SHA256:AA:BB:... of the certificate, sha256//BASE64 of its public key for pinning)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return ("SHA256:" + ":".join(digest[i:i + 2] for i in range(0, 64, 2)),
            "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode())


def host_identities():
    """This host's names and global addresses, for a certificate's subject alternative names."""
    names = []
    for name in (socket.gethostname(), socket.getfqdn(), "localhost"):
        if name and name not in names:
            names.append(name)
    addresses = [str(ipaddress.ip_network(n).network_address) for n in detect_host_networks()]
    return names, addresses + ["127.0.0.1", "::1"]


def generate_certificate(names, addresses, days=CERT_DAYS):
    """A self-signed ECDSA P-256 server certificate: (cert PEM, key PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, PROG)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a))
                                              for a in addresses]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# ---------------------------------------------------------------------------------------------
# I/O: files and keys on disk
# ---------------------------------------------------------------------------------------------


def crash_point(name):
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named step."""
    if os.environ.get("PULSE_SENSOR_PROXY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o600, overwrite=True, owner=None, dir_fd=None):
    """Write `data` to `path` via a temp file in the same directory, fsync, rename, fsync dir.

    With overwrite=False an existing file is never replaced (FileExistsError instead);
    `owner` (uid, gid) is set before the file appears under its name. With `dir_fd` the file
    goes into that open directory under `path`'s base name (`path` then only names it).
    """
    directory = os.path.dirname(path) or "."
    name = os.path.basename(path) if dir_fd is not None else path
    tmp_name = f".{os.path.basename(path)}.{os.getpid()}.tmp"
    tmp = tmp_name if dir_fd is not None else os.path.join(directory, tmp_name)
    at = {"src_dir_fd": dir_fd, "dst_dir_fd": dir_fd}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.rename(tmp, name, **at)
        else:
            os.link(tmp, name, follow_symlinks=False, **at)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass            # never created, or a read-only file system refuses even this
        if isinstance(exc, OSError) and exc.errno and exc.filename != path:
            # os.write and fsync name no file, os.open names the temp file: name the target
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    if dir_fd is not None:
        os.fsync(dir_fd)
    else:
        fsync_dir(directory)


def generate_keypair(comment=KEY_COMMENT):
    """A new Ed25519 key as (private OpenSSH PEM bytes, public `ssh-ed25519 AAAA... comment`)."""
    import asyncssh
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    return key.export_private_key("openssh"), key.export_public_key("openssh")


def state_owner(state_dir):
    """(uid, gid) for files root writes into the state directory: the directory's owner."""
    if os.geteuid() != 0:
        return None
    try:
        info = os.lstat(state_dir)
    except FileNotFoundError:
        return None
    return info.st_uid, info.st_gid


def openssh_public_blob(private_pem):
    """The public key blob an OpenSSH private key file carries in its clear header
    (OpenSSH's PROTOCOL.key), read without any cryptography, so that the daemon's start need
    not import asyncssh; ValueError if the file is not one such key."""
    text = "".join(private_pem.decode("ascii", "replace").split())
    begin, end = "-----BEGINOPENSSHPRIVATEKEY-----", "-----ENDOPENSSHPRIVATEKEY-----"
    if not (text.startswith(begin) and text.endswith(end)):
        raise ValueError("not an OpenSSH private key")
    data = base64.b64decode(text[len(begin):-len(end)], validate=True)
    magic = b"openssh-key-v1\0"
    if not data.startswith(magic):
        raise ValueError("no openssh-key-v1 header")
    pos = len(magic)
    try:
        for _ in range(3):              # cipher name, kdf name, kdf options
            pos += 4 + struct.unpack_from(">I", data, pos)[0]
        count, size = struct.unpack_from(">II", data, pos)
    except struct.error:
        raise ValueError("truncated") from None
    blob = data[pos + 8:pos + 8 + size]
    if count != 1 or not size or len(blob) != size:
        raise ValueError("not exactly one whole key")
    return blob


def public_key_of(private_pem):
    """`ssh-ed25519 AAAA... pulse-sensor-proxy` derived from an OpenSSH private key (whatever
    comment the key holds); ValueError (asyncssh's KeyImportError) if it is not one."""
    import asyncssh
    key = asyncssh.import_private_key(private_pem)
    key.set_comment(KEY_COMMENT)
    return key.export_public_key("openssh")


class UnsafePathError(KeyCommandError):
    """A path in the state directory is not what root may read or write (a symlink, a FIFO,
    another owner's file, a group-writable directory ...)."""


def _file_kind(mode):
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a regular file"


def check_state_entry(info, path, directory, owner_uid, forbidden_bits):
    """Raise UnsafePathError unless `info` (an fstat/lstat) is a directory or a single-link
    regular file owned by `owner_uid` with none of `forbidden_bits` set."""
    want = stat.S_ISDIR if directory else stat.S_ISREG
    if not want(info.st_mode):
        raise UnsafePathError(f"{path} is {_file_kind(info.st_mode)}, not "
                              f"{'a directory' if directory else 'a regular file'}; refusing it")
    if info.st_uid != owner_uid:
        raise UnsafePathError(f"{path} is owned by uid {info.st_uid}, not by uid {owner_uid} "
                              "(the state directory's owner); refusing it")
    if stat.S_IMODE(info.st_mode) & forbidden_bits:
        raise UnsafePathError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; refusing it "
                              f"(none of {forbidden_bits:04o} may be set)")
    if not directory and info.st_nlink != 1:
        raise UnsafePathError(f"{path} has {info.st_nlink} hard links; refusing it")


def _open_no_follow(name, flags, path, dir_fd):
    """os.open that never follows a symlink and never blocks on a FIFO; a symlink is refused."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                kind = _file_kind(os.lstat(name, dir_fd=dir_fd).st_mode)
            except OSError:
                raise exc from None
            raise UnsafePathError(f"{path} is {kind}, not "
                                  f"{'a directory' if flags & os.O_DIRECTORY else 'a regular file'}"
                                  "; refusing to follow it") from None
        raise


class KeyStore:
    """The key slots on disk and the rotation journal:

    ssh/ (current, 0700), ssh.d/next/ (staging), ssh.d/prev/ (rollback), ssh.d/rotation.json.
    Private keys 0600, public keys 0640. Run as root, new files and directories get the
    owner of the state directory (the service account), so the daemon can read them.

    That account could plant symlinks, FIFOs or hard links here, so every access walks down
    from the state directory with directory descriptors, never follows a link, and accepts
    only directories and regular files the state directory's owner owns.
    """

    DIR_MODES = {"current": 0o700, "next": 0o750, "prev": 0o750}
    FORBIDDEN = {"dir": 0o022, "private": 0o077, "public": 0o022}
    READ_LIMIT = 65536

    def __init__(self, ssh_dir):
        self.ssh_dir = ssh_dir
        self.state_dir = os.path.dirname(ssh_dir)
        staging = os.path.join(self.state_dir, "ssh.d")
        self.staging = staging
        self.dirs = {"current": ssh_dir, "next": os.path.join(staging, "next"),
                     "prev": os.path.join(staging, "prev")}
        self.parts = {"current": [(os.path.basename(ssh_dir), 0o700)],
                      "next": [("ssh.d", 0o750), ("next", 0o750)],
                      "prev": [("ssh.d", 0o750), ("prev", 0o750)], "staging": [("ssh.d", 0o750)]}
        self.journal_path = os.path.join(staging, "rotation.json")
        self.owner = state_owner(self.state_dir)
        self.owner_uid = self.owner[0] if self.owner else os.geteuid()

    def private_path(self, slot):
        return os.path.join(self.dirs[slot], KEY_NAME)

    @contextlib.contextmanager
    def _dir(self, where, create=False):
        """A descriptor of a slot's directory ("staging" for ssh.d), reached without following
        links, or None when it does not exist; with create=True missing directories are made
        (and modes reset)."""
        fd = self._walk(where, create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _walk(self, where, create):
        path = self.state_dir
        fd = None
        try:
            if create:
                os.makedirs(self.state_dir, exist_ok=True)
            fd = _open_no_follow(self.state_dir, os.O_RDONLY | os.O_DIRECTORY, path, None)
            check_state_entry(os.fstat(fd), path, True, self.owner_uid, self.FORBIDDEN["dir"])
            for name, mode in self.parts[where]:
                path = os.path.join(path, name)
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, mode, dir_fd=fd)
                child = _open_no_follow(name, os.O_RDONLY | os.O_DIRECTORY, path, fd)
                os.close(fd)
                fd = child
                if create and self.owner:
                    os.fchown(fd, *self.owner)     # root made it; the service account reads it
                check_state_entry(os.fstat(fd), path, True, self.owner_uid, self.FORBIDDEN["dir"])
                if create:
                    os.fchmod(fd, mode)
            return fd
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if isinstance(exc, FileNotFoundError) and not create:
                return None
            if isinstance(exc, OSError):
                # mkdir and open at a dir_fd name only the last part; fchmod names nothing
                raise OSError(exc.errno, exc.strerror, path) from None
            raise

    def ensure_layout(self, slots=("current",)):
        for slot in slots:
            with self._dir(slot, create=True):
                pass

    def _read_at(self, dir_fd, name, path, kind):
        """A regular file's bytes (at most READ_LIMIT), or None when it does not exist."""
        if dir_fd is None:
            return None
        try:
            fd = _open_no_follow(name, os.O_RDONLY, path, dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            check_state_entry(os.fstat(fd), path, False, self.owner_uid, self.FORBIDDEN[kind])
            data = handle.read(self.READ_LIMIT + 1)
        if len(data) > self.READ_LIMIT:
            raise UnsafePathError(f"{path} is larger than {self.READ_LIMIT} bytes; refusing it")
        return data

    def read(self, slot):
        """(private PEM, public line) of a slot, or None when it holds no key."""
        path = self.private_path(slot)
        with self._dir(slot) as fd:
            private = self._read_at(fd, KEY_NAME, path, "private")
            if private is None:
                return None
            public = self._read_at(fd, KEY_NAME + ".pub", path + ".pub", "public")
        return private, public or b""

    def private_key(self, slot):
        """The slot's key as asyncssh loads it (read through the checks above)."""
        import asyncssh
        keys = self.read(slot)
        if keys is None:
            raise KeyCommandError(f"no SSH key at {self.private_path(slot)}")
        try:
            return asyncssh.import_private_key(keys[0])
        except asyncssh.KeyImportError as exc:
            raise KeyCommandError(f"cannot load the SSH key {self.private_path(slot)}: {exc}") from None

    def public_line(self, slot):
        keys = self.read(slot)
        if not keys:
            return None
        try:
            return public_key_of(keys[0]).decode().strip()
        except ValueError as exc:
            raise UnsafePathError(f"{self.private_path(slot)} is not an OpenSSH private key "
                                  f"({exc})") from None

    def write(self, slot, private, public, overwrite=True):
        path = self.private_path(slot)
        with self._dir(slot, create=True) as fd:
            atomic_write(path, private, mode=0o600, overwrite=overwrite, owner=self.owner,
                         dir_fd=fd)
            crash_point(f"{slot} private key written")
            atomic_write(path + ".pub", public, mode=0o640, owner=self.owner, dir_fd=fd)

    def generate(self, slot, overwrite=True):
        private, public = generate_keypair()
        self.write(slot, private, public, overwrite=overwrite)
        return public.decode().strip()

    def copy(self, source, target):
        private, _ = self.read(source)
        self.write(target, private, public_key_of(private))

    def clear(self, slot):
        with self._dir(slot) as fd:
            for name in (KEY_NAME + ".pub", KEY_NAME) if fd is not None else ():
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass

    def ensure_current(self, log):
        """Generate the current key if it is missing (never overwrite one); make its .pub
        match the private key (a rotation interrupted between the two renames leaves them
        apart)."""
        keys = self.read("current")
        if keys is None:
            try:
                self.generate("current", overwrite=False)
            except FileExistsError:
                return
            log.log("info", "Generated SSH key", path=self.private_path("current"))
            return
        try:
            matching = base64.b64decode(keys[1].split()[1], validate=True) == \
                openssh_public_blob(keys[0])
        except (ValueError, IndexError):
            matching = False
        public = None if matching else public_key_of(keys[0])   # asyncssh only then
        if public is not None and keys[1].split()[:2] != public.split()[:2]:
            with self._dir("current") as fd:
                atomic_write(self.private_path("current") + ".pub", public, mode=0o640,
                             owner=self.owner, dir_fd=fd)
            log.log("warning", "Rewrote id_ed25519.pub to match the private key",
                    path=self.private_path("current"))

    def journal(self):
        """The rotation journal, checked against the slots: it may only name keys that are in
        them (by fingerprint), so a forged journal cannot make root push or remove another key."""
        with self._dir("staging") as fd:
            data = self._read_at(fd, "rotation.json", self.journal_path, "public")
        if data is None:
            return None
        try:
            entry = json.loads(data)
        except ValueError:
            return {"step": "unreadable"}
        in_slots = {key_fingerprint(line) for line in map(self.public_line, self.DIR_MODES)
                    if line}
        problem = journal_problem(entry, in_slots)
        if problem:
            raise UnsafePathError(f"{self.journal_path}: {problem}; refusing it (check the key "
                                  "slots by hand, then remove the journal)")
        return entry

    def set_journal(self, **entry):
        with self._dir("staging", create=True) as fd:
            atomic_write(self.journal_path, json.dumps(entry).encode(), mode=0o640,
                         owner=self.owner, dir_fd=fd)

    def clear_journal(self):
        with self._dir("staging") as fd:
            if fd is None:
                return
            try:
                os.unlink("rotation.json", dir_fd=fd)
                os.fsync(fd)
            except FileNotFoundError:
                pass


def read_public_key(ssh_dir):
    try:
        with open(os.path.join(ssh_dir, KEY_NAME + ".pub")) as handle:
            return handle.read(4096).strip()
    except OSError:
        return ""


def sd_notify(message):
    """Tell systemd about our state when it asked (Type=notify); a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            pass


def prepare_socket_path(path):
    """Make the socket's directory and clear a stale socket; refuse anything that is not one."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, SOCKET_DIR_MODE)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise RuntimeError(f"{path} exists and is {kind}; refusing to remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise RuntimeError(f"another process is already serving {path}")


# ---------------------------------------------------------------------------------------------
# I/O: nodes over SSH, and this host's own sensors
# ---------------------------------------------------------------------------------------------

STDERR_KEEP = 4096


def local_names():
    """Names and addresses that mean this host."""
    hostname = socket.gethostname().lower()
    names = {"localhost", "localhost.localdomain", "127.0.0.1", "::1", hostname,
             hostname.split(".")[0]}
    names.update(n.split("/")[0] for n in detect_host_networks())
    return names


class Inventory:
    """The cluster's nodes: config `nodes:`, else /etc/pve/.members, else `pvecm nodes`,
    else this host alone. .members is re-read every few seconds (not per request), so a node
    joining or leaving is served without a restart."""

    def __init__(self, config, log, clock=time.monotonic):
        self.config, self.log, self.clock = config, log, clock
        self.members_path = os.path.join(config["pve_dir"], ".members")
        self.hostname = socket.gethostname().lower()
        self.names = local_names()
        self.next_check, self.members_text, self.nodes, self.source = 0.0, None, [], ""
        self.pvecm = None

    def current(self):
        now = self.clock()
        if now >= self.next_check:
            self.next_check = now + INVENTORY_RECHECK
            self.refresh()
        return self.nodes

    def refresh(self):
        if self.config["nodes"]:
            if self.source != "config":
                ssh = self.config["ssh"]
                self.nodes = [self.mark_local(Node(name, e.get("host"), e.get("port", ssh["port"]),
                                                   e.get("user", ssh["user"])), None)
                              for name, e in self.config["nodes"].items()]
                self.source = "config"
            return
        # pmxcfs reports .members with mtime 0 and rebuilds it on each read: compare its text
        try:
            with open(self.members_path, "rb") as handle:
                text = handle.read(MAX_CONFIG_BYTES)
        except OSError as exc:
            text = None
            if not isinstance(exc, FileNotFoundError) and self.members_text != exc.strerror:
                self.log.log("warning", "Cannot read cluster members", path=self.members_path,
                             error=exc.strerror)
                self.members_text = exc.strerror
        if text is not None:
            if text != self.members_text:
                self.members_text = text
                try:
                    local, nodes = parse_members(text.decode("utf-8"))
                    self.set_nodes(nodes, local, "pve")
                except (ValueError, UnicodeDecodeError) as exc:
                    self.log.log("warning", "Cannot read cluster members", path=self.members_path,
                                 error=str(exc))
            if self.source == "pve":
                return
        if self.pvecm is None:
            self.pvecm = read_pvecm_nodes()
        if self.pvecm[1]:
            self.set_nodes(self.pvecm[1], self.pvecm[0], "pvecm")
        else:
            self.set_nodes([Node(self.hostname)], self.hostname, "standalone")

    def set_nodes(self, nodes, local, source):
        ssh = self.config["ssh"]
        for node in nodes:
            node.port, node.user = ssh["port"], ssh["user"]
        self.nodes = [self.mark_local(node, local) for node in nodes]
        if source != self.source:
            self.log.log("info", "Node inventory", source=source, nodes=[n.name for n in self.nodes])
        self.source = source

    def mark_local(self, node, local):
        name = node.name.lower()
        node.local = self.config["local_sensors"] and (
            name == (local or "").lower() or name in (self.hostname, self.hostname.split(".")[0]))
        return node

    def resolve(self, requested):
        nodes = self.current()
        names = self.names if self.config["local_sensors"] else set()
        node = resolve_node(requested_node(requested), nodes, names,
                            self.config["strict_node_validation"], self.hostname.split(".")[0])
        if node.port is None:       # a name no source knew (strict_node_validation: false)
            node.port, node.user = self.config["ssh"]["port"], self.config["ssh"]["user"]
        return node


def read_pvecm_nodes():
    """`pvecm nodes` as (local, nodes); (None, []) where there is no pvecm or it fails."""
    try:
        out = subprocess.run(["pvecm", "nodes"], capture_output=True, timeout=5, text=True)
    except (OSError, subprocess.SubprocessError):
        return None, []
    return parse_pvecm_nodes(out.stdout) if out.returncode == 0 else (None, [])


async def read_capped(stream, limit, keep=None, what="sensors -j"):
    """Read a stream to EOF; NodeError past `limit` bytes, or keep only the first `keep`."""
    data = bytearray()
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(data)
        if keep is None:
            data += chunk
            if len(data) > limit:
                raise NodeError(output_too_large(limit, what))
        elif len(data) < keep:
            data += chunk[:keep - len(data)]


async def run_local(argv, what, timeout, limit, env=None, missing=None):
    """(stdout, stderr, exit status) of a program on this host, bounded in time and size; on
    a timeout its whole process group goes (the SMART program's smartctl with its shell)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, start_new_session=True)
    except FileNotFoundError:
        raise NodeError(missing or f"{argv[0]} is not installed on this host") from None
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await asyncio.gather(read_capped(proc.stdout, limit, what=what),
                                                  read_capped(proc.stderr, limit, STDERR_KEEP))
            status = await proc.wait()
    except TimeoutError:
        raise NodeError(f"{what} timed out after {timeout:g} s") from None
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass        # it ended on its own meanwhile
            await proc.wait()
    return stdout, stderr, status


async def run_local_sensors(timeout, limit):
    """`sensors -j` on this host, without a shell."""
    return interpret_sensors_output(*await run_local(
        ["sensors", "-j"], SENSORS_COMMAND, timeout, limit,
        missing="sensors is not installed on this host (apt install lm-sensors)"))


async def run_local_smart():
    """The node program's smart mode on this host: the same program the key line forces."""
    env = dict(os.environ, SSH_ORIGINAL_COMMAND=SMART_COMMAND)
    stdout, _, _ = await run_local(["/bin/sh", "-c", SMART_PROGRAM], "smart read",
                                   SMART_READ_TIMEOUT, SMART_MAX_OUTPUT, env)
    return stdout


def read_local_smart_file(path):
    """(smart-mode output, its mtime) that `smart-local` stored at `path`; None where there is
    no such file (a daemon started by hand, or as root, reads the disks itself)."""
    try:
        with open(path, "rb") as handle:
            mtime = os.fstat(handle.fileno()).st_mtime
            data = handle.read(SMART_MAX_OUTPUT + 1)
    except FileNotFoundError:
        if os.path.isdir(os.path.dirname(path)):   # the service's directory: it ran, or will
            raise NodeError(f"{path} is not there yet (systemctl start {SMART_LOCAL_UNIT})") from None
        return None
    except OSError as exc:
        raise NodeError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > SMART_MAX_OUTPUT:
        raise NodeError(f"{path}: {output_too_large(SMART_MAX_OUTPUT, 'smart read')}")
    return data, mtime


@functools.cache
def _asyncssh_classes():
    """The asyncssh subclasses, built once on first use so `version` never imports asyncssh
    (and a reading does not pay for building three classes)."""
    import asyncssh

    class GatedClient(asyncssh.SSHClient):
        """HostKeys.judge for keys not already trusted; tells the pool when it drops."""

        def __init__(self, judge, on_lost):
            self.judge, self.on_lost = judge, on_lost

        def validate_host_public_key(self, host, addr, port, key):
            return self.judge(key)

        def connection_lost(self, exc):
            self.on_lost()

    class SensorsSession(asyncssh.SSHClientSession):
        """Collects one `sensors -j` run with a cap on what it will hold."""

        def __init__(self, limit):
            self.limit, self.stdout, self.stderr = limit, bytearray(), bytearray()
            self.status, self.too_large, self.chan = None, False, None
            self.done = asyncio.get_running_loop().create_future()

        def connection_made(self, chan):
            self.chan = chan

        def data_received(self, data, datatype):
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                self.stderr += data[:max(0, STDERR_KEEP - len(self.stderr))]
                return
            self.stdout += data
            if len(self.stdout) > self.limit and not self.too_large:
                self.too_large = True
                self.chan.abort()

        def exit_status_received(self, status):
            self.status = status

        def connection_lost(self, exc):
            if not self.done.done():
                self.done.set_result(exc)

    return asyncssh, GatedClient, SensorsSession


def parse_known_hosts(text):
    """known_hosts text as (asyncssh's matcher of its usable lines, [(line number, host
    patterns), ...] of the lines whose key does not decode).

    OpenSSH skips such a line, and so does the matcher; the caller learns which hosts they
    named, so that a damaged pin fails closed instead of turning into a fresh trust on first use.
    """
    import asyncssh
    usable, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        entry = fields[1:] if fields[0].startswith("@") else fields
        try:
            asyncssh.import_public_key(" ".join(entry[1:3]))
        except (asyncssh.KeyImportError, ValueError):
            skipped.append((number, entry[0] if entry else ""))
            continue
        usable.append(line)
    return asyncssh.import_known_hosts("\n".join(usable) + "\n"), skipped


def known_host_keys(matcher, node, port):
    """(trusted, revoked) keys the matcher holds for the node at `port`: by its name, by its
    host when that is another name, and by its address when the host is one (asyncssh takes
    only an IP literal as the address; a node given by name alone has none yet)."""
    address = node.host if is_address(node.host) else ""
    hosts = [node.name] + ([node.host] if not address and node.host.lower() != node.name.lower() else [])
    matches = [matcher.match(host, address, port) for host in hosts]
    return [key for m in matches for key in m[0]], [key for m in matches for key in m[2]]


def names_host(patterns, names):
    """Whether a known_hosts host field (`a,b,[c]:2222`) names one of `names`."""
    return any(p.lstrip("!").removeprefix("[").split("]:")[0].lower() in names
               for p in patterns.split(","))


def load_private_key(path):
    import asyncssh
    try:
        with open(path, "rb") as handle:
            return asyncssh.import_private_key(handle.read(65536))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise NodeError(f"cannot load the SSH key {path}: {exc}") from None


class NameResolver:
    """A name resolved to addresses (getaddrinfo), bounded in time and cached, positive and
    negative alike, so a peer sending made-up names costs at most one lookup per name a TTL."""

    TIMEOUT = 1.0
    TTL = 300.0
    MAX_NAMES = 1024

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.cache = {}             # name -> (valid until, frozenset of addresses)

    async def addresses(self, name):
        now = self.clock()
        hit = self.cache.get(name)
        if hit and hit[0] > now:
            return hit[1]
        try:
            async with asyncio.timeout(self.TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(name, None,
                                                                     type=socket.SOCK_STREAM)
            found = frozenset(str(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos)
        except (OSError, TimeoutError, ValueError, UnicodeError):
            found = frozenset()
        if len(self.cache) >= self.MAX_NAMES:
            self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
            if len(self.cache) >= self.MAX_NAMES:
                self.cache.clear()
        self.cache[name] = (now + self.TTL, found)
        return found


class HostKeys:
    """Host-key policy: which keys a node may present (the cluster's known_hosts files, then
    our pins), trust on first use for a node nobody knows (pinned in our known_hosts, or
    refused under host_key_policy: strict), and the changed-key alarm."""

    def __init__(self, config, log, metrics=None, pin=True):
        self.config, self.log, self.metrics = config, log, metrics
        self.pin = pin                # keys commands with --dry-run: pin nothing
        self.known_hosts_path = os.path.join(os.path.dirname(config["ssh_dir"]), "known_hosts")
        self.pve_known_hosts_path = os.path.join(config["pve_dir"], "priv", "known_hosts")
        self.known_cache = {}         # path -> (stamp, SSHKnownHosts or error text)
        self.owner = state_owner(os.path.dirname(config["ssh_dir"]))

    def judge(self, node, server_key, known):
        """None to accept a key the node offers that no trusted key matched, else why not:
        `known` (the node has a key on record) makes it the changed-key alarm."""
        fingerprint = server_key.get_fingerprint()
        if known:
            if self.metrics:
                self.metrics.inc("pulse_proxy_hostkey_changes_total", (sanitize_label(node.name),))
            self.log.log("error", "HOST KEY CHANGED: refusing to connect; if the node was "
                         "reinstalled, remove its old key from known_hosts", node=node.name,
                         host=node.host, port=node.port, fingerprint=fingerprint,
                         known_hosts=self.known_hosts_path)
            return f"ssh: host key changed for {node.name}"
        if self.config["host_key_policy"] == "strict":
            self.log.log("warning", "Unknown host key refused", node=node.name,
                         fingerprint=fingerprint)
            return f"ssh: unknown host key for {node.name} (host_key_policy: strict)"
        try:
            self.pin_host_key(node, server_key)
        except OSError as exc:      # a full or read-only state dir: trust nothing unpinned
            return (f"ssh: cannot pin the host key of {node.name} in "
                    f"{self.known_hosts_path}: {exc.strerror}")
        return None

    def for_node(self, node):
        """(trusted keys, revoked keys, whether any key is known) for a node.

        The cluster's own knowledge comes first: the node's `nodes/<node>/ssh_known_hosts`
        (Proxmox VE >= 8.2 keeps each node's key there) and the older merged
        `priv/known_hosts`, as sshd answers on port 22. Our pins (trust on first use) count
        where the cluster knows nothing; where both know the node they must agree, or no key is
        trusted and the connection is the changed-key alarm.
        """
        cluster, revoked = [], []
        node_file = os.path.join(self.config["pve_dir"], "nodes", node.name, "ssh_known_hosts")
        for path in (node_file, self.pve_known_hosts_path):
            keys = self.file_entries(path, node, 22)
            cluster.extend(keys[0])
            revoked.extend(keys[1])
        pinned, pin_revoked = self.file_entries(self.known_hosts_path, node, node.port,
                                                       fail_closed=True)
        revoked.extend(pin_revoked)
        trusted = cluster or pinned
        if cluster and pinned:
            pins = {key.public_data for key in pinned}
            trusted = [key for key in cluster if key.public_data in pins]
        return trusted, revoked, bool(cluster or pinned)

    def file_entries(self, path, node, port, fail_closed=False):
        """(trusted, revoked) keys a known_hosts file holds for the node at `port`.

        A line whose key does not decode is skipped with a warning; in our own pins
        (`fail_closed`) such a line naming the node refuses the node rather than re-pin it.
        """
        try:
            info = os.stat(path)
        except OSError:
            return [], []
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        cached = self.known_cache.get(path)
        if cached is None or cached[0] != stamp:
            try:
                with open(path) as handle:
                    parsed = parse_known_hosts(handle.read(MAX_CONFIG_BYTES))
                for number, _ in parsed[1]:
                    self.log.log("warning", "Skipped a known_hosts line whose key does not decode",
                                 path=path, line=number)
            except PermissionError:
                parsed = None   # Proxmox's priv/ is root-only
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                parsed = f"ssh: cannot use {path}: {exc}"
            cached = self.known_cache[path] = (stamp, parsed)
        if isinstance(cached[1], str):
            raise NodeError(cached[1])    # fail closed: never re-pin over an unreadable file
        if cached[1] is None:
            return [], []
        matcher, skipped = cached[1]
        names = {node.name.lower(), node.host.lower()}
        for number, patterns in skipped:
            if fail_closed and names_host(patterns, names):
                raise NodeError(f"ssh: cannot use {path} line {number}: the host key of {node.name} "
                                "there does not decode")
        return known_host_keys(matcher, node, port)

    def pin_host_key(self, node, server_key):
        """Trust on first use: remember a new node's key in our known_hosts."""
        if not self.pin:
            self.log.log("info", "Would pin host key (dry run)", node=node.name,
                         fingerprint=server_key.get_fingerprint())
            return
        key_type, key_data = server_key.export_public_key().decode().split()[:2]
        names = dict.fromkeys([node.name, node.host])
        patterns = ",".join(n if node.port == 22 else f"[{n}]:{node.port}" for n in names)
        try:
            with open(self.known_hosts_path, "rb") as handle:
                existing = handle.read()
        except FileNotFoundError:
            existing = b""
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        atomic_write(self.known_hosts_path, existing + f"{patterns} {key_type} {key_data}\n".encode(),
                     mode=0o640, owner=self.owner)
        self.known_cache.pop(self.known_hosts_path, None)
        self.log.log("info", "Pinned host key (trust on first use)", node=node.name,
                     fingerprint=server_key.get_fingerprint(), known_hosts=self.known_hosts_path)


class Connector:
    """SSH to nodes: a new connection as node.user with the given client keys, the node's host
    key judged by HostKeys; one bounded command per session on an open connection."""

    def __init__(self, ssh, host_keys):
        self.ssh, self.host_keys = ssh, host_keys
        self.sessions = {}            # connection -> sessions running on it now
        self.closing = set()          # connections given up, closed once their sessions end

    def close_when_idle(self, conn):
        """Close CONN now, or, while sessions run on it, once the last of them ends."""
        if conn in self.sessions:
            self.closing.add(conn)
        else:
            conn.close()

    async def connect(self, node, client_keys, on_lost=None, whose="the proxy's key"):
        """A new SSH connection to a node as node.user, its host key checked by our policy."""
        asyncssh, client_class, _ = _asyncssh_classes()
        trusted, revoked, known = self.host_keys.for_node(node)
        verdict = {}

        def judge(server_key):
            verdict["error"] = self.host_keys.judge(node, server_key, known)
            return verdict["error"] is None

        timeout = self.ssh["connect_timeout"]
        try:
            async with asyncio.timeout(timeout):
                return await asyncssh.connect(
                    node.host, node.port, username=node.user, client_keys=client_keys,
                    known_hosts=(trusted, [], revoked), config=[], agent_path=None,
                    x509_trusted_certs=None, x509_trusted_cert_paths=[],   # nothing from ~/.ssh
                    client_factory=lambda: client_class(judge, on_lost or (lambda: None)),
                    preferred_auth=["publickey"], connect_timeout=timeout, keepalive_interval=15,
                    keepalive_count_max=3, gss_host=None, password=None, kbdint_auth=False,
                    ignore_encrypted=True, encryption_algs=SSH_CIPHERS)
        except TimeoutError:
            raise NodeError(f"ssh: cannot connect to {node.host}:{node.port}: no SSH answer within "
                            f"{timeout:g} s") from None
        except asyncssh.HostKeyNotVerifiable as exc:
            raise NodeError(verdict.get("error") or f"ssh: host key not verifiable: {exc}") from None
        except asyncssh.PermissionDenied:
            raise NodeError(f"ssh: permission denied (publickey) on {node.name}: {whose} is not "
                            "installed there") from None
        except (asyncssh.Error, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and (exc.errno or 0) > 0:
                reason = os.strerror(exc.errno)     # asyncio's text is "Connect call failed (addr)"
            else:
                reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise NodeError(f"ssh: cannot connect to {node.host}:{node.port}: {reason}") from None

    async def run_sensors(self, conn, node, command=SENSORS_COMMAND):
        """One `sensors -j` on an open connection, bounded in time and size (`doctor` asks
        for another command to see the node's forced command answer instead)."""
        return interpret_sensors_output(*await self.run_command(
            conn, node, command, SENSORS_COMMAND, self.ssh["command_timeout"],
            self.ssh["max_output_bytes"]))

    async def run_smart(self, conn, node):
        """The node program's smart mode: raw frames for parse_smart_report."""
        stdout, _, _ = await self.run_command(conn, node, SMART_COMMAND, "smart read",
                                              SMART_READ_TIMEOUT, SMART_MAX_OUTPUT)
        return stdout

    async def run_command(self, conn, node, command, what, timeout, limit):
        """(stdout, stderr, exit status) of one session asking for `command`."""
        session_class = _asyncssh_classes()[2]
        self.sessions[conn] = self.sessions.get(conn, 0) + 1
        try:
            async with asyncio.timeout(timeout):
                chan, session = await conn.create_session(lambda: session_class(limit), command,
                                                          encoding=None)
                chan.write_eof()
                lost = await session.done
        except TimeoutError:
            raise NodeError(f"{what} timed out after {timeout:g} s") from None
        finally:
            self.sessions[conn] -= 1
            if not self.sessions[conn]:
                del self.sessions[conn]
                if conn in self.closing:
                    self.closing.discard(conn)
                    conn.close()
        if session.too_large:       # the remote side may still be writing: not OutputError
            raise NodeError(output_too_large(limit, what))
        if lost is not None and session.status is None:
            # the connection died while the command ran: an SSH failure, not the node's sensors
            raise NodeError(f"ssh: session to {node.name} failed: {lost}")
        return bytes(session.stdout), bytes(session.stderr), session.status


class Breaker:
    """A node's circuit breaker: after BREAKER_THRESHOLD failures in a row it stays open for a
    cool-down, doubled each time it opens again (up to BREAKER_MAX_FACTOR), so a dead node
    costs one connect timeout per cool-down, not one per request."""

    def __init__(self):
        self.failures = 0
        self.opens = 0
        self.open_until = 0.0
        self.last_error = ""

    def check(self, now):
        """BreakerOpen while the breaker is open."""
        if self.failures >= BREAKER_THRESHOLD and now < self.open_until:
            raise BreakerOpen(f"unavailable (breaker open after {self.failures} failures in a "
                              f"row): {self.last_error}")

    def failed(self, error, now, cooldown):
        """Count a failure; True when it (re)opened the breaker."""
        self.failures += 1
        self.last_error = error
        if self.failures < BREAKER_THRESHOLD:
            return False
        self.opens += 1
        self.open_until = now + cooldown * min(2 ** (self.opens - 1), BREAKER_MAX_FACTOR)
        return True

    def succeeded(self):
        """Close it; True when it had been open (the node recovered)."""
        recovered = self.opens > 0
        self.failures = self.opens = 0
        return recovered


class NodeState:
    """Per node: its connection, the fetch in flight, its breaker and cache."""

    def __init__(self):
        self.conn = None
        self.conn_key = None          # the key generation the connection logged in with
        self.flight = None
        self.breaker = Breaker()
        self.cache = None             # (answer from it until, the last reading)
        self.smart_json = None        # the last SMART list (JSON text), once one was read
        self.smart_read_at = None     # its wall-clock time
        self.smart_due = 0.0          # pool clock: when to read SMART again
        self.smart_flight = None
        self.connecting = asyncio.Lock()


class NodePool:
    """Reads `sensors -j` from nodes: one persistent SSH connection per node, single flight
    per node, a breaker per node, host keys always verified."""

    def __init__(self, config, log, metrics, clock=time.monotonic):
        self.config, self.log, self.metrics, self.clock = config, log, metrics, clock
        self.ssh = config["ssh"]
        self.key_path = os.path.join(config["ssh_dir"], KEY_NAME)
        self.connector = Connector(self.ssh, HostKeys(config, log, metrics))
        self.states = {}
        self.key, self.key_stamp, self.key_generation = None, None, 0

    def state(self, node):
        key = (node.name, node.host, node.port, node.user, node.local)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = NodeState()
        return state

    async def fetch(self, node):
        """(answer text, cached?) for a node: `sensors -j`, and with disk_temperatures its
        SMART list too, in the wrapper form Pulse reads."""
        if not self.config["disk_temperatures"]:
            return await self.fetch_sensors(node)
        text, cached = await self.fetch_sensors(node)
        state = self.state(node)
        self.start_smart_refresh(node, state)      # on the connection sensors -j just used
        return with_smart(text, await self.smart_list(state)), cached

    def start_smart_refresh(self, node, state):
        if state.smart_flight is None and self.clock() >= state.smart_due:
            state.smart_flight = asyncio.ensure_future(self.refresh_smart(node, state))
            state.smart_flight.add_done_callback(lambda done: setattr(state, "smart_flight", None))

    async def smart_list(self, state):
        """The node's last SMART list. Only answers before the first read finished wait for
        it (up to command_timeout); later refreshes run behind answers with the last list."""
        if state.smart_json is None and state.smart_flight is not None:
            try:
                async with asyncio.timeout(self.ssh["command_timeout"]):
                    await asyncio.shield(state.smart_flight)
            except TimeoutError:
                pass
        return state.smart_json or "[]"

    async def read_smart(self, node, state):
        """(smart-mode output, when it was read, seconds to the next read); None when this
        host's stored read is the one already parsed."""
        if not node.local:
            started = time.time()
            stdout = await self.ssh_fetch(node, state, self.connector.run_smart)
            return stdout, started, self.config["smart_interval"]
        stored = read_local_smart_file(self.config["local_smart_file"])
        if stored is None:
            started = time.time()
            return await run_local_smart(), started, self.config["smart_interval"]
        state.smart_due = self.clock() + LOCAL_SMART_RECHECK
        return None if stored[1] == state.smart_read_at else (*stored, LOCAL_SMART_RECHECK)

    async def refresh_smart(self, node, state):
        label = sanitize_label(node.name)
        try:
            read = await self.read_smart(node, state)
            if read is None:
                return
            stdout, started, next_in = read
            disks, missing = parse_smart_report(stdout, started)
            if not disks and not missing and stdout.strip():
                raise OutputError(E_OLD_KEY_LINE)
        except Exception as exc:    # a background read: whatever failed is its result, logged
            retry = min(SMART_RETRY, self.config["smart_interval"])
            state.smart_due = self.clock() + retry
            self.metrics.inc("pulse_proxy_smart_refresh_total", (label, "error"))
            error = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
            self.log.log("warning", "SMART read failed", node=label, error=error, retry_in_s=retry)
            return
        state.smart_json, state.smart_read_at = json.dumps(disks), started
        state.smart_due = self.clock() + next_in
        self.metrics.inc("pulse_proxy_smart_refresh_total", (label, "success"))
        if missing:
            self.log.log("info", "SMART: disks without a temperature", node=label,
                         disks=dict(missing))

    def report_smart_ages(self, now):
        """Set the age gauge of every node's last SMART data (at each scrape)."""
        for (name, *_), state in self.states.items():
            if state.smart_read_at is not None:
                self.metrics.set("pulse_proxy_smart_age_seconds",
                                 round(max(0.0, now - state.smart_read_at), 3),
                                 (sanitize_label(name),))

    async def fetch_sensors(self, node):
        """(sensors JSON text, cached?) for a node, sharing one run among concurrent callers."""
        state = self.state(node)
        if state.cache and state.cache[0] > self.clock():
            return state.cache[1], True
        if state.flight is None:
            state.flight = asyncio.ensure_future(self.fetch_through_breaker(node, state))
            state.flight.add_done_callback(lambda done: self.flight_done(state, done))
        return await asyncio.shield(state.flight), False

    @staticmethod
    def flight_done(state, done):
        state.flight = None
        if not done.cancelled():
            done.exception()    # retrieved here, so a caller that gave up leaves no warning

    async def fetch_through_breaker(self, node, state):
        label = sanitize_label(node.name)
        breaker = state.breaker
        try:
            breaker.check(self.clock())
        except BreakerOpen:
            self.metrics.inc("pulse_proxy_ssh_requests_total", (label, "breaker_open"))
            raise
        started = time.monotonic()
        try:
            if node.local:
                text, repairs = await run_local_sensors(self.ssh["command_timeout"],
                                                        self.ssh["max_output_bytes"])
            else:
                text, repairs = await self.ssh_fetch(node, state, self.connector.run_sensors)
        except NodeError as exc:
            if breaker.failed(str(exc), self.clock(), self.config["breaker_cooldown_seconds"]):
                self.metrics.set("pulse_proxy_node_breaker_open", 1, (label,))
                self.log.log("warning", "Node breaker open", node=label, error=breaker.last_error,
                             retry_after_s=round(breaker.open_until - self.clock(), 1))
            self.metrics.inc("pulse_proxy_ssh_requests_total", (label, "error"))
            self.metrics.set("pulse_proxy_node_up", 0, (label,))
            raise
        finally:
            self.metrics.observe("pulse_proxy_ssh_latency_seconds", time.monotonic() - started, (label,))
        for repair in repairs:
            self.metrics.inc("pulse_proxy_sensors_repairs_total", (label, repair))
        if breaker.succeeded():
            self.log.log("info", "Node recovered", node=label)
        self.metrics.set("pulse_proxy_node_breaker_open", 0, (label,))
        self.metrics.inc("pulse_proxy_ssh_requests_total", (label, "success"))
        self.metrics.set("pulse_proxy_node_up", 1, (label,))
        if self.config["node_min_interval_seconds"] > 0:
            state.cache = (self.clock() + self.config["node_min_interval_seconds"], text)
        return text

    async def ssh_fetch(self, node, state, run):
        """`run(conn, node)` on the node's connection, reconnecting once if it had died."""
        asyncssh = _asyncssh_classes()[0]
        for attempt in (1, 2):
            conn, fresh = await self.connection(node, state)
            try:
                return await run(conn, node)
            except OutputError:
                raise       # the node printed something unusable; keep the connection
            except NodeError:
                self.discard(state, conn)
                raise
            except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost, asyncssh.DisconnectError,
                    OSError) as exc:
                self.discard(state, conn)
                if fresh or attempt == 2:
                    raise NodeError(f"ssh: session to {node.name} failed: {exc}") from None
                # a reused connection died since its last use (sshd restarted): reconnect once

    def drop(self, state):
        conn, state.conn = state.conn, None
        if conn is not None:
            conn.close()

    def discard(self, state, conn):
        """Give up CONN (a read on it failed, or a new key replaced it): never the node's
        newer connection, and closed only once the reads still running on it end, so that
        neither a rotation nor a failed SMART read cuts a sensors read beside it."""
        if state.conn is conn:
            state.conn = None
        self.connector.close_when_idle(conn)

    def client_key(self):
        """The private key, re-read when the file changes (rotation)."""
        try:
            info = os.stat(self.key_path)
        except OSError as exc:
            raise NodeError(f"no SSH key at {self.key_path}: {exc.strerror}") from None
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp != self.key_stamp:
            self.key = load_private_key(self.key_path)
            self.key_stamp = stamp
            self.key_generation += 1
            if self.key_generation > 1:
                self.log.log("info", "SSH key changed on disk; reconnecting with the new key",
                             fingerprint=self.key.get_fingerprint())
        return self.key

    async def connection(self, node, state):
        """(connection, fresh?): the node's open connection, or a new one. One caller at a
        time makes it (a SMART read and a sensors read may both find none)."""
        async with state.connecting:
            key = self.client_key()
            if state.conn is not None and state.conn_key == self.key_generation:
                return state.conn, False
            if state.conn is not None:      # logged in with a key since replaced
                self.discard(state, state.conn)
            made = {}

            def lost():
                if state.conn is made.get("conn"):
                    state.conn = None

            made["conn"] = await self.connector.connect(node, [key], lost)
            state.conn, state.conn_key = made["conn"], self.key_generation
            return made["conn"], True

    async def close(self):
        for state in self.states.values():
            self.drop(state)
        for conn in self.connector.closing:
            conn.close()
        self.connector.closing.clear()


# ---------------------------------------------------------------------------------------------
# I/O: keys on the nodes (run as root: push, revoke, rotate)
# ---------------------------------------------------------------------------------------------

AUTHORIZED_KEYS = ".ssh/authorized_keys"
LOCK_NAME = ".pulse-sensor-proxy.lock"
LOCK_WAIT = 15.0                   # seconds to wait for another editor of the same file
LOCK_STALE = 120.0                 # a lock older than this was left by a crashed editor
MAX_KEYS_FILE_BYTES = 1024 * 1024  # an authorized_keys larger than this is refused, not read
SFTP_STEP_TIMEOUT = 20.0           # seconds for one SFTP request to a node: SftpFiles


class FileInfo:
    """An lstat: `kind` as _file_kind names it ("a symlink", "a directory", ...), `mode` the
    permission bits."""
    __slots__ = ("kind", "mode", "uid", "gid", "mtime")

    def __init__(self, full_mode, uid, gid, mtime):
        self.kind, self.mode = _file_kind(full_mode), stat.S_IMODE(full_mode)
        self.uid, self.gid, self.mtime = uid, gid, mtime


class LocalFiles:
    """File operations on this host, relative to a home directory (root's, on a node)."""

    def __init__(self, home):
        self.home = home

    def path(self, name):
        return os.path.join(self.home, name)

    async def info(self, name):
        try:
            st = os.lstat(self.path(name))
        except FileNotFoundError:
            return None
        return FileInfo(st.st_mode, st.st_uid, st.st_gid, st.st_mtime)

    async def readlink(self, name):
        return os.readlink(self.path(name))

    async def mkdir(self, name, mode):
        os.mkdir(self.path(name), mode)

    async def rmdir(self, name):
        os.rmdir(self.path(name))

    async def read(self, name):
        with open(self.path(name), "rb") as handle:
            return bounded_keys_file(name, handle.read(MAX_KEYS_FILE_BYTES + 1))

    async def write_new(self, name, data, info):
        fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if info:
                os.fchown(fd, info.uid, info.gid)
                os.fchmod(fd, info.mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def rename(self, source, target):
        os.rename(self.path(source), self.path(target))
        fsync_dir(os.path.dirname(self.path(target)))

    async def remove(self, name):
        os.unlink(self.path(name))

    async def close(self):
        pass


def bounded_keys_file(name, data):
    """DATA, read with a limit of MAX_KEYS_FILE_BYTES + 1: what is longer is refused whole."""
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise KeyCommandError(f"{name} is larger than {MAX_KEYS_FILE_BYTES} bytes; refusing to edit it")
    return data


class SftpFiles(LocalFiles):
    """The same operations on a node over SFTP: no remote shell is ever run. Each request is
    bounded in time, a read in size, and a failure is the OSError or KeyCommandError the local
    operations give, never asyncssh's own."""

    def __init__(self, conn, sftp):
        self.conn, self.sftp = conn, sftp

    async def _request(self, what, name, operation):
        import asyncssh
        try:
            async with asyncio.timeout(SFTP_STEP_TIMEOUT):
                return await operation
        except TimeoutError:
            raise KeyCommandError(f"sftp: no answer within {SFTP_STEP_TIMEOUT:g} s to {what} {name}") from None
        except asyncssh.SFTPNoSuchFile:
            raise FileNotFoundError(errno.ENOENT, "No such file", name) from None
        except asyncssh.SFTPFailure as exc:
            # sftp-server (protocol 3) sends "Failure" for every errno it has no code for
            raise KeyCommandError(f"sftp: cannot {what} {name}: {exc.reason} (the node gives no "
                                  "reason; a full or read-only file system is one)") from None
        except asyncssh.SFTPError as exc:
            raise KeyCommandError(f"sftp: cannot {what} {name}: {exc.reason}") from None

    async def info(self, name):
        try:
            attrs = await self._request("stat", name, self.sftp.lstat(name))
        except FileNotFoundError:
            return None
        return FileInfo(attrs.permissions or 0, attrs.uid, attrs.gid, attrs.mtime or 0)

    async def readlink(self, name):
        return await self._request("read the link", name, self.sftp.readlink(name))

    async def mkdir(self, name, mode):
        import asyncssh
        try:
            await self._request("create", name, self.sftp.mkdir(name, asyncssh.SFTPAttrs(permissions=mode)))
        except KeyCommandError:
            if await self.info(name):
                raise FileExistsError(errno.EEXIST, "File exists", name) from None
            raise

    async def rmdir(self, name):
        await self._request("remove", name, self.sftp.rmdir(name))

    async def read(self, name):
        async def read_bounded():
            # a size, not read(): asyncssh would take it from the node's own stat and allocate it
            async with self.sftp.open(name, "rb") as handle:
                return await handle.read(MAX_KEYS_FILE_BYTES + 1)
        return bounded_keys_file(name, await self._request("read", name, read_bounded()))

    async def write_new(self, name, data, info):
        import asyncssh

        async def write():
            attrs = asyncssh.SFTPAttrs(permissions=info.mode if info else 0o600)
            async with self.sftp.open(name, "xb", attrs) as handle:
                await handle.write(data)
                if info:
                    await handle.chown(info.uid, info.gid)
                    await handle.chmod(info.mode)
                await handle.fsync()
        await self._request("write", name, write())

    async def rename(self, source, target):
        await self._request("rename", source, self.sftp.posix_rename(source, target))

    async def remove(self, name):
        await self._request("remove", name, self.sftp.remove(name))

    async def close(self):
        self.sftp.exit()
        self.conn.close()


async def resolve_authorized_keys(files):
    """The real file behind ~/.ssh/authorized_keys (on Proxmox a link into /etc/pve/priv):
    edits go to the target, so the cluster-wide link is never replaced by a copy. Its
    FileInfo, or None when there is none yet; anything but a regular file is refused."""
    target = AUTHORIZED_KEYS
    for _ in range(8):
        info = await files.info(target)
        if info is None or info.kind == "a regular file":
            return target, info
        if info.kind != "a symlink":
            raise KeyCommandError(f"{target} is {info.kind}, not a file; refusing to edit it")
        link = await files.readlink(target)
        target = link if link.startswith("/") else os.path.join(os.path.dirname(target), link)
    raise KeyCommandError(f"{AUTHORIZED_KEYS}: too many levels of symbolic links")


async def edit_node_keys(files, add_line=None, remove_keys=(), dry_run=False):
    """Apply edit_authorized_keys to a node's file: create ~/.ssh (0700) and the file (0600)
    if missing, keep owner and mode, write a temp file and rename it, under a lock directory
    so two editors never interleave. Returns (path, changes).

    A file that needs no change is only read: no lock, no write (on Proxmox every mkdir in
    /etc/pve/priv is a write the cluster filesystem replicates)."""
    target, info = await resolve_authorized_keys(files)
    directory = os.path.dirname(target)
    data = await files.read(target) if info else b""
    new, changes = edit_authorized_keys(data, add_line, remove_keys)
    if dry_run or new == data:
        return target, changes
    if await files.info(".ssh") is None:
        await files.mkdir(".ssh", 0o700)
    lock = os.path.join(directory, LOCK_NAME)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            await files.mkdir(lock, 0o700)
            break
        except OSError as exc:
            held = await files.info(lock)
            if held is None and not isinstance(exc, FileExistsError):
                raise KeyCommandError(f"cannot create {lock}: {exc.strerror or exc}") from None
            if held and time.time() - held.mtime > LOCK_STALE:
                await files.rmdir(lock)
                continue
            if time.monotonic() > deadline:
                raise KeyCommandError(f"{lock} is held by another editor; remove it if none is running") from None
            await asyncio.sleep(0.05)
    try:
        for _ in range(5):
            target, info = await resolve_authorized_keys(files)
            data = await files.read(target) if info else b""
            new, changes = edit_authorized_keys(data, add_line, remove_keys)
            if new == data:
                return target, changes
            temp = os.path.join(directory, f".authorized_keys.{uuid.uuid4().hex[:12]}.tmp")
            try:
                await files.write_new(temp, new, info)
            except (KeyCommandError, OSError) as exc:
                with contextlib.suppress(KeyCommandError, OSError):
                    await files.remove(temp)    # a half-written copy stays behind otherwise
                raise KeyCommandError(f"cannot write the new {target}: {exc}") from None
            now = (await files.read(target)) if await files.info(target) else b""
            if now != data:       # someone without our lock changed it meanwhile: start over
                await files.remove(temp)
                continue
            await files.rename(temp, target)
            return target, changes
        raise KeyCommandError(f"{target} keeps changing under us; try again")
    finally:
        await files.rmdir(lock)


class KeyAdmin:
    """What the root-only key commands share: config, inventory, SSH connector, key slots,
    output. With dry_run nothing is written: no node's file, no key slot, no host-key pin."""

    def __init__(self, config, dry_run=False, out=None):
        self.config = config
        self.out = out or sys.stdout
        self.log = AuditLog("warning", stream=sys.stderr)
        self.inventory = Inventory(config, self.log)
        self.connector = Connector(config["ssh"], HostKeys(config, self.log, pin=not dry_run))
        self.dry_run = dry_run
        self.keys = KeyStore(config["ssh_dir"])
        self.subnets = config["allowed_source_subnets"] or detect_host_networks()

    def say(self, text):
        print(text, file=self.out, flush=True)

    def nodes(self, names=()):
        nodes = self.inventory.current()
        if not names:
            return nodes
        wanted = []
        for name in names:
            try:
                wanted.append(resolve_node(requested_node(name), nodes, set(), True))
            except RequestError as exc:
                raise KeyCommandError(f"--node {name}: {exc}") from None
        return wanted

    def admin_keys(self):
        import asyncssh
        paths = self.config["admin_identity"]
        keys = []
        for path in paths:
            try:
                keys.append(asyncssh.read_private_key(path))
            except FileNotFoundError:
                continue
            except (OSError, asyncssh.KeyImportError) as exc:
                raise KeyCommandError(f"admin identity {path}: {exc}") from None
        if not keys:
            raise KeyCommandError("no admin SSH identity found (tried " + ", ".join(paths) +
                                  "); set admin_identity in the config")
        return keys

    async def files(self, node):
        """Access to a node's authorized_keys as its admin (root): local, or SFTP."""
        if node.local:
            return LocalFiles(os.path.expanduser("~"))
        import asyncssh
        conn = await self.connector.connect(node, self.admin_keys(), whose="the admin identity")
        try:
            async with asyncio.timeout(SFTP_STEP_TIMEOUT):
                return SftpFiles(conn, await conn.start_sftp_client())
        except asyncssh.ChannelOpenError as exc:
            conn.close()
            raise KeyCommandError(f"sftp: {node.name} offers no SFTP ({exc.reason}): "
                                  f"{AUTHORIZED_KEYS} is edited over SFTP only (`Subsystem sftp` "
                                  "in the node's sshd_config)") from None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            conn.close()
            raise KeyCommandError(f"sftp: cannot start on {node.name}: {exc or 'no answer'}") from None

    async def edit(self, node, add_line=None, remove_keys=()):
        files = await self.files(node)
        try:
            return await edit_node_keys(files, add_line, remove_keys, self.dry_run)
        finally:
            await files.close()

    async def verify(self, node, slot):
        """Does `slot`'s key run sensors -j on the node through the restricted path?"""
        if node.local:
            return None
        key = self.keys.private_key(slot)
        conn = await self.connector.connect(node, [key])
        try:
            await self.connector.run_sensors(conn, node)
        finally:
            conn.close()
        return None

    def line(self, public_key):
        if not self.subnets:
            raise KeyCommandError("allowed_source_subnets is empty and no address of this host was "
                                  "found; set it in the config (an empty from= would lock the key out)")
        return authorized_keys_line(public_key, self.subnets, self.config["disk_temperatures"])

    async def for_each(self, nodes, action, what):
        """Run `action(node)` on every node; report each; True when all succeeded."""
        ok = True
        for node in nodes:
            try:
                detail = await action(node)
                if detail:
                    self.say(f"  {node.name}: {detail}")
                crash_point(f"{what}: {node.name}")
            except (ProxyError, OSError) as exc:
                ok = False
                self.say(f"  {node.name}: FAILED to {what}: {exc}")
        return ok


def describe_changes(changes, path, dry_run):
    if not changes:
        return f"already up to date ({path})"
    verbs = ", ".join(f"{action} {_fingerprint_or_none(key)}" for action, key in changes)
    return f"{'would have ' if dry_run else ''}{verbs} ({path})"


async def keys_push(admin, names):
    public = admin.keys.public_line("current")
    if not public:
        raise KeyCommandError(f"no key in {admin.config['ssh_dir']}; start the service once to create it")
    admin.say(f"Installing {key_fingerprint(public)} on the nodes{' (dry run)' if admin.dry_run else ''}:")

    return await admin.for_each(admin.nodes(names), lambda n: _push_line(admin, n, public),
                                "install the key")


async def keys_revoke(admin, names, fingerprint):
    admin.say(f"Removing {fingerprint} from the nodes{' (dry run)' if admin.dry_run else ''}:")

    async def revoke(node):
        path, changes = await admin.edit(node, remove_keys={fingerprint})
        return describe_changes(changes, path, admin.dry_run)

    return await admin.for_each(admin.nodes(names), revoke, "remove the key")


async def run_cleanup(admin):
    """Act on a pending request_cleanup (the root unit's job): take the proxy's keys (current,
    next, previous) off each host it names, then drop the request, done or not: a failure is
    reported here and is for `keys revoke` by hand, not for an endless retry."""
    path = os.path.join(os.path.dirname(admin.config["ssh_dir"]), CLEANUP_REQUEST)
    claimed = path if admin.dry_run else path + ".processing"
    if not admin.dry_run:
        try:
            os.rename(path, claimed)      # a request that arrives meanwhile waits for next time
        except FileNotFoundError:
            admin.say("No cleanup request pending.")
            return True
    hosts = read_cleanup_request(claimed)
    fingerprints = [key_fingerprint(line) for line in
                    (admin.keys.public_line(slot) for slot in ("current", "next", "prev")) if line]
    ok = True
    for host in hosts:
        for fingerprint in fingerprints:
            try:
                ok = await keys_revoke(admin, [host], fingerprint) and ok
            except ProxyError as exc:
                admin.say(f"  {host}: FAILED: {exc}")
                ok = False
    if not admin.dry_run:
        os.unlink(claimed)
    if not ok:
        admin.say(f"Some keys stay; remove them with `{PROG} keys revoke --node HOST "
                  "--fingerprint FP`.")
    return ok


async def read_node_keys(admin, node):
    """(path, text) of the node's authorized_keys (behind its link), read as the admin; the
    text is "" when there is no file."""
    files = await admin.files(node)
    try:
        target, info = await resolve_authorized_keys(files)
        return target, (await files.read(target)).decode("utf-8", "replace") if info else ""
    finally:
        await files.close()


async def keys_status(admin):
    slots = {slot: admin.keys.public_line(slot) for slot in ("current", "next", "prev")}
    for slot, line in slots.items():
        admin.say(f"{slot:8} {key_fingerprint(line) if line else '-'}")

    async def status(node):
        _, data = await read_node_keys(admin, node)
        installed = {parse_authorized_key(raw)[2] for raw in data.splitlines()
                     if parse_authorized_key(raw)}
        marks = [f"{slot}=" + ("-" if not line else
                               "installed" if line.split()[1] in installed else "absent")
                 for slot, line in slots.items()]
        if node.local:
            works = "local sensors (no SSH)"
        else:
            try:
                await admin.verify(node, "current")
                works = "restricted path works"
            except ProxyError as exc:
                works = f"restricted path FAILS: {exc}"
        return f"{' '.join(marks)}; {works}"

    return await admin.for_each(admin.inventory.current(), status, "read authorized_keys")


async def rotation_check(admin):
    """Preflight: every node reachable as admin, and the current key works everywhere."""
    async def check(node):
        files = await admin.files(node)
        await files.close()
        await admin.verify(node, "current")
        return "admin login ok; " + ("local sensors" if node.local else "current key works")

    admin.say("Preflight:")
    return await admin.for_each(admin.inventory.current(), check, "pass preflight")


async def rotate_keys(admin, rollback=False):
    """Staged rotation (or rollback) that a crash at any point leaves with a working key."""
    try:
        return await _rotate_keys(admin, rollback)
    except OSError as exc:      # the state dir filled up or turned read-only part way
        again = f"{PROG} rotate-keys" + (" --rollback" if rollback else "")
        raise KeyCommandError(f"{exc}\nEvery node still accepts the key the daemon uses. Once "
                              f"{admin.keys.ssh_dir} can be written again, run `{again}` again: it "
                              "first finishes or undoes what this run left half done.") from None


class Rotation:
    """One rotation (op "rotate") or rollback: the key leaving, the key arriving, and the slot
    the arriving key comes from. The journal on disk holds the same fields plus its step."""

    def __init__(self, op, old, new):
        self.op, self.old, self.new = op, old, new
        self.source = "prev" if op == "rollback" else "next"


class RotationStep(typing.NamedTuple):
    """One step of a rotation, in ROTATION_STEPS order; `run(admin, rotation, nodes, step)`
    does it and says whether it succeeded."""
    run: typing.Callable
    describe: str           # --dry-run's line: {old} {new} {next} {keep} filled in
    journal: str = ""       # the journal's step, written before the step runs
    journal_crash: str = ""         # crash point right after that journal is written
    on_nodes: str = ""      # what it does on each node: its reports and crash points say it
    done_crash: str = ""    # crash point once it ran, whether it succeeded or not
    in_rollback: bool = True


async def _generate_step(admin, rotation, nodes, step):
    rotation.new = admin.keys.generate("next")
    return True


async def _push_step(admin, rotation, nodes, step):
    admin.say(f"{rotation.op}: {key_fingerprint(rotation.old)} -> {key_fingerprint(rotation.new)}")
    return await admin.for_each(nodes, lambda n: _push_line(admin, n, rotation.new), step.on_nodes)


async def _verify_step(admin, rotation, nodes, step):
    return await admin.for_each(nodes, lambda n: _verify(admin, n, rotation.source), step.on_nodes)


async def _swap_step(admin, rotation, nodes, step):
    """Swap the slots; idempotent, so a rerun after a crash redoes only what is missing."""
    keys = admin.keys
    current = keys.public_line("current")
    if current and current.split()[1] == rotation.old.split()[1]:
        # the old key stays in a slot until it is off the nodes: the journal may only name
        # keys in the slots (prev after a rotation, next during a rollback)
        keys.copy("current", "prev" if rotation.op == "rotate" else "next")
        crash_point("prev saved")
        keys.copy(rotation.source, "current")
    elif keys.read(rotation.source):
        keys.copy(rotation.source, "current")    # the private key was swapped; redo the .pub too
    return True


async def _remove_step(admin, rotation, nodes, step):
    keys = admin.keys
    admin.say(f"Now current: {key_fingerprint(rotation.new)}; removing "
              f"{key_fingerprint(rotation.old)} from the nodes")
    removed = await admin.for_each(nodes, lambda n: _remove_key(admin, n, rotation.old),
                                   step.on_nodes)
    if removed:
        # the journal goes first: a crash between these steps must not leave it naming a key
        # no slot holds any more (that journal would be refused)
        keys.clear_journal()
        keys.clear(rotation.source)
        keys.clear("next")
    else:
        admin.say("The old key stays on the failed nodes; run rotate-keys again to remove it.")
    return removed


# The rotation: run in this order, journalled and crash-tested by these names, and described
# by --dry-run from the same list. A journal "pushing" is undone after a crash (the new key
# was not verified everywhere); "swapping" or "removing" is completed (SWAP_STEP on).
ROTATION_STEPS = (
    RotationStep(_generate_step, "generate the next key in {next}", in_rollback=False),
    RotationStep(_push_step, "add {new} to every node, keeping {old}", journal="pushing",
                 journal_crash="journal written", on_nodes="add the new key"),
    RotationStep(_verify_step, "check that {new} reads sensors -j on every node",
                 on_nodes="verify the new key", done_crash="verified"),
    RotationStep(_swap_step, "make {new} current{keep}", journal="swapping"),
    RotationStep(_remove_step, "remove {old} from every node", journal="removing",
                 journal_crash="swapped", on_nodes="remove the old key"),
)
SWAP_STEP = 3
UNDONE_JOURNAL_STEPS = {step.journal for step in ROTATION_STEPS[:SWAP_STEP] if step.journal}
COMPLETED_JOURNAL_STEPS = {step.journal for step in ROTATION_STEPS[SWAP_STEP:]}


async def run_rotation_steps(admin, rotation, nodes, steps):
    """Run `steps` in order; False at the first that fails."""
    for step in steps:
        if step.journal:
            admin.keys.set_journal(op=rotation.op, step=step.journal, old=rotation.old,
                                   new=rotation.new)
            if step.journal_crash:
                crash_point(step.journal_crash)
        ok = await step.run(admin, rotation, nodes, step)
        if step.done_crash:
            crash_point(step.done_crash)
        if not ok:
            return False
    return True


def describe_rotation(admin, rotation, nodes):
    """--dry-run's account of ROTATION_STEPS, numbered as in a rotation."""
    keys, rollback = admin.keys, rotation.op == "rollback"
    old = key_fingerprint(rotation.old)
    new = key_fingerprint(rotation.new) if rotation.new else "(a new Ed25519 key)"
    admin.say(f"Would {rotation.op}: {old} -> {new} on " + ", ".join(n.name for n in nodes))
    keep = "" if rollback else f", keep {old} in {keys.dirs['prev']}"
    for number, step in enumerate(ROTATION_STEPS, 1):
        if step.in_rollback or not rollback:
            admin.say(f"  {number}. " + step.describe.format(old=old, new=new, keep=keep,
                                                             next=keys.dirs["next"]))


async def _rotate_keys(admin, rollback):
    keys, nodes = admin.keys, admin.inventory.current()
    journal = keys.journal()
    if journal:
        if not await recover_rotation(admin, journal, nodes):
            return False
        if journal.get("step") in COMPLETED_JOURNAL_STEPS:
            return True     # what the interrupted run was asked to do is now done
    old = keys.public_line("current")
    if old is None:
        raise KeyCommandError(f"no current key in {keys.ssh_dir}")
    rotation = Rotation("rotate", old, None)
    if rollback:
        rotation = Rotation("rollback", old, keys.public_line("prev"))
        if rotation.new is None:
            raise KeyCommandError(f"nothing to roll back to: {keys.dirs['prev']} holds no key")
    if admin.dry_run:
        describe_rotation(admin, rotation, nodes)
        return await admin.for_each(nodes, lambda n: _push_line(admin, n, rotation.new or old),
                                    "preview")
    until_verified = [step for step in ROTATION_STEPS[:SWAP_STEP]
                      if step.in_rollback or not rollback]
    if not await run_rotation_steps(admin, rotation, nodes, until_verified):
        admin.say("Undoing: removing the new key again; the current key stays in place.")
        await undo_rotation(admin, rotation, nodes, forget=True)
        return False
    return await run_rotation_steps(admin, rotation, nodes, ROTATION_STEPS[SWAP_STEP:])


async def undo_rotation(admin, rotation, nodes, forget=False):
    """Take the new key off the nodes and drop it: the current key never left them. The
    journal stays for the next run where a node kept the key, unless `forget`."""
    ok = await admin.for_each(nodes, lambda n: _remove_key(admin, n, rotation.new),
                              "remove the new key")
    if ok or forget:
        admin.keys.clear_journal()
        if rotation.op == "rotate":
            admin.keys.clear("next")
    return ok


async def _push_line(admin, node, public):
    path, changes = await admin.edit(node, admin.line(public))
    return describe_changes(changes, path, admin.dry_run)


async def _remove_key(admin, node, public):
    path, changes = await admin.edit(node, remove_keys={public.split()[1]})
    return describe_changes(changes, path, admin.dry_run)


async def _verify(admin, node, slot):
    await admin.verify(node, slot)
    return "local sensors" if node.local else "new key reads sensors -j"


async def recover_rotation(admin, journal, nodes):
    """Complete or undo a rotation that a crash interrupted."""
    step = journal.get("step")
    admin.say(f"Found an interrupted {journal.get('op', 'rotation')} at step '{step}'.")
    if admin.dry_run:
        admin.say("  (dry run: it would be " + ("undone" if step in UNDONE_JOURNAL_STEPS
                                                else "completed") + ")")
        return True
    rotation = Rotation(journal.get("op"), journal.get("old"), journal.get("new"))
    if step in UNDONE_JOURNAL_STEPS:
        admin.say("Undoing it: the new key had not been verified.")
        return await undo_rotation(admin, rotation, nodes)
    if step in COMPLETED_JOURNAL_STEPS:
        admin.say("Completing it: the new key is installed on every node.")
        return await run_rotation_steps(admin, rotation, nodes, ROTATION_STEPS[SWAP_STEP:])
    raise KeyCommandError(f"cannot understand {admin.keys.journal_path}; check the key slots by hand")


# ---------------------------------------------------------------------------------------------
# I/O: connections, for every listener
# ---------------------------------------------------------------------------------------------


class ConnectionClosed(Exception):
    def __init__(self, partial):
        super().__init__("connection closed")
        self.partial = partial


class WriteTimeout(ConnectionError):
    """The peer did not read what was written to it within WRITE_TIMEOUT."""


class Connection:
    """One accepted connection of any listener: bounded reads from a buffer, and at most one
    reply waiting for its peer (the write buffer's high mark is 0, so `drain` returns only
    once the peer took all of it).

    This is what asyncio's streams do for a server, without their reader, writer and
    protocol layers in between. Without a `quick` listener, `serve(connection)` runs as the
    connection's task from the start. With one, the connection has no task until it needs one:
    `quick.opened`, `quick.received` (new bytes) and `quick.ended` (the end of the peer's
    data) are called from the event loop instead, and `quick.closed` once the connection is
    gone (with or without a task), so that a request that can be answered at once costs no
    task and no extra turns of the loop; `start` hands the connection to a task when a
    request must wait. It is an asyncio Protocol by its methods,
    not by inheritance: loading the module (for `version` and `--help`) must not import asyncio.
    """

    __slots__ = ("serve", "quick", "buffer", "transport", "task", "waiter", "writable", "eof",
                 "paused", "over_ssl", "gone", "reading_paused", "error",
                 "peer", "served", "waiting_since")     # the last three: SocketListener's

    def __init__(self, serve=None, quick=None):
        self.serve, self.quick = serve, quick
        self.buffer = bytearray()
        self.transport = self.task = self.waiter = self.writable = self.peer = None
        self.eof = self.paused = self.over_ssl = self.gone = self.reading_paused = False
        self.error = None           # what the connection was lost with, if not a clean close
        self.served, self.waiting_since = 0, 0.0

    def start(self, coroutine):
        """Run `coroutine` as the connection's task; from now on it does the reading."""
        self.task = asyncio.get_running_loop().create_task(coroutine)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        if self.quick is None:
            self.start(self.serve(self))
        else:
            self.quick.opened(self)

    def data_received(self, data):
        self.buffer += data
        if len(self.buffer) > READ_BUFFER_BYTES and not self.reading_paused:
            # the peer sends faster than requests are read: hold it off, as streams do
            self.reading_paused = True
            self.transport.pause_reading()
        if self.task is None and self.quick is not None:
            self.quick.received(self)
        else:
            self._wake(self.waiter)

    def consume(self, count):
        """Take `count` bytes off the buffer: the peer may send again if it was held off."""
        del self.buffer[:count]
        if self.reading_paused and len(self.buffer) <= READ_BUFFER_BYTES // 2:
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self):
        self.eof = True
        if self.task is None and self.quick is not None:
            self.quick.ended(self)
        self._wake(self.waiter)
        return not self.over_ssl        # keep the socket open for the reply (TLS cannot)

    def connection_lost(self, exc):
        self.eof = self.gone = True
        self.error = exc
        if self.quick is not None:
            self.quick.closed(self)
        self._wake(self.waiter)
        self._wake(self.writable)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._wake(self.writable)

    @staticmethod
    def _wake(future):
        if future is not None and not future.done():
            future.set_result(None)

    # -- reading -----------------------------------------------------------------------------

    async def read_more(self):
        """Wait for more bytes; False at the end of the peer's data (an error if it was lost
        with one, as a reset)."""
        if not self.eof:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.error is not None:
            raise self.error
        return not self.eof

    def buffered_line(self, limit=MAX_REQUEST_BYTES):
        """The whole line at the head of the buffer, without its newline and left in the
        buffer (`consume` takes it); None while there is none, or past `limit`."""
        end = self.buffer.find(b"\n", 0, limit + 1)
        return bytes(self.buffer[:end]) if end >= 0 else None

    async def readline(self, limit=MAX_REQUEST_BYTES):
        """The next line without its newline; RequestError(E_TOO_LARGE) past `limit`."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                if end > limit:
                    raise RequestError(E_TOO_LARGE)
                line = bytes(self.buffer[:end])
                self.consume(end + 1)
                return line
            if len(self.buffer) > limit:
                raise RequestError(E_TOO_LARGE)
            if not await self.read_more() and self.buffer.find(b"\n") < 0:
                raise ConnectionClosed(partial=bool(self.buffer))

    async def readexactly(self, count):
        while len(self.buffer) < count:
            if not await self.read_more() and len(self.buffer) < count:
                raise ConnectionClosed(partial=True)
        data = bytes(self.buffer[:count])
        self.consume(count)
        return data

    # -- writing -----------------------------------------------------------------------------

    def write(self, data):
        self.transport.write(data)

    def unsent(self):
        return self.transport.get_write_buffer_size()

    async def drain(self, timeout=WRITE_TIMEOUT):
        """Wait until the peer took what was written; one that does not read within `timeout`
        loses the connection (WriteTimeout)."""
        if self.gone:
            raise ConnectionResetError("connection lost")
        if not self.paused:
            return
        self.writable = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.writable
        except TimeoutError:
            self.transport.abort()
            raise WriteTimeout(f"reply not read within {timeout:g} s") from None
        finally:
            self.writable = None
        if self.gone:
            raise ConnectionResetError("connection lost")

    async def start_tls(self, context, timeout):
        self.over_ssl = True
        self.transport = await asyncio.get_running_loop().start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout)
        self.transport.set_write_buffer_limits(high=0)

    def close(self):
        """Close, or abort when unread output is left (a close would wait for it forever)."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


class SocketTransport:
    """One accepted socket driven straight by the event loop's reader and writer callbacks: the
    part of an asyncio transport that Connection uses.

    asyncio's own transport costs a task, a future and several turns of the loop per connection
    before its protocol sees a byte; the Unix socket serves a new connection per request, so
    this one reads what the kernel has already queued as soon as the connection is accepted.
    Like asyncio's, it never calls `connection_lost` from inside a call of its protocol's (a
    failed write in `data_received` must not end the connection under its caller's feet).
    While its acceptor is accepting a batch, what is written is held until the batch's audit
    records are written (SocketAcceptor); held bytes are not counted as unsent.
    """

    __slots__ = ("loop", "sock", "fd", "protocol", "acceptor", "held", "unsent", "high", "low",
                 "reading", "paused_reading", "eof", "paused", "closing")

    def __init__(self, loop, sock, protocol, acceptor):
        self.loop, self.sock, self.fd, self.protocol = loop, sock, sock.fileno(), protocol
        self.acceptor = acceptor
        self.held = b""                     # written during the acceptor's batch
        self.unsent = bytearray()           # written, not yet taken by the kernel
        self.high, self.low = 64 * 1024, 16 * 1024
        self.reading = False                # read_ready is registered with the loop
        self.paused_reading = self.eof = False  # by the protocol; the peer sends no more
        self.paused = self.closing = False  # the protocol's writing; no more of anything

    def begin(self):
        """Introduce the connection to its protocol and hand it what is already queued. One
        that got its request this way was usually answered at once, and its peer is about to
        close it: the acceptor looks at it again before the loop is asked to watch it."""
        self.protocol.connection_made(self)
        if not self.closing and self.read_ready():
            self.acceptor.unwatched.append(self)
        else:
            self.watch()

    def look_again(self):
        """Read what came since `begin` (a peer that took its reply has often closed by now:
        then the socket is closed without the loop ever watching it), then leave reading to
        the loop."""
        if self.wants_reading() and not self.reading:
            self.read_ready()
        self.watch()

    def wants_reading(self):
        return not (self.paused_reading or self.eof or self.closing)

    def watch(self):
        """Have the loop call read_ready exactly while there is reading to do."""
        wanted = self.wants_reading()
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                self.loop.add_reader(self.fd, self.read_ready)
            else:
                self.loop.remove_reader(self.fd)

    def read_ready(self):
        """Hand the protocol what arrived; True when that was data."""
        try:
            data = self.sock.recv(READ_BUFFER_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.end(exc)
            return False
        if data:
            self.protocol.data_received(data)
            return True
        self.eof = True
        self.watch()
        if not self.protocol.eof_received():
            self.close()
        return False

    def pause_reading(self):
        self.paused_reading = True
        self.watch()

    def resume_reading(self):
        self.paused_reading = False
        self.watch()

    def write(self, data):
        if self.closing or not data:
            return
        if self.acceptor.batch is not None:
            if not self.held:
                self.acceptor.batch.append(self)
            self.held += data
            return
        self.send(data)

    def release(self):
        """The batch is over: send what was held (and end, if closed meanwhile)."""
        data, self.held = self.held, b""
        if self.sock is not None:
            self.send(data)
            if self.closing and not self.unsent:
                self.end(None)

    def send(self, data):
        if not self.unsent:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.end(exc)
                return
            if sent == len(data):
                return
            self.loop.add_writer(self.fd, self.write_ready)
            data = memoryview(data)[sent:]
        self.unsent += data
        if len(self.unsent) > self.high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def write_ready(self):
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(exc)
            return
        del self.unsent[:sent]
        if self.paused and len(self.unsent) <= self.low:
            self.paused = False
            self.protocol.resume_writing()
        if not self.unsent:
            self.loop.remove_writer(self.fd)
            if self.closing:
                self.end(None)

    def get_write_buffer_size(self):
        return len(self.unsent)

    def set_write_buffer_limits(self, high):
        """Pause the protocol's writing while more than `high` bytes wait for the peer, and
        resume it once at most a quarter of that does, as asyncio's transports do."""
        self.high, self.low = high, high // 4

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default

    def close(self):
        """No more reading; the connection ends once the peer took what was written."""
        if not self.closing:
            self.closing = True
            self.watch()
            if not (self.unsent or self.held):
                self.end(None)

    def abort(self):
        self.end(None)

    def end(self, exc):
        """Close the socket at once; the protocol hears of it once the batch is over, or on
        the loop's next turn."""
        if self.sock is None:
            return
        self.closing = True
        self.watch()
        self.held = b""
        if self.unsent:
            self.unsent.clear()
            self.loop.remove_writer(self.fd)
        self.sock.close()
        self.sock = None
        if self.acceptor.batch is not None:
            self.acceptor.lost.append((self.protocol, exc))
        else:
            self.loop.call_soon(self.protocol.connection_lost, exc)


class SocketAcceptor:
    """A listening socket whose connections are accepted in the loop's reader callback, each
    handed to a SocketTransport and a new protocol.

    Connections accepted in one go are answered as one batch: their audit records are written
    in one write, and only then are their replies sent, so a record is never behind its reply
    and a burst of connections costs the log (journald) one write, not one per request. Out of
    file descriptors (EMFILE), or refused an accept for any other reason, it logs that and
    pauses accepting for ACCEPT_RETRY_DELAY: the kernel queues the connections meanwhile, as
    asyncio's servers do.
    """

    def __init__(self, sock, protocol_factory, log):
        self.sock, self.protocol_factory, self.log = sock, protocol_factory, log
        self.loop = asyncio.get_running_loop()
        self.batch = None           # while accepting: transports whose writes are held
        self.lost = []              # (protocol, exception) of connections ended in the batch
        self.unwatched = []         # transports of the last batch, to be looked at again
        self.look_timer = None      # does it if no batch comes first
        self.retry = None
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self.accept_ready)

    def accept_ready(self):
        self.in_batch(self.accept_batch)

    def look_at_unwatched(self):
        self.look_timer = None
        self.in_batch(lambda: None)

    def in_batch(self, step):
        """`step`, then a look again at the last batch's connections (whose peers had the
        longest to close them), holding every reply until the records are written. The look
        comes with the next batch or, if none comes within LOOK_AGAIN_AFTER, then."""
        self.batch, self.log.held = [], True
        unwatched, self.unwatched = self.unwatched, []
        try:
            step()
        finally:
            for transport in unwatched:
                transport.look_again()
            self.log.held = False
            self.log.flush()
            batch, self.batch = self.batch, None
            for transport in batch:
                transport.release()
            lost, self.lost = self.lost, []
            for protocol, exc in lost:
                try:
                    protocol.connection_lost(exc)
                except Exception as error:      # as the loop would for its own callback
                    self.loop.call_exception_handler({"message": "connection_lost failed",
                                                      "exception": error})
        if self.unwatched and self.look_timer is None:
            self.look_timer = self.loop.call_later(LOOK_AGAIN_AFTER, self.look_at_unwatched)

    def accept_batch(self):
        # A few at a time: each is answered within this loop pass if it can be, its reply
        # waiting for the rest of the batch, and its peer may connect again meanwhile; the
        # ends of those already answered (and every other connection's turn) come with the
        # next pass. Measured against 16: as fast for one connection per request, and a
        # flood of new connections delays another peer less (bench_core, bench_campaign).
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # out of fds (EMFILE) or anything else the kernel refuses: try again later, as
                # asyncio does for the former, rather than fail on every pass meanwhile
                out_of = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                self.log.log("error", "socket.accept() out of system resource" if out_of
                             else "socket.accept() failed", error=repr(exc))
                self.loop.remove_reader(self.sock.fileno())
                self.retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self.loop.add_reader,
                                                  self.sock.fileno(), self.accept_ready)
                return
            conn.setblocking(False)
            SocketTransport(self.loop, conn, self.protocol_factory(), self).begin()

    def close(self):
        """Accept no more; the connections already accepted go on (a pending look again too)."""
        if self.retry is not None:
            self.retry.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ReadDeadlines:
    """When each connection that waits for a request without a task must have sent it. Every
    deadline is READ_TIMEOUT from when it was set, so they fall due in the order they were set:
    one loop timer, for the first, serves them all (a timer per connection costs each request
    two timer entries and two cancels)."""

    def __init__(self, expired):
        self.expired = expired      # called with each key whose deadline passed
        self.due = {}               # key -> deadline on the loop's clock, first due first
        self.timer = None

    def set(self, key):
        loop = asyncio.get_running_loop()
        when = self.due[key] = loop.time() + READ_TIMEOUT
        if self.timer is None:
            self.timer = loop.call_at(when, self.fire)

    def pop(self, key):
        """Forget the key's deadline; when it was, or None if it had none."""
        return self.due.pop(key, None)

    def fire(self):
        loop = asyncio.get_running_loop()
        self.timer = None
        while self.due:
            key = next(iter(self.due))
            if self.due[key] > loop.time():
                self.timer = loop.call_at(self.due[key], self.fire)
                return
            del self.due[key]
            self.expired(key)


class ConnectionSlots:
    """One listener's cap on open connections, and who gives way at it.

    A full request arrives in one write; a connection still waiting for one is idle or slow
    (or mid-handshake, or not reading its reply). When every slot is taken, the one that has
    waited longest gives way, so that clients that connect and send nothing (or a byte at a
    time) cannot lock everyone else out. A connection is named by whatever its listener keys
    it by (its task, or the connection itself); `evict(key, holder)` does the goodbye.
    """

    def __init__(self, cap, evict, on_count=None):
        self.cap, self.evict, self.on_count = cap, evict, on_count
        self.members = set()
        self.waiting = {}       # key -> holder, longest waiting first

    @property
    def open(self):
        return len(self.members)

    def take(self, key):
        """Count a new connection in: False when it is over the cap and none could give way
        (it stays counted until `leave`, as every connection does)."""
        self.members.add(key)
        self._counted()
        return len(self.members) <= self.cap or self.give_way()

    def admit(self, key):
        """`take`, undone at once when refused: False when the connection is to be closed."""
        if self.take(key):
            return True
        self.leave(key)
        return False

    def leave(self, key):
        """The connection is gone; once only, however many of its ends say so."""
        self.waiting.pop(key, None)
        if key in self.members:
            self.members.discard(key)
            self._counted()

    def _counted(self):
        if self.on_count:
            self.on_count(len(self.members))

    def idle(self, key, holder):
        """The connection waits (for a request, its reply to be read, or its pause): it may
        be asked to give way. One already waiting keeps its place in the line."""
        if key not in self.waiting:
            self.waiting[key] = holder

    def busy(self, key):
        self.waiting.pop(key, None)

    def give_way(self):
        """Close the connection that has waited longest; False when none is waiting."""
        if not self.waiting:
            return False
        key = next(iter(self.waiting))
        self.evict(key, self.waiting.pop(key))
        return True


# ---------------------------------------------------------------------------------------------
# I/O: the wire: requests read from a connection (replies are encoded in pure logic above)
# ---------------------------------------------------------------------------------------------


class UnreadRequest(Exception):
    """A request that could not be read whole: answered with `error`, in the form it came in
    (`http_form`), and then the connection is closed (its rest cannot be told from a new one)."""

    def __init__(self, error, http_form):
        super().__init__(error)
        self.error, self.http_form = error, http_form


async def read_request(connection, first, deadline):
    """The next request of a socket connection: (JSON line, whether it came as HTTP).

    A JSON line, or on a connection's first request an HTTP/1.x request whose body is the JSON
    (`curl --unix-socket`). The whole request must arrive by `deadline` (the loop's clock:
    READ_TIMEOUT after the connection began to wait for it). ConnectionClosed when the peer is
    done (or idle past it between keep-alive requests), UnreadRequest when what it sent cannot
    be a request.
    """
    http_form = False
    try:
        async with asyncio.timeout_at(deadline):
            line = await connection.readline()
            if first and HTTP_REQUEST_LINE.match(line):
                http_form = True
                line = (await read_http_body(connection)).replace(b"\n", b" ")
    except TimeoutError:
        if first or connection.buffer:
            raise UnreadRequest(E_READ_TIMEOUT, http_form) from None
        raise ConnectionClosed(partial=False) from None
    except RequestError as exc:
        raise UnreadRequest(exc.args[0], http_form) from None
    return line, http_form


def encode_reply(reply, error, http_form):
    """A reply line as it goes back: as it is, or as the HTTP response to an HTTP request."""
    if http_form:
        return http_response(status_for_error(error) if error else 200, reply)
    return reply


def content_length(headers, too_large):
    """The body length a request head announces; `too_large(length)` is raised past
    MAX_REQUEST_BYTES. ASCII digits only (str.isdigit takes "²"), no int() of thousands of
    digits; None when the header is not a length at all."""
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        return None
    length = length.lstrip("0") or "0"
    if len(length) > 9 or int(length) > MAX_REQUEST_BYTES:
        raise too_large
    return int(length)


async def read_head(connection, budget, skip_blank=False):
    """The lines of a request head up to the blank line that ends it, `budget` bytes in all
    (RequestError(E_TOO_LARGE) past it); with `skip_blank`, blank lines before the first one
    are passed over."""
    head = []
    while True:
        raw = (await connection.readline(budget)).rstrip(b"\r")
        if not raw:
            if head or not skip_blank:
                return head
            continue
        budget -= len(raw) + 2
        if budget < 0:
            raise RequestError(E_TOO_LARGE)
        head.append(raw)


async def read_http_body(connection):
    """The body of an HTTP/1.x request on the socket whose request line was read."""
    headers = parse_http_head(await read_head(connection, MAX_REQUEST_BYTES))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RequestError(E_INVALID)
    length = content_length(headers, RequestError(E_TOO_LARGE))
    if length is None:
        raise RequestError(E_INVALID)
    if headers.get("expect", "").lower() == "100-continue":
        connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return await connection.readexactly(length)


async def read_https_request(connection):
    """One HTTPS request's head (bounded) and its body, which a GET may have and nobody reads:
    (method, path, query, headers, keep_alive); HttpRefusal for one that cannot be served."""
    try:
        # a stray empty line before the request line is allowed
        head = await read_head(connection, MAX_HTTP_HEAD_BYTES, skip_blank=True)
    except RequestError:
        raise HttpRefusal(431, "request head too large") from None
    method, path, query, headers, keep_alive = parse_https_request(b"\r\n".join(head))
    if "transfer-encoding" in headers:
        raise HttpRefusal(400, "chunked request bodies are not accepted")
    length = content_length(headers, HttpRefusal(413, "request body too large"))
    if length is None:
        raise HttpRefusal(400, "invalid Content-Length")
    await connection.readexactly(length)
    return method, path, query, headers, keep_alive


# ---------------------------------------------------------------------------------------------
# I/O: the dispatcher (who asks, within which limits, for which method; and the audit)
# ---------------------------------------------------------------------------------------------

METHODS = {}        # name -> (capability, handler)
METHOD_ALIASES = {"get_temp": "get_temperature"}


def rpc_method(name, capability):
    """Register a method: `handler(daemon, peer, params, corr_id)` returns its data, or raises
    RequestError. A plain function answers at once, from the event loop's callback; one that
    has to wait (a node read) is an `async def` and is answered by the connection's task."""
    def register(handler):
        METHODS[name] = (capability, handler)
        return handler
    return register


class Peer:
    __slots__ = ("uid", "gid", "pid", "capabilities", "limit_key")

    def __init__(self, uid, gid, pid, capabilities):
        self.uid, self.gid, self.pid, self.capabilities = uid, gid, pid, capabilities
        self.limit_key = uid, pid   # what the rate limiter counts by, as the original daemon does


PEERCRED = struct.Struct("=iII")


def peer_credentials(sock):
    pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     PEERCRED.size))
    return pid, uid, gid


class RefusalSummary:
    """Refusals per peer: the first of an interval is logged in full, the rest are counted and
    logged as one line (count, first and last error) when the interval is over, so a peer that
    sends nothing but bad requests costs the log a few lines a minute, not one per request."""

    MAX_PEERS = 1024

    def __init__(self, log, interval=REFUSAL_SUMMARY_INTERVAL, clock=time.monotonic):
        self.log, self.interval, self.clock = log, interval, clock
        self.peers = {}         # limit key -> [window start, peer, count, first, last]

    def record(self, peer, error):
        """True when this refusal should be logged in full (the first of its interval)."""
        now = self.clock()
        entry = self.peers.get(peer.limit_key)
        if entry is not None and now - entry[0] < self.interval:
            entry[2] += 1
            entry[3] = entry[3] or error
            entry[4] = error
            return False
        if entry is not None:
            self.report(entry)
        elif len(self.peers) >= self.MAX_PEERS:
            self.flush()
        self.peers[peer.limit_key] = [now, peer, 0, None, None]
        return True

    def report(self, entry):
        _, peer, count, first, last = entry
        if count:
            self.log.log("warning", "Requests refused", uid=peer.uid, gid=peer.gid, pid=peer.pid,
                         count=count, first_error=first, last_error=last,
                         interval_s=self.interval)

    def flush(self, older_than=0.0):
        now = self.clock()
        for key, entry in list(self.peers.items()):
            if now - entry[0] >= older_than:
                self.report(entry)
                del self.peers[key]


# A function's code flag for `async def` (inspect.CO_COROUTINE, without importing inspect).
CO_COROUTINE = 0x80


class Call:
    """One request line parsed and checked against its peer, on its way to an answer;
    `error` is set when it is refused before its method runs."""

    __slots__ = ("peer", "started", "corr_id", "method", "node", "params", "handler", "error")

    def __init__(self, peer, started):
        self.peer, self.started = peer, started
        self.corr_id = self.method = self.node = self.params = self.handler = self.error = None

    @property
    def waits(self):
        """Its method has to wait (a node read): it is answered by a task, not at once."""
        return self.error is None and bool(self.handler.__code__.co_flags & CO_COROUTINE)


class Dispatcher:
    """From a socket peer's request line to its reply: the peer's capabilities, its rate
    limit, the method table, the handler's timeout, and one audit record per request.
    The limits and peers are those of the daemon's current settings (`daemon.settings`)."""

    def __init__(self, daemon):
        self.daemon, self.metrics, self.log = daemon, daemon.metrics, daemon.log
        self.own_uid = os.geteuid()
        self.refusals = RefusalSummary(daemon.log, clock=daemon.clock)
        self.in_flight = 0          # methods waiting for their answer (node reads)
        self.capabilities_of, self.capabilities = None, {}  # settings -> {(uid, gid): caps}

    def peer(self, sock):
        settings = self.daemon.settings
        pid, uid, gid = peer_credentials(sock)
        if self.capabilities_of is not settings:
            self.capabilities_of, self.capabilities = settings, {}
        caps = self.capabilities.get((uid, gid))
        if caps is None:
            if len(self.capabilities) >= MAX_CACHED_PEERS:
                self.capabilities.clear()
            caps = self.capabilities[uid, gid] = peer_capabilities(
                uid, gid, self.own_uid, settings.config["allowed_peers"], settings.idmapped_ranges)
        return Peer(uid, gid, pid, caps)

    def exhausted(self, peer):
        return self.daemon.limiter.exhausted(peer.limit_key)

    async def handle(self, peer, line, started):
        """Answer one request line: (correlation_id, error or None, response bytes)."""
        return await self.answer(self.prepare(peer, line, started))

    def prepare(self, peer, line, started):
        """The Call of a request line: parsed, its method found and allowed for the peer."""
        call = Call(peer, started)
        try:
            try:
                call.corr_id, call.method, call.params = parse_request(line)
            except RequestError as exc:
                call.corr_id = exc.corr_id
                raise
            node = call.params.get("node")
            call.node = node if isinstance(node, str) else None
            call.handler = self.method_for(peer, call.method)
        except RequestError as exc:
            call.error = exc.args[0]
        return call

    @staticmethod
    def method_for(peer, method):
        """The handler of `method` if the peer may call it; RequestError otherwise."""
        if not peer.capabilities:
            raise RequestError(E_UNAUTHORIZED)
        name = METHOD_ALIASES.get(method, method)
        if name not in METHODS:
            raise RequestError(E_UNKNOWN_METHOD)
        capability, handler = METHODS[name]
        if capability not in peer.capabilities:
            raise RequestError(E_FORBIDDEN_CLEANUP if capability == CAP_CLEANUP else E_FORBIDDEN)
        return handler

    def admit(self, call):
        """The limiter that admitted the call (release it when done), or None: rate limited."""
        limiter = self.daemon.limiter
        if limiter.acquire(call.peer.limit_key):
            return limiter
        self.metrics.inc("pulse_proxy_rate_limit_hits_total")
        return None

    def answer_now(self, call):
        """(correlation_id, error, reply) of a call that does not wait: refused, or a method
        that answers at once."""
        if call.error is not None:
            return self.refused(call, call.error)
        limiter = self.admit(call)
        if limiter is None:
            return self.refused(call, E_RATE_LIMITED)
        try:
            data = call.handler(self.daemon, call.peer, call.params, call.corr_id)
        except RequestError as exc:
            return self.refused(call, exc.args[0])
        except Exception:
            return self.failed(call)
        finally:
            limiter.release(call.peer.limit_key)
        return self.answered(call, data)

    async def answer(self, call):
        """(correlation_id, error, reply) of any call; one that waits is bounded by
        HANDLER_TIMEOUT."""
        if not call.waits:
            return self.answer_now(call)
        limiter = self.admit(call)
        if limiter is None:
            return self.refused(call, E_RATE_LIMITED)
        self.in_flight += 1
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT):
                data = await call.handler(self.daemon, call.peer, call.params, call.corr_id)
        except TimeoutError:
            return self.refused(call, E_TIMEOUT)
        except RequestError as exc:
            return self.refused(call, exc.args[0])
        except Exception:
            return self.failed(call)
        finally:
            self.in_flight -= 1
            limiter.release(call.peer.limit_key)
        return self.answered(call, data)

    def answered(self, call, data):
        self.audit(call.peer, call.corr_id, call.method, call.started, None, call.node)
        return call.corr_id, None, response_line(call.corr_id, data=data)

    def refused(self, call, error):
        corr_id = call.corr_id or str(uuid.uuid4())
        if error in CHARGED_REFUSALS:
            self.charge_refusal(call.peer, error)
        self.audit(call.peer, corr_id, call.method, call.started, error, call.node)
        return corr_id, error, response_line(corr_id, error=error)

    def failed(self, call):
        """A bug in a method: logged with its traceback, answered `internal error`."""
        corr_id = call.corr_id or str(uuid.uuid4())
        self.log.log("error", "Method failed", corr_id=corr_id, error=traceback.format_exc(limit=5))
        self.audit(call.peer, corr_id, call.method, call.started, E_INTERNAL, call.node)
        return corr_id, E_INTERNAL, response_line(corr_id, error=E_INTERNAL)

    def charge_refusal(self, peer, error):
        """A refused request costs its peer a token like a valid one, so a flood of them is
        paused by pause_over_limit as any other flood is."""
        self.metrics.inc("pulse_proxy_refused_requests_total", (result_for_error(error),))
        if not self.daemon.limiter.charge(peer.limit_key):
            self.metrics.inc("pulse_proxy_rate_limit_hits_total")

    def audit(self, peer, corr_id, method, started, error, node=None):
        latency = time.monotonic() - started
        label = METHOD_ALIASES.get(method, method) if method in METHODS or method in METHOD_ALIASES \
            else "unknown"
        result = "success" if error is None else result_for_error(error)
        self.metrics.inc("pulse_proxy_rpc_requests_total", (label, result))
        self.metrics.observe("pulse_proxy_rpc_latency_seconds", latency, (label,))
        # One record per request; a refusal by the limiter is the "Rate limit exceeded" line
        # operators grep for, so a flood costs one log write per request, not two.
        if error in REFUSALS and not self.refusals.record(peer, error):
            return      # counted in the peer's summary line
        log, level = self.log, "info" if error is None else "warning"
        if LOG_LEVELS[level] < log.level:
            return
        record = {"ts": log.timestamp(), "level": level, "msg": "RPC request" if error is None
                  else "Rate limit exceeded" if error == E_RATE_LIMITED else "RPC request failed"}
        # what log.log(level, msg, **fields) would write, built without packing the fields
        if corr_id is not None:
            record["corr_id"] = corr_id
        record["uid"], record["gid"], record["pid"] = peer.uid, peer.gid, peer.pid
        if isinstance(method, str):
            record["method"] = method[:64]
        if node is not None:
            record["node"] = sanitize_label(node)
        record["result"], record["latency_ms"] = result, round(latency * 1000, 3)
        if error is not None:
            record["error"] = error
        log.write(record)


# ---------------------------------------------------------------------------------------------
# I/O: the socket listener
# ---------------------------------------------------------------------------------------------


class SocketListener:
    """The Unix socket's connections: each peer identified, its requests read (one per
    connection, as Pulse connects, or many on one), answered by the dispatcher and written
    back; at the connection cap, the connection waiting longest gives way.

    A connection has no task while its requests can be answered from the event loop's
    callbacks (`opened`, `received`, `ended`, `read_timed_out`): a whole JSON line of a method
    that answers at once (get_status) costs no task. Anything else (a line still arriving, the
    HTTP form, a method that reads a node, a peer over its limit, a reply the peer does not
    take) goes to the connection's task, `serve_connection`, which reads on from the buffer.
    """

    def __init__(self, daemon, dispatcher):
        self.daemon, self.dispatcher = daemon, dispatcher
        self.slots = ConnectionSlots(MAX_CONNECTIONS, self.evicted)    # counted at a scrape
        self.pausing = 0            # requests of peers over their limit, waiting: pause_over_limit
        self.deadlines = ReadDeadlines(lambda connection: self.guarded(self.read_timed_out,
                                                                       connection))

    def connection(self):
        """A new connection (the protocol factory of the socket's server)."""
        return Connection(quick=self)

    # -- without a task ------------------------------------------------------------------------

    def guarded(self, step, connection):
        """Run a callback's work: a bug in it costs its connection, never the daemon."""
        try:
            step(connection)
        except Exception:
            self.daemon.log.log("error", "Connection handler failed",
                                error=traceback.format_exc(limit=5))
            connection.transport.abort()

    def opened(self, connection):
        self.guarded(self.take_in, connection)

    def received(self, connection):
        self.guarded(self.answer_at_once, connection)

    def say(self, connection, error, started):
        """A refusal that is the connection's last word: audited, and one reply line."""
        self.dispatcher.audit(connection.peer, None, None, started, error)
        connection.write(response_line(str(uuid.uuid4()), error=error))

    def take_in(self, connection):
        connection.served = 0
        admitted = self.slots.take(connection)
        connection.peer = self.dispatcher.peer(connection.transport.get_extra_info("socket"))
        if not admitted:
            self.say(connection, E_BUSY, time.monotonic())
            connection.close()
            return
        self.wait_for_request(connection)

    def wait_for_request(self, connection):
        """The connection waits for its next request: it may give way at the cap, and it has
        READ_TIMEOUT for the whole of it."""
        connection.waiting_since = time.monotonic()
        self.deadlines.set(connection)
        self.slots.idle(connection, connection.peer)

    def answer_at_once(self, connection):
        """New bytes: a whole line answered at once if it can be, else the task takes over."""
        if connection.gone:
            return
        line = connection.buffered_line()
        if line is None or (not connection.served and HTTP_REQUEST_LINE.match(line)) \
                or self.dispatcher.exhausted(connection.peer):
            self.start(connection)
            return
        call = self.dispatcher.prepare(connection.peer, line, connection.waiting_since)
        connection.consume(len(line) + 1)
        self.deadlines.pop(connection)
        self.slots.busy(connection)
        if call.waits:
            self.start(connection, call)
            return
        _, error, reply = self.dispatcher.answer_now(call)
        connection.write(reply)
        connection.served += 1
        if connection.unsent() or connection.buffer or error == E_UNAUTHORIZED:
            # a reply the peer has not taken, a pipelined line (answered in turn with every
            # other connection's), or a peer that is refused: for the task
            self.start(connection, closing=error == E_UNAUTHORIZED)
            return
        self.wait_for_request(connection)

    def ended(self, connection):
        """The peer sent all it will: a connection without a task has nothing half-read."""
        connection.close()

    def read_timed_out(self, connection):
        """No request within READ_TIMEOUT: a first one is refused, a keep-alive one is over."""
        if not connection.served:
            self.say(connection, E_READ_TIMEOUT, connection.waiting_since)
            if connection.unsent():
                self.start(connection, closing=True)
                return
        connection.close()

    def closed(self, connection):
        self.deadlines.pop(connection)
        self.slots.leave(connection)

    def close_idle(self):
        """At shutdown: close the connections that wait for a request without a task."""
        for connection in list(self.slots.members):
            if connection.task is None:
                connection.close()

    def start(self, connection, call=None, closing=False):
        """Hand the connection to a task, with the request already read (`call`), if any; one
        that was waiting for a request keeps the deadline it had for it."""
        deadline = self.deadlines.pop(connection)
        connection.start(self.serve_connection(connection, call, closing, deadline))

    def evicted(self, connection, peer):
        """Giving way at the cap: the connection gets `server busy` (unless it is not reading,
        then it gets nothing more) and is closed."""
        self.dispatcher.audit(peer, None, None, time.monotonic(), E_BUSY)
        if not connection.unsent():
            connection.write(response_line(str(uuid.uuid4()), error=E_BUSY))
        if connection.task is not None:
            connection.task.cancel()
        connection.close()      # also when its task was cancelled before it began

    # -- with a task -----------------------------------------------------------------------------

    async def serve_connection(self, connection, call, closing, deadline):
        task = asyncio.current_task()
        handlers = self.daemon.handlers
        handlers.add(task)
        try:
            await self.drain(connection)    # what was written before the task began
            if closing:
                return
            if call is not None:
                if not await self.reply(connection, call.peer,
                                        await self.dispatcher.answer(call), False):
                    return
            await self.converse(connection, deadline)
        except WriteTimeout:
            self.daemon.metrics.inc("pulse_proxy_write_timeouts_total", ("socket",))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:       # a bug must cost one connection, never the daemon
            self.daemon.log.log("error", "Connection handler failed",
                                error=traceback.format_exc(limit=5))
        finally:
            handlers.discard(task)
            connection.close()

    async def converse(self, connection, deadline):
        """Requests read and answered until the peer is done; the first by `deadline` if the
        connection was already waiting for it."""
        dispatcher, peer = self.dispatcher, connection.peer
        loop = asyncio.get_running_loop()
        while True:
            self.slots.idle(connection, peer)
            if connection.served and connection.buffer:
                # Lines a peer pipelined are already buffered: without this, one connection's
                # backlog is answered back to back while every other connection waits. It
                # yields as one waiting for a request, so at the cap it can give way meanwhile.
                await asyncio.sleep(0)
            started = time.monotonic() if deadline is None else connection.waiting_since
            try:
                line, http_form = await read_request(
                    connection, not connection.served, deadline or loop.time() + READ_TIMEOUT)
            except ConnectionClosed as closed:
                if closed.partial:
                    dispatcher.audit(peer, None, None, started, E_INVALID)
                return
            except UnreadRequest as unread:
                await self.refuse(peer, connection, started, unread)
                return
            deadline = None
            if dispatcher.exhausted(peer):
                await self.pause_over_limit(connection, peer)
                started = time.monotonic()
            self.slots.busy(connection)
            answer = await dispatcher.handle(peer, line, started)
            if not await self.reply(connection, peer, answer, http_form):
                return

    async def reply(self, connection, peer, answer, http_form):
        """Write an answer and wait for the peer to take it; False when the connection is
        done after it (HTTP is always `Connection: close`; a peer refused as unauthorized)."""
        _, error, reply = answer
        connection.write(encode_reply(reply, error, http_form))
        connection.served += 1
        await self.drain(connection)
        return not http_form and error != E_UNAUTHORIZED

    async def drain(self, connection):
        """Wait for the peer to take the reply; meanwhile the connection is idle, so at the
        connection cap it gives way like one waiting for a request."""
        if not connection.unsent():
            return
        self.slots.idle(connection, connection.peer)
        try:
            await connection.drain()
        finally:
            self.slots.busy(connection)

    async def pause_over_limit(self, connection, peer):
        """Wait before handling a request of a peer whose bucket is empty (it will be refused).

        Answering a flood is what costs the loop, whether it comes on keep-alive connections or
        a new connection per request. The wait is RATE_LIMIT_PAUSE times the number of such
        requests waiting, so refusals reach the loop about 1/RATE_LIMIT_PAUSE times a second in
        all, however many connections, pids or uids flood, and a flooder's threads are held
        meanwhile; a peer within its limits never waits. It is jittered because equal waits
        keep a flooder's connections in step, and each burst of refusals would hold the loop
        while another peer waits to be accepted. The connection is idle meanwhile, so at the
        connection cap it can give way like one waiting for a request.
        """
        self.pausing += 1
        self.slots.idle(connection, peer)   # set by converse too; evictable alone
        try:
            await asyncio.sleep(RATE_LIMIT_PAUSE * self.pausing * (0.5 + random.random()))
        finally:
            self.pausing -= 1

    async def refuse(self, peer, connection, started, unread):
        """Answer a request that could not be read, in the form it came in."""
        self.dispatcher.audit(peer, None, None, started, unread.error)
        reply = response_line(str(uuid.uuid4()), error=unread.error)
        connection.write(encode_reply(reply, unread.error, unread.http_form))
        await connection.drain()


# ---------------------------------------------------------------------------------------------
# I/O: metrics and health over HTTP
# ---------------------------------------------------------------------------------------------


class MetricsListener:
    """`GET /metrics` (Prometheus) and `GET /health` on metrics_address, one request per
    connection; a scraper that does not read its reply gives way at the cap."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.slots = ConnectionSlots(MAX_METRICS_CONNECTIONS, lambda task, _: task.cancel())

    def connection(self):
        return Connection(self.serve_connection)

    async def serve_connection(self, connection):
        task = asyncio.current_task()
        if not self.slots.admit(task):
            connection.transport.close()
            return
        self.slots.idle(task, None)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = (await connection.readline(8192)).rstrip(b"\r").split()
                while (await connection.readline(8192)).rstrip(b"\r"):
                    pass
            self.slots.busy(task)
            connection.write(self.response(request))
            self.slots.idle(task, None)
            await connection.drain()
        except WriteTimeout:
            self.daemon.metrics.inc("pulse_proxy_write_timeouts_total", ("metrics",))
        except (RequestError, ConnectionClosed, TimeoutError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            self.slots.leave(task)
            connection.close()

    def response(self, request):
        daemon = self.daemon
        if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
            return http_response(400, b"bad request\n", "text/plain")
        if request[0] not in (b"GET", b"HEAD"):
            return http_response(405, b"method not allowed\n", "text/plain")
        path = request[1].split(b"?")[0]
        if path == b"/metrics":
            daemon.metrics.set("pulse_proxy_queue_depth", daemon.dispatcher.in_flight)
            daemon.metrics.set("pulse_proxy_connections", daemon.socket.slots.open)
            daemon.metrics.set("pulse_proxy_audit_dropped_total", daemon.log.dropped_total)
            daemon.pool.report_smart_ages(time.time())
            return http_response(200, daemon.metrics.render().encode(),
                                 "text/plain; version=0.0.4; charset=utf-8")
        if path == b"/health":
            healthy = bool(daemon.public_key())
            body = json.dumps({"status": "ok" if healthy else "unavailable",
                               "version": __version__,
                               "uptime_seconds": round(daemon.clock() - daemon.started, 3)}).encode()
            return http_response(200 if healthy else 503, body + b"\n")
        return http_response(404, b"not found\n", "text/plain")


# ---------------------------------------------------------------------------------------------
# I/O: the daemon (config, nodes and listeners wired together)
# ---------------------------------------------------------------------------------------------

# The settings the node side (Inventory, NodePool, NameResolver) is built from: a reload that
# changes one of them replaces it, with its connections and caches; any other change keeps it.
NODE_SETTINGS = ("nodes", "pve_dir", "strict_node_validation", "local_sensors", "host_key_policy",
                 "ssh", "breaker_cooldown_seconds", "node_min_interval_seconds", "ssh_dir",
                 "disk_temperatures", "smart_interval", "local_smart_file")


class Settings(typing.NamedTuple):
    """What one config makes of the daemon, swapped as one on a reload: the config itself (a
    read-only view), and what is derived from it for every request."""
    config: typing.Mapping
    limiter: "RateLimiter"
    idmapped_ranges: list
    source_subnets: list


class NodeSide(typing.NamedTuple):
    """Who the nodes are and how they are read; kept over a reload that changes none of
    NODE_SETTINGS, so that its connections and caches survive it."""
    settings: dict
    inventory: "Inventory"
    pool: "NodePool"
    names: "NameResolver"


class Daemon:
    """The daemon's parts wired together: settings and node side (both swapped whole on a
    reload), the dispatcher, the socket and metrics listeners, metrics and the log."""

    def __init__(self, config, log=None, clock=time.monotonic):
        self.log = log or AuditLog(config["log_level"])
        self.metrics = new_metrics()
        self.clock = clock
        self.started = clock()
        self.handlers = set()       # every connection's task, of every listener: shutdown waits
        self.closing = set()        # pools of an older config, closing their connections
        self.public_key_stamp = self.public_key_line = None
        self.public_key_checked = -math.inf
        self.status_of, self.status_text = (None, None), None     # status_head's
        self.settings = self.nodes = None
        self.apply_config(config)
        self.dispatcher = Dispatcher(self)
        self.socket = SocketListener(self, self.dispatcher)
        self.metrics_listener = MetricsListener(self)

    # A handler reads what it needs of the current settings and node side through these.
    config = property(lambda self: self.settings.config)
    limiter = property(lambda self: self.settings.limiter)
    source_subnets = property(lambda self: self.settings.source_subnets)
    inventory = property(lambda self: self.nodes.inventory)
    pool = property(lambda self: self.nodes.pool)
    names = property(lambda self: self.nodes.names)

    def apply_config(self, config):
        """Switch to a validated config (start and SIGHUP): everything it makes is made first,
        then swapped in at once."""
        config = types.MappingProxyType(dict(config))
        ranges = []
        if config["allow_idmapped_root"]:
            try:
                with open(config["subuid_file"]) as handle:
                    ranges = parse_subuid(handle.read(MAX_CONFIG_BYTES))
            except OSError:
                pass
        node_settings = {key: config[key] for key in NODE_SETTINGS}
        nodes = self.nodes
        if nodes is None or node_settings != nodes.settings:
            nodes = NodeSide(node_settings, Inventory(config, self.log, self.clock),
                             NodePool(config, self.log, self.metrics, self.clock),
                             NameResolver(self.clock))
        limits = config["rate_limit"]
        limiter = RateLimiter(limits["per_minute"], limits["burst"], limits["max_concurrent"],
                              clock=self.clock, per_node_per_minute=limits["per_node_per_minute"],
                              per_node_burst=limits["per_node_burst"],
                              node_count=lambda: len(nodes.inventory.current()))
        subnets = config["allowed_source_subnets"]
        if not subnets:
            subnets = detect_host_networks()
            self.log.log("warning", "allowed_source_subnets is empty; using this host's addresses",
                         subnets=subnets)
        if self.nodes is not None and nodes is not self.nodes:
            # kept until it is done, and awaited at shutdown with the running pool
            closing = asyncio.ensure_future(self.nodes.pool.close())
            self.closing.add(closing)
            closing.add_done_callback(self.closing.discard)
        self.log.level = LOG_LEVELS[config["log_level"]]
        self.settings, self.nodes = Settings(config, limiter, ranges, subnets), nodes

    def status_head(self):
        """get_status's JSON object up to its uptime: the fields that change only with the key
        (looked at once a second) or the config, encoded when one of them changed."""
        key, settings = self.public_key(max_age=1.0), self.settings
        if key is not self.status_of[0] or settings is not self.status_of[1]:
            config = settings.config
            self.status_of = key, settings
            self.status_text = COMPACT_JSON.encode({
                "version": __version__, "public_key": key, "ssh_dir": config["ssh_dir"],
                "socket": config["socket_path"]})[:-1] + ","
        return self.status_text

    def public_key(self, max_age=0.0):
        """The key's public line, read again only when the file changed (rotation writes a
        new file); with `max_age`, whether it did is looked at only once in that many seconds
        (get_status: not on every request)."""
        now = time.monotonic()
        if now < self.public_key_checked + max_age:
            return self.public_key_line
        self.public_key_checked = now
        path = os.path.join(self.config["ssh_dir"], KEY_NAME + ".pub")
        try:
            info = os.stat(path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        if stamp is None or stamp != self.public_key_stamp:
            self.public_key_stamp, self.public_key_line = stamp, read_public_key(
                self.config["ssh_dir"])
        return self.public_key_line


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@rpc_method("get_status", CAP_READ)
def get_status(daemon, peer, params, corr_id):
    """Built as text: what changes only with the key or the config is encoded once
    (Daemon.status_head), the rest is numbers and the caller's capability list, whose JSON is
    the encoder's; the top-level list is where the original daemon put the capabilities."""
    caps = capabilities_json(peer.capabilities)
    return EncodedJSON(f'{daemon.status_head()}"uptime_seconds":'
                       f'{round(daemon.clock() - daemon.started, 3)!r},"peer":{{"uid":{peer.uid},'
                       f'"gid":{peer.gid},"pid":{peer.pid},"capabilities":{caps}}},'
                       f'"capabilities":{caps}}}')


@rpc_method("get_temperature", CAP_READ)
async def get_temperature(daemon, peer, params, corr_id):
    try:
        node = daemon.inventory.resolve(params.get("node"))
    except RequestError as refused:
        # A name no node has may still resolve to a known node's address (as the original's
        # validator allowed); an invalid name never gets this far.
        requested = requested_node(params.get("node"))
        node = node_at(await daemon.names.addresses(requested), daemon.inventory.current())
        if node is None:
            raise refused from None
    started = time.monotonic()
    try:
        text, cached = await daemon.pool.fetch(node)
    except NodeError as exc:
        raise RequestError(node_error_text(node.name, str(exc))) from None
    return {"node": params["node"], "temperature": text, "source": "local" if node.local else "ssh",
            "cached": cached, "latency_ms": round((time.monotonic() - started) * 1000, 3)}


async def probe_nodes(daemon):
    """Every inventory node read once, concurrently: [(node, error or None)]."""
    nodes = daemon.inventory.current()

    async def probe(node):
        try:
            await daemon.pool.fetch(node)
            return node, None
        except NodeError as exc:
            return node, str(exc)

    return await asyncio.gather(*(probe(node) for node in nodes))


@rpc_method("register_nodes", CAP_READ)
async def register_nodes(daemon, peer, params, corr_id):
    results = []
    for node, error in await probe_nodes(daemon):
        entry = {"name": node.name, "host": node.host, "ssh_ready": error is None,
                 "source": "local" if node.local else "ssh"}
        if error:
            entry["error"] = error
        results.append(entry)
    return {"nodes": results}


def cleanup_host(value):
    """The node a request_cleanup names; Pulse sends the node's configured URL
    (`https://pve1.example.lan:8006`), so scheme, port and path are taken off first."""
    if isinstance(value, str):
        host = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", value.strip()).split("/")[0]
        bracketed = re.fullmatch(r"\[([^\]]+)\](:\d+)?", host)
        if bracketed:
            host = bracketed.group(1)
        elif host.count(":") == 1:
            host = host.split(":")[0]
        value = host
    return requested_node(value)


def read_cleanup_request(path):
    """The hosts of a pending clean-up request ([] when there is none or it is unreadable)."""
    try:
        with open(path) as handle:
            hosts = json.load(handle).get("hosts")
    except (OSError, ValueError, AttributeError):
        return []
    return [h for h in hosts if isinstance(h, str)] if isinstance(hosts, list) else []


@rpc_method("request_cleanup", CAP_CLEANUP)
def request_cleanup(daemon, peer, params, corr_id):
    """Queue the removal of the proxy's key from a node, for the root unit that watches the
    request file (the daemon itself cannot change a node). One pending file: a new request
    joins the hosts already waiting."""
    host = cleanup_host(params.get("host"))
    reason = params.get("reason") if isinstance(params.get("reason"), str) else None
    path = os.path.join(os.path.dirname(daemon.config["ssh_dir"]), CLEANUP_REQUEST)
    hosts = list(dict.fromkeys(read_cleanup_request(path) + [host]))
    if len(hosts) > MAX_CLEANUP_HOSTS:
        raise RequestError(f'node "{host}": cleanup not queued: {MAX_CLEANUP_HOSTS} hosts are '
                           "already waiting")
    body = {"hosts": hosts, "requested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason[:200] if reason else None}
    try:
        atomic_write(path, json.dumps(body).encode() + b"\n", mode=0o640)
    except OSError as exc:
        raise RequestError(f'node "{host}": cleanup not queued: cannot write {path}: '
                           f"{exc.strerror}") from None
    daemon.log.log("warning", "Cleanup requested: the proxy's key is to be removed from a node",
                   node=host, uid=peer.uid, pid=peer.pid, reason=body["reason"], path=path)
    return {"queued": True}


@rpc_method("ensure_cluster_keys", CAP_ADMIN)
async def ensure_cluster_keys(daemon, peer, params, corr_id):
    """Report where the key works. The daemon holds no credential that could change a node:
    installing the key is `pulse-sensor-proxy keys push`, run as root."""
    public_key = daemon.public_key()
    if not public_key:
        raise RequestError(f"ssh: no public key in {daemon.config['ssh_dir']}")
    results = {}
    for node, error in await probe_nodes(daemon):
        if error is None:
            results[node.name] = {"success": True}
        else:
            hint = "; run `pulse-sensor-proxy keys push` as root on this host to install it"
            results[node.name] = {"success": False,
                                  "error": error + (hint if "permission denied" in error else "")}
    return {"nodes": [node for node in results], "results": results,
            "success_count": sum(r["success"] for r in results.values()),
            "total_count": len(results),
            "authorized_key": authorized_keys_line(public_key, daemon.source_subnets,
                                                   daemon.config["disk_temperatures"])}


# ---------------------------------------------------------------------------------------------
# HTTPS mode: the listener for a Pulse on another machine
# ---------------------------------------------------------------------------------------------


class HttpsFront:
    """`GET /temps?node=NAME` and `GET /health` over TLS, as Pulse's HTTP client asks for them.

    Checks run in the original's order, each with its own status: the client's address (403),
    its rate limit (429), the bearer token (401). Only then is the node resolved and read, by
    the daemon's Inventory and NodePool, the same as for the socket.
    """

    def __init__(self, daemon):
        self.daemon = daemon
        # waiting: in a handshake or between requests; one giving way is dropped unanswered
        self.slots = ConnectionSlots(MAX_HTTPS_CONNECTIONS, self.evicted, lambda count: (
            daemon.metrics.set("pulse_proxy_http_connections", count)))
        self.load(daemon.config)

    def load(self, config):
        """Read cert, key and token (start and SIGHUP); ConfigError says which one is missing."""
        context = tls_server_context(config["http_tls_cert"], config["http_tls_key"])
        token = read_http_token(config, self.daemon.log)
        allowed = config["http_allowed_clients"] or self.daemon.source_subnets
        self.context, self.token = context, token
        self.networks = [parse_network(n) for n in allowed]

    @staticmethod
    def evicted(task, connection):
        connection.transport.abort()
        task.cancel()

    def connection(self):
        return Connection(self.serve_connection)

    async def serve_connection(self, connection):
        task = asyncio.current_task()
        if not self.slots.admit(task):
            connection.transport.abort()
            return
        self.daemon.handlers.add(task)
        self.slots.idle(task, connection)
        client = str((connection.transport.get_extra_info("peername") or ("unknown",))[0])
        clean = False
        try:
            # A handshake that never finishes holds its slot for READ_TIMEOUT at most.
            async with asyncio.timeout(READ_TIMEOUT):
                await connection.start_tls(self.context, READ_TIMEOUT)
            clean = await self.serve_requests(client, connection, task)
        except WriteTimeout:
            self.daemon.metrics.inc("pulse_proxy_write_timeouts_total", ("https",))
        except (ConnectionError, TimeoutError, ConnectionClosed, asyncio.CancelledError, OSError):
            pass
        except Exception:       # a bug must cost one connection, never the daemon
            self.daemon.log.log("error", "HTTPS connection handler failed",
                                error=traceback.format_exc(limit=5))
        finally:
            self.daemon.handlers.discard(task)
            self.slots.leave(task)
            if clean:
                connection.transport.close()
            else:
                connection.transport.abort()

    async def serve_requests(self, client, connection, task):
        """Requests on one keep-alive connection; True when it ends in an orderly way."""
        idle = READ_TIMEOUT
        while True:
            self.slots.idle(task, connection)
            async with asyncio.timeout(idle):
                while not connection.buffer:
                    if not await connection.read_more():
                        return True
            started = time.monotonic()
            method, path, keep_alive = "-", "-", False
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    method, path, query, headers, keep_alive = await read_https_request(connection)
                self.slots.busy(task)
                status, data, node = await self.answer(client, method, path, query, headers)
            except HttpRefusal as exc:
                status, data, node, keep_alive = exc.status, {"error": str(exc)}, None, False
            except TimeoutError:
                status, data, node, keep_alive = 408, {"error": "read timeout"}, None, False
            self.audit(client, method, path, status, data, node, started)
            connection.write(https_response(status, data, keep_alive))
            self.slots.idle(task, connection)   # a client that does not read gives way at the cap
            await connection.drain()
            if not keep_alive:
                return True
            idle = HTTPS_IDLE_TIMEOUT


    async def answer(self, client, method, path, query, headers):
        """(status, JSON data, node) of one request that was read whole."""
        daemon = self.daemon
        if not address_allowed(client, self.networks):
            raise HttpRefusal(403, "source not allowed")
        key = ("https", client)
        if not daemon.limiter.acquire(key):
            daemon.metrics.inc("pulse_proxy_rate_limit_hits_total")
            raise HttpRefusal(429, E_RATE_LIMITED)
        try:
            problem = check_bearer(headers.get("authorization"), self.token)
            if problem:
                raise HttpRefusal(401, problem)
            if path not in ("/temps", "/health"):
                raise HttpRefusal(404, "not found")
            if method != "GET":
                raise HttpRefusal(405, "method not allowed")
            if path == "/health":
                return 200, {"status": "ok", "version": __version__}, None
            return await self.temperatures(query.get("node", "").strip())
        finally:
            daemon.limiter.release(key)

    async def temperatures(self, name):
        if not name:
            raise HttpRefusal(400, "missing 'node' query parameter")
        try:
            node = self.daemon.inventory.resolve(name)
        except InvalidNodeName:
            raise HttpRefusal(400, E_INVALID_NODE) from None
        except RequestError as exc:
            raise HttpRefusal(403, f"node not allowed: {exc.args[0]}") from None
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT):
                text, _ = await self.daemon.pool.fetch(node)
        except BreakerOpen as exc:
            raise HttpRefusal(503, str(exc)) from None
        except NodeError as exc:
            raise HttpRefusal(502, str(exc)) from None
        except TimeoutError:
            raise HttpRefusal(503, E_TIMEOUT) from None
        return 200, {"node": name, "temperature": text}, name

    def audit(self, client, method, path, status, data, node, started):
        latency = time.monotonic() - started
        label = path if path in ("/temps", "/health") else "other"
        metrics = self.daemon.metrics
        metrics.inc("pulse_proxy_http_requests_total", (label, str(status)))
        metrics.observe("pulse_proxy_http_latency_seconds", latency, (label,))
        error = data.get("error") if status != 200 else None
        message = "HTTPS request" if error is None else \
            "Rate limit exceeded" if status == 429 else "HTTPS request refused"
        self.daemon.log.log("info" if error is None else "warning", message, client=client,
                            method=sanitize_label(method, 16), path=path[:128],
                            node=sanitize_label(node) if node else None, status=status,
                            latency_ms=round(latency * 1000, 3), error=error)


async def start_https_server(front):
    host, port = parse_host_port(front.daemon.config["http_listen_addr"])
    return await asyncio.get_running_loop().create_server(front.connection, host, port,
                                                          backlog=512, reuse_address=True)


# ---------------------------------------------------------------------------------------------
# I/O: running the daemon
# ---------------------------------------------------------------------------------------------


async def start_metrics_server(daemon):
    address = daemon.config["metrics_address"]
    if address == "disabled":
        return None
    host, port = parse_host_port(address)
    return await asyncio.get_running_loop().create_server(daemon.metrics_listener.connection,
                                                          host, port, reuse_address=True)


async def start_socket_server(daemon, path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(SOCKET_BACKLOG)
    except OSError:
        sock.close()
        raise
    return SocketAcceptor(sock, daemon.socket.connection, daemon.log)


async def run_daemon(config, log, ready=None):
    """Serve until SIGTERM/SIGINT. `ready(daemon)` is called once the socket accepts."""
    daemon = Daemon(config, log)
    loop = asyncio.get_running_loop()
    log.write_from_loop(loop)
    try:
        return await _run_daemon(daemon, config, log, loop, ready)
    finally:
        daemon.dispatcher.refusals.flush()
        log.write_synchronously()


async def report_refusals(refusals):
    """Log each peer's refusal summary once its interval is over, even if it went quiet."""
    while True:
        await asyncio.sleep(refusals.interval)
        refusals.flush(older_than=refusals.interval)


async def _run_daemon(daemon, config, log, loop, ready):
    # asyncio's own errors (e.g. accept() failing with EMFILE under a connection flood) as
    # audit records, not multi-line tracebacks on stderr.
    loop.set_exception_handler(lambda _, context: log.log(
        "error", context.get("message", "event loop error"), error=repr(context.get("exception"))))
    stop = asyncio.Event()
    # Before anything is created: a missing certificate, key or token stops the start here.
    front = HttpsFront(daemon) if config["http_enabled"] else None

    def reload():
        try:
            new_config = load_config(config["config_path"])
        except ConfigError as exc:
            log.log("error", "Reload failed; keeping the running config", error=exc.problems)
            return
        for key in ("socket_path", "metrics_address", "ssh_dir"):
            if new_config[key] != daemon.config[key]:
                log.log("warning", f"{key} changes need a restart", running=daemon.config[key])
                new_config[key] = daemon.config[key]
        for key in ("http_enabled", "http_listen_addr"):
            if new_config[key] != daemon.config[key]:
                log.log("warning", f"{key} changes need a restart", running=daemon.config[key])
                new_config[key] = daemon.config[key]
        daemon.apply_config(new_config)
        if front:
            try:
                front.load(new_config)
            except ConfigError as exc:
                log.log("error", "HTTPS reload failed; keeping the running certificate and token",
                        error=exc.problems)
        log.log("info", "Configuration reloaded", path=new_config["config_path"])

    # Handlers go in before the socket exists: a client that sees the socket may signal us.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if not any(os.environ.get(name) for name in ("LOGNAME", "USER")):
        # asyncssh asks getpass for a local user name, which fails for a uid without a passwd
        # entry (DynamicUser, containers); any name does, the remote user is configured.
        os.environ["LOGNAME"] = str(os.geteuid())
    keys = KeyStore(config["ssh_dir"])
    keys.ensure_current(log)
    try:
        interrupted = keys.journal()
    except UnsafePathError as exc:
        interrupted = {"step": str(exc)}
    if interrupted:
        log.log("warning", "A key rotation was interrupted; the current key still works. Run "
                "`pulse-sensor-proxy rotate-keys` as root to finish or undo it", step=interrupted.get("step"))
    path = config["socket_path"]
    prepare_socket_path(path)
    metrics_server = await start_metrics_server(daemon)
    https_server = await start_https_server(front) if front else None
    server = await start_socket_server(daemon, path)
    os.chmod(path, SOCKET_MODE)
    socket_inode = os.stat(path).st_ino
    log.log("info", "Serving", socket=path, version=__version__, metrics=config["metrics_address"],
            https=config["http_listen_addr"] if front else None, uid=daemon.dispatcher.own_uid)
    sd_notify("READY=1")
    if ready:
        ready(daemon)
    reporter = asyncio.ensure_future(report_refusals(daemon.dispatcher.refusals))
    await stop.wait()
    reporter.cancel()

    sd_notify("STOPPING=1")
    log.log("info", "Shutting down", in_flight=daemon.dispatcher.in_flight)
    server.close()
    daemon.socket.close_idle()
    for other in (metrics_server, https_server):
        if other:
            other.close()
    if daemon.handlers:
        _, pending = await asyncio.wait(list(daemon.handlers), timeout=SHUTDOWN_GRACE)
        for task in pending:
            task.cancel()
    await daemon.pool.close()
    if daemon.closing:
        await asyncio.wait(list(daemon.closing), timeout=SHUTDOWN_GRACE)
    try:
        if os.stat(path).st_ino == socket_inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    log.log("info", "Stopped")
    return 0


# ---------------------------------------------------------------------------------------------
# Doctor: every link from Pulse to each node's sensors, checked without changing anything
# ---------------------------------------------------------------------------------------------

UNIT = PROG + ".service"
DOCTOR_STEP_TIMEOUT = 5.0          # seconds for one local step (systemctl, a socket request)
# Chips whose temperatures Pulse shows as the CPU's (internal/monitoring/temperature.go, v5.0.17).
CPU_CHIPS = ("coretemp", "k10temp", "zenpower", "k8temp", "acpitz", "it87", "nct6687", "nct6775",
             "nct6776", "nct6779", "nct6791", "nct6792", "nct6793", "nct6795", "nct6796",
             "nct6797", "nct6798", "w83627", "f71882", "cpu_thermal", "rp1_adc", "rpitemp")
OK, WARN, FAILED = "ok", "warn", "FAIL"


def finding(check, target, status, detail, fix=""):
    """One doctor line: what was checked, on what, the verdict, why, and what fixes it."""
    return {"check": check, "target": target, "status": status, "detail": detail, "fix": fix}


def render_finding(item):
    line = f"{item['status']:<5} {item['check']:<12} {item['target']}: {item['detail']}"
    return line + (f"\n      fix: {item['fix']}" if item["fix"] else "")


def doctor_summary(findings):
    counts = {status: sum(f["status"] == status for f in findings) for status in (OK, WARN, FAILED)}
    return f"doctor: {counts[OK]} ok, {counts[WARN]} warn, {counts[FAILED]} FAIL"


def cpu_temperatures(sensors_json):
    """The CPU chips of a `sensors -j` document that hold at least one temperature reading."""
    chips, document = [], json.loads(sensors_json)
    if isinstance(document.get("sensors"), dict) and "smart" in document:
        document = document["sensors"]      # the daemon's answer with disk temperatures on
    for chip, features in document.items():
        if not isinstance(features, dict) or not any(c in chip.lower() for c in CPU_CHIPS):
            continue
        if any(isinstance(sub, dict) and any(k.startswith("temp") and k.endswith("_input")
                                             and isinstance(v, (int, float)) for k, v in sub.items())
               for sub in features.values()):
            chips.append(chip)
    return chips


def run_bounded(argv):
    """(exit status, stdout) of a local command, (None, reason) if it cannot run in time."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=DOCTOR_STEP_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)} did not answer within {DOCTOR_STEP_TIMEOUT:g} s"
    return out.returncode, out.stdout.strip()


def unit_properties(unit):
    """systemd's LoadState, UnitFileState, ActiveState, User of a unit; None without systemd."""
    names = ("LoadState", "UnitFileState", "ActiveState", "User")
    status, out = run_bounded(["systemctl", "show", unit, "--property=" + ",".join(names)])
    if status != 0 or not os.path.isdir("/run/systemd/system"):
        return None
    return dict(line.partition("=")[::2] for line in out.splitlines())


def check_service(config):
    props = unit_properties(UNIT)
    if not props or props.get("LoadState") != "loaded":
        return [finding("service", UNIT, WARN, "not installed as a systemd unit; checking the "
                        f"daemon of {config['config_path']}",
                        "install with install-sensor-proxy.sh to run it as a hardened service")]
    enabled, state = props.get("UnitFileState", ""), props.get("ActiveState", "")
    found = [finding("service", UNIT, OK if enabled == "enabled" else WARN,
                     f"unit file {enabled or 'state unknown'}",
                     "" if enabled == "enabled" else f"systemctl enable {UNIT}")]
    active = state == "active"
    found.append(finding("service", UNIT, OK if active else FAILED, state or "state unknown",
                         "" if active else f"systemctl restart {UNIT}; journalctl -u {UNIT} -n 50"))
    user = props.get("User") or "root"
    found.append(finding("service", UNIT, OK if user == PROG else FAILED, f"runs as {user}",
                         "" if user == PROG else "reinstall with install-sensor-proxy.sh (the "
                         f"unit must say User={PROG})"))
    return found


def check_config(config):
    path = config["config_path"]
    if not config["config_notes"]:
        return [finding("config", path, OK, "valid" if os.path.exists(path) else
                        "no such file; the defaults apply")]
    return [finding("config", path, WARN, "in the original proxy's vocabulary: " +
                    "; ".join(config["config_notes"]), f"{PROG} config migrate --write --config {path}")]


# What the original proxy's installer (Pulse's scripts/install-sensor-proxy.sh, v5.0.17) leaves
# that would reinstall the original: its self-heal timer runs whenever our service is missing.
ORIGINAL_SELF_HEAL = ("/etc/systemd/system/pulse-sensor-proxy-selfheal.timer",
                      "/etc/systemd/system/pulse-sensor-proxy-selfheal.service",
                      "/opt/pulse/sensor-proxy/bin/pulse-sensor-proxy-selfheal.sh")


def check_original_self_heal(root):
    """ROOT prefixes the host's paths ($PULSE_INSTALL_ROOT, as for the installer)."""
    present = [path for path in ORIGINAL_SELF_HEAL if os.path.lexists(root + path)]
    if not present:
        return [finding("original", "self-heal", OK, "none of the original's self-heal units")]
    return [finding("original", "self-heal", FAILED, "the original's self-heal is still installed "
                    f"({', '.join(present)}); it would reinstall the original proxy",
                    "systemctl disable --now pulse-sensor-proxy-selfheal.timer && rm -f " +
                    " ".join(present) + " && systemctl daemon-reload")]


def doctor_config(path):
    """(config or None, findings): the effective config; when it does not validate, a FAIL per
    problem and the config of the keys that do, so the checks behind it still run."""
    fix = f"correct it in {path}, then `{PROG} config validate --config {path}` says OK"
    try:
        config = load_config(path)
    except ConfigError as exc:
        found = [finding("config", path, FAILED, problem.removeprefix(path + ": "), fix)
                 for problem in exc.problems]
    else:
        return config, check_config(config)
    try:
        raw, notes = read_translated_config(path)
    except ConfigError:
        return None, found
    if not isinstance(raw, dict):
        return None, found
    kept = {}
    for key, value in raw.items():
        with contextlib.suppress(ConfigError):
            validate_config({key: value})
            kept[key] = value
    config = dict(validate_config(kept, source=path), config_path=path, config_notes=notes)
    return config, found


def socket_request(path, method, params=None, timeout=DOCTOR_STEP_TIMEOUT):
    """One request on the daemon's socket; its decoded answer, or OSError/ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"correlation_id": str(uuid.uuid4()), "method": method,
                                 "params": params}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline(MAX_CONFIG_BYTES))
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    return answer


def check_socket(config, owner_uid):
    path = config["socket_path"]
    directory = os.path.dirname(path)
    restart = f"systemctl restart {UNIT} (it recreates {directory} 0775 and the socket 0777)"
    try:
        dir_info, info = os.stat(directory), os.lstat(path)
    except OSError as exc:
        return [finding("socket", path, FAILED, f"{exc.filename}: {exc.strerror}", restart)]
    found = []
    dir_mode = stat.S_IMODE(dir_info.st_mode)
    if not dir_mode & 0o001:
        found.append(finding("socket", directory, FAILED, f"mode {dir_mode:04o}: containers' "
                             "root cannot reach the socket", f"chmod 0775 {directory}"))
    elif dir_mode & 0o002:
        found.append(finding("socket", directory, FAILED, f"mode {dir_mode:04o}: anyone may "
                             "replace the socket", f"chmod 0775 {directory}"))
    else:
        found.append(finding("socket", directory, OK, f"mode {dir_mode:04o}"))
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISSOCK(info.st_mode):
        return found + [finding("socket", path, FAILED, "not a socket", restart)]
    if mode & 0o006 != 0o006 or info.st_uid != owner_uid:
        found.append(finding("socket", path, FAILED, f"mode {mode:04o}, owner uid {info.st_uid}"
                             f" (want 0777, uid {owner_uid})", restart))
    else:
        found.append(finding("socket", path, OK, f"mode {mode:04o}, owner uid {info.st_uid}"))
    try:
        answer = socket_request(path, "get_status")
        version = answer["data"]["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return found + [finding("socket", path, FAILED, f"get_status as root: no answer ({exc})",
                                f"journalctl -u {UNIT} -n 50")]
    same = version == __version__
    found.append(finding("socket", path, OK if same else WARN, f"get_status answers: daemon "
                         f"{version}, this binary {__version__}",
                         "" if same else f"systemctl restart {UNIT} (it runs an older binary)"))
    return found


def check_key(keys):
    where = keys.private_path("current")
    try:
        pair = keys.read("current")
        line = keys.public_line("current")
        journal = keys.journal()
    except (ProxyError, OSError) as exc:
        return [finding("key", where, FAILED, str(exc), f"chown -R {PROG}: {keys.state_dir}; "
                        f"chmod 0700 {keys.ssh_dir}; chmod 0600 {where}")]
    if pair is None:
        return [finding("key", where, FAILED, "no key", f"systemctl restart {UNIT} (it creates one)"
                        f", then {PROG} keys push")]
    found = []
    for path, want in ((keys.ssh_dir, 0o700), (where, 0o600), (where + ".pub", 0o640)):
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
        except OSError as exc:
            found.append(finding("key", path, FAILED, exc.strerror, f"systemctl restart {UNIT}"))
            continue
        found.append(finding("key", path, OK if mode == want else FAILED, f"mode {mode:04o}",
                             "" if mode == want else f"chmod {want:04o} {path}"))
    found.append(finding("key", where, OK, key_fingerprint(line)))
    if journal:
        found.append(finding("key", keys.journal_path, FAILED, "a key rotation was interrupted "
                             f"at step {journal.get('step')!r}", f"{PROG} rotate-keys (it "
                             "finishes or undoes it first)"))
    return found


MOUNT_OPTION_NEEDED = "optional"   # a CT still starts where the proxy's directory is missing
CT_DEFAULT_ROOT_UID, CT_DEFAULT_UID_COUNT = 100000, 65536   # Proxmox's unprivileged default map
CT_OUTPUT_LIMIT = 65536            # bytes read from anything a container prints
PULSE_UNITS = ("pulse.service", "pulse-backend.service")
# Asked inside a container as its root: the socket's answer to get_status, as one JSON line.
CT_STATUS_PROBE = """import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b'{"correlation_id": "doctor", "method": "get_status"}\\n')
sys.stdout.write(s.makefile(encoding="utf-8", errors="replace").readline(1 << 20))"""
# Prints Pulse's units and their drop-ins (systemd's search order), each after a `### PATH` line.
CT_UNITS_PROBE = """for u in "$@"; do
  for f in /etc/systemd/system/$u /usr/lib/systemd/system/$u /lib/systemd/system/$u \
           /usr/lib/systemd/system/$u.d/*.conf /etc/systemd/system/$u.d/*.conf; do
    [ -f "$f" ] && { echo "### $u $f"; cat "$f"; echo; }
  done
  for f in /etc/systemd/system/$u /usr/lib/systemd/system/$u /lib/systemd/system/$u \
           /usr/lib/systemd/system/$u.d/*.conf /etc/systemd/system/$u.d/*.conf; do
    [ -f "$f" ] && sed -n 's/^[[:space:]]*EnvironmentFile=-\\{0,1\\}//p' "$f"
  done | while read -r e; do [ -f "$e" ] && { echo "### $u envfile $e"; cat "$e"; echo; }; done
done; true"""


def main_section(conf_text):
    """The lines of a CT config before its first [snapshot] or [pve:pending] section."""
    return conf_text.split("\n[", 1)[0].splitlines()


def mount_lines(lines, run_dir):
    """(container path, options) of each lxc.mount.entry binding RUN_DIR."""
    found = []
    for line in lines:
        key, _, value = line.partition(":")
        fields = value.split()
        if key.strip() == "lxc.mount.entry" and len(fields) >= 4 and fields[0] == run_dir:
            found.append(("/" + fields[1].strip("/"), fields[3].split(",")))
    return found


def ct_root_range(lines):
    """The host uids (low, high) of the container's uids, from its lxc.idmap or Proxmox's default."""
    for line in lines:
        fields = line.replace(":", " ", 1).split()
        if fields[:3] == ["lxc.idmap", "u", "0"] and len(fields) == 5 and fields[3].isdigit() \
                and fields[4].isdigit():
            return int(fields[3]), int(fields[3]) + int(fields[4]) - 1
    return CT_DEFAULT_ROOT_UID, CT_DEFAULT_ROOT_UID + CT_DEFAULT_UID_COUNT - 1


def pulse_socket_settings(probe_output):
    """{unit: (PULSE_SENSOR_PROXY_SOCKET, the EnvironmentFile that set it or None)} of Pulse's
    units in CT_UNITS_PROBE's output, as systemd resolves it: the later Environment= line
    wins, and an EnvironmentFile= setting (Pulse's install.sh writes /etc/pulse/.env) beats
    every Environment= one; units that do not set it are left out."""
    from_units, from_files, unit, env_file = {}, {}, None, None
    for line in probe_output.splitlines():
        if line.startswith("### "):
            _, unit, *rest = line.split(maxsplit=3)
            env_file = rest[1] if rest[:1] == ["envfile"] and len(rest) == 2 else None
            continue
        key, _, value = line.strip().partition("=")
        if unit is None:
            continue
        if env_file is not None:
            if key.strip() == ENV_SOCKET:
                from_files[unit] = (value.strip().strip("'\""), env_file)
        elif key.strip() == "Environment":
            for word in value.replace('"', " ").split():
                name, _, setting = word.partition("=")
                if name == ENV_SOCKET:
                    from_units[unit] = (setting, None)
    return {unit: found for unit, found in {**from_units, **from_files}.items() if found[0]}


def pct(*args):
    """(exit status, bounded stdout) of one pct call, or (None, why) when it cannot run."""
    try:
        out = subprocess.run(["pct", *args], capture_output=True, timeout=DOCTOR_STEP_TIMEOUT * 2,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, "pct not found (not a Proxmox VE host?)"
    except subprocess.TimeoutExpired:
        return None, f"pct {args[0]} {args[1]} did not answer within {DOCTOR_STEP_TIMEOUT * 2:g} s"
    return out.returncode, out.stdout[:CT_OUTPUT_LIMIT].decode("utf-8", "replace")


def our_containers(config, wanted):
    """{ctid: config text} of the CTs to check: those given, else each whose config mounts ours."""
    lxc = os.path.join(config["pve_dir"], "lxc")
    run_dir = os.path.dirname(config["socket_path"])
    try:
        names = sorted((n[:-5] for n in os.listdir(lxc) if n.endswith(".conf")), key=lambda n:
                       (len(n), n))
    except OSError:
        names = []
    found = {}
    for ctid in wanted or names:
        try:
            with open(os.path.join(lxc, f"{ctid}.conf")) as handle:
                text = handle.read(MAX_CONFIG_BYTES)
        except OSError:
            text = None
        if wanted or mount_lines(main_section(text or ""), run_dir):
            found[ctid] = text
    return found


def check_container(config, ctid, text, granted):
    """The findings of one CT, in the order Pulse's request crosses them; the first broken link
    ends the list. `granted(uid)` says whether the daemon's config lets that host uid read."""
    target = f"CT {ctid}"
    run_dir = os.path.dirname(config["socket_path"])
    line = (f"lxc.mount.entry: {run_dir} mnt/pulse-proxy none bind,create=dir,{MOUNT_OPTION_NEEDED}"
            " 0 0")
    installer = f"install-sensor-proxy.sh --ctid {ctid}"
    if text is None:
        return [finding("container", target, FAILED, f"no config {config['pve_dir']}/lxc/{ctid}.conf",
                        "check the CT id (pct list)")]
    lines = main_section(text)
    if not any(key.strip() == "unprivileged" and value.strip() == "1"
               for key, _, value in (entry.partition(":") for entry in lines)):
        return [finding("container", target, FAILED, "privileged: its root is the host's root",
                        "run Pulse in an unprivileged container (pct restore --unprivileged 1)")]
    found = [finding("container", target, OK, "unprivileged")]
    mounts = mount_lines(lines, run_dir)
    if len(mounts) != 1:
        detail = "no mount line for the socket's directory" if not mounts else \
            f"{len(mounts)} mount lines for the socket's directory"
        return found + [finding("ct-mount", target, FAILED, f"{detail} in its main section",
                                f"{installer} (or keep this one line: {line})")]
    path, options = mounts[0]
    if MOUNT_OPTION_NEEDED not in options:
        return found + [finding("ct-mount", target, FAILED, f"the mount line lacks `optional`: the "
                                "CT does not start where the proxy is not installed",
                                f"{installer} (or write the line as: {line})")]
    found.append(finding("ct-mount", target, OK, f"{run_dir} at {path}"))
    low, high = ct_root_range(lines)
    if not (granted(low) and granted(high)):
        return found + [finding("ct-uids", target, FAILED, f"its uids {low}-{high} may not read "
                                "(not in allowed_peers, nor root's /etc/subuid range with "
                                "allow_idmapped_root)",
                                f"{PROG} config merge --config {config['config_path']} "
                                f"--add-peer-uids {low}-{high} --write && systemctl reload {UNIT}")]
    found.append(finding("ct-uids", target, OK, f"uids {low}-{high} may read"))
    status, out = pct("status", ctid)
    if status != 0 or "running" not in out.split():
        return found + [finding("ct-running", target, WARN, (out or "").strip() or "not running",
                                f"pct start {ctid}")]
    found.append(finding("ct-running", target, OK, "running"))
    inside = f"{path}/{os.path.basename(config['socket_path'])}"
    status, out = pct("exec", ctid, "--", "python3", "-c", CT_STATUS_PROBE, inside)
    try:
        capabilities = json.loads(out)["data"]["capabilities"] if status == 0 else None
    except (ValueError, KeyError, TypeError):
        capabilities = None
    if capabilities is None or CAP_READ not in capabilities:
        why = f"answers without read ({', '.join(capabilities)})" if capabilities is not None else \
            "no answer to get_status as the CT's root"
        return found + [finding("ct-socket", target, FAILED, f"{inside}: {why}",
                                f"pct reboot {ctid} (mounts the socket's directory again)")]
    found.append(finding("ct-socket", target, OK, f"{inside}: get_status answers with read"))
    status, out = pct("exec", ctid, "--", "sh", "-c", CT_UNITS_PROBE, "sh", *PULSE_UNITS)
    for unit, (setting, env_file) in sorted(pulse_socket_settings(out if status == 0 else "").items()):
        where = f"{unit} ({env_file})" if env_file else unit
        if pct("exec", ctid, "--", "test", "-S", setting)[0] == 0:
            found.append(finding("ct-env", target, OK, f"{where}: {ENV_SOCKET}={setting}"))
            continue
        # an EnvironmentFile= beats the installer's Environment= drop-in: fix the file itself
        fix = (f"pct exec {ctid} -- sed -i 's|^{ENV_SOCKET}=.*|{ENV_SOCKET}={inside}|' {env_file}"
               if env_file else f"{installer} (it sets {ENV_SOCKET}={inside})")
        found.append(finding("ct-env", target, FAILED, f"{where}: {ENV_SOCKET}={setting} is no "
                             f"socket in the CT", f"{fix}, then pct exec {ctid} -- systemctl "
                             f"restart {unit}"))
    return found


def check_containers(config, wanted):
    try:
        with open(config["subuid_file"]) as handle:
            ranges = parse_subuid(handle.read(MAX_CONFIG_BYTES)) if config["allow_idmapped_root"] \
                else []
    except OSError:
        ranges = []

    def granted(uid):
        return CAP_READ in peer_capabilities(uid, uid, -1, config["allowed_peers"], ranges)

    found = []
    for ctid, text in our_containers(config, wanted).items():
        found += check_container(config, ctid, text, granted)
    return found


CERT_WARN_DAYS = 30


def https_health(host, port, token, pin, timeout=DOCTOR_STEP_TIMEOUT):
    """The HTTP status of GET /health with the token, sent only to the certificate PIN (sha256
    of its DER) names."""
    import http.client
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False          # self-signed: the pin is the check
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        conn.connect()
        if not hmac.compare_digest(hashlib.sha256(conn.sock.getpeercert(binary_form=True)).digest(),
                                   pin):
            raise ValueError("the listener's certificate is not the one in http_tls_cert")
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def check_https(config):
    if not config["http_enabled"]:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, renew = config["http_tls_cert"], (
        f"mv {config['http_tls_cert']} {config['http_tls_cert']}.old && mv {config['http_tls_key']} "
        f"{config['http_tls_key']}.old && {PROG} tls init && systemctl reload {UNIT}")
    try:
        with open(cert_path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError) as exc:
        return [finding("https", cert_path, FAILED, f"no usable certificate: "
                        f"{getattr(exc, 'strerror', None) or exc}", f"{PROG} tls init")]
    days = (cert.not_valid_after_utc.timestamp() - time.time()) / 86400
    status = FAILED if days < 0 else WARN if days < CERT_WARN_DAYS else OK
    found = [finding("https", cert_path, status, f"certificate valid for {max(days, 0):.0f} more "
                     "days", "" if status == OK else renew)]
    token_path = config["http_auth_token_file"]
    token = config["http_auth_token"]
    if token_path:
        try:
            info = os.stat(token_path)
            with open(token_path) as handle:
                token = handle.read(4096).strip()
        except OSError as exc:
            return found + [finding("https", token_path, FAILED, exc.strerror,
                                    "install-sensor-proxy.sh --http-mode (it writes the token)")]
        mode = stat.S_IMODE(info.st_mode)
        found.append(finding("https", token_path, FAILED if mode & 0o007 else OK, f"mode {mode:04o}",
                             f"chmod 0640 {token_path}" if mode & 0o007 else ""))
    else:
        found.append(finding("https", "http_auth_token", WARN, "the token is inline in the config",
                             "move it to a file (mode 0640) named by http_auth_token_file"))
    host, port = parse_host_port(config["http_listen_addr"])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    try:
        answer = https_health(host, port, token or "", pin)
    except (OSError, ValueError) as exc:
        return found + [finding("https", f"{host}:{port}", FAILED, "GET /health: "
                                f"{getattr(exc, 'strerror', None) or exc}",
                                f"systemctl reload {UNIT}; journalctl -u {UNIT} -n 50")]
    detail = {200: "answers", 403: "refuses this host (http_allowed_clients)"}.get(
        answer, f"answered HTTP {answer}")
    found.append(finding("https", f"{host}:{port}", OK if answer == 200 else WARN,
                         f"GET /health with the token {detail}",
                         "" if answer == 200 else f"journalctl -u {UNIT} -n 50"))
    return found


def metric_values(text, name):
    """{labels text: value} of one metric in Prometheus text format."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            with contextlib.suppress(ValueError):
                values[labels.strip()] = float(value)
    return values


def check_metrics(config):
    address = config["metrics_address"]
    if address == "disabled":
        return [finding("metrics", "metrics", OK, "disabled in the config")]
    import urllib.request
    host, port = parse_host_port(address)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=DOCTOR_STEP_TIMEOUT) as answer:
            text = answer.read(MAX_CONFIG_BYTES * 4).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return [finding("metrics", url, FAILED, f"no answer: {getattr(exc, 'reason', exc)}",
                        f"journalctl -u {UNIT} -n 50 (is metrics_address {address} in use?)")]
    found = [finding("metrics", url, OK, "answers")]
    minutes = RECENT_SECONDS // 60
    hits = sum(metric_values(text, "pulse_proxy_rate_limit_hits_recent").values())
    total = sum(metric_values(text, "pulse_proxy_rate_limit_hits_total").values())
    found.append(finding("metrics", "rate limits", OK if not hits else WARN,
                         f"{hits:g} requests refused by rate limits in the last {minutes} minutes "
                         f"({total:g} since the daemon started)",
                         "" if not hits else "raise rate_limit.per_minute/burst in the config if "
                         "Pulse is the one refused (see the audit log's peer)"))
    def node_of(labels):
        return re.sub(r'.*node="([^"]*)".*', r"\1", labels)

    open_nodes = sorted(node_of(labels) for labels, value in
                        metric_values(text, "pulse_proxy_node_breaker_open").items() if value)
    refused = sorted((node_of(labels), value) for labels, value in
                     metric_values(text, "pulse_proxy_ssh_requests_recent").items()
                     if value and 'result="breaker_open"' in labels)
    detail = f"open now for {', '.join(open_nodes)}" if open_nodes else "none open now"
    if refused:
        detail += f"; reads refused by an open breaker in the last {minutes} minutes: " + \
            ", ".join(f"{node} ({count:g})" for node, count in refused)
    found.append(finding("metrics", "breakers", OK if not open_nodes and not refused else WARN,
                         detail, "" if not open_nodes and not refused else "see the node lines "
                         "above; a breaker closes by itself after the first read that works"))
    return found


# A node's links in the order a reading crosses them: the first broken one is reported, the
# ones behind it are not tried.
NODE_FIXES = {
    "host key changed": ("host-key", "if the node was reinstalled: ssh-keygen -R '{pattern}' -f "
                         "{known_hosts}, then {prog} call get_temperature --node {name}"),
    "unknown host key": ("host-key", "check the node's fingerprint (ssh-keygen -lf /etc/ssh/"
                         "ssh_host_ed25519_key.pub on it), then {prog} call get_temperature "
                         "--node {name} pins it"),
    "permission denied": ("node-key", "{prog} keys push --node {name}"),
}


def from_covers(options, address):
    """Whether the from= of an authorized_keys line's options admits ADDRESS (sshd's
    match_host_and_ip: comma-separated wildcards or CIDR blocks, `!` refusing)."""
    import fnmatch

    found = re.search(r'(?:^|,)from="([^"]*)"', options)
    if not found:
        return True
    admitted = False
    for pattern in found.group(1).split(","):
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        try:
            hit = (ipaddress.ip_address(address) in ipaddress.ip_network(pattern, strict=False)
                   if "/" in pattern else fnmatch.fnmatchcase(address, pattern))
        except ValueError:
            hit = False
        if hit and negated:
            return False
        admitted = admitted or hit
    return admitted


async def refusal_reason(admin, node, public_line, address):
    """Why a node refuses the proxy's key, from its authorized_keys read as the admin (SFTP,
    read-only); None when that cannot be read."""
    try:
        async with asyncio.timeout(admin.connector.ssh["connect_timeout"] + DOCTOR_STEP_TIMEOUT):
            target, data = await read_node_keys(admin, node)
    except (ProxyError, OSError, TimeoutError):
        return None
    lines = [parsed for parsed in map(parse_authorized_key, data.splitlines())
             if parsed and parsed[2] == public_line.split()[1]]
    if not lines:
        return f"the proxy's key is not in {target}", f"{PROG} keys push --node {node.name}"
    if not any(from_covers(parsed[0], address) for parsed in lines):
        return (f"the from= of its line in {target} does not cover this host's address {address}",
                f"{PROG} config merge --config {admin.config['config_path']} --add-subnet "
                f"{address}/{128 if ':' in address else 32} --write && {PROG} keys push --node "
                f"{node.name}")
    return None


async def check_node(admin, node, key, public_line):
    """The findings of one node: resolve, TCP, host key, the key and its forced command, sensors."""
    connector = admin.connector
    if node.local:      # read as the daemon reads it: as its account, asked through the socket
        try:
            answer = await asyncio.to_thread(socket_request, admin.config["socket_path"],
                                             "get_temperature", {"node": node.name},
                                             connector.ssh["command_timeout"] + DOCTOR_STEP_TIMEOUT)
            text = answer["data"]["temperature"] if answer.get("success") else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            answer, text = {"error": str(exc)}, None
        if not isinstance(text, str):
            return [finding("sensors", node.name, FAILED, f"this host's sensors through the "
                            f"daemon: {answer.get('error')}", "apt install lm-sensors")]
        if not admin.config["disk_temperatures"]:
            return [sensors_finding(node, text)]
        props = await asyncio.to_thread(unit_properties, SMART_LOCAL_UNIT)
        return [sensors_finding(node, text), local_smart_finding(
            admin.config, node, time.time(), bool(props) and props.get("LoadState") == "loaded")]
    addresses = await NameResolver().addresses(node.host)
    if not addresses:
        return [finding("resolve", node.name, FAILED, f"{node.host} does not resolve",
                        f"add {node.host} to /etc/hosts, or set nodes: {{{node.name}: {{host: "
                        "ADDRESS}}} in the config")]
    found = [finding("resolve", node.name, OK, f"{node.host} is {', '.join(sorted(addresses))}")]
    timeout = connector.ssh["connect_timeout"]
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(node.host, node.port)
        address = writer.get_extra_info("sockname")[0]      # this host, as the node sees it
        writer.close()
    except (OSError, TimeoutError) as exc:
        # asyncio's text is "Connect call failed (addr)": the errno says what happened
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else \
            f"no answer within {timeout:g} s"
        return found + [finding("reach", node.name, FAILED, f"TCP {node.host}:{node.port}: {reason}",
                                f"start the node, or open TCP {node.port} from this host to it "
                                "(systemctl status ssh on the node)")]
    found.append(finding("reach", node.name, OK, f"TCP {node.host}:{node.port} answers"))
    try:
        conn = await connector.connect(node, [key])
    except NodeError as exc:
        text = str(exc)
        check, fix = next(((c, f) for marker, (c, f) in NODE_FIXES.items() if marker in text),
                          ("ssh", "ssh -p {port} {user}@{host} from this host shows why"))
        pattern = node.host if node.port == 22 else f"[{node.host}]:{node.port}"
        fix = fix.format(pattern=pattern, known_hosts=connector.host_keys.known_hosts_path, prog=PROG,
                         name=node.name, port=node.port, user=node.user, host=node.host)
        reason = await refusal_reason(admin, node, public_line, address) \
            if check == "node-key" else None
        if reason:
            text, fix = f"{text}; {reason[0]}", reason[1]
        return found + [finding(check, node.name, FAILED, text, fix)]
    found.append(finding("host-key", node.name, OK, "known and matching"))
    try:
        # A login asking for `id` must still get sensors output: the forced command holds.
        text, _ = await connector.run_sensors(conn, node, command="id")
    except OutputError as exc:
        conn.close()
        return found + [finding("node-key", node.name, FAILED, f"the proxy's key is accepted, but "
                                f"a login asking for `id` got no sensors output ({exc}): the key's "
                                "line does not force `sensors -j`",
                                f"{PROG} keys push --node {node.name}")]
    except NodeError as exc:
        conn.close()
        return found + [finding("sensors", node.name, FAILED, str(exc),
                                f"ssh {node.user}@{node.host} sensors -j shows why")]
    found.append(finding("node-key", node.name, OK, f"accepted from {address}, pinned to "
                         "`sensors -j`"))
    found.append(sensors_finding(node, text))
    if admin.config["disk_temperatures"]:
        found.append(await remote_smart_finding(connector, conn, node))
    conn.close()
    return found


async def remote_smart_finding(connector, conn, node):
    """The node's SMART read, as the daemon asks for it, bounded like a sensors read."""
    timeout = connector.ssh["command_timeout"]
    started = time.time()
    try:
        async with asyncio.timeout(timeout):
            stdout = await connector.run_smart(conn, node)
    except TimeoutError:
        return finding("smart", node.name, WARN, f"the SMART read did not finish within "
                       f"{timeout:g} s (a disk that hangs costs 6 s; the daemon waits up to "
                       f"{SMART_READ_TIMEOUT:g} s)", f"on {node.name}: smartctl -n standby -i "
                       "/dev/DISK for each disk shows which one hangs")
    except NodeError as exc:
        return finding("smart", node.name, WARN, str(exc),
                       f"ssh {node.user}@{node.host} smartctl --version shows why")
    return smart_finding(node, stdout, started)


def smart_finding(node, stdout, read_at):
    """One node's SMART read judged: disks found, smartctl missing, or a key line too old."""
    disks, missing = parse_smart_report(stdout, read_at)
    if not disks and not missing and stdout.strip():
        return finding("smart", node.name, WARN, E_OLD_KEY_LINE, f"{PROG} keys push --node {node.name}")
    if missing and not disks and all(why.startswith("smartctl is not installed") for _, why in missing):
        return finding("smart", node.name, WARN, "smartctl is not installed: no disk temperatures",
                       f"on {node.name}: apt install smartmontools")
    standby = sum(1 for disk in disks if disk["standbySkipped"])
    detail = f"{len(disks)} disks ({standby} in standby, not woken)" if disks else "no physical disks"
    return finding("smart", node.name, OK, detail + "".join(f"; {device} left out: {why}"
                                                          for device, why in missing))


def local_smart_finding(config, node, now, unit_installed):
    """This host's SMART read as pulse-sensor-proxy-smart.service stored it for the daemon."""
    path, interval = config["local_smart_file"], config["smart_interval"]
    fix = f"systemctl enable --now {SMART_LOCAL_TIMER} && systemctl start {SMART_LOCAL_UNIT}"
    try:
        stored = read_local_smart_file(path)
    except NodeError as exc:
        return finding("smart", node.name, WARN, str(exc), fix)
    if stored is None:
        if not unit_installed:      # a daemon started by hand reads the disks itself
            return finding("smart", node.name, OK, f"read by the daemon itself (no {path})")
        return finding("smart", node.name, WARN, f"this host's disks are not read: no "
                       f"{os.path.dirname(path)} (the daemon's sandbox opens no disk)", fix)
    stdout, read_at = stored
    age = now - read_at
    if age > interval + LOCAL_SMART_STALE:
        return finding("smart", node.name, WARN, f"{path} was read {age / 60:.0f} min ago "
                       f"(smart_interval is {interval / 60:g} min)",
                       f"{fix}; journalctl -u {SMART_LOCAL_UNIT} -n 20 shows why")
    return smart_finding(node, stdout, read_at)


def sensors_finding(node, text):
    chips = cpu_temperatures(text)
    if chips:
        return finding("sensors", node.name, OK, "CPU temperature from " + ", ".join(chips))
    return finding("sensors", node.name, FAILED, "`sensors -j` holds no CPU temperature: "
                   "lm-sensors was not set up or the chip is unknown to it",
                   f"on {node.name}: apt install lm-sensors && sensors-detect --auto")


async def check_nodes(config, keys, names):
    """Every node at once, each bounded in time; never pins a host key."""
    admin = KeyAdmin(dict(config, host_key_policy="strict"), dry_run=True)
    admin.log.level = math.inf      # the findings say it; the pool's log lines would repeat it
    inventory = admin.inventory
    nodes = inventory.current()
    unknown = [finding("node", name, FAILED, f"not a node of this cluster ({inventory.source} "
                       f"knows {', '.join(n.name for n in nodes)})",
                       f"check the name, or add it under nodes: in {config['config_path']}")
               for name in names if name not in {n.name for n in nodes}]
    if names:
        nodes = [n for n in nodes if n.name in names]
    try:
        key, public_line = keys.private_key("current"), keys.public_line("current")
    except (ProxyError, OSError) as exc:
        return unknown + [finding("node-key", node.name, FAILED, str(exc),
                                  f"systemctl restart {UNIT}") for node in nodes]
    limit = config["ssh"]["connect_timeout"] * 3 + config["ssh"]["command_timeout"] + \
        NameResolver.TIMEOUT + DOCTOR_STEP_TIMEOUT

    async def bounded(node):
        try:
            async with asyncio.timeout(limit):
                return await check_node(admin, node, key, public_line)
        except TimeoutError:
            return [finding("reach", node.name, FAILED, f"no verdict within {limit:g} s",
                            f"ssh -p {node.port} {node.user}@{node.host} from this host shows why")]

    results = await asyncio.gather(*(bounded(node) for node in nodes))
    return unknown + [item for found in results for item in found]


def run_doctor(path, names=(), ctids=(), root=""):
    """Every check, in the order a reading flows, from the config at PATH."""
    config, config_findings = doctor_config(path)
    if config is None:
        return config_findings
    keys = KeyStore(config["ssh_dir"])
    findings = check_service(config) + check_original_self_heal(root) + config_findings
    findings += check_socket(config, keys.owner_uid)
    findings += check_containers(config, ctids)
    findings += check_key(keys)
    findings += asyncio.run(check_nodes(config, keys, names))
    return findings + check_https(config) + check_metrics(config)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def config_failure(exc, report=False):
    """Every problem of a ConfigError, one a line, each naming its file and key; the command's
    exit status. On stderr after the program's name, or as `config validate`'s report on stdout."""
    for problem in exc.problems:
        print(problem if report else f"{PROG}: {problem}", file=sys.stdout if report else sys.stderr)
    return 1


def cmd_serve(args):
    config = load_config(args.config)
    log = AuditLog(config["log_level"])
    for note in config["config_notes"]:
        log.log("warning", "Config key of the original proxy; run `config migrate --write`",
                note=note)
    try:
        return asyncio.run(run_daemon(config, log))
    except ConfigError as exc:
        return config_failure(exc)
    except (RuntimeError, OSError, UnsafePathError) as exc:
        return fail(str(exc))


def cmd_version(args):
    build = f"commit {BUILD_COMMIT}, built {BUILD_DATE}" if BUILD_DATE else BUILD_COMMIT
    print(f"{PROG} {__version__} ({build})")
    return 0


def build_call_request(method, node, params):
    """The request object `call` sends; params are KEY=VALUE strings or KEY:=JSON values."""
    body = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item}: expected KEY=VALUE or KEY:=JSON")
        if key.endswith(":"):                   # KEY:=JSON
            key = key[:-1]
            try:
                body[key] = json.loads(raw)
            except ValueError:
                raise ValueError(f"--param {item}: the value after := is not JSON") from None
        else:
            body[key] = raw
        if not key:
            raise ValueError(f"--param {item}: empty key")
    if node is not None:
        body["node"] = node
    return {"correlation_id": str(uuid.uuid4()), "method": method, "params": body or None}


def cmd_call(args):
    try:
        request = build_call_request(args.method, args.node, args.param)
    except ValueError as exc:
        args.parser.error(str(exc))
    if args.url:
        return call_https(args)
    if args.token_file or args.fingerprint:
        args.parser.error("--token-file and --fingerprint go with --url")
    path = args.socket or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET_PATH
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(args.timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except FileNotFoundError:
        return fail(f"no socket at {path}: is the daemon running? (systemctl status {PROG})")
    except PermissionError:
        return fail(f"permission denied on {path}")
    except socket.timeout:
        return fail(f"no answer from {path} within {args.timeout:g} s")
    except OSError as exc:
        return fail(f"{path}: {exc.strerror or exc}")
    try:
        response = json.loads(reply)
    except ValueError:
        return fail(f"the daemon sent something that is not JSON: {reply[:200]!r}")
    if args.raw:
        sys.stdout.write(reply.decode("utf-8", "replace"))
    else:
        print(json.dumps(response, indent=2, sort_keys=True))
    return 0 if response.get("success") is True else 1


HTTPS_PATHS = {"get_temperature": "/temps", "get_temp": "/temps", "get_status": "/health",
               "health": "/health"}


def https_target(method, node):
    """The path and query `call --url` asks for, as Pulse's HTTP client would."""
    import urllib.parse

    path = HTTPS_PATHS.get(method)
    if path is None:
        raise ValueError(f"over HTTPS there are only {', '.join(sorted(HTTPS_PATHS))}")
    if path == "/temps":
        if not node:
            raise ValueError("get_temperature needs --node")
        return path + "?" + urllib.parse.urlencode({"node": node})
    return path


def parse_fingerprint(text):
    """SHA256:AA:BB:... (or plain hex) as 32 bytes; ValueError otherwise."""
    digits = text.removeprefix("SHA256:").removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise ValueError("--fingerprint: expected SHA256: and 32 hex bytes, as `tls init` prints it")
    return bytes.fromhex(digits)


def call_https(args):
    """`call --url`: one request to a remote proxy's HTTPS mode, the way Pulse sends it."""
    import http.client
    import ssl
    import urllib.parse

    url = urllib.parse.urlsplit(args.url)
    try:
        if url.scheme != "https" or not url.hostname:
            raise ValueError("--url: expected https://HOST:PORT")
        target = https_target(args.method, args.node)
        pin = parse_fingerprint(args.fingerprint) if args.fingerprint else None
        if not args.token_file:
            raise ValueError("--url needs --token-file (the file with the proxy's token)")
        port = url.port or 8443
    except ValueError as exc:
        args.parser.error(str(exc))
    try:
        with open(args.token_file) as handle:
            token = handle.read(4096).strip()
    except OSError as exc:
        return fail(f"--token-file {args.token_file}: {exc.strerror}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False          # the proxy's certificate is self-signed, as for Pulse
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(url.hostname, port, context=context, timeout=args.timeout)
    try:
        conn.connect()
        if pin is not None:     # checked before the token leaves this machine
            seen = hashlib.sha256(conn.sock.getpeercert(binary_form=True)).digest()
            if not hmac.compare_digest(seen, pin):
                return fail(f"{args.url}: the certificate's fingerprint is SHA256:{seen.hex(':').upper()}, "
                            "not the one given; nothing was sent")
        conn.request("GET", target, headers={"Authorization": f"Bearer {token}",
                                             "Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_CONFIG_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        return fail(f"{args.url}: {getattr(exc, 'strerror', None) or exc}")
    finally:
        conn.close()
    if args.raw:
        sys.stdout.write(body.decode("utf-8", "replace"))
    else:
        try:
            print(f"HTTP {response.status}\n" + json.dumps(json.loads(body), indent=2, sort_keys=True))
        except ValueError:
            print(f"HTTP {response.status}\n" + body.decode("utf-8", "replace")[:2000])
    return 0 if response.status == 200 else 1


def cmd_tls_init(args):
    """Create the HTTPS mode's self-signed certificate and key, never replacing either."""
    try:
        config = load_config(args.config)
        for address in args.address:
            ipaddress.ip_address(address)
    except ConfigError as exc:
        return config_failure(exc)
    except ValueError as exc:
        args.parser.error(f"--address: {exc}")
    cert_path, key_path = config["http_tls_cert"], config["http_tls_key"]
    present = [p for p in (cert_path, key_path) if os.path.exists(p)]
    if len(present) == 1:
        missing = key_path if present[0] == cert_path else cert_path
        return fail(f"{present[0]} exists but {missing} does not; restore it, or move "
                    f"{present[0]} aside to create a new pair")
    if not present:
        names, addresses = host_identities()
        names += [n for n in args.name if n not in names]
        addresses += [a for a in args.address if a not in addresses]
        if args.dry_run:
            print(f"would create {cert_path} and {key_path} for {', '.join(names + addresses)}")
            return 0
        cert_pem, key_pem = generate_certificate(names, addresses)
        try:
            import grp
            owner = (0, grp.getgrnam(args.group).gr_gid) if os.geteuid() == 0 else None
        except KeyError:
            owner = None
        try:
            for path in (cert_path, key_path):
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            atomic_write(key_path, key_pem, mode=0o640, overwrite=False, owner=owner)
            try:
                atomic_write(cert_path, cert_pem, mode=0o644, overwrite=False, owner=owner)
            except OSError:
                os.unlink(key_path)     # no key without its certificate
                raise
        except OSError as exc:
            return fail(f"cannot write {exc.filename or key_path}: {exc.strerror}")
        print(f"created {cert_path} and {key_path} (ECDSA P-256, {CERT_DAYS} days)")
    else:
        print(f"{cert_path} and {key_path} exist; unchanged")
    try:
        with open(cert_path, "rb") as handle:
            fingerprint, pin = cert_fingerprints(handle.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError) as exc:
        return fail(f"{cert_path}: not a readable PEM certificate ({exc})")
    print(f"fingerprint: {fingerprint}\npin: {pin}   (curl --pinnedpubkey)")
    return 0


def cmd_config_validate(args):
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return config_failure(exc, report=True)
    if not os.path.exists(config["config_path"]):
        print(f"{config['config_path']}: no such file; the defaults apply")
    for note in config["config_notes"]:
        print(f"{config['config_path']}: {note}")
    if config["config_notes"]:
        print(f"{config['config_path']}: in the original proxy's vocabulary; `{PROG} config "
              "migrate --write` rewrites it in this one (keeping a .bak)")
    print("OK")
    return 0


def render_config_yaml(raw):
    import yaml
    header = "# pulse-sensor-proxy configuration; docs/configuration.md documents every key.\n"
    return header + yaml.safe_dump(raw, default_flow_style=False, sort_keys=False)


def parse_settings(items):
    """KEY=VALUE arguments as (key, value) pairs, VALUE read as YAML (true, 8443, [a, b])."""
    import yaml

    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in CONFIG_CHECKS:
            raise ValueError(f"--set {item}: expected KEY=VALUE with a config key"
                             f"{_suggest(key, CONFIG_CHECKS)}")
        try:
            pairs.append((key, yaml.safe_load(text)))
        except yaml.YAMLError:
            raise ValueError(f"--set {item}: the value is not YAML") from None
    return pairs


def cmd_config_merge(args):
    path = args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    try:
        raw = read_config_file(path)
        validate_config(raw, source=path)
        merged = merge_config(raw, args.add_subnet, args.add_peer_uids,
                              parse_settings(args.set), parse_settings(args.set_default),
                              args.allow_cleanup_uids)
        validate_config(merged, source=path)
    except ConfigError as exc:
        return config_failure(exc)
    except ValueError as exc:
        return fail(str(exc))
    text = render_config_yaml(merged)
    if not args.write:
        sys.stdout.write(text)
        return 0
    if merged == raw and os.path.exists(path):
        print("config: unchanged")
        return 0
    try:
        write_config_file(path, text.encode())
    except OSError as exc:
        return fail(f"cannot write {path}: {exc.strerror or exc}")
    print(f"config: updated {path}")
    return 0


def write_config_file(path, data, like=None):
    """Atomically write a config file with the mode and owner of `like` (default: itself)."""
    try:
        info = os.stat(like or path)
    except FileNotFoundError:
        info = None
    atomic_write(path, data, mode=stat.S_IMODE(info.st_mode) if info else 0o640)
    if info and os.geteuid() == 0:
        os.chown(path, info.st_uid, info.st_gid)


def cmd_config_migrate(args):
    path = args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    try:
        raw, notes = read_translated_config(path)
        validate_config(raw, source=path)
    except ConfigError as exc:
        return config_failure(exc)
    for note in notes:
        print(f"{path}: {note}", file=sys.stderr)
    text = render_config_yaml(raw)
    if not args.write:
        sys.stdout.write(text)
        return 0
    if not notes:
        print(f"config: {path} is already in this proxy's vocabulary; unchanged")
        return 0
    try:
        with open(path, "rb") as handle:
            original = handle.read(MAX_CONFIG_BYTES + 1)
        write_config_file(path + ".bak", original, like=path)
        write_config_file(path, text.encode())
    except OSError as exc:
        return fail(f"cannot write {exc.filename or path}: {exc.strerror or exc}; {path} is "
                    "unchanged unless it says so")
    print(f"config: rewrote {path} in this proxy's vocabulary; the original is {path}.bak")
    return 0


# Where the unit files are: units/ beside the module in a checkout; inside the pyz,
# build_zipapp.sh packs them as site-packages/PACKED_UNITS (not an importable name).
PACKED_UNITS = "pulse-sensor-proxy-units"


def unit_files():
    """{name: bytes} of every unit file this build ships, read from a checkout or the pyz."""
    here = os.path.dirname(os.path.abspath(__file__))
    for directory in (os.path.join(here, PACKED_UNITS), os.path.join(here, "units")):
        if os.path.isdir(directory):
            files = {}
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as handle:
                    files[name] = handle.read()
            return files
    loader = globals().get("__loader__")
    if hasattr(loader, "archive"):          # imported from the pyz by zipimport
        import zipfile
        prefix = f"{loader.prefix}{PACKED_UNITS}/"
        with zipfile.ZipFile(loader.archive) as archive:
            return {name[len(prefix):]: archive.read(name) for name in sorted(archive.namelist())
                    if name.startswith(prefix) and name != prefix}
    return {}


def cmd_units(args):
    files = unit_files()
    if not files:
        return fail("this build carries no unit files")
    if args.write is None:
        print("\n".join(files))
        return 0
    for name, data in files.items():
        path = os.path.join(args.write, name)
        try:
            atomic_write(path, data, mode=0o644)
        except OSError as exc:
            return fail(f"cannot write {path}: {exc.strerror or exc}")
    print("\n".join(files))
    return 0


def cmd_host_addresses(args):
    """This host's addresses other hosts can see it by, as /32 and /128 networks, one a line:
    in the order of its links from `ip` where that runs, else from /proc."""
    try:
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, timeout=10,
                             text=True)
        found = usable_networks(ip_addr_networks(out.stdout)) if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        found = []
    print("\n".join(found or detect_host_networks()))
    return 0


def cmd_nodes(args):
    """The nodes the daemon reads, one name a line, found as the daemon finds them."""
    config = load_config(args.config)
    for node in Inventory(config, AuditLog("warning", sys.stderr)).current():
        print(node.name)
    return 0


def cmd_config_get(args):
    """One key's effective value (defaults applied): a list one item a line, a mapping as JSON."""
    config = load_config(args.config)
    value = config[args.key]
    if isinstance(value, (list, tuple)):
        lines = [str(item) for item in value]
    elif isinstance(value, dict):
        lines = [json.dumps(value, sort_keys=True)]
    elif isinstance(value, bool):
        lines = [str(value).lower()]
    else:
        lines = [str(value)]
    if lines:
        print("\n".join(lines))
    return 0


def run_key_command(args, action, dry_run=False):
    """Common frame of the root-only key commands: root check, config, exit code."""
    if os.geteuid() != 0:
        return fail(f"{args.command} must run as root: it logs in to the nodes with root's SSH "
                    f"key and writes the service's key files (try: sudo {PROG} "
                    f"{' '.join(sys.argv[1:])})")
    config = load_config(args.config)
    admin = KeyAdmin(config, dry_run=dry_run)
    try:
        return 0 if asyncio.run(action(admin)) else 1
    except (ProxyError, OSError) as exc:
        return fail(str(exc))


def cmd_keys(args):
    if args.keys_command == "status":
        return run_key_command(args, keys_status)
    if args.keys_command == "push":
        return run_key_command(args, lambda admin: keys_push(admin, args.node), args.dry_run)
    if args.fingerprint:
        fingerprint = args.fingerprint
        if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint):
            args.parser.error("--fingerprint: expected SHA256: and 43 base64 characters, as "
                              "`ssh-keygen -lf KEY.pub` prints it")
    else:
        try:
            with open(args.public_key) as handle:
                fingerprint = key_fingerprint(handle.read(16384))
        except (OSError, ValueError, IndexError) as exc:
            return fail(f"--public-key {args.public_key}: not a readable public key ({exc})")
    return run_key_command(args, lambda admin: keys_revoke(admin, args.node, fingerprint),
                           args.dry_run)


def cmd_cleanup(args):
    return run_key_command(args, run_cleanup, args.dry_run)


def cmd_smart_local(args):
    """Read this host's disks into local_smart_file, unless the last read is still fresh."""
    if os.geteuid() != 0:
        return fail(f"smart-local must run as root: smartctl opens this host's disks (it is run "
                    f"by {SMART_LOCAL_UNIT}; try: sudo {PROG} {' '.join(sys.argv[1:])})")
    config = load_config(args.config)
    if not config["disk_temperatures"]:
        print("disk temperatures are off (disk_temperatures: false): nothing read")
        return 0
    path, interval = config["local_smart_file"], config["smart_interval"]
    started = time.time()
    try:
        age = started - os.stat(path).st_mtime
    except OSError:
        age = None          # not there yet, or unreadable: this read replaces it
    if age is not None and not args.force and age < interval - LOCAL_SMART_SLACK:
        print(f"{path} is {age:.0f} s old, smart_interval is {interval:g} s: "
              "not read again (--force reads now)")
        return 0
    try:
        stdout = asyncio.run(run_local_smart())
        atomic_write(path, stdout, mode=0o644)
        os.utime(path, (started, started))     # the daemon takes the read's time from it
    except NodeError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {path}: {exc.strerror}")
    disks, missing = parse_smart_report(stdout, started)
    standby = sum(1 for disk in disks if disk["standbySkipped"])
    print(f"{path}: {len(disks)} disks ({standby} in standby, not woken)"
          + "".join(f"; {device} left out: {why}" for device, why in missing))
    return 0


def cmd_rotate_keys(args):
    if args.check:
        if args.rollback or args.dry_run:
            args.parser.error("--check runs alone (it changes nothing anyway)")
        return run_key_command(args, rotation_check)
    return run_key_command(args, lambda admin: rotate_keys(admin, args.rollback), args.dry_run)


def cmd_doctor(args):
    if os.geteuid() != 0:
        return fail(f"doctor must run as root: it reads the service's key and the cluster's "
                    f"host keys (try: sudo {PROG} {' '.join(sys.argv[1:])})")
    path = args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    findings = run_doctor(path, args.node, args.ctid, os.environ.get("PULSE_INSTALL_ROOT", ""))
    if args.json:
        for item in findings:
            print(json.dumps(item))
    else:
        print("\n".join(map(render_finding, findings)))
        print(doctor_summary(findings))
    return 1 if any(f["status"] == FAILED for f in findings) else 0


def free_port(host, first, tries=20):
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port on {host} between {first} and {first + tries - 1}")


def cmd_demo(args):
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    port = free_port("127.0.0.1", 9127)
    config_path = os.path.join(base, "config.yaml")
    demo = {"socket_path": os.path.join(base, "run", "pulse-sensor-proxy.sock"),
            "ssh_dir": os.path.join(base, "ssh"), "metrics_address": f"127.0.0.1:{port}",
            "allowed_source_subnets": ["127.0.0.1/32"]}
    atomic_write(config_path, render_config_yaml(demo).encode(), mode=0o640)
    config = load_config(config_path, environ={})
    log = AuditLog(config["log_level"])
    me = PROG
    if sys.argv[0].endswith(".py"):
        me = f"{sys.executable} {os.path.abspath(sys.argv[0])}"
    elif sys.argv[0].endswith(".pyz"):
        me = os.path.abspath(sys.argv[0])
    sock = config["socket_path"]

    def ready(daemon):
        print(f"""
{PROG} {__version__} demo: serving {sock}
  state and key: {config['ssh_dir']}   config: {config_path}

Try, in another terminal:
  {me} call get_status --socket {sock}
  {me} call get_temperature --node localhost --socket {sock}
  curl -s --unix-socket {sock} -d '{{"method":"get_status"}}' http://localhost/
  curl -s http://127.0.0.1:{port}/metrics
  curl -s http://127.0.0.1:{port}/health

Audit log below; Ctrl-C stops.
""", file=sys.stderr, flush=True)

    try:
        return asyncio.run(run_daemon(config, log, ready=ready))
    except (RuntimeError, OSError) as exc:
        return fail(str(exc))


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Host-side bridge that serves `sensors -j` of Proxmox nodes to "
        "Pulse over a Unix socket, holding the only SSH key.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage. Without a command, `serve` runs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon (default)")
    serve.add_argument("--config", help=f"config file (default ${ENV_CONFIG} or {DEFAULT_CONFIG_PATH})")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)

    call = sub.add_parser("call", help="send one request to the daemon and print the answer")
    call.add_argument("method", help="get_status, get_temperature, register_nodes, ensure_cluster_keys")
    call.add_argument("--node", help="params.node")
    call.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="a string param; KEY:=JSON for any JSON value (repeatable)")
    call.add_argument("--socket", help=f"socket path (default ${ENV_SOCKET} or {DEFAULT_SOCKET_PATH})")
    call.add_argument("--raw", action="store_true", help="print the response line as received")
    call.add_argument("--timeout", type=float, default=35.0, help="seconds to wait (default 35)")
    call.add_argument("--url", help="a proxy's HTTPS mode instead of the socket: https://HOST:8443")
    call.add_argument("--token-file", help="with --url: file holding the bearer token")
    call.add_argument("--fingerprint", help="with --url: the certificate's SHA256:... that "
                      "`tls init` printed; nothing is sent to any other")
    call.set_defaults(func=cmd_call, parser=call)

    tls = sub.add_parser("tls", help="the HTTPS mode's certificate")
    tls_sub = tls.add_subparsers(dest="tls_command", metavar="ACTION", required=True)
    tls_init = tls_sub.add_parser("init", help="create a self-signed certificate and key unless "
                                  "they exist; print the fingerprint")
    tls_init.add_argument("--config", help="config file (http_tls_cert, http_tls_key)")
    tls_init.add_argument("--name", action="append", default=[], help="another DNS name (repeatable)")
    tls_init.add_argument("--address", action="append", default=[], help="another IP address")
    tls_init.add_argument("--group", default=PROG, help="group that may read the key "
                          f"(default {PROG})")
    tls_init.add_argument("--dry-run", action="store_true", help="say what would be created")
    tls_init.set_defaults(func=cmd_tls_init, parser=tls_init)

    config = sub.add_parser("config", help="validate or merge a config file")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = config_sub.add_parser("validate", help="print every problem, or OK")
    validate.add_argument("--config", help="config file to check")
    validate.set_defaults(func=cmd_config_validate)
    merge = config_sub.add_parser("merge", help="add subnets and read-only peer ranges")
    merge.add_argument("--config", help="config file to merge into")
    merge.add_argument("--add-subnet", action="append", default=[], metavar="CIDR")
    merge.add_argument("--add-peer-uids", action="append", default=[], metavar="LOW-HIGH")
    merge.add_argument("--allow-cleanup-uids", action="append", default=[], metavar="LOW-HIGH",
                       help="give these uids the cleanup capability (request_cleanup)")
    merge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set a key (VALUE is YAML; repeatable)")
    merge.add_argument("--set-default", action="append", default=[], metavar="KEY=VALUE",
                       help="set a key only where the config does not have it")
    merge.add_argument("--write", action="store_true",
                       help="write the result (default: print it, change nothing)")
    merge.set_defaults(func=cmd_config_merge)
    migrate = config_sub.add_parser("migrate", help="rewrite a config of the original proxy in "
                                    "this one's vocabulary (keeps FILE.bak)")
    migrate.add_argument("--config", help="config file to migrate")
    migrate.add_argument("--write", action="store_true",
                         help="write the result (default: print it, change nothing)")
    migrate.set_defaults(func=cmd_config_migrate)
    get = config_sub.add_parser("get", help="print one key's effective value (defaults applied; "
                                "a list one item a line)")
    get.add_argument("key", choices=sorted(CONFIG_CHECKS), metavar="KEY", help="a config key")
    get.add_argument("--config", help="config file")
    get.set_defaults(func=cmd_config_get)

    units = sub.add_parser("units", help="list the systemd unit files this build ships")
    units.add_argument("--write", metavar="DIR", help="write every one into DIR (mode 0644)")
    units.set_defaults(func=cmd_units)
    sub.add_parser("host-addresses", help="this host's addresses other hosts see, as /32 and "
                   "/128 networks, one a line").set_defaults(func=cmd_host_addresses)
    nodes = sub.add_parser("nodes", help="the nodes the daemon reads, one a line")
    nodes.add_argument("--config", help="config file")
    nodes.set_defaults(func=cmd_nodes)

    keys = sub.add_parser("keys", help="the proxy's key on the nodes (root)")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    status = keys_sub.add_parser("status", help="per node: which keys are installed, does it work")
    push = keys_sub.add_parser("push", help="install the current key's restricted line on every node")
    push.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    push.add_argument("--dry-run", action="store_true", help="show what would change")
    revoke = keys_sub.add_parser("revoke", help="remove a key's lines from every node")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--fingerprint", help="SHA256:... as ssh-keygen -l prints it")
    which.add_argument("--public-key", metavar="FILE", help="a public key file")
    revoke.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    revoke.add_argument("--dry-run", action="store_true", help="show what would change")
    for parser_ in (status, push, revoke):
        parser_.add_argument("--config", help="config file")
    keys.set_defaults(func=cmd_keys)
    revoke.set_defaults(parser=revoke)

    cleanup = sub.add_parser("cleanup", help="act on a pending request_cleanup: remove the "
                             "proxy's keys from the hosts it names (root; run by "
                             "pulse-sensor-proxy-cleanup.path)")
    cleanup.add_argument("--dry-run", action="store_true", help="show what would change")
    cleanup.add_argument("--config", help="config file")
    cleanup.set_defaults(func=cmd_cleanup)

    rotate = sub.add_parser("rotate-keys", help="replace the key on every node, staged and verified (root)")
    rotate.add_argument("--dry-run", action="store_true", help="print every step, change nothing")
    rotate.add_argument("--check", action="store_true", help="preflight only; exit 0 when ready")
    rotate.add_argument("--rollback", action="store_true", help="make the previous key current again")
    rotate.add_argument("--config", help="config file")
    rotate.set_defaults(func=cmd_rotate_keys, parser=rotate)

    smart = sub.add_parser("smart-local", help="read this host's disks' SMART data into "
                           "local_smart_file (root; run by " + SMART_LOCAL_UNIT + ")")
    smart.add_argument("--force", action="store_true", help="read even if the last read is fresh")
    smart.add_argument("--config", help="config file")
    smart.set_defaults(func=cmd_smart_local)

    doctor = sub.add_parser("doctor", help="check every link from Pulse to each node's sensors; "
                            "one line per check with the fix, changing nothing (root)")
    doctor.add_argument("--ctid", action="append", default=[], help="check this container "
                        "(repeatable; default: every one whose config mounts the socket)")
    doctor.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    doctor.add_argument("--json", action="store_true", help="one JSON object per check")
    doctor.add_argument("--config", help="config file")
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="run the daemon with every path under a local directory")
    demo.add_argument("--dir", default="demo-run", help="directory for socket, key and config "
                      "(default ./demo-run)")
    demo.set_defaults(func=cmd_demo)
    return parser


def unpack_dir_problem(path):
    """Why the pyz must not unpack into or import from directory PATH; None when it may.

    The pyz unpacks its dependencies (native code among them) under PATH and runs them as
    whoever started it, usually root, so anyone who could write there could inject code. PATH
    must be owned by the current user or root and writable by nobody else; each parent up to /
    must be owned by root or the current user and writable by nobody else, unless it is a
    root-owned sticky directory such as /tmp (others cannot rename or replace our entries).
    """
    real = os.path.realpath(path)
    uid = os.geteuid()
    current = real
    while True:
        try:
            info = os.lstat(current)
        except OSError as exc:
            return f"cannot inspect {current}: {exc.strerror}"
        mode = stat.S_IMODE(info.st_mode)
        shared_sticky = current != real and info.st_uid == 0 and mode & stat.S_ISVTX
        if not stat.S_ISDIR(info.st_mode):
            problem = "is not a directory"
        elif info.st_uid not in (0, uid):
            problem = f"belongs to uid {info.st_uid}"
        elif mode & 0o022 and not shared_sticky:
            problem = f"is writable by group or others (mode {mode:04o})"
        else:
            problem = None
        if problem:
            return (f"refusing to unpack into {real}: {current} {problem}, so another user could "
                    f"replace the code this program runs. Fix: make {current} owned by root or "
                    f"uid {uid} and not writable by group or others (chown, chmod go-w), or set "
                    f"SHIV_ROOT to a private directory (mkdir -m 0700 DIR)")
        if current == "/":
            return None
        current = os.path.dirname(current)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:      # a config a command cannot do without: every problem of it
        return config_failure(exc)
    except OSError as exc:          # what a command did not expect still ends in one line
        return fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))


if __name__ == "__main__":
    sys.exit(main())
