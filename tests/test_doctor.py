"""`doctor` against the real parts: real sshd nodes, the daemon's real socket and key files.

Each test breaks one link and expects doctor to name exactly that link, its target and the
fix, with nothing else failing; one listing with hashes shows it changes nothing.
"""
import hashlib
import json
import os
from pathlib import Path

import pytest

import pulse_sensor_proxy as psp
from conftest import Lab, free_port
from pct_container import make_container
from test_https import https  # noqa: F401  (a fixture)
from test_installer import PULSE_UNIT

PVE_BIN = Path(__file__).resolve().parent / "fixtures/pve/bin"
SMART = Path(__file__).resolve().parent / "fixtures/smart"
# smartctl's outputs as the stand-in prints them (the fixtures' `#` lines are their citation)
SATA_OUT, STANDBY_OUT = ("".join(line for line in (SMART / name).read_text().splitlines(True)
                                 if not line.startswith("#"))
                         for name in ("sata-temperature-current.out", "standby.out"))


def doctor(lab, *args):
    """(exit status, findings) of `doctor --json` as root against the lab's config."""
    out = lab.cli("doctor", "--json", *args)
    assert out.stderr == "", out.stderr
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()]


def failures(findings):
    return [(f["check"], f["target"]) for f in findings if f["status"] == "FAIL"]


def only_failure(lab, check, target):
    """The one FAIL doctor reports, asserted to be CHECK on TARGET, with exit status 1."""
    status, findings = doctor(lab)
    assert failures(findings) == [(check, target)], findings
    assert status == 1
    return next(f for f in findings if f["status"] == "FAIL")


def listing(*roots):
    """Every file and directory under ROOTS: path, mode, owner, mtime and content hash."""
    entries = {}
    for root in map(Path, roots):
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            entries[str(path)] = (info.st_mode, info.st_uid, info.st_mtime_ns, digest)
    return entries


@pytest.fixture
def healthy(lab):
    """Three nodes with the proxy's key pushed and their host keys pinned."""
    return lab(3)


def test_a_healthy_setup_is_all_ok_but_the_missing_unit(healthy):
    status, findings = doctor(healthy)
    assert status == 0, findings
    assert [(f["check"], f["status"]) for f in findings if f["status"] != "ok"] == \
        [("service", "warn")]
    assert set(findings[0]) == {"check", "target", "status", "detail", "fix"}
    for name in ("n1", "n2", "n3"):
        sensors = next(f for f in findings if f["check"] == "sensors" and f["target"] == name)
        assert "coretemp" in sensors["detail"]


def test_text_output_has_a_line_per_check_the_fix_and_a_summary(healthy):
    healthy.nodes[1].write_authorized_keys(healthy.admin_line())
    out = healthy.cli("doctor")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("FAIL ")]
    assert len(failed) == 1 and " n2: " in lines[failed[0]]
    assert lines[failed[0] + 1].strip() == "fix: pulse-sensor-proxy keys push --node n2"
    assert lines[-1].startswith("doctor: ") and lines[-1].endswith(" ok, 1 warn, 1 FAIL")


def test_the_key_missing_on_one_of_three_nodes(healthy):
    healthy.nodes[1].write_authorized_keys(healthy.admin_line())
    failed = only_failure(healthy, "node-key", "n2")
    assert "permission denied" in failed["detail"]
    assert failed["detail"].endswith("; the proxy's key is not in .ssh/authorized_keys")
    assert failed["fix"] == "pulse-sensor-proxy keys push --node n2"


def test_a_key_line_whose_from_does_not_cover_this_host(healthy):
    node = healthy.nodes[2]
    node.write_authorized_keys(healthy.admin_line())
    node.authorize(healthy.current_public(), source="10.9.9.0/24,!127.0.0.1,127.0.0.*")
    failed = only_failure(healthy, "node-key", "n3")
    assert failed["detail"].endswith("; the from= of its line in .ssh/authorized_keys does not "
                                     "cover this host's address 127.0.0.1")
    assert failed["fix"] == (f"pulse-sensor-proxy config merge --config "
                             f"{healthy.daemon.config_path} --add-subnet 127.0.0.1/32 --write && "
                             "pulse-sensor-proxy keys push --node n3")


