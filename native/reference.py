"""Pure-Python twins of the C hot paths in ``_native.c``: same contracts, used as
the reference in tests and wherever the extension is unavailable or disabled."""
import itertools
import os
import operator
import re
import select
import socket
import struct
from array import array


def _check(length: int, page_size: int) -> int:
    if page_size <= 0 or length % page_size:
        raise ValueError("buffer length must be a multiple of a positive page size")
    return length // page_size


def _page_list(page_numbers, pages: int) -> list[int]:
    """The page numbers as ints, each checked to be below ``pages``."""
    numbers = [operator.index(p) for p in tuple(page_numbers)]  # a snapshot, as the C code takes
    for p in numbers:
        if not 0 <= p < pages:
            raise ValueError(f"page number {p} out of range ({pages} pages)")
    return numbers


def zero_pages(buf, page_size: int, page_numbers=None) -> bytes:
    """One byte per page (per listed page when ``page_numbers`` is given): 1 when
    the page is all zero."""
    view = memoryview(buf).cast("B")
    pages = _check(len(view), page_size)
    numbers = range(pages) if page_numbers is None else _page_list(page_numbers, pages)
    zero = bytes(page_size)
    return bytes(view[i * page_size:(i + 1) * page_size] == zero for i in numbers)


def changed_pages(buf, shadow, page_size: int, page_numbers=None) -> bytes:
    """One byte per page (per listed page when ``page_numbers`` is given): 1 when
    ``buf`` and ``shadow`` differ."""
    a, b = memoryview(buf).cast("B"), memoryview(shadow).cast("B")
    if len(a) != len(b):
        raise ValueError("buffer and shadow differ in length")
    pages = _check(len(a), page_size)
    numbers = range(pages) if page_numbers is None else _page_list(page_numbers, pages)
    return bytes(a[i * page_size:(i + 1) * page_size] != b[i * page_size:(i + 1) * page_size]
                 for i in numbers)


# XBZRLE, as QEMU's migration/xbzrle.c: encoded = (zrun nzrun)*, where zrun is the
# ULEB128 count of equal bytes and nzrun the ULEB128 count n > 0 of differing bytes
# followed by those n bytes of the new page.  A trailing equal run is not encoded.
# Unlike QEMU: any page length, ULEB128s past 2 bytes, and an exact limit.

def _uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def xbzrle_encode(old, new, limit: int):
    """XBZRLE encoding of ``new`` against ``old``: b"" when they are equal, None
    when the encoding would be longer than ``limit`` bytes (QEMU's overflow)."""
    old, new = bytes(old), bytes(new)
    if len(old) != len(new):
        raise ValueError("old and new pages differ in length")
    if limit < 0:
        raise ValueError("limit must not be negative")
    diff = (int.from_bytes(old, "little") ^ int.from_bytes(new, "little")).to_bytes(len(old), "little")
    out = bytearray()
    end = 0
    for run in re.finditer(rb"[^\x00]+", diff):  # each maximal run of differing bytes
        out += _uleb128(run.start() - end) + _uleb128(run.end() - run.start()) + new[run.start():run.end()]
        end = run.end()
        if len(out) > limit:
            return None
    return bytes(out)


def _read_uleb128(data: bytes, i: int, most: int) -> tuple[int, int]:
    """The ULEB128 at ``data[i]``, no larger than ``most``, and the index after it."""
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("malformed XBZRLE data: truncated ULEB128 length")
        if shift > 56:
            raise ValueError("malformed XBZRLE data: ULEB128 length too long")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if value > most:
            raise ValueError("malformed XBZRLE data: run past the end of the page")
        if not byte & 0x80:
            return value, i
        shift += 7


