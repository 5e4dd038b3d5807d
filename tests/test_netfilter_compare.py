"""netfilter.compare: the Comparer on crafted frame sequences, with a fake clock.  Every test
runs on both implementations: PyComparer, the reference, and native.Comparer, its C twin;
a differential property test feeds both the same random events and compares all they do."""
import random
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native import _native
from netfilter.compare import COUNTERS, FLOW_CLASSES, PyComparer
from netfilter.packet import ACK, FIN, PSH, RST, SYN
from test_netfilter_packet import MALFORMED, arp_frame, ether, icmp_frame, ipv4, tcp_frame, udp_frame

PVM_ISN, SVM_ISN, CLIENT_ACK = 5000, 0xFFFFFF00, 777


class Harness:
    """A Comparer whose releases, checkpoint requests and clock the test sees."""

    def __init__(self, impl, **options):
        self.released: list[bytes] = []
        self.requests: list[str] = []
        self.now = 100.0
        self.comparer = impl(self.released.append, self.requests.append, clock=lambda: self.now, **options)

    def count(self, flow: str, name: str) -> int:
        return self.comparer.counters[flow][name]

    def take(self) -> list[bytes]:
        released, self.released[:] = list(self.released), []
        return released


@pytest.fixture(scope="module", params=[PyComparer, _native.Comparer], ids=["python", "native"])
def impl(request):
    """The Comparer class under test (module-scoped: hypothesis tests take it too)."""
    return request.param


@pytest.fixture
def h(impl):
    return Harness(impl)


def seg(offset: int, payload: bytes = b"", flags: int = ACK | PSH, ack: int = CLIENT_ACK, isn: int = PVM_ISN,
        **kw) -> bytes:
    """A segment from the guest (the server), ``offset`` bytes into its stream."""
    return tcp_frame(seq=(isn + 1 + offset) & 0xFFFFFFFF, ack=ack, flags=flags, payload=payload, **kw)


def handshake(h: Harness) -> None:
    """The guests' SYN-ACKs, PVM's and SVM's ISNs differing (not rewritten yet)."""
    h.comparer.primary(tcp_frame(seq=PVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    assert len(h.take()) == 1 and not h.requests


# ---- TCP payloads ----------------------------------------------------------------------

def test_equal_payloads_are_released_when_the_secondary_sends_them(h):
    p = seg(0, b"hello")
    h.comparer.primary(p)
    assert h.released == [] and h.comparer.held == 1
    h.comparer.secondary(seg(0, b"hello", ident=99, window=1))      # headers may differ
    assert h.take() == [p] and h.comparer.held == 0
    assert h.count("tcp", "matched") == 1 and h.count("tcp", "released") == 1 and not h.requests


def test_secondary_first_then_primary(h):
    h.comparer.secondary(seg(0, b"hello"))
    p = seg(0, b"hello")
    h.comparer.primary(p)
    assert h.take() == [p]


def test_unequal_payloads_ask_for_a_checkpoint_and_stay_held(h):
    p = seg(0, b"hello")
    h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"hellO"))
    assert h.requests == ["mismatch"] and h.released == []
    assert h.count("tcp", "mismatches") == 1
    h.comparer.primary(seg(5, b"more"))                              # diverged: held, not asked again
    h.comparer.secondary(seg(5, b"more"))
    assert h.requests == ["mismatch"] and h.released == []
    h.comparer.checkpoint()
    assert h.take() == [p, seg(5, b"more")]
    assert h.count("tcp", "dropped") == 2


def test_split_and_coalesced_segments(h):
    handshake(h)
    small = [seg(0, b"abcde"), seg(5, b"fghij")]
    for p in small:
        h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"abcdefghij"))                     # one segment on the SVM
    assert h.take() == small
    big = seg(10, b"0123456789")
    h.comparer.primary(big)
    h.comparer.secondary(seg(10, b"0123"))
    assert h.released == []                                         # half of it seen so far
    h.comparer.secondary(seg(14, b"456789"))
    assert h.take() == [big] and not h.requests


def test_partial_overlaps(h):
    handshake(h)
    primaries = [seg(0, b"0123456789"), seg(10, b"abcdefghij")]
    for p in primaries:
        h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"01234"))
    h.comparer.secondary(seg(3, b"3456789abcde"))                   # overlaps the last one
    assert h.take() == primaries[:1]
    h.comparer.secondary(seg(12, b"cdefghij"))
    assert h.take() == primaries[1:] and not h.requests


