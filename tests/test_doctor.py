"""`doctor` against the real parts: real sshd nodes, the daemon's real socket and key files.

Each test breaks one link and expects doctor to name exactly that link, its target and the
fix, with nothing else failing; one listing with hashes shows it changes nothing.
"""
import hashlib
import json
import os
from pathlib import Path

import pytest


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
    assert failed["fix"] == "pulse-sensor-proxy keys push --node n2"


def test_a_key_line_without_the_forced_command(healthy):
    node = healthy.nodes[0]
    node.write_authorized_keys(healthy.admin_line() + healthy.current_public() + "\n")
    failed = only_failure(healthy, "node-key", "n1")
    assert "does not force `sensors -j`" in failed["detail"]
    assert failed["fix"] == "pulse-sensor-proxy keys push --node n1"


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
