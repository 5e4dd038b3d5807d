"""netfilter.rewriter: offsets learned and applied on crafted frames; the rewritten frames'
checksums accepted by the Linux kernel on a veth pair in a network namespace of our own.
Every test runs on both implementations: PyRewriter (the reference) and the C twin
(native._native.Rewriter, loaded directly so COLO_NATIVE=0 runs still test it); a
differential test feeds both the same random events and compares every output."""
import ctypes
import os
import select
import socket
import struct
import time

import pytest
import native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import NetNS, netns

from appliance.netns import inside
from netfilter.compare import Comparer
from netfilter.packet import ACK, FIN, PSH, RST, SYN, parse
from native import _native
from netfilter.rewriter import PyRewriter
from test_netfilter_packet import (CLIENT, GUEST, MALFORMED, arp_frame, ether, icmp_frame, ipv4, pseudo, rfc1071,
                                   tcp_frame, udp_frame)

PVM_ISN, SVM_ISN, CLIENT_ISN = 0x10000000, 0xFFFFFFF0, 4000
OFFSET = (PVM_ISN - SVM_ISN) & 0xFFFFFFFF


def from_client(seq_offset: int = 1, ack: int | None = None, flags: int = ACK, payload: bytes = b"", **kw) -> bytes:
    """The client's frame to the guest (server on port 80); ``ack`` in the PVM's space."""
    return tcp_frame(seq=CLIENT_ISN + seq_offset, ack=PVM_ISN + 1 if ack is None else ack, flags=flags,
                     payload=payload, sport=40000, dport=80, src=CLIENT, dst=GUEST, **kw)


def from_svm(seq: int, flags: int = ACK, payload: bytes = b"", **kw) -> bytes:
    return tcp_frame(seq=seq, ack=CLIENT_ISN + 1, flags=flags, payload=payload, **kw)


def checksum_ok(frame: bytes) -> bool:
    p = parse(frame)
    segment = frame[p.transport_offset:p.ip_end]
    return rfc1071(pseudo(p.src, p.dst, 6, len(segment)) + segment) == 0


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[PyRewriter, _native.Rewriter], ids=["py", "c"])
def new_rewriter(request):
    """The Rewriter class under test."""
    return request.param


def learned_server_side(rw) -> None:
    """The guest accepts: client SYN, SVM SYN-ACK, client handshake ACK."""
    syn = from_client(0, ack=0, flags=SYN)
    assert rw.to_guest(syn) is syn
    syn_ack = from_svm(SVM_ISN, flags=SYN | ACK)
    assert rw.from_guest(syn_ack) is syn_ack                        # unchanged: the offset is not known yet
    handshake_ack = rw.to_guest(from_client(1))
    assert parse(handshake_ack).tcp.ack == SVM_ISN + 1 and checksum_ok(handshake_ack)


# ---- learning and rewriting -----------------------------------------------------------------

