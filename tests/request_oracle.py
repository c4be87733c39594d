"""What the protocol promises for one request line, written from docs/protocol.md, not from the
daemon's parser.

The rules, as the protocol states them (Framing and the Errors table):
- ASCII whitespace around a line is ignored; a line of nothing else is `empty request`.
- The rest must be one JSON text by RFC 8259's grammar, in UTF-8, whose value is an object
  with a string `method` and a `params` that is absent, null or an object. Anything else,
  a name twice in one object, or an integer of more than 4,300 digits is
  `invalid request format`; nesting deeper than 100 levels may be refused the same way.
- `get_status` is served; another method of the table is served or refused with a specific
  error; any other method is `unknown method`.

The grammar is read here by a small parser of its own (RFC 8259, section 2-7), so that the
daemon's use of Python's json module is checked, not repeated.
"""
import re

EMPTY = "empty request"
INVALID = "invalid request format"
UNKNOWN_METHOD = "unknown method"
SERVED = "served"                  # get_status answers with success
ANY_SPECIFIC = "any specific"      # a known method: served, or a specific error

LINE_WHITESPACE = b" \t\r\n\x0b\x0c"
MAX_INT_DIGITS = 4300
DEEPEST_SURE = 100

_WS = " \t\n\r"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_LITERALS = (("true", True), ("false", False), ("null", None))


class NotJson(ValueError):
    pass


class _OpenObject:
    def __init__(self):
        self.value, self.name = {}, None


class _Reader:
    """RFC 8259 over one str, without recursion (so any depth is read), noting the deepest
    nesting. Open arrays are lists on a stack, open objects _OpenObject; objects become dicts,
    and a name given twice is NotJson (the protocol's rule)."""

    def __init__(self, text):
        self.text, self.at, self.deepest = text, 0, 0

    def skip_ws(self):
        while self.at < len(self.text) and self.text[self.at] in _WS:
            self.at += 1

    def peek(self):
        self.skip_ws()
        return self.text[self.at:self.at + 1]

    def expect(self, char):
        if self.peek() != char:
            raise NotJson(f"{char!r} expected at {self.at}")
        self.at += 1

    def string(self):
        self.expect('"')
        units = []
        while True:
            char = self.text[self.at:self.at + 1]
            if not char:
                raise NotJson("unterminated string")
            self.at += 1
            if char == '"':
                return _join_utf16(units)
            if char < " ":
                raise NotJson("unescaped control character")
            if char != "\\":
                units.append(char)
                continue
            escape = self.text[self.at:self.at + 1]
            if escape and escape in _ESCAPES:
                units.append(_ESCAPES[escape])
                self.at += 1
            elif escape == "u" and _HEX4.fullmatch(self.text[self.at + 1:self.at + 5]):
                units.append(chr(int(self.text[self.at + 1:self.at + 5], 16)))
                self.at += 5
            else:
                raise NotJson("bad escape")

    def scalar(self):
        for word, value in _LITERALS:
            if self.text.startswith(word, self.at):
                self.at += len(word)
                return value
        number = _NUMBER.match(self.text, self.at)
        if not number:
            raise NotJson(f"no value at {self.at}")
        self.at = number.end()
        literal = number.group()
        if number.group(1) is None and number.group(2) is None:
            if len(literal.lstrip("-")) > MAX_INT_DIGITS:
                raise NotJson("integer of more than 4,300 digits")
            return int(literal)
        return float(literal)

    def open_container(self, stack, char):
        self.at += 1
        stack.append([] if char == "[" else _OpenObject())
        self.deepest = max(self.deepest, len(stack))
        closer = "]" if char == "[" else "}"
        if self.peek() == closer:
            self.at += 1
            return True
        if char == "{":
            self.name(stack[-1])
        return False

    def name(self, entry):
        entry.name = self.string()
        self.expect(":")

    def document(self):
        stack = []
        while True:
            char = self.peek()
            if char in ("[", "{"):
                if not self.open_container(stack, char):
                    continue
                value = _closed(stack.pop())
            elif char == '"':
                value = self.string()
            else:
                value = self.scalar()
            while True:                      # a value is complete: place it, close what it ends
                if not stack:
                    if self.peek():
                        raise NotJson("data after the value")
                    return value
                top = stack[-1]
                if isinstance(top, list):
                    top.append(value)
                else:
                    if top.name in top.value:
                        raise NotJson(f"name {top.name!r} twice in one object")
                    top.value[top.name] = value
                following = self.peek()
                if following == ",":
                    self.at += 1
                    if not isinstance(top, list):
                        self.name(top)
                    break
                if following != ("]" if isinstance(top, list) else "}"):
                    raise NotJson(f"',' or a closing bracket expected at {self.at}")
                self.at += 1
                value = _closed(stack.pop())


def _closed(entry):
    return entry if isinstance(entry, list) else entry.value


def _join_utf16(units):
    """A surrogate pair written as two escapes is one character (RFC 8259, section 7)."""
    out, index = [], 0
    while index < len(units):
        unit = units[index]
        if "\ud800" <= unit <= "\udbff" and index + 1 < len(units) \
                and "\udc00" <= units[index + 1] <= "\udfff":
            out.append(chr(0x10000 + ((ord(unit) - 0xD800) << 10) + ord(units[index + 1]) - 0xDC00))
            index += 2
        else:
            out.append(unit)
            index += 1
    return "".join(out)


def json_document(text):
    """(value, deepest nesting) of one JSON text, or NotJson."""
    reader = _Reader(text)
    return reader.document(), reader.deepest


def allowed_answers(line, methods):
    """The set of answers the protocol allows for one request line (without its newline):
    error strings, SERVED, ANY_SPECIFIC. `methods` are the method names of the table."""
    text = line.strip(LINE_WHITESPACE)
    if not text:
        return {EMPTY}
    try:
        request, deepest = json_document(text.decode("utf-8"))
    except (UnicodeDecodeError, NotJson):
        return {INVALID}
    if not isinstance(request, dict) or not isinstance(request.get("method"), str) \
            or not isinstance(request.get("params"), (dict, type(None))):
        answer = INVALID
    elif request["method"] == "get_status":
        answer = SERVED
    elif request["method"] in methods:
        answer = ANY_SPECIFIC
    else:
        answer = UNKNOWN_METHOD
    return {answer, INVALID} if deepest > DEEPEST_SURE else {answer}
