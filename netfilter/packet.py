"""Ethernet frames parsed into what the COLO network layer needs (QEMU's net/colo.c), and
the Internet checksums (RFC 1071) to fix a frame after rewriting.  Pure functions, no I/O.

Layouts (all fields big-endian; offsets in bytes)::

    Ethernet        0            6            12      14
                    | dst MAC    | src MAC    | type  | payload ...
    802.1Q tag      type 0x8100 (or 0x88a8, QinQ) then TCI(2) then the real type: skipped

    IPv4            0       1     2            4        6             8     9      10       12    16    20
                    |ver|ihl| tos | total len  | ident  |flags|frag off| ttl | proto | cksum | src | dst | options...
                    ihl = header length / 4 (>= 5); flags: 0x4000 DF, 0x2000 MF; frag off in 8-byte units
                    bytes past ``total len`` are Ethernet padding and ignored

    TCP             0       2       4     8     12            13      14       16      18      20
                    | sport | dport | seq | ack |doff|reserved| flags | window | cksum | urgent | options...
                    doff = header length / 4 (>= 5); flags: FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20

    UDP             0       2       4        6       8
                    | sport | dport | length | cksum | payload   (length counts the header)

    ICMP            0      1      2       4       6       8
                    | type | code | cksum | ident | seq | payload   (ident/seq: echo request 8, reply 0)

    TCP/UDP checksum pseudo header: src(4) dst(4) zero(1) proto(1) segment length(2)

Fragments (MF set or a nonzero offset) are not parsed past the IP header: a non-first
fragment carries no transport header, and the comparer compares fragments whole.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import native

ETHERTYPE_IPV4 = 0x0800

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
IP_MF, IP_DF, IP_OFFSET_MASK = 0x2000, 0x4000, 0x1FFF

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8

UDP_HEADER = ICMP_HEADER = 8


class PacketError(ValueError):
    """A frame too short or inconsistent to parse.  ``flow_class`` is the class it was
    heading for when parsing stopped ("non-ip" when not even the IPv4 header was read)."""

    def __init__(self, reason: str, flow_class: str = "non-ip"):
        super().__init__(reason)
        self.reason = reason
        self.flow_class = flow_class


@dataclass(slots=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    header_length: int      # data offset * 4, options included
    flags: int
    window: int
    checksum: int
    payload: memoryview

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)


@dataclass(slots=True)
class Udp:
    sport: int
    dport: int
    length: int
    checksum: int
    payload: memoryview


@dataclass(slots=True)
class Icmp:
    type: int
    code: int
    checksum: int
    ident: int | None       # echo request/reply only
    sequence: int | None
    payload: memoryview


@dataclass(slots=True)
class Packet:
    """One parsed frame.  For a non-IPv4 frame only ``frame`` and ``ethertype`` are set."""
    frame: bytes
    ethertype: int
    ip_offset: int = 0              # where the IPv4 header starts (after the VLAN tags)
    ip_header_length: int = 0
    total_length: int = 0           # of the IP packet; the frame may be longer (padding)
    protocol: int = 0
    src: str = ""
    dst: str = ""
    ident: int = 0
    more_fragments: bool = False
    dont_fragment: bool = False
    fragment_offset: int = 0        # in bytes
    transport_offset: int = 0       # where the transport header starts in the frame
    tcp: Tcp | None = None
    udp: Udp | None = None
    icmp: Icmp | None = None

    @property
    def is_ipv4(self) -> bool:
        return self.ethertype == ETHERTYPE_IPV4

    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.fragment_offset != 0

    @property
    def ip_end(self) -> int:
        return self.ip_offset + self.total_length

    @property
    def ip_packet(self) -> memoryview:
        """The IP packet, header included, without Ethernet padding."""
        return memoryview(self.frame)[self.ip_offset:self.ip_end]

    @property
    def flow_class(self) -> str:
        """How the comparer treats it: "tcp", "udp", "icmp", "other" (other protocols and
        every fragment) or "non-ip"."""
        if not self.is_ipv4:
            return "non-ip"
        if self.tcp is not None:
            return "tcp"
        if self.udp is not None:
            return "udp"
        if self.icmp is not None:
            return "icmp"
        return "other"

    @property
    def key(self) -> tuple:
        """(protocol, (ip_a, port_a), (ip_b, port_b)), the same for both directions.  Ports are
        the ICMP echo ident for echoes, 0 for other ICMP, other protocols and fragments."""
        if self.tcp is not None:
            a, b = (self.src, self.tcp.sport), (self.dst, self.tcp.dport)
        elif self.udp is not None:
            a, b = (self.src, self.udp.sport), (self.dst, self.udp.dport)
        elif self.icmp is not None and self.icmp.ident is not None:
            a, b = (self.src, self.icmp.ident), (self.dst, self.icmp.ident)
        else:
            a, b = (self.src, 0), (self.dst, 0)
        return (self.protocol, a, b) if a <= b else (self.protocol, b, a)


def parse(frame: bytes) -> Packet:
    """The frame's headers; PacketError (never IndexError or struct.error) when malformed.
    Decoded by native.parse_headers (the reference says why a frame is malformed)."""
    frame = bytes(frame)
    try:
        headers = native.parse_headers(frame) or native.reference.parse_headers(frame)
    except ValueError as e:
        raise PacketError(*e.args) from None
    (ethertype, ip_offset, ihl, total_length, protocol, src, dst, ident, flags_offset, kind,
     t0, t1, t2, t3, t4, t5, t6, t7) = headers
    if ethertype != ETHERTYPE_IPV4:
        return Packet(frame, ethertype)
    start, end = ip_offset + ihl, ip_offset + total_length
    packet = Packet(frame, ethertype, ip_offset, ihl, total_length, protocol, src, dst, ident,
                    bool(flags_offset & IP_MF), bool(flags_offset & IP_DF), (flags_offset & IP_OFFSET_MASK) * 8,
                    start)
    if kind == IPPROTO_TCP:
        packet.tcp = Tcp(t0, t1, t2, t3, t4, t5, t6, t7, memoryview(frame)[start + t4:end])
    elif kind == IPPROTO_UDP:
        packet.udp = Udp(t0, t1, t2, t3, memoryview(frame)[start + UDP_HEADER:start + t2])
    elif kind == IPPROTO_ICMP:
        echo = t0 in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
        packet.icmp = Icmp(t0, t1, t2, t3 if echo else None, t4 if echo else None,
                           memoryview(frame)[start + ICMP_HEADER:end])
    return packet


# ---- checksums ----------------------------------------------------------------------

def _ones_complement_sum(*parts) -> int:
    """The 16-bit one's complement sum (RFC 1071) of ``parts`` laid end to end; every part
    but the last must have an even length.  As 2**16 = 1 (mod 0xFFFF), a big-endian number
    is congruent to the sum of its 16-bit words, so one big-integer remainder does the sum."""
    total = 0
    for part in parts:
        value = int.from_bytes(part, "big")
        total += value << 8 if len(part) % 2 else value      # an odd tail is padded with a zero byte
    if not total:
        return 0
    return total % 0xFFFF or 0xFFFF      # end-around carry never yields 0 for nonzero data


def internet_checksum(*parts) -> int:
    """RFC 1071 checksum of ``parts`` laid end to end (every part but the last of even length)."""
    return ~_ones_complement_sum(*parts) & 0xFFFF


def ipv4_header_checksum(header) -> int:
    """The checksum an IPv4 header should carry (its own checksum field counted as zero)."""
    header = memoryview(header)
    return internet_checksum(header[:10], header[12:])


def _pseudo_header(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, protocol, length)


def tcp_checksum(src: bytes, dst: bytes, segment) -> int:
    """The checksum a TCP segment (header and payload) from ``src`` to ``dst`` (4-byte
    addresses) should carry, over the pseudo header; its checksum field counts as zero."""
    segment = memoryview(segment)
    return internet_checksum(_pseudo_header(src, dst, IPPROTO_TCP, len(segment)), segment[:16], segment[18:])


def udp_checksum(src: bytes, dst: bytes, datagram) -> int:
    """As tcp_checksum for UDP; a computed 0 is sent as 0xFFFF (0 means "no checksum", RFC 768)."""
    datagram = memoryview(datagram)
    return internet_checksum(_pseudo_header(src, dst, IPPROTO_UDP, len(datagram)), datagram[:6],
                             datagram[8:]) or 0xFFFF


def fill_tcp_checksum(buf: bytearray, packet: Packet) -> None:
    """Writes the right TCP checksum into ``buf``, a copy of ``packet.frame`` whose TCP
    header or payload was changed (the IP header was not)."""
    start, end, ip = packet.transport_offset, packet.ip_end, packet.ip_offset
    value = tcp_checksum(bytes(buf[ip + 12:ip + 16]), bytes(buf[ip + 16:ip + 20]), memoryview(buf)[start:end])
    struct.pack_into("!H", buf, start + 16, value)


def fix_checksums(frame: bytes) -> bytes:
    """The frame with its IPv4 header checksum and its TCP, UDP (unless it had none) or
    ICMP checksum recomputed; a non-IPv4 frame or a fragment's transport is left as it is."""
    packet = parse(frame)
    if not packet.is_ipv4:
        return packet.frame
    buf = bytearray(packet.frame)
    ip, start, end = packet.ip_offset, packet.transport_offset, packet.ip_end
    struct.pack_into("!H", buf, ip + 10, ipv4_header_checksum(memoryview(buf)[ip:start]))
    src, dst = bytes(buf[ip + 12:ip + 16]), bytes(buf[ip + 16:ip + 20])
    if packet.tcp is not None:
        fill_tcp_checksum(buf, packet)
    elif packet.udp is not None and packet.udp.checksum:
        struct.pack_into("!H", buf, start + 6, udp_checksum(src, dst, memoryview(buf)[start:start + packet.udp.length]))
    elif packet.icmp is not None:
        message = memoryview(buf)[start:end]
        struct.pack_into("!H", buf, start + 2, internet_checksum(message[:2], message[4:]))
    return bytes(buf)
