"""QMP events: checked against the schema, stamped, and delivered to listeners.

``emit`` may be called from any thread (vCPU threads report guest halts and
panics); delivery always happens on the event loop, in emission order.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from appliance.logs import fields
from appliance.qapi import Schema

log = logging.getLogger(__name__)

Listener = Callable[[dict], None]


def timestamp(now: float | None = None) -> dict:
    """QEMU's event timestamp: wall clock seconds and microseconds."""
    now = time.time() if now is None else now
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


class EventBus:
    def __init__(self, schema: Schema, loop: asyncio.AbstractEventLoop):
        self.schema = schema
        self.loop = loop
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, name: str, data: dict | None = None) -> None:
        event = self.schema.events.get(name)
        if event is None:
            raise ValueError(f"event {name!r} is not in the schema")
        if event.args is not None:
            self.schema.check_output(event.args.name, data or {}, name)
        message = {"event": name, "data": data} if event.args is not None else {"event": name}
        message["timestamp"] = timestamp()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._deliver(message)
        else:
            self.loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: dict) -> None:
        log.info("event %s", message["event"], extra=fields(event=message["event"], data=message.get("data", {})))
        for listener in list(self._listeners):
            listener(message)
