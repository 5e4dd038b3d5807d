"""What the source and the destination share: a status changed only by compare-and-set
(as QEMU's ``migrate_set_state``) along the transitions below, announced as a MIGRATION
event, a thread that runs the whole migration, and views of guest RAM released when it ends.

    none ──► setup ──► active ──────────────────────────────► completed
               │         │  └─► pre-switchover ──► device ──┤ (source)
               │         │                           │      └─► colo ──► completed
               │         └─► colo (destination) ─────┼──────────┘   (failover or exit)
               └──────────┴──► cancelling ──► cancelled
          any running state ──► failed
"""
from __future__ import annotations

import enum
import threading
import time
from typing import Callable


class MigrationStatus(str, enum.Enum):
    """QEMU's MigrationStatus (qapi/migration.json), the states this engine uses."""
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"


S = MigrationStatus
TRANSITIONS = {
    S.NONE: {S.SETUP},
    S.SETUP: {S.ACTIVE, S.CANCELLING, S.FAILED},
    S.ACTIVE: {S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED, S.COLO, S.CANCELLING, S.FAILED},
    S.PRE_SWITCHOVER: {S.DEVICE, S.CANCELLING, S.FAILED},
    S.DEVICE: {S.COMPLETED, S.COLO, S.CANCELLING, S.FAILED},
    S.CANCELLING: {S.CANCELLED, S.FAILED},
    S.COLO: {S.COMPLETED},
    S.COMPLETED: set(), S.FAILED: set(), S.CANCELLED: set(),
}


class MigrationRun:
    role = "migration"

    def __init__(self, on_event: Callable[[str, dict], None]):
        self.on_event = on_event
        # Called as the status becomes completed, before any query or event can tell: what must
        # be on disk by then (the node's record that its guest left) is written here.
        self.before_completed: Callable[[], None] | None = None
        self.status: str = MigrationStatus.NONE.value
        self.error: str | None = None
        self.start_time = 0.0
        self.end_time: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set_state(self, old: str | tuple, new: str) -> bool:
        """Move from ``old`` (one status or a tuple of them) to ``new``; False if not in ``old``.
        A move the transition table does not allow is a bug, and raises."""
        olds = (old,) if isinstance(old, str) else old
        new = MigrationStatus(new)
        bad = [o for o in olds if new not in TRANSITIONS[MigrationStatus(o)]]
        if bad:
            raise ValueError(f"no migration status transition {bad[0]} -> {new.value}")
        with self._lock:
            if self.status not in olds:
                return False
            if new is MigrationStatus.COMPLETED and self.before_completed is not None:
                self.before_completed()
            self.status = new = new.value       # plain strings for query-migrate and events (the node logs them)
        self.on_event("MIGRATION", {"status": new})
        return True

    def start(self) -> None:
        self.start_time = time.monotonic()
        self.set_state("none", "setup")
        self._thread = threading.Thread(target=self._run, name=self.role.replace(" ", "-"), daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError

    def _release_views(self) -> None:
        """Drop our views of guest RAM (``ram``, and the digest's), so the VM can unmap it when it closes."""
        digest = getattr(self, "digest", None)
        if digest is not None:
            digest.ram.release()
        self.ram.release()
