"""A booted Debian 12 with systemd under systemd-nspawn, driven with nsenter.

The guest stands in for host "pve1" of a 3-node Proxmox cluster. pve1 is the guest itself:
its temperatures are read locally and its root's ~/.ssh/authorized_keys links into
/etc/pve/priv, as on Proxmox. pve2 and pve3 each have their own host keys (RSA and Ed25519, as
a Debian install makes them) and answer two ways, both with root's key authorized, unrestricted,
like Proxmox's root-to-root SSH:
- as a cluster member: root on port 22 of the node's own address (NODE_ADDRESSES), in the
  node's own network namespace behind the bridge vmbr0, with the node's own /root
  (/srv/nodes/<node>/root bound there), the way `.members` alone lets a client reach it;
- for configs that name each node (`nodes:`): an sshd on ADDRESS:2202-2203 with an account
  of the node's name standing in for root.
`sensors` answers with a different sample per node. /etc/pve holds the cluster's files, and
pct/pvecm are the stand-ins from tests/fixtures/pve/bin. The guest has its own network
namespace: loopback and vmbr0 (a bridge, as on Proxmox) with ADDRESS, the host's address the
nodes see.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pct_container import make_container
from rootfs import cached_rootfs, fresh_copy

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests/fixtures"
ADDRESS = "10.99.0.1"
LOCAL_NODE = "pve1"
# name -> (sensors sample, sshd port; None for this host, whose sensors are read locally)
NODES = {"pve1": ("intel-coretemp-nvme.json", None), "pve2": ("amd-k10temp-gpu.json", 2202),
         "pve3": ("no-sensors.json", 2203)}
REMOTE_NODES = {name: port for name, (_, port) in NODES.items() if port}
# The file holding each node's root authorized_keys (for the account on ADDRESS:port).
NODE_KEY_FILES = {"pve1": "/etc/pve/priv/authorized_keys",
                  **{name: f"/home/{name}/.ssh/authorized_keys" for name in REMOTE_NODES}}
# The accounts' uids. The guest shares this host's uids (no user namespace): these stay clear
# of useradd's next free ones (1000 up), which tests/sshnodes.py's accounts get on this host.
NODE_UIDS = {"pve2": 4502, "pve3": 4503}
# Each node's address in .members, where its root answers on port 22.
NODE_ADDRESSES = {"pve1": ADDRESS, "pve2": "10.99.0.2", "pve3": "10.99.0.3"}
NODE_PREFIX = 24


def node_root_home(name):
    """Where the /root of a node's port-22 sshd lives in the guest's own tree."""
    return f"/srv/nodes/{name}/root"


# The file holding each node's root authorized_keys (for root on NODE_ADDRESSES port 22).
ROOT_KEY_FILES = {"pve1": NODE_KEY_FILES["pve1"],
                  **{name: f"{node_root_home(name)}/.ssh/authorized_keys" for name in REMOTE_NODES}}
GUEST_PYZ = "/root/pulse-sensor-proxy.pyz"
GUEST_INSTALLER = "/root/install-sensor-proxy.sh"
GUEST_PACKAGES = ("procps", "iproute2")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_SECONDS = 120


def artefact():
    """The binary under test: the pyz that ./build_zipapp.sh builds."""
    pyz = REPO / "dist/pulse-sensor-proxy-x86_64.pyz"
    subprocess.run([str(REPO / "build_zipapp.sh"), "--arch", "x86_64"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return pyz


@contextlib.contextmanager
def booted_guest(setup=None):
    """A fresh guest, prepared and booted, with the installer and the pyz under test in /root.

    SETUP(guest), if given, adds what one test module needs before the boot (configs,
    containers). The guest is powered off and its tree removed on exit.
    """
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: ./dev.sh setup installs it")
    binary = artefact()
    workdir = Path(tempfile.mkdtemp(prefix="pulse-guest-", dir="/var/tmp"))
    root = workdir / "root"
    root.mkdir()
    fresh_copy(cached_rootfs(GUEST_PACKAGES), root)
    with open(workdir / "console.log", "w") as log:
        machine = Guest(root, log)
        try:
            machine.prepare()
            shutil.copy(REPO / "install-sensor-proxy.sh", machine.path(GUEST_INSTALLER))
            shutil.copy(binary, machine.path(GUEST_PYZ))
            if setup is not None:
                setup(machine)
            machine.boot()
            yield machine
        finally:
            machine.poweroff()
            shutil.rmtree(workdir, ignore_errors=True)


class Guest:
    def __init__(self, root, log):
        self.root = Path(root)
        self.log = log
        self.nspawn = None
        self.pid = None
        self.node_addresses = dict(NODE_ADDRESSES)
        self.root_nodes = []          # the nodes add_node made, whose sshd the boot waits for

    # ---------------------------------------------------------------- running commands
    def run(self, command, check=True, timeout=180):
        """Run a bash command as root inside the booted guest; returns the CompletedProcess."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--", "env", "-i", f"PATH={GUEST_PATH}",
             "HOME=/root", "LANG=C.UTF-8", "bash", "-c", command],
            capture_output=True, text=True, timeout=timeout)
        if "install-sensor-proxy.sh" in command:
            # every installer run: a Python traceback in its output is a defect, whatever it did
            assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"guest command failed ({result.returncode}): {command}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def out(self, command):
        return self.run(command).stdout

    def path(self, guest_path):
        return self.root / guest_path.lstrip("/")

    # ---------------------------------------------------------------- set up before boot
    def chroot(self, *command):
        subprocess.run(["chroot", str(self.root), *command], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def write(self, guest_path, text, mode=0o644):
        path = self.path(guest_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def prepare(self):
        for tool in ("pct", "pvecm"):
            shutil.copy(FIXTURES / "pve/bin" / tool, self.path(f"/usr/local/sbin/{tool}"))
        samples = self.path("/usr/local/share/sensors")
        shutil.copytree(FIXTURES / "sensors", samples)
        self.write("/usr/local/bin/sensors", SENSORS, 0o755)
        shutil.copytree(FIXTURES / "smart", self.path("/usr/local/share/smart"))
        self.write("/usr/local/bin/smartctl", SMARTCTL, 0o755)
        self.write("/usr/local/bin/lsblk", LSBLK, 0o755)
        self.write("/etc/hostname", "pve1\n")
        self.chroot("systemctl", "mask", "ssh.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                    "e2scrub_reap.service")
        self.write("/etc/systemd/system/vmbr0.service",
                   VMBR0_UNIT.format(address=ADDRESS, prefix=NODE_PREFIX))
        self.chroot("systemctl", "enable", "vmbr0.service")
        self.prepare_root_identity()
        # The daemon reads this host's sensors itself, as its service account.
        self.write("/etc/sensors-sample-pulse-sensor-proxy", NODES[LOCAL_NODE][0] + "\n")
        for name, port in REMOTE_NODES.items():
            self.prepare_node(name, NODES[name][0], port)
        self.prepare_pve()

    def prepare_root_identity(self):
        ssh = self.path("/root/.ssh")
        ssh.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@pve1",
                        "-f", str(ssh / "id_ed25519")], check=True)

    def prepare_node(self, name, sample, port):
        """A remote node: its root on its own address (add_node), and an account of its name
        on ADDRESS:port."""
        self.add_node(name, sample, NODE_ADDRESSES[name])
        account = name
        # "*": no password, yet not locked (sshd refuses locked accounts without PAM).
        self.chroot("useradd", "--create-home", "--shell", "/bin/sh", "--password", "*",
                    "--uid", str(NODE_UIDS[name]), account)
        self.write(f"/etc/ssh/nodes/{name}/sshd_config", SSHD_CONFIG.format(
            port=port, name=name, account=account, address=ADDRESS, pid=name))
        self.write(f"/etc/systemd/system/sshd-{name}.service", SSHD_UNIT.format(name=name))
        self.chroot("systemctl", "enable", f"sshd-{name}.service")
        self.write(f"/etc/sensors-sample-{account}", sample + "\n")
        self.authorize_root(f"/home/{account}", account)

    def add_node(self, name, sample, address):
        """A node reachable as Proxmox's are: root on port 22 of ADDRESS (in vmbr0's subnet), in
        the node's own network namespace, with /root of its own holding the authorized_keys and
        the sensors sample. Not yet a cluster member: see members()."""
        keys = self.path(f"/etc/ssh/nodes/{name}")
        keys.mkdir(parents=True)
        for key_type in ("rsa", "ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", name,
                            "-f", str(keys / f"ssh_host_{key_type}_key")], check=True)
        self.write(f"/etc/ssh/nodes/{name}/sshd_config_root", SSHD_CONFIG.format(
            port=22, name=name, account="root", address=address, pid=f"{name}-root"))
        self.write(f"/etc/systemd/system/netns-{name}.service", NETNS_UNIT.format(
            name=name, address=address, prefix=NODE_PREFIX))
        self.write(f"/etc/systemd/system/sshd-{name}-root.service",
                   SSHD_ROOT_UNIT.format(name=name, address=address, home=node_root_home(name)))
        self.chroot("systemctl", "enable", f"sshd-{name}-root.service")
        home = node_root_home(name)
        self.write(f"{home}/.sensors-sample", sample + "\n")
        self.path(home).chmod(0o700)
        self.authorize_root(home, "root")
        self.node_addresses[name] = address
        self.root_nodes.append(name)

    def authorize_root(self, home, account):
        """This host's root key in HOME's authorized_keys, as Proxmox's root-to-root SSH has it."""
        root_key = self.path("/root/.ssh/id_ed25519.pub").read_text()
        self.write(f"{home}/.ssh/authorized_keys", root_key, 0o600)
        self.path(f"{home}/.ssh").chmod(0o700)
        self.chroot("chown", "-R", f"{account}:{account}", home)

    def prepare_pve(self):
        # As pmxcfs serves them (src/pmxcfs/pmxcfs.c): .members 0440, every file group
        # www-data, priv/ root only.
        self.members(NODES)
        for name in REMOTE_NODES:
            self.publish_host_key(name)
        # The older merged file (PVE/Cluster/Setup.pm ssh_merge_known_hosts): each node's RSA
        # key under its name and its address; our pins for the ports the accounts use.
        known = "".join(
            f"{name} {self.host_key(name)}\n{NODE_ADDRESSES[name]} {self.host_key(name)}\n"
            f"[{ADDRESS}]:{port} {self.host_key(name)}\n"
            for name, port in REMOTE_NODES.items())
        self.write("/etc/pve/priv/known_hosts", known, 0o600)
        root_key = self.path("/root/.ssh/id_ed25519.pub").read_text()
        self.write(NODE_KEY_FILES[LOCAL_NODE], root_key, 0o600)
        self.path("/etc/pve/priv").chmod(0o700)
        self.path("/root/.ssh/authorized_keys").symlink_to(NODE_KEY_FILES[LOCAL_NODE])

    def members(self, names, version=7):
        """/etc/pve/.members listing NAMES (at their NODE_ADDRESSES or add_node addresses),
        replaced in one step as pmxcfs serves each read whole: 0440 root:www-data."""
        nodelist = {name: {"id": number, "online": 1, "ip": self.node_addresses[name]}
                    for number, name in enumerate(names, start=1)}
        text = json.dumps({"nodename": LOCAL_NODE, "version": version,
                           "cluster": {"name": "lab", "version": 3, "nodes": len(nodelist),
                                       "quorate": 1},
                           "nodelist": nodelist}, indent=1) + "\n"
        self.write("/etc/pve/.members.new", text, 0o440)
        self.chroot("chown", "root:www-data", "/etc/pve/.members.new")
        os.replace(self.path("/etc/pve/.members.new"), self.path("/etc/pve/.members"))

    def publish_host_key(self, name):
        """nodes/<node>/ssh_known_hosts as pve-cluster writes it when a node joins
        (PVE/Cluster/Setup.pm ssh_create_node_known_hosts): one line, the node's RSA key,
        no final newline; 0640 root:www-data like every pmxcfs file."""
        self.write(f"/etc/pve/nodes/{name}/ssh_known_hosts", f"{name} {self.host_key(name)}", 0o640)
        self.chroot("chown", "-R", "root:www-data", "/etc/pve/nodes")

    def host_key(self, name):
        """The node's RSA host key, `ssh-rsa AAAA...`: the one key the cluster records."""
        text = self.path(f"/etc/ssh/nodes/{name}/ssh_host_rsa_key.pub").read_text().split()
        return f"{text[0]} {text[1]}"

    def add_container(self, ctid, conf_text, running=True):
        """An LXC container for the pct stand-in: its config plus a skeleton rootfs whose files
        belong to the container's root (host uid 100000 unless its idmap says otherwise)."""
        return make_container(self.path(f"/etc/pve/lxc/{ctid}.conf"),
                              self.path(f"/var/lib/pct-shim/{ctid}"), conf_text, running)

    # ---------------------------------------------------------------- boot and power off
    def boot(self):
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--private-network",
             "--console=read-only", "-D", str(self.root), "-b"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + BOOT_SECONDS
        while self.pid is None:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("systemd-nspawn did not start the guest; see its log")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            self.pid = int(pids[0]) if pids else None
            time.sleep(0.1)
        # systemctl answers once the guest's systemd has its bus, then waits for the boot to end.
        while True:
            state = self.run(f"timeout {BOOT_SECONDS} systemctl is-system-running --wait", check=False)
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline or "Failed to connect to bus" not in state.stderr:
                raise RuntimeError(f"guest did not finish booting: {state.stdout}{state.stderr}")
            time.sleep(0.1)
        units = [f"sshd-{name}" for name in REMOTE_NODES] + [f"sshd-{name}-root" for name in self.root_nodes]
        self.run(" && ".join(f"systemctl is-active --quiet {unit}" for unit in units))

    def poweroff(self):
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: poweroff
        try:
            self.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait()


