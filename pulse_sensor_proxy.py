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
    config merge              add subnets / peer uid ranges to a config file (used by the installer)
    demo                      run the daemon with every path under ./demo-run (no root, no Proxmox)

Methods and the capability each needs::

    get_status                   read   version, public key, paths, uptime, the caller's identity
    get_temperature (get_temp)   read   `sensors -j` of one node
    register_nodes               read   the known nodes and whether the key works on each
    ensure_cluster_keys          admin  per node: is the proxy's key accepted? (+ the line to install)

Peers: uid 0 and the daemon's own uid get read+admin; ``allowed_peers`` in the config grants
uids or uid ranges; uids inside a range that ``/etc/subuid`` gives to ``root`` (the uids of
unprivileged containers' root) get read when ``allow_idmapped_root`` is true. Anyone else is
refused with ``unauthorized``.

Configuration: ``/etc/pulse-sensor-proxy/config.yaml`` (or ``$PULSE_SENSOR_PROXY_CONFIG``); a
missing file means the defaults in ``DEFAULT_CONFIG`` below. README.md documents every key.

The module reads top-down: constants, configuration, pure logic (peers, rate limiting, request
validation, metrics), then I/O (keys on disk, the servers), and the command line last.
"""
import argparse
import difflib
import importlib
import ipaddress
import json
import os
import re
import reprlib
import signal
import socket
import stat
import struct
import sys
import time
import traceback
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

MAX_REQUEST_BYTES = 16 * 1024      # one request line (or HTTP head, or HTTP body)
READ_TIMEOUT = 5.0                 # for a whole request to arrive
HANDLER_TIMEOUT = 30.0             # for a method to answer
MAX_CONNECTIONS = 256              # simultaneous socket connections
SHUTDOWN_GRACE = 10.0              # in-flight requests may finish for this long on SIGTERM
MAX_CONFIG_BYTES = 1024 * 1024
MAX_METRICS_CONNECTIONS = 32
SOCKET_DIR_MODE = 0o775            # container uids must traverse it; SO_PEERCRED decides access
SOCKET_MODE = 0o777

CAP_READ, CAP_ADMIN = "read", "admin"
CAPABILITIES = (CAP_READ, CAP_ADMIN)

# The wire's error strings. Each maps to the `result` label of metrics and audit records and,
# for the HTTP form, to a status code.
E_TOO_LARGE = "payload too large"
E_READ_TIMEOUT = "read timeout"
E_INVALID = "invalid request format"
E_EMPTY = "empty request"
E_UNKNOWN_METHOD = "unknown method"
E_TIMEOUT = "timeout"
E_BUSY = "server busy"
E_UNAUTHORIZED = "unauthorized"
E_FORBIDDEN = "forbidden: method requires admin"
E_RATE_LIMITED = "rate limit exceeded"
E_INTERNAL = "internal error"
ERROR_RESULTS = {
    E_TOO_LARGE: ("invalid", 413), E_READ_TIMEOUT: ("timeout", 408), E_INVALID: ("invalid", 400),
    E_EMPTY: ("invalid", 400), E_UNKNOWN_METHOD: ("invalid", 200), E_TIMEOUT: ("timeout", 200),
    E_BUSY: ("busy", 503), E_UNAUTHORIZED: ("unauthorized", 403),
    E_FORBIDDEN: ("forbidden", 403), E_RATE_LIMITED: ("rate_limited", 429),
}

DEFAULT_CONFIG = {
    "allowed_source_subnets": [],
    "metrics_address": "127.0.0.1:9127",
    "allowed_peers": [],
    "allow_idmapped_root": True,
    "rate_limit": {"per_minute": 20, "burst": 10, "max_concurrent": 10},
    "log_level": "info",
    "socket_path": DEFAULT_SOCKET_PATH,
    "ssh_dir": DEFAULT_SSH_DIR,
    "subuid_file": "/etc/subuid",
}
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


def _check_nonneg_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer >= 0")
    return value


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
                uid = _check_nonneg_int(entry["uid"])
                uids = (uid, uid)
            else:
                uids = parse_uid_range(entry["uids"])
        except ValueError as exc:
            problems.append(f"{where}.{key}: got {_describe(entry[key])}, {exc}")
            continue
        gid = entry.get("gid")
        if gid is not None:
            try:
                _check_nonneg_int(gid)
            except ValueError as exc:
                problems.append(f"{where}.gid: got {_describe(gid)}, {exc}")
                continue
        caps = entry.get("capabilities", [CAP_READ])
        if not isinstance(caps, list) or not caps or any(c not in CAPABILITIES for c in caps):
            problems.append(f"{where}.capabilities: got {_describe(caps)}, expected a list of "
                            "read and/or admin")
            continue
        peers.append({"uids": uids, "gid": gid, "capabilities": frozenset(caps)})
    if problems:
        raise ConfigError(problems)
    return peers


def _check_rate_limit(value):
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with per_minute, burst, max_concurrent")
    merged = dict(DEFAULT_CONFIG["rate_limit"])
    problems = []
    for key, item in value.items():
        if key not in merged:
            problems.append(f"rate_limit: unknown key {key!r}{_suggest(key, merged)}")
            continue
        number_ok = isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0
        if key != "per_minute":
            number_ok = number_ok and isinstance(item, int)
        if not number_ok or item != item or item == float("inf"):
            kind = "a number > 0" if key == "per_minute" else "an integer >= 1"
            problems.append(f"rate_limit.{key}: got {_describe(item)}, expected {kind}")
            continue
        merged[key] = item
    if problems:
        raise ConfigError(problems)
    return merged


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
            problems.append(f"{source}: unknown key {key!r}{_suggest(key, CONFIG_CHECKS)}")
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


def load_config(path=None, environ=None):
    """Read, validate and apply environment overrides; returns the effective config."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    config = validate_config(read_config_file(path), source=path)
    overrides = {ENV_SOCKET: "socket_path", ENV_SSH_DIR: "ssh_dir",
                 ENV_METRICS_ADDR: "metrics_address"}
    problems = []
    for env, key in overrides.items():
        if environ.get(env):
            try:
                config[key] = CONFIG_CHECKS[key](environ[env])
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
    return config


def merge_config(raw, add_subnets=(), add_peer_ranges=()):
    """Return `raw` with subnets and read-only peer uid ranges added (each only once).

    Everything already in the document stays as it is; used by the installer so re-running it
    adds what a new container needs without touching the admin's own edits.
    """
    merged = dict(raw or {})
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
    present = set()
    for entry in peers:
        if isinstance(entry, dict):
            try:
                present.add(parse_uid_range(entry.get("uids", entry.get("uid"))))
            except ValueError:
                continue
    for item in add_peer_ranges:
        low, high = parse_uid_range(item)
        if (low, high) not in present:
            peers.append({"uids": f"{low}-{high}", "capabilities": [CAP_READ]})
            present.add((low, high))
    if peers:
        merged["allowed_peers"] = peers
    return merged


def parse_subuid(text, user="root"):
    """The (low, high) uid ranges /etc/subuid gives `user` (lines `name:start:count`)."""
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == user and parts[1].isdigit() and parts[2].isdigit():
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
    usable = []
    for network in networks:
        address = network.network_address
        if not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified) and network not in usable:
            usable.append(network)
    return [str(n) for n in usable]


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
    return frozenset(caps)