def test_server_side_learning_and_rewriting(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    key = parse(from_client()).key
    assert rw.offset(key) == OFFSET and rw.counters["learned"] == 1
    request = rw.to_guest(from_client(1, payload=b"GET /"))
    assert parse(request).tcp.ack == (SVM_ISN + 1) & 0xFFFFFFFF and checksum_ok(request)
    assert bytes(parse(request).tcp.payload) == b"GET /"
    reply = rw.from_guest(from_svm((SVM_ISN + 1) & 0xFFFFFFFF, ACK | PSH, b"200 OK"))
    assert parse(reply).tcp.seq == PVM_ISN + 1 and checksum_ok(reply)
    assert parse(reply).tcp.ack == CLIENT_ISN + 1                  # the client's space is shared: untouched
    assert rw.counters["to_guest"] == 2 and rw.counters["from_guest"] == 1


def test_client_side_learning(new_rewriter):
    """The guest connects: SVM SYN, the server's SYN-ACK acknowledging the PVM's SYN."""
    rw = new_rewriter()
    server_isn = 9000
    syn = tcp_frame(seq=SVM_ISN, flags=SYN, sport=41000, dport=443)
    assert rw.from_guest(syn) is syn
    syn_ack = tcp_frame(seq=server_isn, ack=PVM_ISN + 1, flags=SYN | ACK, sport=443, dport=41000, src=CLIENT, dst=GUEST)
    into_svm = rw.to_guest(syn_ack)
    assert parse(into_svm).tcp.ack == (SVM_ISN + 1) & 0xFFFFFFFF and checksum_ok(into_svm)
    out = rw.from_guest(tcp_frame(seq=(SVM_ISN + 1) & 0xFFFFFFFF, ack=server_isn + 1, sport=41000, dport=443))
    assert parse(out).tcp.seq == PVM_ISN + 1 and checksum_ok(out)


def test_a_retransmitted_svm_syn_after_learning_is_rewritten(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    again = rw.from_guest(from_svm(SVM_ISN, flags=SYN | ACK))
    assert parse(again).tcp.seq == PVM_ISN and checksum_ok(again)


def test_sack_blocks_are_rewritten(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    left, right = PVM_ISN + 1001, PVM_ISN + 2001
    sack = struct.pack("!BBBBII", 1, 1, 5, 10, left, right)
    frame = rw.to_guest(from_client(1, options=sack))
    options = frame[54:66]
    assert struct.unpack("!II", options[4:]) == ((left - OFFSET) & 0xFFFFFFFF, (right - OFFSET) & 0xFFFFFFFF)
    assert checksum_ok(frame)


def test_unknown_connections_non_tcp_and_malformed_pass_unchanged(new_rewriter):
    rw = new_rewriter()
    for frame in (from_client(1, payload=b"x"), udp_frame(b"dns"), arp_frame(), *MALFORMED.values()):
        assert rw.to_guest(frame) is frame and rw.from_guest(frame) is frame
    assert rw.counters["malformed"] == 2 * len(MALFORMED) and rw.counters["connections"] == 0


def test_the_end_to_end_stream_is_equal_for_the_comparer(new_rewriter):
    """PVM and SVM with different ISNs, the SVM's frames through the rewriter: all match."""
    rw, released, requests = new_rewriter(), [], []
    comparer = Comparer(released.append, requests.append)
    comparer.primary(tcp_frame(seq=PVM_ISN, ack=CLIENT_ISN + 1, flags=SYN | ACK))
    comparer.secondary(rw.from_guest(from_svm(SVM_ISN, flags=SYN | ACK)))
    rw.to_guest(from_client(1))
    pvm = [tcp_frame(seq=PVM_ISN + 1, ack=CLIENT_ISN + 1, payload=b"hello "),
           tcp_frame(seq=PVM_ISN + 7, ack=CLIENT_ISN + 1, payload=b"world", flags=ACK | FIN)]
    for frame in pvm:
        comparer.primary(frame)
    comparer.secondary(rw.from_guest(from_svm((SVM_ISN + 1) & 0xFFFFFFFF, ACK, b"hello world")))
    comparer.secondary(rw.from_guest(from_svm((SVM_ISN + 12) & 0xFFFFFFFF, ACK | FIN)))
    assert released[1:] == pvm and not requests


# ---- lifetime ------------------------------------------------------------------------------

def test_checkpoint_forgets_offsets_and_new_connections_are_learned_afresh(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    rw.checkpoint()
    same = from_svm(PVM_ISN + 1)                                    # the SVM has the PVM's state now
    assert rw.from_guest(same) is same and rw.counters["connections"] == 0
    svm_isn = 777
    rw.from_guest(tcp_frame(seq=svm_isn, flags=SYN, sport=42000, dport=22))
    rw.to_guest(tcp_frame(seq=1, ack=PVM_ISN + 1, flags=SYN | ACK, sport=22, dport=42000, src=CLIENT, dst=GUEST))
    assert parse(rw.from_guest(tcp_frame(seq=svm_isn + 1, sport=42000, dport=22))).tcp.seq == PVM_ISN + 1


def test_mid_handshake_at_a_checkpoint_learns_a_zero_offset(new_rewriter):
    rw = new_rewriter()
    rw.from_guest(from_svm(SVM_ISN, flags=SYN | ACK))
    rw.checkpoint()                                                 # the SVM took the PVM's SYN-ACK state
    rw.from_guest(from_svm(PVM_ISN, flags=SYN | ACK))               # so it retransmits the PVM's ISN
    ack = from_client(1)
    assert rw.to_guest(ack) is ack and rw.offset(parse(ack).key) == 0


def test_a_new_syn_on_the_same_ports_is_learned_again(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    rw.from_guest(from_svm(123, flags=SYN | ACK))                   # another ISN: a new connection
    assert rw.offset(parse(from_client()).key) is None
    rw.to_guest(from_client(1, ack=5001))
    assert rw.offset(parse(from_client()).key) == (5000 - 123) & 0xFFFFFFFF


def test_failover_keeps_old_connections_and_ignores_new_ones(new_rewriter):
    rw = new_rewriter()
    learned_server_side(rw)
    rw.failover()
    assert parse(rw.to_guest(from_client(1, payload=b"x"))).tcp.ack == (SVM_ISN + 1) & 0xFFFFFFFF
    new_syn = tcp_frame(seq=55, flags=SYN, sport=43000, dport=80)
    assert rw.from_guest(new_syn) is new_syn
    syn_ack = tcp_frame(seq=1, ack=56, flags=SYN | ACK, sport=80, dport=43000, src=CLIENT, dst=GUEST)
    assert rw.to_guest(syn_ack) is syn_ack and rw.counters["connections"] == 1


def test_close_and_idle_expiry(new_rewriter):
    clock = Clock()
    rw = new_rewriter(clock=clock, close_linger_s=60, idle_timeout_s=1000)
    learned_server_side(rw)
    rw.from_guest(from_svm((SVM_ISN + 1) & 0xFFFFFFFF, ACK | FIN))
    rw.to_guest(from_client(1, ack=PVM_ISN + 2, flags=ACK | FIN))   # FIN both ways
    clock.now += 59
    last_ack = rw.from_guest(from_svm((SVM_ISN + 2) & 0xFFFFFFFF))  # still rewritten while it lingers
    assert parse(last_ack).tcp.seq == PVM_ISN + 2
    assert rw.scan_expired() == 0
    clock.now += 1
    assert rw.scan_expired() == 1 and rw.counters["connections"] == 0
    learned_server_side(rw)
    rw.to_guest(from_client(1, flags=RST | ACK))
    clock.now += 60
    assert rw.scan_expired() == 1
    learned_server_side(rw)
    clock.now += 999
    assert rw.scan_expired() == 0
    clock.now += 1
    assert rw.scan_expired() == 1


def test_thousands_of_connections_each_keeps_its_own_offset(new_rewriter):
    """Past the table's first buckets (it grows several times): every connection found with
    its own offset, closed ones expire, the rest stay found."""
    clock = Clock()
    rw = new_rewriter(clock=clock, close_linger_s=10, idle_timeout_s=1000)
    ports = range(20000, 23000)
    for i, port in enumerate(ports):
        rw.from_guest(tcp_frame(seq=i, flags=SYN, sport=port, dport=443))
        rw.to_guest(tcp_frame(seq=7, ack=i * 1000 + 1, flags=SYN | ACK, sport=443, dport=port, src=CLIENT, dst=GUEST))
    assert rw.counters["connections"] == len(ports) and rw.counters["learned"] == len(ports)
    key = lambda port: parse(tcp_frame(sport=port, dport=443)).key  # noqa: E731
    assert all(rw.offset(key(port)) == i * 999 for i, port in enumerate(ports))
    for i, port in enumerate(ports):        # a new ISN on each: tracked afresh, in place in its chain
        rw.from_guest(tcp_frame(seq=i + 5, flags=SYN, sport=port, dport=443))
    assert rw.counters["connections"] == len(ports) and all(rw.offset(key(port)) is None for port in ports)
    for i, port in enumerate(ports):
        rw.to_guest(tcp_frame(seq=7, ack=i * 2000 + 6, flags=SYN | ACK, sport=443, dport=port, src=CLIENT, dst=GUEST))
    assert all(rw.offset(key(port)) == i * 1999 for i, port in enumerate(ports))
    for port in ports[::2]:
        rw.to_guest(tcp_frame(seq=8, flags=RST | ACK, sport=443, dport=port, src=CLIENT, dst=GUEST))
    clock.now += 10
    assert rw.scan_expired() == len(ports) // 2 and rw.counters["connections"] == len(ports) // 2
    assert all(rw.offset(key(port)) == (i * 1999 if i % 2 else None) for i, port in enumerate(ports))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["to_guest", "from_guest", "checkpoint"]),
                          st.one_of(st.binary(max_size=80),
                                    st.builds(lambda seq, ack, flags, payload, options: tcp_frame(
                                        seq=seq, ack=ack, flags=flags, payload=payload, options=options),
                                        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0x3F),
                                        st.binary(max_size=8), st.sampled_from([b"", b"\x05\x0a" + bytes(8),
                                                                                b"\x05\xff\x00\x00", b"\x01\x02"])))),
                max_size=30))