def test_retransmits(h):
    p = seg(0, b"hello")
    h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"hello"))
    assert h.take() == [p]
    h.comparer.primary(p)                                           # compared before: out at once
    assert h.take() == [p]
    assert h.count("tcp", "matched") == 1 and h.count("tcp", "released") == 2
    h.comparer.secondary(seg(0, b"hello"))                          # the SVM's retransmit: dropped
    assert h.count("tcp", "dropped") == 1
    partly_new = seg(3, b"lo world")
    h.comparer.primary(partly_new)
    assert h.released == []                                         # " world" is not compared yet
    h.comparer.secondary(seg(5, b" world"))
    assert h.take() == [partly_new] and not h.requests


def test_a_retransmit_goes_out_ahead_of_held_frames(h):
    first = seg(0, b"first")
    h.comparer.primary(first)
    h.comparer.secondary(seg(0, b"first"))
    h.take()
    waiting = seg(5, b"second")
    h.comparer.primary(waiting)
    h.comparer.primary(first)                                       # the client lost it: resent
    assert h.take() == [first] and h.comparer.held == 1
    newer_ack = seg(0, b"first", ack=CLIENT_ACK + 10)               # acks what the SVM has not acked
    h.comparer.primary(newer_ack)
    assert h.released == [] and h.comparer.held == 2


def test_frames_of_a_connection_leave_in_the_order_the_pvm_sent_them(h):
    data, bare_ack = seg(0, b"reply"), seg(5, flags=ACK)
    h.comparer.primary(data)
    h.comparer.primary(bare_ack)                                    # ready, but behind the data
    assert h.released == []
    h.comparer.secondary(seg(0, b"reply"))
    assert h.take() == [data, bare_ack]


def test_out_of_order_on_both_sides(h):
    handshake(h)
    first, second = seg(0, b"aaaa"), seg(4, b"bbbb")
    h.comparer.primary(second)
    h.comparer.secondary(seg(4, b"bbbb"))
    assert h.released == []                                         # nothing at the stream's start yet
    h.comparer.primary(first)
    assert h.released == []
    h.comparer.secondary(seg(0, b"aaaa"))
    assert h.take() == [second, first] and not h.requests          # in the order they arrived


def test_sequence_numbers_wrap(h):
    isn = 0xFFFFFFF8
    segments = [seg(0, b"12345678", isn=isn), seg(8, b"abcdefgh", isn=isn)]     # across 2**32
    for p in segments:
        h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"12345678abcdefgh", isn=isn))
    assert h.take() == segments and not h.requests


# ---- SYN, FIN, RST, bare ACKs --------------------------------------------------------------

def test_syn_is_matched_by_flags_not_sequence(h):
    syn_ack = tcp_frame(seq=PVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK)
    h.comparer.primary(syn_ack)
    assert h.released == []
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    assert h.take() == [syn_ack]
    h.comparer.primary(syn_ack)                                     # a retransmit: out at once
    assert h.take() == [syn_ack]
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))    # stale
    assert h.count("tcp", "dropped") == 1
    p = seg(0, b"banner")                                           # the stream starts at the ISN + 1
    h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"banner"))
    assert h.take() == [p] and not h.requests


def test_syn_with_different_flags_is_a_mismatch(h):
    h.comparer.primary(tcp_frame(seq=PVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, flags=SYN))
    assert h.requests == ["mismatch"] and h.released == []


def test_active_open_syn(h):
    syn = tcp_frame(seq=PVM_ISN, flags=SYN, sport=40001, dport=443)
    h.comparer.primary(syn)
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, flags=SYN, sport=40001, dport=443))
    assert h.take() == [syn]


def test_fin_is_matched_at_the_same_position(h):
    handshake(h)
    last = seg(0, b"bye", flags=ACK | FIN)
    h.comparer.primary(last)
    h.comparer.secondary(seg(0, b"bye"))
    assert h.released == []                                         # the data matched, the FIN not yet
    h.comparer.secondary(seg(3, flags=ACK | FIN))
    assert h.take() == [last]
    h.comparer.primary(last)                                        # a retransmitted FIN
    assert h.take() == [last] and not h.requests


def test_fin_against_data_is_a_mismatch(h):
    handshake(h)
    h.comparer.primary(seg(0, b"bye", flags=ACK | FIN))
    h.comparer.secondary(seg(0, b"bye and more"))
    assert h.requests == ["mismatch"]


def test_rst_is_matched_at_the_same_sequence_number(h):
    handshake(h)
    rst = seg(0, flags=RST | ACK)
    h.comparer.primary(rst)
    assert h.released == []
    h.comparer.secondary(seg(0, flags=RST | ACK))
    assert h.take() == [rst]
    h.comparer.primary(seg(10, flags=RST, ack=0))
    h.comparer.secondary(seg(11, flags=RST, ack=0))
    assert h.requests == ["mismatch"]


