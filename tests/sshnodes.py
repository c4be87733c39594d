"""Real OpenSSH test nodes on loopback, for the SSH, keys and fault tests.

An `SshNode` is a private `sshd -D` on 127.0.0.1 (and optionally ::1) with its
own ed25519 host key, its own log and its own login account (`psp-nNN`, shell
/bin/sh, home under the base dir) standing in for root on a cluster node.  The
forced command in the node's authorized_keys is a stand-in for `sensors -j`
(`lab.script`; `sensors` also resolves to it through PATH, so the production
line `command="sensors -j"` works unchanged).  The test picks its behaviour at
any time with `node.set_mode(...)`:

    fixture NAME   print fixtures/sensors/NAME.json (or the file NAME if absolute), exit 0
    nosensors      what lm-sensors does without sensors: "{\\n\\n}\\n" on stdout,
                   "No sensors found!" on stderr, exit 1
    sleep SECONDS  print nothing for SECONDS (ends early once the session is gone),
                   then the default fixture
    hold           print nothing until the test sets another mode (or the session is
                   gone), then the default fixture
    huge BYTES     print BYTES NUL bytes, exit 0
    garbage        print sensors' plain-text output (not JSON), exit 0
    exit N         print nothing, exit N

Every run appends "EPOCH_SECONDS SSH_ORIGINAL_COMMAND" to the node's exec log.

Stand-ins for `smartctl` and `lsblk` sit on the same PATH, for the disk-temperature program:
`node.set_disks(lsblk_text, {"sda": (output, status)})` makes `lsblk -dn -o NAME,TYPE` print
`lsblk_text` and `smartctl ... /dev/sda` print `output` and exit with `status` (status
"hang": it prints nothing and sleeps until killed; "hold N": it waits for
`node.release_disks()`, then answers with exit status N); `node.smartctl_calls()` lists
the arguments of every smartctl run.

Node faults: `node.stop()`/`start()`, `restart()`, `rotate_host_key()`, and
`freeze()`/`thaw()` (SIGSTOP/SIGCONT of sshd and its sessions: connections are
accepted by the kernel, nothing answers).  A `NetNamespace` runs code in a private
network namespace where `black_hole(port)` drops that port's packets (iptables),
without touching the host's network.  Set before `start()`: `sftp_subsystem = False` (an
sshd without SFTP) and `mount_script` (shell run as root in the sshd's own mount namespace,
e.g. a read-only bind mount or a small full tmpfs over ~/.ssh; `in_namespace(path)` reads
through it).  `authorize_elsewhere(line)` puts a key in sshd's second AuthorizedKeysFile.

The accounts are a machine-wide pool under one base dir, leased with flock, so
concurrent test runs never share an account, home or node state.  A lease kills what
still runs as the account in this PID namespace (a killed run's leftovers), never a
container's process that has the same uid.  Needs root.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import fcntl
import hashlib
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_BASE = Path(os.environ.get("PSP_SSHNODES_BASE", "/tmp/psp-sshnodes"))
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "sensors"
DEFAULT_FIXTURE = "intel-coretemp-nvme"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
MAX_ACCOUNTS = 99
START_TIMEOUT = 15.0
MODES = {"fixture", "nosensors", "sleep", "hold", "huge", "garbage", "exit"}
LOOPBACK_SOURCES = "127.0.0.1,::1"

SCRIPT = """\
#!/bin/sh
# Stand-in for `sensors -j` on a test node (written by tests/sshnodes.py).
# The node's mode file picks the behaviour; every run is logged.
set -eu
state="@BASE@/nodes/${USER:?}"
fixtures="@BASE@/fixtures"
printf '%s %s\\n' "$(date +%s.%N)" "${SSH_ORIGINAL_COMMAND-}" >>"$state/exec.log"
read -r mode arg <"$state/mode"

