"""Keys on disk and on nodes: push, revoke, status, rotate-keys (with crashes), against real sshd.

Each test node's account stands in for root: its authorized_keys holds an unrestricted admin
key (the admin identity, as Proxmox's root-to-root SSH) plus whatever the proxy pushes.
"""
import asyncio
import base64
import concurrent.futures
import json
import os
import re
import stat
import subprocess
import threading

import pytest

import pulse_sensor_proxy as psp
from conftest import MODULE, PYTHON, SERVICE_UID, as_uid, wait_for


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_the_public_blob_of_a_private_key_file_is_read_without_crypto(tmp_path, key_type):
    """Keys as ssh-keygen writes them: the clear header holds what `ssh-keygen -y` derives."""
    path = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(path)], check=True)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True,
                             text=True, check=True).stdout.split()[1]
    private = path.read_bytes()
    assert psp.openssh_public_blob(private) == base64.b64decode(derived)
    header_only = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" +
                   base64.b64encode(b"openssh-key-v1\0" + b"\0" * 9) +
                   b"\n-----END OPENSSH PRIVATE KEY-----\n")
    for broken in (b"", private.replace(b"OPENSSH", b"RSA"), private[:120] + private[-37:],
                   header_only):
        with pytest.raises(ValueError):
            psp.openssh_public_blob(broken)


