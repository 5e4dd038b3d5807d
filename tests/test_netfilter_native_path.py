"""The COLO datapath in C (native.ColoPrimary, native.ColoSecondary): the serve loop on rings
in a RAM buffer, a SOCK_SEQPACKET pair as the tap (one frame per read, as a tap), and the
packet channel's real framing on socket pairs: mirror, compare, release, epochs, rewriting,
backpressure, and a channel that breaks or carries garbage."""
import os
import socket
import struct

import pytest

import native
from netfilter.channel import FRAME_HEAD
from netfilter.rewriter import Rewriter
from test_netfilter_packet import CLIENT, GUEST, tcp_frame, udp_frame
from test_vmm_rings import CTRL, RX, TX, queue_tx, ring_ram, take_rx

pytestmark = pytest.mark.skipif(native.IMPLEMENTATION != "native", reason="the native build is under test")

SIZE = 8
SYN, ACK = 0x02, 0x10


def client_frame(n: int) -> bytes:
    return tcp_frame(seq=1000 + 7 * n, ack=5001, payload=b"GET k\r\n", sport=40000, dport=6379, src=CLIENT, dst=GUEST)


def guest_frame(n: int, payload: bytes = b"$1\r\nv\r\n", seq_base: int = 5001) -> bytes:
    return tcp_frame(seq=seq_base + 7 * n, ack=1007 + 7 * n, payload=payload, sport=6379, dport=40000)


def framed(epoch: int, frame: bytes) -> bytes:
    return FRAME_HEAD.pack(epoch, len(frame)) + frame


def read_framed(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    data, out = b"", []
    sock.settimeout(5)
    while len(out) < count:
        data += sock.recv(65536)
        while len(data) >= 8:
            epoch, length = FRAME_HEAD.unpack_from(data)
            if len(data) < 8 + length:
                break
            out.append((epoch, data[8:8 + length]))
            data = data[8 + length:]
    return out


class Rings:
    """Guest RAM with both rings, the NIC thread's eventfds, and the host's indexes."""

    def __init__(self):
        self.ram, self.dirty = ring_ram(SIZE, rx_avail=SIZE)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(5)]
        self.tx_cons = self.rx_used = self.rx_cons = 0

    def serve(self, path, timeout_ms: int = 20) -> str:
        doorbell, control, event, rx_ready, tx_done = self.fds
        result = path.serve(self.ram, self.dirty, CTRL, TX, SIZE, RX, SIZE, self.tx_cons, self.rx_used,
                            doorbell, control, event, rx_ready, tx_done, timeout_ms, 1000)
        self.tx_cons, self.rx_used = result[0], result[1]
        return result[-1]

    def guest_sends(self, *frames: bytes) -> None:
        queue_tx(self.ram, SIZE, frames)

    def guest_reads(self) -> list[bytes]:
        frames, self.rx_cons = take_rx(self.ram, SIZE, self.rx_cons, self.rx_used)
        return frames

    def close(self):
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def primary():
    """A ColoPrimary: (path, rings, the tap's far end, the secondary's ends of the channel)."""
    tap_far, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mirror_far, mirror = socket.socketpair()
    svm_far, svm = socket.socketpair()
    for sock in (tap, tap_far):
        sock.setblocking(False)
    path = native.ColoPrimary(tap.fileno(), mirror.fileno(), svm.fileno(), compare_timeout_ms=3000,
                              max_queue_size=1024, passthrough=[], expired_scan_cycle_ms=1000,
                              mirror_limit=1 << 20)
    rings = Rings()
    yield path, rings, tap_far, mirror_far, svm_far
    rings.close()
    for sock in (tap_far, tap, mirror_far, mirror, svm_far, svm):
        sock.close()


