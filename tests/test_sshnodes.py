"""The SSH test nodes themselves, checked with the system OpenSSH client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from sshnodes import (FIXTURES_DIR, Keypair, NetNamespace, SshLab, SshNode, Tarpit, pid_running,
                      pids_of_uid, restricted_key_line, ssh_command)

INTEL = (FIXTURES_DIR / "intel-coretemp-nvme.json").read_bytes()
AMD = (FIXTURES_DIR / "amd-k10temp-gpu.json").read_bytes()
NO_SENSORS = (FIXTURES_DIR / "no-sensors.json").read_bytes()


def known_hosts(node: SshNode, directory: Path) -> Path:
    path = directory / f"known_hosts-{node.user}"
    path.write_text(node.known_hosts_text())
    return path


def ssh(node: SshNode, key: Keypair, kh: Path, *command: str, host: str | None = None):
    return subprocess.run(ssh_command(node, key.private_path, kh, *command, host=host),
                          capture_output=True, timeout=60)


def test_restricted_key_asking_for_id_still_gets_sensors_json(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path), "id")
    assert (result.returncode, result.stdout, result.stderr) == (0, INTEL, b"")
    assert ssh_node.execs() == ["id"]
    assert ssh_node.accepted_publickey_count() == 1
    assert client_key.fingerprint in ssh_node.log_path.read_text()


def test_production_line_with_plain_sensors_command_reaches_the_stand_in(ssh_node, client_key, tmp_path):
    ssh_node.write_authorized_keys(restricted_key_line(client_key.public_line, "sensors -j") + "\n")
    ssh_node.set_mode("fixture", "amd-k10temp-gpu")
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path))
    assert (result.returncode, result.stdout) == (0, AMD)
    assert ssh_node.execs() == [""]


def test_from_option_excluding_loopback_refuses_the_key(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line, source="192.0.2.0/24")
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path))
    assert result.returncode == 255
    assert b"Permission denied" in result.stderr
    assert ssh_node.exec_count() == 0
    assert ssh_node.accepted_publickey_count() == 0


def test_nosensors_mode_is_byte_exact_lm_sensors(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode("nosensors")
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (1, NO_SENSORS, b"No sensors found!\n")


@pytest.mark.parametrize(("mode", "returncode", "stdout"), [
    (("exit", 3), 3, b""),
    (("sleep", 0.2), 0, INTEL),
    (("huge", 3_000_000), 0, b"\0" * 3_000_000),
    (("fixture", str(FIXTURES_DIR / "no-sensors.json")), 0, NO_SENSORS),
])
def test_modes_exit_code_and_output(ssh_node, client_key, tmp_path, mode, returncode, stdout):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode(*mode)
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path))
    assert (result.returncode, result.stdout) == (returncode, stdout)


def test_garbage_mode_is_not_json(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode("garbage")
    result = ssh(ssh_node, client_key, known_hosts(ssh_node, tmp_path))
    assert result.returncode == 0 and result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_exec_log_records_every_run_and_its_command(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    kh = known_hosts(ssh_node, tmp_path)
    for command in (["sensors", "-j"], ["cat", "/etc/shadow"], []):
        assert ssh(ssh_node, client_key, kh, *command).returncode == 0
    assert ssh_node.execs() == ["sensors -j", "cat /etc/shadow", ""]
    assert ssh_node.accepted_publickey_count() == 3


def in_sleep_loop(node: SshNode) -> bool:
    """The stand-in has reached its sleep loop (a `sleep` child runs as the account)."""
    for pid in node.session_pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("kill_client_when", ["run logged", "in sleep loop"])
def test_sleep_mode_stalls_and_ends_with_its_session(ssh_node, client_key, tmp_path, kill_client_when):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode("sleep", 120)
    client = subprocess.Popen(ssh_command(ssh_node, client_key.private_path, known_hosts(ssh_node, tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ssh_node.exec_count() == 1, what="the stand-in to run")
        if kill_client_when == "in sleep loop":
            wait_for(lambda: in_sleep_loop(ssh_node), what="the stand-in's sleep loop")
        assert client.poll() is None, "the stand-in answered instead of sleeping"
    finally:
        client.kill()
        client.communicate()
    wait_for(lambda: not ssh_node.session_pids(), what="the stand-in to end with its session")


def real_uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(status.split("\nUid:")[1].split()[0])


def test_a_process_of_the_accounts_uid_in_another_pid_namespace_is_left_alone(ssh_node):
    """A booted system-test guest shares this host's uids (systemd-nspawn without a user
    namespace) in a PID namespace of its own: its node pve3's account gets uid 1001 from
    useradd, as psp-n01 did here. What a lease kills and session_pids reports are the
    account's processes in this PID namespace only, never the guest's sshd sessions."""
    uid, gid = ssh_node.uid, ssh_node.account.gid
    as_account = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "cat"]
    guest = subprocess.Popen(["unshare", "--pid", "--fork", "--", *as_account], stdin=subprocess.PIPE)
    here = subprocess.Popen(as_account, stdin=subprocess.PIPE)
    children = Path(f"/proc/{guest.pid}/task/{guest.pid}/children")
    try:
        wait_for(lambda: [real_uid(int(pid)) for pid in children.read_text().split()] == [uid]
                 and real_uid(here.pid) == uid, what="both processes to run as the account")
        (in_guest,) = map(int, children.read_text().split())
        assert here.pid in pids_of_uid(uid)
        assert in_guest not in pids_of_uid(uid)
        assert in_guest not in ssh_node.session_pids()
    finally:
        for proc in (here, guest):      # cat ends with its input, and unshare with the guest's cat
            proc.stdin.close()
            proc.wait(timeout=30)


def test_stop_ends_open_sessions(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode("sleep", 120)
    client = subprocess.Popen(ssh_command(ssh_node, client_key.private_path, known_hosts(ssh_node, tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ssh_node.exec_count() == 1, what="the stand-in to run")
        ssh_node.stop()
        assert client.wait(timeout=30) == 255
    finally:
        client.kill()
        client.communicate()
    assert not ssh_node.running
    wait_for(lambda: not ssh_node.session_pids(), what="the stand-in to end with its session")


def test_hold_mode_answers_once_released(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    ssh_node.set_mode("hold")
    client = subprocess.Popen(ssh_command(ssh_node, client_key.private_path, known_hosts(ssh_node, tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ssh_node.exec_count() == 1, what="the stand-in to run")
        wait_for(lambda: in_sleep_loop(ssh_node), what="the stand-in to hold")
        assert client.poll() is None, "the stand-in answered while held"
        ssh_node.set_mode("exit", 0)
        stdout, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        client.communicate()
    assert (client.returncode, stdout) == (0, INTEL), "released: the default fixture"


def test_frozen_node_accepts_but_never_speaks_until_thawed(ssh_node):
    ssh_node.freeze()
    with socket.create_connection((ssh_node.host, ssh_node.port), timeout=5) as conn:
        conn.settimeout(0.5)
        with pytest.raises(socket.timeout):
            conn.recv(1)
        ssh_node.thaw()
        conn.settimeout(10)
        assert conn.recv(64).startswith(b"SSH-2.0-")


def test_frozen_node_still_stops(ssh_node):
    ssh_node.freeze()
    ssh_node.stop()
    assert not ssh_node.running


def test_black_hole_drops_connects_in_its_namespace_only(tarpit: Tarpit):
    with NetNamespace() as ns:
        def connect(port):
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return "connected"

        def inside():
            with Tarpit() as pit:
                assert connect(pit.port) == "connected"
                ns.black_hole(pit.port)
                with pytest.raises(socket.timeout):
                    connect(pit.port)          # dropped, not refused
                ns.lift_black_hole(pit.port)
                assert connect(pit.port) == "connected"
            with pytest.raises(ConnectionRefusedError):
                connect(tarpit.port)           # the host's loopback is not this one

        ns.run(inside)
    assert connect(tarpit.port) == "connected"


def test_restart_keeps_port_and_host_key(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    kh = known_hosts(ssh_node, tmp_path)
    port, line = ssh_node.port, ssh_node.host_key_line
    ssh_node.restart()
    assert (ssh_node.port, ssh_node.host_key_line) == (port, line)
    assert ssh(ssh_node, client_key, kh).stdout == INTEL


def test_rotated_host_key_fails_strict_checking_with_the_old_line(ssh_node, client_key, tmp_path):
    ssh_node.authorize(client_key.public_line)
    old_kh = known_hosts(ssh_node, tmp_path)
    old_line = ssh_node.host_key_line
    ssh_node.rotate_host_key()
    assert ssh_node.host_key_line != old_line
    refused = ssh(ssh_node, client_key, old_kh)
    assert refused.returncode == 255
    assert b"REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    new_kh = tmp_path / "new_known_hosts"
    new_kh.write_text(ssh_node.host_key_line + "\n")
    assert ssh(ssh_node, client_key, new_kh).stdout == INTEL
    assert ssh_node.exec_count() == 1


def test_sftp_subsystem_serves_the_home(ssh_node, client_key, tmp_path):
    ssh_node.write_authorized_keys(client_key.public_line + "\n")
    fetched = tmp_path / "fetched"
    batch = tmp_path / "batch"
    batch.write_text(f"get .ssh/authorized_keys {fetched}\n")
    result = subprocess.run(
        ["sftp", "-F", "/dev/null", "-b", str(batch), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known_hosts(ssh_node, tmp_path)}", "-o", "StrictHostKeyChecking=yes",
         "-i", str(client_key.private_path), "-P", str(ssh_node.port), f"{ssh_node.user}@{ssh_node.host}"],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert fetched.read_text() == client_key.public_line + "\n"


def test_ipv6_node_answers_on_both_loopbacks(ssh_nodes, client_key, tmp_path):
    (node,) = ssh_nodes(1, ipv6=True)
    node.authorize(client_key.public_line)
    kh = known_hosts(node, tmp_path)
    for host in ("127.0.0.1", "::1"):
        assert ssh(node, client_key, kh, host=host).stdout == INTEL
    assert node.accepted_publickey_count() == 2


def test_tarpit_accepts_tcp_and_sends_nothing(tarpit: Tarpit):
    with socket.create_connection(("127.0.0.1", tarpit.port), timeout=5) as conn:
        assert tarpit.wait_for_connections(1)
        conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn.recv(1)


def test_stalling_sshd_sends_a_banner_then_nothing(stalling_sshd: Tarpit):
    with socket.create_connection(("127.0.0.1", stalling_sshd.port), timeout=5) as conn:
        conn.settimeout(5)
        banner = conn.recv(64)
        assert banner.startswith(b"SSH-2.0-OpenSSH") and banner.endswith(b"\r\n")
        conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn.recv(1)


def test_32_nodes_start_and_each_answers_as_itself(ssh_nodes, client_key, tmp_path):
    nodes = ssh_nodes(32)
    assert len({n.user for n in nodes}) == len({n.port for n in nodes}) == 32
    for i, node in enumerate(nodes):
        node.authorize(client_key.public_line)
        node.set_mode("fixture", "amd-k10temp-gpu" if i % 2 else "intel-coretemp-nvme")
    clients = [subprocess.Popen(ssh_command(n, client_key.private_path, known_hosts(n, tmp_path)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in nodes]
    outputs = [c.communicate(timeout=120) + (c.returncode,) for c in clients]
    for i, (stdout, stderr, returncode) in enumerate(outputs):
        assert (returncode, stdout, stderr) == (0, AMD if i % 2 else INTEL, b"")
    assert [n.exec_count() for n in nodes] == [1] * 32


def test_sshd_leaked_by_a_killed_run_is_stopped_when_its_account_is_leased_again(ssh_lab: SshLab):
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sshnodes, sys\n"
         "node = sshnodes.SshNode(sshnodes.SshLab()).start()\n"
         "print(node.user, node._proc.pid, flush=True)\n"
         "sys.stdin.read()"],
        cwd=Path(__file__).parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    user, pid = owner.stdout.readline().split()
    sshd_pid = int(pid)
    owner.kill()
    owner.wait()
    assert pid_running(sshd_pid), "the killed run's sshd should still be running"
    nodes = []
    try:
        while not nodes or nodes[-1].user != user:
            assert len(nodes) < 8, f"{user} was not leased again"
            nodes.append(SshNode(ssh_lab))
        assert not pid_running(sshd_pid)
    finally:
        for node in nodes:
            node.close()