# ---------------------------------------------------------------------------------------------
# Pure logic: rate limiting
# ---------------------------------------------------------------------------------------------


class RateLimiter:
    """Token bucket per peer key (uid, pid) plus a cap on requests in flight per peer.

    Buckets refill at per_minute/60 tokens a second up to `burst`. An entry that is full and
    idle is the same as no entry, so such entries are dropped: memory follows the peers that
    are active, not the pids ever seen. `clock` is injectable so tests need no sleeps.
    """

    MAX_ENTRIES = 8192

    def __init__(self, per_minute, burst, max_concurrent, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_concurrent = max_concurrent
        self.clock = clock
        self.entries = {}           # key -> [tokens, last_refill, in_flight]
        self._next_sweep = 0.0

    def acquire(self, key):
        """Take a token and an in-flight slot; False when the peer is over either limit."""
        now = self.clock()
        if now >= self._next_sweep or len(self.entries) >= self.MAX_ENTRIES:
            self._sweep(now)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = [self.burst, now, 0]
        else:
            entry[0] = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            entry[1] = now
        if entry[0] < 1.0 or entry[2] >= self.max_concurrent:
            return False
        entry[0] -= 1.0
        entry[2] += 1
        return True

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
    """A request that is answered with success:false and this message."""


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _unique_object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


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
        request = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_object,
                             parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise RequestError(E_INVALID) from None
    if not isinstance(request, dict):
        raise RequestError(E_INVALID)
    corr_id = normalize_correlation_id(request.get("correlation_id"))
    method, params = request.get("method"), request.get("params")
    if not isinstance(method, str) or not (params is None or isinstance(params, dict)):
        raise RequestError(E_INVALID, corr_id)
    return corr_id, method, params or {}


def normalize_correlation_id(value):
    if isinstance(value, str) and len(value) <= 64:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    return str(uuid.uuid4())


def response_line(corr_id, data=None, error=None):
    if error is None:
        body = {"correlation_id": corr_id, "success": True, "data": data}
    else:
        body = {"correlation_id": corr_id, "success": False, "error": error}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


HTTP_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH) \S+ HTTP/1\.[01]\r?")
HTTP_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
                429: "Too Many Requests", 503: "Service Unavailable"}