def test_random_input_never_crashes_and_keeps_checksums_valid(new_rewriter, operations):
    rw = new_rewriter()
    for operation, frame in operations:
        if operation == "checkpoint":
            rw.checkpoint()
            continue
        out = getattr(rw, operation)(frame)
        assert len(out) == len(frame)
        if out is not frame:
            assert checksum_ok(out)


def test_the_python_api_of_both(new_rewriter):
    """Keyword-only settings, the same object back when nothing changed, any buffer in and
    bytes out, offset() only under Packet.key's exact key."""
    with pytest.raises(TypeError):
        new_rewriter(10)
    rw = new_rewriter(idle_timeout_s=7, close_linger_s=3)
    assert (rw.idle_timeout, rw.close_linger, rw.failed_over) == (7, 3, False)
    learned_server_side(rw)
    assert list(rw.counters) == ["to_guest", "from_guest", "learned", "malformed", "connections"]
    data = bytearray(from_client(1, payload=b"x"))
    out = rw.to_guest(data)
    assert type(out) is bytes and parse(out).tcp.ack == (SVM_ISN + 1) & 0xFFFFFFFF
    assert data == from_client(1, payload=b"x")                     # the caller's buffer untouched
    key = parse(from_client()).key
    reversed_key = (key[0], key[2], key[1])
    assert rw.offset(key) == OFFSET and rw.offset(reversed_key) is None and rw.offset((17, *key[1:])) is None
    assert rw.offset("nonsense") is None and rw.offset((6, ("10.9.0.01", 40000), key[2])) is None
    with pytest.raises(TypeError):
        rw.offset((6, [], []))                                      # unhashable, as for a dict
    rw.failover()
    assert rw.failed_over


