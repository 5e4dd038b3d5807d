"""Live migration between two node daemons, driven with QEMU's own QMP library.

The nodes live in network namespaces joined by a bridge to a client namespace
(appliance.netns); the migration stream crosses the veths between them.
"""
import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from appliance.netns import Topology
from conftest import start_daemon, stop_daemon

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
PORT = 4444


@pytest.fixture
def topo():
    t = Topology(f"mig{os.getpid() % 100000}", ["a", "b"])
    yield t
    t.close()


class Nodes:
    def __init__(self, topo, tmp_path, guest_args):
        self.topo = topo
        self.tmp_path = tmp_path
        self.guest_args = guest_args
        self.daemons = []
        self.clients = []

    async def start(self, node, *extra):
        d = start_daemon(self.tmp_path, *self.guest_args, *extra, name=f"{node}{len(self.daemons)}",
                         namespace=self.topo.nodes[node].namespace)
        self.daemons.append(d)
        qmp = QMPClient(node)
        await qmp.connect(d.qmp)
        self.clients.append(qmp)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        return d, qmp

    async def migrate(self, qmp, until="completed", timeout=60):
        """migrate the guest to node b and wait for the MIGRATION event ``until``."""
        with qmp.listener("MIGRATION") as events:
            await qmp.execute("migrate", {"uri": f"tcp:{self.topo.nodes['b'].address}:{PORT}"})
            return await events_until(events, "MIGRATION", until, timeout)

    async def close(self):
        for qmp in self.clients:
            try:
                await qmp.disconnect()
            except Exception:
                pass
        for d in self.daemons:
            stop_daemon(d)


async def events_until(listener, name, status, timeout=60):
    seen = []
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        seen.append((event["event"], event.get("data", {}).get("status") or event.get("data", {}).get("pass")))
        got = event.get("data", {}).get("status")
        if event["event"] == name and got == status:
            return seen
        assert not (event["event"] == "MIGRATION" and got in ("completed", "failed", "cancelled")), seen


def kvstore_args(topo):
    return ["--guest", "kvstore", "-m", "64", "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
            "--nic", "tap=tap0,bridge=br0"]


async def wait_console(qmp, text, timeout=20):
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} on the console: {seen!r}"
        seen += await qmp.execute("ringbuf-read", {"device": "console", "size": 65536})
        await asyncio.sleep(0.05)


class RedisLoad(threading.Thread):
    """One open connection doing SET/GET pairs until stopped; every reply is checked."""

    def __init__(self, topo):
        super().__init__(daemon=True)
        with topo.client_sockets():
            self.conn = socket.create_connection((topo.guest_address, 6379), timeout=20)
        self.ops = 0
        self.errors = []
        self.stopping = threading.Event()
        self.file = self.conn.makefile("rb")

    def call(self, *words):
        self.conn.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        line = self.file.readline()
        if line.startswith(b"$") and line != b"$-1\r\n":
            return self.file.read(int(line[1:]) + 2)[:-2]
        return line.rstrip(b"\r\n")

    def run(self):
        try:
            while not self.stopping.is_set():
                value = b"v%d" % self.ops
                if self.call(b"SET", b"load", value) != b"+OK":
                    self.errors.append("SET failed")
                if self.call(b"GET", b"load") != value:
                    self.errors.append(f"GET returned a wrong value at op {self.ops}")
                self.ops += 1
        except OSError as e:
            self.errors.append(f"connection error: {e}")


async def test_kvstore_under_load_migrates_and_its_client_survives(topo, guest_images, tmp_path):
    nodes = Nodes(topo, tmp_path, kvstore_args(topo))
    try:
        src, a = await nodes.start("a")
        dst, b = await nodes.start("b", "--incoming", "defer")   # QEMU's way: capabilities first
        assert (await b.execute("query-status"))["status"] == "inmigrate"
        assert await b.execute("query-migrate") == {}
        await wait_console(a, "listening")
        load = RedisLoad(topo)
        assert load.call(b"SET", b"before", b"migration") == b"+OK"
        load.start()
        await asyncio.sleep(0.5)
        with a.listener() as a_events, b.listener() as b_events:
            await b.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{PORT}"})
            await a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
            a_seen = await events_until(a_events, "MIGRATION", "completed")
            b_seen = await events_until(b_events, "MIGRATION", "completed")
        ops_at_switch = load.ops
        await asyncio.sleep(1.0)
        load.stopping.set()
        load.join(10)
        assert not load.errors, load.errors
        assert load.ops > ops_at_switch + 10, "the client made no progress after the migration"
        assert load.call(b"GET", b"before") == b"migration"
        load.conn.close()

        # QEMU's order on both sides.
        names = [n if n != "MIGRATION" else f"MIGRATION {s}" for n, s in a_seen if n != "MIGRATION_PASS"]
        assert names == ["MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION device", "MIGRATION completed"]
        passes = [s for n, s in a_seen if n == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1))
        assert a_seen[:3] == [("MIGRATION", "setup"), ("MIGRATION_PASS", 1), ("MIGRATION", "active")]
        assert [(n, s) for n, s in b_seen] == [("MIGRATION", "setup"), ("MIGRATION", "active"), ("RESUME", None),
                                               ("MIGRATION", "completed")]
        assert (await a.execute("query-status"))["status"] == "postmigrate"
        assert (await b.execute("query-status"))["status"] == "running"
        info = await a.execute("query-migrate")
        assert info["status"] == "completed" and info["downtime"] <= info["total-time"]
        assert info["ram"]["total"] == 64 << 20 and info["ram"]["transferred"] > 0
        assert (await b.execute("query-migrate"))["status"] == "completed"
    finally:
        await nodes.close()


