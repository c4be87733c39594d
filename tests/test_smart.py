"""Disk temperatures from SMART: the node program's report parsed into Pulse's DISK objects.

Fixtures (tests/fixtures/smart/*.out) are smartctl 7.x JSON outputs; each file says where it
comes from. Lines starting with `#` are the citation, never part of the output.
"""
import asyncio
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import pulse_sensor_proxy as psp
from conftest import (MODULE, PYTHON, STRANGER_UID, as_uid, metric_samples, run_cli,
                      temperature, wait_for)
from pulse_temperature import parse_temperature
from sshnodes import DEFAULT_FIXTURE, ssh_command

SMART_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "smart"
READ_AT = 1796300000.0                  # 2026-12-03T12:13:20Z
STAMP = "2026-12-03T12:13:20Z"


def fixture(name):
    """A fixture's output, as the smartctl or lsblk stand-in prints it."""
    lines = (SMART_FIXTURES / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


def frame(name, output, status):
    """One disk's frame, exactly as SMART_PROGRAM prints it (echo after the raw output)."""
    return f"@@disk {name}\n{output}\n@@status {status}\n"


SATA = {"device": "/dev/sda", "serial": "REDACTED", "wwn": "0x5000c500499602d2",
        "model": "ST18000NM000J-2TV103", "type": "sat", "temperature": 24,
        "lastUpdated": STAMP, "standbySkipped": False}
ATA_194 = {"device": "/dev/sdb", "serial": "REDACTED", "wwn": "0x5000cca0499602d2",
           "model": "HGST HUS724020ALE640", "type": "sat", "temperature": 26,
           "lastUpdated": STAMP, "standbySkipped": False}
STANDBY = {"device": "/dev/sdc", "temperature": None, "lastUpdated": STAMP,
           "standbySkipped": True}
SAS = {"device": "/dev/sde", "serial": "REDACTED", "wwn": "", "model": "SEAGATE ST373453LC",
       "type": "scsi", "temperature": 33, "lastUpdated": STAMP, "standbySkipped": False}
NVME = {"device": "/dev/nvme0n1", "serial": "REDACTED", "wwn": "", "model": "CT250P2SSD8",
        "type": "nvme", "temperature": 26, "lastUpdated": STAMP, "standbySkipped": False}

# (disk, fixture, exit status, the DISK object or the reason it is missing)
CASES = [
    ("sda", "sata-temperature-current.out", 0, SATA),
    ("sdb", "ata-attribute-194.out", 64, ATA_194),
    ("sdc", "standby.out", 2, STANDBY),
    ("sdd", "usb-bridge.out", 1,
     "smartctl exit status 1: /dev/sdd: Unknown USB bridge [0x0bda:0x9201 (0xf200)]"),
    ("sde", "sas.out", 0, SAS),
    ("nvme0n1", "nvme.out", 0, NVME),
]


@pytest.mark.parametrize("name,fixture_name,status,expected", CASES,
                         ids=[case[1] for case in CASES])
def test_each_fixture_gives_its_disk_object(name, fixture_name, status, expected):
    disks, missing = psp.parse_smart_report(frame(name, fixture(fixture_name), status).encode(),
                                            READ_AT)
    if isinstance(expected, dict):
        assert (disks, missing) == ([expected], [])
    else:
        assert (disks, missing) == ([], [(f"/dev/{name}", expected)])


def test_a_whole_report_keeps_the_order_and_skips_what_has_no_reading():
    report = "".join(frame(name, fixture(f), status) for name, f, status, _ in CASES)
    disks, missing = psp.parse_smart_report(report.encode(), READ_AT)
    assert disks == [SATA, ATA_194, STANDBY, SAS, NVME]
    assert [device for device, _ in missing] == ["/dev/sdd"]


HUNG = "{\n  \"json_format_version\": [\n    1,\n    0\n  ],\n  \"smartctl\": {"


@pytest.mark.parametrize("report,why", [
    (frame("sdf", HUNG, 124), "smartctl timed out after 5 s"),
    (frame("sdf", "", 137), "smartctl timed out (killed) after 5 s"),
    (frame("sdf", "sh: 1: smartctl: not found", 127),
     "smartctl is not installed (apt install smartmontools)"),
    (frame("sdf", "Smartctl open device: /dev/sdf failed: Permission denied", 2),
     "smartctl printed no JSON (exit status 2)"),
    ("@@disk sdf\n" + HUNG, "smart report ended inside this disk's frame"),
    (frame("sdf", "[1, 2]", 0), "smartctl printed no JSON (exit status 0)"),
], ids=["timeout", "killed", "not-installed", "no-json", "cut-off", "not-an-object"])
def test_a_disk_without_a_reading_is_missing_with_its_reason(report, why):
    assert psp.parse_smart_report(report.encode(), READ_AT) == ([], [("/dev/sdf", why)])


def test_exit_status_2_without_the_standby_message_is_an_error_not_standby():
    """Bit 1 also means "device open failed": only smartctl's message says the drive sleeps."""
    doc = json.loads(fixture("standby.out"))
    doc["smartctl"]["messages"] = [{"string": "Smartctl open device: /dev/sdc [SAT] failed: "
                                    "No such device", "severity": "error"}]
    disks, missing = psp.parse_smart_report(frame("sdc", json.dumps(doc), 2).encode(), READ_AT)
    assert disks == [] and missing == [("/dev/sdc", "smartctl exit status 2: Smartctl open "
                                        "device: /dev/sdc [SAT] failed: No such device")]


@pytest.mark.parametrize("doc,temperature", [
    ({"temperature": {"current": 38}}, 38),
    ({"temperature": {"current": 38.5}, "nvme_smart_health_information_log": {"temperature": 39}}, 39),
    ({"ata_smart_attributes": {"table": [{"id": 194, "raw": {"value": 0x29000D001A}}]}}, 26),
    ({"ata_smart_attributes": {"table": [{"id": 194, "raw": {"value": 0x0100}}]}}, None),
    ({"ata_smart_attributes": {"table": [{"id": 190, "raw": {"value": 30}}]}}, None),
    ({"nvme_smart_health_information_log": {"temperature": 41}}, 41),
    ({"temperature": {"current": True}}, None),
    ({}, None),
], ids=["current", "float-current-falls-through", "attr-194-low-16-bits", "attr-194-implausible",
        "attr-190-is-not-194", "nvme-log", "bool", "nothing"])
def test_temperature_sources_in_order(doc, temperature):
    assert psp.disk_temperature(doc) == temperature


def test_a_disk_with_no_temperature_is_left_out():
    doc = json.loads(fixture("sata-temperature-current.out"))
    del doc["temperature"]
    doc["ata_smart_attributes"]["table"] = [a for a in doc["ata_smart_attributes"]["table"]
                                            if a["id"] != 194]
    disks, missing = psp.parse_smart_report(frame("sda", json.dumps(doc), 0).encode(), READ_AT)
    assert (disks, missing) == ([], [("/dev/sda", "no temperature in smartctl's output")])


@pytest.mark.parametrize("name", ["../etc", "sd a", "-o", ""])
def test_frame_names_that_are_no_block_device_are_refused(name):
    report = frame(name, fixture("sata-temperature-current.out"), 0)
    disks, missing = psp.parse_smart_report(report.encode(), READ_AT)
    assert disks == [] and [why for _, why in missing] in ([], ["not a block device name"])


SMART_KEYS = ["smartctl", "messages", "string", "temperature", "current", "device", "type",
              "ata_smart_attributes", "table", "id", "raw", "value", "wwn", "naa", "oui",
              "serial_number", "model_name", "nvme_smart_health_information_log"]
smartctl_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(SMART_KEYS) | st.text(max_size=6), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(doc=smartctl_like, status=st.integers(0, 255) | st.text(max_size=4))
def test_any_smartctl_output_gives_a_disk_or_a_reason_never_an_exception(doc, status):
    report = f"@@disk sda\n{json.dumps(doc)}\n@@status {status}\n".encode()
    disks, missing = psp.parse_smart_report(report, READ_AT)
    assert len(disks) + len(missing) == 1
    for disk in disks:      # what Pulse needs, or it drops every disk
        assert isinstance(disk["device"], str) and disk["lastUpdated"] == STAMP
        assert disk["temperature"] is None or type(disk["temperature"]) is int
        assert all(type(disk[k]) is str for k in ("serial", "wwn", "model", "type") if k in disk)


def test_wwn_is_the_full_naa_identifier():
    assert psp.disk_wwn({"naa": 5, "oui": 0x000cca, "id": 0x22de29356}) == "0x5000cca22de29356"
    assert psp.disk_wwn({"naa": 5, "oui": 3152}) == ""
    assert psp.disk_wwn({"naa": "5", "oui": 1, "id": 1}) == ""
    assert psp.disk_wwn(None) == ""


# -- the answer as Pulse's parser reads it ------------------------------------------------------

SENSORS = Path(__file__).resolve().parent / "fixtures" / "sensors" / "intel-coretemp-nvme.json"


def test_pulse_reads_both_parts_of_the_wrapped_answer():
    report = "".join(frame(name, fixture(f), status) for name, f, status, _ in CASES)
    disks, _ = psp.parse_smart_report(report.encode(), READ_AT)
    sensors_text, _ = psp.interpret_sensors_output(SENSORS.read_bytes(), b"", 0)
    sensors, pulse_disks, wrapped = parse_temperature(psp.with_smart(sensors_text, json.dumps(disks)))
    assert wrapped and sensors == json.loads(SENSORS.read_text())
    assert [(d["device"], d["temperature"], d["standbySkipped"]) for d in pulse_disks] == [
        ("/dev/sda", 24, False), ("/dev/sdb", 26, False), ("/dev/sdc", 0, True),
        ("/dev/sde", 33, False), ("/dev/nvme0n1", 26, False)]
    assert pulse_disks[0]["lastUpdated"].isoformat() == "2026-12-03T12:13:20+00:00"
    assert pulse_disks[0]["wwn"] == SATA["wwn"] and pulse_disks[0]["model"] == SATA["model"]


def test_pulse_reads_plain_sensors_output_as_before():
    sensors_text, _ = psp.interpret_sensors_output(SENSORS.read_bytes(), b"", 0)
    assert parse_temperature(sensors_text) == (json.loads(SENSORS.read_text()), [], False)


@pytest.mark.parametrize("disk", [
    dict(SATA, temperature=24.5), dict(SATA, serial=12345), dict(SATA, standbySkipped="no"),
], ids=["float-temperature", "number-serial", "string-bool"])
def test_pulse_drops_the_smart_part_when_a_field_has_the_wrong_type(disk):
    """Why the proxy sends integers and strings: one wrong type loses every disk silently."""
    sensors, disks, wrapped = parse_temperature(psp.with_smart('{"a": {}}', json.dumps([disk])))
    assert (disks, wrapped) == ([], False) and "sensors" in sensors


# -- configuration and the key line --------------------------------------------------------------

def test_disk_temperatures_default_on_every_30_minutes():
    config = psp.validate_config({})
    assert config["disk_temperatures"] is True and config["smart_interval"] == 1800.0
    assert psp.validate_config({"smart_interval": "1h"})["smart_interval"] == 3600.0
    assert psp.validate_config({"disk_temperatures": False})["disk_temperatures"] is False


@pytest.mark.parametrize("raw,problem", [
    ({"disk_temperatures": "yes"}, "config: disk_temperatures: got 'yes', expected true or false"),
    ({"smart_interval": 10}, "config: smart_interval: got 10, expected at least 60 seconds "
                             "(each read costs every disk a query)"),
    ({"smart_interval": "soon"}, "config: smart_interval: got 'soon', expected seconds or a "
                                 "duration such as 30m"),
])
def test_bad_disk_settings_are_refused_with_one_line_each(raw, problem):
    with pytest.raises(psp.ConfigError) as caught:
        psp.validate_config(raw)
    assert caught.value.problems == [problem]


PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClS3OhHgiDsZx5fXUzLvdNYrSznP4QgBXMtyhhMVV9F x"


def test_key_line_with_disk_temperatures_forces_the_fixed_program():
    line = psp.authorized_keys_line(PUBLIC, ["10.0.0.0/24"], disk_temperatures=True)
    options, _, key, _ = psp.parse_authorized_key(line)
    assert f'command="{psp.SMART_PROGRAM}"' in options and key == PUBLIC.split()[1]
    assert '"' not in psp.SMART_PROGRAM and "\\" not in psp.SMART_PROGRAM
    off = psp.authorized_keys_line(PUBLIC, ["10.0.0.0/24"], disk_temperatures=False)
    assert 'command="sensors -j",' in off


@pytest.mark.parametrize("legacy", [
    'command="sensors -j",no-pty',
    'command="/usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh",from="10.0.0.1",no-pty',
    'from="10.0.0.1",command="/opt/pulse/sensor-proxy/bin/pulse-sensor-wrapper.sh",restrict',
], ids=["ours-today", "original-libexec-wrapper", "original-opt-wrapper"])
def test_older_lines_of_our_key_are_upgraded_byte_exact(legacy):
    key_type, key = PUBLIC.split()[:2]
    ours = psp.authorized_keys_line(PUBLIC, ["10.0.0.0/24"], disk_temperatures=True)
    data = (b"ssh-rsa AAAAB3 a@b\r\n" + f"{legacy} {key_type} {key} pulse-sensor-proxy\r\n".encode()
            + b"ssh-rsa AAAAB4 c@d")
    upgraded, changes = psp.edit_authorized_keys(data, ours)
    assert upgraded == b"ssh-rsa AAAAB3 a@b\r\n" + ours.encode() + b"\r\n" + b"ssh-rsa AAAAB4 c@d"
    assert changes == [("upgraded", key)]


# -- the node program for real, on sshd nodes with smartctl and lsblk stand-ins ------------------

NODE_DISKS = {"sda": (fixture("sata-temperature-current.out"), 0),
              "sdb": (fixture("ata-attribute-194.out"), 64),
              "sdc": (fixture("standby.out"), 2),
              "sdd": (fixture("usb-bridge.out"), 1),
              "sde": (fixture("sas.out"), 0),
              "sdf": ("", "hang"),
              "nvme0n1": (fixture("nvme.out"), 0)}
READ_DISKS = ["sda", "sdb", "sdc", "sdd", "sde", "sdf", "nvme0n1"]   # lsblk's order, type disk
STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def smart_node(cluster, **config):
    """One node whose authorized_keys forces the production program (disk temperatures on)."""
    daemon, (node,) = cluster(1, authorize=False, disk_temperatures=True,
                              ssh={"command_timeout": 10}, **config)
    node.write_authorized_keys(psp.authorized_keys_line(daemon.public_key, ["127.0.0.1", "::1"],
                                                        disk_temperatures=True) + "\n")
    node.set_disks(fixture("lsblk.out"), NODE_DISKS)
    return daemon, node


def answer_disks(reply):
    """The DISK objects of an answer, each lastUpdated checked and then set to STAMP."""
    assert reply["success"], reply
    disks = json.loads(reply["data"]["temperature"])["smart"]
    assert all(STAMPED.fullmatch(d.pop("lastUpdated")) for d in disks), disks
    return [dict(d, lastUpdated=STAMP) for d in disks]


def test_node_program_reads_every_disk_once_without_waking_the_sleeping_one(cluster):
    daemon, node = smart_node(cluster)
    reply = temperature(daemon, "n1")
    assert answer_disks(reply) == [SATA, ATA_194, STANDBY, SAS, NVME]
    sensors, disks, wrapped = parse_temperature(reply["data"]["temperature"])
    assert wrapped and sensors == json.loads((SENSORS.parent / f"{DEFAULT_FIXTURE}.json").read_text())
    assert [d["device"] for d in disks] == ["/dev/sda", "/dev/sdb", "/dev/sdc", "/dev/sde",
                                            "/dev/nvme0n1"]
    calls = node.smartctl_calls()
    assert calls == [f"-n standby -i -A --json=o /dev/{name}" for name in READ_DISKS], \
        "one call per disk, each with -n standby; the standby drive (sdc) is not read again"
    assert node.execs() == ["sensors -j"], "sensors ran for the sensors read only"


def test_smart_is_read_once_per_interval_while_sensors_stay_fresh(cluster):
    daemon, node = smart_node(cluster)
    first = answer_disks(temperature(daemon, "n1"))
    second = temperature(daemon, "n1")
    assert answer_disks(second) == first and second["data"]["cached"] is False
    assert len(node.smartctl_calls()) == len(READ_DISKS), "no second SMART read"
    assert node.execs().count("sensors -j") == 2
    assert node.accepted_publickey_count() == 1, "sensors and SMART share one connection"
    samples = metric_samples(daemon)
    assert samples[("pulse_proxy_smart_refresh_total",
                    (("node", "n1"), ("result", "success")))] == 1
    assert samples[("pulse_proxy_smart_age_seconds", (("node", "n1"),))] >= 0


def test_a_node_whose_line_predates_disk_temperatures_still_answers_sensors(cluster):
    daemon, (node,) = cluster(1, disk_temperatures=True)     # the stand-in line: sensors only
    reply = temperature(daemon, "n1")
    assert reply["success"] and json.loads(reply["data"]["temperature"])["smart"] == []
    daemon.wait_log(lambda r: r.get("msg") == "SMART read failed"
                    and r.get("error") == psp.E_OLD_KEY_LINE, "the SMART failure logged")
    samples = metric_samples(daemon)
    assert samples[("pulse_proxy_smart_refresh_total", (("node", "n1"), ("result", "error")))] == 1


def test_with_disk_temperatures_off_the_answer_is_plain_sensors_output(cluster):
    daemon, (node,) = cluster(1)
    reply = temperature(daemon, "n1")
    fixture_text = (SENSORS.parent / f"{DEFAULT_FIXTURE}.json").read_bytes()
    assert reply["data"]["temperature"] == psp.interpret_sensors_output(fixture_text, b"", 0)[0]
    assert parse_temperature(reply["data"]["temperature"])[1:] == ([], False)
    assert node.execs() == ["sensors -j"] and node.smartctl_calls() == []


@pytest.mark.parametrize("asked,env", [
    (["id"], None), (["smart; id"], None), (["smart /dev/sda"], None), (["smart", "id"], None),
    (["id"], "SSH_ORIGINAL_COMMAND=smart"), (["sensors"], "PATH=/nonexistent"),
], ids=["id", "smart-then-id", "smart-with-device", "smart-id-argv", "env-command", "env-path"])
def test_a_client_gets_sensors_whatever_it_asks_beyond_smart(cluster, asked, env):
    daemon, node = smart_node(cluster)
    known = daemon.base / "kh"
    known.write_text(node.host_key_line + "\n")
    argv = ssh_command(node, daemon.ssh_dir / "id_ed25519", known, *asked)
    if env:
        argv[1:1] = ["-o", f"SetEnv={env}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["coretemp-isa-0000"], out.stderr
    assert node.execs() == [" ".join(asked)] and node.smartctl_calls() == []


def test_smart_mode_prints_only_frames(cluster):
    """The positive control for the test above: exactly `smart` selects the SMART read."""
    daemon, node = smart_node(cluster)
    node.set_disks("sda disk\nsr0 rom\n", {"sda": (fixture("sata-temperature-current.out"), 0)})
    known = daemon.base / "kh"
    known.write_text(node.host_key_line + "\n")
    out = subprocess.run(ssh_command(node, daemon.ssh_dir / "id_ed25519", known, "smart"),
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == frame("sda", fixture("sata-temperature-current.out"), 0).encode()
    assert node.execs() == []


BASE_TOOLS = ("cat", "sleep", "echo", "timeout", "date", "sed", "stat", "id", "awk", "head")


def node_with_only(cluster, *stand_ins):
    """A node whose program finds only some stand-ins: its key line sets PATH to a directory
    of coreutils and those (this machine has a real lm-sensors in /usr/bin)."""
    daemon, node = smart_node(cluster)
    tools = daemon.base / ("tools-" + "-".join(stand_ins))
    tools.mkdir()
    for name in BASE_TOOLS:
        (tools / name).symlink_to(shutil.which(name))
    for name in stand_ins:
        (tools / name).symlink_to(node.lab.bin_dir / name)
    line = psp.authorized_keys_line(daemon.public_key, ["127.0.0.1"], disk_temperatures=True)
    node.write_authorized_keys(line.replace('command="', f'command="PATH={tools}; ') + "\n")
    node.set_disks("sda disk\n", {"sda": (fixture("sata-temperature-current.out"), 0)})
    return daemon, node


def test_without_sensors_the_smart_part_still_comes(cluster):
    """A node without lm-sensors answers `{}` for the sensors part (as one with no sensors)."""
    daemon, node = node_with_only(cluster, "smartctl", "lsblk")
    reply = temperature(daemon, "n1")
    assert json.loads(reply["data"]["temperature"])["sensors"] == {}
    assert answer_disks(reply) == [SATA]


def test_without_smartctl_the_sensors_part_still_comes(cluster):
    daemon, node = node_with_only(cluster, "sensors", "lsblk")
    reply = temperature(daemon, "n1")
    answer = json.loads(reply["data"]["temperature"])
    assert answer["smart"] == [] and answer["sensors"]["coretemp-isa-0000"]
    daemon.wait_log(lambda r: r.get("msg") == "SMART: disks without a temperature" and r.get(
        "disks") == {"/dev/sda": "smartctl is not installed (apt install smartmontools)"},
                    "the missing smartctl logged")


def test_after_the_interval_smart_is_read_again_while_the_last_list_answers(cluster):
    """In-process pool with its own clock: at most one SMART read per smart_interval, and a
    due refresh runs behind answers that carry the last list."""
    daemon, node = smart_node(cluster)
    node.set_disks("sda disk\n", {"sda": (fixture("sata-temperature-current.out"), 0)})
    config = psp.load_config(str(daemon.config_path), environ={})
    warmer = json.loads(fixture("sata-temperature-current.out"))
    warmer["temperature"]["current"] = 31
    now = [1000.0]

    def smart_of(answer):
        return [(d["device"], d["temperature"]) for d in json.loads(answer[0])["smart"]]

    async def scenario():
        pool = psp.NodePool(config, psp.AuditLog("error", stream=io.StringIO()),
                            psp.new_metrics(), clock=lambda: now[0])
        target = psp.Node("n1", node.host, node.port, node.user)
        try:
            seen = [smart_of(await pool.fetch(target))]
            node.set_disks("sda disk\n", {"sda": (json.dumps(warmer), "hold 0")})
            now[0] += config["smart_interval"] - 1
            seen.append(smart_of(await pool.fetch(target)))
            calls_before_due = len(node.smartctl_calls())
            now[0] += 1
            seen.append(smart_of(await pool.fetch(target)))     # the refresh is held
            refresh = pool.state(target).smart_flight
            node.release_disks()
            await refresh
            seen.append(smart_of(await pool.fetch(target)))
            return seen, calls_before_due
        finally:
            await pool.close()

    seen, calls_before_due = asyncio.run(scenario())
    assert seen == [[("/dev/sda", 24)], [("/dev/sda", 24)], [("/dev/sda", 24)], [("/dev/sda", 31)]]
    assert calls_before_due == 1 and len(node.smartctl_calls()) == 2


def test_a_key_rotated_under_a_read_lets_the_read_finish(cluster):
    """A SMART read made the connection; a new key on disk makes the next read log in again,
    and the old connection is closed only after the SMART read on it ended."""
    import asyncssh

    daemon, node = smart_node(cluster)
    node.set_disks("sda disk\n", {"sda": (fixture("sata-temperature-current.out"), "hold 0")})
    config = psp.load_config(str(daemon.config_path), environ={})
    metrics = psp.new_metrics()

    async def scenario():
        pool = psp.NodePool(config, psp.AuditLog("error", stream=io.StringIO()), metrics)
        target = psp.Node("n1", node.host, node.port, node.user)
        state = pool.state(target)
        try:
            refresh = asyncio.ensure_future(pool.refresh_smart(target, state))
            await asyncio.to_thread(wait_for, lambda: node.smartctl_calls(), what="the held read")
            old = state.conn
            new = asyncssh.generate_private_key("ssh-ed25519")
            lines = [psp.authorized_keys_line(public, ["127.0.0.1", "::1"], disk_temperatures=True)
                     for public in (daemon.public_key, new.export_public_key().decode())]
            node.write_authorized_keys("\n".join(lines) + "\n")
            psp.atomic_write(pool.key_path, new.export_private_key())
            state.smart_due = float("inf")      # this fetch starts no SMART read of its own
            await pool.fetch(target)
            seen = [state.conn is not old, pool.connector.closing == {old}, old.is_closed()]
            node.release_disks()
            await refresh
            seen += [pool.connector.closing == set(), old in pool.connector.sessions]
            await old.wait_closed()
            return seen, state.smart_json
        finally:
            await pool.close()

    seen, smart = asyncio.run(scenario())
    assert seen == [True, True, False, True, False], \
        "new connection for the new key; the old one kept for its read, then closed"
    assert json.loads(smart)[0]["device"] == "/dev/sda"
    assert metrics.values["pulse_proxy_smart_refresh_total"] == {("n1", "success"): 1.0}
    assert len(node.smartctl_calls()) == 1


def test_the_local_node_gets_the_same_answer_without_ssh(daemon_factory, ssh_node):
    """This host runs the same program locally; a test node's account holds the stand-ins'
    state (USER names it), and PATH puts the stand-ins first, sensors included."""
    ssh_node.set_disks(fixture("lsblk.out"), NODE_DISKS)
    daemon = daemon_factory({"disk_temperatures": True, "ssh": {"command_timeout": 10}},
                            env={"PATH": f"{ssh_node.lab.bin_dir}:/usr/bin:/bin",
                                 "USER": ssh_node.user})
    reply = temperature(daemon, "localhost")
    assert reply["data"]["source"] == "local"
    assert answer_disks(reply) == [SATA, ATA_194, STANDBY, SAS, NVME]
    assert ssh_node.smartctl_calls() == [f"-n standby -i -A --json=o /dev/{name}"
                                         for name in READ_DISKS]
    assert ssh_node.execs() == [""], "sensors ran once, as a local program (no SSH command)"


# -- this host under the shipped unit: read as root by smart-local, kept in local_smart_file -----

TWO_DISKS = {"sda": (fixture("sata-temperature-current.out"), 0), "sdc": (fixture("standby.out"), 2)}


def test_smart_local_reads_this_host_as_root_and_the_daemon_reads_its_file(daemon_factory, ssh_node,
                                                                             tmp_path):
    """The daemon's sandbox opens no disk, so pulse-sensor-proxy-smart.service runs smart-local
    as root; the daemon takes this host's list from its file and never runs smartctl itself."""
    ssh_node.set_disks("sda disk\nsdc disk\n", TWO_DISKS)
    stored = tmp_path / "smart-state" / "local"
    stored.parent.mkdir()
    env = {"PATH": f"{ssh_node.lab.bin_dir}:/usr/bin:/bin", "USER": ssh_node.user}
    daemon = daemon_factory({"disk_temperatures": True, "local_smart_file": str(stored)}, env=env,
                            start=False)
    daemon.write_config()
    smart_local = ("smart-local", "--config", str(daemon.config_path))
    first = run_cli(*smart_local, env=env)
    assert first.returncode == 0 and first.stderr == ""
    assert first.stdout == f"{stored}: 2 disks (1 in standby, not woken)\n"
    assert stored.stat().st_mode & 0o777 == 0o644
    assert len(ssh_node.smartctl_calls()) == 2
    daemon.start()
    reply = temperature(daemon, "localhost")
    assert reply["data"]["source"] == "local"
    read_at = psp.rfc3339(stored.stat().st_mtime)
    assert answer_disks(reply) == [SATA, STANDBY]
    assert json.loads(reply["data"]["temperature"])["smart"][0]["lastUpdated"] == read_at
    assert len(ssh_node.smartctl_calls()) == 2, "the daemon ran no smartctl of its own"
    fresh = run_cli(*smart_local, env=env)
    assert fresh.returncode == 0 and "not read again (--force reads now)" in fresh.stdout
    assert len(ssh_node.smartctl_calls()) == 2
    assert run_cli(*smart_local, "--force", env=env).returncode == 0
    assert len(ssh_node.smartctl_calls()) == 4


def test_smart_local_refuses_a_caller_that_is_not_root(daemon, tmp_path):
    out = subprocess.run(as_uid(STRANGER_UID) + [PYTHON, str(MODULE), "smart-local", "--config",
                                                 str(daemon.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("pulse-sensor-proxy: error: smart-local must run as root: "
                                 "smartctl opens this host's disks")
    assert len(out.stderr.splitlines()) == 1


def test_smart_local_with_disk_temperatures_off_reads_nothing(daemon_factory, ssh_node, tmp_path):
    ssh_node.set_disks("sda disk\n", TWO_DISKS)
    stored = tmp_path / "local"
    daemon = daemon_factory({"disk_temperatures": False, "local_smart_file": str(stored)},
                            start=False)
    daemon.write_config()
    out = run_cli("smart-local", "--config", str(daemon.config_path),
                  env={"PATH": f"{ssh_node.lab.bin_dir}:/usr/bin:/bin", "USER": ssh_node.user})
    assert out.returncode == 0 and "disk temperatures are off" in out.stdout
    assert not stored.exists() and ssh_node.smartctl_calls() == []


def test_the_daemon_follows_local_smart_file_as_it_changes(ssh_node, tmp_path, monkeypatch):
    """In-process pool with its own clock: no file yet (its directory there) is a logged
    miss; a new file is taken at the next look; an unchanged one is not parsed again."""
    ssh_node.set_disks("", {})
    monkeypatch.setenv("PATH", f"{ssh_node.lab.bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("USER", ssh_node.user)
    stored = tmp_path / "local"
    config = psp.validate_config({"disk_temperatures": True, "local_smart_file": str(stored)})
    log, metrics, now = io.StringIO(), psp.new_metrics(), [1000.0]
    sata = frame("sda", fixture("sata-temperature-current.out"), 0)

    async def scenario():
        pool = psp.NodePool(config, psp.AuditLog("info", stream=log), metrics, clock=lambda: now[0])
        here = psp.Node("localhost", local=True)

        async def disks():
            await pool.fetch(here)
            flight = pool.state(here).smart_flight
            if flight is not None:
                await flight
            return [d["device"] for d in json.loads((await pool.fetch(here))[0])["smart"]]

        try:
            seen = [await disks()]
            psp.atomic_write(str(stored), sata.encode(), mode=0o644)
            now[0] += psp.SMART_RETRY
            seen.append(await disks())
            now[0] += psp.LOCAL_SMART_RECHECK
            seen.append(await disks())
            psp.atomic_write(str(stored), (sata + frame("sdc", fixture("standby.out"), 2)).encode(),
                             mode=0o644)
            os.utime(stored, (READ_AT, READ_AT))
            now[0] += psp.LOCAL_SMART_RECHECK
            seen.append(await disks())
            return seen
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == [[], ["/dev/sda"], ["/dev/sda"], ["/dev/sda", "/dev/sdc"]]
    assert metrics.values["pulse_proxy_smart_refresh_total"] == {
        ("localhost", "error"): 1.0, ("localhost", "success"): 2.0}, \
        "the unchanged file was not parsed again"
    assert f"{stored} is not there yet (systemctl start pulse-sensor-proxy-smart.service)" in log.getvalue()
    assert ssh_node.smartctl_calls() == [], "the disks were never read by the pool"


# -- keys push and rotation carry the program ----------------------------------------------------

LEGACY_COMMANDS = ["sensors -j", "/usr/local/libexec/pulse-sensor-proxy/temp-wrapper.sh",
                   "/opt/pulse/sensor-proxy/bin/pulse-sensor-wrapper.sh"]


def lab_with_disk_temperatures(lab):
    lab = lab(count=1, push=False)
    lab.daemon.config["disk_temperatures"] = True
    lab.daemon.write_config(lab.daemon.config)       # read by the root-only key commands
    return lab


@pytest.mark.parametrize("legacy", LEGACY_COMMANDS, ids=["ours", "temp-wrapper", "pulse-wrapper"])
def test_keys_push_upgrades_older_lines_of_our_key_on_the_node(lab, legacy):
    lab = lab_with_disk_temperatures(lab)
    node = lab.nodes[0]
    key_type, key = lab.current_public().split()[:2]
    foreign = "ssh-rsa AAAAB3NzaFOREIGN someone@else\n"
    node.write_authorized_keys(lab.admin_line() + f'command="{legacy}",no-pty {key_type} {key} '
                               "pulse-sensor-proxy\n" + foreign)
    assert "upgraded" in lab.push()
    line = psp.authorized_keys_line(lab.current_public(), ["127.0.0.1/32"], disk_temperatures=True)
    assert node.authorized_keys_path.read_text() == lab.admin_line() + line + "\n" + foreign


def test_rotation_installs_the_program_with_the_new_key(lab):
    lab = lab_with_disk_temperatures(lab)
    lab.push()
    old = lab.current_public()
    out = lab.cli("rotate-keys")
    assert out.returncode == 0, out.stdout + out.stderr
    new = lab.current_public()
    assert new != old
    assert lab.nodes[0].authorized_keys_path.read_text() == lab.admin_line() + psp.authorized_keys_line(
        new, ["127.0.0.1/32"], disk_temperatures=True) + "\n"
