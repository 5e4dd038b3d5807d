"""The incoming migration port under attack, without TLS: a silent connection, a trickled
header, garbage, a second source while one migrates.  Each bad peer is closed within the
handshake deadline, counted, told nothing; the destination keeps listening and the real
source's migration completes with its RAM intact."""
import socket
import threading
import time

import pytest

from replication import stream
from test_tls import TlsRun, assert_migrated, recv_all, secrets_of
from vmm_helpers import wait_for

pytestmark = pytest.mark.kvm
DEADLINE = 1.0


def test_a_silent_connection_does_not_block_the_real_source(vms, guest_images):
    run = TlsRun(vms, handshake_timeout=DEADLINE)
    try:
        silent = socket.create_connection(("127.0.0.1", run.port))
        time.sleep(0.2)                  # the silent peer is first in line
        started = time.monotonic()
        assert_migrated(run, run.migrate(None))
        assert time.monotonic() - started < 15
        assert recv_all(silent, 3 * DEADLINE) == b""          # closed at the deadline, told nothing
        wait_for(lambda: run.destination.refused["deadline"] == 1, what="the refusal to be counted")
        silent.close()
    finally:
        run.close()


def test_a_trickled_header_is_cut_at_the_deadline(vms, guest_images):
    run = TlsRun(vms, handshake_timeout=DEADLINE)
    try:
        header = stream.Header(0, run.dst.uuid, 4096, run.dst.ram_regions()[0][1], 0).pack()
        with socket.create_connection(("127.0.0.1", run.port)) as s:
            started = time.monotonic()
            try:
                for byte in header:          # one byte every 0.2 s: each read makes progress
                    s.send(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass
            answer = recv_all(s, 3 * DEADLINE)
            assert time.monotonic() - started < 3 * DEADLINE + 1
        assert answer == b""
        wait_for(lambda: run.destination.refused["deadline"] == 1, what="the refusal to be counted")
        assert run.destination.status == "setup"
        assert_migrated(run, run.migrate(None))
    finally:
        run.close()


def test_garbage_is_closed_and_the_node_still_accepts(vms, guest_images):
    run = TlsRun(vms, handshake_timeout=DEADLINE)
    try:
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(45), bytes(range(256))):
            with socket.create_connection(("127.0.0.1", run.port)) as s:
                s.sendall(garbage)
                assert recv_all(s) == b""
        wait_for(lambda: run.destination.refused["garbage"] == 2, what="both refusals")
        assert run.destination.status == "setup"
        assert_migrated(run, run.migrate(None))
    finally:
        run.close()


def test_a_wrong_header_learns_no_uuid_or_size(vms, guest_images):
    """A peer guessing at the header is told what is wrong with its own, nothing of ours."""
    run = TlsRun(vms, caps={"validate-uuid": True}, handshake_timeout=DEADLINE)
    try:
        for header in (stream.Header(0, "00000000-0000-0000-0000-000000000001", 4096, 1 << 30, 0),
                       stream.Header(0, "00000000-0000-0000-0000-000000000001", 4096,
                                     run.dst.ram_regions()[0][1], 0)):
            with socket.create_connection(("127.0.0.1", run.port)) as s:
                s.sendall(header.pack())
                answer = recv_all(s)
            assert answer[:1] == b"\x01" and not any(secret in answer for secret in secrets_of(run))
        wait_for(lambda: run.destination.refused["header"] == 2, what="both refusals")
        assert run.destination.status == "setup"
    finally:
        run.close()


def test_a_second_source_is_refused_without_disturbing_the_first(vms, guest_images):
    run = TlsRun(vms, caps={"pause-before-switchover": True}, handshake_timeout=DEADLINE)
    try:
        result = {}
        first = threading.Thread(target=lambda: result.update(source=run.migrate(None)))
        first.start()
        # The first migration waits in pre-switchover, its connection open, while a second comes.
        wait_for(lambda: getattr(run, "source", None) is not None and run.source.status == "pre-switchover",
                 timeout=30, what="the first source in pre-switchover")
        with socket.create_connection(("127.0.0.1", run.port)) as s:
            s.sendall(stream.Header(0, run.dst.uuid, 4096, run.dst.ram_regions()[0][1], 0).pack())
            assert recv_all(s) == b""
        wait_for(lambda: run.destination.refused["busy"] == 1, what="the refusal to be counted")
        assert run.destination.status == "active"
        run.source.continue_from("pre-switchover")
        first.join(60)
        assert_migrated(run, result["source"])
    finally:
        run.close()


def test_a_flood_of_silent_connections_from_one_host_does_not_keep_the_source_out(vms, guest_images):
    run = TlsRun(vms, handshake_timeout=3.0)
    try:
        flood = []
        for _ in range(10):                  # from another loopback address than the source's
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", run.port))
            flood.append(s)
        wait_for(lambda: run.destination.refused["busy"] == 6, what="the connections over the per-host cap")
        started = time.monotonic()
        assert_migrated(run, run.migrate(None))
        assert time.monotonic() - started < 3.0 + 10
        for s in flood:
            s.close()
    finally:
        run.close()
