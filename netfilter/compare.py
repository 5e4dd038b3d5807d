"""The COLO packet comparer (QEMU's net/colo-compare.c): the primary guest's (PVM's) output
is held until the secondary guest (SVM) has produced the same; what differs, or waits too
long, asks for a checkpoint, after which both guests are equal and everything held goes out.

Pure logic: no threads, no I/O.  ``release`` and ``request_checkpoint`` are called from
inside the methods.  One thread at a time may call a Comparer's methods (the wiring's
comparer thread does), so nothing here takes a lock.

Frames are classed "tcp", "udp", "icmp", "other" (other IP protocols and every IP
fragment) and "non-ip" (ARP, IPv6, ...: QEMU compares IPv4 only), and queued per
connection (packet.Packet.key).

- **Not compared.**  A primary frame that is not IPv4, or cannot be parsed (counted
  "malformed"), or is on a passthrough (protocol "tcp" or "udp", and either port), or
  arrives after failover, is released at once, as QEMU sends what parse_packet_early
  rejects.  Such secondary frames are dropped.
- **UDP, ICMP** (colo_packet_compare_udp/icmp): the transport header but its checksum, and
  the payload, must be equal; **other**: the whole IP packet (colo_packet_compare_other).
  As colo_compare_packet: each held primary frame, oldest first, is matched against any
  queued secondary frame of its connection; a primary frame that matches none while
  secondary frames are queued is a mismatch.
- **TCP**: see ``_TcpConnection``; the secondary's sequence numbers arrive already in the
  PVM's space (the rewriter on the secondary node moved them).
- **Order**: a connection's frames leave in the order the PVM sent them (a TCP retransmit
  of bytes compared before excepted: it leaves at once).
- **Mismatch**: ``request_checkpoint("mismatch")``, counted once; the connection is then
  not compared again until the checkpoint (its frames stay queued), as both guests will be
  made equal anyway.
- **Timeouts** (colo_old_packet_check): ``scan_expired()`` asks for a checkpoint (reason
  "mismatch", as QEMU's notifier has only that one) when any primary or secondary frame has
  been queued longer than ``compare_timeout_ms``; each such frame counts one timeout.
- **Queue bound**: at most ``max_queue_size`` frames per connection and side.  A frame
  beyond it is dropped (QEMU's colo_insert_packet) and counted; a dropped primary frame
  also asks for a checkpoint, which releases the held ones (TCP retransmits the dropped
  segment; UDP may lose it, as any network may).
- **checkpoint()**: every held primary frame goes out in arrival order, every secondary
  frame is dropped, and comparison starts afresh (colo_flush_packets).  **failover()**: the
  same, then nothing is compared any more.
"""
from __future__ import annotations

import bisect
import itertools
import time
from typing import Callable

import native

from .packet import ACK, RST, SYN, Packet, PacketError, parse

FLOW_CLASSES = ("tcp", "udp", "icmp", "other", "non-ip")
COUNTERS = ("primary", "secondary", "released", "matched", "mismatches", "timeouts", "dropped", "malformed")
PROTOCOL_NAMES = {6: "tcp", 17: "udp"}
SEQ_MASK = 0xFFFFFFFF