def test_bare_ack_waits_for_the_secondary_to_ack_as_much(h):
    p = seg(0, ack=500, flags=ACK)
    h.comparer.primary(p)
    h.comparer.secondary(seg(0, ack=400, flags=ACK))
    assert h.released == []
    h.comparer.secondary(seg(0, ack=600, flags=ACK))
    assert h.take() == [p]
    h.comparer.primary(seg(0, ack=550, flags=ACK))                  # acked by the SVM already
    assert len(h.take()) == 1 and not h.requests


def test_data_waits_for_the_secondary_ack(h):
    p = seg(0, b"reply", ack=700)
    h.comparer.primary(p)
    h.comparer.secondary(seg(0, b"reply", ack=650))                 # same bytes, less acknowledged
    assert h.released == [] and not h.requests
    h.comparer.secondary(seg(5, ack=700, flags=ACK))                # the SVM's delayed ACK
    assert h.take() == [p]


# ---- UDP, ICMP, other, non-IP --------------------------------------------------------------

def test_udp_equal_and_unequal(h):
    p = udp_frame(b"answer")
    h.comparer.primary(p)
    h.comparer.secondary(udp_frame(b"answer", ident=4242))          # the IP header may differ
    assert h.take() == [p] and h.count("udp", "matched") == 1
    h.comparer.primary(udp_frame(b"answer 2"))
    h.comparer.secondary(udp_frame(b"answer 3"))
    assert h.requests == ["mismatch"] and h.count("udp", "mismatches") == 1


def test_udp_any_queued_secondary_may_match(h):
    h.comparer.secondary(udp_frame(b"two"))
    h.comparer.secondary(udp_frame(b"one"))
    one, two = udp_frame(b"one"), udp_frame(b"two")
    h.comparer.primary(one)
    h.comparer.primary(two)
    assert h.take() == [one, two] and not h.requests


def test_udp_ports_are_compared(h):
    h.comparer.primary(udp_frame(b"x", sport=53, dport=40000))
    h.comparer.secondary(udp_frame(b"x", sport=53, dport=40001))     # another connection: no match
    assert h.released == [] and not h.requests


def test_thousands_of_connections_each_matched_on_its_own(h):
    """Past the table's first buckets (it grows several times), connections found again in
    another order, and forgotten at the checkpoints: each still compares on its own."""
    ports = range(20000, 23000)
    for port in ports:
        h.comparer.primary(udp_frame(b"p%d" % port, sport=53, dport=port))
    assert h.comparer.held == len(ports)
    for port in reversed(ports):
        h.comparer.secondary(udp_frame(b"p%d" % port, sport=53, dport=port))
    assert len(h.take()) == len(ports) and h.comparer.held == 0 and not h.requests
    assert h.count("udp", "matched") == len(ports)
    h.comparer.checkpoint()                 # UDP connections are forgotten
    h.comparer.primary(udp_frame(b"again", sport=53, dport=ports[7]))
    h.comparer.secondary(udp_frame(b"other", sport=53, dport=ports[8]))   # another connection: no match
    assert h.comparer.held == 1 and not h.requests
    h.comparer.secondary(udp_frame(b"again", sport=53, dport=ports[7]))
    assert len(h.take()) == 1 and h.comparer.held == 0


def test_icmp(h):
    reply = icmp_frame(0, ident=3, sequence=1, payload=b"abc")
    h.comparer.primary(reply)
    h.comparer.secondary(icmp_frame(0, ident=3, sequence=1, payload=b"abc", ip_ident=77))
    assert h.take() == [reply]
    h.comparer.primary(icmp_frame(0, ident=3, sequence=2, payload=b"abc"))
    h.comparer.secondary(icmp_frame(0, ident=3, sequence=2, payload=b"abd"))
    assert h.requests == ["mismatch"] and h.count("icmp", "mismatches") == 1


def test_other_protocols_compare_the_whole_ip_packet(h):
    gre = ether(ipv4(47, b"tunnel", ident=5))
    h.comparer.primary(gre)
    h.comparer.secondary(ether(ipv4(47, b"tunnel", ident=5)))
    assert h.take() == [gre]
    h.comparer.primary(ether(ipv4(47, b"tunnel", ident=6)))
    h.comparer.secondary(ether(ipv4(47, b"tunnel", ident=7)))
    assert h.requests == ["mismatch"] and h.count("other", "mismatches") == 1


def test_fragments_compare_as_other(h):
    fragment = ether(ipv4(17, b"12345678", flags_offset=0x2000))
    h.comparer.primary(fragment)
    h.comparer.secondary(ether(ipv4(17, b"12345678", flags_offset=0x2000)))
    assert h.take() == [fragment] and h.count("other", "matched") == 1 and h.count("udp", "primary") == 0