@pytest.mark.parametrize("options, address, admitted", [
    ('from="127.0.0.1",command="sensors -j"', "127.0.0.1", True),
    ('command="sensors -j",from="10.0.0.0/8"', "10.1.2.3", True),
    ('from="10.0.0.0/8"', "192.168.1.5", False),
    ('from="192.168.1.*,!192.168.1.7"', "192.168.1.7", False),
    ('from="192.168.1.*,!192.168.1.7"', "192.168.1.8", True),
    ('restrict', "192.168.1.8", True),
    ('from="fd00::/8"', "fd00::1", True),
])
def test_from_covers(options, address, admitted):
    assert psp.from_covers(options, address) is admitted


def test_a_key_line_without_the_forced_command(healthy):
    node = healthy.nodes[0]
    node.write_authorized_keys(healthy.admin_line() + healthy.current_public() + "\n")
    failed = only_failure(healthy, "node-key", "n1")
    assert "does not force `sensors -j`" in failed["detail"]
    assert failed["fix"] == "pulse-sensor-proxy keys push --node n1"


def warnings(findings):
    return [(f["check"], f["target"], f["detail"], f["fix"]) for f in findings
            if f["status"] == "warn" and f["check"] != "service"]


@pytest.fixture
def with_disks(lab):
    """Three nodes as `healthy`, the key lines forcing the disk-temperature program."""
    return lab(3, disk_temperatures=True)


def test_smartctl_missing_on_a_node_is_a_warning_with_the_fix(with_disks):
    # 127: what `timeout` exits with when it finds no smartctl (coreutils timeout(1))
    with_disks.nodes[1].set_disks("sda disk\n", {"sda": ("", 127)})
    with_disks.nodes[2].set_disks("sda disk\nsdb disk\n", {"sda": (SATA_OUT, 0), "sdb": (STANDBY_OUT, 2)})
    status, findings = doctor(with_disks)
    assert status == 0 and failures(findings) == []
    assert warnings(findings) == [("smart", "n2", "smartctl is not installed: no disk temperatures",
                                   "on n2: apt install smartmontools")]
    smart = {f["target"]: f["detail"] for f in findings if f["check"] == "smart"}
    assert smart == {"n1": "no physical disks", "n2": "smartctl is not installed: no disk "
                     "temperatures", "n3": "2 disks (1 in standby, not woken)"}


def test_a_key_line_from_before_disk_temperatures(with_disks):
    public = with_disks.current_public()
    old = psp.authorized_keys_line(public, ["127.0.0.1", "::1"], disk_temperatures=False)
    with_disks.nodes[2].write_authorized_keys(with_disks.admin_line() + old + "\n")
    status, findings = doctor(with_disks)
    assert status == 0 and failures(findings) == []
    assert warnings(findings) == [("smart", "n3", psp.E_OLD_KEY_LINE,
                                   "pulse-sensor-proxy keys push --node n3")]


def test_this_hosts_smart_file_as_the_root_service_left_it(tmp_path):
    here = psp.Node("pve1", local=True)
    stored = tmp_path / "smart" / "local"
    config = psp.validate_config({"local_smart_file": str(stored)})
    fix = ("systemctl enable --now pulse-sensor-proxy-smart.timer && "
           "systemctl start pulse-sensor-proxy-smart.service")
    now = 1796300000.0

    def judged(unit_installed=True):
        found = psp.local_smart_finding(config, here, now, unit_installed)
        return found["status"], found["detail"], found["fix"]

    assert judged(unit_installed=False) == ("ok", f"read by the daemon itself (no {stored})", "")
    assert judged() == ("warn", f"this host's disks are not read: no {stored.parent} (the "
                        "daemon's sandbox opens no disk)", fix)
    stored.parent.mkdir()
    assert judged() == ("warn", f"{stored} is not there yet (systemctl start "
                        "pulse-sensor-proxy-smart.service)", fix)
    stored.write_text(f"@@disk sda\n{SATA_OUT}\n@@status 0\n")
    os.utime(stored, (now - 60, now - 60))
    assert judged() == ("ok", "1 disks (0 in standby, not woken)", "")
    os.utime(stored, (now - 1800 - 901, now - 1800 - 901))
    assert judged() == ("warn", f"{stored} was read 45 min ago (smart_interval is 30 min)",
                        fix + "; journalctl -u pulse-sensor-proxy-smart.service -n 20 shows why")


