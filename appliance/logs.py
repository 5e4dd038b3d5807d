"""The daemon's log: one line per record on stderr, as ``key=value`` text or as JSON.

    text:  ts=2026-11-30T06:49:01.751Z level=info logger=appliance.control.events msg="event STOP" event=STOP data={}
    json:  {"ts": "2026-11-30T06:49:01.751Z", "level": "info", "logger": "appliance.control.events",
            "msg": "event STOP", "event": "STOP", "data": {}}

``ts`` is RFC 3339 in UTC with milliseconds.  A record's structured fields are passed
as ``extra=fields(name=value, ...)`` and become keys of their own (a QMP event's
``event`` and ``data``, the start-up summary's addresses, a migration's figures), so
a log collector reads them without parsing the message.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

# Keys a record always has; a field may not take one of these names.
RESERVED = ("ts", "level", "logger", "msg", "exc")
_BARE = re.compile(r"[\w.:/@+-]+")


def fields(**values) -> dict:
    """``extra=`` for a log call whose record carries structured fields."""
    clash = set(values) & set(RESERVED)
    if clash:
        raise ValueError(f"log fields may not be named {sorted(clash)}")
    return {"fields": values}


def rfc3339(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


def _entry(record: logging.LogRecord, formatter: logging.Formatter) -> dict:
    entry = {"ts": rfc3339(record.created), "level": record.levelname.lower(), "logger": record.name,
             "msg": record.getMessage()}
    entry.update(getattr(record, "fields", {}))
    if record.exc_info:
        entry["exc"] = formatter.formatException(record.exc_info)
    return entry


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." key=value ...``: one greppable line per record."""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _entry(record, self).items():
            if key == "msg" or not (isinstance(value, str) and _BARE.fullmatch(value)):
                value = json.dumps(value, default=str, separators=(",", ":"))
            parts.append(f"{key}={value}")
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for journald's and log collectors' parsers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_entry(record, self), default=str)


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    """Every record of the process, in ``fmt`` (text or json), on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_startup(log: logging.Logger, node, vm, qmp: list[str], http: str | None) -> None:
    """The line that says what a started node is: its guest, NIC and where to reach it."""
    info: dict = {"node": node.name, "run_state": node.run_state, "qmp": qmp, "http": http}
    guest = "no guest"
    if vm is not None:
        config = vm.config
        info.update(image=config.image, memory_mib=config.memory_mib, nic=config.tap, bridge=config.bridge,
                    mac=config.mac if config.tap else None, console=config.console_log)
        nic = f"NIC {config.tap} ({config.mac})" if config.tap else "no NIC"
        guest = f"guest {config.image}, {config.memory_mib} MiB, {nic}, console {config.console_log or 'not kept'}"
    where = ", ".join(["QMP " + " ".join(qmp) if qmp else "no QMP", f"HTTP {http}" if http else "no HTTP"])
    log.info("node %s ready (run state %s): %s; %s", node.name, node.run_state, guest, where, extra=fields(**info))


def log_migration_summary(log: logging.Logger, level: int, role: str, info: dict, bytes_moved: int) -> None:
    """The line a finished migration leaves: status, times, bytes on the wire and their average rate
    over the total time (Mbit/s), the error if any."""
    total_ms = info.get("total-time", 0)
    mbps = bytes_moved * 8 / 1000 / total_ms if total_ms else 0.0      # the average over the whole run
    summary = {"role": role, "status": info["status"], "total_ms": total_ms, "downtime_ms": info.get("downtime"),
               "bytes": bytes_moved, "mbps": round(mbps, 1)}
    message = (f"{role} {info['status']}: {total_ms} ms, downtime "
               f"{'-' if summary['downtime_ms'] is None else summary['downtime_ms']} ms, "
               f"{bytes_moved} bytes, {summary['mbps']} Mbps")
    if info.get("error-desc"):
        summary["error"] = info["error-desc"]
        message += f": {info['error-desc']}"
    log.log(level, "%s", message, extra=fields(**summary))
