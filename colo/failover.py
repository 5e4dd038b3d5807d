"""Failover states, changed only by compare-and-set (QEMU's migration/colo-failover.c)::

     none ──request──► require ──► active ──► completed
      ▲                               │
      └──────── relaunch ◄────────────┘  (asked while the secondary loads a checkpoint:
                                          the load finishes, then failover starts again)
"""
from __future__ import annotations

import enum
import logging
import threading
import time

log = logging.getLogger(__name__)


class FailoverStatus(str, enum.Enum):
    """QEMU's FailoverStatus (qapi/migration.json)."""
    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"
    RELAUNCH = "relaunch"


TRANSITIONS = {
    FailoverStatus.NONE: {FailoverStatus.REQUIRE},
    FailoverStatus.REQUIRE: {FailoverStatus.ACTIVE},
    FailoverStatus.ACTIVE: {FailoverStatus.COMPLETED, FailoverStatus.RELAUNCH},
    FailoverStatus.RELAUNCH: {FailoverStatus.NONE},
    FailoverStatus.COMPLETED: set(),
}


class Failover:
    def __init__(self):
        self.status = FailoverStatus.NONE
        self.history: list[tuple[float, str]] = [(time.time(), FailoverStatus.NONE.value)]
        self._lock = threading.Lock()

    def set_state(self, old: FailoverStatus, new: FailoverStatus) -> bool:
        """Move ``old`` -> ``new``; False (nothing changes) when the status is not ``old``."""
        if new not in TRANSITIONS[old]:
            raise ValueError(f"no failover transition {old.value} -> {new.value}")
        with self._lock:
            if self.status is not old:
                return False
            self.status = new
            self.history.append((time.time(), new.value))
        log.info("failover %s -> %s", old.value, new.value)
        return True