def test_rate_limit_hits_of_the_last_minutes_are_a_warning(lab):
    limits = {"per_minute": 1, "burst": 1}
    limited = lab(1, rate_limit=limits, metrics_address=f"127.0.0.1:{free_port()}")
    _, burst, _ = psp.peer_allowance(psp.validate_config({"rate_limit": limits})["rate_limit"], 1)
    replies = [limited.daemon.rpc("get_status") for _ in range(burst + 1)]
    assert [r["success"] for r in replies] == [True] * burst + [False]
    assert replies[-1]["error"] == "rate limit exceeded"
    status, findings = doctor(limited)
    assert status == 0
    assert warnings(findings) == [("metrics", "rate limits", "1 requests refused by rate limits in "
                                   "the last 10 minutes (1 since the daemon started)",
                                   "raise rate_limit.per_minute/burst in the config if Pulse is "
                                   "the one refused (see the audit log's peer)")]


def test_a_changed_host_key(healthy):
    node = healthy.nodes[1]
    node.rotate_host_key()
    failed = only_failure(healthy, "host-key", "n2")
    assert "host key changed" in failed["detail"]
    assert failed["fix"].startswith(f"if the node was reinstalled: ssh-keygen -R "
                                    f"'[127.0.0.1]:{node.port}' -f {healthy.state}/known_hosts")


def test_a_node_down(healthy):
    node = healthy.nodes[2]
    node.stop()
    failed = only_failure(healthy, "reach", "n3")
    assert f"TCP 127.0.0.1:{node.port}: Connection refused" == failed["detail"]
    assert f"open TCP {node.port}" in failed["fix"]


@pytest.mark.parametrize("mode", [("nosensors",), ("fixture", "no-sensors")])
def test_sensors_output_without_a_cpu_temperature(healthy, mode):
    healthy.nodes[0].set_mode(*mode)
    failed = only_failure(healthy, "sensors", "n1")
    assert "no CPU temperature" in failed["detail"]
    assert failed["fix"] == "on n1: apt install lm-sensors && sensors-detect --auto"


def test_an_interrupted_key_rotation(healthy):
    keys = psp.KeyStore(str(healthy.daemon.ssh_dir))
    current = healthy.current_public()
    keys.set_journal(op="rotate", step="pushing", old=current, new=current)
    failed = only_failure(healthy, "key", keys.journal_path)
    assert failed["detail"] == "a key rotation was interrupted at step 'pushing'"
    assert failed["fix"] == "pulse-sensor-proxy rotate-keys (it finishes or undoes it first)"


def test_an_unknown_node_given_with_node(healthy):
    status, findings = doctor(healthy, "--node", "n2", "--node", "nx")
    assert failures(findings) == [("node", "nx")]
    assert {f["target"] for f in findings if f["check"] == "sensors"} == {"n2"}


def test_doctor_changes_nothing_even_for_an_unknown_host_key(healthy):
    known_hosts = healthy.state / "known_hosts"
    first = healthy.nodes[0]
    known_hosts.write_text("".join(line + "\n" for line in known_hosts.read_text().splitlines()
                                   if f":{first.port} " not in line))
    roots = [healthy.state, healthy.daemon.config_path,
             *(node.authorized_keys_path for node in healthy.nodes)]
    before = listing(*roots)
    failed = only_failure(healthy, "host-key", "n1")
    assert "unknown host key" in failed["detail"] and "pins it" in failed["fix"]
    assert listing(*roots) == before
    assert os.path.exists(known_hosts)


# --- the socket, the original's leftovers, the config ------------------------------------------

def test_the_socket_directory_0770(healthy):
    run_dir = healthy.daemon.socket.parent
    run_dir.chmod(0o770)
    failed = only_failure(healthy, "socket", str(run_dir))
    assert "containers' root cannot reach the socket" in failed["detail"]
    assert failed["fix"] == f"chmod 0775 {run_dir}"


def test_the_originals_self_heal_timer_present(healthy, tmp_path):
    timer = tmp_path / "etc/systemd/system/pulse-sensor-proxy-selfheal.timer"
    timer.parent.mkdir(parents=True)
    timer.write_text("[Timer]\nOnBootSec=5min\n")
    out = healthy.cli("doctor", "--json", env={"PULSE_INSTALL_ROOT": str(tmp_path)})
    findings = [json.loads(line) for line in out.stdout.splitlines()]
    assert failures(findings) == [("original", "self-heal")] and out.returncode == 1
    failed = next(f for f in findings if f["status"] == "FAIL")
    assert "/etc/systemd/system/pulse-sensor-proxy-selfheal.timer" in failed["detail"]
    assert failed["fix"].startswith("systemctl disable --now pulse-sensor-proxy-selfheal.timer")


