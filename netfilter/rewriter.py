"""The COLO TCP rewriter (QEMU's net/filter-rewriter.c), on the secondary node.

Each guest picks its TCP initial sequence numbers (ISNs) from its own clock, so on a
connection opened since the last checkpoint the SVM's sequence numbers differ from the
PVM's by a fixed offset.  The peer only ever talks to the PVM (its frames are mirrored to
the SVM), so:

- ``to_guest(frame)``, a peer's frame on its way into the SVM: its acknowledgement number
  (and SACK blocks) count the PVM's bytes: ``ack -= offset``;
- ``from_guest(frame)``, the SVM's frame on its way to the comparer: ``seq += offset``, into
  the PVM's space, so the comparer can compare byte ranges.

The TCP checksum is recomputed after a rewrite (over the pseudo header; the IP header does
not change).  Non-TCP frames, IP fragments, malformed frames and untracked connections pass
unchanged (the same bytes object).

Learning the offset, the same rule whether the guest accepts or connects:

- the SVM's ISN is the sequence number of the first SYN the SVM sends on a connection (its
  SYN-ACK when it accepts, its SYN when it connects); that starts tracking the connection;
- the PVM's ISN is ``ack - 1`` of the first segment with ACK from the peer on a tracked
  connection whose offset is unknown: the client's handshake ACK when the guest accepts,
  the server's SYN-ACK when the guest connects, both acknowledging the PVM's SYN;
- ``offset = pvm_isn - svm_isn`` (mod 2**32).  Frames before that pass unchanged, the SVM's
  SYN among them (the comparer matches SYNs by their flags).

The peer cannot acknowledge the PVM's SYN before the SVM's SYN has passed here: the
comparer holds the PVM's SYN until the SVM's has reached it, through ``from_guest``.  A SYN
from the SVM with another ISN on a tracked connection (a new connection on the same ports)
starts learning again.  Unlike QEMU's rewriter, which rewrites pure ACK segments only,
every segment of a learned connection is rewritten (data with SYN, FIN or RST included).

Lifetime: ``checkpoint()`` forgets every connection: the SVM now has the PVM's TCP state,
an offset of 0 (QEMU's reset_seq_offset), and connections it opens later are learned
afresh.  ``failover()``: connections tracked so far go on being rewritten for as long as
they live, new ones are not tracked (QEMU's failover mode).  A connection closed by FIN
both ways or by an RST is forgotten ``close_linger_s`` later (retransmitted FINs and last
ACKs still need the rewrite), an idle one after ``idle_timeout_s``, both by
``scan_expired()``.

Pure logic, no threads, no I/O; one thread at a time may call a Rewriter's methods (the
wiring serialises the two directions), so nothing here takes a lock.

``PyRewriter`` is the reference; ``Rewriter`` is its C twin (native/colo_rewrite.c, the same
behaviour, usable without the GIL by the datapath loop) unless ``COLO_NATIVE=0``.
"""
from __future__ import annotations

import struct
import time
from typing import Callable

import native

from .packet import Packet, PacketError, fill_tcp_checksum, parse

SEQ_MASK = 0xFFFFFFFF
TCP_OPTION_END, TCP_OPTION_NOP, TCP_OPTION_SACK = 0, 1, 5


class _Tracked:
    """A connection the SVM opened (or accepted) since the last checkpoint."""

    def __init__(self, svm_isn: int, now: float):
        self.svm_isn = svm_isn
        self.offset: int | None = None          # pvm - svm, once learned
        self.guest_fin = False
        self.peer_fin = False
        self.closed_at: float | None = None
        self.last_seen = now


def _shift_sack_blocks(buf: bytearray, tcp_start: int, header_length: int, delta: int) -> None:
    """Subtracts ``delta`` from both edges of every SACK block (RFC 2018) in the options."""
    i, end = tcp_start + 20, tcp_start + header_length
    while i < end and buf[i] != TCP_OPTION_END:
        if buf[i] == TCP_OPTION_NOP:
            i += 1
            continue
        length = buf[i + 1] if i + 1 < end else 0
        if length < 2 or i + length > end:
            return                              # malformed options: leave the rest alone
        if buf[i] == TCP_OPTION_SACK:
            for block in range(i + 2, i + length - 7, 8):
                left, right = struct.unpack_from("!II", buf, block)
                struct.pack_into("!II", buf, block, (left - delta) & SEQ_MASK, (right - delta) & SEQ_MASK)
        i += length


