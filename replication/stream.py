"""The migration stream format (version 2), also drawn in docs/stream-format.md.

All integers are little-endian.  A stream is a header, records, and an end
record carrying the digest of the guest's RAM::

    header   "COLOMIG\\0" (8)  version u32  flags u32  uuid (16)  page_size u32
             ram_size u64  channels u8                       (45 bytes)
    record   type u8, then by type:
      PAGES        count u32, count x page u64, count x page_size bytes     normal pages
      ZERO_RUN     first u64, count u32                                     zero pages
      XBZRLE       page u64, length u32, length bytes                       delta vs the last sent copy
      COMPRESSED   codec u8, count u32, count x page u64, length u32, bytes  normal pages, compressed
                   (codec 1 zlib, 2 zstd)
      PASS_END     pass u32                                                 end of a dirty-sync pass
      DEVICE       name_len u16, name, version u32, length u32, payload      one device state section
      END          ram digest (32), devices digest (32)                     see below
      ABORT        length u16, utf-8 message                                the source gave up
      COLO         message u32 BIG-endian (QEMU's COLOMessage value),       a COLO transaction step
                   then for vmstate-size only: size u64 big-endian          (either direction)
      COLO_HELLO   heartbeat port u16, packet channel port u16 (0: none),   each side, entering COLO
                   [heartbeat key (32): only on a TLS connection]          (colo/heartbeat.py)
    reply    (destination -> source, on the same connection when it is two-way)
             status u8 (0 ok, 1 failed), length u16, utf-8 message
             sent twice on a main channel: after the header (admitted or refused; version 2),
             and after END (the verdict); once after each multifd channel's header

A multifd channel starts with the same header (its ``channels`` byte holding
its channel number) and carries PAGES/ZERO_RUN/COMPRESSED and PASS_END only;
the main channel carries everything else.  The destination applies pass N+1
on any channel only after every channel has finished pass N, so a newer copy
of a page never loses to an older one.

The RAM digest is blake3 over the concatenation of the blake3 digests of each
2 MiB chunk of RAM (a two-level hash, so either side can keep chunk digests
current as pages change and rehash only what changed; an all-zero chunk has a
known digest and is never hashed).  The devices digest is blake3 over the DEVICE
records as sent.  The destination loads the devices and resumes the guest
only when both digests equal its own.

That digest is kept current through the dirty log, so a page the log missed
would pass unseen.  With FLAG_VERIFY_RAM every END is followed by a second
32-byte digest, of the same two-level form, computed from scratch over ALL of
the sender's RAM while its guest is stopped; the receiver hashes all of its
guest's RAM the same way after loading and refuses a mismatch.

A COLO stream (FLAG_COLO) goes on after the first END: the connection stays
open and carries checkpoints (colo/protocol.py draws the transaction).
"""
from __future__ import annotations

import struct
import uuid as uuidlib

import blake3

MAGIC = b"COLOMIG\0"
VERSION = 2
HEADER = struct.Struct("<8sII16sIQB")

PAGES, ZERO_RUN, XBZRLE, COMPRESSED, PASS_END, DEVICE, END, ABORT, COLO, COLO_HELLO = range(1, 11)
RECORD_NAMES = {PAGES: "PAGES", ZERO_RUN: "ZERO_RUN", XBZRLE: "XBZRLE", COMPRESSED: "COMPRESSED",
                PASS_END: "PASS_END", DEVICE: "DEVICE", END: "END", ABORT: "ABORT", COLO: "COLO",
                COLO_HELLO: "COLO_HELLO"}

CODEC_ZLIB, CODEC_ZSTD = 1, 2