def test_arp_passes_from_the_primary_and_is_dropped_from_the_secondary(h):
    h.comparer.primary(arp_frame())
    h.comparer.secondary(arp_frame())
    assert h.take() == [arp_frame()]
    assert h.comparer.counters["non-ip"] == {**dict.fromkeys(COUNTERS, 0), "primary": 1, "secondary": 1,
                                             "released": 1, "dropped": 1}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_primary_is_released_and_secondary_dropped(h, frame):
    h.comparer.primary(frame)
    h.comparer.secondary(frame)
    assert h.take() == [frame]
    totals = {name: sum(h.comparer.counters[flow][name] for flow in FLOW_CLASSES) for name in COUNTERS}
    assert totals == {**dict.fromkeys(COUNTERS, 0), "primary": 1, "secondary": 1, "released": 1, "dropped": 1,
                      "malformed": 2}


# ---- timeouts, queue bounds, passthrough ---------------------------------------------------

def test_timeouts_ask_for_a_checkpoint(impl):
    h = Harness(impl, compare_timeout_ms=3000)
    h.comparer.primary(seg(0, b"lonely"))
    h.now += 2.9
    assert h.comparer.scan_expired() is False and h.requests == []
    h.now += 0.2
    assert h.comparer.scan_expired() is True and h.requests == ["mismatch"]
    assert h.count("tcp", "timeouts") == 1
    h.comparer.scan_expired()                                       # asked again, counted once
    assert h.requests == ["mismatch", "mismatch"] and h.count("tcp", "timeouts") == 1
    h.comparer.checkpoint()
    assert len(h.take()) == 1 and h.comparer.scan_expired() is False


def test_an_unmatched_secondary_frame_times_out_too(impl):
    h = Harness(impl, compare_timeout_ms=1000)
    h.comparer.secondary(udp_frame(b"only the SVM said this"))
    h.now += 1.5
    assert h.comparer.scan_expired() and h.count("udp", "timeouts") == 1


def test_queue_overflow(impl):
    h = Harness(impl, max_queue_size=3)
    frames = [udp_frame(b"%d" % i) for i in range(4)]
    for frame in frames:
        h.comparer.primary(frame)
    assert h.comparer.held == 3 and h.count("udp", "dropped") == 1 and h.requests == ["mismatch"]
    for i in range(5):
        h.comparer.secondary(udp_frame(b"svm %d" % i, sport=54))     # another connection, nothing to match
    assert h.count("udp", "dropped") == 3
    h.comparer.checkpoint()
    assert h.take() == frames[:3]


def test_tcp_queue_overflow(impl):
    h = Harness(impl, max_queue_size=2)
    for i in range(3):
        h.comparer.primary(seg(i, b"x"))
    for i in range(3):
        h.comparer.secondary(seg(10 + i, b"y"))
    assert h.comparer.held == 2 and h.count("tcp", "dropped") == 2


def test_passthrough(impl):
    h = Harness(impl, passthrough=[("tcp", 22), ("UDP", 123)])
    ssh, ntp = tcp_frame(sport=22, payload=b"SSH-2.0"), udp_frame(b"time", sport=123)
    h.comparer.primary(ssh)
    h.comparer.primary(ntp)
    h.comparer.secondary(tcp_frame(sport=22, payload=b"SSH-2.0"))
    h.comparer.secondary(udp_frame(b"time", dport=123))
    assert h.take() == [ssh, ntp]
    assert h.count("tcp", "dropped") == 1 and h.count("udp", "dropped") == 1 and h.count("tcp", "matched") == 0
    h.comparer.primary(tcp_frame(sport=80, payload=b"compared"))
    assert h.released == []


# ---- checkpoint and failover ---------------------------------------------------------------

def test_checkpoint_releases_everything_in_arrival_order_and_starts_afresh(h):
    frames = [seg(0, b"one"), udp_frame(b"dns"), seg(3, b"two"), icmp_frame(0), arp_frame()]
    for frame in frames:
        h.comparer.primary(frame)
    h.comparer.secondary(seg(0, b"ONE"))                            # a mismatch on the TCP stream
    h.comparer.secondary(udp_frame(b"other dns", sport=5353))
    assert h.take() == [arp_frame()] and h.requests == ["mismatch"]
    h.comparer.checkpoint()
    assert h.take() == frames[:4] and h.comparer.held == 0
    assert h.count("tcp", "dropped") == 1 and h.count("udp", "dropped") == 1     # the SVM's frames
    # Both guests now go on from where the PVM was: the stream compares from offset 6.
    h.comparer.secondary(seg(3, b"two"))                            # an SVM retransmit of old bytes
    assert h.count("tcp", "dropped") == 2
    following = seg(6, b"three")
    h.comparer.primary(following)
    h.comparer.secondary(seg(6, b"three"))
    assert h.take() == [following] and h.requests == ["mismatch"]


