"""QAPI: the QMP schema (QEMU's own definitions) and the checks it drives."""
from .errors import QMPError
from .schema import Command, Event, Schema, default_schema

__all__ = ["QMPError", "Command", "Event", "Schema", "default_schema"]