def _seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number (RFC 793 modular comparison)."""
    return (a - b + 0x80000000) % 0x100000000 - 0x80000000


def _seq_max(a: int | None, b: int) -> int:
    return b if a is None or _seq_diff(b, a) > 0 else a


def _datagram_content(packet: Packet) -> bytes:
    """What must be equal: UDP and ICMP from the transport header on, but the checksum
    (equal payloads between the same addresses give equal checksums); otherwise the whole
    IP packet."""
    frame, start, end = packet.frame, packet.transport_offset, packet.ip_end
    if packet.udp is not None:
        return frame[start:start + 6] + frame[start + 8:end]
    if packet.icmp is not None:
        return frame[start:start + 2] + frame[start + 4:end]
    return bytes(packet.ip_packet)


class _Held:
    """A queued frame and what comparing it needs."""

    def __init__(self, packet: Packet, arrived: float, order: int):
        self.packet = packet
        self.arrived = arrived
        self.order = order              # global arrival number: the order of release at a checkpoint
        self.timed_out = False          # counted as a timeout already
        self.matched = False            # a SYN or RST whose counterpart was found
        self.retransmit = False         # TCP: its content was verified before it arrived
        self.used = False               # a secondary segment that took part in a comparison
        tcp = packet.tcp
        if tcp is None:
            self.content = _datagram_content(packet)
            return
        # TCP: the sequence range; SYN and FIN take one position each, an RST none.
        self.control = tcp.flags & (SYN | RST)
        self.stream = not self.control and (len(tcp.payload) > 0 or tcp.fin)  # data or FIN to compare
        self.seq = tcp.seq
        self.data_end = (tcp.seq + len(tcp.payload)) & SEQ_MASK
        if tcp.syn:
            self.end = (self.data_end + 1) & SEQ_MASK
        elif tcp.rst:
            self.end = tcp.seq
        else:
            self.end = (self.data_end + tcp.fin) & SEQ_MASK

    @property
    def frame(self) -> bytes:
        return self.packet.frame


class _DatagramConnection:
    """UDP, ICMP and other protocols: whole packets, matched one for one."""

    def __init__(self, flow: str):
        self.flow = flow
        self.primary: list[_Held] = []          # in arrival order
        self.secondary: list[_Held] = []
        self.diverged = False

    def secondary_frames(self) -> list[_Held]:
        return self.secondary

    def clear(self) -> None:
        self.primary, self.secondary = [], []


class _Segments:
    """One guest's data and FIN segments on a connection that reach past ``base``, sorted by
    sequence number: comparing only ever looks at the first one."""

    def __init__(self):
        self.items: list[_Held] = []

    def add(self, held: _Held, base: int | None) -> None:
        origin = base if base is not None else (self.items[0].seq if self.items else held.seq)
        bisect.insort(self.items, held, key=lambda h: _seq_diff(h.seq, origin))

    def covering(self, base: int) -> tuple[_Held | None, list[_Held]]:
        """The first segment if it covers ``base``, and those dropped for lying wholly behind it."""
        behind = []
        while self.items and _seq_diff(self.items[0].end, base) <= 0:
            behind.append(self.items.pop(0))
        head = self.items[0] if self.items and _seq_diff(self.items[0].seq, base) <= 0 else None
        return head, behind


class _TcpConnection:
    """The byte stream one guest sends on a connection, compared by sequence ranges.

    ``base`` is the stream position (PVM sequence space) up to which the secondary's bytes
    have been found equal to the primary's; SYN and FIN each occupy one position, as in TCP.
    The primary segment covering ``base`` and the secondary one covering it are compared
    over their common range, and ``base`` moves past it: segments split or coalesced
    differently by the two guests, partial overlaps and out-of-order arrival all compare the
    same stream.  Differing bytes, or a FIN at ``base`` on one side against data on the
    other, are a mismatch.

    A primary frame is ready when both hold:

    - its content is verified: data and FIN end at or before ``base`` (so a retransmit of
      bytes compared before is ready on arrival); a SYN was matched by a secondary SYN with
      the same SYN/ACK flags and payload (at any sequence number: the SVM's ISN is learned
      by the rewriter only after the handshake, and QEMU's rewriter leaves SYNs alone too),
      or repeats the matched SYN; an RST was matched by a secondary RST at the same sequence
      number; a segment with none of these (a bare ACK, a window update, a keepalive) needs
      nothing more;
    - its acknowledgement number, when ACK is set, is not after the highest one the
      secondary has sent on the connection (QEMU's rule in colo_compare_tcp: the client must
      not learn that data arrived which the SVM has not received, or a failover loses it).

    Ready frames leave from the head of the connection's queue, so they go out in the order
    the PVM sent them.  ``base`` is learned from the matched SYN (the ISN + 1), else from
    the first non-SYN primary segment of a connection met mid-stream (older than the
    comparer, or forgotten when idle through a checkpoint interval).  At a checkpoint it
    moves to the end of all the primary has sent, and the secondary's acknowledgement to
    the primary's: the SVM now has the PVM's TCP state.
    """

    flow = "tcp"

    def __init__(self):
        self.primary: list[_Held] = []              # every held primary frame, in arrival order
        self.unverified = _Segments()               # the primary's data and FIN segments past base
        self.primary_controls: list[_Held] = []     # the primary's SYNs and RSTs not matched yet
        self.secondary_stream = _Segments()
        self.secondary_controls: list[_Held] = []   # bare ACKs are not kept: their ack number is all they bring
        self.diverged = False
        self.base: int | None = None
        self.syn_seq: int | None = None             # the PVM's matched SYN: a SYN there is a retransmit
        self.secondary_syn_seq: int | None = None   # the SVM's, as it arrived
        self.secondary_acked: int | None = None     # the highest ack the secondary sent
        self.primary_end: int | None = None         # the end of all the primary has sent
        self.primary_acked: int | None = None
        self.primary_syn_seq: int | None = None     # the primary's last SYN, matched or not

    def secondary_frames(self) -> list[_Held]:
        return self.secondary_stream.items + self.secondary_controls

    def clear(self) -> None:
        self.primary, self.primary_controls, self.secondary_controls = [], [], []
        self.unverified, self.secondary_stream = _Segments(), _Segments()


class PyComparer:
    """Holds the PVM's frames until the SVM's match (module docstring).  The reference for
    native.Comparer, its C twin (native/colo_compare.c), which ``Comparer`` names when the
    extension is in use."""

    def __init__(self, release: Callable[[bytes], None], request_checkpoint: Callable[[str], None], *,
                 compare_timeout_ms: int = 3000, max_queue_size: int = 1024,
                 passthrough: list[tuple[str, int]] = (), clock: Callable[[], float] = time.monotonic):
        if compare_timeout_ms <= 0 or max_queue_size <= 0:
            raise ValueError("compare_timeout_ms and max_queue_size must be positive")
        self._release = release
        self._request_checkpoint = request_checkpoint
        self.compare_timeout = compare_timeout_ms / 1000
        self.max_queue_size = max_queue_size
        self.passthrough = {(protocol.lower(), port) for protocol, port in passthrough}
        if any(protocol not in PROTOCOL_NAMES.values() for protocol, _port in self.passthrough):
            raise ValueError(f"passthrough protocols are tcp or udp, not {sorted(self.passthrough)}")
        self._clock = clock
        # Keyed by (flow class, Packet.key): a port-0 TCP segment and a TCP fragment never share one.
        self._connections: dict[tuple, _TcpConnection | _DatagramConnection] = {}
        self._active: set[tuple] = set()        # connections with a frame since the last checkpoint
        self._order = itertools.count()
        self.failed_over = False
        self._counters = {flow: dict.fromkeys(COUNTERS, 0) for flow in FLOW_CLASSES}

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Per flow class, a copy: frames in from each side, released, released because they
        matched, mismatches, timeouts, dropped (secondary frames not used for a match, primary
        frames beyond the queue bound), malformed."""
        return {flow: dict(values) for flow, values in self._counters.items()}

    @property
    def held(self) -> int:
        """Primary frames held now."""
        return sum(len(conn.primary) for conn in self._connections.values())

    # -- input ---------------------------------------------------------------------------

    def primary(self, frame: bytes) -> None:
        """A frame the PVM sent: released now, or held until it is matched or a checkpoint."""
        packet, flow = self._parse(frame, "primary")
        if packet is None or flow == "non-ip" or self.failed_over or self._passes_through(packet):
            self._send(frame, flow)
            return
        conn = self._connection(packet, flow)
        held = _Held(packet, self._clock(), next(self._order))
        if flow == "tcp":
            self._tcp_primary(conn, held)
        elif self._hold(conn, held):
            self._compare_datagrams(conn)

    def _hold(self, conn: _TcpConnection | _DatagramConnection, held: _Held) -> bool:
        """Queues a primary frame; beyond the bound, drops it and asks for a checkpoint."""
        if len(conn.primary) >= self.max_queue_size:
            self._counters[conn.flow]["dropped"] += 1
            self._request_checkpoint("mismatch")
            return False
        conn.primary.append(held)
        return True

    def secondary(self, frame: bytes) -> None:
        """A frame the SVM sent (TCP sequence numbers already in the PVM's space): used for
        comparison, never sent."""
        packet, flow = self._parse(frame, "secondary")
        if packet is None or flow == "non-ip" or self.failed_over or self._passes_through(packet):
            self._counters[flow]["dropped"] += 1
            return
        conn = self._connection(packet, flow)
        if flow == "tcp":
            self._tcp_secondary(conn, packet)
        elif len(conn.secondary) >= self.max_queue_size:
            self._counters[flow]["dropped"] += 1
        else:
            conn.secondary.append(_Held(packet, self._clock(), next(self._order)))
            self._compare_datagrams(conn)

    def _parse(self, frame: bytes, side: str) -> tuple[Packet | None, str]:
        try:
            packet = parse(frame)
        except PacketError as e:
            self._counters[e.flow_class][side] += 1
            self._counters[e.flow_class]["malformed"] += 1
            return None, e.flow_class
        flow = packet.flow_class
        self._counters[flow][side] += 1
        return packet, flow

    def _passes_through(self, packet: Packet) -> bool:
        transport = packet.tcp or packet.udp
        if transport is None or not self.passthrough:
            return False
        protocol = PROTOCOL_NAMES[packet.protocol]
        return (protocol, transport.sport) in self.passthrough or (protocol, transport.dport) in self.passthrough

    def _connection(self, packet: Packet, flow: str) -> _TcpConnection | _DatagramConnection:
        key = (flow, packet.key)
        self._active.add(key)
        conn = self._connections.get(key)
        if conn is None:
            conn = self._connections[key] = _TcpConnection() if flow == "tcp" else _DatagramConnection(flow)
        return conn

    def _send(self, frame: bytes, flow: str, matched: bool = False) -> None:
        self._counters[flow]["released"] += 1
        self._counters[flow]["matched"] += matched
        self._release(frame)

    def _mismatch(self, conn: _TcpConnection | _DatagramConnection) -> None:
        conn.diverged = True
        self._counters[conn.flow]["mismatches"] += 1
        self._request_checkpoint("mismatch")

    # -- UDP, ICMP, other ----------------------------------------------------------------

    def _compare_datagrams(self, conn: _DatagramConnection) -> None:
        """QEMU's colo_compare_packet: the oldest primary frame against any secondary one."""
        while conn.primary and conn.secondary and not conn.diverged:
            held = conn.primary[0]
            match = next((s for s in conn.secondary if s.content == held.content), None)
            if match is None:
                self._mismatch(conn)
                return
            conn.secondary.remove(match)
            del conn.primary[0]
            self._send(held.frame, conn.flow, matched=True)

    # -- TCP -----------------------------------------------------------------------------

    def _tcp_primary(self, conn: _TcpConnection, held: _Held) -> None:
        tcp = held.packet.tcp
        if tcp.syn:
            conn.primary_syn_seq = tcp.seq
            held.retransmit = tcp.seq == conn.syn_seq
        elif not tcp.rst:
            if conn.base is None:
                conn.base = held.seq
            held.retransmit = held.stream and _seq_diff(held.end, conn.base) <= 0
        conn.primary_end = _seq_max(conn.primary_end, held.end)
        if tcp.has_ack:
            conn.primary_acked = _seq_max(conn.primary_acked, tcp.ack)
        if held.retransmit and self._tcp_ready(conn, held):
            self._send(held.frame, "tcp")             # compared before: out at once, ahead of the queue
            return
        if not self._hold(conn, held):
            return
        if held.control and not held.retransmit:
            conn.primary_controls.append(held)
        elif held.stream and not held.retransmit:
            conn.unverified.add(held, conn.base)
        self._compare_tcp(conn)

    def _tcp_secondary(self, conn: _TcpConnection, packet: Packet) -> None:
        tcp = packet.tcp
        if tcp.has_ack:
            conn.secondary_acked = _seq_max(conn.secondary_acked, tcp.ack)
        held = _Held(packet, self._clock(), next(self._order))
        if held.stream or held.control:
            if tcp.syn:
                stale = tcp.seq in (conn.syn_seq, conn.secondary_syn_seq)      # the SYN matched before
            else:
                stale = held.stream and conn.base is not None and _seq_diff(held.end, conn.base) <= 0
            if stale or len(conn.secondary_stream.items) + len(conn.secondary_controls) >= self.max_queue_size:
                self._counters["tcp"]["dropped"] += 1
            elif held.stream:
                conn.secondary_stream.add(held, conn.base)
            else:
                conn.secondary_controls.append(held)
        self._compare_tcp(conn)

    def _compare_tcp(self, conn: _TcpConnection) -> None:
        if not conn.diverged:
            self._match_tcp_controls(conn)
        if not conn.diverged:
            self._compare_tcp_stream(conn)
        released = 0
        for held in conn.primary:
            if not self._tcp_ready(conn, held):
                break
            self._send(held.frame, "tcp", matched=not held.retransmit)
            released += 1
        del conn.primary[:released]

    def _match_tcp_controls(self, conn: _TcpConnection) -> None:
        """SYNs by flags and payload, RSTs by sequence number (class docstring)."""
        for held in list(conn.primary_controls):
            candidates = [s for s in conn.secondary_controls if s.control == held.control]
            if not candidates:
                continue
            tcp = held.packet.tcp
            if tcp.syn:
                secondary = candidates[0]
                if secondary.packet.tcp.flags & ACK != tcp.flags & ACK or secondary.packet.tcp.payload != tcp.payload:
                    self._mismatch(conn)
                    return
                conn.syn_seq, conn.secondary_syn_seq = tcp.seq, secondary.seq
                conn.base = held.end
            else:
                secondary = next((s for s in candidates if s.seq == tcp.seq), None)
                if secondary is None:
                    self._mismatch(conn)
                    return
            conn.secondary_controls.remove(secondary)
            conn.primary_controls.remove(held)
            held.matched = True

    def _compare_tcp_stream(self, conn: _TcpConnection) -> None:
        """Moves ``base`` over what both guests have sent equal (class docstring)."""
        while conn.base is not None:
            base = conn.base
            primary, _verified = conn.unverified.covering(base)
            secondary, behind = conn.secondary_stream.covering(base)
            self._counters["tcp"]["dropped"] += sum(not s.used for s in behind)
            if primary is None or secondary is None:
                return
            secondary.used = True
            primary_fin, secondary_fin = base == primary.data_end, base == secondary.data_end
            if primary_fin or secondary_fin:            # the position at base is a FIN
                if primary_fin != secondary_fin:
                    self._mismatch(conn)
                    return
                conn.base = (base + 1) & SEQ_MASK
                continue
            length = min(_seq_diff(primary.data_end, base), _seq_diff(secondary.data_end, base))
            p_from, s_from = _seq_diff(base, primary.seq), _seq_diff(base, secondary.seq)
            ours = primary.packet.tcp.payload[p_from:p_from + length]
            theirs = secondary.packet.tcp.payload[s_from:s_from + length]
            if native.equal_prefix(ours, theirs) != length:
                self._mismatch(conn)
                return
            conn.base = (base + length) & SEQ_MASK

    @staticmethod
    def _tcp_ready(conn: _TcpConnection, held: _Held) -> bool:
        tcp = held.packet.tcp
        if tcp.has_ack and (conn.secondary_acked is None or _seq_diff(tcp.ack, conn.secondary_acked) > 0):
            return False
        if held.control:
            return held.matched or held.retransmit
        if held.stream:
            return _seq_diff(held.end, conn.base) <= 0
        return True

    # -- time, checkpoints, failover -----------------------------------------------------

    def scan_expired(self) -> bool:
        """QEMU's colo_old_packet_check: asks for a checkpoint when a frame has waited longer
        than the compare timeout; True when it asked."""
        deadline = self._clock() - self.compare_timeout
        expired = False
        for conn in self._connections.values():
            for held in itertools.chain(conn.primary, conn.secondary_frames()):
                if held.arrived < deadline:
                    expired = True
                    if not held.timed_out:
                        held.timed_out = True
                        self._counters[conn.flow]["timeouts"] += 1
        if expired:
            self._request_checkpoint("mismatch")
        return expired

    def checkpoint(self) -> None:
        """Both guests are equal now: everything held goes out in arrival order, secondary
        frames are dropped, comparison starts afresh.  Connections without a frame since the
        previous checkpoint, and every non-TCP one (they keep no state), are forgotten."""
        self._flush()
        for key in list(self._connections):
            conn = self._connections[key]
            if key not in self._active or conn.flow != "tcp":
                del self._connections[key]
                continue
            conn.diverged = False
            if conn.primary_end is not None:
                conn.base = _seq_max(conn.base, conn.primary_end)
            if conn.primary_acked is not None:
                conn.secondary_acked = _seq_max(conn.secondary_acked, conn.primary_acked)
            if conn.primary_syn_seq is not None:       # the SVM's SYN is the PVM's from now on
                conn.syn_seq = conn.secondary_syn_seq = conn.primary_syn_seq
        self._active.clear()

    def failover(self) -> None:
        """COLO is over: everything held goes out, and later primary frames pass unchecked."""
        self._flush()
        self._connections.clear()
        self._active.clear()
        self.failed_over = True

    def _flush(self) -> None:
        held = []
        for conn in self._connections.values():
            held += [(h.order, h.frame, conn.flow) for h in conn.primary]
            self._counters[conn.flow]["dropped"] += len(conn.secondary_frames())
            conn.clear()
        for _order, frame, flow in sorted(held, key=lambda item: item[0]):
            self._send(frame, flow)


Comparer = native.Comparer if native.IMPLEMENTATION == "native" else PyComparer