def test_the_daemon_starts_without_loading_ssh_crypto(daemon):
    """Reading this host's sensors needs no SSH: a standalone host's daemon never maps
    cryptography's library (asyncssh brings it) once its key exists; the .pub check at
    start reads the private key's clear header."""
    daemon.stop()
    daemon.start()      # the first start generated the key, with asyncssh
    assert daemon.rpc("get_status")["success"]
    assert daemon.rpc("get_temperature", {"node": "localhost"})["data"]["source"] == "local"
    maps = open(f"/proc/{daemon.proc.pid}/maps").read()
    assert "/cryptography/" not in maps and "_cffi_backend" not in maps
    (daemon.ssh_dir / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBad x\n")
    daemon.stop()
    daemon.start()
    public = (daemon.ssh_dir / "id_ed25519.pub").read_text()
    assert public.split()[1] != "AAAAC3NzaC1lZDI1NTE5AAAAIBad", "a wrong .pub is still rewritten"


def snapshot(*roots):
    """Every file's bytes and mtime (and every symlink) under the given paths."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                content = open(path, "rb").read() if stat.S_ISREG(info.st_mode) else None
                seen[path] = (info.st_mtime_ns, stat.S_IMODE(info.st_mode), content)
    return seen


# -- the authorized_keys line and the file edit (pure) ------------------------------------------

PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClS3OhHgiDsZx5fXUzLvdNYrSznP4QgBXMtyhhMVV9F pulse-sensor-proxy"
OURS = psp.authorized_keys_line(PUBLIC, ["10.0.0.0/24", "192.168.1.5/32"])
FOREIGN = (b"# managed by hand\r\n"
           b'command="echo \\"hi, there\\"",no-pty ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB user@laptop\r\n'
           b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxZ root@pve2\n"
           b'from="10.0.0.1" ecdsa-sha2-nistp256 AAAAE2VjZHNh no-newline-at-end')


def test_line_format():
    assert OURS == ('from="10.0.0.0/24,192.168.1.5/32",command="sensors -j",restrict,'
                    "no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty "
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClS3OhHgiDsZx5fXUzLvdNYrSznP4QgBXMtyhhMVV9F "
                    "pulse-sensor-proxy")


def test_parse_lines_with_quoted_options():
    parsed = psp.parse_authorized_key('command="echo \\"a b\\"",no-pty ssh-rsa AAAA c d')
    assert parsed == ('command="echo \\"a b\\"",no-pty', "ssh-rsa", "AAAA", "c d")
    assert psp.parse_authorized_key("# comment") is None
    assert psp.parse_authorized_key("garbage line") is None
    assert psp.parse_authorized_key("ssh-ed25519 AAAA")[1:] == ("ssh-ed25519", "AAAA", "")


def test_foreign_bytes_are_kept_even_without_a_final_newline():
    added, changes = psp.edit_authorized_keys(FOREIGN, OURS)
    assert added == OURS.encode() + b"\n" + FOREIGN, "our line first: no foreign byte changes"
    assert [c[0] for c in changes] == ["added"]
    assert psp.edit_authorized_keys(added, OURS) == (added, []), "idempotent"
    removed, _ = psp.edit_authorized_keys(added, remove_keys={PUBLIC.split()[1]})
    assert removed == FOREIGN


def test_append_when_the_file_ends_with_a_newline():
    data = FOREIGN + b"\n"
    added, _ = psp.edit_authorized_keys(data, OURS)
    assert added == data + OURS.encode() + b"\n"


def test_legacy_line_of_our_key_is_upgraded_in_place():
    legacy = (b"ssh-rsa AAAAB3 a@b\r\n" + b'command="sensors -j",no-pty ' + PUBLIC.split()[0].encode() + b" "
              + PUBLIC.split()[1].encode() + b" pulse-temp-proxy\r\n" + b"ssh-rsa AAAAB4 c@d\r\n")
    upgraded, changes = psp.edit_authorized_keys(legacy, OURS)
    assert upgraded == b"ssh-rsa AAAAB3 a@b\r\n" + OURS.encode() + b"\r\n" + b"ssh-rsa AAAAB4 c@d\r\n"
    assert [c[0] for c in changes] == ["upgraded"]


def test_other_hosts_proxy_keys_are_never_touched():
    other = b'from="10.9.9.9",command="sensors -j",no-pty ssh-ed25519 AAAAC3NzaOTHER pulse-sensor-proxy\n'
    result, _ = psp.edit_authorized_keys(other, OURS)
    assert result.startswith(other)


def test_duplicates_of_our_key_collapse_to_one():
    data = (OURS + "\n" + OURS + "\n").encode()
    result, changes = psp.edit_authorized_keys(data, OURS)
    assert result == (OURS + "\n").encode() and changes[0][0] == "removed duplicate"


def test_remove_by_fingerprint():
    fingerprint = psp.key_fingerprint(PUBLIC)
    result, changes = psp.edit_authorized_keys((OURS + "\n").encode() + FOREIGN, remove_keys={fingerprint})
    assert result == FOREIGN and changes == [("removed", PUBLIC.split()[1])]


def test_a_generated_key_is_what_ssh_keygen_reads(base_dir):
    """The key slots hold OpenSSH's formats: ssh-keygen derives the same public line from the
    private key and prints the same SHA256 fingerprint."""
    private, public = psp.generate_keypair()
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    path = base_dir / "id_ed25519"
    path.write_bytes(private)
    path.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True,
                             text=True, check=True).stdout
    assert public == (" ".join(derived.split()[:2]) + " pulse-sensor-proxy\n").encode()
    assert psp.public_key_of(private) == public
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True,
                            text=True, check=True).stdout
    assert listed.split()[1] == psp.key_fingerprint(public.decode())


# -- push, revoke, status against real nodes -----------------------------------------------------


def test_push_installs_a_working_restricted_line_idempotently(lab):
    lab = lab()
    assert lab.all_temperatures_work()
    line = psp.authorized_keys_line(lab.current_public(), ["127.0.0.1/32"])
    before = [n.authorized_keys_path.read_bytes() for n in lab.nodes]
    for node, data in zip(lab.nodes, before):
        assert data == (lab.admin_line() + line + "\n").encode()
        assert stat.S_IMODE(node.authorized_keys_path.stat().st_mode) == 0o600
    out = lab.push()
    assert out.count("already up to date") == 3
    assert [n.authorized_keys_path.read_bytes() for n in lab.nodes] == before


def test_forced_command_holds_for_the_pushed_key(lab):
    lab = lab(count=1)
    node = lab.nodes[0]
    known = lab.daemon.base / "kh"
    known.write_text(node.host_key_line + "\n")
    key = lab.daemon.ssh_dir / "id_ed25519"
    out = subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                          "-o", f"UserKnownHostsFile={known}", "-i", str(key), "-p", str(node.port),
                          f"{node.user}@127.0.0.1", "id"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["coretemp-isa-0000"], out.stderr
    assert node.execs()[-1] == "id", "the client asked for id and got sensors output"


def test_foreign_lines_survive_push_and_revoke_byte_for_byte(lab):
    lab = lab(count=1, push=False)
    node = lab.nodes[0]
    original = lab.admin_line().encode() + FOREIGN
    node.write_authorized_keys(original.decode())
    lab.push()
    pushed = node.authorized_keys_path.read_bytes()
    assert pushed.endswith(original) and pushed != original
    out = lab.cli("keys", "revoke", "--public-key", str(lab.daemon.ssh_dir / "id_ed25519.pub"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert node.authorized_keys_path.read_bytes() == original


def test_legacy_lines_are_upgraded_on_the_node(lab):
    lab = lab(count=1, push=False)
    node = lab.nodes[0]
    key_type, key = lab.current_public().split()[:2]
    node.write_authorized_keys(lab.admin_line() + f'command="sensors -j",no-pty {key_type} {key} pulse-temp-proxy\n')
    assert "upgraded" in lab.push()
    assert node.authorized_keys_path.read_text() == lab.admin_line() + psp.authorized_keys_line(
        lab.current_public(), ["127.0.0.1/32"]) + "\n"


def test_local_node_file_and_ssh_dir_are_created_with_safe_modes(base_dir):
    """This host's own file when it is a node (no SFTP): ~/.ssh 0700, the file 0600."""
    home = base_dir / "home"
    home.mkdir()
    files = psp.LocalFiles(str(home))
    path, changes = asyncio.run(psp.edit_node_keys(files, OURS))
    assert [c[0] for c in changes] == ["added"] and path == ".ssh/authorized_keys"
    assert stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".ssh/authorized_keys").stat().st_mode) == 0o600
    assert (home / ".ssh/authorized_keys").read_text() == OURS + "\n"
    assert not (home / ".ssh" / psp.LOCK_NAME).exists()
    before = snapshot(home)
    assert asyncio.run(psp.edit_node_keys(files, OURS, dry_run=True))[1] == []
    assert asyncio.run(psp.edit_node_keys(files, remove_keys={PUBLIC.split()[1]}, dry_run=True))[1]
    assert snapshot(home) == before


