"""What a primary and a secondary session share: the failover sequence, run on the
session's own thread (the migration thread, as in QEMU) once its loop ends.

The loop ends because the peer was lost (the COLO connection failed, or the
heartbeat went quiet), because failover was requested (x-colo-lost-heartbeat),
or because the peer left COLO on purpose.  ``request_failover`` may be called
from any thread: it moves the failover status none -> require -> active (or
relaunch while a checkpoint is being loaded) and wakes the loop.
"""
from __future__ import annotations

import logging
import threading

from .failover import Failover, FailoverStatus
from .heartbeat import Heartbeat
from .protocol import ExitReason

log = logging.getLogger(__name__)


class ColoSession:
    mode = "none"

    def __init__(self, manager, run, channel):
        self.manager = manager
        self.settings = manager.settings
        self.vm = run.vm
        self.migration = run            # the MigrationSource / MigrationDestination that handed over
        self.channel = channel
        self.peer_address = channel.sock.getpeername()[0]
        self.failover: Failover = manager.failover
        self.heartbeat: Heartbeat | None = None
        self.loading = False            # the secondary is loading a checkpoint into the SVM
        self.lost: str | None = None    # why the peer is considered lost
        self.held = False               # manual failover stopped the guest to wait for the operator
        self.filters = None             # the network layer (netfilter/), for guests with a NIC
        self.exit_reason = ExitReason.NONE
        self.stopping = threading.Event()

    # -- from any thread -----------------------------------------------------------

    def request_failover(self, reason: ExitReason) -> bool:
        """none -> require -> active (relaunch if a load is under way); False when a failover
        already runs."""
        if not self.failover.set_state(FailoverStatus.NONE, FailoverStatus.REQUIRE):
            return False
        self.exit_reason = reason
        self._activate()
        self.stop_loop()
        return True

    def _activate(self) -> None:
        self.failover.set_state(FailoverStatus.REQUIRE, FailoverStatus.ACTIVE)
        if self.loading:
            # QEMU: a secondary cannot fail over in the middle of loading a checkpoint.
            self.failover.set_state(FailoverStatus.ACTIVE, FailoverStatus.RELAUNCH)

    def peer_lost(self, why: str) -> None:
        """The heartbeat or the connection says the peer is gone."""
        if self.lost is None:
            self.lost = why
            log.warning("COLO %s: peer lost: %s", self.mode, why)
        self.stopping.set()
        self.channel.abort()

    def stop_loop(self) -> None:
        """Failover was requested: end the loop now."""
        self.stopping.set()
        self.channel.abort()

    # -- on the session's thread -------------------------------------------------------

    def prepare(self) -> None:
        """Before the guest runs in COLO."""

    @property
    def pair_uuid(self) -> str:
        """The protected guest's UUID as the primary knows it (the stream header carries it)."""
        return self.vm.uuid if self.mode == "primary" else self.migration.header.vm_uuid

    def start_heartbeat(self, peer_port: int, peer_key: bytes | None) -> None:
        self.heartbeat.start(self.peer_address, peer_port, peer_key)

    def new_heartbeat(self) -> Heartbeat:
        """On a TLS connection, datagrams carry a MAC under a fresh key each side sends the other
        in COLO_HELLO, inside TLS."""
        local = self.channel.sock.getsockname()[0]
        self.heartbeat = Heartbeat(local, self.settings.heartbeat_port, self.pair_uuid,
                                   self.settings.heartbeat_interval_ms, self.settings.heartbeat_timeout_ms,
                                   self.peer_lost, keyed=self.channel.tls is not None)
        return self.heartbeat

    def after_relaunch(self) -> None:
        """A load finished while failover waited (relaunch): start the failover again."""
        if self.failover.set_state(FailoverStatus.RELAUNCH, FailoverStatus.NONE):
            self.failover.set_state(FailoverStatus.NONE, FailoverStatus.REQUIRE)
            self._activate()

    def wait_for_failover(self) -> None:
        """After the loop ended: make sure failover is active, asking for it on a lost peer
        (failover auto) or waiting for the operator's x-colo-lost-heartbeat (manual)."""
        if self.failover.status is FailoverStatus.NONE:
            if self.settings.failover == "auto" or self.manager.shutting_down:
                self.request_failover(ExitReason.ERROR)
            else:
                log.warning("COLO %s: peer lost (%s); failover manual: waiting for x-colo-lost-heartbeat",
                            self.mode, self.lost)
                self.manager.waiting_for_operator = True
                self.hold_guest()
                while self.failover.status is not FailoverStatus.ACTIVE and not self.manager.shutting_down:
                    self.manager.operator_decided.wait(0.1)
                self.manager.waiting_for_operator = False
                if self.failover.status is FailoverStatus.NONE:       # shutting down: nobody decides
                    self.request_failover(ExitReason.ERROR)
        self.after_relaunch()

    def hold_guest(self) -> None:
        """Manual failover: the guest waits, stopped, for the operator."""
        self.held = self.vm.state in ("running", "colo")
        self.vm.pause()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