def test_c_rewriter_reports_a_failing_clock():
    def broken():
        raise RuntimeError("clock")
    rw = _native.Rewriter(clock=broken)
    with pytest.raises(RuntimeError):
        rw.scan_expired()
    with pytest.raises(RuntimeError):
        rw.from_guest(from_svm(SVM_ISN, flags=SYN | ACK))
    assert rw.counters["connections"] == 0


def test_netfilter_rewriter_picks_the_implementation_in_use():
    import netfilter.rewriter
    expected = _native.Rewriter if native.IMPLEMENTATION == "native" else PyRewriter
    assert netfilter.rewriter.Rewriter is expected


def test_c_api_works_on_the_python_objects_state_without_the_gil():
    """The datapath loop's view: colo_rewriter_of() gives the rewriter inside a native.Rewriter,
    and rw_from_guest (called through ctypes.CDLL, so without the GIL) rewrites a buffer in
    place, counted where the Python side reads it."""
    rw = _native.Rewriter()
    learned_server_side(rw)
    with_gil, without_gil = ctypes.PyDLL(_native.__file__), ctypes.CDLL(_native.__file__)
    with_gil.colo_rewriter_of.restype = ctypes.c_void_p
    with_gil.colo_rewriter_of.argtypes = [ctypes.py_object]
    handle = ctypes.c_void_p(with_gil.colo_rewriter_of(rw))
    with pytest.raises(TypeError):
        with_gil.colo_rewriter_of(PyRewriter())
    without_gil.rw_from_guest.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_double]
    without_gil.rw_connections.restype = ctypes.c_size_t
    without_gil.rw_connections.argtypes = [ctypes.c_void_p]
    frame = from_svm((SVM_ISN + 1) & 0xFFFFFFFF, ACK | PSH, b"reply")
    buffer = ctypes.create_string_buffer(frame, len(frame))
    assert without_gil.rw_from_guest(handle, buffer, len(frame), 0.0) == 1
    assert buffer.raw == rw.from_guest(frame) and rw.counters["from_guest"] == 2
    assert without_gil.rw_connections(handle) == rw.counters["connections"] == 1


