"""``colo-appliance drill``: a COLO failover drill against running nodes, with a timed report.

    1. connect to every node (qemu.qmp); events and x-colo on; x-checkpoint-delay on the primary
    2. migrate the primary's guest to the secondary (started with --incoming tcp:...): both enter COLO
    3. N checkpoints, counted by query-migrate's ram.dirty-sync-count (one per checkpoint in COLO)
    4. fail over: kill (SIGKILL the primary daemon), freeze (SIGSTOP it: the heartbeat notices) or
       lost-heartbeat (the operator's way: stop the PVM, x-colo-lost-heartbeat on the secondary,
       quit the old primary)
    5. the secondary leaves COLO (COLO_EXIT), its guest runs, query-colo-status says so
    6. with a third node: protect the survivor again onto it, N checkpoints

Each step prints a line when it starts and one with its time when it is done.  A step that fails
ends the drill with what failed and why; nothing destructive happens before every node answered.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from .config import ConfigError, split_host_port

METHODS = ("kill", "freeze", "lost-heartbeat")
POLL = 0.01               # seconds between query-migrate / query-status polls
MIGRATION_ENDED = ("failed", "cancelled", "completed")

# Lost connections are reported by the drill itself, with the step they broke.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())


class DrillFailed(Exception):
    """The drill stopped; the message names the step and why."""


class StepError(Exception):
    """A step's expectation that did not hold."""


@dataclass
class DrillPlan:
    primary: str                    # QMP socket path or HOST:PORT
    secondary: str
    to: str                         # the secondary's migration URI, tcp:HOST:PORT
    method: str                     # one of METHODS
    checkpoints: int = 10
    checkpoint_delay_ms: int = 200
    reprotect: str | None = None    # a third node's QMP socket, and its migration URI
    reprotect_to: str | None = None
    keep_frozen: bool = False
    timeout: float = 60.0           # seconds any one step may take

    def check(self) -> None:
        if self.method not in METHODS:
            raise DrillFailed(f"--method must be one of {', '.join(METHODS)}")
        if self.method in ("kill", "freeze") and not is_unix_socket(self.primary):
            raise DrillFailed(f"--method {self.method} needs the primary's QMP UNIX socket: the daemon's PID comes "
                              f"from SO_PEERCRED, which a TCP address ({self.primary}) cannot give")
        if (self.reprotect is None) != (self.reprotect_to is None):
            raise DrillFailed("--reprotect and --reprotect-to go together")
        for uri in filter(None, (self.to, self.reprotect_to)):
            if not uri.startswith("tcp:"):
                raise DrillFailed(f"COLO needs a tcp:HOST:PORT migration URI, not {uri!r}")
        if self.checkpoints < 1 or self.checkpoint_delay_ms < 0:
            raise DrillFailed("--checkpoints must be at least 1 and --checkpoint-delay at least 0")


def is_unix_socket(address: str) -> bool:
    """As the qmp subcommand: a path, unless it reads HOST:PORT."""
    return os.path.sep in address or not address.rpartition(":")[2].isdigit()


def label(address: str) -> str:
    """What the report calls a node: its socket's name (/run/node-c.qmp: node-c), or HOST:PORT."""
    return os.path.basename(address).removesuffix(".qmp") if is_unix_socket(address) else address


def took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


class Node:
    """One node as the drill sees it: its QMP client, and its daemon's PID when known."""

    def __init__(self, role: str, address: str):
        self.role = role
        self.address = address
        self.name = label(address)
        self.qmp = QMPClient(self.name)
        self.pid: int | None = None

    async def connect(self) -> None:
        if is_unix_socket(self.address):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
                # The listening daemon's credentials (struct ucred: pid, uid, gid).
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            except OSError as e:
                sock.close()
                raise StepError(f"cannot connect to the {self.role}'s QMP socket {self.address}: "
                                f"{e.strerror}") from None
            self.pid = struct.unpack("3i", creds)[0]
            await self.qmp.connect(sock)
        else:
            try:
                await self.qmp.connect(split_host_port(self.address, "QMP address"))
            except ConfigError as e:
                raise StepError(str(e)) from None

    async def execute(self, command: str, arguments: dict | None = None):
        return await self.qmp.execute(command, arguments)

    async def run_state(self) -> str:
        return (await self.execute("query-status"))["status"]

    async def migration(self) -> dict:
        return await self.execute("query-migrate")

    async def enable_colo(self) -> None:
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "x-colo", "state": True}]})

    async def close(self) -> None:
        with contextlib.suppress(Exception):        # a killed node's connection ends in an error
            await self.qmp.disconnect()


