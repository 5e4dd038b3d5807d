"""The COLO checkpoint transaction on the migration connection (QEMU's migration/colo.c).

Once the initial copy is done both sides keep the connection.  Every step is a
COLO record of the stream format (replication/stream.py): type byte 9, then
QEMU's ``COLOMessage`` value as a big-endian u32 (vmstate-size adds a
big-endian u64).  Pages travel as the stream's usual page records, into the
secondary's colo cache, never straight into the SVM's RAM::

    primary (PVM)                                   secondary (SVM)
      |  <----------- COLO_HELLO (heartbeat, packet ports)  entering COLO
      |  <----------- checkpoint-ready (0) ----------   |
      |  ------------ COLO_HELLO (heartbeat port) --->  |
      |  ------------ packet channel connect -------->  |  (guests with a NIC: netfilter/)
      |                                                 |
      |  ... PVM runs; a trigger: x-checkpoint-delay,   |
      |      a request (netfilter, xen-colo-do-checkpoint)
      |  ------------ pages dirtied so far, PASS_END -> |  live: into the cache
      |  ------------ checkpoint-request (1) -------->  |  SVM stops (run state colo)
      |  <----------- checkpoint-reply (2) ----------   |
      |  PVM stops (colo)                               |
      |  ------------ vmstate-send (3) -------------->  |
      |  ------------ pages dirtied since, PASS_END -> |  into the cache
      |  ------------ vmstate-size (4) + u64 N ------>  |
      |  ------------ N bytes: DEVICE records, END --> |  digests checked
      |  <----------- vmstate-received (5) ----------   |  network layer: checkpoint (drop
      |  network layer: checkpoint (release held         |  stale frames); cache -> SVM RAM
      |  PVM frames, drop SVM frames)                    |  (pages the PVM or the SVM dirtied),
      |                                                 |  devices
      |  <----------- vmstate-loaded (6) ------------   |
      |  PVM runs                                       |  SVM runs
      |                                                 |
      |  ------------ ABORT (planned exit) ---------->  |  SVM stops, no takeover

The PVM's pause runs from "PVM stops" to "PVM runs".  A checkpoint whose
vmstate-received was never sent is incomplete: the secondary discards it (the
cache is refilled at the next one, the SVM's RAM was never touched).
"""
from __future__ import annotations

import enum

from replication import stream

from . import faults


class ColoMessage(enum.IntEnum):
    """QEMU's COLOMessage (qapi/migration.json), values as on the wire."""
    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6

    @property
    def wire_name(self) -> str:
        return self.name.lower().replace("_", "-")


class ColoMode(str, enum.Enum):
    NONE = "none"
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ExitReason(str, enum.Enum):
    NONE = "none"
    REQUEST = "request"
    ERROR = "error"
    PROCESSING = "processing"


MAX_VMSTATE_SIZE = 256 << 20      # device sections and END of one checkpoint


class ColoProtocolError(Exception):
    """The peer broke the transaction; the message says how."""


class PeerExited(ColoProtocolError):
    """The primary left COLO on purpose (a planned exit): the secondary must not take over."""


def send(channel, message: ColoMessage, size: int | None = None) -> None:
    channel.send(stream.pack_colo(message, size))


class Steps:
    """One side's view of the transaction: each message sent or awaited passes the fault
    injection points (faults.py) before and after it."""

    def __init__(self, side: str, channel):
        self.side = side
        self.channel = channel
        self.checkpoint = 0

    def send(self, message: ColoMessage, size: int | None = None) -> None:
        faults.point(self.side, "before", message.wire_name, self.checkpoint)
        send(self.channel, message, size)
        faults.point(self.side, "after", message.wire_name, self.checkpoint)

    def expect(self, message: ColoMessage, first_byte: int | None = None) -> int | None:
        faults.point(self.side, "before", message.wire_name, self.checkpoint)
        size = expect(self.channel, message, first_byte)
        faults.point(self.side, "after", message.wire_name, self.checkpoint)
        return size

    def send_vmstate(self, vmstate: bytes) -> None:
        """The vmstate after vmstate-size; "during" falls in its middle."""
        half = len(vmstate) // 2
        self.channel.send(vmstate[:half])
        faults.point(self.side, "during", "vmstate", self.checkpoint)
        self.channel.send(vmstate[half:])


def read_message(channel, first_byte: int | None = None) -> tuple[ColoMessage, int | None]:
    """The next COLO record (its type byte already read when ``first_byte`` is given)."""
    kind = channel.read_exact(1)[0] if first_byte is None else first_byte
    if kind == stream.ABORT:
        raise PeerExited(stream.read_abort(channel))
    if kind != stream.COLO:
        raise ColoProtocolError(f"expected a COLO message, got record type {kind}")
    value, size = stream.read_colo(channel, lambda v: v == ColoMessage.VMSTATE_SIZE)
    try:
        return ColoMessage(value), size
    except ValueError:
        raise ColoProtocolError(f"unknown COLO message {value}") from None


def expect(channel, wanted: ColoMessage, first_byte: int | None = None) -> int | None:
    """Read one COLO message, which must be ``wanted``; returns its size (vmstate-size only)."""
    message, size = read_message(channel, first_byte)
    if message is not wanted:
        raise ColoProtocolError(f"expected COLO message {wanted.wire_name}, got {message.wire_name}")
    return size


def read_hello(channel) -> tuple[int, int, bytes | None]:
    """(heartbeat port, packet channel port or 0, heartbeat key: on a TLS connection only)."""
    kind = channel.read_exact(1)[0]
    if kind != stream.COLO_HELLO:
        raise ColoProtocolError(f"expected COLO_HELLO, got record type {kind}")
    return stream.read_colo_hello(channel, keyed=channel.tls is not None)