def xbzrle_decode(encoded, old_page) -> bytes:
    """``old_page`` with the XBZRLE ``encoded`` applied; ValueError when malformed.
    Like QEMU, only the first zero run may be empty and no data run may be."""
    data, page = bytes(encoded), bytearray(old_page)
    i = d = 0
    while i < len(data):
        first = i == 0
        zrun, i = _read_uleb128(data, i, len(page) - d)
        if not zrun and not first:
            raise ValueError("malformed XBZRLE data: empty zero run")
        d += zrun
        if i == len(data):
            raise ValueError("malformed XBZRLE data: zero run without a data run")
        nzrun, i = _read_uleb128(data, i, len(page) - d)
        if not nzrun:
            raise ValueError("malformed XBZRLE data: empty data run")
        if nzrun > len(data) - i:
            raise ValueError("malformed XBZRLE data: truncated data run")
        page[d:d + nzrun] = data[i:i + nzrun]
        d += nzrun
        i += nzrun
    return bytes(page)


# Dirty bitmaps in KVM's layout: bit i of the little-endian 64-bit words is page i,
# which is bit i % 8 of byte i // 8.

def bitmap_count(bitmap) -> int:
    """How many bits are set."""
    return int.from_bytes(memoryview(bitmap).cast("B"), "little").bit_count()