# ---- differential: the C twin against the reference -------------------------------------

GUEST_PORTS, CLIENT_PORTS = (80, 41000), (40000, 443)
KEYS = [parse(tcp_frame(sport=g, dport=c)).key for g in GUEST_PORTS for c in CLIENT_PORTS]
ISNS = (SVM_ISN, (SVM_ISN + 1) & 0xFFFFFFFF, PVM_ISN, PVM_ISN + 1, 0, 1, 0xFFFFFFFF)
FLAGS = (SYN, SYN | ACK, ACK, ACK | PSH, ACK | FIN, FIN, RST, RST | ACK, SYN | FIN)
SACKS = st.builds(lambda nops, blocks, length: b"\x01" * nops + struct.pack("!BB", 5, length)
                  + b"".join(struct.pack("!II", *block) for block in blocks),       # the length may lie
                  st.integers(0, 3), st.lists(st.tuples(st.sampled_from(ISNS), st.integers(0, 2**32 - 1)), max_size=3),
                  st.one_of(st.sampled_from([2, 10, 18, 26]), st.integers(0, 40)))
OPTIONS = st.lists(st.one_of(SACKS, st.sampled_from([b"\x08\x0a" + bytes(8), b"\x00", b"\x02\x04\x05\xb4", b"\x01",
                                                     b"\x03\x01", b"\x04"])), max_size=3).map(b"".join)


