"""request_cleanup: who may queue it, what it writes, and the root command that acts on it."""
import json

import pulse_client as pulse
import pulse_sensor_proxy as psp
from conftest import CLEANER_UID as CLEANER, READER_UID as READER


def request_file(daemon):
    return daemon.base / "state" / psp.CLEANUP_REQUEST


def test_root_and_cleanup_peers_queue_and_a_reader_is_refused(daemon_factory):
    daemon = daemon_factory({"allowed_peers": [{"uid": READER},
                                               {"uid": CLEANER, "capabilities": ["cleanup"]}]})
    root = daemon.rpc("request_cleanup", {"host": "pve2", "reason": "node removed"})
    assert root["success"] and root["data"] == {"queued": True}
    assert daemon.rpc("request_cleanup", {"host": "pve2"})["data"] == {"queued": True}
    cleaner = daemon.rpc("request_cleanup", {"host": "https://pve3.example.lan:8006"}, uid=CLEANER)
    assert cleaner["success"] and cleaner["data"] == {"queued": True}, cleaner
    refused = daemon.rpc("request_cleanup", {"host": "pve4"}, uid=READER)
    assert refused["error"] == psp.E_FORBIDDEN_CLEANUP and pulse.classify(refused["error"]) == pulse.AUTH
    bad = daemon.rpc("request_cleanup", {"host": "a;b"})
    assert pulse.classify(bad["error"]) == pulse.NODE and "rejected by validator" in bad["error"]
    assert pulse.classify(daemon.rpc("request_cleanup")["error"]) == pulse.NODE
    pending = json.loads(request_file(daemon).read_text())
    assert pending["hosts"] == ["pve2", "pve3.example.lan"], "one file; pve2 once; pve4 never"
    assert oct(request_file(daemon).stat().st_mode & 0o777) == "0o640"
    records = [r for r in daemon.log_records() if r.get("msg", "").startswith("Cleanup requested")]
    assert {r["node"] for r in records} == {"pve2", "pve3.example.lan"} and records[0]["uid"] == 0


def test_cleanup_command_removes_the_key_from_the_named_node_only(lab):
    lab = lab(2)
    key = lab.current_public().split()[1]
    assert lab.daemon.rpc("request_cleanup", {"host": "n1"})["data"] == {"queued": True}
    preview = lab.cli("cleanup", "--dry-run")
    assert preview.returncode == 0 and request_file(lab.daemon).exists(), preview.stdout
    assert key in lab.keys_on(lab.nodes[0])
    out = lab.cli("cleanup")
    assert out.returncode == 0, out.stdout + out.stderr
    assert key not in lab.keys_on(lab.nodes[0]) and key in lab.keys_on(lab.nodes[1])
    assert not request_file(lab.daemon).exists()
    assert lab.daemon.rpc("get_temperature", {"node": "n2"})["success"]
    assert lab.cli("cleanup").stdout.strip() == "No cleanup request pending."
