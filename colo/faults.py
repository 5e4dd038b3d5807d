"""Fault injection for drills and tests: stop or kill this node at a named step of the
COLO transaction, so each step's failure can be tested exactly, not by timing.

``COLO_APPLIANCE_FAULT="SIDE:WHEN:MESSAGE:ACTION[:N]"`` in the daemon's
environment, e.g. ``secondary:after:vmstate-received:kill:3``: on the
secondary, right after it sends (or reads) vmstate-received in the 3rd
checkpoint, SIGKILL itself.  WHEN is before | during | after (during: half of
the vmstate is sent, primary only); ACTION is kill (SIGKILL) or stop (SIGSTOP:
a frozen node).  N defaults to 1.  Without the variable nothing is checked
but one dictionary lookup.
"""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def _parse(spec: str | None):
    if not spec:
        return None
    side, when, message, action, *rest = spec.split(":")
    if when not in ("before", "during", "after") or action not in ACTIONS or side not in ("primary", "secondary"):
        raise ValueError(f"COLO_APPLIANCE_FAULT={spec!r}: expected SIDE:before|during|after:MESSAGE:kill|stop[:N]")
    return side, when, message, ACTIONS[action], int(rest[0]) if rest else 1


_FAULT = _parse(os.environ.get("COLO_APPLIANCE_FAULT"))


def point(side: str, when: str, message: str, checkpoint: int) -> None:
    """Called at every step; acts when the step is the configured one."""
    if _FAULT is not None and _FAULT[:3] == (side, when, message) and checkpoint == _FAULT[4]:
        log.warning("fault injection: %s %s %s in checkpoint %d: signal %d", side, when, message, checkpoint,
                    _FAULT[3])
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), _FAULT[3])