def test_a_config_with_an_unknown_key(healthy):
    path = healthy.daemon.config_path
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, rate_limits={"burst": 5})))
    failed = only_failure(healthy, "config", str(path))
    assert failed["detail"] == "unknown key 'rate_limits' (did you mean 'rate_limit'?)"
    assert failed["fix"] == (f"correct it in {path}, then `pulse-sensor-proxy config validate "
                             f"--config {path}` says OK")


def test_a_config_of_the_original_is_a_warning_naming_the_translated_keys(healthy):
    path = healthy.daemon.config_path
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, read_timeout="5s")))
    status, findings = doctor(healthy)
    assert status == 0, findings
    warned = [f for f in findings if f["status"] == "warn" and f["check"] == "config"]
    assert len(warned) == 1 and "read_timeout: ignored" in warned[0]["detail"]
    assert warned[0]["fix"] == f"pulse-sensor-proxy config migrate --write --config {path}"


# --- containers, through the pct stand-in -------------------------------------------------------

CT_CONF = """arch: amd64
hostname: pulse
rootfs: local-lvm:vm-105-disk-0,size=8G
unprivileged: 1
lxc.mount.entry: {run} mnt/pulse-proxy none {options} 0 0
"""
STALE_DROPIN = """[Service]
Environment="PULSE_SENSOR_PROXY_SOCKET=/run/pulse-sensor-proxy/pulse-sensor-proxy.sock"
"""


class Containers:
    """A lab whose daemon lets root's subuid range read, a CT directory for the pct stand-in and
    the environment that points doctor and pct at them."""

    def __init__(self, lab, tmp_path):
        self.lab, self.pve = lab, tmp_path / "pve"
        (self.pve / "lxc").mkdir(parents=True)
        daemon = lab.daemon
        (daemon.base / "subuid").write_text("root:100000:65536\n")
        daemon.config["pve_dir"] = str(self.pve)
        daemon.stop()
        daemon.start()
        daemon.socket.parent.chmod(0o775)       # as the unit's RuntimeDirectoryMode
        self.cts = tmp_path / "pct"
        self.env = {"PCT_SHIM_PVE_DIR": str(self.pve), "PCT_SHIM_DIR": str(self.cts),
                    "PCT_SHIM_LOCK_DIR": str(tmp_path / "lock"),
                    "PATH": f"{PVE_BIN}:{os.environ['PATH']}"}

    def add(self, ctid, options="bind,create=dir,optional", extra=""):
        text = CT_CONF.format(run=self.lab.daemon.socket.parent, options=options) + extra
        return make_container(self.pve / f"lxc/{ctid}.conf", self.cts / str(ctid), text)

    def doctor(self, *args):
        out = self.lab.cli("doctor", "--json", *args, env=self.env)
        assert out.stderr == "", out.stderr
        return out.returncode, [json.loads(line) for line in out.stdout.splitlines()]

    def only_failure(self, check, target):
        status, findings = self.doctor()
        assert failures(findings) == [(check, target)], findings
        assert status == 1
        return next(f for f in findings if f["status"] == "FAIL")


@pytest.fixture
def containers(lab, tmp_path):
    return Containers(lab(1), tmp_path)


def test_a_healthy_container_is_all_ok(containers):
    rootfs = containers.add(105)
    dropin = rootfs / "etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text(STALE_DROPIN.replace("/run/", "/mnt/").replace("/pulse-sensor-proxy/",
                                                                      "/pulse-proxy/"))
    status, findings = containers.doctor()
    assert status == 0, findings
    seen = {f["check"]: f["status"] for f in findings if f["target"] == "CT 105"}
    assert seen == {"container": "ok", "ct-mount": "ok", "ct-uids": "ok", "ct-running": "ok",
                    "ct-socket": "ok", "ct-env": "ok"}


def test_the_mount_line_without_optional(containers):
    containers.add(105, options="bind,create=dir")
    failed = containers.only_failure("ct-mount", "CT 105")
    assert "lacks `optional`" in failed["detail"]
    assert failed["fix"].startswith("install-sensor-proxy.sh --ctid 105 (or write the line as: "
                                    "lxc.mount.entry: ")
    assert failed["fix"].endswith(" mnt/pulse-proxy none bind,create=dir,optional 0 0)")