def http_response(status, body, content_type="application/json"):
    head = (f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'OK')}\r\n"
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


def status_for_error(error):
    return ERROR_RESULTS.get(error, ("error", 200))[1]


def result_for_error(error):
    return ERROR_RESULTS.get(error, ("error", 200))[0]


def sanitize_label(value, limit=64):
    """A metric label or log field made of safe characters only, bounded in length."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", str(value))[:limit]


# ---------------------------------------------------------------------------------------------
# Pure logic: metrics (Prometheus text format 0.0.4)
# ---------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class Metrics:
    """A tiny registry: counters, gauges and histograms keyed by label tuples.

    Label values come from bounded sets (known methods, sanitized node names capped at
    `max_label_values` per metric, then "other") so a hostile peer cannot grow it.
    """

    def __init__(self, max_label_values=256):
        self.families = {}          # name -> (type, help, label_names)
        self.values = {}            # name -> {label_values: number | [bucket_counts, sum, count]}
        self.max_label_values = max_label_values

    def declare(self, kind, name, help_text, labels=()):
        self.families[name] = (kind, help_text, tuple(labels))
        self.values[name] = {}

    def _series(self, name, labels):
        series = self.values[name]
        if labels not in series and len(series) >= self.max_label_values:
            labels = tuple("other" for _ in labels)
        return series, labels

    def inc(self, name, labels=(), amount=1.0):
        series, labels = self._series(name, labels)
        series[labels] = series.get(labels, 0.0) + amount

    def set(self, name, value, labels=()):
        series, labels = self._series(name, labels)
        series[labels] = float(value)

    def observe(self, name, value, labels=()):
        series, labels = self._series(name, labels)
        entry = series.get(labels)
        if entry is None:
            entry = series[labels] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
        for index, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                entry[0][index] += 1
        entry[1] += value
        entry[2] += 1

    def render(self):
        out = []
        for name, (kind, help_text, label_names) in self.families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self.values[name].items()):
                pairs = list(zip(label_names, labels))
                if kind == "histogram":
                    buckets, total, count = value
                    for bound, bucket in zip(LATENCY_BUCKETS, buckets):
                        out.append(f"{name}_bucket{_labels(pairs + [('le', repr(bound))])} {bucket}")
                    out.append(f"{name}_bucket{_labels(pairs + [('le', '+Inf')])} {count}")
                    out.append(f"{name}_sum{_labels(pairs)} {_number(total)}")
                    out.append(f"{name}_count{_labels(pairs)} {count}")
                else:
                    out.append(f"{name}{_labels(pairs)} {_number(value)}")
        return "\n".join(out) + "\n"


def _labels(pairs):
    if not pairs:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(10), "").replace(chr(34), chr(92) + chr(34))}"'
               for k, v in pairs)
    return "{" + ",".join(escaped) + "}"


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def new_metrics():
    metrics = Metrics()
    metrics.declare("counter", "pulse_proxy_rpc_requests_total", "RPC requests by method and result",
                    ("method", "result"))
    metrics.declare("histogram", "pulse_proxy_rpc_latency_seconds", "RPC handling time", ("method",))
    metrics.declare("counter", "pulse_proxy_ssh_requests_total", "sensors -j fetches by node and result",
                    ("node", "result"))
    metrics.declare("histogram", "pulse_proxy_ssh_latency_seconds", "sensors -j fetch time", ("node",))
    metrics.declare("gauge", "pulse_proxy_queue_depth", "RPC requests being handled now")
    metrics.declare("counter", "pulse_proxy_rate_limit_hits_total", "Requests refused by rate limits")
    metrics.declare("gauge", "pulse_proxy_connections", "Open socket connections")
    metrics.declare("gauge", "pulse_proxy_build_info", "Build information", ("version",))
    metrics.set("pulse_proxy_queue_depth", 0)
    metrics.set("pulse_proxy_connections", 0)
    metrics.inc("pulse_proxy_rate_limit_hits_total", amount=0)
    metrics.set("pulse_proxy_build_info", 1, (__version__,))
    return metrics


# ---------------------------------------------------------------------------------------------
# I/O: audit log
# ---------------------------------------------------------------------------------------------


class AuditLog:
    """JSON lines on a stream (stdout; journald keeps them). Never given key material."""

    def __init__(self, level="info", stream=None):
        self.level = LOG_LEVELS[level]
        self.stream = stream or sys.stdout

    def log(self, level, msg, **fields):
        if LOG_LEVELS[level] < self.level:
            return
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "level": level,
                  "msg": msg}
        record.update((k, v) for k, v in fields.items() if v is not None)
        try:
            self.stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass    # a closed or full log pipe must not take requests down with it


# ---------------------------------------------------------------------------------------------
# I/O: files and keys on disk
# ---------------------------------------------------------------------------------------------


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o600, overwrite=True):
    """Write `data` to `path` via a temp file in the same directory, fsync, rename, fsync dir.

    With overwrite=False an existing file is never replaced (FileExistsError instead).
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.rename(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def generate_keypair(comment=KEY_COMMENT):
    """A new Ed25519 key as (private OpenSSH PEM bytes, public `ssh-ed25519 AAAA... comment`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b" " + comment.encode() + b"\n"


def ensure_keypair(ssh_dir, log):
    """Create ssh_dir/id_ed25519(.pub) if the private key is missing; never overwrite one."""
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    private_path = os.path.join(ssh_dir, KEY_NAME)
    if os.path.lexists(private_path):
        return False
    private, public = generate_keypair()
    atomic_write(private_path, private, mode=0o600, overwrite=False)
    atomic_write(private_path + ".pub", public, mode=0o640)
    log.log("info", "Generated SSH key", path=private_path)
    return True


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
# I/O: the RPC server
# ---------------------------------------------------------------------------------------------

METHODS = {}        # name -> (capability, handler)
METHOD_ALIASES = {"get_temp": "get_temperature"}


def rpc_method(name, capability):
    def register(handler):
        METHODS[name] = (capability, handler)
        return handler
    return register


class Peer:
    __slots__ = ("uid", "gid", "pid", "capabilities")

    def __init__(self, uid, gid, pid, capabilities):
        self.uid, self.gid, self.pid, self.capabilities = uid, gid, pid, capabilities

    def as_dict(self):
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid,
                "capabilities": sorted(self.capabilities)}


PEERCRED = struct.Struct("=iII")


def peer_credentials(sock):
    pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     PEERCRED.size))
    return pid, uid, gid


class ConnectionClosed(Exception):
    def __init__(self, partial):
        super().__init__("connection closed")
        self.partial = partial


class LineReader:
    """Bounded line reads from a StreamReader: the line's size and the time to read it."""

    def __init__(self, reader):
        self.reader = reader
        self.buffer = bytearray()

    async def readline(self, limit=MAX_REQUEST_BYTES):
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                if end > limit:
                    raise RequestError(E_TOO_LARGE)
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) > limit:
                raise RequestError(E_TOO_LARGE)
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionClosed(partial=bool(self.buffer))
            self.buffer += chunk

    async def readexactly(self, count):
        while len(self.buffer) < count:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionClosed(partial=True)
            self.buffer += chunk
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data