def test_checkpoint_forgets_idle_connections(h):
    h.comparer.primary(seg(0, b"a"))
    h.comparer.secondary(seg(0, b"a"))
    h.comparer.checkpoint()
    assert len(h.comparer._connections) == 1
    h.comparer.checkpoint()
    assert len(h.comparer._connections) == 0


def test_failover_releases_everything_and_stops_comparing(h):
    held = [seg(0, b"held"), udp_frame(b"held")]
    for frame in held:
        h.comparer.primary(frame)
    h.comparer.failover()
    assert h.take() == held
    later = seg(4, b"later")
    h.comparer.primary(later)
    h.comparer.secondary(seg(4, b"ignored"))
    assert h.take() == [later] and not h.requests
    assert h.count("tcp", "dropped") == 1


def test_counters_are_a_plain_copy(h):
    counters = h.comparer.counters
    assert set(counters) == set(FLOW_CLASSES) and all(set(c) == set(COUNTERS) for c in counters.values())
    counters["tcp"]["primary"] = 99
    assert h.count("tcp", "primary") == 0


def test_bad_options(impl):
    with pytest.raises(ValueError, match="^compare_timeout_ms and max_queue_size must be positive$"):
        impl(print, print, max_queue_size=0)
    with pytest.raises(ValueError, match="^compare_timeout_ms and max_queue_size must be positive$"):
        impl(print, print, compare_timeout_ms=0)
    with pytest.raises(ValueError) as e:
        impl(print, print, passthrough=[("tcp", 22), ("SCTP", 9)])
    assert str(e.value) == "passthrough protocols are tcp or udp, not [('sctp', 9), ('tcp', 22)]"


def test_options_read_back(impl):
    comparer = impl(print, print, compare_timeout_ms=2500, max_queue_size=7, passthrough=[["TCP", 22]])
    assert (comparer.compare_timeout, comparer.max_queue_size, comparer.passthrough) == (2.5, 7, {("tcp", 22)})


def test_an_exception_from_a_callback_reaches_the_caller(impl):
    def broken(_argument):
        raise OSError("tap gone")

    with pytest.raises(OSError, match="tap gone"):
        impl(broken, print).primary(arp_frame())
    comparer = impl(print, broken, max_queue_size=1)
    comparer.primary(udp_frame(b"held"))
    with pytest.raises(OSError, match="tap gone"):
        comparer.primary(udp_frame(b"beyond the bound"))


def test_the_c_comparer_sends_the_rest_when_release_raises():
    """Unlike PyComparer, which stops mid-step, the C engine finishes its step: every other
    frame still goes out, and the first exception is raised after."""
    sent = []

    def release(frame):
        sent.append(frame)
        if len(sent) == 1:
            raise OSError("first send failed")

    comparer = _native.Comparer(release, print)
    frames = [udp_frame(b"%d" % i) for i in range(3)]
    for frame in frames:
        comparer.primary(frame)
    with pytest.raises(OSError, match="first send failed"):
        comparer.checkpoint()
    assert sent == frames and comparer.held == 0 and comparer.counters["udp"]["released"] == 3


def test_the_c_comparer_refuses_calls_from_its_own_callbacks():
    def release(frame):
        comparer.primary(frame)

    comparer = _native.Comparer(release, print)
    with pytest.raises(RuntimeError, match="called from its own release"):
        comparer.primary(arp_frame())
    comparer.secondary(arp_frame())                                 # usable again afterwards
    assert comparer.counters["non-ip"]["dropped"] == 1


def test_netfilter_uses_the_c_comparer():
    import native
    from netfilter import compare
    assert compare.Comparer is (_native.Comparer if native.IMPLEMENTATION == "native" else PyComparer)


# ---- properties -----------------------------------------------------------------------------

def cuts(data: bytes, points: list[int]) -> list[tuple[int, bytes]]:
    edges = sorted({0, len(data), *(p % len(data) for p in points)})
    return [(a, data[a:b]) for a, b in zip(edges, edges[1:])]


streams = st.tuples(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 10**6), max_size=12),
                    st.lists(st.integers(0, 10**6), max_size=12), st.randoms(use_true_random=False),
                    st.sampled_from([PVM_ISN, 0xFFFFFF80]))