FLAG_XBZRLE = 1 << 0
FLAG_COMPRESS = 1 << 1
FLAG_MULTIFD = 1 << 2
FLAG_COLO = 1 << 3              # the source enters COLO after the initial copy
FLAG_VERIFY_RAM = 1 << 4        # END records are followed by a digest of ALL guest RAM (see below)
FLAG_VALIDATE_UUID = 1 << 5     # the receiver must refuse a stream for another VM's uuid (validate-uuid)
KNOWN_FLAGS = FLAG_XBZRLE | FLAG_COMPRESS | FLAG_MULTIFD | FLAG_COLO | FLAG_VERIFY_RAM | FLAG_VALIDATE_UUID

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
BE_U32 = struct.Struct(">I")
BE_U64 = struct.Struct(">Q")
ZERO_RUN_BODY = struct.Struct("<QI")
XBZRLE_HEAD = struct.Struct("<QI")
DEVICE_TAIL = struct.Struct("<II")
REPLY_HEAD = struct.Struct("<BH")
DIGEST_SIZE = 32
MAX_BATCH_PAGES = 1024          # pages in one PAGES/COMPRESSED record
FINAL_PASS = 0xFFFFFFFF         # PASS_END of the stop-and-copy pass
MAX_DEVICE_PAYLOAD = 64 << 20


class StreamError(Exception):
    """A stream the destination refuses; the message says what was wrong."""


class Header:
    def __init__(self, flags: int, vm_uuid: str, page_size: int, ram_size: int, channels: int):
        self.flags = flags
        self.vm_uuid = vm_uuid
        self.page_size = page_size
        self.ram_size = ram_size
        self.channels = channels

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.flags, uuidlib.UUID(self.vm_uuid).bytes, self.page_size,
                           self.ram_size, self.channels)

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        magic, version, flags, raw_uuid, page_size, ram_size, channels = HEADER.unpack(data)
        if magic != MAGIC:
            raise StreamError("not a colo-appliance migration stream (bad magic)")
        if version != VERSION:
            raise StreamError(f"unsupported migration stream version {version} (this node reads {VERSION})")
        if page_size not in (4096,):
            raise StreamError(f"unsupported page size {page_size}")
        return cls(flags, str(uuidlib.UUID(bytes=raw_uuid)), page_size, ram_size, channels)


# -- records: each one's pack and read, side by side -----------------------------------------
# A reader is anything with read_exact(n) -> bytes (a Channel, or BytesReader over a buffer).
# Each read_* takes the record's body: its type byte is already read.