@pytest.mark.slow
async def test_memdirty_256mib_flat_out_with_auto_converge(topo, guest_images, tmp_path):
    nodes = Nodes(topo, tmp_path, ["--guest", "memdirty", "-m", "384", "--append", "mib=256 rate=0"])
    try:
        src, a = await nodes.start("a")
        dst, b = await nodes.start("b", "--incoming", f"tcp:0.0.0.0:{PORT}")
        await wait_console(a, "pass ")
        await a.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "auto-converge", "state": True}]})
        await a.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await nodes.migrate(a, timeout=120)
        info = await a.execute("query-migrate")
        assert info["ram"]["normal"] >= 256 * 256
        assert info["downtime"] < 2000
        # The destination checked the RAM digest before resuming; memdirty checks its own
        # invariant on every pass and would halt on a break.
        await wait_console(b, "pass ")
        await asyncio.sleep(1)
        assert (await b.execute("query-status"))["status"] == "running"
    finally:
        await nodes.close()


async def test_destination_killed_midway_then_a_second_migration_succeeds(topo, guest_images, tmp_path):
    nodes = Nodes(topo, tmp_path, ["--guest", "memdirty", "-m", "64", "--append", "mib=32 rate=0"])
    try:
        src, a = await nodes.start("a")
        dst, b = await nodes.start("b", "--incoming", f"tcp:0.0.0.0:{PORT}")
        await a.execute("migrate-set-parameters", {"max-bandwidth": 16 << 20})
        with a.listener("MIGRATION") as events:
            await a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
            await events_until(events, "MIGRATION", "active")
            with pytest.raises(ExecuteError) as info:
                await a.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "xbzrle", "state": True}]})
            assert str(info.value) == "There's a migration process in progress"
            with pytest.raises(ExecuteError) as info:
                await a.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert str(info.value) == "There's a migration process in progress"
            dst.proc.kill()
            dst.proc.wait()
            await events_until(events, "MIGRATION", "failed")
        info = await a.execute("query-migrate")
        assert info["status"] == "failed" and info["error-desc"]
        assert (await a.execute("query-status"))["status"] == "running"

        dst2, b2 = await nodes.start("b", "--incoming", f"tcp:0.0.0.0:{PORT}")
        await a.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await nodes.migrate(a)
        assert (await b2.execute("query-status"))["status"] == "running"
    finally:
        await nodes.close()


@pytest.mark.slow
async def test_network_cut_fails_the_migration_and_the_guest_runs_on(topo, guest_images, tmp_path):
    nodes = Nodes(topo, tmp_path, kvstore_args(topo))
    try:
        src, a = await nodes.start("a")
        dst, b = await nodes.start("b", "--incoming", f"tcp:0.0.0.0:{PORT}")
        await wait_console(a, "listening")
        load = RedisLoad(topo)       # 16 MiB of data to move: at 4 MiB/s the cut lands mid-stream
        for i in range(4):
            assert load.call(b"SET", b"big%d" % i, os.urandom(4 << 20)) == b"+OK"
        load.conn.close()
        await a.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        link = ["ip", "-n", topo.nodes["b"].namespace, "link", "set", "eth0"]
        with a.listener("MIGRATION") as events:
            await a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
            await events_until(events, "MIGRATION", "active")
            await asyncio.sleep(0.5)
            subprocess.run(link + ["down"], check=True)
            await events_until(events, "MIGRATION", "failed", timeout=60)
        info = await a.execute("query-migrate")
        assert "no progress" in info["error-desc"]
        assert (await a.execute("query-status"))["status"] == "running"
        load = RedisLoad(topo)                      # the source still serves its clients
        assert load.call(b"PING") == b"+PONG"
        load.conn.close()

        subprocess.run(link + ["up"], check=True)
        # The destination notices the dead stream once the link is back, and listens again.
        deadline = time.monotonic() + 60
        while (await b.execute("query-migrate")).get("status") != "setup":
            assert time.monotonic() < deadline, await b.execute("query-migrate")
            await asyncio.sleep(0.2)
        await a.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await nodes.migrate(a)
        assert (await b.execute("query-status"))["status"] == "running"
    finally:
        await nodes.close()


@pytest.mark.slow
async def test_cancel_while_still_connecting(topo, guest_images, tmp_path):
    """A destination that cannot be reached keeps the migration in setup; cancel ends it there."""
    nodes = Nodes(topo, tmp_path, ["--guest", "memdirty", "-m", "32", "--append", "mib=4 rate=0"])
    try:
        src, a = await nodes.start("a")
        subprocess.run(["ip", "-n", topo.nodes["b"].namespace, "link", "set", "eth0", "down"], check=True)
        with a.listener("MIGRATION") as events:
            await a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
            await events_until(events, "MIGRATION", "setup")
            assert (await a.execute("query-migrate")) == {"status": "setup"}
            await a.execute("migrate_cancel")
            seen = await events_until(events, "MIGRATION", "cancelled", timeout=30)
        assert seen[0] == ("MIGRATION", "cancelling")
        assert (await a.execute("query-status"))["status"] == "running"
    finally:
        await nodes.close()