class PyRewriter:
    """Moves the SVM's TCP sequence numbers into the PVM's space and back (module docstring)."""

    def __init__(self, *, idle_timeout_s: float = 3 * 3600, close_linger_s: float = 60,
                 clock: Callable[[], float] = time.monotonic):
        self.idle_timeout = idle_timeout_s      # longer than the usual 2 h keepalive time
        self.close_linger = close_linger_s      # about Linux's TIME_WAIT
        self._clock = clock
        self._connections: dict[tuple, _Tracked] = {}
        self.failed_over = False
        self._counters = {"to_guest": 0, "from_guest": 0, "learned": 0, "malformed": 0}

    @property
    def counters(self) -> dict[str, int]:
        """Frames rewritten each way, offsets learned, malformed frames passed, connections tracked."""
        return {**self._counters, "connections": len(self._connections)}

    def offset(self, key: tuple) -> int | None:
        """The learned offset of a connection (packet.Packet.key); None when unknown or untracked."""
        tracked = self._connections.get(key)
        return tracked.offset if tracked is not None else None

    def to_guest(self, frame: bytes) -> bytes:
        """A peer's frame for the SVM: ack (and SACK blocks) -= offset."""
        packet = self._parse_tcp(frame)
        if packet is None:
            return frame
        tcp = packet.tcp
        tracked = self._connections.get(packet.key)
        if tracked is None:
            return frame
        tracked.last_seen = self._clock()
        if tracked.offset is None and tcp.has_ack:
            tracked.offset = (tcp.ack - 1 - tracked.svm_isn) & SEQ_MASK
            self._counters["learned"] += 1
        tracked.peer_fin |= tcp.fin
        self._note_close(tracked, tcp.rst)
        if not tracked.offset:
            return frame
        buf = bytearray(packet.frame)
        start = packet.transport_offset
        if tcp.has_ack:
            struct.pack_into("!I", buf, start + 8, (tcp.ack - tracked.offset) & SEQ_MASK)
        _shift_sack_blocks(buf, start, tcp.header_length, tracked.offset)
        fill_tcp_checksum(buf, packet)
        self._counters["to_guest"] += 1
        return bytes(buf)

    def from_guest(self, frame: bytes) -> bytes:
        """An SVM frame for the comparer (or, after failover, the peer): seq += offset."""
        packet = self._parse_tcp(frame)
        if packet is None:
            return frame
        tcp, key = packet.tcp, packet.key
        tracked = self._connections.get(key)
        if tcp.syn and (tracked is None or tracked.svm_isn != tcp.seq):
            if self.failed_over:                # a new connection: not ours to rewrite
                self._connections.pop(key, None)
            else:
                self._connections[key] = _Tracked(tcp.seq, self._clock())
            return frame
        if tracked is None:
            return frame
        tracked.last_seen = self._clock()
        tracked.guest_fin |= tcp.fin
        self._note_close(tracked, tcp.rst)
        if not tracked.offset:
            return frame
        buf = bytearray(packet.frame)
        struct.pack_into("!I", buf, packet.transport_offset + 4, (tcp.seq + tracked.offset) & SEQ_MASK)
        fill_tcp_checksum(buf, packet)
        self._counters["from_guest"] += 1
        return bytes(buf)

    def _parse_tcp(self, frame: bytes) -> Packet | None:
        try:
            packet = parse(frame)
        except PacketError:
            self._counters["malformed"] += 1
            return None
        return packet if packet.tcp is not None else None

    def _note_close(self, tracked: _Tracked, rst: bool) -> None:
        if tracked.closed_at is None and (rst or (tracked.guest_fin and tracked.peer_fin)):
            tracked.closed_at = self._clock()

    def scan_expired(self) -> int:
        """Forgets connections closed ``close_linger_s`` ago or idle ``idle_timeout_s``; how many."""
        now = self._clock()
        expired = [key for key, t in self._connections.items()
                   if (t.closed_at is not None and now - t.closed_at >= self.close_linger)
                   or now - t.last_seen >= self.idle_timeout]
        for key in expired:
            del self._connections[key]
        return len(expired)

    def checkpoint(self) -> None:
        """The SVM now has the PVM's TCP state: every offset is 0, so nothing is tracked."""
        self._connections.clear()

    def failover(self) -> None:
        """The SVM serves alone now: tracked connections keep their offsets, new ones get none."""
        self.failed_over = True


Rewriter = native.Rewriter if native.IMPLEMENTATION == "native" else PyRewriter