def feed(h: Harness, primaries: list[bytes], secondaries: list[bytes], rng: random.Random) -> None:
    """Both sides' frames, each side shuffled a little, interleaved at random."""
    for side in (primaries, secondaries):
        for _ in range(len(side) // 2):
            i = rng.randrange(len(side))
            j = min(i + 1, len(side) - 1)
            side[i], side[j] = side[j], side[i]
    p, s = list(primaries), list(secondaries)
    while p or s:
        if p and (not s or rng.random() < 0.5):
            h.comparer.primary(p.pop(0))
        else:
            h.comparer.secondary(s.pop(0))


@settings(max_examples=300, deadline=None)
@given(streams)
def test_the_same_stream_cut_differently_is_all_released(impl, stream):
    data, p_points, s_points, rng, isn = stream
    h = Harness(impl)
    h.comparer.primary(tcp_frame(seq=isn, ack=CLIENT_ACK, flags=SYN | ACK))
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    primaries = [seg(o, chunk, isn=isn) for o, chunk in cuts(data, p_points)] + [seg(len(data), flags=ACK | FIN, isn=isn)]
    secondaries = [seg(o, chunk, isn=isn) for o, chunk in cuts(data, s_points)] + [seg(len(data), flags=ACK | FIN, isn=isn)]
    secondaries += rng.sample(secondaries, min(2, len(secondaries)))            # a few SVM retransmits
    feed(h, primaries, secondaries, rng)
    assert sorted(h.released[1:]) == sorted(primaries) and not h.requests
    assert h.comparer.held == 0 and h.count("tcp", "mismatches") == 0


@settings(max_examples=300, deadline=None)
@given(streams, st.integers(0, 10**6))
def test_one_changed_byte_is_found(impl, stream, where):
    data, p_points, s_points, rng, isn = stream
    where %= len(data)
    changed = bytearray(data)
    changed[where] ^= 0x01
    h = Harness(impl)
    h.comparer.primary(tcp_frame(seq=isn, ack=CLIENT_ACK, flags=SYN | ACK))
    h.comparer.secondary(tcp_frame(seq=SVM_ISN, ack=CLIENT_ACK, flags=SYN | ACK))
    pieces = cuts(data, p_points)
    primaries = [seg(o, chunk, isn=isn) for o, chunk in pieces]
    feed(h, primaries, [seg(o, chunk, isn=isn) for o, chunk in cuts(bytes(changed), s_points)], rng)
    assert h.requests == ["mismatch"] and h.count("tcp", "mismatches") == 1
    covering = next(seg(o, chunk, isn=isn) for o, chunk in pieces if o <= where < o + len(chunk))
    assert covering not in h.released
    h.comparer.checkpoint()
    assert sorted(h.released[1:]) == sorted(primaries)


tcp_flags = st.integers(0, 0x3F)
crafted = st.one_of(
    st.builds(lambda seq, ack, flags, payload, port: tcp_frame(seq=seq, ack=ack, flags=flags, payload=payload,
                                                              dport=port),
              st.integers(0, 2**32 - 1) | st.integers(PVM_ISN - 5, PVM_ISN + 40), st.integers(0, 2**32 - 1),
              tcp_flags, st.binary(max_size=20), st.sampled_from([40000, 40001])),
    st.builds(udp_frame, st.binary(max_size=10)),
    st.builds(icmp_frame, st.integers(0, 20)),
    st.binary(max_size=80),
    st.sampled_from(list(MALFORMED.values()) + [arp_frame()]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["primary", "secondary", "scan", "checkpoint", "tick"]), crafted),
                max_size=40),
       st.sampled_from([2, 1024]))
def test_random_input_never_crashes(impl, operations, queue_size):
    h = Harness(impl, max_queue_size=queue_size, compare_timeout_ms=1000)
    primaries = 0
    for operation, frame in operations:
        if operation in ("primary", "secondary"):
            getattr(h.comparer, operation)(frame)
            primaries += operation == "primary"
        elif operation == "scan":
            h.comparer.scan_expired()
        elif operation == "checkpoint":
            h.comparer.checkpoint()
        else:
            h.now += 0.7
    h.comparer.failover()
    released = sum(h.comparer.counters[flow]["released"] for flow in FLOW_CLASSES)
    assert len(h.released) == released and h.comparer.held == 0 and set(h.requests) <= {"mismatch"}
    if queue_size > len(operations):
        assert released == primaries            # nothing was lost: every primary frame went out once


# ---- the C twin against the reference ------------------------------------------------------

STREAM = bytes(range(7, 250)) * 2            # what both guests send on every TCP connection
TCP_ENDS = [(80, 40000, "10.9.0.2", "10.9.0.1"), (80, 40001, "10.9.0.2", "10.9.0.1"),
            (443, 50000, "10.9.0.12", "10.9.0.9")]          # the last: dotted quads sort unlike numbers
ISNS = [PVM_ISN, 0xFFFFFFF0]                                # the second wraps within the stream


