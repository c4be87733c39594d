"""Disk temperatures from SMART: the node program's report parsed into Pulse's DISK objects.

Fixtures (tests/fixtures/smart/*.out) are smartctl 7.x JSON outputs; each file says where it
comes from. Lines starting with `#` are the citation, never part of the output.
"""
import json
from pathlib import Path

import pytest

import pulse_sensor_proxy as psp
from pulse_temperature import parse_temperature

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