def _tcp(into_guest, guest_port, client_port, seq, ack, flags, payload, options, vlan, padding):
    ends = dict(sport=client_port, dport=guest_port, src=CLIENT, dst=GUEST) if into_guest \
        else dict(sport=guest_port, dport=client_port, src=GUEST, dst=CLIENT)
    options = options.ljust(-(-len(options) // 4) * 4, b"\0")[:40]
    return tcp_frame(seq=seq, ack=ack, flags=flags, payload=payload, options=options, vlan=vlan,
                     padding=padding, **ends)


def _cut_or_flip(frame, cut, where, value):
    frame = bytearray(frame[:len(frame) - cut])
    if frame and where is not None:
        frame[where % len(frame)] = value
    return bytes(frame)


def tcp_frames(into_guest: bool):
    numbers = st.one_of(st.sampled_from(ISNS), st.integers(0, 2**32 - 1))
    frames = st.builds(_tcp, st.just(into_guest), st.sampled_from(GUEST_PORTS), st.sampled_from(CLIENT_PORTS),
                       numbers, numbers, st.one_of(st.sampled_from(FLAGS), st.integers(0, 0xFF)),
                       st.binary(max_size=9), OPTIONS, st.sampled_from([None, None, None, 7]),
                       st.sampled_from([b"", b"", bytes(6)]))
    near_misses = st.builds(_cut_or_flip, frames, st.integers(0, 3), st.one_of(st.none(), st.integers(0, 80)),
                            st.integers(0, 255))
    others = st.sampled_from([udp_frame(b"dns"), icmp_frame(8), arp_frame(), ether(ipv4(6, b"tail", flags_offset=185)),
                              *MALFORMED.values()])
    return st.one_of(frames, frames, frames, near_misses, others, st.binary(max_size=70))


def _handshake(guest_port, client_port, svm_isn, pvm_isn, accepts, then, options):
    """The SVM's SYN (or SYN-ACK), the peer's segment acknowledging the PVM's, then maybe the
    SVM's data, the peer's ACK with options (SACK mostly), a close by FIN both ways, or a reset."""
    def frame(into_guest, seq, ack, flags, options=b""):
        return ("to_guest" if into_guest else "from_guest",
                _tcp(into_guest, guest_port, client_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, b"", options,
                     None, b""))
    events = [frame(False, svm_isn, 78, SYN | ACK if accepts else SYN),
              frame(True, 77, pvm_isn + 1, ACK if accepts else SYN | ACK)]
    if then in ("data", "close"):
        events.append(frame(False, svm_isn + 1, 78, ACK | PSH))
    if then == "close":
        events += [frame(False, svm_isn + 1, 78, ACK | FIN), frame(True, 78, pvm_isn + 2, ACK | FIN)]
    if then == "options":
        events.append(frame(True, 78, pvm_isn + 1, ACK, options))
    if then == "reset":
        events.append(frame(True, 78, pvm_isn + 1, RST | ACK))
    return events


EVENT_STRATEGIES = {
    "to_guest": st.tuples(st.just("to_guest"), tcp_frames(True)).map(lambda event: [event]),
    "from_guest": st.tuples(st.just("from_guest"), tcp_frames(False)).map(lambda event: [event]),
    "handshake": st.builds(_handshake, st.sampled_from(GUEST_PORTS), st.sampled_from(CLIENT_PORTS),
                           st.sampled_from(ISNS), st.one_of(st.sampled_from(ISNS), st.integers(0, 2**32 - 1)),
                           st.booleans(), st.sampled_from(["open", "data", "options", "options", "close", "reset"]),
                           OPTIONS),
    "scan_expired": st.sampled_from([0, 1, 4.5, 10, 60, 100]).map(lambda advance: [("scan_expired", advance)]),
    "checkpoint": st.just([("checkpoint",)]),
}
EVENT_WEIGHTS = {"to_guest": 4, "from_guest": 4, "handshake": 2, "scan_expired": 2, "checkpoint": 1}
EVENTS = st.lists(st.sampled_from([name for name, weight in EVENT_WEIGHTS.items() for _ in range(weight)])
                  .flatmap(EVENT_STRATEGIES.__getitem__), max_size=40).map(lambda lists: sum(lists, []))


@settings(max_examples=1000, deadline=None)
@given(EVENTS, st.integers(0, 80))
def test_c_rewriter_matches_the_reference(events, failover_at):
    """The same events into both (failover once, maybe): the same bytes (and the same object
    when unchanged), the same expiries, counters and offsets after every step."""
    clock = Clock()
    py, c = (cls(idle_timeout_s=100, close_linger_s=10.0, clock=clock) for cls in (PyRewriter, _native.Rewriter))
    events.insert(failover_at, ("failover",))
    for event in events:
        name = event[0]
        if name in ("to_guest", "from_guest"):
            frame = event[1]
            expected, got = getattr(py, name)(frame), getattr(c, name)(frame)
            assert got == expected and (got is frame) == (expected is frame)
        elif name == "scan_expired":
            clock.now += event[1]
            assert c.scan_expired() == py.scan_expired()
        else:
            getattr(py, name)()
            getattr(c, name)()
        assert c.counters == py.counters and c.failed_over == py.failed_over
        for key in KEYS:
            reversed_key = (key[0], key[2], key[1])
            assert c.offset(key) == py.offset(key) and c.offset(reversed_key) == py.offset(reversed_key)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.one_of(st.binary(max_size=120), tcp_frames(True), tcp_frames(False))),
                max_size=12))
def test_random_garbage_never_crashes_the_c_rewriter(frames):
    """Learned connections on every port pair, then garbage both ways: no crash, the length
    kept.  Worth a run with the extension built with -fsanitize=address after a change."""
    rw = _native.Rewriter()
    for g in GUEST_PORTS:
        for c in CLIENT_PORTS:
            rw.from_guest(tcp_frame(seq=SVM_ISN, flags=SYN | ACK, sport=g, dport=c))
            rw.to_guest(tcp_frame(seq=1, ack=PVM_ISN + 1, sport=c, dport=g, src=CLIENT, dst=GUEST))
    for into_guest, frame in frames:
        out = rw.to_guest(frame) if into_guest else rw.from_guest(frame)
        assert len(out) == len(frame)
    assert rw.scan_expired() == 0


