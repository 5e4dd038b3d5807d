"""A node's control plane: run state, migration settings and every QMP command.

``Node`` owns the schema, the event bus and the dispatcher, and registers one
handler per schema command.  Commands whose engine is not in this build
answer a GenericError that says so; state-dependent refusals use QEMU's own
messages (checked against QEMU's behaviour).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import stat
import re
import time
from typing import Any, Callable

import appliance
import native
from appliance.qapi import QMPError, Schema, default_schema

import colo.commands
from colo import ColoManager, ColoSettings
from netfilter.settings import NetfilterSettings
from replication.destination import IDLE_TIMEOUT, MigrationDestination
from replication.incoming import HANDSHAKE_TIMEOUT
from replication.source import MigrationSource
from replication.tls import TlsError, TlsRegistry
from replication.transport import Listener, TransportError, file_write_refusal

from appliance import migrated_away
from appliance.announce import announce_self
from appliance.logs import fields, log_migration_summary
from appliance.metrics import OUTCOMES, MigrationTotals

from .dispatch import CallContext, Dispatcher
from .events import EventBus
from .migration_settings import MigrationSettings

log = logging.getLogger(__name__)

# The QEMU release whose control plane (QMP, qapi/migration.json) we speak.
QEMU_VERSION = {"major": 6, "minor": 0, "micro": 0}
PACKAGE = f"colo-appliance {appliance.__version__}"

MIGRATION_URI = re.compile(r"^(tcp|unix|exec|fd|file|rdma):")
RESET_NEEDED_STATES = {"internal-error", "shutdown", "guest-panicked"}


class Node:
    """Control state of one appliance node; the QMP and HTTP front ends call into it."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, *, incoming: str | None = None,
                 schema: Schema | None = None, vm=None, autostart: bool = True,
                 colo_settings: ColoSettings | None = None, netfilter_settings: NetfilterSettings | None = None,
                 tls: TlsRegistry | None = None, tls_parameters: dict | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 file_overwrite: bool = False, state_dir: str | None = None):
        """``tls``: declared tls-creds/authz objects; ``tls_parameters``: their initial migration
        parameters (so that an --incoming socket never admits a plaintext source); ``file_overwrite``:
        a ``migrate file:PATH`` may replace an existing file; ``state_dir``: where a guest that
        migrated away is remembered (appliance.migrated_away), None: nowhere."""
        self.name = name
        self.state_dir = state_dir
        self.file_overwrite = file_overwrite
        self.vm = vm
        self.schema = schema or default_schema()
        self.loop = loop
        self.events = EventBus(self.schema, loop)
        self.dispatcher = Dispatcher(self.schema)
        self.settings = MigrationSettings(self.schema, tls)
        self.settings.set_parameters(tls_parameters or {})
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.incoming_refused: collections.Counter = collections.Counter()   # by reason, since start
        self.incoming = incoming
        self.autostart = autostart
        self.migration: MigrationSource | MigrationDestination | None = None
        self.migration_totals = MigrationTotals()      # finished migrations and their bytes, for metrics
        self._reclaimed: MigrationSource | None = None    # a completed migration whose guest was resumed here anyway
        self._run_state = "inmigrate" if incoming else "running"
        if vm is not None:
            if incoming:
                vm.set_state("prelaunch", "inmigrate")
            vm.add_listener(self._on_vm_event)
        self.colo = ColoManager(colo_settings or ColoSettings(), self.events.emit, self._colo_takeover,
                                netfilter_settings)
        self.quit_requested = asyncio.Event()
        self.dirty_rate: dict = {"status": "unstarted", "start-time": 0, "calc-time": 0}
        self._console_read = 0          # bytes of console output already read by ringbuf-read
        self._register_all()
        missing = self.dispatcher.missing()
        if missing:
            raise RuntimeError(f"schema commands without a handler: {missing}")

    # -- helpers ---------------------------------------------------------------

    @property
    def run_state(self) -> str:
        """The guest's run state; a node without a guest keeps its own."""
        return self.vm.state if self.vm is not None else self._run_state

    def set_run_state(self, old: str | set[str], new: str) -> bool:
        """Compare-and-set the run state of a node without a guest."""
        olds = {old} if isinstance(old, str) else old
        if self._run_state not in olds:
            return False
        self._run_state = new
        return True

    def _on_vm_event(self, name: str, data: dict) -> None:
        """VM events (from any thread) become QMP events, reduced to the schema's members."""
        if name == "SHUTDOWN" and not data.get("guest"):
            return                      # host-side shutdowns are announced by request_quit
        if name == "GUEST_PANICKED":       # the VM logged the reason
            data = {"action": data["action"]}
        self.events.emit(name, data or None)

    @property
    def migration_status(self) -> str:
        return self.migration.status if self.migration is not None else "none"

    def migration_running(self) -> bool:
        return self.migration is not None and self.migration.running

    def migration_direction(self) -> str | None:
        if self.migration is None:
            return None
        return "incoming" if isinstance(self.migration, MigrationDestination) else "outgoing"

    def outgoing_running(self) -> bool:
        return isinstance(self.migration, MigrationSource) and self.migration.running

    def start_incoming(self, uri: str, named_fds: dict[str, int] | None = None) -> None:
        """Listen for a migration into this node's guest (``--incoming URI`` or migrate-incoming)."""
        if self.vm is None:
            raise QMPError("this node has no guest to migrate into (start it with --guest)")
        scheme = self.check_migration_uri(uri)
        params = self.settings.parameters
        try:
            if self.settings.tls.server(params) is not None:
                self._check_tls_uri(scheme, uri, named_fds or {})
        except TlsError as e:
            raise QMPError(str(e)) from None
        try:
            listener = Listener(uri, named_fds)
        except TransportError as e:
            raise QMPError(str(e)) from e
        self.incoming_address = listener.address
        log.info("waiting for an incoming migration on %s%s", listener.address,
                 f" (TLS: tls-creds {params['tls-creds']})" if params["tls-creds"] else "")
        self.migration = MigrationDestination(self.vm, listener, self.settings.capabilities, self.autostart,
                                              self._migration_event, verify_ram=self.colo.settings.verify_ram,
                                              colo_handover=self.colo.run_secondary,
                                              tls=lambda: self.settings.tls.server(params), refused=self.incoming_refused,
                                              handshake_timeout=self.handshake_timeout, idle_timeout=self.idle_timeout,
                                              parameters=self.settings.parameters)
        self._remember_on_completion(incoming=True)
        self.migration.start()

    def _migration_event(self, name: str, data: dict) -> None:
        """From a migration thread: the event (QMP sees it with the 'events' capability), then
        what follows a finished incoming migration (announce the guest's new place; re-arm a
        failed socket for another try)."""
        incoming = isinstance(self.migration, MigrationDestination)
        finished = name == "MIGRATION" and data["status"] in OUTCOMES
        if self.migration.caps["events"]:
            self.events.emit(name, data)        # its log line tells the status
        elif name == "MIGRATION" and not finished:         # a finished one's summary tells it
            role = "incoming migration" if incoming else "migration"
            log.info("%s %s", role, data["status"], extra=fields(role=role, status=data["status"]))
        if finished:
            self._log_migration_summary()
            self.migration_totals.finished(self.migration, self.migration_direction(), data["status"])
        if name == "MIGRATION" and data["status"] == "completed" and incoming and not self.migration.colo_stream:
            self._announce()            # a COLO secondary announces when it takes over, if it does
        if (name == "MIGRATION" and data["status"] == "failed" and isinstance(self.migration, MigrationDestination)
                and self.incoming not in (None, "defer") and self.incoming.startswith(("tcp:", "unix:"))):
            self.loop.call_soon_threadsafe(self._rearm_incoming)

    def _log_migration_summary(self) -> None:
        migration, info = self.migration, self.migration.info()
        if isinstance(migration, MigrationDestination):
            role, moved = "incoming migration", migration.bytes_received
        else:
            role, moved = "migration", info.get("ram", {}).get("transferred", 0)
        level = logging.WARNING if info["status"] == "failed" else logging.INFO
        log_migration_summary(log, level, role, info, moved)

    def _remember_on_completion(self, incoming: bool) -> None:
        if self.state_dir is not None:
            self.migration.before_completed = lambda: self._remember_where_the_guest_is(incoming)

    def _remember_where_the_guest_is(self, incoming: bool) -> None:
        """Before anyone hears of the completion (query-migrate, the event): a restart must not
        boot a guest that left."""
        if incoming:
            migrated_away.forget(self.state_dir, self.name)
        elif self.migration.colo_handover is None:     # a COLO primary's guest ran on here
            try:
                migrated_away.remember(self.state_dir, self.name, str(self.vm.uuid), self.migration.uri)
            except OSError as e:
                log.error("cannot record that the guest migrated away (%s): do not restart this node with "
                          "its guest", e)

    def _announce(self) -> None:
        """From any thread: tell the bridges where the guest is now (QEMU's announce-self)."""
        if self.vm.nic is not None:
            self.loop.call_soon_threadsafe(
                lambda: self.loop.create_task(announce_self(self.vm.nic, self.settings.parameters)))

    def _colo_takeover(self) -> None:
        """This secondary's guest is the service guest now."""
        self._announce()

    def _rearm_incoming(self) -> None:
        if self.migration_status == "failed" and self.vm.state == "inmigrate" and not self.quit_requested.is_set():
            self.migration.join()
            self.start_incoming(self.incoming)

    def status_line(self) -> str:
        """The node in one line, for systemd's STATUS= (``systemctl status``)."""
        line = f"guest {self.run_state}; migration {self.migration_status}; COLO {self.colo.mode.value}"
        failover = self.colo.failover.status.value
        return line if failover == "none" else f"{line} (failover {failover})"

    def status(self) -> dict:
        """The node at a glance, for the HTTP API."""
        return {
            "node": self.name,
            "version": appliance.__version__,
            "incoming-refused": dict(self.incoming_refused),
            "vm": self._vm_status(),
            "migration": self._migration_status(),
            "colo": self.colo.status(),
        }

    def _migration_status(self) -> dict:
        """query-migrate's figures, and where an outgoing migration goes."""
        if self.migration is None:
            return {"status": "none"}
        info = self.migration.info()
        if isinstance(self.migration, MigrationSource):
            info["destination"] = self.migration.uri
        return info

    def _vm_status(self) -> dict:
        status = {"status": self.run_state, "running": self.run_state == "running"}
        if self.vm is not None:
            status.update(image=self.vm.config.image, memory_mib=self.vm.config.memory_mib,
                          uuid=str(self.vm.uuid), stop_reason=self.vm.stop_reason,
                          exit_status=self.vm.exit_status)
        return status

    def _register_all(self) -> None:
        table: dict[str, Callable[[dict, CallContext], Any]] = {
            "qmp_capabilities": self._capabilities_again,
            "query-version": lambda a, c: {"qemu": dict(QEMU_VERSION), "package": PACKAGE},
            "query-commands": lambda a, c: [{"name": n} for n in self.dispatcher.handlers],
            "query-status": self.query_status,
            "stop": self.stop,
            "cont": self.cont,
            "x-cont-after-migration": self.cont_after_migration,
            "quit": self.quit,
            "getfd": self.getfd,
            "ringbuf-read": self.ringbuf_read,
            "closefd": self.closefd,
            "query-migrate": self.query_migrate,
            "migrate-set-capabilities": lambda a, c: self.settings.set_capabilities(
                a["capabilities"], self.outgoing_running()),
            "query-migrate-capabilities": lambda a, c: self.settings.query_capabilities(),
            "migrate-set-parameters": lambda a, c: self.settings.set_parameters(a),
            "query-migrate-parameters": lambda a, c: self.settings.query_parameters(),
            "migrate_set_downtime": self.migrate_set_downtime,
            "migrate_set_speed": lambda a, c: self.settings.set_parameters({"max-bandwidth": a["value"] & (2**64 - 1)}),
            "migrate-set-cache-size": lambda a, c: self.settings.set_parameters(
                {"xbzrle-cache-size": a["value"] & (2**64 - 1)}),
            "query-migrate-cache-size": lambda a, c: self.settings.parameters["xbzrle-cache-size"],
            "migrate": self.migrate,
            "migrate-incoming": self.migrate_incoming,
            "migrate_cancel": self.migrate_cancel,
            "migrate-continue": self.migrate_continue,
            "migrate-start-postcopy": self._postcopy_not_enabled,
            "migrate-recover": self._migrate_recover,
            "migrate-pause": self._migrate_pause,
            "client_migrate_info": self.client_migrate_info,
            **colo.commands.handlers(self.colo),
            "calc-dirty-rate": self.calc_dirty_rate,
            "query-dirty-rate": lambda a, c: dict(self.dirty_rate),
        }
        for name in ("xen-save-devices-state", "xen-set-global-dirty-log", "xen-load-devices-state",
                     "xen-set-replication", "query-xen-replication-status"):
            table[name] = self._xen_only(name)
        for name, handler in table.items():
            self.dispatcher.register(name, handler)

    # -- basics ------------------------------------------------------------------

    def _capabilities_again(self, args: dict, ctx: CallContext):
        # Negotiation is per connection and handled by the QMP server; over HTTP
        # there is nothing to negotiate.
        raise QMPError("Capabilities negotiation is already complete, command ignored",
                       "CommandNotFound")

    def query_status(self, args: dict, ctx: CallContext) -> dict:
        return {"running": self.run_state == "running", "singlestep": False, "status": self.run_state}

    async def stop(self, args: dict, ctx: CallContext) -> None:
        if self.run_state == "inmigrate":
            return                    # QEMU: only clears autostart
        if self.vm is not None:
            # pause() waits for the vCPU to leave KVM_RUN; the loop keeps serving meanwhile.
            await self.loop.run_in_executor(None, self.vm.pause)
        elif self.set_run_state("running", "paused"):
            self.events.emit("STOP")

    def migrated_away(self) -> bool:
        """The guest's last outgoing migration completed (not into COLO): it runs on the destination."""
        return (isinstance(self.migration, MigrationSource) and self.migration.status == "completed"
                and self.migration.colo_handover is None and self._reclaimed is not self.migration)

    async def cont(self, args: dict, ctx: CallContext) -> None:
        if self.run_state not in ("inmigrate", "running") and self.migrated_away():
            raise QMPError("the guest was migrated to another node (migration completed) and runs there now; "
                           "resuming it here too would run two copies with one MAC address. If the destination "
                           "does not run it, resume it here with x-cont-after-migration")
        await self._cont(args, ctx)

    async def cont_after_migration(self, args: dict, ctx: CallContext) -> None:
        """The operator's word that this copy is the one to run: cont works here again after it."""
        await self._cont(args, ctx)
        if self.migrated_away():
            self._reclaimed = self.migration

    async def _cont(self, args: dict, ctx: CallContext) -> None:
        if self.run_state in RESET_NEEDED_STATES:
            raise QMPError("Resetting the Virtual Machine is required")
        if self.run_state in ("inmigrate", "running"):
            return
        if self.outgoing_running() and self.migration_status != "colo":    # a COLO primary's guest may run
            raise QMPError("the guest is being migrated; cancel the migration with migrate_cancel first")
        if isinstance(self.migration, MigrationSource) and self.migration.ram_released:
            raise QMPError("the guest's RAM was released after its migration (release-ram); "
                           "it runs on the destination now")
        if self.vm is not None:
            await self.loop.run_in_executor(None, self.vm.resume)
        elif self.set_run_state({"paused", "prelaunch", "postmigrate"}, "running"):
            self.events.emit("RESUME")

    def quit(self, args: dict, ctx: CallContext) -> None:
        self.loop.call_soon(self.request_quit, "host-qmp-quit")

    def request_quit(self, reason: str) -> None:
        if not self.quit_requested.is_set():
            self.events.emit("SHUTDOWN", {"guest": False, "reason": reason})
            self.quit_requested.set()

    async def close(self) -> None:
        """Stop any migration, power the guest off and release it (the daemon is exiting)."""
        self.colo.shutdown()
        if isinstance(self.migration, MigrationSource):
            self.migration.cancel()
        elif isinstance(self.migration, MigrationDestination):
            self.migration.abort()
        if self.migration is not None:
            await self.loop.run_in_executor(None, self.migration.join, 30)
        if self.vm is not None:
            await self.loop.run_in_executor(None, self.vm.close)

    def getfd(self, args: dict, ctx: CallContext) -> None:
        if not ctx.received_fds:
            raise QMPError("No file descriptor supplied via SCM_RIGHTS")
        fd = ctx.received_fds.pop()
        name = args["fdname"]
        if name[:1].isdigit():
            os.close(fd)
            raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
        if name in ctx.fds:
            os.close(ctx.fds[name])
        ctx.fds[name] = fd

    def ringbuf_read(self, args: dict, ctx: CallContext) -> str:
        if args["device"] != "console" or self.vm is None:
            raise QMPError(f"Device '{args['device']}' not found", "DeviceNotFound")
        if args["size"] < 0:
            raise QMPError("size must be greater than zero")
        output = self.vm.read_console().encode()
        chunk = output[self._console_read:self._console_read + args["size"]]
        self._console_read += len(chunk)
        if args.get("format") == "base64":
            return base64.b64encode(chunk).decode()
        return chunk.decode(errors="replace")

    def closefd(self, args: dict, ctx: CallContext) -> None:
        fd = ctx.fds.pop(args["fdname"], None)
        if fd is None:
            raise QMPError(f"File descriptor named '{args['fdname']}' not found")
        os.close(fd)

    # -- migration -----------------------------------------------------------------

    def query_migrate(self, args: dict, ctx: CallContext) -> dict:
        return self.migration.info() if self.migration is not None else {}

    def migrate_set_downtime(self, args: dict, ctx: CallContext) -> None:
        value = args["value"]
        if not 0 <= value <= 2000:
            raise QMPError("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds")
        self.settings.set_parameters({"downtime-limit": int(value * 1000)})

    @staticmethod
    def check_migration_uri(uri: str) -> str:
        m = MIGRATION_URI.match(uri)
        if not m:
            raise QMPError("Parameter 'uri' expects a valid migration protocol")
        if m.group(1) == "rdma":
            raise QMPError("RDMA migration is not supported by this appliance")
        return m.group(1)

    def migrate(self, args: dict, ctx: CallContext) -> None:
        if args.get("blk") or args.get("inc"):
            raise QMPError("old-style block migration (blk/inc) is not supported by this appliance")
        if args.get("resume"):
            raise QMPError("Cannot resume if there is no paused migration")
        if self.migration_running():
            raise QMPError("There's a migration process in progress")
        if self.dirty_rate["status"] == "measuring":
            raise QMPError("the dirty rate is being measured (calc-dirty-rate); migrate when it is done")
        scheme = self.check_migration_uri(args["uri"])
        if self.vm is None:
            raise QMPError("this node has no guest to migrate")
        if self.run_state not in ("running", "paused", "postmigrate"):
            raise QMPError(f"cannot migrate a guest in state {self.run_state}")
        caps = self.settings.capabilities
        if caps["multifd"] and scheme not in ("tcp", "unix"):
            raise QMPError("multifd needs a tcp: or unix: migration URI")
        if caps["multifd"] and caps["xbzrle"]:
            raise QMPError("xbzrle is not supported together with multifd")
        if caps["return-path"] and scheme in ("exec", "file"):
            raise QMPError("return-path needs a two-way (socket) migration URI")
        if scheme == "file" and (refusal := file_write_refusal(args["uri"][5:], self.file_overwrite)):
            raise QMPError(refusal)
        if scheme == "fd" and args["uri"][3:] not in ctx.fds:
            raise QMPError(f"File descriptor named '{args['uri'][3:]}' has not been found")
        if caps["x-colo"]:
            self._check_colo(scheme, caps)
        try:
            tls = self.settings.tls.client(self.settings.parameters,
                                           args["uri"][4:].rpartition(":")[0].strip("[]") if scheme == "tcp" else None)
            if tls is not None:
                self._check_tls_uri(scheme, args["uri"], ctx.fds)
        except TlsError as e:
            raise QMPError(str(e)) from None
        self.migration = MigrationSource(self.vm, args["uri"], caps, self.settings.parameters,
                                         ctx.fds, self._migration_event, verify_ram=self.colo.settings.verify_ram,
                                         colo_handover=self.colo.run_primary if caps["x-colo"] else None, tls=tls,
                                         file_overwrite=self.file_overwrite)
        self._remember_on_completion(incoming=False)
        self.migration.start()

    @staticmethod
    def _check_tls_uri(scheme: str, uri: str, fds: dict[str, int]) -> None:
        """TLS runs over sockets only, as in QEMU."""
        if scheme in ("tcp", "unix") or (scheme == "fd" and uri[3:] in fds
                                          and stat.S_ISSOCK(os.fstat(fds[uri[3:]]).st_mode)):
            return
        raise TlsError(f"TLS (tls-creds) needs a socket migration URI (tcp:, unix:, or fd: of a socket), not {uri!r}")

    def migrate_incoming(self, args: dict, ctx: CallContext) -> None:
        """As QEMU with ``-incoming defer``; any node accepts it while no migration runs and its
        guest is not here to lose: it migrated away (postmigrate: a source becomes the destination
        of the way back, without a restart) or never ran (prelaunch, -S)."""
        if isinstance(self.migration, MigrationDestination) and self.migration.running:
            raise QMPError("The incoming migration has already been started")
        if self.outgoing_running():
            raise QMPError("There's a migration process in progress")
        if self.vm is None:
            raise QMPError("this node has no guest to migrate into (start it with --guest)")
        state = self.run_state
        if state not in ("inmigrate", "postmigrate", "prelaunch"):
            raise QMPError(f"the guest is {state} on this node: an incoming migration would overwrite it. "
                           "migrate-incoming is accepted when the guest migrated away (postmigrate), never ran "
                           "(-S) or the node was started with --incoming defer")
        if self.migration is not None:
            self.migration.join()
        if state != "inmigrate" and not self.vm.set_state(state, "inmigrate"):
            raise QMPError(f"the guest left state {state} meanwhile; try again")
        try:
            self.start_incoming(args["uri"], ctx.fds)
        except QMPError:
            self.vm.set_state("inmigrate", state)
            raise

    def migrate_cancel(self, args: dict, ctx: CallContext) -> None:
        if isinstance(self.migration, MigrationSource):
            self.migration.cancel()

    def migrate_continue(self, args: dict, ctx: CallContext) -> None:
        if not (isinstance(self.migration, MigrationSource) and self.migration.continue_from(args["state"])):
            raise QMPError(f"Migration not in expected state: {self.migration_status}")

    def _postcopy_not_enabled(self, args: dict, ctx: CallContext) -> None:
        raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")

    def _migrate_recover(self, args: dict, ctx: CallContext) -> None:
        raise QMPError("Migrate recover can only be run when postcopy is paused.")

    def _migrate_pause(self, args: dict, ctx: CallContext) -> None:
        raise QMPError("migrate-pause is currently only supported during postcopy-active state")

    def client_migrate_info(self, args: dict, ctx: CallContext) -> None:
        if args["protocol"] != "spice":
            raise QMPError("Parameter 'protocol' expects 'spice'")
        raise QMPError("SPICE is not supported by this appliance")

    async def calc_dirty_rate(self, args: dict, ctx: CallContext) -> None:
        """Measure the guest's dirty rate with the dirty log over calc-time seconds."""
        seconds = args["calc-time"]
        if not 1 <= seconds <= 60:
            raise QMPError("calc-time is out of range[1, 60].")
        if self.vm is None:
            raise QMPError("this node has no guest to measure")
        if self.migration_running():
            raise QMPError("cannot measure the dirty rate while a migration uses the dirty log")
        if self.dirty_rate["status"] == "measuring":
            raise QMPError("the dirty rate is already being measured")
        self.dirty_rate = {"status": "measuring", "start-time": int(time.time()), "calc-time": seconds}
        self.loop.run_in_executor(None, self._measure_dirty_rate, seconds)

    def _measure_dirty_rate(self, seconds: int) -> None:
        vm = self.vm
        try:
            vm.start_dirty_tracking()
            try:
                vm.fetch_dirty_bitmap()
                time.sleep(seconds)
                dirty = native.bitmap_count(vm.fetch_dirty_bitmap())
            finally:
                vm.stop_dirty_tracking()
        except Exception:
            log.exception("dirty rate measurement failed")
            self.dirty_rate = {"status": "unstarted", "start-time": 0, "calc-time": 0}
            return
        # QEMU reports MB/s of dirtied memory.
        self.dirty_rate = dict(self.dirty_rate, status="measured", **{"dirty-rate": dirty * 4096 // seconds >> 20})

    # -- COLO ------------------------------------------------------------------------

    def _check_colo(self, scheme: str, caps: dict) -> None:
        """What COLO cannot do (yet) is refused before anything starts."""
        if scheme != "tcp":
            raise QMPError("COLO needs a tcp: migration URI (its heartbeat runs beside that connection)")
        for name in ("multifd", "compress", "postcopy-ram"):
            if caps[name]:
                raise QMPError(f"x-colo cannot be combined with {name}: COLO checkpoints send pages "
                               "on the migration connection")
        if self.vm.disk is not None:
            raise QMPError("x-colo with a writable disk is refused until disk replication exists: "
                           "the secondary's disk would diverge from the primary's")

    @staticmethod
    def _xen_only(name: str):
        def refuse(args: dict, ctx: CallContext):
            raise QMPError(f"{name} is a Xen command; this appliance hosts KVM guests")
        return refuse