def tap_frames(tap_far: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(tap_far.recv(65536))
        except BlockingIOError:
            return out


def test_client_frames_reach_the_pvm_and_are_mirrored_with_the_epoch(primary):
    path, rings, tap_far, mirror_far, _svm_far = primary
    tap_far.send(client_frame(0))
    assert rings.serve(path) == "timeout"
    assert rings.guest_reads() == [client_frame(0)]
    path.checkpoint(4)                                   # the PVM is stopped: later input follows 4
    tap_far.send(client_frame(1))
    rings.serve(path)
    assert rings.guest_reads() == [client_frame(1)]
    assert read_framed(mirror_far, 2) == [(0, client_frame(0)), (4, client_frame(1))]
    assert path.counters()["mirrored"] == 2


def test_a_pvm_frame_leaves_when_the_svm_sends_the_same(primary):
    path, rings, tap_far, _mirror_far, svm_far = primary
    rings.guest_sends(guest_frame(0))
    rings.serve(path)
    assert tap_frames(tap_far) == [] and path.counters()["held"] == 1
    svm_far.sendall(framed(0, guest_frame(0)))
    rings.serve(path)
    assert tap_frames(tap_far) == [guest_frame(0)]
    counters = path.counters()
    assert counters["tcp"]["matched"] == 1 and counters["held"] == 0 and counters["svm-frames"] == 1
    assert path.take_request() is None


def test_a_diverging_svm_frame_asks_for_a_checkpoint_which_releases_the_pvms(primary):
    path, rings, tap_far, _mirror_far, svm_far = primary
    rings.guest_sends(guest_frame(0))
    svm_far.sendall(framed(0, guest_frame(0, b"$1\r\nX\r\n")))
    assert rings.serve(path, timeout_ms=2000) == "checkpoint"        # back to Python at once
    assert path.take_request() == "mismatch" and path.take_request() is None
    assert tap_frames(tap_far) == []
    path.checkpoint(1)
    assert tap_frames(tap_far) == [guest_frame(0)]
    assert path.counters()["tcp"]["mismatches"] == 1


def test_svm_frames_from_before_the_checkpoint_are_dropped(primary):
    path, rings, tap_far, _mirror_far, svm_far = primary
    path.checkpoint(5)
    rings.guest_sends(guest_frame(0))
    svm_far.sendall(framed(4, guest_frame(0)) + framed(5, guest_frame(0)))
    rings.serve(path)
    counters = path.counters()
    assert counters["stale-dropped"] == 1 and counters["svm-frames"] == 2
    assert tap_frames(tap_far) == [guest_frame(0)]


def test_failover_releases_what_is_held(primary):
    path, rings, tap_far, _mirror_far, _svm_far = primary
    rings.guest_sends(guest_frame(0), guest_frame(1))
    rings.serve(path)
    assert tap_frames(tap_far) == []
    path.failover()
    assert tap_frames(tap_far) == [guest_frame(0), guest_frame(1)]


@pytest.mark.parametrize("garbage, why", [
    (b"", "packet channel: the peer closed it"),
    (struct.pack(">II", 0, 1 << 20), "packet channel: a frame of 1048576 bytes"),
])
def test_a_broken_channel_is_told_once_and_the_pvm_runs_on(primary, garbage, why):
    path, rings, tap_far, _mirror_far, svm_far = primary
    if garbage:
        svm_far.sendall(garbage)
    else:
        svm_far.shutdown(socket.SHUT_WR)
    assert rings.serve(path, timeout_ms=2000) == "lost"
    assert path.take_lost() == why and path.take_lost() is None
    tap_far.send(client_frame(0))                        # the PVM still gets its input
    assert rings.serve(path) == "timeout"
    assert rings.guest_reads() == [client_frame(0)]


def test_a_frozen_secondary_costs_mirrored_frames_never_the_pvms_input(primary):
    """Nobody reads the mirror: the socket fills, then the bounded buffer; beyond it frames are
    dropped and counted, and the PVM reads every one."""
    path, rings, tap_far, _mirror_far, _svm_far = primary
    big = tcp_frame(seq=1, payload=bytes(1400), sport=40000, dport=6379, src=CLIENT, dst=GUEST)
    given = 0
    while path.counters()["mirror-dropped"] == 0:
        for _ in range(SIZE):
            tap_far.send(big)
        rings.serve(path)
        given += len(rings.guest_reads())
        assert given < 10000, "the mirror never filled"
    assert given == path.counters()["mirrored"] + path.counters()["mirror-dropped"]


def test_passthrough_flows_leave_at_once_and_bad_rules_are_refused():
    """The rules are the comparer's own ((protocol, port), any case): a UDP answer from port 53
    is never compared, another UDP one waits for the SVM's."""
    tap_far, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mirror_far, mirror = socket.socketpair()
    svm_far, svm = socket.socketpair()
    for sock in (tap, tap_far):
        sock.setblocking(False)
    rings = Rings()
    try:
        path = native.ColoPrimary(tap.fileno(), mirror.fileno(), svm.fileno(), compare_timeout_ms=3000,
                                  max_queue_size=1024, passthrough=[["UDP", 53]], expired_scan_cycle_ms=1000,
                                  mirror_limit=1 << 20)
        rings.guest_sends(udp_frame(b"dns", sport=53), udp_frame(b"other", sport=54))
        rings.serve(path)
        assert tap_frames(tap_far) == [udp_frame(b"dns", sport=53)] and path.counters()["held"] == 1
        with pytest.raises(ValueError, match="passthrough protocols are tcp or udp"):
            native.ColoPrimary(tap.fileno(), mirror.fileno(), svm.fileno(), compare_timeout_ms=3000,
                               max_queue_size=1024, passthrough=[("sctp", 9)], expired_scan_cycle_ms=1000,
                               mirror_limit=1 << 20)
    finally:
        rings.close()
        for sock in (tap_far, tap, mirror_far, mirror, svm_far, svm):
            sock.close()


# --- the secondary ---------------------------------------------------------------------

@pytest.fixture
def secondary():
    """A ColoSecondary: (path, rings, rewriter, the primary's ends of the channel)."""
    from_primary_far, from_primary = socket.socketpair()
    to_primary_far, to_primary = socket.socketpair()
    rewriter = Rewriter()
    path = native.ColoSecondary(from_primary.fileno(), to_primary.fileno(), rewriter, out_limit=1 << 16,
                                diverge_at=0)
    rings = Rings()
    yield path, rings, rewriter, from_primary_far, to_primary_far
    rings.close()
    for sock in (from_primary_far, from_primary, to_primary_far, to_primary):
        sock.close()


def test_client_frames_reach_the_svm_and_its_output_goes_back_with_the_epoch(secondary):
    path, rings, _rewriter, from_primary_far, to_primary_far = secondary
    from_primary_far.sendall(framed(0, client_frame(0)) + framed(0, client_frame(1)))
    rings.serve(path)
    assert rings.guest_reads() == [client_frame(0), client_frame(1)]
    path.checkpoint(3)                                   # the SVM loads checkpoint 3
    from_primary_far.sendall(framed(2, client_frame(2)) + framed(3, client_frame(3)))
    rings.guest_sends(guest_frame(0))
    rings.serve(path)
    assert rings.guest_reads() == [client_frame(3)]     # read by the PVM before checkpoint 3: stale
    assert read_framed(to_primary_far, 1) == [(3, guest_frame(0))]
    assert path.counters() == {"from-primary": 3, "to-primary": 1, "checkpoint-dropped": 1, "svm-dropped": 0}


def test_the_svm_sequence_numbers_are_moved_into_the_pvms_space(secondary):
    """The rewriter learns the offset from the SVM's SYN-ACK and the client's ACK, then rewrites
    both ways inside the loop (the same rewriter object rewrites after failover)."""
    path, rings, rewriter, from_primary_far, to_primary_far = secondary
    pvm_isn, svm_isn, client_isn = 5000, 9000, 1000
    syn = tcp_frame(seq=client_isn, flags=SYN, sport=40000, dport=6379, src=CLIENT, dst=GUEST)
    from_primary_far.sendall(framed(0, syn))
    rings.serve(path)
    rings.guest_reads()
    rings.guest_sends(tcp_frame(seq=svm_isn, ack=client_isn + 1, flags=SYN | ACK, sport=6379, dport=40000))
    rings.serve(path)
    handshake_ack = tcp_frame(seq=client_isn + 1, ack=pvm_isn + 1, sport=40000, dport=6379, src=CLIENT, dst=GUEST)
    from_primary_far.sendall(framed(0, handshake_ack))
    rings.serve(path)
    into_svm = rings.guest_reads()
    assert into_svm == [tcp_frame(seq=client_isn + 1, ack=svm_isn + 1, sport=40000, dport=6379, src=CLIENT,
                                  dst=GUEST)]
    rings.guest_sends(tcp_frame(seq=svm_isn + 1, ack=client_isn + 1, payload=b"+OK\r\n", sport=6379, dport=40000))
    rings.serve(path)
    out = read_framed(to_primary_far, 2)
    assert out[1] == (0, tcp_frame(seq=pvm_isn + 1, ack=client_isn + 1, payload=b"+OK\r\n", sport=6379,
                                   dport=40000))
    assert rewriter.counters["learned"] == 1


def test_a_full_channel_holds_the_svms_frames_in_its_ring(secondary):
    """The primary stops reading: the SVM's frames wait in its TX ring (never dropped) and go
    once the channel drains."""
    path, rings, _rewriter, _from_primary_far, to_primary_far = secondary
    big = tcp_frame(seq=1, payload=bytes(1400), sport=6379, dport=40000)
    sent = 0
    for _ in range(400):
        if rings.tx_cons != sent:
            break
        rings.guest_sends(*[big] * SIZE)
        sent += SIZE
        rings.serve(path, timeout_ms=5)
    assert rings.tx_cons < sent, "the channel never filled"
    assert path.counters()["svm-dropped"] == 0
    received = len(read_framed(to_primary_far, 1))
    to_primary_far.setblocking(False)
    while rings.tx_cons != sent:
        try:
            while to_primary_far.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
        rings.serve(path, timeout_ms=5)
    assert received and path.counters()["to-primary"] == sent


def test_garbage_from_the_primary_loses_the_channel(secondary):
    path, rings, _rewriter, from_primary_far, _to_primary_far = secondary
    from_primary_far.sendall(b"\xff" * 64)
    assert rings.serve(path, timeout_ms=2000) == "lost"
    assert path.take_lost().startswith("packet channel: a frame of")
    assert rings.guest_reads() == []