class Daemon:
    """State shared by every connection: config, limiter, metrics, log."""

    def __init__(self, config, log=None, clock=time.monotonic):
        self.log = log or AuditLog(config["log_level"])
        self.metrics = new_metrics()
        self.clock = clock
        self.started = clock()
        self.own_uid = os.geteuid()
        self.connections = 0
        self.in_flight = 0
        self.handlers = set()
        self.waiting = {}           # connection task -> (writer, peer), longest waiting first
        self.metrics_waiting = {}   # the same for the metrics listener (task -> task)
        self.apply_config(config)

    def apply_config(self, config):
        """Switch to a validated config (start and SIGHUP)."""
        self.config = config
        self.log.level = LOG_LEVELS[config["log_level"]]
        limits = config["rate_limit"]
        self.limiter = RateLimiter(limits["per_minute"], limits["burst"], limits["max_concurrent"],
                                   clock=self.clock)
        ranges = []
        if config["allow_idmapped_root"]:
            try:
                with open(config["subuid_file"]) as handle:
                    ranges = parse_subuid(handle.read(MAX_CONFIG_BYTES))
            except OSError:
                pass
        self.idmapped_ranges = ranges
        if not config["allowed_source_subnets"]:
            detected = detect_host_networks()
            self.source_subnets = detected
            self.log.log("warning", "allowed_source_subnets is empty; using this host's addresses",
                         subnets=detected)
        else:
            self.source_subnets = config["allowed_source_subnets"]

    def peer(self, sock):
        pid, uid, gid = peer_credentials(sock)
        caps = peer_capabilities(uid, gid, self.own_uid, self.config["allowed_peers"],
                                 self.idmapped_ranges)
        return Peer(uid, gid, pid, caps)

    # -- one connection ----------------------------------------------------------------------

    async def serve_connection(self, reader, writer):
        self.connections += 1
        self.metrics.set("pulse_proxy_connections", self.connections)
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:       # a bug must cost one connection, never the daemon
            self.log.log("error", "Connection handler failed", error=traceback.format_exc(limit=5))
        finally:
            self.handlers.discard(task)
            self.waiting.pop(task, None)
            self.connections -= 1
            self.metrics.set("pulse_proxy_connections", self.connections)
            writer.close()

    async def _serve_connection(self, reader, writer):
        peer = self.peer(writer.get_extra_info("socket"))
        if self.connections > MAX_CONNECTIONS and not self.evict_waiting():
            self.audit(peer, None, None, time.monotonic(), E_BUSY)
            writer.write(response_line(str(uuid.uuid4()), error=E_BUSY))
            await writer.drain()
            return
        lines = LineReader(reader)
        first = True
        task = asyncio.current_task()
        while True:
            started = time.monotonic()
            self.waiting[task] = (writer, peer)
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    line = await lines.readline()
                    if first and HTTP_REQUEST_LINE.match(line):
                        await self.serve_http(peer, lines, writer, started)
                        return
            except ConnectionClosed as closed:
                if closed.partial:
                    self.audit(peer, None, None, started, E_INVALID)
                return
            except TimeoutError:
                if first or lines.buffer:
                    self.audit(peer, None, None, started, E_READ_TIMEOUT)
                    writer.write(response_line(str(uuid.uuid4()), error=E_READ_TIMEOUT))
                    await writer.drain()
                return
            except RequestError as exc:
                self.audit(peer, None, None, started, exc.args[0])
                writer.write(response_line(str(uuid.uuid4()), error=exc.args[0]))
                await writer.drain()
                return      # the rest of an oversized line cannot be told from a new request
            self.waiting.pop(task, None)
            corr_id, error, reply = await self.handle(peer, line, started)
            writer.write(reply)
            await writer.drain()
            if error == E_UNAUTHORIZED:
                return
            first = False

    async def serve_http(self, peer, lines, writer, started):
        """One HTTP/1.x request whose body is the JSON request; always `Connection: close`."""
        try:
            head = []
            budget = MAX_REQUEST_BYTES
            while True:
                raw = (await lines.readline(budget)).rstrip(b"\r")
                if not raw:
                    break
                budget -= len(raw) + 2
                if budget < 0:
                    raise RequestError(E_TOO_LARGE)
                head.append(raw)
            headers = parse_http_head(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise RequestError(E_INVALID)
            # ASCII digits only (str.isdigit takes "²"), and no int() of thousands of digits.
            length = headers.get("content-length", "0")
            if not (length.isascii() and length.isdigit()):
                raise RequestError(E_INVALID)
            length = length.lstrip("0") or "0"
            if len(length) > 9 or int(length) > MAX_REQUEST_BYTES:
                raise RequestError(E_TOO_LARGE)
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await lines.readexactly(int(length))
            self.waiting.pop(asyncio.current_task(), None)
        except RequestError as exc:
            self.audit(peer, None, None, started, exc.args[0])
            body = response_line(str(uuid.uuid4()), error=exc.args[0])
            writer.write(http_response(status_for_error(exc.args[0]), body))
            await writer.drain()
            return
        _, error, reply = await self.handle(peer, body.replace(b"\n", b" "), started)
        writer.write(http_response(status_for_error(error) if error else 200, reply))
        await writer.drain()

    def evict_waiting(self):
        """Make room by closing the connection that has waited longest for its request.

        A full request arrives in one write; a connection still waiting is idle or slow. When
        all slots are taken, the longest waiting one gets `server busy` so that clients that
        connect and send nothing (or a byte at a time) cannot lock everyone else out. False
        when every connection is busy with a request.
        """
        if not self.waiting:
            return False
        task = next(iter(self.waiting))
        writer, peer = self.waiting.pop(task)
        self.audit(peer, None, None, time.monotonic(), E_BUSY)
        writer.write(response_line(str(uuid.uuid4()), error=E_BUSY))
        task.cancel()
        return True

    # -- one request -------------------------------------------------------------------------

    async def handle(self, peer, line, started):
        """Answer one request line: (correlation_id, error or None, response bytes)."""
        corr_id, method, node = str(uuid.uuid4()), None, None
        try:
            try:
                corr_id, method, params = parse_request(line)
            except RequestError as exc:
                if len(exc.args) > 1:
                    corr_id = exc.args[1]
                raise
            node = params.get("node") if isinstance(params.get("node"), str) else None
            if not peer.capabilities:
                raise RequestError(E_UNAUTHORIZED)
            name = METHOD_ALIASES.get(method, method)
            if name not in METHODS:
                raise RequestError(E_UNKNOWN_METHOD)
            capability, handler = METHODS[name]
            if capability not in peer.capabilities:
                raise RequestError(E_FORBIDDEN)
            key = (peer.uid, peer.pid)
            if not self.limiter.acquire(key):
                self.metrics.inc("pulse_proxy_rate_limit_hits_total")
                self.log.log("warning", "Rate limit exceeded", uid=peer.uid, pid=peer.pid,
                             corr_id=corr_id)
                raise RequestError(E_RATE_LIMITED)
            self.in_flight += 1
            self.metrics.set("pulse_proxy_queue_depth", self.in_flight)
            try:
                async with asyncio.timeout(HANDLER_TIMEOUT):
                    data = await handler(self, peer, params, corr_id)
            except TimeoutError:
                raise RequestError(E_TIMEOUT) from None
            finally:
                self.in_flight -= 1
                self.metrics.set("pulse_proxy_queue_depth", self.in_flight)
                self.limiter.release(key)
        except RequestError as exc:
            error = exc.args[0]
            self.audit(peer, corr_id, method, started, error, node)
            return corr_id, error, response_line(corr_id, error=error)
        except Exception:
            self.log.log("error", "Method failed", corr_id=corr_id,
                         error=traceback.format_exc(limit=5))
            self.audit(peer, corr_id, method, started, E_INTERNAL, node)
            return corr_id, E_INTERNAL, response_line(corr_id, error=E_INTERNAL)
        self.audit(peer, corr_id, method, started, None, node)
        return corr_id, None, response_line(corr_id, data=data)

    def audit(self, peer, corr_id, method, started, error, node=None):
        latency = time.monotonic() - started
        label = METHOD_ALIASES.get(method, method) if method in METHODS or method in METHOD_ALIASES \
            else "unknown"
        result = "success" if error is None else result_for_error(error)
        self.metrics.inc("pulse_proxy_rpc_requests_total", (label, result))
        self.metrics.observe("pulse_proxy_rpc_latency_seconds", latency, (label,))
        self.log.log("info" if error is None else "warning",
                     "RPC request" if error is None else "RPC request failed",
                     corr_id=corr_id, uid=peer.uid, gid=peer.gid, pid=peer.pid,
                     method=method[:64] if isinstance(method, str) else None,
                     node=sanitize_label(node) if node is not None else None, result=result,
                     latency_ms=round(latency * 1000, 3), error=error)

    # -- metrics and health over HTTP --------------------------------------------------------

    async def serve_metrics_connection(self, reader, writer):
        if self.metrics_connections >= MAX_METRICS_CONNECTIONS and not self.metrics_waiting:
            writer.close()
            return
        if self.metrics_connections >= MAX_METRICS_CONNECTIONS:     # the longest waiting gives way
            self.metrics_waiting.pop(next(iter(self.metrics_waiting))).cancel()
        self.metrics_connections += 1
        task = asyncio.current_task()
        self.metrics_waiting[task] = task
        try:
            lines = LineReader(reader)
            async with asyncio.timeout(READ_TIMEOUT):
                request = (await lines.readline(8192)).rstrip(b"\r").split()
                while (await lines.readline(8192)).rstrip(b"\r"):
                    pass
            self.metrics_waiting.pop(task, None)
            writer.write(self.metrics_response(request))
            await writer.drain()
        except (RequestError, ConnectionClosed, TimeoutError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            self.metrics_waiting.pop(task, None)
            self.metrics_connections -= 1
            writer.close()

    def metrics_response(self, request):
        if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
            return http_response(400, b"bad request\n", "text/plain")
        if request[0] not in (b"GET", b"HEAD"):
            return http_response(405, b"method not allowed\n", "text/plain")
        path = request[1].split(b"?")[0]
        if path == b"/metrics":
            self.metrics.set("pulse_proxy_queue_depth", self.in_flight)
            return http_response(200, self.metrics.render().encode(),
                                 "text/plain; version=0.0.4; charset=utf-8")
        if path == b"/health":
            healthy = bool(read_public_key(self.config["ssh_dir"]))
            body = json.dumps({"status": "ok" if healthy else "unavailable",
                               "version": __version__,
                               "uptime_seconds": round(self.clock() - self.started, 3)}).encode()
            return http_response(200 if healthy else 503, body + b"\n")
        return http_response(404, b"not found\n", "text/plain")


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@rpc_method("get_status", CAP_READ)
async def get_status(daemon, peer, params, corr_id):
    config = daemon.config
    return {"version": __version__, "public_key": read_public_key(config["ssh_dir"]),
            "ssh_dir": config["ssh_dir"], "socket": config["socket_path"],
            "uptime_seconds": round(daemon.clock() - daemon.started, 3), "peer": peer.as_dict()}


def _not_yet(feature):
    async def handler(daemon, peer, params, corr_id):
        raise RequestError(f"not available yet: {feature}")
    return handler


rpc_method("get_temperature", CAP_READ)(_not_yet("temperature fetching over SSH"))
rpc_method("register_nodes", CAP_READ)(_not_yet("node registration"))
rpc_method("ensure_cluster_keys", CAP_ADMIN)(_not_yet("cluster key checks"))


# ---------------------------------------------------------------------------------------------
# I/O: running the daemon
# ---------------------------------------------------------------------------------------------


async def start_metrics_server(daemon):
    address = daemon.config["metrics_address"]
    if address == "disabled":
        return None
    host, port = parse_host_port(address)
    return await asyncio.start_server(daemon.serve_metrics_connection, host, port,
                                      reuse_address=True)


async def run_daemon(config, log, ready=None):
    """Serve until SIGTERM/SIGINT. `ready(daemon)` is called once the socket accepts."""
    daemon = Daemon(config, log)
    daemon.metrics_connections = 0
    ensure_keypair(config["ssh_dir"], log)
    path = config["socket_path"]
    prepare_socket_path(path)
    server = await asyncio.start_unix_server(daemon.serve_connection, path=path, backlog=512,
                                             limit=MAX_REQUEST_BYTES * 2)
    os.chmod(path, SOCKET_MODE)
    socket_inode = os.stat(path).st_ino
    metrics_server = await start_metrics_server(daemon)
    loop = asyncio.get_running_loop()
    # asyncio's own errors (e.g. accept() failing with EMFILE under a connection flood) as
    # audit records, not multi-line tracebacks on stderr.
    loop.set_exception_handler(lambda _, context: log.log(
        "error", context.get("message", "event loop error"), error=repr(context.get("exception"))))
    stop = asyncio.Event()

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
        daemon.apply_config(new_config)
        log.log("info", "Configuration reloaded", path=new_config["config_path"])

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.log("info", "Serving", socket=path, version=__version__, metrics=config["metrics_address"],
            uid=daemon.own_uid)
    sd_notify("READY=1")
    if ready:
        ready(daemon)
    await stop.wait()

    sd_notify("STOPPING=1")
    log.log("info", "Shutting down", in_flight=daemon.in_flight)
    server.close()
    if metrics_server:
        metrics_server.close()
    if daemon.handlers:
        _, pending = await asyncio.wait(list(daemon.handlers), timeout=SHUTDOWN_GRACE)
        for task in pending:
            task.cancel()
    try:
        if os.stat(path).st_ino == socket_inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    log.log("info", "Stopped")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def cmd_serve(args):
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    log = AuditLog(config["log_level"])
    try:
        return asyncio.run(run_daemon(config, log))
    except (RuntimeError, OSError) as exc:
        return fail(str(exc))


def cmd_version(args):
    build = f"commit {BUILD_COMMIT}, built {BUILD_DATE}" if BUILD_DATE else BUILD_COMMIT
    print(f"{PROG} {__version__} ({build})")
    return 0


def build_call_request(method, node, params):
    """The request object `call` sends; params are KEY=VALUE strings or KEY:=JSON values."""
    body = {}
    for item in params:
        if ":=" in item and item.index(":=") < item.index("=") + 1:
            key, _, raw = item.partition(":=")
            try:
                body[key] = json.loads(raw)
            except ValueError:
                raise ValueError(f"--param {item}: the value after := is not JSON") from None
        elif "=" in item:
            key, _, value = item.partition("=")
            body[key] = value
        else:
            raise ValueError(f"--param {item}: expected KEY=VALUE or KEY:=JSON")
        if not key:
            raise ValueError(f"--param {item}: empty key")
    if node is not None:
        body["node"] = node
    return {"correlation_id": str(uuid.uuid4()), "method": method, "params": body or None}


def cmd_call(args):
    try:
        request = build_call_request(args.method, args.node, args.param)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
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


def cmd_config_validate(args):
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    if not os.path.exists(config["config_path"]):
        print(f"{config['config_path']}: no such file; the defaults apply")
    print("OK")
    return 0


def render_config_yaml(raw):
    import yaml
    header = "# pulse-sensor-proxy configuration; README.md documents every key.\n"
    return header + yaml.safe_dump(raw, default_flow_style=False, sort_keys=False)


def cmd_config_merge(args):
    path = args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    try:
        raw = read_config_file(path)
        validate_config(raw, source=path)
        merged = merge_config(raw, args.add_subnet, args.add_peer_uids)
        validate_config(merged, source=path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
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
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    mode = stat.S_IMODE(info.st_mode) if info else 0o640
    try:
        atomic_write(path, text.encode(), mode=mode)
        if info and os.geteuid() == 0:
            os.chown(path, info.st_uid, info.st_gid)
    except OSError as exc:
        return fail(f"cannot write {path}: {exc.strerror or exc}")
    print(f"config: updated {path}")
    return 0


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
    call.set_defaults(func=cmd_call)

    config = sub.add_parser("config", help="validate or merge a config file")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = config_sub.add_parser("validate", help="print every problem, or OK")
    validate.add_argument("--config", help="config file to check")
    validate.set_defaults(func=cmd_config_validate)
    merge = config_sub.add_parser("merge", help="add subnets and read-only peer ranges")
    merge.add_argument("--config", help="config file to merge into")
    merge.add_argument("--add-subnet", action="append", default=[], metavar="CIDR")
    merge.add_argument("--add-peer-uids", action="append", default=[], metavar="LOW-HIGH")
    merge.add_argument("--write", action="store_true",
                       help="write the result (default: print it, change nothing)")
    merge.set_defaults(func=cmd_config_merge)

    demo = sub.add_parser("demo", help="run the daemon with every path under a local directory")
    demo.add_argument("--dir", default="demo-run", help="directory for socket, key and config "
                      "(default ./demo-run)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