# ---- the kernel checks the checksums -----------------------------------------------------------

NEAR_MAC = bytes.fromhex("02000000aa01")
ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4


@pytest.fixture
def veth():
    """A namespace with a veth pair: "far" has a 10.x address (the kernel under test), "near"
    none (our AF_PACKET socket); far knows near's MAC, so its answers need no ARP."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name, subnet = f"nfrw{os.getpid()}", 20 + os.getpid() % 200
    far_ip, near_ip = f"10.{subnet}.99.1", f"10.{subnet}.99.2"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="near", kind="veth", peer={"ifname": "far"})
            near, far, lo = (ns.link_lookup(ifname=n)[0] for n in ("near", "far", "lo"))
            ns.link("set", index=near, address=":".join(f"{b:02x}" for b in NEAR_MAC))
            ns.addr("add", index=far, address=far_ip, prefixlen=24)
            for index in (lo, near, far):
                ns.link("set", index=index, state="up")
            ns.neigh("add", dst=near_ip, lladdr=":".join(f"{b:02x}" for b in NEAR_MAC), ifindex=far, state=0x80)
            far_mac = bytes.fromhex(ns.get_links(far)[0].get_attr("IFLA_ADDRESS").replace(":", ""))
        with inside(name):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            raw.bind(("near", 0))
        yield name, raw, far_ip, near_ip, far_mac
        raw.close()
    finally:
        netns.remove(name)


class Wire:
    """Frames to and from the kernel at ``far``, as a client at ``near_ip`` would see them."""

    def __init__(self, raw, far_ip, near_ip, far_mac):
        self.raw, self.far_ip, self.near_ip, self.far_mac = raw, far_ip, near_ip, far_mac

    def frame(self, sport, dport, seq, ack, flags, payload=b"", bad_checksum=False) -> bytes:
        frame = tcp_frame(seq=seq, ack=ack, flags=flags, payload=payload, sport=sport, dport=dport,
                          src=self.near_ip, dst=self.far_ip, bad_checksum=bad_checksum)
        return self.far_mac + NEAR_MAC + frame[12:]

    def send(self, frame: bytes) -> None:
        self.raw.send(frame)

    def expect(self, dport: int, timeout: float = 2.0):
        """The kernel's next TCP segment to ``dport`` (a parsed Packet), or None."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([self.raw], [], [], remaining)[0]:
                break
            frame, address = self.raw.recvfrom(65535)
            if address[2] == PACKET_OUTGOING:
                continue
            p = parse(frame)
            if p.tcp is not None and p.src == self.far_ip and p.tcp.dport == dport:
                return p
        return None


def corrupted(frame: bytes) -> bytes:
    """The same frame with its TCP checksum off by one bit."""
    broken = bytearray(frame)
    broken[14 + 20 + 17] ^= 0x01
    return bytes(broken)