class Drill:
    def __init__(self, plan: DrillPlan, out: Callable[[str], None]):
        self.plan = plan
        self.out = out
        self.primary = Node("primary", plan.primary)
        self.secondary = Node("secondary", plan.secondary)
        self.third = Node("third node", plan.reprotect) if plan.reprotect else None
        self.frozen = False             # the primary daemon is SIGSTOPped
        self.took_over = False          # the secondary left COLO and runs the guest

    @property
    def nodes(self) -> list[Node]:
        return [n for n in (self.primary, self.secondary, self.third) if n is not None]

    @contextmanager
    def step(self, doing: str):
        """A progress line now; any error inside becomes DrillFailed naming the step."""
        self.out(f"... {doing}")
        try:
            yield
        except (StepError, QMPError, OSError, EOFError) as e:
            raise DrillFailed(f"{doing}: {str(e) or type(e).__name__}") from None

    async def within(self, awaitable, what: str):
        """``awaitable`` within the step timeout; ``what`` says what did not happen in time."""
        try:
            return await asyncio.wait_for(awaitable, self.plan.timeout)
        except asyncio.TimeoutError:
            raise StepError(f"no {what} within {self.plan.timeout:g} s") from None

    async def run(self) -> None:
        started = time.monotonic()
        try:
            await self.connect()
            await self.enter_colo(self.primary, self.secondary, self.plan.to)
            await self.count_checkpoints(self.primary)
            fail_over = {"kill": self.fail_over_by_kill, "freeze": self.fail_over_by_freeze,
                         "lost-heartbeat": self.fail_over_by_lost_heartbeat}[self.plan.method]
            failover_started = await fail_over()
            await self.secondary_carries_on(failover_started)
            if self.plan.method == "lost-heartbeat":
                await self.quit_old_primary()
            if self.third is not None:
                await self.enter_colo(self.secondary, self.third, self.plan.reprotect_to)
                await self.count_checkpoints(self.secondary)
        finally:
            await self.release_frozen_primary()
            for node in self.nodes:
                await node.close()
        self.out(f"drill passed in {took(time.monotonic() - started)}")

    async def connect(self) -> None:
        """Every node answers, in the state it must be in, before anything is changed."""
        t0 = time.monotonic()
        with self.step(f"connecting to {', '.join(f'{n.role} {n.address}' for n in self.nodes)}"):
            for node in self.nodes:
                await node.connect()
            if (state := await self.primary.run_state()) != "running":
                raise StepError(f"the primary's guest is {state}, not running")
            for node in self.nodes[1:]:
                if (state := await node.run_state()) != "inmigrate":
                    raise StepError(f"the {node.role} is {state}, not waiting for a migration "
                                    "(start it with --incoming tcp:0.0.0.0:PORT)")
        pids = ", ".join(f"{n.name} pid {n.pid}" for n in self.nodes if n.pid is not None)
        self.out(f"connected to {len(self.nodes)} nodes in {took(time.monotonic() - t0)}"
                 + (f" ({pids})" if pids else ""))

    async def enter_colo(self, primary: Node, secondary: Node, uri: str) -> None:
        """migrate with x-colo; done when both sides report MIGRATION status colo."""
        reprotect = secondary is self.third
        doing = f"re-protecting onto {secondary.name}" if reprotect else "entering COLO"
        with self.step(f"{doing}: migrate {primary.name} -> {uri}, x-checkpoint-delay "
                       f"{self.plan.checkpoint_delay_ms} ms"):
            for node in (primary, secondary):
                await node.enable_colo()
            await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": self.plan.checkpoint_delay_ms})
            with primary.qmp.listener("MIGRATION") as p_events, secondary.qmp.listener("MIGRATION") as s_events:
                t0 = time.monotonic()
                await primary.execute("migrate", {"uri": uri})
                await self.within(self.migration_reaches(primary, p_events, "colo"),
                                  f"MIGRATION colo on {primary.name}")
                await self.within(self.migration_reaches(secondary, s_events, "colo"),
                                  f"MIGRATION colo on {secondary.name}")
        elapsed = took(time.monotonic() - t0)
        self.out(f"re-protected onto {secondary.name} in {elapsed}" if reprotect else f"COLO entered in {elapsed}")

    @staticmethod
    async def migration_reaches(node: Node, events, status: str) -> None:
        async for event in events:
            got = event["data"]["status"]
            if got == status:
                return
            if got in MIGRATION_ENDED:
                why = (await node.migration()).get("error-desc", "")
                raise StepError(f"migration {got} on {node.name}" + (f": {why}" if why else ""))

    async def count_checkpoints(self, primary: Node) -> None:
        n = self.plan.checkpoints
        with self.step(f"waiting for {n} checkpoints on {primary.name}"):
            t0 = time.monotonic()
            base = (await primary.migration())["ram"]["dirty-sync-count"]
            await self.within(self.checkpoints_after(primary, base + n), f"{n} checkpoints")
        self.out(f"{n} checkpoints in {took(time.monotonic() - t0)}")

    @staticmethod
    async def checkpoints_after(primary: Node, count: int) -> None:
        while True:
            info = await primary.migration()
            if info["status"] != "colo":
                raise StepError(f"{primary.name} left COLO (migration {info['status']})")
            if info["ram"]["dirty-sync-count"] >= count:
                return
            await asyncio.sleep(POLL)

    # -- failover: each returns when it started, for the takeover times --------------------------

    async def fail_over_by_kill(self) -> float:
        with self.step(f"SIGKILL to the primary daemon (pid {self.primary.pid})"):
            return await self.signal_primary(signal.SIGKILL, "killed")

    async def fail_over_by_freeze(self) -> float:
        with self.step(f"SIGSTOP to the primary daemon (pid {self.primary.pid}); its heartbeat goes quiet"):
            return await self.signal_primary(signal.SIGSTOP, "frozen")

    async def signal_primary(self, signum: int, done: str) -> float:
        with self.secondary.qmp.listener("COLO_EXIT") as exits:
            started = time.monotonic()
            os.kill(self.primary.pid, signum)
            self.frozen = signum == signal.SIGSTOP
            await self.took_over_at(exits, started, f"primary {done}")
        return started

    async def fail_over_by_lost_heartbeat(self) -> float:
        with self.step(f"stop on the primary {self.primary.name}"):
            t0 = time.monotonic()
            await self.within(self.stop_primary_guest(), "stop that held (each landed in a checkpoint's pause "
                              "and the checkpoint's end resumed the PVM)")
            self.out(f"PVM stopped in {took(time.monotonic() - t0)}")
        with self.step(f"x-colo-lost-heartbeat on the secondary {self.secondary.name}"):
            with self.secondary.qmp.listener("COLO_EXIT") as exits:
                started = time.monotonic()
                await self.secondary.execute("x-colo-lost-heartbeat")
                await self.took_over_at(exits, started, "x-colo-lost-heartbeat")
        return started

    async def stop_primary_guest(self) -> None:
        """stop, confirmed once the next checkpoint has begun: a stop that lands in a
        checkpoint's pause is undone when that checkpoint resumes the PVM."""
        while True:
            await self.primary.execute("stop")
            syncs = (await self.primary.migration())["ram"]["dirty-sync-count"]
            while (await self.primary.migration())["ram"]["dirty-sync-count"] == syncs:
                await asyncio.sleep(POLL)
            if await self.primary.run_state() == "paused":
                return

    async def took_over_at(self, exits, started: float, cause: str) -> None:
        data = (await self.within(exits.get(), f"COLO_EXIT on {self.secondary.name}"))["data"]
        if data["mode"] != "secondary":
            raise StepError(f"COLO_EXIT says mode {data['mode']}, not secondary")
        self.took_over = True
        self.out(f"{cause} -> secondary took over in {took(time.monotonic() - started)} "
                 f"(COLO_EXIT reason {data['reason']})")

    async def secondary_carries_on(self, failover_started: float) -> None:
        node = self.secondary
        with self.step(f"waiting for the guest to run on {node.name}"):
            await self.within(self.guest_runs(node), f"running guest on {node.name}")
            self.out(f"SVM running after {took(time.monotonic() - failover_started)}")
            colo = await node.execute("query-colo-status")
            if (colo["mode"], colo["last-mode"]) != ("none", "secondary"):
                raise StepError(f"query-colo-status says mode {colo['mode']}, last-mode {colo['last-mode']}")
        self.out(f"{node.name} out of COLO: mode none, last-mode secondary, reason {colo['reason']}")

    @staticmethod
    async def guest_runs(node: Node) -> None:
        while await node.run_state() != "running":
            await asyncio.sleep(POLL)

    async def quit_old_primary(self) -> None:
        with self.step(f"quit on the old primary {self.primary.name}"):
            if (state := await self.primary.run_state()) != "paused":
                raise StepError(f"its guest is {state}: it ran again after stop, beside the secondary's")
            with self.primary.qmp.listener("SHUTDOWN") as shutdowns:
                t0 = time.monotonic()
                await self.primary.execute("quit")
                await self.within(shutdowns.get(), f"SHUTDOWN on {self.primary.name}")
        self.out(f"old primary quit in {took(time.monotonic() - t0)}")

    async def release_frozen_primary(self) -> None:
        """Two copies must never run: a frozen primary is killed once the secondary took over."""
        if not self.frozen:
            return
        pid = self.primary.pid
        if self.plan.keep_frozen:
            self.out(f"primary daemon left frozen (pid {pid}, --keep-frozen): SIGKILL it, never SIGCONT it "
                     "while the secondary runs")
        elif self.took_over:
            os.kill(pid, signal.SIGKILL)
            self.out(f"frozen primary daemon killed (pid {pid})")
        else:
            self.out(f"primary daemon left frozen (pid {pid}): the secondary did not take over; "
                     "SIGCONT it to resume it, or SIGKILL it")


def _say(line: str) -> None:
    print(line, flush=True)


def _complain(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_drill(plan: DrillPlan, out: Callable[[str], None] = _say, err: Callable[[str], None] = _complain) -> int:
    """Run the drill, printing its report; 0 when every step worked, 1 (and why) otherwise."""
    try:
        plan.check()
        asyncio.run(Drill(plan, out).run())
    except DrillFailed as e:
        err(f"drill FAILED: {e}")
        return 1
    return 0
