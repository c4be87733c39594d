"""Decode JSON the way Pulse's Go client does (encoding/json), as strictly as it can fail.

encoding/json follows RFC 8259: no NaN or Infinity (Python's json accepts both), no trailing
commas, no comments, nothing after the value, no number beyond float64 (Pulse decodes the
sensors map into interface{} values: every number is a float64). It tolerates a repeated key
(the last wins), but nothing the daemon sends may rely on that, so a repeated key fails here.
"""

import json
import math


class GoDecodeError(ValueError):
    pass


def _no_constant(name):
    raise GoDecodeError(f"invalid character in literal {name!r}")


def _no_repeated_keys(pairs):
    keys = [key for key, _ in pairs]
    repeated = {key for key in keys if keys.count(key) > 1}
    if repeated:
        raise GoDecodeError(f"repeated key {sorted(repeated)[0]!r}")
    return dict(pairs)


def _float64(literal):
    if math.isinf(float(literal)):
        raise GoDecodeError(f"cannot unmarshal number {literal[:20]} into Go value of type float64")
    return float(literal)


def _float64_int(literal):
    _float64(literal)
    return int(literal)


def decode(text):
    """The value of `text`, or GoDecodeError where encoding/json would not return it alike."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeated_keys,
                          parse_float=_float64, parse_int=_float64_int)
    except GoDecodeError:
        raise
    except ValueError as exc:
        raise GoDecodeError(str(exc)) from None


def check_reply(reply_text):
    """Decode a daemon reply line and, in a get_temperature answer, its `temperature` string
    (Pulse unmarshals that string a second time into the sensors map)."""
    reply = decode(reply_text)
    data = reply.get("data") if isinstance(reply, dict) else None
    if isinstance(data, dict) and isinstance(data.get("temperature"), str):
        if not isinstance(decode(data["temperature"]), dict):
            raise GoDecodeError("temperature is not a JSON object")
    return reply