@pytest.mark.netns
def test_kernel_accepts_frames_rewritten_into_the_svm(new_rewriter, veth):
    """The guest accepts: the kernel plays the SVM.  The client's handshake ACK and data,
    rewritten by to_guest (ack -= offset), open the connection and deliver the data; the
    same data segment with a corrupted checksum gets no answer."""
    name, raw, far_ip, near_ip, far_mac = veth
    wire, rw = Wire(raw, far_ip, near_ip, far_mac), new_rewriter()
    with inside(name):
        listener = socket.create_server((far_ip, 0))
    port, client_isn, sport = listener.getsockname()[1], 1000, 40001
    try:
        wire.send(wire.frame(sport, port, client_isn, 0, SYN, bad_checksum=True))
        assert wire.expect(sport, 0.5) is None                      # a bad SYN: no answer
        wire.send(rw.to_guest(wire.frame(sport, port, client_isn, 0, SYN)))
        syn_ack = wire.expect(sport)
        assert syn_ack is not None and syn_ack.tcp.flags == SYN | ACK and syn_ack.tcp.ack == client_isn + 1
        assert rw.from_guest(syn_ack.frame) is syn_ack.frame       # learns the kernel's (SVM's) ISN
        svm_isn, pvm_isn = syn_ack.tcp.seq, (syn_ack.tcp.seq + 0x12345678) & 0xFFFFFFFF

        hello = rw.to_guest(wire.frame(sport, port, client_isn + 1, pvm_isn + 1, ACK | PSH, b"hello colo"))
        assert parse(hello).tcp.ack == (svm_isn + 1) & 0xFFFFFFFF  # rewritten, checksum recomputed
        wire.send(hello)
        answer = wire.expect(sport)
        assert answer is not None and answer.tcp.ack == client_isn + 11
        assert parse(rw.from_guest(answer.frame)).tcp.seq == (pvm_isn + 1) & 0xFFFFFFFF
        listener.settimeout(2)
        server, _ = listener.accept()
        server.settimeout(2)
        assert server.recv(100) == b"hello colo"

        more = rw.to_guest(wire.frame(sport, port, client_isn + 11, pvm_isn + 1, ACK | PSH, b"more"))
        wire.send(corrupted(more))
        assert wire.expect(sport, 0.5) is None                      # dropped by the kernel
        wire.send(more)
        answer = wire.expect(sport)
        assert answer is not None and answer.tcp.ack == client_isn + 15
        assert server.recv(100) == b"more"
        server.close()
    finally:
        listener.close()


@pytest.mark.netns
def test_kernel_accepts_frames_rewritten_out_of_the_svm(new_rewriter, veth):
    """The guest connects: the kernel plays the server the PVM talks to.  The SVM's SYN
    retransmit and data, rewritten by from_guest (seq += offset), are answered and delivered;
    corrupted, they are not."""
    name, raw, far_ip, near_ip, far_mac = veth
    wire, rw = Wire(raw, far_ip, near_ip, far_mac), new_rewriter()
    with inside(name):
        listener = socket.create_server((far_ip, 0))
    port, sport, pvm_isn, svm_isn = listener.getsockname()[1], 40002, 0x7FFFFFF0, 0xFFFFFF00
    try:
        svm_syn = wire.frame(sport, port, svm_isn, 0, SYN)
        assert rw.from_guest(svm_syn) is svm_syn                    # learns the SVM's ISN, unchanged
        wire.send(wire.frame(sport, port, pvm_isn, 0, SYN))         # the PVM's own SYN reaches the server
        syn_ack = wire.expect(sport)
        assert syn_ack is not None and syn_ack.tcp.ack == pvm_isn + 1
        into_svm = rw.to_guest(syn_ack.frame)                       # learns the offset from the SYN-ACK
        assert parse(into_svm).tcp.ack == (svm_isn + 1) & 0xFFFFFFFF

        retransmit = rw.from_guest(wire.frame(sport, port, svm_isn, 0, SYN))
        assert parse(retransmit).tcp.seq == pvm_isn
        wire.send(corrupted(retransmit))
        assert wire.expect(sport, 0.5) is None
        wire.send(retransmit)
        again = wire.expect(sport)                                  # the server resends its SYN-ACK
        assert again is not None and again.tcp.flags == SYN | ACK and again.tcp.ack == pvm_isn + 1

        server_isn = syn_ack.tcp.seq
        data = rw.from_guest(wire.frame(sport, port, (svm_isn + 1) & 0xFFFFFFFF, server_isn + 1, ACK | PSH,
                                        b"from the svm"))
        assert parse(data).tcp.seq == pvm_isn + 1
        wire.send(corrupted(data))
        assert wire.expect(sport, 0.5) is None
        wire.send(data)
        answer = wire.expect(sport)
        assert answer is not None and answer.tcp.ack == pvm_isn + 1 + len(b"from the svm")
        listener.settimeout(2)
        server, _ = listener.accept()
        server.settimeout(2)
        assert server.recv(100) == b"from the svm"
        server.close()
    finally:
        listener.close()