class BytesReader:
    """read_exact over a buffer: a record sequence that arrived whole (a COLO checkpoint's vmstate)."""

    def __init__(self, data):
        self.data = memoryview(data)
        self.pos = 0

    def read_exact(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamError(f"a record runs past the end of its {len(self.data)}-byte buffer")
        chunk = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return chunk

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _message(reader) -> str:
    return reader.read_exact(U16.unpack(reader.read_exact(2))[0]).decode(errors="replace")


def _utf8(message: str) -> bytes:
    data = message.encode()[:65535]
    return U16.pack(len(data)) + data


def pack_page_index(kind: int, pages, codec: int | None = None) -> bytes:
    """A PAGES or COMPRESSED record up to its data: type, [codec,] count, the page numbers."""
    head = bytes([kind]) if codec is None else bytes([kind, codec])
    return head + U32.pack(len(pages)) + b"".join(U64.pack(p) for p in pages)


def read_page_index(reader) -> list[int]:
    count = U32.unpack(reader.read_exact(4))[0]
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise StreamError(f"a record of {count} pages")
    return [p for (p,) in U64.iter_unpack(reader.read_exact(8 * count))]


def pack_compressed_length(length: int) -> bytes:
    return U32.pack(length)


def read_compressed_length(reader, pages: int, page_size: int) -> int:
    length = U32.unpack(reader.read_exact(4))[0]
    if length > 2 * pages * page_size + 1024:
        raise StreamError(f"a compressed record of {length} bytes for {pages} pages")
    return length


def pack_zero_run(first: int, count: int) -> bytes:
    return U8.pack(ZERO_RUN) + ZERO_RUN_BODY.pack(first, count)


def read_zero_run(reader) -> tuple[int, int]:
    return ZERO_RUN_BODY.unpack(reader.read_exact(ZERO_RUN_BODY.size))


def pack_xbzrle(page: int, delta: bytes) -> bytes:
    return U8.pack(XBZRLE) + XBZRLE_HEAD.pack(page, len(delta)) + delta


def read_xbzrle(reader, page_size: int) -> tuple[int, bytes]:
    page, length = XBZRLE_HEAD.unpack(reader.read_exact(XBZRLE_HEAD.size))
    if length > page_size:
        raise StreamError(f"XBZRLE record of {length} bytes for a {page_size}-byte page")
    return page, reader.read_exact(length)


def pack_pass_end(number: int) -> bytes:
    return U8.pack(PASS_END) + U32.pack(number)


def read_pass_end(reader) -> int:
    return U32.unpack(reader.read_exact(4))[0]


def pack_device(name: str, version: int, payload: bytes) -> bytes:
    raw = name.encode()
    return U8.pack(DEVICE) + U16.pack(len(raw)) + raw + DEVICE_TAIL.pack(version, len(payload)) + payload


def read_device(reader) -> tuple[str, int, bytes]:
    name = _message(reader)
    version, length = DEVICE_TAIL.unpack(reader.read_exact(DEVICE_TAIL.size))
    if length > MAX_DEVICE_PAYLOAD:
        raise StreamError(f"device section {name} claims {length} bytes")
    return name, version, reader.read_exact(length)


def devices_digest(sections: list[tuple[str, int, bytes]]) -> bytes:
    """blake3 over the DEVICE records of ``sections``, exactly as they are sent."""
    hasher = blake3.blake3()
    for name, version, payload in sections:
        hasher.update(pack_device(name, version, payload))
    return hasher.digest()


def pack_end(ram_digest: bytes, sections_digest: bytes, full_ram_digest: bytes | None = None) -> bytes:
    """END, followed by the whole-RAM digest when the stream verifies all RAM."""
    return U8.pack(END) + ram_digest + sections_digest + (full_ram_digest or b"")


def read_end(reader, verify_ram: bool) -> tuple[bytes, bytes, bytes | None]:
    """(RAM digest, devices digest, whole-RAM digest or None)."""
    ram_digest, sections_digest = reader.read_exact(DIGEST_SIZE), reader.read_exact(DIGEST_SIZE)
    return ram_digest, sections_digest, reader.read_exact(DIGEST_SIZE) if verify_ram else None


def pack_abort(message: str) -> bytes:
    return U8.pack(ABORT) + _utf8(message)


def read_abort(reader) -> str:
    return _message(reader)


def pack_colo(message: int, size: int | None = None) -> bytes:
    """A COLO record: QEMU's COLOMessage value, big-endian as QEMU sends it."""
    record = U8.pack(COLO) + BE_U32.pack(message)
    return record if size is None else record + BE_U64.pack(size)


def read_colo(reader, with_size) -> tuple[int, int | None]:
    """(COLOMessage value, vmstate size); ``with_size(value)`` says whether a size follows."""
    value = BE_U32.unpack(reader.read_exact(4))[0]
    return value, BE_U64.unpack(reader.read_exact(8))[0] if with_size(value) else None


HEARTBEAT_KEY_SIZE = 32


def pack_colo_hello(heartbeat_port: int, packet_port: int = 0, heartbeat_key: bytes = b"") -> bytes:
    """``heartbeat_key``: the key this side MACs its heartbeat datagrams with (TLS connections)."""
    return U8.pack(COLO_HELLO) + U16.pack(heartbeat_port) + U16.pack(packet_port) + heartbeat_key


def read_colo_hello(reader, keyed: bool = False) -> tuple[int, int, bytes | None]:
    """(heartbeat port, packet channel port or 0, the peer's heartbeat key when ``keyed``)."""
    ports = U16.unpack(reader.read_exact(2))[0], U16.unpack(reader.read_exact(2))[0]
    return (*ports, reader.read_exact(HEARTBEAT_KEY_SIZE) if keyed else None)


def pack_reply(ok: bool, message: str = "") -> bytes:
    """The destination's one answer (not a record: no type byte)."""
    return U8.pack(0 if ok else 1) + _utf8(message)


def read_reply(reader) -> tuple[bool, str]:
    status, length = REPLY_HEAD.unpack(reader.read_exact(REPLY_HEAD.size))
    return status == 0, reader.read_exact(length).decode(errors="replace")
