"""Read a get_temperature answer's `temperature` string as Pulse v5.0.17 does.

Written from the rules of Pulse's internal/monitoring/temperature.go (parseSensorsJSON,
smartEntryRaw, normalizeSMARTEntries):

* The wrapper form `{"sensors": {...}, "smart": [DISK, ...]}` is used only when the whole text
  unmarshals into the wrapper struct and `sensors` is a non-null object; otherwise the text is
  read as plain `sensors -j` output (a map), and any SMART part is lost without an error.
* Unmarshalling the wrapper fails (and so falls back) when a field has the wrong JSON type:
  `temperature` is a Go *int (a fraction, an exponent or a string fails; null is nil),
  `device`, `serial`, `wwn`, `model`, `type`, `lastUpdated` are strings, `standbySkipped` a
  bool (null leaves any field at its zero value). Field names match case-insensitively, as
  encoding/json matches them; other keys are ignored.
* Each entry: strings trimmed, an entry without a device dropped, a nil temperature becomes
  0, `lastUpdated` parsed with time.RFC3339 (unparsable: the zero time).
"""

import datetime
import re

import gojson

DISK_FIELDS = {"device": str, "serial": str, "wwn": str, "model": str, "type": str,
               "temperature": int, "lastupdated": str, "standbyskipped": bool}
RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")
INT64 = range(-2 ** 63, 2 ** 63)


class Unmarshal(Exception):
    """json.Unmarshal into the wrapper struct returned an error."""


def _field(value, kind):
    if value is None:
        return None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value in INT64
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise Unmarshal(f"cannot unmarshal {type(value).__name__} into {kind.__name__}")
    return value


def _disk(entry):
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise Unmarshal("cannot unmarshal a non-object into smartEntryRaw")
    disk = {}
    for key, value in entry.items():        # later keys win, as encoding/json decodes in order
        kind = DISK_FIELDS.get(key.lower())
        if kind is not None:
            disk[key.lower()] = _field(value, kind)
    return disk


def _wrapper(doc):
    """(sensors map or None, [raw entries]) of the wrapper struct, or Unmarshal."""
    if not isinstance(doc, dict):
        raise Unmarshal("not an object")
    sensors, smart = None, None
    for key, value in doc.items():
        if key.lower() == "sensors":
            if value is not None and not isinstance(value, dict):
                raise Unmarshal("sensors is not an object")
            sensors = value
        elif key.lower() == "smart":
            if value is not None and not isinstance(value, list):
                raise Unmarshal("smart is not an array")
            smart = [_disk(entry) for entry in value or []]
    return sensors, smart or []


def _time(text):
    match = RFC3339.fullmatch(text)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = datetime.timedelta(0) if zone == "Z" else (
        (1 if zone[0] == "+" else -1) * datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:])))
    try:
        return datetime.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                 int(second), int((fraction or "0")[:6].ljust(6, "0")),
                                 tzinfo=datetime.timezone(offset))
    except ValueError:
        return None


def _normalize(raw):
    disks = []
    for entry in raw:
        device = (entry.get("device") or "").strip()
        if not device:
            continue
        disks.append({"device": device,
                      "serial": (entry.get("serial") or "").strip(),
                      "wwn": (entry.get("wwn") or "").strip(),
                      "model": (entry.get("model") or "").strip(),
                      "type": (entry.get("type") or "").strip(),
                      "temperature": entry.get("temperature") or 0,
                      "lastUpdated": _time(entry.get("lastupdated") or ""),
                      "standbySkipped": bool(entry.get("standbyskipped"))})
    return disks


def parse_temperature(text):
    """(the sensors map, [disks as Pulse's models.DiskTemp], wrapper form used?).

    Raises gojson.GoDecodeError where Pulse fails the whole reading."""
    if not text.strip():
        raise gojson.GoDecodeError("empty sensors output")
    doc = gojson.decode(text)
    try:
        sensors, raw = _wrapper(doc)
    except Unmarshal:
        sensors, raw = None, []
    if sensors is not None:
        return sensors, _normalize(raw), True
    if doc is not None and not isinstance(doc, dict):
        raise gojson.GoDecodeError("cannot unmarshal into map[string]interface{}")
    return doc or {}, [], False
