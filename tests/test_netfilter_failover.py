"""Transparent failover: a client's TCP connection to kvstore carries on against the
secondary when the primary dies or freezes, with every acknowledged write kept.

Both nodes run kvstore on the same service network (a tap on each node's bridge); in COLO
the secondary's guest is fed and heard only through the primary (mirror, comparer,
redirector, rewriter)."""
import asyncio
import signal
import socket
import threading
import time

import pytest

from test_colo import Pair, colo_exit, http_status, topo  # noqa: F401  (the topology fixture)
from test_migration_nodes import kvstore_args, wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]


class VerifyingClient(threading.Thread):
    """One TCP connection writing numbered keys; records every acknowledgement and the
    longest silence between two replies."""

    def __init__(self, topo):
        super().__init__(daemon=True)
        with topo.client_sockets():
            self.conn = socket.create_connection((topo.guest_address, 6379), timeout=10)
        self.file = self.conn.makefile("rb")
        self.acked: list[int] = []
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self.stopping = threading.Event()

    def call(self, *words: bytes) -> bytes:
        self.conn.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        line = self.file.readline()
        if line.startswith(b"$") and line != b"$-1\r\n":
            return self.file.read(int(line[1:]) + 2)[:-2]
        return line.rstrip(b"\r\n")

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


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_client_connection_survives_losing_the_primary(topo, guest_images, tmp_path, how):  # noqa: F811
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