print_fixture() {
    case $1 in
        /*) cat "$1" ;;
        *) cat "$fixtures/$1.json" ;;
    esac
}

# The session's sshd is the topmost ancestor running as this account (a
# `sh -c` wrapper may sit in between).  Prints nothing if the session is
# already over (the wrapper was orphaned); once it is gone, nobody listens.
session_pid() {
    pid=$$
    while :; do
        ppid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status")
        [ "$(stat -c %u "/proc/$ppid")" = "$(id -u)" ] || break
        pid=$ppid
    done
    case $(cat "/proc/$pid/comm") in
        sshd*) echo "$pid" ;;
    esac
}

now_ms() {
    date +%s%3N
}

sleep_while_session_alive() {
    session=$(session_pid)
    [ -n "$session" ] || exit 0
    end=$(awk -v now="$(now_ms)" -v s="$1" 'BEGIN { printf "%.0f", now + s * 1000 }')
    while [ "$(now_ms)" -lt "$end" ]; do
        kill -0 "$session" 2>/dev/null || exit 0
        sleep 0.1
    done
}

hold_while_session_alive() {
    session=$(session_pid)
    [ -n "$session" ] || exit 0
    while read -r current _ <"$state/mode" && [ "$current" = hold ]; do
        kill -0 "$session" 2>/dev/null || exit 0
        sleep 0.05
    done
}

case $mode in
    fixture) print_fixture "$arg" ;;
    nosensors)
        printf '{\\n\\n}\\n'
        echo 'No sensors found!' >&2
        exit 1 ;;
    sleep)
        sleep_while_session_alive "$arg"
        print_fixture @DEFAULT_FIXTURE@ ;;
    hold)
        hold_while_session_alive
        print_fixture @DEFAULT_FIXTURE@ ;;
    huge) head -c "$arg" /dev/zero ;;
    garbage)
        printf 'coretemp-isa-0000\\nAdapter: ISA adapter\\nPackage id 0:  +45.0 C  (high = +80.0 C)\\n' ;;
    exit) exit "$arg" ;;
    *)
        echo "sensors stand-in: unknown mode '$mode'" >&2
        exit 99 ;;
esac
"""

SMARTCTL_SCRIPT = """\
#!/bin/sh
# Stand-in for smartctl on a test node (written by tests/sshnodes.py): logs its arguments,
# then answers for the disk named by the last one as the node's smart/ files say.
state="@BASE@/nodes/${USER:?}/smart"
printf '%s\\n' "$*" >>"$state/calls.log"
for device; do :; done
disk=${device#/dev/}
[ -f "$state/$disk.status" ] || { echo "smartctl stand-in: no disk $device" >&2; exit 2; }
read -r status arg <"$state/$disk.status"
case $status in
    hang) exec sleep 600 ;;
    hold) while [ ! -e "$state/release" ]; do sleep 0.05; done; status=$arg ;;
esac
cat "$state/$disk.out"
exit "$status"
"""

LSBLK_SCRIPT = """\
#!/bin/sh
# Stand-in for lsblk on a test node (written by tests/sshnodes.py).
[ "$*" = "-dn -o NAME,TYPE" ] || { echo "lsblk stand-in: unexpected arguments: $*" >&2; exit 64; }
cat "@BASE@/nodes/${USER:?}/smart/lsblk" 2>/dev/null || true
"""


class NodeStartError(RuntimeError):
    """sshd did not come up; the message carries the tail of its log."""


def _run(*argv: str) -> None:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _write_if_changed(path: Path, data: bytes, mode: int) -> None:
    """Replace atomically, so a concurrent run never reads half a file."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _sshd_version() -> tuple[int, int]:
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True).stderr
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot tell the OpenSSH version from: {out!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Keypair:
    private_path: Path
    public_path: Path

    @property
    def public_line(self) -> str:
        """`ssh-ed25519 AAAA... comment` as ssh-keygen wrote it."""
        return self.public_path.read_text().strip()

    @property
    def fingerprint(self) -> str:
        """`SHA256:...` as `ssh-keygen -l` prints it."""
        blob = base64.b64decode(self.public_line.split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_keypair(directory: Path, comment: str = "pulse-sensor-proxy",
                 name: str = "id_ed25519") -> Keypair:
    """Generate an unencrypted ed25519 keypair with ssh-keygen."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    if private.exists():
        raise FileExistsError(private)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private))
    return Keypair(private, directory / f"{name}.pub")


def restricted_key_line(public_key: str, command: str, source: str = LOOPBACK_SOURCES) -> str:
    """A production-style restricted authorized_keys line (fixture helper only)."""
    key_type, blob = public_key.split()[:2]
    return (f'from="{source}",command="{command}",no-port-forwarding,no-X11-forwarding,'
            f"no-agent-forwarding,no-pty {key_type} {blob} pulse-sensor-proxy")


def ssh_command(node: SshNode, identity: Path, known_hosts: Path, *remote_command: str,
                host: str | None = None) -> list[str]:
    """argv for the system ssh client: no user config, no agent, strict host keys."""
    return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            "-i", str(identity), "-p", str(node.port), f"{node.user}@{host or node.host}", *remote_command]


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path
    state_dir: Path
    lease_fd: int


class SshLab:
    """The machine-wide base dir: sensors stand-in, fixtures, account pool.

    Layout: bin-<hash>/sensors, fixtures/*.json, home/<account>/ (the account's home),
    nodes/<account>/{mode,exec.log,sshd/}, locks/.  Creating it is idempotent.  Each
    version of the stand-in has its own bin-<hash>, so concurrent runs of different
    checkouts never overwrite each other's.
    """

    def __init__(self, base: Path = DEFAULT_BASE) -> None:
        if os.geteuid() != 0:
            raise PermissionError("SSH test nodes need root (sshd, useradd)")
        self.base = Path(base)
        self.script_text = (SCRIPT.replace("@BASE@", str(self.base))
                            .replace("@DEFAULT_FIXTURE@", DEFAULT_FIXTURE))
        self.stand_ins = {"sensors": self.script_text,
                          "smartctl": SMARTCTL_SCRIPT.replace("@BASE@", str(self.base)),
                          "lsblk": LSBLK_SCRIPT.replace("@BASE@", str(self.base))}
        digest = hashlib.sha256("".join(self.stand_ins.values()).encode()).hexdigest()[:12]
        self.bin_dir = self.base / f"bin-{digest}"
        self.script = self.bin_dir / "sensors"
        self.fixtures_dir = self.base / "fixtures"
        self.homes_dir = self.base / "home"
        self.nodes_dir = self.base / "nodes"
        self.locks_dir = self.base / "locks"
        self.sshd_version = _sshd_version()
        self._prepare()

    def _prepare(self) -> None:
        for d in (self.base, self.bin_dir, self.fixtures_dir, self.homes_dir,
                  self.nodes_dir, self.locks_dir, Path("/run/sshd")):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        for src in FIXTURES_DIR.glob("*.json"):
            _write_if_changed(self.fixtures_dir / src.name, src.read_bytes(), 0o644)
        for name, text in self.stand_ins.items():
            _write_if_changed(self.bin_dir / name, text.encode(), 0o755)

    def lease_account(self) -> Account:
        """Take the first account no other node (in any process) holds, reset to a clean state."""
        for i in range(1, MAX_ACCOUNTS + 1):
            name = f"psp-n{i:02d}"
            fd = os.open(self.locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                return self._reset_account(name, fd)
            except BaseException:
                os.close(fd)
                raise
        raise RuntimeError(f"all {MAX_ACCOUNTS} test accounts are in use")

    def _ensure_user(self, name: str, home: Path) -> pwd.struct_passwd:
        """Create or repair the account; serialised because useradd locks /etc/passwd."""
        with open(self.locks_dir / "accounts.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                # "*" rather than useradd's default "!": with UsePAM no, sshd refuses
                # accounts whose password field starts with "!" as locked.
                _run("useradd", "--user-group", "--no-create-home", "--home-dir", str(home),
                     "--shell", "/bin/sh", "--password", "*",
                     "--comment", "pulse-sensor-proxy test node", name)
                return pwd.getpwnam(name)
            if entry.pw_dir != str(home) or entry.pw_shell != "/bin/sh":
                _run("usermod", "--home", str(home), "--shell", "/bin/sh", name)
                entry = pwd.getpwnam(name)
            return entry

    def _reset_account(self, name: str, lease_fd: int) -> Account:
        home = self.homes_dir / name
        entry = self._ensure_user(name, home)
        uid, gid = entry.pw_uid, entry.pw_gid
        state = self.nodes_dir / name
        # Whatever still runs for this account (a killed run's sshd or stand-ins) is a leftover.
        _kill_and_wait(_pids_with_argument(str(state / "sshd" / "sshd_config")) + pids_of_uid(uid))
        for d in (home, state):
            shutil.rmtree(d, ignore_errors=True)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        for d in (home, home / ".ssh"):
            os.chown(d, uid, gid)
        home.chmod(0o755)
        (state / "sshd").mkdir(parents=True, mode=0o700)
        state.chmod(0o755)
        exec_log = state / "exec.log"
        exec_log.touch(mode=0o644)
        os.chown(exec_log, uid, gid)
        account = Account(name, uid, gid, home, state, lease_fd)
        _set_mode(account, "fixture", DEFAULT_FIXTURE)
        return account


def _set_mode(account: Account, mode: str, *args: object) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {sorted(MODES)})")
    line = " ".join([mode, *map(str, args)]) + "\n"
    tmp = account.state_dir / ".mode.tmp"
    tmp.write_text(line)
    tmp.chmod(0o644)
    os.replace(tmp, account.state_dir / "mode")


_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port(ipv6: bool = False) -> int:
    """A loopback port free on 127.0.0.1 (and ::1), never handed out twice by this process."""
    while True:
        with socket.socket(socket.AF_INET) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if ipv6:
            try:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
        with _ports_lock:
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def _pids_with_argument(argument: str) -> list[int]:
    """Processes whose command line (or title, which sshd rewrites) contains `argument`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if argument.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def pid_running(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL and poll until none is left running (zombies count as gone)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(pid_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL")
        time.sleep(0.01)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes running as uid in this PID namespace.

    Not those of a container, a booted system-test guest say: it shares this host's uids (no
    user namespace), so its own accounts may have a node account's uid, and a lease would
    kill their sessions."""
    own_namespace = os.readlink("/proc/self/ns/pid")
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
            if os.readlink(f"{entry.path}/ns/pid") != own_namespace:
                continue
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


class SshNode:
    """One private sshd with its own account, host key and log.  Use as a context manager."""

    host = "127.0.0.1"

    def __init__(self, lab: SshLab, ipv6: bool = False) -> None:
        self.lab = lab
        self.ipv6 = ipv6
        self.account = lab.lease_account()
        sshd_dir = self.account.state_dir / "sshd"
        self.config_path = sshd_dir / "sshd_config"
        self.host_key_path = sshd_dir / "ssh_host_ed25519_key"
        self.log_path = sshd_dir / "sshd.log"
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._port_chosen = False
        self._log_offset = 0
        # Node faults a test sets before start(): see the properties and launch() below.
        self.sftp_subsystem = True
        self.mount_script: str | None = None
        try:
            self._generate_host_key()
        except BaseException:
            self.close()
            raise

    # --- identity -------------------------------------------------------------
    @property
    def user(self) -> str:
        return self.account.name

    @property
    def uid(self) -> int:
        return self.account.uid

    @property
    def home(self) -> Path:
        return self.account.home

    @property
    def authorized_keys_path(self) -> Path:
        return self.account.home / ".ssh" / "authorized_keys"

    @property
    def second_keys_path(self) -> Path:
        """sshd's second AuthorizedKeysFile, outside the account's home and absent unless a test
        writes it: an admin key there keeps the admin's login while the test breaks
        authorized_keys itself (unreadable, a directory, a symlink loop)."""
        return self.account.state_dir / "second_authorized_keys"

    def authorize_elsewhere(self, line: str) -> None:
        path = self.second_keys_path
        path.write_text(line if line.endswith("\n") else line + "\n")
        path.chmod(0o644)

    def in_namespace(self, path: Path) -> Path:
        """`path` as this node's sshd sees it (its own mount namespace under mount_script)."""
        return Path(f"/proc/{self._proc.pid}/root") / Path(path).relative_to("/")

    @property
    def exec_log_path(self) -> Path:
        return self.account.state_dir / "exec.log"

    @property
    def host_public_key(self) -> str:
        """`ssh-ed25519 AAAA...` without a comment."""
        return " ".join(Path(f"{self.host_key_path}.pub").read_text().split()[:2])

    @property
    def host_key_line(self) -> str:
        """known_hosts line: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`."""
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    def known_hosts_text(self) -> str:
        """known_hosts lines for every address the node listens on."""
        hosts = [self.host] + (["::1"] if self.ipv6 else [])
        return "".join(f"[{h}]:{self.port} {self.host_public_key}\n" for h in hosts)

    def _generate_host_key(self) -> None:
        for path in (self.host_key_path, Path(f"{self.host_key_path}.pub")):
            path.unlink(missing_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.user}-host",
             "-f", str(self.host_key_path))

    # --- authorized_keys and the sensors stand-in ---------------------------
    def write_authorized_keys(self, text: str) -> None:
        path = self.authorized_keys_path
        path.write_text(text)
        os.chown(path, self.uid, self.account.gid)
        path.chmod(0o600)

    def authorize(self, public_key: str, source: str = LOOPBACK_SOURCES) -> str:
        """Append a restricted line forcing the sensors stand-in; returns the line."""
        line = restricted_key_line(public_key, str(self.lab.script), source)
        existing = self.authorized_keys_path.read_text() if self.authorized_keys_path.exists() else ""
        self.write_authorized_keys(existing + line + "\n")
        return line

    def set_mode(self, mode: str, *args: object) -> None:
        """Change what the sensors stand-in does from the next run on (see module doc)."""
        _set_mode(self.account, mode, *args)

    def set_disks(self, lsblk_text: str, disks: dict[str, tuple[str, int | str]]) -> None:
        """What the lsblk and smartctl stand-ins answer from now on (see module doc)."""
        smart = self.account.state_dir / "smart"
        smart.mkdir(mode=0o755, exist_ok=True)
        (smart / "lsblk").write_text(lsblk_text)
        for name, (output, status) in disks.items():
            (smart / f"{name}.out").write_text(output)
            (smart / f"{name}.status").write_text(f"{status}\n")
        (smart / "release").unlink(missing_ok=True)
        calls = smart / "calls.log"
        calls.touch(mode=0o644)
        os.chown(calls, self.uid, self.account.gid)

    def release_disks(self) -> None:
        """Let every held smartctl stand-in answer."""
        (self.account.state_dir / "smart" / "release").touch()

    def smartctl_calls(self) -> list[str]:
        """The arguments of every smartctl stand-in run, oldest first."""
        path = self.account.state_dir / "smart" / "calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def execs(self) -> list[str]:
        """SSH_ORIGINAL_COMMAND of every run of the stand-in, oldest first ("" if none)."""
        lines = self.exec_log_path.read_text().splitlines()
        return [line.partition(" ")[2] for line in lines]

    def exec_count(self) -> int:
        return len(self.execs())

    def accepted_publickey_count(self) -> int:
        """Successful public-key logins since the node was created (across restarts)."""
        if not self.log_path.exists():
            return 0
        marker = f"Accepted publickey for {self.user} "
        return sum(marker in line for line in self.log_path.read_text(errors="replace").splitlines())

    def session_pids(self) -> list[int]:
        """Processes running as the node's account (sessions, the stand-in and its children)."""
        return pids_of_uid(self.uid)

    # --- lifecycle ------------------------------------------------------------
    def _write_config(self) -> None:
        listen = [f"ListenAddress {self.host}:{self.port}"]
        if self.ipv6:
            listen.append(f"ListenAddress [::1]:{self.port}")
        path_env = f"PATH={self.lab.bin_dir}:/usr/local/bin:/usr/bin:/bin"
        lines = [
            *listen,
            f"HostKey {self.host_key_path}",
            "PidFile none",
            "LogLevel VERBOSE",
            f"AllowUsers {self.user}",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin no",
            "StrictModes no",
            f"AuthorizedKeysFile .ssh/authorized_keys {self.second_keys_path}",
            "MaxStartups 256",
            "MaxSessions 64",
            "LoginGraceTime 30",
            "UseDNS no",
            "PrintMotd no",
            f"SetEnv {path_env}",
        ]
        if self.sftp_subsystem:
            lines.append(f"Subsystem sftp {SFTP_SERVER}")
        if self.lab.sshd_version >= (9, 8):
            # Loopback tests make many failed and unauthenticated connections on purpose.
            lines.append("PerSourcePenalties no")
        self.config_path.write_text("\n".join(lines) + "\n")

    def launch(self) -> None:
        """Start sshd without waiting; pair with wait_ready()."""
        if self._proc is not None:
            raise RuntimeError(f"{self.user}: sshd already running")
        self._port_chosen = self.port is None
        if self._port_chosen:
            self.port = free_port(self.ipv6)
        self._write_config()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            argv = [SSHD, "-D", "-e", "-f", str(self.config_path)]
            if self.mount_script:
                # The node's own mount namespace (a read-only or full file system there), set
                # up by the shell that then becomes sshd: the mounts go with its last process.
                argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-euc",
                        self.mount_script + '\nexec "$@"', "sh", *argv]
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _new_log(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def _listening(self) -> bool:
        log = self._new_log()
        hosts = [self.host] + (["::1"] if self.ipv6 else [])
        return all(f"Server listening on {h} port {self.port}." in log for h in hosts)

    def _speaks_ssh(self, deadline: float) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=max(deadline - time.monotonic(), 0.1)) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def wait_ready(self, deadline: float) -> None:
        """Poll until this sshd logged its listeners and answers with an SSH banner.

        A port this node picked itself and lost to another process is replaced.
        """
        while True:
            if self._proc.poll() is not None:
                log = self._new_log()
                self._proc = None
                if self._port_chosen and "Address already in use" in log:
                    self.port = None
                    self.launch()
                    continue
                raise NodeStartError(f"{self.user}: sshd exited on port {self.port}:\n{log[-2000:]}")
            if self._listening() and self._speaks_ssh(deadline):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise NodeStartError(f"{self.user}: sshd not ready on port {self.port}:\n{self._new_log()[-2000:]}")
            time.sleep(0.005)

    def start(self, timeout: float = START_TIMEOUT) -> SshNode:
        """Start sshd (on a free port the first time) and wait until it answers."""
        self.launch()
        self.wait_ready(time.monotonic() + timeout)
        return self

    def stop(self) -> None:
        """Stop sshd and every process it spawned (open sessions included); reaps sshd."""
        if self._proc is None:
            return
        self.thaw()                     # a frozen sshd would not act on SIGTERM
        proc, self._proc = self._proc, None
        spawned = _descendants(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _kill_and_wait(spawned)

    def freeze(self) -> None:
        """SIGSTOP sshd and its sessions: the kernel still completes TCP handshakes, but no
        byte comes back (a hung host); open connections stall too."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        if self._proc is None:
            raise RuntimeError(f"{self.user}: sshd is not running")
        os.kill(self._proc.pid, signum)        # first, so it forks no session meanwhile
        for pid in _descendants(self._proc.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def restart(self) -> None:
        """Same port, same host key."""
        self.stop()
        self.start()

    def rotate_host_key(self) -> None:
        """New host key, then restart on the same port."""
        self.stop()
        self._generate_host_key()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop and give the account back to the pool."""
        self.stop()
        if self.account.lease_fd >= 0:
            os.close(self.account.lease_fd)
            self.account = replace(self.account, lease_fd=-1)

    def __enter__(self) -> SshNode:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SshNode {self.user} {self.host}:{self.port}>"


class NodeSet:
    """Start `count` nodes at once (launch all, then wait for all) and stop them all."""

    def __init__(self, lab: SshLab, count: int, ipv6: bool = False) -> None:
        self.lab = lab
        self.count = count
        self.ipv6 = ipv6
        self.nodes: list[SshNode] = []

    def start(self, timeout: float = START_TIMEOUT) -> list[SshNode]:
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                self.nodes = list(pool.map(lambda _: SshNode(self.lab, self.ipv6), range(self.count)))
            for node in self.nodes:
                node.launch()
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                node.wait_ready(deadline)
        except BaseException:
            self.close()
            raise
        return self.nodes

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> list[SshNode]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tarpit:
    """A loopback TCP listener that accepts and never speaks.

    With `banner` it sends that (e.g. a valid SSH banner) right after accepting
    and then stalls, like an sshd that hangs before key exchange.
    """

    def __init__(self, host: str = "127.0.0.1", banner: bytes | None = None) -> None:
        self.host = host
        self.banner = banner
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._cond = threading.Condition()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=f"tarpit-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            conn, _ = self._listener.accept()
            if self.banner:
                conn.sendall(self.banner)
            with self._cond:
                self._accepted.append(conn)
                self._cond.notify_all()

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._cond:
            return len(self._accepted)

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._accepted) >= count, timeout)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self) -> Tarpit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLONE_NEWNET = 0x40000000


def _libc(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


class NetNamespace:
    """A private network namespace with only its own loopback, entered per thread.

    `ns.run(fn, *args)` calls fn in a new thread inside the namespace: the sockets it opens,
    the threads it starts and the processes it spawns (sshd nodes, the daemon, iptables) all
    live there, while Unix sockets and files stay shared. Nothing changes in the host's
    namespace; this one goes away with its last process after close().
    """

    def __init__(self) -> None:
        self._fd = -1
        created: list[int] = []

        def create() -> None:
            _libc("unshare", CLONE_NEWNET)
            created.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            _run("ip", "link", "set", "lo", "up")

        self._call_in_thread(create)
        self._fd = created[0]

    @staticmethod
    def _call_in_thread(fn, *args):
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as exc:  # re-raised in the caller
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="netns")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def run(self, fn, *args):
        """fn(*args) inside the namespace; returns its result or raises its exception."""
        def inside():
            _libc("setns", self._fd, CLONE_NEWNET)
            return fn(*args)
        return self._call_in_thread(inside)

    def iptables(self, *rule: str) -> None:
        self.run(_run, "iptables", "-w", *rule)

    def black_hole(self, port: int) -> None:
        """Drop every TCP packet to and from `port` on loopback, handshakes and open
        connections alike: a host that vanished from the network, not one that refuses."""
        for direction in ("--dport", "--sport"):
            self.iptables("-I", "INPUT", "-i", "lo", "-p", "tcp", direction, str(port), "-j", "DROP")

    def lift_black_hole(self, port: int) -> None:
        for direction in ("--dport", "--sport"):
            self.iptables("-D", "INPUT", "-i", "lo", "-p", "tcp", direction, str(port), "-j", "DROP")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