def test_symlinked_authorized_keys_stays_a_symlink(lab):
    """Proxmox links /root/.ssh/authorized_keys to the cluster-wide /etc/pve/priv copy."""
    lab = lab(count=1, push=False)
    node = lab.nodes[0]
    shared = node.home / "pve-priv"
    shared.mkdir()
    os.chown(shared, node.uid, node.uid)
    target = shared / "authorized_keys"
    target.write_text(lab.admin_line())
    os.chown(target, node.uid, node.uid)
    target.chmod(0o640)
    node.authorized_keys_path.unlink()
    node.authorized_keys_path.symlink_to("../pve-priv/authorized_keys")
    lab.push()
    assert node.authorized_keys_path.is_symlink()
    assert "pulse-sensor-proxy" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640, "mode kept"
    assert lab.all_temperatures_work()


def test_push_waits_for_another_editor_and_breaks_stale_locks(lab):
    lab = lab(count=1, push=False)
    node = lab.nodes[0]
    lock = node.authorized_keys_path.parent / psp.LOCK_NAME
    lock.mkdir()
    proc = subprocess.Popen([PYTHON, str(MODULE), "keys", "push", "--config", str(lab.daemon.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: node.accepted_publickey_count() >= 1, what="the push to log in")
        assert proc.poll() is None and "pulse-sensor-proxy" not in node.authorized_keys_path.read_text()
        lock.rmdir()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "pulse-sensor-proxy" in node.authorized_keys_path.read_text()
    node.write_authorized_keys(lab.admin_line())
    lock.mkdir()
    old = 1_000_000_000
    os.utime(lock, (old, old))
    lab.push()
    assert not lock.exists(), "a stale lock is broken and ours is released"


def test_unwritable_directory_fails_at_once_with_the_reason(base_dir):
    """A directory the editor may not write (read-only under a sandbox, or not its own) is not
    another editor's lock: say so at once instead of waiting for the lock to go."""
    home = base_dir / "readonly-home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/authorized_keys").write_text("")
    home.chmod(0o755)
    (home / ".ssh").chmod(0o755)
    (home / ".ssh/authorized_keys").chmod(0o666)
    program = ("import asyncio, sys, pulse_sensor_proxy as psp\n"
               "try:\n"
               f"    asyncio.run(psp.edit_node_keys(psp.LocalFiles({str(home)!r}), {OURS!r}))\n"
               "except psp.KeyCommandError as exc:\n"
               "    sys.exit(str(exc))\n")
    result = subprocess.run(as_uid(SERVICE_UID) + [PYTHON, "-c", program], capture_output=True,
                            text=True, timeout=60, cwd=str(MODULE.parent))
    assert result.returncode == 1
    assert "cannot create .ssh/.pulse-sensor-proxy.lock: Permission denied" in result.stderr


def test_an_oversized_authorized_keys_on_a_node_is_refused_unread(lab):
    """A node's file beyond MAX_KEYS_FILE_BYTES is not read whole (its size is the node's word)
    nor edited: one line names it, the file is unchanged, the other node is served."""
    lab = lab(count=2, push=False)
    big, small = lab.nodes
    original = (lab.admin_line() + "# padding\n" * (psp.MAX_KEYS_FILE_BYTES // 10 + 1)).encode()
    big.write_authorized_keys(original.decode())
    out = lab.cli("keys", "push")
    assert out.returncode != 0
    assert f"  n1: FAILED to install the key: .ssh/authorized_keys is larger than " \
        f"{psp.MAX_KEYS_FILE_BYTES} bytes; refusing to edit it\n" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert big.authorized_keys_path.read_bytes() == original
    assert lab.current_public().split()[1] in small.authorized_keys_path.read_text()


def test_an_sftp_refusal_is_one_line_not_a_traceback(lab):
    """The node's ~/.ssh is not writable by its account: the lock cannot be made."""
    lab = lab(count=1, push=False)
    node = lab.nodes[0]
    before = node.authorized_keys_path.read_bytes()
    ssh_dir = node.authorized_keys_path.parent
    ssh_dir.chmod(0o555)
    try:
        out = lab.cli("keys", "push")
    finally:
        ssh_dir.chmod(0o700)
    assert out.returncode != 0
    assert "  n1: FAILED to install the key: sftp: cannot create .ssh/.pulse-sensor-proxy.lock: " \
        "Permission denied\n" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert node.authorized_keys_path.read_bytes() == before


def test_push_with_nothing_to_change_writes_nothing(lab):
    """Not even the lock directory: on Proxmox it would be a cluster-wide write."""
    lab = lab(count=1)
    node = lab.nodes[0]
    old = 1_000_000_000
    os.utime(node.authorized_keys_path.parent, (old, old))
    before = snapshot(node.authorized_keys_path.parent)
    assert "already up to date" in lab.push()
    assert node.authorized_keys_path.parent.stat().st_mtime_ns == old * 10**9
    assert snapshot(node.authorized_keys_path.parent) == before


def test_dry_run_changes_nothing(lab):
    lab = lab(push=False)
    roots = [lab.state] + [n.authorized_keys_path.parent for n in lab.nodes]
    before = snapshot(*roots)
    out = lab.cli("keys", "push", "--dry-run")
    assert out.returncode == 0 and out.stdout.count("would have added") == 3, out.stdout
    out = lab.cli("rotate-keys", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Would rotate" in out.stdout and "n1, n2, n3" in out.stdout
    assert snapshot(*roots) == before


def test_dry_run_describes_the_steps_a_rotation_runs(lab):
    """--dry-run's numbered lines are ROTATION_STEPS, in their order (a rollback has no step 1)."""
    lab = lab(count=1)
    for args, first in ((["rotate-keys", "--dry-run"], 1), (["rotate-keys", "--rollback", "--dry-run"], 2)):
        if first == 2:
            assert lab.cli("rotate-keys").returncode == 0
        out = lab.cli(*args)
        assert out.returncode == 0, out.stdout + out.stderr
        numbered = [line.split(". ", 1) for line in out.stdout.splitlines()
                    if re.match(r"  \d\. ", line)]
        assert [int(n) for n, _ in numbered] == list(range(first, len(psp.ROTATION_STEPS) + 1))
        words = [step.describe.split()[0] for step in psp.ROTATION_STEPS[first - 1:]]
        assert [text.split()[0] for _, text in numbered] == words


def test_revoke_by_fingerprint_only_on_chosen_nodes(lab):
    lab = lab(count=2)
    fingerprint = psp.key_fingerprint(lab.current_public())
    out = lab.cli("keys", "revoke", "--fingerprint", fingerprint, "--node", "n2")
    assert out.returncode == 0, out.stdout + out.stderr
    key = lab.current_public().split()[1]
    assert key in lab.keys_on(lab.nodes[0]) and key not in lab.keys_on(lab.nodes[1])
    assert lab.cli("keys", "revoke", "--fingerprint", "MD5:xx").returncode == 2
    assert 'node "n9" not in allowlist' in lab.cli("keys", "push", "--node", "n9").stderr


def test_status_reports_slots_and_the_restricted_path(lab):
    lab = lab(count=2)
    lab.nodes[1].set_mode("exit", 2)
    out = lab.cli("keys", "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "current=installed next=- prev=-; restricted path works" in out.stdout
    assert "restricted path FAILS: sensors -j exited with status 2" in out.stdout


def test_key_commands_refuse_non_root(lab):
    lab = lab(count=1, push=False)
    for args in (["keys", "push"], ["keys", "status"], ["rotate-keys", "--check"]):
        out = lab.cli(*args, uid=4242)
        assert out.returncode == 1 and "must run as root" in out.stderr, out.stderr


def test_check_is_a_preflight_table(lab):
    lab = lab()
    out = lab.cli("rotate-keys", "--check")
    assert out.returncode == 0 and out.stdout.count("current key works") == 3, out.stdout
    lab.nodes[2].stop()
    out = lab.cli("rotate-keys", "--check")
    assert out.returncode == 1 and "n3: FAILED to pass preflight" in out.stdout


# -- rotation ------------------------------------------------------------------------------------


def assert_clean_state(lab, current):
    key = current.split()[1]
    for node in lab.nodes:
        proxy_keys = [k for k in lab.keys_on(node) if k != lab.admin.public_line.split()[1]]
        assert proxy_keys == [key], f"{node.user}: only the current key stays"
    assert not (lab.state / "ssh.d" / "rotation.json").exists()
    assert not (lab.state / "ssh.d" / "next" / "id_ed25519").exists()


def test_rotation_with_the_daemon_serving_throughout(lab):
    lab = lab()
    old = lab.current_public()
    failures, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            failures.extend(r for r in lab.temperatures() if not r["success"])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        poller = pool.submit(poll)
        out = lab.cli("rotate-keys")
        stop.set()
        poller.result(timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert failures == [], failures
    new = lab.current_public()
    assert new != old
    assert (lab.state / "ssh.d" / "prev" / "id_ed25519.pub").read_text().split()[:2] == old.split()[:2]
    assert_clean_state(lab, new)
    assert lab.all_temperatures_work()
    modes = {"ssh": 0o700, "ssh/id_ed25519": 0o600, "ssh/id_ed25519.pub": 0o640,
             "ssh.d": 0o750, "ssh.d/next": 0o750, "ssh.d/prev": 0o750,
             "ssh.d/prev/id_ed25519": 0o600, "ssh.d/prev/id_ed25519.pub": 0o640}
    for relative, mode in modes.items():
        info = (lab.state / relative).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, SERVICE_UID), relative


def test_failed_verification_undoes_everything(lab):
    lab = lab()
    old = lab.current_public()
    lab.nodes[1].set_mode("exit", 4)
    out = lab.cli("rotate-keys")
    assert out.returncode == 1
    assert "n2: FAILED to verify the new key" in out.stdout and "Undoing" in out.stdout
    assert lab.current_public() == old
    lab.nodes[1].set_mode("fixture", "intel-coretemp-nvme")
    assert_clean_state(lab, old)
    assert lab.all_temperatures_work()


def test_rollback_restores_the_previous_key(lab):
    lab = lab()
    old = lab.current_public()
    assert lab.cli("rotate-keys").returncode == 0
    rotated = lab.current_public()
    out = lab.cli("rotate-keys", "--rollback")
    assert out.returncode == 0, out.stdout + out.stderr
    assert lab.current_public().split()[:2] == old.split()[:2]
    assert_clean_state(lab, old)
    assert rotated.split()[1] not in lab.keys_on(lab.nodes[0])
    assert lab.all_temperatures_work()
    out = lab.cli("rotate-keys", "--rollback")
    assert out.returncode == 1 and "nothing to roll back to" in out.stderr


CRASH_POINTS = ["next private key written", "journal written", "add the new key: n1",
                "add the new key: n3", "verify the new key: n2", "verified", "prev saved",
                "current private key written", "swapped", "remove the old key: n2"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_any_step_leaves_a_working_key(lab, point):
    lab = lab()
    out = lab.cli("rotate-keys", env={"PULSE_SENSOR_PROXY_CRASH_AT": point})
    assert out.returncode == -9, f"the crash point was not reached:\n{out.stdout}{out.stderr}"
    assert lab.all_temperatures_work()
    journal_path = lab.state / "ssh.d" / "rotation.json"
    journal = json.loads(journal_path.read_text()) if journal_path.exists() else {}
    out = lab.cli("rotate-keys")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "interrupted" in out.stdout or point == "next private key written"
    assert_clean_state(lab, lab.current_public())
    if journal.get("step") in ("swapping", "removing"):     # finished, not rotated once more
        assert lab.current_public().split()[1] == journal["new"].split()[1]
    assert lab.all_temperatures_work()


def test_interrupted_rotation_is_reported_at_serve_start(lab):
    lab = lab(count=1)
    assert lab.cli("rotate-keys", env={"PULSE_SENSOR_PROXY_CRASH_AT": "swapped"}).returncode == -9
    lab.daemon.stop()
    lab.daemon.start()
    record = lab.daemon.wait_log(lambda r: "interrupted" in r.get("msg", ""), "the warning")
    assert record["step"] == "removing"
    assert lab.all_temperatures_work()


def test_no_subnets_means_no_line_rather_than_an_empty_from(base_dir):
    config = psp.validate_config({"ssh_dir": str(base_dir / "state" / "ssh")})
    admin = psp.KeyAdmin(dict(config, config_path=str(base_dir / "c.yaml")))
    admin.subnets = []
    with pytest.raises(psp.KeyCommandError, match="allowed_source_subnets is empty"):
        admin.line(PUBLIC)


# -- root against a state dir the service account prepared ----------------------------------------


def as_service(lab, script):
    """Run a shell script as the service account (the state dir's owner), as an attacker who
    took over the daemon would."""
    subprocess.run(as_uid(SERVICE_UID) + ["sh", "-ec", script], cwd=lab.state, check=True)


def forged_journal(lab):
    """A journal that names root's own key as the old one: finishing it would remove root's
    line from every node."""
    return json.dumps({"op": "rotate", "step": "removing", "old": lab.admin.public_line,
                       "new": lab.current_public()})


HOSTILE_STATES = {
    "symlinked key": ("ln -sf {admin} ssh/id_ed25519", ["keys", "push"],
                      "ssh/id_ed25519 is a symlink"),
    "symlinked slot dir": ("mkdir -p ssh.d && ln -s {admin_dir} ssh.d/next", ["rotate-keys"],
                           "ssh.d/next is a symlink"),
    "symlinked prev slot": ("mkdir -p ssh.d && ln -s {admin_dir} ssh.d/prev",
                            ["rotate-keys", "--rollback"], "ssh.d/prev is a symlink"),
    "forged journal": ("mkdir -p ssh.d && cat > ssh.d/rotation.json <<'J'\n{journal}\nJ",
                       ["rotate-keys"], "rotation.json: its old key is not one of the key slots"),
    "FIFO as key": ("rm ssh/id_ed25519 && mkfifo -m 600 ssh/id_ed25519", ["keys", "push"],
                    "ssh/id_ed25519 is a FIFO"),
}


@pytest.mark.parametrize("case", HOSTILE_STATES)
def test_root_refuses_what_the_service_account_planted(lab, case):
    lab = lab()
    plant, command, error = HOSTILE_STATES[case]
    admin_dir = lab.admin.private_path.parent
    as_service(lab, plant.format(admin=lab.admin.private_path, admin_dir=admin_dir,
                                 journal=forged_journal(lab)))
    outside = [admin_dir] + [n.authorized_keys_path.parent for n in lab.nodes]
    before = snapshot(*outside)
    out = lab.cli(*command)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and error in lines[0] and "refusing" in lines[0], out.stderr
    assert snapshot(*outside) == before, "a file outside the state dir changed"


# -- what a node's SFTP can refuse, during push, revoke and rotation ----------------------------
#
# Each fault is made for real on n1 (n2 stays healthy) and returns (the error expected after
# "n1: FAILED to ...: ", whether the proxy's key still logs in while the fault lasts, undo).
# Where the fault breaks authorized_keys for sshd too, the admin key also sits in sshd's second
# AuthorizedKeysFile, so the admin still logs in and reaches the broken file over SFTP.

FAILURE_REASON = r"Failure \(the node gives no reason; a full or read-only file system is one\)"


def restart_with(node, **settings):
    node.stop()
    for name, value in settings.items():
        setattr(node, name, value)
    node.start()


def ssh_dir_not_writable(lab, node):
    ssh_dir = node.authorized_keys_path.parent
    ssh_dir.chmod(0o555)
    return (r"sftp: cannot create \.ssh/\.pulse-sensor-proxy\.lock: Permission denied", True,
            lambda: ssh_dir.chmod(0o700))


def file_not_readable(lab, node):
    node.authorize_elsewhere(lab.admin.public_line)
    os.chown(node.authorized_keys_path, 0, 0)
    return (r"sftp: cannot read \.ssh/authorized_keys: Permission denied", False,
            lambda: os.chown(node.authorized_keys_path, node.uid, node.account.gid))


def read_only_file_system(lab, node):
    ssh_dir = node.authorized_keys_path.parent
    restart_with(node, mount_script=f"mount --bind -o ro {ssh_dir} {ssh_dir}")
    return (r"sftp: cannot create \.ssh/\.pulse-sensor-proxy\.lock: " + FAILURE_REASON, True,
            lambda: restart_with(node, mount_script=None))


def full_file_system(lab, node):
    """A 64 KiB tmpfs over ~/.ssh, holding the node's files and filled up to the last block."""
    ssh_dir = node.authorized_keys_path.parent
    stash = node.account.state_dir / "ssh-stash"
    subprocess.run(["cp", "-a", str(ssh_dir), str(stash)], check=True)   # owners and modes kept
    restart_with(node, mount_script=(
        f"mount -t tmpfs -o size=64k,mode=0700,uid={node.uid},gid={node.account.gid} "
        f"full {ssh_dir}\ncp -a {stash}/. {ssh_dir}/\n"
        f"dd if=/dev/zero of={ssh_dir}/.filler bs=4096 2>/dev/null || true"))
    return (r"cannot write the new \.ssh/authorized_keys: sftp: cannot write "
            r"\.ssh/\.authorized_keys\.[0-9a-f]{12}\.tmp: " + FAILURE_REASON, True,
            lambda: restart_with(node, mount_script=None))


def file_is_a_directory(lab, node):
    node.authorize_elsewhere(lab.admin.public_line)
    path = node.authorized_keys_path
    original = path.read_text()
    path.unlink()
    path.mkdir(mode=0o700)
    os.chown(path, node.uid, node.account.gid)

    def undo():
        path.rmdir()
        node.write_authorized_keys(original)
    return r"\.ssh/authorized_keys is a directory, not a file; refusing to edit it", False, undo


def symlink_loop(lab, node):
    node.authorize_elsewhere(lab.admin.public_line)
    path = node.authorized_keys_path
    original = path.read_text()
    path.unlink()
    path.symlink_to("authorized_keys")

    def undo():
        path.unlink()
        node.write_authorized_keys(original)
    return r"\.ssh/authorized_keys: too many levels of symbolic links", False, undo


def no_sftp_subsystem(lab, node):
    restart_with(node, sftp_subsystem=False)
    return (r"sftp: n1 offers no SFTP \(Session request failed\): \.ssh/authorized_keys is "
            r"edited over SFTP only \(`Subsystem sftp` in the node's sshd_config\)", True,
            lambda: restart_with(node, sftp_subsystem=True))


SFTP_FAULTS = [ssh_dir_not_writable, file_not_readable, read_only_file_system, full_file_system,
               file_is_a_directory, symlink_loop, no_sftp_subsystem]
KEY_COMMANDS = {"keys push": "install the key", "keys revoke": "remove the key",
                "rotate-keys": "add the new key"}


@pytest.mark.parametrize("command", KEY_COMMANDS)
@pytest.mark.parametrize("fault", SFTP_FAULTS, ids=lambda fault: fault.__name__)
def test_an_sftp_failure_on_a_node_is_one_line_and_changes_nothing_there(lab, fault, command):
    lab = lab(count=2, push=command != "keys push")
    broken, healthy = lab.nodes
    current = lab.current_public()
    error, key_works, undo = fault(lab, broken)
    ssh_dir = broken.authorized_keys_path.parent
    seen = (lambda: broken.in_namespace(ssh_dir)) if broken.mount_script else (lambda: ssh_dir)
    before = snapshot(seen())
    extra = ["--fingerprint", psp.key_fingerprint(current)] if command == "keys revoke" else []
    out = lab.cli(*command.split(), *extra)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(rf"^  n1: FAILED to {KEY_COMMANDS[command]}: {error}$", out.stdout, re.M), \
        out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert snapshot(seen()) == before, "the node's files changed"
    proxy_keys = [k for k in lab.keys_on(healthy) if k != lab.admin.public_line.split()[1]]
    assert proxy_keys == ([] if command == "keys revoke" else [current.split()[1]])
    if command == "rotate-keys":
        assert lab.current_public() == current
        assert not (lab.state / "ssh.d" / "rotation.json").exists()
        if key_works:
            assert lab.all_temperatures_work()
        undo()
        assert lab.all_temperatures_work(), "the current key works on every node again"
