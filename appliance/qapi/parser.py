"""Reader for QEMU's QAPI schema language (the syntax of ``qapi/*.json``).

A schema file is a sequence of top-level expressions in a JSON dialect:
single-quoted strings, ``true``/``false``, ``#`` comments to the end of the
line.  ``{ 'include': 'other.json' }`` pulls another file in, relative to the
including one, once.  The result is a flat list of plain Python dicts, in
definition order; the meaning of each is given by ``appliance.qapi.schema``.

A doc comment is a block of ``#`` lines between two lines that are exactly
``##``; the block right before a definition is its documentation, kept (with
the ``# `` prefixes removed) under the definition's ``doc`` key, as QEMU's
parser attaches a QAPIDoc to each expression.
"""
from __future__ import annotations

import os


class QAPISyntaxError(Exception):
    """A schema file that is not valid QAPI syntax."""

    def __init__(self, path: str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")


class _Reader:
    def __init__(self, path: str, text: str):
        self.path = path
        self.text = text
        self.pos = 0
        self.line = 1
        self.doc: str | None = None     # the last doc comment, until a definition takes it

    def error(self, message: str) -> QAPISyntaxError:
        return QAPISyntaxError(self.path, self.line, message)

    def skip_blank(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "#" and self._doc_marker(self.pos):
                self.read_doc()
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif ch == "\n":
                self.line += 1
                self.pos += 1
            elif ch in " \t\r":
                self.pos += 1
            else:
                return

    def _doc_marker(self, pos: int) -> bool:
        """A line that is exactly ``##``."""
        end = self.text.find("\n", pos)
        line = self.text[pos:] if end < 0 else self.text[pos:end]
        return line.rstrip() == "##" and (pos == 0 or self.text[pos - 1] == "\n")

    def read_doc(self) -> None:
        """From an opening ``##`` line through the closing one."""
        lines: list[str] = []
        pos = self.text.find("\n", self.pos)
        while pos >= 0:
            self.line += 1
            start = pos + 1
            if start >= len(self.text):
                break
            if self._doc_marker(start):
                pos = self.text.find("\n", start)
                self.pos = len(self.text) if pos < 0 else pos
                self.doc = "\n".join(lines).strip("\n")
                return
            pos = self.text.find("\n", start)
            line = self.text[start:] if pos < 0 else self.text[start:pos]
            if not line.startswith("#"):
                raise self.error("a doc comment line must start with '#'")
            lines.append(line[2:] if line.startswith("# ") else line[1:])
        raise self.error("doc comment not closed by a '##' line")

    def take_doc(self) -> str | None:
        doc, self.doc = self.doc, None
        return doc

    def peek(self) -> str:
        self.skip_blank()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.pos += 1

    def value(self):
        ch = self.peek()
        if ch == "{":
            return self.obj()
        if ch == "[":
            return self.array()
        if ch == "'":
            return self.string()
        for word, val in (("true", True), ("false", False)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return val
        raise self.error(f"unexpected {ch!r}" if ch else "unexpected end of file")

    def string(self) -> str:
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end < 0 or "\n" in self.text[self.pos:end]:
            raise self.error("missing terminating \"'\"")
        s = self.text[self.pos:end]
        if "\\" in s:
            raise self.error("escape sequences are not supported")
        self.pos = end + 1
        return s

    def obj(self) -> dict:
        self.pos += 1
        out: dict = {}
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            if self.peek() != "'":
                raise self.error("expected string as key")
            key = self.string()
            if key in out:
                raise self.error(f"duplicate key '{key}'")
            self.expect(":")
            out[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return out

    def array(self) -> list:
        self.pos += 1
        out: list = []
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return out


def parse_schema(path: str) -> list[dict]:
    """All definitions of the schema rooted at ``path``, includes expanded."""
    seen: set[str] = set()
    exprs: list[dict] = []

    def load(file_path: str) -> None:
        real = os.path.realpath(file_path)
        if real in seen:
            return
        seen.add(real)
        with open(file_path, encoding="utf-8") as f:
            reader = _Reader(file_path, f.read())
        while reader.peek():
            if reader.peek() != "{":
                raise reader.error("expected '{' at the start of a definition")
            expr = reader.obj()
            doc = reader.take_doc()
            if doc is not None and "doc" not in expr:
                expr["doc"] = doc
            if "include" in expr:
                load(os.path.join(os.path.dirname(file_path), expr["include"]))
            elif "pragma" not in expr:
                exprs.append(expr)

    load(path)
    return exprs