def bitmap_pages(bitmap, start_page: int = 0, limit=None) -> array:
    """array('Q') of the set bits from ``start_page`` on, ascending, at most ``limit``."""
    start_page = operator.index(start_page)
    if start_page < 0 or (limit is not None and operator.index(limit) < 0):
        raise ValueError("start_page and limit must not be negative")
    data = memoryview(bitmap).cast("B")
    set_bits = (index * 8 + bit
                for index in range(start_page // 8, len(data)) if data[index]
                for bit in range(8) if data[index] >> bit & 1 and index * 8 + bit >= start_page)
    return array("Q", itertools.islice(set_bits, limit))


def bitmap_runs(bitmap) -> array:
    """array('Q') of first, count pairs, one per run of set bits, ascending."""
    x = int.from_bytes(memoryview(bitmap).cast("B"), "little")
    runs, pos = array("Q"), 0
    while x:
        zeros = (x & -x).bit_length() - 1
        x >>= zeros
        pos += zeros
        ones = ((x ^ (x + 1)) >> 1).bit_length()
        runs += array("Q", (pos, ones))
        x >>= ones
        pos += ones
    return runs


def gather_pages(ram, page_numbers, page_size: int, out) -> int:
    """Copies the listed pages of ``ram`` back to back into ``out``; returns the
    bytes written.  Nothing is written unless every page number is valid."""
    src, dst = memoryview(ram).cast("B"), memoryview(out).cast("B")
    numbers = _page_list(page_numbers, _check(len(src), page_size))
    if len(numbers) > len(dst) // page_size:
        raise ValueError("out is too small for the pages")
    for k, p in enumerate(numbers):
        dst[k * page_size:(k + 1) * page_size] = src[p * page_size:(p + 1) * page_size]
    return len(numbers) * page_size


def scatter_pages(ram, page_numbers, page_size: int, data) -> int:
    """Copies consecutive pages of ``data`` into the listed pages of the writable
    ``ram``; returns the bytes read.  Nothing is written unless every page number is valid."""
    dst, src = memoryview(ram).cast("B"), memoryview(data).cast("B")
    numbers = _page_list(page_numbers, _check(len(dst), page_size))
    if len(numbers) > len(src) // page_size:
        raise ValueError("data is too short for the pages")
    for k, p in enumerate(numbers):
        dst[p * page_size:(p + 1) * page_size] = src[k * page_size:(k + 1) * page_size]
    return len(numbers) * page_size


def copy_pages(dst, src, page_numbers, page_size: int) -> int:
    """Copies the listed pages of ``src`` to the same pages of the writable ``dst``
    (the COLO cache flushed into guest RAM); returns the bytes copied.  Nothing is
    written unless every page number is valid."""
    to, source = memoryview(dst).cast("B"), memoryview(src).cast("B")
    if len(to) != len(source):
        raise ValueError("dst and src differ in size")
    numbers = _page_list(page_numbers, _check(len(to), page_size))
    for p in numbers:
        to[p * page_size:(p + 1) * page_size] = source[p * page_size:(p + 1) * page_size]
    return len(numbers) * page_size


def equal_prefix(a, b) -> int:
    """How many leading bytes ``a`` and ``b`` have in common (at most the shorter length):
    the COLO comparer's payload check, which also says where they differ."""
    a, b = memoryview(a).cast("B"), memoryview(b).cast("B")
    n = min(len(a), len(b))
    differing = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - (differing.bit_length() + 7) // 8     # whole bytes after the first difference


# Ethernet/IPv4 header decoding for the COLO network layer (netfilter.packet draws the layouts).
_VLAN_ETHERTYPES = (0x8100, 0x88A8)
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")


def parse_headers(frame) -> tuple:
    """The headers of an Ethernet frame as a flat tuple::

        (ethertype, ip_offset, ihl, total_length, protocol, src, dst, ident, flags_offset,
         kind, t0 .. t7)

    ``src``/``dst`` dotted quads; ``kind`` the transport decoded: 6 TCP (sport, dport, seq,
    ack, header length, flags, window, checksum), 17 UDP (sport, dport, length, checksum),
    1 ICMP (type, code, checksum, ident, sequence), 0 none (a fragment, another protocol);
    unused t fields are 0.  A frame that is not IPv4 has only ethertype and ip_offset set.
    Malformed: ValueError(reason, flow class reached).  The C twin returns None for anything
    but a well-formed IPv4 frame, and the caller asks this function why."""
    frame = bytes(frame)
    if len(frame) < 14:
        raise ValueError(f"frame of {len(frame)} bytes is shorter than an Ethernet header", "non-ip")
    offset = 12
    ethertype = int.from_bytes(frame[12:14], "big")
    for _ in range(2):
        if ethertype not in _VLAN_ETHERTYPES:
            break
        offset += 4
        if len(frame) < offset + 2:
            raise ValueError("frame ends inside its VLAN tag", "non-ip")
        ethertype = int.from_bytes(frame[offset:offset + 2], "big")
    ip_offset = offset + 2
    if ethertype != 0x0800:
        return (ethertype, ip_offset) + (0,) * 16
    available = len(frame) - ip_offset
    if available < _IPV4.size:
        raise ValueError(f"IPv4 header truncated: {available} of 20 bytes", "non-ip")
    (version_ihl, _tos, total_length, ident, flags_offset, _ttl, protocol, _checksum,
     src, dst) = _IPV4.unpack_from(frame, ip_offset)
    version, ihl = version_ihl >> 4, (version_ihl & 0x0F) * 4
    if version != 4:
        raise ValueError(f"IP version {version} in an IPv4 frame", "non-ip")
    if ihl < _IPV4.size:
        raise ValueError(f"bad IHL: a {ihl}-byte IPv4 header", "non-ip")
    if ihl > available:
        raise ValueError(f"IPv4 header of {ihl} bytes goes past the frame ({available} bytes)", "non-ip")
    if total_length < ihl:
        raise ValueError(f"IPv4 total length {total_length} is shorter than its header ({ihl})", "non-ip")
    if total_length > available:
        raise ValueError(f"IPv4 total length {total_length} goes past the frame ({available} bytes)", "non-ip")
    head = (ethertype, ip_offset, ihl, total_length, protocol, socket.inet_ntoa(src), socket.inet_ntoa(dst),
            ident, flags_offset)
    start, end = ip_offset + ihl, ip_offset + total_length
    if flags_offset & 0x3FFF:                   # MF or a fragment offset: no transport header to read
        return head + (0,) * 9
    if protocol == 6:
        if end - start < _TCP.size:
            raise ValueError(f"TCP header truncated: {end - start} of 20 bytes", "tcp")
        sport, dport, seq, ack, doff, flags, window, checksum, _urgent = _TCP.unpack_from(frame, start)
        header_length = (doff >> 4) * 4
        if header_length < _TCP.size:
            raise ValueError(f"bad TCP data offset: a {header_length}-byte header", "tcp")
        if header_length > end - start:
            raise ValueError(f"TCP data offset {header_length} goes past the segment ({end - start} bytes)", "tcp")
        return head + (6, sport, dport, seq, ack, header_length, flags, window, checksum)
    if protocol == 17:
        if end - start < _UDP.size:
            raise ValueError(f"UDP header truncated: {end - start} of 8 bytes", "udp")
        sport, dport, length, checksum = _UDP.unpack_from(frame, start)
        if not _UDP.size <= length <= end - start:
            raise ValueError(f"UDP length {length} does not fit the IP payload ({end - start} bytes)", "udp")
        return head + (17, sport, dport, length, checksum, 0, 0, 0, 0)
    if protocol == 1:
        if end - start < _ICMP.size:
            raise ValueError(f"ICMP header truncated: {end - start} of 8 bytes", "icmp")
        return head + (1, *_ICMP.unpack_from(frame, start), 0, 0, 0)
    return head + (0,) * 9
# --- NIC rings (docs/guest-abi.md, "NIC rings") ------------------------------------------
# ``ram`` is guest RAM (writable), ``dirty`` the VMM's dirty bitmap (bit i = page i); every
# byte these functions write into ``ram`` is marked there after it is written.  A ring is
# (ctrl, ring, size): the control block's and the descriptor array's guest-physical
# addresses and the slot count (a power of two).  Indexes are free-running u32.  What the
# guest got wrong raises ValueError with the reason, before anything of that slot is used.

RING_TX_PROD, RING_TX_CONS, RING_TX_NOTIFY = 0, 64, 68
RING_RX_AVAIL, RING_RX_CONS, RING_RX_USED, RING_RX_NOTIFY = 128, 132, 192, 196
RING_CTRL_SIZE = 256
RING_DESC_SIZE = 16
RING_MAX_FRAME = 65536
_U32 = 0xFFFFFFFF


def _mark(dirty, gpa: int, length: int) -> None:
    for page in range(gpa >> 12, ((gpa + length - 1) >> 12) + 1):
        dirty[page >> 3] |= 1 << (page & 7)


def _u32(view, offset: int) -> int:
    return int.from_bytes(view[offset:offset + 4], "little")


def _put_u32(view, dirty, offset: int, value: int) -> None:
    view[offset:offset + 4] = (value & _U32).to_bytes(4, "little")
    _mark(dirty, offset, 4)


def _check_ring(view, ctrl: int, ring: int, size: int) -> None:
    if size <= 0 or size & (size - 1) or size > 32768:
        raise ValueError(f"ring size {size} is not a power of two up to 32768")
    if ctrl < 0 or ctrl + RING_CTRL_SIZE > len(view) or ring < 0 or ring + size * RING_DESC_SIZE > len(view):
        raise ValueError("ring outside guest RAM")


def _outstanding(ahead: int, behind: int, size: int, what: str) -> int:
    count = (ahead - behind) & _U32
    if count > size:
        raise ValueError(f"{what} index overrun: {count} outstanding on a ring of {size}")
    return count


def _desc(view, ring: int, size: int, index: int, what: str) -> tuple[int, int, int]:
    """(gpa of the descriptor, buffer address, length), checked against RAM."""
    at = ring + (index & (size - 1)) * RING_DESC_SIZE
    addr = int.from_bytes(view[at:at + 8], "little")
    length = _u32(view, at + 8)
    if length == 0 or length > RING_MAX_FRAME:
        raise ValueError(f"{what} descriptor {index & (size - 1)}: absurd length {length}")
    if addr + length > len(view):
        raise ValueError(f"{what} descriptor {index & (size - 1)}: buffer [{addr:#x}, +{length:#x}) "
                         f"is outside guest RAM (size {len(view):#x})")
    return at, addr, length


def ring_tx_pop(ram, dirty, ctrl: int, ring: int, size: int, cons: int, limit: int):
    """Up to ``limit`` frames the guest queued on the TX ring, copied out; the new consumer
    index is published in the control block.  Returns (cons, [frames])."""
    view = memoryview(ram).cast("B")
    _check_ring(view, ctrl, ring, size)
    pending = _outstanding(_u32(view, ctrl + RING_TX_PROD), cons, size, "TX producer")
    frames = []
    for _ in range(min(pending, limit)):
        _, addr, length = _desc(view, ring, size, cons, "TX")
        frames.append(bytes(view[addr:addr + length]))
        cons = (cons + 1) & _U32
    if frames:
        _put_u32(view, dirty, ctrl + RING_TX_CONS, cons)
    return cons, frames


def _tap_tx(ram, dirty, ctrl: int, ring: int, size: int, cons: int, fd: int, limit: int):
    """Writes up to ``limit`` queued TX frames to ``fd`` (a tap: one frame per write) straight
    from guest RAM, then publishes the consumer index.  Returns (cons, sent, dropped, bytes):
    a frame the fd refuses is dropped, as a tap's own queue would."""
    view = memoryview(ram).cast("B")
    _check_ring(view, ctrl, ring, size)
    pending = _outstanding(_u32(view, ctrl + RING_TX_PROD), cons, size, "TX producer")
    sent = dropped = nbytes = 0
    for _ in range(min(pending, limit)):
        _, addr, length = _desc(view, ring, size, cons, "TX")
        try:
            os.write(fd, view[addr:addr + length])
            sent, nbytes = sent + 1, nbytes + length
        except OSError:
            dropped += 1
        cons = (cons + 1) & _U32
    if sent or dropped:
        _put_u32(view, dirty, ctrl + RING_TX_CONS, cons)
    return cons, sent, dropped, nbytes


def _rx_store(view, dirty, ring: int, size: int, used: int, frame_len: int, data) -> None:
    at, addr, _ = _desc(view, ring, size, used, "RX")
    if data is not None:
        view[addr:addr + frame_len] = data
    _mark(dirty, addr, frame_len)
    view[at + 8:at + 12] = frame_len.to_bytes(4, "little")
    _mark(dirty, at + 8, 4)


def ring_rx_push(ram, dirty, ctrl: int, ring: int, size: int, used: int, frames):
    """Copies frames into the buffers the guest posted, in order, and publishes the used
    index.  Returns (used, taken, too_big): ``taken`` frames of the list were consumed,
    ``too_big`` of them dropped for being longer than their buffer."""
    view = memoryview(ram).cast("B")
    _check_ring(view, ctrl, ring, size)
    free = _outstanding(_u32(view, ctrl + RING_RX_AVAIL), used, size, "RX available")
    taken = too_big = placed = 0
    for frame in frames:
        if placed == free:
            break
        _, _, capacity = _desc(view, ring, size, used, "RX")
        taken += 1
        if len(frame) > capacity:
            too_big += 1
            continue
        _rx_store(view, dirty, ring, size, used, len(frame), frame)
        used, placed = (used + 1) & _U32, placed + 1
    if placed:
        _put_u32(view, dirty, ctrl + RING_RX_USED, used)
    return used, taken, too_big


def _tap_rx(ram, dirty, ctrl: int, ring: int, size: int, used: int, fd: int, limit: int):
    """Reads frames from ``fd`` (a non-blocking tap) straight into the posted buffers, at
    most ``limit``, and publishes the used index.  Returns (used, received, too_big, bytes)."""
    view = memoryview(ram).cast("B")
    _check_ring(view, ctrl, ring, size)
    free = _outstanding(_u32(view, ctrl + RING_RX_AVAIL), used, size, "RX available")
    received = too_big = placed = nbytes = 0
    scratch = bytearray(RING_MAX_FRAME)
    while placed < min(free, limit):
        _, addr, capacity = _desc(view, ring, size, used, "RX")
        try:
            length = os.readv(fd, [view[addr:addr + capacity], scratch])
        except BlockingIOError:
            break
        if length > capacity:  # the buffer holds the frame's head, unpublished
            _mark(dirty, addr, capacity)
            too_big += 1
            continue
        _rx_store(view, dirty, ring, size, used, length, None)
        used, placed, received, nbytes = (used + 1) & _U32, placed + 1, received + 1, nbytes + length
    if placed:
        _put_u32(view, dirty, ctrl + RING_RX_USED, used)
    return used, received, too_big, nbytes


def ring_arm(ram, dirty, ctrl: int, tx_notify: int, rx_notify: int):
    """Sets the control block's notify flags (the guest rings the doorbell while one is
    set), then reads the guest's indexes after a full fence: (tx_prod, rx_avail)."""
    view = memoryview(ram).cast("B")
    if ctrl < 0 or ctrl + RING_CTRL_SIZE > len(view):
        raise ValueError("ring outside guest RAM")
    _put_u32(view, dirty, ctrl + RING_TX_NOTIFY, tx_notify)
    _put_u32(view, dirty, ctrl + RING_RX_NOTIFY, rx_notify)
    return _u32(view, ctrl + RING_TX_PROD), _u32(view, ctrl + RING_RX_AVAIL)


def bitmap_mark(bitmap, gpa: int, length: int) -> None:
    """Sets the bits of the pages [gpa, gpa + length) touches (atomically, in C)."""
    if length and (gpa + length - 1) >> 12 >= len(bitmap) * 8:
        raise ValueError("range past the end of the bitmap")
    if length:
        _mark(bitmap, gpa, length)


def bitmap_take(bitmap) -> bytes:
    """The bitmap's bytes, the bitmap cleared (in C each byte atomically as it is read)."""
    taken = bytes(bitmap)
    bitmap[:] = bytes(len(bitmap))
    return taken


def ring_serve_tap(ram, dirty, ctrl: int, tx_ring: int, tx_size: int, rx_ring: int, rx_size: int,
                   tx_cons: int, rx_used: int, tap: int, doorbell: int, control: int, event: int,
                   rx_ready: int, tx_done: int, timeout_ms: int, max_frames: int):
    """The NIC thread's loop on a tap: TX frames to it, its frames into the RX ring, signalling
    rx_ready and tx_done; idle, it asks the guest for doorbells and sleeps on the doorbell, the
    tap (when there is room for its frames), ``control`` and ``event``.  Returns when one of the
    last two is readable ("event"), after ``timeout_ms`` idle ("timeout") or ``max_frames``
    frames ("batch"): (tx_cons, rx_used, sent, dropped, received, too_big, tx_bytes, rx_bytes, why)."""
    sent = dropped = received = too_big = total = tx_bytes = rx_bytes = 0

    def result(why):
        return tx_cons, rx_used, sent, dropped, received, too_big, tx_bytes, rx_bytes, why

    while True:
        new_cons, s, d, b = _tap_tx(ram, dirty, ctrl, tx_ring, tx_size, tx_cons, tap, 64)
        tx = (new_cons - tx_cons) & _U32
        tx_cons, sent, dropped, tx_bytes = new_cons, sent + s, dropped + d, tx_bytes + b
        view = memoryview(ram).cast("B")
        room = _outstanding(_u32(view, ctrl + RING_RX_AVAIL), rx_used, rx_size, "RX available")
        new_used, r, big, b = _tap_rx(ram, dirty, ctrl, rx_ring, rx_size, rx_used, tap, 64)
        rx_used, received, too_big, rx_bytes = new_used, received + r, too_big + big, rx_bytes + b
        room -= r
        if r:
            os.eventfd_write(rx_ready, 1)
        if tx:
            os.eventfd_write(tx_done, 1)
        total += tx + r + big
        if tx + r + big:
            if total >= max_frames:
                return result("batch")
            if select.select([control, event], [], [], 0)[0]:
                return result("event")
            continue
        tx_prod, rx_avail = ring_arm(ram, dirty, ctrl, 1, 0 if room else 1)
        busy = tx_prod != tx_cons or (not room and rx_avail != rx_used)
        readable = None
        if not busy:
            readable = select.select([doorbell, control, event] + ([tap] if room else []), [], [],
                                     timeout_ms / 1000)[0]
            if doorbell in readable:
                os.eventfd_read(doorbell)
        ring_arm(ram, dirty, ctrl, 0, 0)
        if readable is not None and not readable:
            return result("timeout")
        if readable and (control in readable or event in readable):
            return result("event")
