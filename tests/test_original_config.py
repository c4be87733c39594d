"""A host upgraded from the original proxy keeps its config: translated, or ignored with why."""
import yaml

import pulse_sensor_proxy as psp
from conftest import ROOT, run_cli

EXAMPLE = ROOT / "tests" / "fixtures" / "original" / "config.example.yaml"
# Every key of the original's last config (config.go's Config struct at v5.0.17) that is not
# also ours under the same name and meaning (http_enabled, http_listen_addr, http_tls_cert,
# http_tls_key, log_level, ...).
ORIGINAL_KEYS = ["allowed_peer_uids", "allowed_peer_gids", "allowed_idmap_users", "allowed_peers",
                 "metrics_address", "read_timeout", "write_timeout", "max_ssh_output_bytes",
                 "require_proxmox_hostkeys", "allowed_nodes_file", "rate_limit", "http_auth_token",
                 "pulse_control_plane"]


def example_in(base, nodes_file_text=None):
    """The example config with its allowed_nodes_file pointing into `base`."""
    nodes_file = base / "allowed_nodes.yaml"
    if nodes_file_text is not None:
        nodes_file.write_text(nodes_file_text)
    text = EXAMPLE.read_text().replace("/etc/pulse-sensor-proxy/allowed_nodes.yaml", str(nodes_file))
    path = base / "config.yaml"
    path.write_text(text)
    return path


def test_validate_names_every_translation_and_warning(base_dir):
    out = run_cli("config", "validate", "--config", str(example_in(base_dir)))
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK"), out.stdout + out.stderr
    for key in ORIGINAL_KEYS:
        assert f": {key}" in out.stdout or f": {key}[" in out.stdout, f"{key} not named"
    assert "pulse_control_plane: ignored: nothing here takes the node list from Pulse" in out.stdout
    assert "allowed_peers[0].capabilities: `write` dropped" in out.stdout


def test_translation_means_what_the_original_meant(base_dir):
    raw = yaml.safe_load(EXAMPLE.read_text()) | {"allowed_peer_uids": [1001], "allowed_peer_gids": [2000],
                                                 "allowed_nodes": ["pve1", "10.0.0.0/24"],
                                                 "read_timeout": "1m30s"}
    doc, notes, problems = psp.translate_original(raw, lambda path: "allowed_nodes:\n  - pve2\n")
    assert problems == []
    config = psp.validate_config(doc)
    assert config["allowed_peers"][0]["capabilities"] == frozenset({"read", "admin"})
    assert config["allowed_peers"][1]["capabilities"] == frozenset({"read"})
    assert {"uids": (1001, 1001), "gid": None, "capabilities": frozenset({"read", "admin"})} \
        in config["allowed_peers"]
    assert {"uids": (0, 0xFFFFFFFF), "gid": 2000, "capabilities": frozenset({"read", "admin"})} \
        in config["allowed_peers"]
    assert config["metrics_address"] == "127.0.0.1:9127"
    assert config["ssh"]["max_output_bytes"] == 1048576 and config["host_key_policy"] == "tofu"
    assert config["rate_limit"]["per_minute"] == 60 and config["rate_limit"]["burst"] == 5
    assert list(config["nodes"]) == ["pve1", "pve2"]
    assert any("10.0.0.0/24" in note for note in notes)
    assert any(note.startswith("read_timeout: ignored") and "not 90 s" in note for note in notes)


def test_peer_ids_of_a_config_without_allowed_peers_become_its_peers():
    """The original's older configs grant by allowed_peer_uids/gids alone: those grants stay."""
    doc, notes, problems = psp.translate_original({"allowed_peer_uids": [100000],
                                                   "allowed_peer_gids": [33]}, lambda path: "")
    assert problems == []
    assert psp.validate_config(doc)["allowed_peers"] == [
        {"uids": (100000, 100000), "gid": None, "capabilities": frozenset({"read", "admin"})},
        {"uids": (0, 0xFFFFFFFF), "gid": 33, "capabilities": frozenset({"read", "admin"})}]
    assert [note.split(":")[0] for note in notes] == ["allowed_peer_uids", "allowed_peer_gids"]
    assert "allowed_peers" not in psp.translate_original({"log_level": "info"}, lambda path: "")[0]


def test_bad_values_and_unknown_keys_are_still_errors(base_dir):
    for bad, expected in [({"read_timeout": "soon"}, "read_timeout: got 'soon', expected a duration"),
                          ({"allowed_peer_uids": ["x"]}, "allowed_peer_uids: got ['x']"),
                          ({"rate_limit": {"per_peer_interval_ms": 0}}, "per_peer_interval_ms: got 0"),
                          ({"alowed_nodes": []}, "unknown key 'alowed_nodes'")]:
        path = base_dir / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        out = run_cli("config", "validate", "--config", str(path))
        assert out.returncode == 1 and expected in out.stdout, (bad, out.stdout)


def test_serve_starts_with_the_original_config(daemon_factory, base_dir):
    daemon = daemon_factory(start=False)
    text = example_in(base_dir, "- pve1\n- pve2\n").read_text().replace(
        'metrics_address: "default"', 'metrics_address: "disabled"')
    ours = {k: daemon.config[k] for k in ("socket_path", "ssh_dir", "subuid_file")}
    daemon.config_path.write_text(text + yaml.safe_dump(ours))
    daemon.write_config = lambda *args, **kwargs: None     # keep the file as written above
    daemon.start()
    status = daemon.rpc("get_status")
    assert status["success"], status
    assert daemon.rpc("get_temperature", {"node": "pve9"})["error"] == \
        'node "pve9" not in allowlist (known: pve1, pve2)'
    notes = [r for r in daemon.log_records() if r.get("msg", "").startswith("Config key of")]
    assert any(r["note"].startswith("pulse_control_plane: ignored") for r in notes), notes


def test_migrate_writes_our_vocabulary_and_keeps_a_backup(base_dir):
    path = example_in(base_dir, "allowed_nodes:\n  - pve1\n")
    original = path.read_bytes()
    preview = run_cli("config", "migrate", "--config", str(path))
    assert preview.returncode == 0 and path.read_bytes() == original, "without --write: unchanged"
    out = run_cli("config", "migrate", "--config", str(path), "--write")
    assert out.returncode == 0, out.stderr
    assert (base_dir / "config.yaml.bak").read_bytes() == original
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(preview.stdout)
    again = run_cli("config", "validate", "--config", str(path))
    assert again.returncode == 0 and again.stdout.strip() == "OK", again.stdout
    migrated = yaml.safe_load(path.read_text())
    assert migrated["nodes"] == {"pve1": None}
    assert migrated["http_listen_addr"] == "0.0.0.0:8443", "the HTTPS mode's keys are kept"
