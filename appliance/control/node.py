"""A node's control plane: run state, migration settings and every QMP command.

``Node`` owns the schema, the event bus and the dispatcher, and registers one
handler per schema command.  Commands whose engine is not in this build
answer a GenericError that says so; state-dependent refusals use QEMU's own
messages (checked against QEMU's behaviour).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any, Callable

import appliance
from appliance.qapi import QMPError, Schema, default_schema

from .dispatch import CallContext, Dispatcher
from .events import EventBus
from .migration_settings import MigrationSettings

log = logging.getLogger(__name__)

# The QEMU release whose control plane (QMP, qapi/migration.json) we speak.
QEMU_VERSION = {"major": 6, "minor": 0, "micro": 0}
PACKAGE = f"colo-appliance {appliance.__version__}"

MIGRATION_URI = re.compile(r"^(tcp|unix|exec|fd|file|rdma):")
RUNNING_MIGRATION_STATES = {"setup", "cancelling", "active", "postcopy-active", "postcopy-paused",
                            "postcopy-recover", "colo", "pre-switchover", "device", "wait-unplug"}
RESET_NEEDED_STATES = {"internal-error", "shutdown", "guest-panicked"}


class Node:
    """Control state of one appliance node; the QMP and HTTP front ends call into it."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, *, incoming: str | None = None,
                 schema: Schema | None = None):
        self.name = name
        self.schema = schema or default_schema()
        self.loop = loop
        self.events = EventBus(self.schema, loop)
        self.dispatcher = Dispatcher(self.schema)
        self.settings = MigrationSettings(self.schema)
        self.incoming = incoming
        self.run_state = "inmigrate" if incoming else "running"
        self.migration_status = "none"
        self.colo = {"mode": "none", "last-mode": "none", "reason": "none"}
        self.quit_requested = asyncio.Event()
        self._register_all()
        missing = self.dispatcher.missing()
        if missing:
            raise RuntimeError(f"schema commands without a handler: {missing}")

    # -- helpers ---------------------------------------------------------------

    def set_run_state(self, old: str | set[str], new: str) -> bool:
        """Compare-and-set the run state; False (no change) when it is not ``old``."""
        olds = {old} if isinstance(old, str) else old
        if self.run_state not in olds:
            return False
        log.info("run state %s -> %s", self.run_state, new)
        self.run_state = new
        return True

    def migration_running(self) -> bool:
        return self.migration_status in RUNNING_MIGRATION_STATES

    def status(self) -> dict:
        """The node at a glance, for the HTTP API."""
        return {
            "node": self.name,
            "version": appliance.__version__,
            "vm": {"status": self.run_state, "running": self.run_state == "running"},
            "migration": {"status": self.migration_status},
            "colo": dict(self.colo),
        }

    def _register_all(self) -> None:
        table: dict[str, Callable[[dict, CallContext], Any]] = {
            "qmp_capabilities": self._capabilities_again,
            "query-version": lambda a, c: {"qemu": dict(QEMU_VERSION), "package": PACKAGE},
            "query-commands": lambda a, c: [{"name": n} for n in self.dispatcher.handlers],
            "query-status": self.query_status,
            "stop": self.stop,
            "cont": self.cont,
            "quit": self.quit,
            "getfd": self.getfd,
            "closefd": self.closefd,
            "query-migrate": self.query_migrate,
            "migrate-set-capabilities": lambda a, c: self.settings.set_capabilities(
                a["capabilities"], self.migration_running()),
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
            "query-colo-status": lambda a, c: dict(self.colo),
            "x-colo-lost-heartbeat": self.colo_lost_heartbeat,
            "calc-dirty-rate": self.calc_dirty_rate,
            "query-dirty-rate": lambda a, c: {"status": "unstarted", "start-time": 0, "calc-time": 0},
        }
        for name in ("xen-save-devices-state", "xen-set-global-dirty-log", "xen-load-devices-state",
                     "xen-set-replication", "query-xen-replication-status", "xen-colo-do-checkpoint"):
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

    def stop(self, args: dict, ctx: CallContext) -> None:
        if self.run_state == "inmigrate":
            return                    # QEMU: only clears autostart
        if self.set_run_state("running", "paused"):
            self.events.emit("STOP")

    def cont(self, args: dict, ctx: CallContext) -> None:
        if self.run_state in RESET_NEEDED_STATES:
            raise QMPError("Resetting the Virtual Machine is required")
        if self.run_state == "inmigrate":
            return
        if self.set_run_state({"paused", "prelaunch", "postmigrate"}, "running"):
            self.events.emit("RESUME")

    def quit(self, args: dict, ctx: CallContext) -> None:
        self.loop.call_soon(self.request_quit, "host-qmp-quit")

    def request_quit(self, reason: str) -> None:
        if not self.quit_requested.is_set():
            self.events.emit("SHUTDOWN", {"guest": False, "reason": reason})
            self.quit_requested.set()

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

    def closefd(self, args: dict, ctx: CallContext) -> None:
        fd = ctx.fds.pop(args["fdname"], None)
        if fd is None:
            raise QMPError(f"File descriptor named '{args['fdname']}' not found")
        os.close(fd)

    # -- migration -----------------------------------------------------------------

    def query_migrate(self, args: dict, ctx: CallContext) -> dict:
        if self.migration_status == "none":
            return {}
        return {"status": self.migration_status}

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
        self.check_migration_uri(args["uri"])
        raise QMPError("live migration is not available: the migration engine is not part of this build yet")

    def migrate_incoming(self, args: dict, ctx: CallContext) -> None:
        if not self.incoming:
            raise QMPError("'-incoming' was not specified on the command line")
        if self.incoming != "defer":
            raise QMPError("The incoming migration has already been started")
        self.check_migration_uri(args["uri"])
        raise QMPError("incoming migration is not available: the migration engine is not part of this build yet")

    def migrate_cancel(self, args: dict, ctx: CallContext) -> None:
        if self.migration_running():
            raise QMPError("cancelling a migration needs the migration engine, which is not part of this build yet")

    def migrate_continue(self, args: dict, ctx: CallContext) -> None:
        if self.migration_status != args["state"]:
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

    def calc_dirty_rate(self, args: dict, ctx: CallContext) -> None:
        if not 1 <= args["calc-time"] <= 60:
            raise QMPError("calc-time is out of range[1, 60].")
        raise QMPError("dirty rate measurement is not available: the migration engine is not part of this build yet")

    # -- COLO ------------------------------------------------------------------------

    def colo_lost_heartbeat(self, args: dict, ctx: CallContext) -> None:
        if self.colo["mode"] == "none":
            raise QMPError("The feature 'colo' is not enabled")
        raise QMPError("COLO failover is not part of this build yet")

    @staticmethod
    def _xen_only(name: str):
        def refuse(args: dict, ctx: CallContext):
            raise QMPError(f"{name} is a Xen command; this appliance hosts KVM guests")
        return refuse