def stream_frames(rng: random.Random, ends: tuple, isn: int) -> tuple[list[bytes], list[bytes]]:
    """One TCP connection as both guests send it: a handshake (mostly), the stream cut
    differently on each side, a FIN (mostly), acks that move, retransmits, now and then a
    differing byte, an RST, a SYN with other flags or a bare ACK."""
    sport, dport, src, dst = ends
    data = STREAM[:rng.randint(1, 60)]

    def frame(seq: int, flags: int, payload: bytes = b"", ack: int = CLIENT_ACK) -> bytes:
        return tcp_frame(seq=seq & 0xFFFFFFFF, ack=ack, flags=flags, payload=payload, sport=sport, dport=dport,
                         src=src, dst=dst)

    sides = []
    for side_isn in (isn, SVM_ISN):
        frames = []
        if rng.random() < 0.8:
            frames.append(frame(side_isn, SYN | (ACK if rng.random() < 0.95 else 0)))
        points = [rng.randrange(len(data)) for _ in range(rng.randint(0, 6))]
        for offset, chunk in cuts(data, points):
            if rng.random() < 0.05:
                chunk = chunk[:-1] + bytes([chunk[-1] ^ 0x20])
            frames.append(frame(isn + 1 + offset, ACK | PSH, chunk, CLIENT_ACK + rng.choice([0, 0, 3])))
        if rng.random() < 0.8:
            frames.append(frame(isn + 1 + len(data), ACK | FIN, ack=CLIENT_ACK + 3))
        if rng.random() < 0.2:
            frames.append(frame(isn + 1 + rng.choice([0, len(data)]), RST | rng.choice([0, ACK])))
        if rng.random() < 0.2:
            frames.append(frame(isn + 1 + rng.randrange(len(data) + 1), ACK, ack=CLIENT_ACK + rng.choice([0, 3, 10])))
        frames += rng.sample(frames, min(len(frames), rng.randint(0, 2)))      # retransmits
        sides.append(frames)
    return sides[0], sides[1]


def datagram_pair(rng: random.Random) -> tuple[bytes, bytes]:
    """A UDP, ICMP or other packet from each guest, mostly equal."""
    kind = rng.choice(["udp", "icmp", "other"])
    bodies = [rng.choice([b"a", b"ab"]) for _ in range(2)]
    sport, icmp_type, offset = rng.choice([53, 54]), rng.choice([0, 8, 3]), rng.choice([0, 0x2000])
    if rng.random() < 0.8:
        bodies[1] = bodies[0]
    if kind == "udp":
        return tuple(udp_frame(b, sport=sport, src=rng.choice(["10.9.0.2", "10.9.0.12"])) for b in bodies)
    if kind == "icmp":
        return tuple(icmp_frame(icmp_type, ident=7, payload=b) for b in bodies)
    return tuple(ether(ipv4(47, b, flags_offset=offset)) for b in bodies)


NOISE = list(MALFORMED.values()) + [arp_frame()]


def scenario(rng: random.Random) -> list[tuple]:
    """Steps for both comparers: a few TCP connections, datagrams and noise from both guests,
    each side's frames a little out of order, interleaved at random, with clock ticks,
    timeout scans, checkpoints and now and then a failover among them."""
    primaries, secondaries = [], []
    for ends in rng.sample(TCP_ENDS, rng.randint(0, 3)):
        p, s = stream_frames(rng, ends, rng.choice(ISNS))
        primaries += p
        secondaries += s
    for _ in range(rng.randint(0, 4)):
        p, s = datagram_pair(rng)
        primaries.append(p)
        secondaries.append(s)
    for side in (primaries, secondaries):
        for _ in range(rng.randint(0, 2)):
            side.insert(rng.randint(0, len(side)), rng.choice(NOISE + [rng.randbytes(rng.randint(0, 70))]))
    # each frame at its place give or take a few, the two sides merged at random
    steps = sorted([(i + rng.uniform(0, 4), ("primary", f)) for i, f in enumerate(primaries)]
                   + [(i + rng.uniform(0, 4), ("secondary", f)) for i, f in enumerate(secondaries)])
    steps = [step for _, step in steps]
    for _ in range(rng.randint(0, 10)):
        control = rng.choice([("tick", 0.5), ("tick", 1.0), ("tick", 1.1), ("scan",), ("scan",), ("checkpoint",),
                              ("failover",)])
        if control[0] != "failover" or rng.random() < 0.3:
            steps.insert(rng.randint(0, len(steps)), control)
    return steps


scenarios = st.builds(scenario, st.randoms(use_true_random=False))


