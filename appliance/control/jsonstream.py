"""Splitting a QMP byte stream into JSON texts, the way QEMU's json-streamer does.

Bytes arrive in arbitrary pieces; ``JSONStreamer.feed`` returns every complete
top-level JSON text seen so far.  Brackets are counted outside strings only, so
a message is complete when its outermost ``{``/``[`` closes; a bare scalar ends
at white space.  A message longer than ``limit`` bytes is not kept: it is
skipped to its end and reported as a ``ParseError``, so a huge or hostile input
costs bounded memory and never desynchronises the stream.
"""
from __future__ import annotations

import json
import math
import re

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\\x00-\x1f]')
_SCALAR_END = re.compile(rb'[\s{}\[\]"]')
_BLANK = re.compile(rb"\s*")
# After an error, QEMU's lexer skips to a point where a new value can start: a bracket,
# a control character other than tab, or the bytes 0xFE/0xFF (clients send these to resync).
_RESYNC = re.compile(rb"[{}\[\]\x00-\x08\x0a-\x1f\xfe\xff]")
MAX_NESTING = 1024


class ParseError(Exception):
    """A JSON text that cannot be accepted; its message follows QEMU's wording."""


class JSONStreamer:
    def __init__(self, limit: int = MAX_MESSAGE_BYTES):
        self.limit = limit
        self._parts: list[bytes] = []
        self._escape = False
        self._reset()

    def _keep(self, piece: bytes) -> None:
        if self._oversized:
            return
        self._size += len(piece)
        if self._size > self.limit:
            self._oversized = True
            self._parts.clear()
        else:
            self._parts.append(piece)

    def _reset(self) -> None:
        self._parts.clear()
        self._size = 0
        self._depth = 0
        self._in_string = False
        self._scalar = False
        self._oversized = False
        self._too_deep = False
        self._recovering = False

    def _finish(self, out: list) -> None:
        if self._too_deep:
            out.append(ParseError("JSON nesting depth limit exceeded"))
        elif self._oversized:
            out.append(ParseError(f"JSON parse error, message exceeds {self.limit} bytes"))
        else:
            out.append(b"".join(self._parts))
        self._reset()

    def feed(self, data: bytes) -> list:
        """Complete texts (bytes) and ParseErrors, in stream order."""
        out: list = []
        pos, end = 0, len(data)
        while pos < end:
            if self._recovering:
                m = _RESYNC.search(data, pos)
                if not m:
                    break
                pos = m.start()            # the resync byte itself is read afresh
                self._recovering = False
            elif self._escape:
                self._escape = False
                self._keep(data[pos:pos + 1])
                pos += 1
            elif self._in_string:
                m = _IN_STRING.search(data, pos)
                if not m:
                    self._keep(data[pos:])
                    break
                self._keep(data[pos:m.end()])
                pos = m.end()
                if m.group() == b"\\":
                    self._escape = True
                elif m.group() < b" ":
                    # A raw control character cannot be in a JSON string: like QEMU's lexer,
                    # report it, drop the message and resynchronise.
                    out.append(ParseError("JSON parse error, invalid character in string"))
                    self._reset()
                    self._recovering = True
                else:
                    self._in_string = False
                    if self._depth == 0:          # a bare top-level string
                        self._finish(out)
            elif self._depth > 0:
                m = _STRUCTURAL.search(data, pos)
                if not m:
                    self._keep(data[pos:])
                    break
                self._keep(data[pos:m.end()])
                pos = m.end()
                ch = m.group()
                if ch == b'"':
                    self._in_string = True
                elif ch in (b"{", b"["):
                    self._depth += 1
                    if self._depth > MAX_NESTING:     # kept counting, so the message still ends in step
                        self._too_deep = True
                        self._oversized = True
                        self._parts.clear()
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._finish(out)
            elif self._scalar:
                m = _SCALAR_END.search(data, pos)
                if not m:
                    self._keep(data[pos:])
                    break
                self._keep(data[pos:m.start()])
                pos = m.start()
                self._finish(out)
            else:
                pos = _BLANK.match(data, pos).end()
                if pos >= end:
                    break
                ch = data[pos:pos + 1]
                if ch in (b"{", b"["):
                    self._depth = 1
                    self._keep(ch)
                elif ch == b'"':
                    self._in_string = True
                    self._keep(ch)
                elif ch in (b"}", b"]"):
                    out.append(ParseError("JSON parse error, expecting value"))
                else:
                    self._scalar = True
                    continue
                pos += 1
        return out


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ParseError("JSON parse error, duplicate key")
        obj[key] = value
    return obj


def _no_constants(name):
    raise ParseError(f"JSON parse error, invalid keyword '{name}'")


def _reject_surrogates(value) -> None:
    """A lone surrogate escape (\\ud800) is no Unicode character: QEMU refuses it, so do we."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = item[e.start]
                raise ParseError(f"JSON parse error, \\u{ord(bad):04x} is not a valid Unicode character") from None


INT_MIN, UINT_MAX = -(1 << 63), (1 << 64) - 1     # QMP numbers are int64 or uint64 (or finite doubles)


def _bounded_int(digits: str) -> int:
    # Checked by length first: int() of thousands of digits is slow, and refused beyond 4300.
    if len(digits) > 21 or not INT_MIN <= (value := int(digits)) <= UINT_MAX:
        raise ParseError(f"JSON parse error, integer {digits[:24]}{'...' if len(digits) > 24 else ''} "
                         "is out of the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"JSON parse error, number {text[:24]}{'...' if len(text) > 24 else ''} "
                         "is out of the range of a double")
    return value


def parse(text: bytes):
    """Decode one JSON text; raise ParseError with a QEMU-style message."""
    try:
        value = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constants, parse_int=_bounded_int, parse_float=_finite_float)
    except UnicodeDecodeError:        # strict: no surrogates smuggled in as UTF-8 bytes either
        raise ParseError("JSON parse error, invalid UTF-8 sequence in string") from None
    except RecursionError:
        raise ParseError("JSON nesting depth limit exceeded") from None
    except json.JSONDecodeError as e:
        raise ParseError(f"JSON parse error, {e.msg[:1].lower()}{e.msg[1:]}") from None
    _reject_surrogates(value)
    return value
