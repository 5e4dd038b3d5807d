"""Transparent failover: a client's TCP connection to kvstore carries on against the
secondary when the primary dies or freezes, with every acknowledged write kept.

Both nodes run kvstore on the same service network (a tap on each node's bridge); in COLO
the secondary's guest is fed and heard only through the primary (mirror, comparer,
redirector, rewriter)."""
import asyncio
import signal
import time

import pytest

import native

from test_colo import Pair, colo_exit, http_get, http_status, topo  # noqa: F401  (the topology fixture)
from test_migration_nodes import RedisLoad, kvstore_args, wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]


class VerifyingClient(RedisLoad):
    """One TCP connection writing numbered keys; records every acknowledgement and the
    longest silence between two replies."""

    def __init__(self, topo):
        super().__init__(topo)
        self.acked: list[int] = []
        self.longest_gap = 0.0

    def run(self):
        last = time.monotonic()
        i = 0
        try:
            while not self.stopping.is_set():
                reply = self.call(b"SET", b"key%d" % i, b"value%d" % i)
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                if reply != b"+OK":
                    self.errors.append(f"SET key{i}: {reply!r}")
                    return
                self.acked.append(i)
                i += 1
        except OSError as e:
            self.errors.append(f"connection error after {len(self.acked)} writes: {e}")

    def check_every_acked_key(self) -> None:
        for i in self.acked:
            assert self.call(b"GET", b"key%d" % i) == b"value%d" % i, f"acknowledged key{i} lost"


@pytest.mark.parametrize("how, datapath", [("kill", "c"), ("stop", "c"), ("kill", "python")])
async def test_client_connection_survives_losing_the_primary(topo, guest_images, tmp_path, monkeypatch,  # noqa: F811
                                                             how, datapath):
    """The C datapath, and its Python twin (the daemons run with COLO_NATIVE=0) end to end
    (a whole run with COLO_NATIVE=0 has only the twin)."""
    if datapath == "python":
        monkeypatch.setenv("COLO_NATIVE", "0")
    elif native.IMPLEMENTATION != "native":
        datapath = "python"
    pair = Pair(topo, tmp_path, kvstore_args(topo))
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "listening")
        client = VerifyingClient(topo)
        client.start()
        await pair.enter_colo(delay=1000)
        await asyncio.sleep(2)
        before = len(client.acked)
        assert before > 20 and not client.errors, (before, client.errors)
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["netfilter"]["tcp"]["matched"] > 0, status["netfilter"]
        assert status["netfilter"]["datapath"] == datapath
        with b.listener() as events:
            pair.daemons["a"].proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            assert await colo_exit(events) == {"mode": "secondary", "reason": "error"}
        await asyncio.sleep(2)
        client.stopping.set()
        client.join(10)
        assert not client.errors, client.errors
        assert len(client.acked) > before + 20, "the client made no progress after the failover"
        assert client.longest_gap < 3.0, client.longest_gap
        client.check_every_acked_key()
        client.conn.close()
    finally:
        if how == "stop":
            pair.daemons["a"].proc.send_signal(signal.SIGCONT)
        await pair.close()


async def test_a_diverging_secondary_forces_a_mismatch_checkpoint(topo, guest_images, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """The SVM's 5th data segment differs from the PVM's (test hook): the comparer holds the
    primary's, asks for a 'mismatch' checkpoint, and the client only ever sees the primary's."""
    monkeypatch.setenv("COLO_APPLIANCE_TEST_DIVERGE_SVM", "5")
    pair = Pair(topo, tmp_path, kvstore_args(topo))
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "listening")
        await pair.enter_colo(delay=60000)          # after the first, checkpoints come from the comparer
        await pair.wait_checkpoints("a", 1)
        client = VerifyingClient(topo)
        for i in range(50):
            assert client.call(b"SET", b"k%d" % i, b"v%d" % i) == b"+OK"
            assert client.call(b"GET", b"k%d" % i) == b"v%d" % i      # a diverged reply would read "V..."
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["checkpoints"]["mismatch"] >= 1 and status["checkpoints"]["periodic"] == 1
        assert status["netfilter"]["tcp"]["mismatches"] >= 1
        metrics = (await http_get(pair.daemons["a"], "/metrics")).decode()
        mismatches = [line for line in metrics.splitlines()
                      if line.startswith("colo_appliance_netfilter_mismatches_total") and 'flow="tcp"' in line]
        assert mismatches and float(mismatches[0].split()[-1]) >= 1
        client.conn.close()
    finally:
        await pair.close()


async def test_redis_tools_work_unchanged_against_a_protected_guest(topo, guest_images, tmp_path):  # noqa: F811
    pair = Pair(topo, tmp_path, kvstore_args(topo))
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "listening")
        await pair.enter_colo(delay=500)
        cli = ["redis-cli", "-h", topo.guest_address]
        assert topo.run_client(cli + ["SET", "protected", "yes"], capture_output=True, text=True,
                               timeout=30).stdout.strip() == "OK"
        assert topo.run_client(cli + ["GET", "protected"], capture_output=True, text=True,
                               timeout=30).stdout.strip() == "yes"
        bench = topo.run_client(["redis-benchmark", "-h", topo.guest_address, "-t", "set,get", "-n", "2000",
                                 "-c", "10", "-q"], capture_output=True, text=True, timeout=120)
        assert bench.returncode == 0, bench.stderr
        rates = [line for line in bench.stdout.replace("\r", "\n").splitlines() if "requests per second" in line]
        assert [r.split(":")[0] for r in rates] == ["SET", "GET"], bench.stdout
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["netfilter"]["tcp"]["matched"] >= 4000      # every reply was compared and matched
        assert status["failed-checkpoints"] == 0
    finally:
        await pair.close()


async def test_checkpoints_do_not_stall_a_client(topo, guest_images, tmp_path):  # noqa: F811
    """A checkpoint costs a client a pause of milliseconds, not a TCP retransmission (200 ms):
    the SVM's first reply after a checkpoint must reach the comparer."""
    pair = Pair(topo, tmp_path, kvstore_args(topo))
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "listening")
        await pair.enter_colo(delay=100)
        await pair.wait_checkpoints("a", 2)
        client = VerifyingClient(topo)
        client.start()
        start = await pair.checkpoints("a")
        await asyncio.sleep(3)
        client.stopping.set()
        client.join(10)
        assert not client.errors, client.errors
        checkpoints = await pair.checkpoints("a") - start
        assert checkpoints >= 10
        # Each reply is released when the SVM's matches, not at the next checkpoint.
        assert len(client.acked) > 20 * checkpoints, (len(client.acked), checkpoints)
        assert client.longest_gap < 0.08, client.longest_gap
        client.check_every_acked_key()
    finally:
        await pair.close()