SENSORS = """#!/bin/sh
# lm-sensors stand-in on the test nodes: each node prints its own sample, named in the home of
# a node's root or, for the accounts, in /etc/sensors-sample-<account>.
name=$(cat "${HOME:-/nonexistent}/.sensors-sample" 2>/dev/null ||
       cat /etc/sensors-sample-"$(id -un)" 2>/dev/null || echo no-sensors.json)
sample=/usr/local/share/sensors/$name
cat "$sample"
if [ "${sample##*/}" = no-sensors.json ]; then echo "No sensors found!" >&2; exit 1; fi
"""

# smartctl and lsblk stand-ins (first on every PATH here): two disks, sda a SATA disk that
# answers, sdb a drive in standby; a call without -n standby is refused (it would wake sdb).
# The daemon's account opens no disk, as under the real unit (no capabilities, a private
# /dev): smartctl's JSON answer to a failed open, exit status 2 (smartctl.8: bit 1).
SMARTCTL = """#!/bin/sh
case " $* " in *" -n standby "*) ;; *) echo "smartctl stand-in: no -n standby" >&2; exit 1 ;; esac
for device; do :; done
if [ "$(id -un)" = pulse-sensor-proxy ]; then
    printf '{"smartctl": {"exit_status": 2, "messages": [{"string": "Smartctl open device: %s failed: Permission denied", "severity": "error"}]}, "device": {"name": "%s"}}\\n' "$device" "$device"
    exit 2
fi
case $device in
    /dev/sda) grep -v '^#' /usr/local/share/smart/sata-temperature-current.out ;;
    /dev/sdb) grep -v '^#' /usr/local/share/smart/standby.out; exit 2 ;;
    *) echo "smartctl stand-in: no disk $device" >&2; exit 2 ;;
esac
"""

