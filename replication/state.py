"""What the source and the destination share: a status changed only by compare-and-set
(as QEMU's ``migrate_set_state``), announced as a MIGRATION event, a thread that runs
the whole migration, and views of guest RAM released when it ends."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class MigrationRun:
    role = "migration"

    def __init__(self, on_event: Callable[[str, dict], None]):
        self.on_event = on_event
        self.status = "none"
        self.error: str | None = None
        self.start_time = 0.0
        self.end_time: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set_state(self, old: str | tuple, new: str) -> bool:
        """Move from ``old`` (one status or a tuple of them) to ``new``; False if not in ``old``."""
        with self._lock:
            if self.status not in ((old,) if isinstance(old, str) else old):
                return False
            self.status = new
        log.info("%s %s", self.role, new)
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
