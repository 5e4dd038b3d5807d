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
import re

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\\x00-\x1f]')
_SCALAR_END = re.compile(rb'[\s{}\[\]"]')
_BLANK = re.compile(rb"\s*")


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

    def _finish(self, out: list) -> None:
        if self._oversized:
            out.append(ParseError(f"JSON parse error, message exceeds {self.limit} bytes"))
        else:
            out.append(b"".join(self._parts))
        self._reset()

    def feed(self, data: bytes) -> list:
        """Complete texts (bytes) and ParseErrors, in stream order."""
        out: list = []
        pos, end = 0, len(data)
        while pos < end:
            if self._escape:
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
                    # A raw control character cannot be in a JSON string: like
                    # QEMU's lexer, report it and start afresh after it.
                    out.append(ParseError("JSON parse error, invalid character in string"))
                    self._reset()
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


def parse(text: bytes):
    """Decode one JSON text; raise ParseError with a QEMU-style message."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ParseError("JSON parse error, invalid UTF-8 sequence in string") from None
    except RecursionError:
        raise ParseError("JSON parse error, too many nested data structures") from None
    except json.JSONDecodeError as e:
        raise ParseError(f"JSON parse error, {e.msg[:1].lower()}{e.msg[1:]}") from None
    return value