def test_a_container_whose_uid_range_is_not_allowed(containers):
    containers.add(105, extra="lxc.idmap: u 0 200000 65536\nlxc.idmap: g 0 200000 65536\n")
    failed = containers.only_failure("ct-uids", "CT 105")
    assert "uids 200000-265535 may not read" in failed["detail"]
    assert "config merge" in failed["fix"] and "--add-peer-uids 200000-265535 --write" in failed["fix"]


def test_a_stale_pulse_sensor_proxy_socket(containers):
    rootfs = containers.add(105)
    dropin = rootfs / "etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text(STALE_DROPIN)
    failed = containers.only_failure("ct-env", "CT 105")
    assert failed["detail"] == ("pulse.service: PULSE_SENSOR_PROXY_SOCKET=/run/pulse-sensor-proxy/"
                                "pulse-sensor-proxy.sock is no socket in the CT")
    assert "PULSE_SENSOR_PROXY_SOCKET=/mnt/pulse-proxy/pulse-sensor-proxy.sock" in failed["fix"]


# Pulse's install.sh (v5.0.17) puts PULSE_SENSOR_PROXY_SOCKET into /etc/pulse/.env, which its
# unit (test_installer.PULSE_UNIT) reads with EnvironmentFile=: that beats any Environment=.
def test_a_stale_socket_in_pulses_environment_file_beats_a_good_drop_in(containers):
    rootfs = containers.add(105)
    (rootfs / "etc/systemd/system").mkdir(parents=True)
    (rootfs / "etc/systemd/system/pulse.service").write_text(PULSE_UNIT)
    dropin = rootfs / "etc/systemd/system/pulse.service.d/10-pulse-sensor-proxy.conf"
    dropin.parent.mkdir()
    dropin.write_text(STALE_DROPIN.replace("/run/", "/mnt/").replace("/pulse-sensor-proxy/",
                                                                      "/pulse-proxy/"))
    (rootfs / "etc/pulse").mkdir()
    (rootfs / "etc/pulse/.env").write_text("PULSE_AUTH_USER=admin\n"
                                          "PULSE_SENSOR_PROXY_SOCKET=/run/pulse-sensor-proxy/"
                                          "pulse-sensor-proxy.sock\n")
    failed = containers.only_failure("ct-env", "CT 105")
    assert failed["detail"] == ("pulse.service (/etc/pulse/.env): PULSE_SENSOR_PROXY_SOCKET=/run/"
                                "pulse-sensor-proxy/pulse-sensor-proxy.sock is no socket in the CT")
    assert failed["fix"] == ("pct exec 105 -- sed -i 's|^PULSE_SENSOR_PROXY_SOCKET=.*|"
                             "PULSE_SENSOR_PROXY_SOCKET=/mnt/pulse-proxy/pulse-sensor-proxy.sock|' "
                             "/etc/pulse/.env, then pct exec 105 -- systemctl restart pulse.service")
    (rootfs / "etc/pulse/.env").write_text("PULSE_SENSOR_PROXY_SOCKET=/mnt/pulse-proxy/"
                                          "pulse-sensor-proxy.sock\n")
    status, findings = containers.doctor()
    assert status == 0 and [f["detail"] for f in findings if f["check"] == "ct-env"] == [
        "pulse.service (/etc/pulse/.env): PULSE_SENSOR_PROXY_SOCKET=/mnt/pulse-proxy/"
        "pulse-sensor-proxy.sock"]


# --- HTTPS mode and metrics --------------------------------------------------------------------

def test_https_mode_checked_and_a_token_file_others_may_read(https, base_dir):
    daemon, _ = https(1)
    assert daemon.rpc("get_temperature", {"node": "n1"})["success"]     # pins n1's host key
    lab = Lab(daemon, [], None)
    status, findings = doctor(lab)
    assert status == 0, findings
    checks = {(f["check"], f["target"]): f for f in findings if f["check"] in ("https", "metrics")}
    cert = checks[("https", str(base_dir / "tls/server.crt"))]
    assert (cert["status"], cert["detail"]) == ("ok", "certificate valid for 825 more days")
    assert checks[("https", f"127.0.0.1:{daemon.port}")]["detail"] == \
        "GET /health with the token answers"
    assert checks[("metrics", "rate limits")]["status"] == "ok"
    (base_dir / "token").chmod(0o644)
    failed = only_failure(lab, "https", str(base_dir / "token"))
    assert (failed["detail"], failed["fix"]) == ("mode 0644", f"chmod 0640 {base_dir}/token")