LSBLK = """#!/bin/sh
printf 'sda  disk\\nsdb  disk\\nsr0  rom\\n'
"""
GUEST_DISKS = [("/dev/sda", 24, False), ("/dev/sdb", None, True)]

SSHD_CONFIG = """Port {port}
ListenAddress {address}
HostKey /etc/ssh/nodes/{name}/ssh_host_rsa_key
HostKey /etc/ssh/nodes/{name}/ssh_host_ed25519_key
PidFile /run/sshd-{pid}.pid
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers {account}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
SetEnv PATH=/usr/local/bin:/usr/bin:/bin
"""

VMBR0_UNIT = """[Unit]
Description=The host's network: the bridge vmbr0 with {address}
DefaultDependencies=no
Before=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip link add vmbr0 type bridge
ExecStart=/usr/sbin/ip addr add {address}/{prefix} dev vmbr0
ExecStart=/usr/sbin/ip link set vmbr0 up

[Install]
WantedBy=network.target
"""

# A node's own network: a namespace with ADDRESS, its link a port of vmbr0, so this host
# reaches it from its own address, as it reaches a real node.
NETNS_UNIT = """[Unit]
Description=The network of test node {name}: {address} behind vmbr0
Requires=vmbr0.service
After=vmbr0.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip netns add {name}
ExecStart=/usr/sbin/ip link add veth-{name} type veth peer name eth0 netns {name}
ExecStart=/usr/sbin/ip link set veth-{name} master vmbr0 up
ExecStart=/usr/sbin/ip -n {name} addr add {address}/{prefix} dev eth0
ExecStart=/usr/sbin/ip -n {name} link set eth0 up
ExecStart=/usr/sbin/ip -n {name} link set lo up
"""

SSHD_UNIT = """[Unit]
Description=sshd of test node {name}
Requires=vmbr0.service
After=vmbr0.service

[Service]
ExecStart=/usr/sbin/sshd -D -f /etc/ssh/nodes/{name}/sshd_config
ExecStartPre=/bin/mkdir -p -m 0755 /run/sshd

[Install]
WantedBy=multi-user.target
"""

SSHD_ROOT_UNIT = """[Unit]
Description=sshd of test node {name} as the cluster lists it: root on {address}:22
Requires=netns-{name}.service
After=netns-{name}.service

[Service]
NetworkNamespacePath=/run/netns/{name}
BindPaths={home}:/root
ExecStart=/usr/sbin/sshd -D -f /etc/ssh/nodes/{name}/sshd_config_root
ExecStartPre=/bin/mkdir -p -m 0755 /run/sshd

[Install]
WantedBy=multi-user.target
"""
