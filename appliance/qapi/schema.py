"""The QMP schema, declared once in ``schema/*.json`` and driving everything.

Commands, events and types come from the QAPI files (QEMU's own
``migration.json`` plus the common, sockets and control parts it needs).
``Schema.visit_input`` checks and converts command arguments exactly as QEMU's
generated marshallers do with the QObject input visitor, with QEMU's error
messages; ``Schema.check_output`` checks what a handler returns against its
declared type, so a reply never drifts from the schema.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import QMPError
from .parser import parse_schema

SCHEMA_DIR = os.path.join(os.path.dirname(__file__), "schema")

# The build configuration the schema's 'if' conditions are evaluated against.
DEFAULT_CONFIG = frozenset({"CONFIG_LINUX", "CONFIG_ZSTD", "CONFIG_REPLICATION"})

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
    "uint8": (0, (1 << 8) - 1, "uint8_t"),
    "uint16": (0, (1 << 16) - 1, "uint16_t"),
    "uint32": (0, (1 << 32) - 1, "uint32_t"),
}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64_MAX = (1 << 64) - 1
INT_TYPES = {"int", "int64", "int8", "int16", "int32"}
UINT_TYPES = {"uint8", "uint16", "uint32", "uint64", "size"}
BUILTINS = INT_TYPES | UINT_TYPES | {"str", "number", "bool", "null", "any"}


@dataclass
class Member:
    name: str
    type: str | list      # a type name, or [name] for a list
    optional: bool = False
    features: list = field(default_factory=list)


@dataclass
class Enum:
    name: str
    values: list[str]


@dataclass
class Struct:
    name: str
    members: list[Member]


@dataclass
class Alternate:
    name: str
    variants: dict[str, str]      # variant name -> type


@dataclass
class Union:
    name: str
    members: list[Member]          # the base, discriminator included
    discriminator: str
    variants: dict[str, str]      # discriminator value -> struct type


@dataclass
class Command:
    name: str
    args: Struct | None
    boxed: bool = False
    returns: str | list | None = None
    allow_oob: bool = False
    features: list = field(default_factory=list)
    doc: str = ""          # the schema's doc comment (for help in the QMP shell)

    @property
    def deprecated(self) -> bool:
        return "deprecated" in self.features


@dataclass
class Event:
    name: str
    args: Struct | None
    doc: str = ""


def _condition_holds(cond, config) -> bool:
    if cond is None:
        return True
    conds = cond if isinstance(cond, list) else [cond]
    for c in conds:
        m = re.fullmatch(r"\s*defined\((\w+)\)\s*", c)
        if not m:
            raise ValueError(f"unsupported 'if' condition: {c!r}")
        if m.group(1) not in config:
            return False
    return True


def _features(expr) -> list[str]:
    return [f if isinstance(f, str) else f["name"] for f in expr.get("features", [])]


class Schema:
    def __init__(self, path: str | None = None, config=DEFAULT_CONFIG):
        self.config = config
        self.types: dict[str, Enum | Struct | Alternate | Union] = {}
        self.commands: dict[str, Command] = {}
        self.events: dict[str, Event] = {}
        self._anon = 0
        exprs = parse_schema(path or os.path.join(SCHEMA_DIR, "appliance.json"))
        for expr in exprs:
            if _condition_holds(expr.get("if"), config):
                self._define(expr)
        self._check_references()

    # -- building -------------------------------------------------------------

    def _members(self, data: dict) -> list[Member]:
        out = []
        for key, spec in data.items():
            features: list = []
            if isinstance(spec, dict):
                if not _condition_holds(spec.get("if"), self.config):
                    continue
                features = _features(spec)
                spec = spec["type"]
            optional = key.startswith("*")
            out.append(Member(key[1:] if optional else key, spec, optional, features))
        return out

    def _implicit_struct(self, owner: str, data) -> Struct | None:
        if data is None:
            return None
        if isinstance(data, str):
            return data  # resolved in _check_references
        struct = Struct(f"q_obj_{owner}-arg", self._members(data))
        self.types[struct.name] = struct
        return struct

    def _define(self, expr: dict) -> None:
        if "enum" in expr:
            values = [v if isinstance(v, str) else v["name"] for v in expr["data"]
                      if isinstance(v, str) or _condition_holds(v.get("if"), self.config)]
            self.types[expr["enum"]] = Enum(expr["enum"], values)
        elif "struct" in expr:
            members = self._members(expr.get("data", {}))
            if "base" in expr:
                members = self._base_members(expr["base"]) + members
            self.types[expr["struct"]] = Struct(expr["struct"], members)
        elif "alternate" in expr:
            self.types[expr["alternate"]] = Alternate(expr["alternate"], dict(expr["data"]))
        elif "union" in expr:
            base = expr["base"]
            members = self._members(base) if isinstance(base, dict) else self._base_members(base)
            variants = {k: (v["type"] if isinstance(v, dict) else v) for k, v in expr["data"].items()}
            self.types[expr["union"]] = Union(expr["union"], members, expr["discriminator"], variants)
        elif "command" in expr:
            name = expr["command"]
            self.commands[name] = Command(
                name, self._implicit_struct(name, expr.get("data")), expr.get("boxed", False),
                expr.get("returns"), expr.get("allow-oob", False), _features(expr), expr.get("doc", ""))
        elif "event" in expr:
            name = expr["event"]
            self.events[name] = Event(name, self._implicit_struct(name, expr.get("data")), expr.get("doc", ""))
        else:
            raise ValueError(f"unknown schema definition: {expr}")

    def _base_members(self, name: str) -> list[Member]:
        base = self.types[name]
        assert isinstance(base, Struct), f"base {name} is not a struct"
        return list(base.members)

    def _check_references(self) -> None:
        for owner in list(self.commands.values()) + list(self.events.values()):
            if isinstance(owner.args, str):
                owner.args = self.types[owner.args]
        refs = []
        for t in self.types.values():
            if isinstance(t, (Struct, Union)):
                refs += [m.type for m in t.members]
            if isinstance(t, (Alternate, Union)):
                refs += list(t.variants.values())
        for c in self.commands.values():
            refs += [m.type for m in (c.args.members if c.args else [])]
            if c.returns is not None:
                refs.append(c.returns)
        for r in refs:
            name = r[0] if isinstance(r, list) else r
            if name not in BUILTINS and name not in self.types:
                raise ValueError(f"schema refers to undefined type {name!r}")

    # -- input ----------------------------------------------------------------

    def visit_input(self, command: Command, arguments: dict | None) -> dict:
        """Check ``arguments`` of ``command`` and return them converted (e.g.
        negative uint64 wrapped as QEMU does).  Raises QMPError(GenericError)."""
        args = {} if arguments is None else arguments
        if command.args is None:
            self._check_unexpected(args, [], None)
            return {}
        out = self._visit_struct_members(command.args.members, args, None)
        self._check_unexpected(args, command.args.members, None)
        return out

    def _full(self, path: str | None, name: str) -> str:
        return name if path is None else f"{path}.{name}"

    def _check_unexpected(self, value: dict, members: list[Member], path) -> None:
        known = {m.name for m in members}
        for key in value:
            if key not in known:
                raise QMPError(f"Parameter '{self._full(path, key)}' is unexpected")

    def _visit_struct_members(self, members: list[Member], value: dict, path) -> dict:
        out = {}
        for m in members:
            full = self._full(path, m.name)
            if m.name not in value:
                if m.optional:
                    continue
                raise QMPError(f"Parameter '{full}' is missing")
            out[m.name] = self._visit(m.type, value[m.name], m.name, full)
        return out

    def _visit(self, typ, value, name: str | None, full: str):
        if isinstance(typ, list):
            if not isinstance(value, list):
                raise QMPError(f"Invalid parameter type for '{full}', expected: array")
            # QEMU names a list element 'null' where it uses the bare name.
            return [self._visit(typ[0], v, None, f"{full}[{i}]") for i, v in enumerate(value)]
        if typ in BUILTINS:
            return _visit_builtin(typ, value, name, full)
        t = self.types[typ]
        if isinstance(t, Enum):
            if not isinstance(value, str):
                raise QMPError(f"Invalid parameter type for '{full}', expected: string")
            if value not in t.values:
                raise QMPError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
            return value
        if isinstance(t, Alternate):
            for variant_type in t.variants.values():
                if _qtype_matches(self, variant_type, value):
                    return self._visit(variant_type, value, name, full)
            raise QMPError(f"Invalid parameter type for '{name or 'null'}', expected: {t.name}")
        if not isinstance(value, dict):
            raise QMPError(f"Invalid parameter type for '{full}', expected: object")
        members = t.members
        out = self._visit_struct_members(members, value, full)
        if isinstance(t, Union):
            variant = self.types[t.variants[out[t.discriminator]]]
            members = members + variant.members
            out.update(self._visit_struct_members(variant.members, value, full))
        self._check_unexpected(value, members, full)
        return out

    # -- output ---------------------------------------------------------------

    def check_output(self, typ, value, where: str = "return") -> None:
        """Raise ValueError when ``value`` does not have schema type ``typ``."""
        if isinstance(typ, list):
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected a list")
            for i, v in enumerate(value):
                self.check_output(typ[0], v, f"{where}[{i}]")
            return
        if typ in BUILTINS:
            if not _builtin_accepts(typ, value):
                raise ValueError(f"{where}: {value!r} is not a {typ}")
            return
        t = self.types[typ]
        if isinstance(t, Enum):
            if value not in t.values:
                raise ValueError(f"{where}: {value!r} is not a {t.name}")
            return
        if isinstance(t, Alternate):
            if not any(_qtype_matches(self, vt, value) for vt in t.variants.values()):
                raise ValueError(f"{where}: {value!r} is not a {t.name}")
            return
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {t.name}")
        members = list(t.members)
        if isinstance(t, Union):
            members += self.types[t.variants[value.get(t.discriminator)]].members
        names = {m.name for m in members}
        for key in value:
            if key not in names:
                raise ValueError(f"{where}: {t.name} has no member {key!r}")
        for m in members:
            if m.name in value:
                self.check_output(m.type, value[m.name], f"{where}.{m.name}")
            elif not m.optional:
                raise ValueError(f"{where}: {t.name} lacks member {m.name!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _qtype_matches(schema: Schema, typ, value) -> bool:
    """Which alternate branch a JSON value selects, by its JSON type, as QEMU does."""
    if isinstance(typ, list):
        return isinstance(value, list)
    if typ == "str":
        return isinstance(value, str)
    if typ == "null":
        return value is None
    if typ == "bool":
        return isinstance(value, bool)
    if typ in INT_TYPES or typ in UINT_TYPES or typ == "number":
        return _is_int(value) or (typ == "number" and isinstance(value, float))
    t = schema.types.get(typ)
    if isinstance(t, Enum):
        return isinstance(value, str)
    return isinstance(value, dict)


def _visit_builtin(typ: str, value, name: str | None, full: str):
    if typ == "any":
        return value
    if typ == "str":
        if not isinstance(value, str):
            raise QMPError(f"Invalid parameter type for '{full}', expected: string")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise QMPError(f"Invalid parameter type for '{full}', expected: boolean")
        return value
    if typ == "null":
        if value is not None:
            raise QMPError(f"Invalid parameter type for '{full}', expected: null")
        return None
    if typ == "number":
        if not (_is_int(value) or isinstance(value, float)):
            raise QMPError(f"Invalid parameter type for '{full}', expected: number")
        return float(value)
    if typ in INT_TYPES:
        # QEMU keeps integers outside int64 as doubles: not an integer.
        if not _is_int(value) or not _INT64[0] <= value <= _INT64[1]:
            raise QMPError(f"Invalid parameter type for '{full}', expected: integer")
        if typ in _INT_RANGES:
            lo, hi, cname = _INT_RANGES[typ]
            if not lo <= value <= hi:
                raise QMPError(f"Parameter '{name or 'null'}' expects {cname}")
        return value
    # Unsigned: QEMU accepts negative int64 values and wraps them.
    if not _is_int(value) or not _INT64[0] <= value <= _UINT64_MAX:
        raise QMPError(f"Parameter '{full}' expects uint64")
    value &= _UINT64_MAX
    if typ in _INT_RANGES:
        _, hi, cname = _INT_RANGES[typ]
        if value > hi:
            raise QMPError(f"Parameter '{name or 'null'}' expects {cname}")
    return value


def _builtin_accepts(typ: str, value) -> bool:
    if typ == "any":
        return True
    if typ == "str":
        return isinstance(value, str)
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "null":
        return value is None
    if typ == "number":
        return _is_int(value) or isinstance(value, float)
    if not _is_int(value):
        return False
    lo, hi = _INT_RANGES.get(typ, (0, _UINT64_MAX, ""))[:2] if typ not in ("int", "int64") else _INT64
    return lo <= value <= hi


_default: Schema | None = None


def default_schema() -> Schema:
    """The appliance's schema, parsed once."""
    global _default
    if _default is None:
        _default = Schema()
    return _default
