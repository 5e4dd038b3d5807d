"""Schema-driven command dispatch, as QEMU's ``qmp-dispatch.c`` with generated marshallers.

Handlers are registered by command name; registration is checked against the
schema, so every command of the schema has exactly one handler and no handler
exists outside it.  Arguments are checked and converted by the schema before
a handler sees them, and what a handler returns is checked against the
command's declared return type.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from appliance.qapi import QMPError, Schema

log = logging.getLogger(__name__)

Handler = Callable[[dict, "CallContext"], Any | Awaitable[Any]]


@dataclass
class CallContext:
    """Who is calling: the QMP connection (for fds passed with SCM_RIGHTS), or HTTP."""
    origin: str = "qmp"
    fds: dict[str, int] = field(default_factory=dict)
    received_fds: list[int] = field(default_factory=list)


class Dispatcher:
    def __init__(self, schema: Schema):
        self.schema = schema
        self.handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name not in self.schema.commands:
            raise ValueError(f"command {name!r} is not in the schema")
        if name in self.handlers:
            raise ValueError(f"command {name!r} registered twice")
        self.handlers[name] = handler

    def missing(self) -> list[str]:
        """Schema commands without a handler (must be empty for a complete node)."""
        return [n for n in self.schema.commands if n not in self.handlers]

    async def execute(self, name: str, arguments: dict | None, ctx: CallContext) -> Any:
        command = self.schema.commands.get(name)
        handler = self.handlers.get(name)
        if command is None or handler is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        args = self.schema.visit_input(command, arguments)
        result = handler(args, ctx)
        if inspect.isawaitable(result):
            result = await result
        if command.returns is None:
            result = {} if result is None else result
        else:
            try:
                self.schema.check_output(command.returns, result)
            except ValueError as e:
                log.error("reply of %s does not match the schema: %s", name, e)
                raise QMPError(f"internal error: reply of {name} does not match the schema") from e
        return result
