"""netfilter.packet: parsing crafted and random frames, connection keys, checksums against a
plain RFC 1071 reference.  The frame builders here are shared by the comparer's and the
rewriter's tests; they compute checksums with ``rfc1071``, not with the code under test."""
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netfilter import packet
from netfilter.packet import ACK, PSH, PacketError, parse

GUEST, CLIENT = "10.9.0.2", "10.9.0.1"
GUEST_MAC, CLIENT_MAC = bytes.fromhex("525400000002"), bytes.fromhex("525400000001")


def rfc1071(data: bytes) -> int:
    """RFC 1071 as written: 16-bit words added with end-around carry, then complemented."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(payload: bytes, ethertype: int = 0x0800, vlan: int | None = None, src=GUEST_MAC, dst=CLIENT_MAC) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return dst + src + tag + struct.pack("!H", ethertype) + payload


def ipv4(protocol: int, body: bytes, src: str = GUEST, dst: str = CLIENT, ident: int = 1, flags_offset: int = 0,
         ttl: int = 64, options: bytes = b"") -> bytes:
    ihl = 20 + len(options)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(body), ident, flags_offset, ttl, protocol,
                         0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    header = header[:10] + struct.pack("!H", rfc1071(header)) + header[12:]
    return header + body


def pseudo(src: str, dst: str, protocol: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, protocol, length)


def tcp_frame(seq: int = 1000, ack: int = 0, flags: int = ACK, payload: bytes = b"", sport: int = 80,
              dport: int = 40000, src: str = GUEST, dst: str = CLIENT, window: int = 65535, options: bytes = b"",
              vlan: int | None = None, padding: bytes = b"", ident: int = 1, bad_checksum: bool = False) -> bytes:
    header_length = 20 + len(options)
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, header_length // 4 << 4, flags, window, 0, 0) \
        + options + payload
    checksum = rfc1071(pseudo(src, dst, 6, len(segment)) + segment) ^ (0x5555 if bad_checksum else 0)
    segment = segment[:16] + struct.pack("!H", checksum) + segment[18:]
    return ether(ipv4(6, segment, src, dst, ident), vlan=vlan) + padding


def udp_frame(payload: bytes = b"", sport: int = 53, dport: int = 40000, src: str = GUEST, dst: str = CLIENT,
              ident: int = 1) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    checksum = rfc1071(pseudo(src, dst, 17, len(datagram)) + datagram) or 0xFFFF
    return ether(ipv4(17, datagram[:6] + struct.pack("!H", checksum) + datagram[8:], src, dst, ident))


def icmp_frame(icmp_type: int = 0, code: int = 0, ident: int = 7, sequence: int = 1, payload: bytes = b"ping",
               src: str = GUEST, dst: str = CLIENT, ip_ident: int = 1) -> bytes:
    message = struct.pack("!BBHHH", icmp_type, code, 0, ident, sequence) + payload
    message = message[:2] + struct.pack("!H", rfc1071(message)) + message[4:]
    return ether(ipv4(1, message, src, dst, ip_ident))


def arp_frame() -> bytes:
    return ether(bytes.fromhex("0001080006040001") + GUEST_MAC + socket.inet_aton(GUEST) + bytes(6)
                 + socket.inet_aton(CLIENT), ethertype=0x0806, dst=b"\xff" * 6)


# ---- parsing ------------------------------------------------------------------------

def test_tcp_segment():
    frame = tcp_frame(seq=0xFFFFFFF0, ack=77, flags=ACK | PSH, payload=b"hello", options=b"\x01\x01\x01\x00")
    p = parse(frame)
    assert (p.is_ipv4, p.flow_class, p.protocol, p.src, p.dst) == (True, "tcp", 6, GUEST, CLIENT)
    assert (p.ip_offset, p.ip_header_length, p.total_length, p.transport_offset) == (14, 20, 20 + 24 + 5, 34)
    t = p.tcp
    assert (t.sport, t.dport, t.seq, t.ack, t.header_length, t.flags) == (80, 40000, 0xFFFFFFF0, 77, 24, ACK | PSH)
    assert bytes(t.payload) == b"hello" and t.has_ack and not (t.syn or t.fin or t.rst)
    assert p.udp is None and p.icmp is None and not p.is_fragment


def test_vlan_tag_is_skipped_and_padding_ignored():
    p = parse(tcp_frame(payload=b"x", vlan=42, padding=bytes(20)))
    assert p.ip_offset == 18 and p.ip_end == 18 + 41
    assert bytes(p.tcp.payload) == b"x"        # the padding is not payload
    assert bytes(p.ip_packet) == tcp_frame(payload=b"x")[14:]


def test_udp_icmp_other_and_arp():
    u = parse(udp_frame(b"answer"))
    assert (u.flow_class, u.udp.sport, u.udp.dport, u.udp.length, bytes(u.udp.payload)) == ("udp", 53, 40000, 14, b"answer")
    echo = parse(icmp_frame(0, 0, ident=9, sequence=3, payload=b"abc"))
    assert (echo.flow_class, echo.icmp.type, echo.icmp.ident, echo.icmp.sequence, bytes(echo.icmp.payload)) \
        == ("icmp", 0, 9, 3, b"abc")
    unreachable = parse(icmp_frame(3, 3))
    assert unreachable.icmp.ident is None and unreachable.icmp.sequence is None
    gre = parse(ether(ipv4(47, b"\x00" * 8)))
    assert (gre.flow_class, gre.protocol, gre.tcp, gre.udp, gre.icmp) == ("other", 47, None, None, None)
    arp = parse(arp_frame())
    assert (arp.is_ipv4, arp.flow_class, arp.ethertype) == (False, "non-ip", 0x0806)
    ipv6 = parse(ether(bytes(40), ethertype=0x86DD))
    assert ipv6.flow_class == "non-ip"


def test_fragments_are_not_parsed_past_ip():
    first = parse(ether(ipv4(17, struct.pack("!HHHH", 1, 2, 3000, 0) + bytes(16), flags_offset=0x2000)))
    later = parse(ether(ipv4(6, b"tail", flags_offset=185)))
    for p in (first, later):
        assert p.is_fragment and p.flow_class == "other" and p.udp is None and p.tcp is None
    assert later.fragment_offset == 185 * 8 and not later.more_fragments
    assert later.key == (6, (CLIENT, 0), (GUEST, 0))


def test_ip_options_and_flags():
    p = parse(ether(ipv4(17, struct.pack("!HHHH", 1, 2, 8, 0), options=b"\x01\x01\x01\x00", flags_offset=0x4000)))
    assert p.ip_header_length == 24 and p.transport_offset == 38 and p.dont_fragment and not p.is_fragment
    assert p.udp.length == 8


def test_connection_key_is_the_same_both_ways():
    out = parse(tcp_frame(sport=80, dport=40000, src=GUEST, dst=CLIENT))
    back = parse(tcp_frame(sport=40000, dport=80, src=CLIENT, dst=GUEST))
    assert out.key == back.key == (6, (CLIENT, 40000), (GUEST, 80))
    assert parse(udp_frame(sport=53)).key != parse(udp_frame(sport=54)).key
    assert parse(icmp_frame(8, ident=5, src=CLIENT, dst=GUEST)).key == parse(icmp_frame(0, ident=5)).key \
        == (1, (CLIENT, 5), (GUEST, 5))


MALFORMED = {
    "empty": b"",
    "shorter than ethernet": bytes(13),
    "inside the vlan tag": CLIENT_MAC + GUEST_MAC + b"\x81\x00\x00\x01",
    "truncated ip header": ether(bytes.fromhex("45000014")),
    "ip version 6 in ipv4": ether(b"\x65" + bytes(19)),
    "ihl below 5": ether(b"\x44" + ipv4(6, bytes(20))[1:]),
    "ihl beyond the frame": ether(b"\x4f" + ipv4(6, b"")[1:]),
    "total length beyond the frame": ether(ipv4(17, bytes(8)))[:-1],
    "total length below the header": ether(ipv4(17, b"")[:2] + b"\x00\x10" + ipv4(17, b"")[4:]),
    "truncated tcp header": ether(ipv4(6, bytes(19))),
    "tcp data offset below 5": ether(ipv4(6, bytes(12) + b"\x40" + bytes(7))),
    "tcp data offset beyond the segment": ether(ipv4(6, bytes(12) + b"\x60" + bytes(7))),
    "truncated udp header": ether(ipv4(17, bytes(7))),
    "udp length beyond the payload": ether(ipv4(17, struct.pack("!HHHH", 1, 2, 9, 0))),
    "udp length below its header": ether(ipv4(17, struct.pack("!HHHH", 1, 2, 7, 0))),
    "truncated icmp header": ether(ipv4(1, bytes(7))),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise_packet_error(frame):
    with pytest.raises(PacketError) as error:
        parse(frame)
    assert error.value.reason and error.value.flow_class in ("tcp", "udp", "icmp", "other", "non-ip")


def test_malformed_flow_class():
    with pytest.raises(PacketError) as error:
        parse(MALFORMED["tcp data offset beyond the segment"])
    assert error.value.flow_class == "tcp"
    with pytest.raises(PacketError) as error:
        parse(MALFORMED["shorter than ethernet"])
    assert error.value.flow_class == "non-ip"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_parse_or_raise_packet_error(data):
    try:
        parse(data)
    except PacketError:
        pass


ipv4_frames = st.builds(lambda proto, body, cut, flip, value: _mangle(ether(ipv4(proto, body)), cut, flip, value),
                        st.sampled_from([1, 6, 17, 47]), st.binary(max_size=60), st.integers(0, 100),
                        st.integers(0, 100), st.integers(0, 255))


def _mangle(frame: bytes, cut: int, where: int, value: int) -> bytes:
    """A well-formed frame with one byte changed and its tail cut: near misses reach deep."""
    frame = bytearray(frame[:len(frame) - cut % 8])
    if frame:
        frame[where % len(frame)] = value
    return bytes(frame)


@settings(max_examples=3000, deadline=None)
@given(ipv4_frames)
def test_near_miss_frames_parse_or_raise_packet_error(frame):
    try:
        p = parse(frame)
    except PacketError:
        return
    assert p.ip_end <= len(frame)
    for transport in (p.tcp, p.udp, p.icmp):
        if transport is not None:
            assert p.transport_offset + len(transport.payload) <= p.ip_end


# ---- checksums ----------------------------------------------------------------------

@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_internet_checksum_equals_rfc1071(data):
    assert packet.internet_checksum(data) == rfc1071(data)
    half = len(data) // 2 & ~1                       # an even split point
    assert packet.internet_checksum(data[:half], data[half:]) == rfc1071(data)


def test_internet_checksum_edges():
    assert packet.internet_checksum(b"") == rfc1071(b"") == 0xFFFF
    assert packet.internet_checksum(bytes(10)) == 0xFFFF
    assert packet.internet_checksum(b"\xff\xff") == rfc1071(b"\xff\xff") == 0
    assert packet.internet_checksum(b"\x00\x01\xff\xfe") == rfc1071(b"\x00\x01\xff\xfe") == 0
    assert packet.internet_checksum(b"\x01") == rfc1071(b"\x01") == 0xFEFF


def test_checksums_of_built_frames_verify():
    frame = tcp_frame(payload=b"odd", options=b"\x01\x01\x01\x00")
    p = parse(frame)
    ip = frame[14:34]
    assert packet.ipv4_header_checksum(ip) == struct.unpack("!H", ip[10:12])[0]
    assert packet.tcp_checksum(socket.inet_aton(GUEST), socket.inet_aton(CLIENT), frame[34:]) == p.tcp.checksum
    u = udp_frame(b"12345")
    assert packet.udp_checksum(socket.inet_aton(GUEST), socket.inet_aton(CLIENT), u[34:]) == parse(u).udp.checksum


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["tcp", "udp", "icmp"]), st.binary(max_size=200), st.integers(0, 0xFFFF), st.binary(max_size=8))
def test_fix_checksums_restores_what_corruption_broke(kind, payload, junk, padding):
    good = {"tcp": lambda: tcp_frame(payload=payload), "udp": lambda: udp_frame(payload),
            "icmp": lambda: icmp_frame(payload=payload)}[kind]() + padding
    broken = bytearray(good)
    broken[24:26] = struct.pack("!H", junk)                               # the IP header checksum
    where = {"tcp": 34 + 16, "udp": 34 + 6, "icmp": 34 + 2}[kind]
    broken[where:where + 2] = struct.pack("!H", junk ^ 0x1234)            # the transport checksum
    assert packet.fix_checksums(bytes(broken)) == good


def test_fix_checksums_leaves_other_frames():
    assert packet.fix_checksums(arp_frame()) == arp_frame()
    no_checksum = bytearray(udp_frame(b"x"))
    no_checksum[40:42] = b"\0\0"                                          # UDP without a checksum stays so
    assert packet.fix_checksums(bytes(no_checksum))[40:42] == b"\0\0"
    with pytest.raises(PacketError):
        packet.fix_checksums(MALFORMED["truncated ip header"])


def test_rewritten_segment_checksum_after_fill():
    frame = bytearray(tcp_frame(seq=5, payload=b"data"))
    p = parse(bytes(frame))
    struct.pack_into("!I", frame, 34 + 4, 123456789)
    packet.fill_tcp_checksum(frame, p)
    assert bytes(frame) == tcp_frame(seq=123456789, payload=b"data")