def observed(h: Harness) -> tuple:
    c = h.comparer
    return h.take(), list(h.requests), c.counters, c.held, c.failed_over, sorted(c._connections)


@settings(max_examples=600, deadline=None)
@given(scenarios, st.sampled_from([(1000, 1024, ()), (1000, 1024, [("tcp", 443), ("udp", 54)]), (1000, 4, ()),
                                   (3000, 1, ())]))
def test_the_c_comparer_does_what_the_reference_does(steps, options):
    """Both fed the same events: the same frames out, in the same order, the same checkpoint
    requests, counters, held frames and connections after every step."""
    timeout_ms, queue_size, passthrough = options
    python, c = (Harness(impl, compare_timeout_ms=timeout_ms, max_queue_size=queue_size, passthrough=passthrough)
                 for impl in (PyComparer, _native.Comparer))
    for step in steps:
        for h in (python, c):
            if step[0] == "tick":
                h.now += step[1]
            elif step[0] == "scan":
                h.requests.append(h.comparer.scan_expired())
            else:
                getattr(h.comparer, step[0])(*step[1:])
        assert observed(c) == observed(python), step


VALID = [tcp_frame(seq=PVM_ISN + 1, ack=CLIENT_ACK, payload=b"data"), udp_frame(b"dns"), icmp_frame(8),
         ether(ipv4(47, b"gre")), tcp_frame(flags=SYN, options=b"\x02\x04\x05\xb4", vlan=5)]
garbage = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda frame, edits: bytes(b if i not in edits else edits[i] for i, b in enumerate(frame)),
              st.sampled_from(VALID), st.dictionaries(st.integers(12, 60), st.integers(0, 255), max_size=3)),
    st.builds(lambda frame, cut: frame[:cut], st.sampled_from(VALID), st.integers(0, 70)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["primary", "secondary", "scan_expired", "checkpoint"]), garbage),
                max_size=50))
def test_the_c_comparer_survives_garbage(steps):
    """Random bytes, valid frames with random header bytes, truncated frames: the C comparer
    classes them as the reference's parser does (malformed or not, which flow) and survives."""
    python, c = (Harness(impl, max_queue_size=4) for impl in (PyComparer, _native.Comparer))
    for operation, frame in steps:
        for h in (python, c):
            if operation in ("primary", "secondary"):
                getattr(h.comparer, operation)(frame)
            else:
                getattr(h.comparer, operation)()
            h.now += 1
        assert observed(c) == observed(python)
    for h in (python, c):
        h.comparer.failover()
    assert observed(c) == observed(python) and c.comparer.held == 0


def test_the_c_api_alone_does_what_the_reference_does(tmp_path):
    """colo.h's cmp_* from a C program that never starts Python (tests/cmp_driver.c), as the
    datapath loop calls them: the same frames out, requests, counters and held frames as
    PyComparer on a batch of random scenarios."""
    root = Path(__file__).resolve().parent.parent
    driver = tmp_path / "cmp_driver"
    libdir = sysconfig.get_config_var("LIBDIR")
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", f"-I{sysconfig.get_paths()['include']}", f"-I{root / 'native'}",
                    str(root / "tests/cmp_driver.c"), str(root / "native/colo_compare.c"), "-o", str(driver),
                    f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{sys.version_info.major}.{sys.version_info.minor}"],
                   check=True)
    rng = random.Random(20261130)
    records, expected = [], []
    for _ in range(150):
        timeout_ms, queue_size = rng.choice([(1000, 1024), (1000, 4), (3000, 1)])
        now = [100.0]
        comparer = PyComparer(lambda frame: expected.append("R " + frame.hex()),
                              lambda reason: expected.append("C " + reason), clock=lambda: now[0],
                              compare_timeout_ms=timeout_ms, max_queue_size=queue_size)
        records.append(struct.pack("<cdI", b"n", timeout_ms, queue_size))
        for step in scenario(rng):
            op, frame = step[0], step[1] if step[0] in ("primary", "secondary") else b""
            if op == "tick":
                now[0] += step[1]
                continue
            if op == "scan":
                expected.append("E %d" % comparer.scan_expired())
            else:
                getattr(comparer, op)(*step[1:])
            counters = " ".join(str(comparer.counters[f][n]) for f in FLOW_CLASSES for n in COUNTERS)
            expected.append(f"S {comparer.held} {int(comparer.failed_over)} {counters}")
            code = {"primary": b"p", "secondary": b"s", "scan": b"e", "checkpoint": b"c", "failover": b"f"}[op]
            records.append(struct.pack("<cdI", code, now[0], len(frame)) + frame)
    result = subprocess.run([str(driver)], input=b"".join(records), capture_output=True, check=True)
    assert result.stdout.decode().splitlines() == expected
