"""One node's COLO: its mode, failover status, figures and the session that runs.

The node hands the manager to the migration engine as its COLO hand-over
(``run_primary`` / ``run_secondary``, called on the migration thread), and
asks it for query-colo-status, x-colo-lost-heartbeat and on-demand
checkpoints.  Each session drives its own network layer (netfilter/) at
checkpoints and failover.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from netfilter.settings import NetfilterSettings

from .failover import Failover, FailoverStatus
from .primary import ColoPrimary
from .protocol import ColoMode, ExitReason
from .secondary import ColoSecondary
from .session import ColoSession
from .stats import REASONS, ColoStats

log = logging.getLogger(__name__)


class ColoError(Exception):
    """A COLO request this node cannot honour now; the message says why."""


@dataclass
class ColoSettings:
    heartbeat_interval_ms: int = 100
    heartbeat_timeout_ms: int = 500
    heartbeat_port: int = 0             # 0: any free port, told to the peer
    failover: str = "auto"              # auto | manual
    verify_ram: bool = False

    def validate(self) -> None:
        if self.failover not in ("auto", "manual"):
            raise ValueError(f"colo failover must be 'auto' or 'manual', not {self.failover!r}")
        if not 10 <= self.heartbeat_interval_ms <= 60000:
            raise ValueError("colo heartbeat interval must be within 10..60000 ms")
        if self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError("colo heartbeat timeout must be at least twice the interval")
        if not 0 <= self.heartbeat_port <= 65535:
            raise ValueError("colo heartbeat port must be within 0..65535")


class ColoManager:
    def __init__(self, settings: ColoSettings, emit: Callable[[str, dict], None],
                 on_takeover: Callable[[], None] = lambda: None, netfilter: NetfilterSettings | None = None):
        """``emit(event, data)`` sends a QMP event (from any thread); ``on_takeover`` runs when
        this secondary's guest becomes the service guest (announce it)."""
        self.settings = settings
        self.netfilter = netfilter or NetfilterSettings()
        self.emit = emit
        self.on_takeover = on_takeover
        self.mode = ColoMode.NONE
        self.last_mode = ColoMode.NONE
        self.exit_reason = ExitReason.NONE
        self.failover = Failover()
        self.stats = ColoStats()
        self.session: ColoSession | None = None
        self.waiting_for_operator = False
        self.operator_decided = threading.Event()
        self.shutting_down = False

    # -- hand-overs from the migration engine (on the migration thread) -------------------

    def run_primary(self, source, enter: Callable[[], None]) -> None:
        self._run(ColoPrimary(self, source), ColoMode.PRIMARY, enter)

    def run_secondary(self, destination, channel, enter: Callable[[], None]) -> None:
        self._run(ColoSecondary(self, destination, channel), ColoMode.SECONDARY, enter)

    def _run(self, session: ColoSession, mode: ColoMode, enter: Callable[[], None]) -> None:
        """``enter`` puts the migration in state colo and runs the guest."""
        self.failover = session.failover = Failover()
        self.operator_decided.clear()
        self.exit_reason = ExitReason.NONE
        self.session, self.mode = session, mode
        log.info("COLO: this node is the %s", mode.value)
        try:
            session.prepare()
            enter()
            if self.shutting_down:          # the daemon began to exit before the session existed
                session.peer_lost("this node is shutting down")
            session.run()
        except Exception:       # a bug here must not let the engine treat the running guest as failed
            log.exception("COLO %s session failed", mode.value)

    def finish(self, session: ColoSession, reason: ExitReason, takeover: bool = False) -> None:
        """The session ended: failover completed (if it ran), COLO_EXIT, migration completed."""
        self.failover.set_state(FailoverStatus.ACTIVE, FailoverStatus.COMPLETED)
        self.last_mode, self.mode = self.mode, ColoMode.NONE
        self.exit_reason = reason
        self.session = None
        if takeover:        # how COLO ended is COLO_EXIT's log line
            log.info("COLO: this %s took over: its guest is the service guest now", self.last_mode.value)
        self.emit("COLO_EXIT", {"mode": self.last_mode.value, "reason": reason.value})
        session.migration.set_state("colo", "completed")
        if takeover:
            self.on_takeover()

    # -- requests (any thread) ---------------------------------------------------------------

    def lost_heartbeat(self) -> None:
        """x-colo-lost-heartbeat: fail over now (QEMU's failover_request_active)."""
        session = self.session
        if session is None:
            raise ColoError("The feature 'colo' is not enabled" if self.mode is ColoMode.NONE
                            else "COLO is not running")
        if not session.request_failover(ExitReason.REQUEST):
            raise ColoError("COLO failover is already in progress")
        self.operator_decided.set()

    def shutdown(self) -> None:
        """The daemon is exiting: leave COLO as a crash would, so the peer goes on alone (a
        surviving secondary takes over), and wait for no operator."""
        self.shutting_down = True
        self.operator_decided.set()
        session = self.session
        if session is not None:
            session.peer_lost("this node is shutting down")

    def request_checkpoint(self, reason: str) -> None:
        """A checkpoint as soon as possible (the netfilter comparer, xen-colo-do-checkpoint)."""
        if reason not in REASONS:
            raise ValueError(f"checkpoint reason {reason!r} is not one of {REASONS}")
        session = self.session
        if not isinstance(session, ColoPrimary):
            raise ColoError("this node is not a COLO primary: only the primary takes checkpoints")
        session.request_checkpoint(reason)

    # -- reports -------------------------------------------------------------------------------

    def query_status(self) -> dict:
        """query-colo-status: reason 'processing' while a failover runs."""
        in_progress = self.failover.status in (FailoverStatus.REQUIRE, FailoverStatus.ACTIVE,
                                               FailoverStatus.RELAUNCH)
        reason = ExitReason.PROCESSING if in_progress and self.session is not None else self.exit_reason
        return {"mode": self.mode.value, "last-mode": self.last_mode.value, "reason": reason.value}

    def status(self) -> dict:
        """For the HTTP API and the metrics."""
        session = self.session
        heartbeat = session.heartbeat if session is not None else None
        status = self.query_status()
        status.update({
            "failover-status": self.failover.status.value,
            "failover-history": [state for _, state in self.failover.history],
            "failover-mode": self.settings.failover,
            "waiting-for-operator": self.waiting_for_operator,
            "peer": session.peer_address if session is not None else None,
            "heartbeat-age-ms": round(heartbeat.age() * 1000, 1) if heartbeat and heartbeat.peer else None,
            "heartbeat-port": heartbeat.port if heartbeat else None,
            "heartbeat-keyed": bool(heartbeat and heartbeat.key),
            "heartbeat-rejected": heartbeat.rejected if heartbeat else 0,
            "tls-peer": session.channel.peer_identity or None if session is not None else None,
            "verify-ram": self.settings.verify_ram,
            "netfilter": (session.filters.counters() if session is not None and session.filters is not None
                          else None),
        })
        status.update(self.stats.as_dict())
        if self.settings.verify_ram:
            status["ram-digests"] = [[n, d] for n, d in self.stats.digests]
        return status
