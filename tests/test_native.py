"""Every native hot path agrees with its pure-Python reference on the same cases."""
import mmap
import os
import subprocess
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native
from native import _native, reference

PAGE = 4096
IMPLS = pytest.mark.parametrize("impl", [native, reference], ids=["native", "reference"])


def cases():
    zero = bytes(PAGE * 4)
    mixed = bytearray(PAGE * 5)
    mixed[PAGE + 17] = 1
    mixed[4 * PAGE - 1] = 0xFF
    return [zero, bytes(mixed), os.urandom(PAGE * 3), b""]


def test_native_is_in_use():
    assert native.IMPLEMENTATION == "native"


# ---- zero and changed pages ------------------------------------------------------

@IMPLS
def test_zero_pages(impl):
    expected = [b"\x01" * 4, b"\x01\x00\x01\x00\x01", b"\x00" * 3, b""]
    assert [impl.zero_pages(c, PAGE) for c in cases()] == expected


@IMPLS
def test_zero_pages_odd_page_size_and_unaligned_view(impl):
    # 100-byte pages exercise the byte tail; a view at offset 3 is misaligned.
    buf = bytearray(3 + 100 * 3)
    buf[3 + 100 + 99] = 1
    assert impl.zero_pages(memoryview(buf)[3:], 100) == b"\x01\x00\x01"


@IMPLS
def test_zero_pages_listed(impl):
    mixed = cases()[1]
    assert impl.zero_pages(mixed, PAGE, [3, 1, 1, 0]) == b"\x00\x00\x00\x01"
    assert impl.zero_pages(mixed, PAGE, array("Q", [4, 2])) == b"\x01\x01"
    assert impl.zero_pages(mixed, PAGE, page_numbers=[]) == b""
    assert impl.changed_pages(mixed, mixed, PAGE, array("Q")) == b""
    # A strided view is no contiguous buffer: read as a sequence instead.
    assert impl.zero_pages(mixed, PAGE, memoryview(array("Q", [1, 9, 2, 9]))[::2]) == b"\x00\x01"
    assert impl.zero_pages(mixed, PAGE, array("i", [2, 3])) == b"\x01\x00"


@IMPLS
def test_changed_pages(impl):
    base = bytes(cases()[1])
    changed = bytearray(base)
    changed[2 * PAGE] = 9
    changed[4 * PAGE + 100] = 9
    assert impl.changed_pages(changed, base, PAGE) == b"\x00\x00\x01\x00\x01"
    assert impl.changed_pages(base, base, PAGE) == b"\x00" * 5
    assert impl.changed_pages(changed, base, PAGE, [4, 0, 2]) == b"\x01\x00\x01"
    assert impl.changed_pages(changed, base, PAGE, page_numbers=range(1, 3)) == b"\x00\x01"


@IMPLS
def test_bad_arguments(impl):
    with pytest.raises(ValueError):
        impl.zero_pages(bytes(100), PAGE)
    with pytest.raises(ValueError):
        impl.changed_pages(bytes(PAGE), bytes(2 * PAGE), PAGE)
    with pytest.raises(ValueError):
        impl.zero_pages(bytes(PAGE), 0)
    for bad in ([1], [-1], [2**64]):
        with pytest.raises(ValueError):
            impl.zero_pages(bytes(PAGE), PAGE, bad)
        with pytest.raises(ValueError):
            impl.changed_pages(bytes(PAGE), bytes(PAGE), PAGE, bad)
    with pytest.raises(TypeError):
        impl.zero_pages(bytes(PAGE), PAGE, [0.0])


# ---- XBZRLE -------------------------------------------------------------------------

def qemu_encode(old: bytes, new: bytes) -> bytes:
    """The byte-wise definition QEMU's word-at-a-time xbzrle_encode_buffer must equal."""
    out, i = bytearray(), 0
    while i < len(new):
        zrun = 0
        while i < len(new) and old[i] == new[i]:
            zrun, i = zrun + 1, i + 1
        if i == len(new):
            break
        start = i
        while i < len(new) and old[i] != new[i]:
            i += 1
        out += reference._uleb128(zrun) + reference._uleb128(i - start) + new[start:i]
    return bytes(out)


def page_with(changes: dict[int, bytes], size: int = PAGE, base: bytes = None) -> bytes:
    page = bytearray(base if base is not None else bytes(size))
    for offset, data in changes.items():
        page[offset:offset + len(data)] = data
    return bytes(page)


@IMPLS
def test_xbzrle_known_encodings(impl):
    old = bytes(PAGE)
    assert impl.xbzrle_encode(old, old, PAGE) == b""
    # A change at offset 0: the first zero run is empty.
    assert impl.xbzrle_encode(old, page_with({0: b"\x07"}), PAGE) == b"\x00\x01\x07"
    # Runs of 200 and 4095 need two-byte ULEB128s; the trailing equal run is dropped.
    assert impl.xbzrle_encode(old, page_with({200: b"ab"}), PAGE) == b"\xc8\x01\x02ab"
    assert impl.xbzrle_encode(old, page_with({PAGE - 1: b"z"}), PAGE) == b"\xff\x1f\x01z"
    # Two runs: 3 equal, 2 changed, 5 equal, 1 changed.
    assert impl.xbzrle_encode(old, page_with({3: b"xy", 10: b"q"}), PAGE) == b"\x03\x02xy\x05\x01q"
    # A changed run spanning several words, ending exactly on a word boundary.
    assert impl.xbzrle_encode(old, page_with({5: b"\xff" * 19}), PAGE) == b"\x05\x13" + b"\xff" * 19


@IMPLS
def test_xbzrle_limit(impl):
    old, new = bytes(PAGE), page_with({3: b"xy", 10: b"q"})
    size = len(impl.xbzrle_encode(old, new, PAGE))
    assert impl.xbzrle_encode(old, new, size) == b"\x03\x02xy\x05\x01q"
    assert impl.xbzrle_encode(old, new, size - 1) is None
    assert impl.xbzrle_encode(old, new, 0) is None
    assert impl.xbzrle_encode(old, old, 0) == b""
    assert impl.xbzrle_encode(old, new, sys.maxsize) == b"\x03\x02xy\x05\x01q"
    # Every other byte changed: the encoding is half again as long as the page.
    noisy = bytes(b ^ (i % 2) for i, b in enumerate(old))
    assert impl.xbzrle_encode(old, noisy, PAGE) is None
    assert len(impl.xbzrle_encode(old, noisy, 2 * PAGE + 1)) == 3 * PAGE // 2


@IMPLS
def test_xbzrle_bad_arguments(impl):
    with pytest.raises(ValueError):
        impl.xbzrle_encode(bytes(PAGE), bytes(PAGE - 1), PAGE)
    with pytest.raises(ValueError):
        impl.xbzrle_encode(bytes(PAGE), bytes(PAGE), -1)


@IMPLS
def test_xbzrle_decode(impl):
    old = os.urandom(PAGE)
    assert impl.xbzrle_decode(b"", old) == old
    assert impl.xbzrle_decode(b"\x03\x02xy\x05\x01q", bytes(16)) == page_with({3: b"xy", 10: b"q"}, 16)
    assert impl.xbzrle_decode(b"\x00\x10" + b"A" * 16, bytes(16)) == b"A" * 16
    # QEMU accepts a non-minimal two-byte ULEB128.
    assert impl.xbzrle_decode(b"\x81\x00\x01q", bytes(4)) == b"\x00q\x00\x00"


MALFORMED = {
    "truncated zero-run length": b"\x80",
    "truncated data-run length": b"\x01\x81",
    "zero run without data run": b"\x01",
    "trailing garbage": b"\x00\x01q\x02",
    "truncated data run": b"\x00\x05abc",
    "empty data run": b"\x00\x00",
    "empty zero run after the first": b"\x00\x01q\x00\x01q",
    "zero run past the end": b"\x11\x01q",
    "zero run to the end": b"\x10\x01q",
    "data run past the end": b"\x0f\x02qq",
    "huge length": b"\xff" * 9 + b"\x01\x01q",
    "endless length": b"\x80" * 64,
}


@IMPLS
@pytest.mark.parametrize("encoded", MALFORMED.values(), ids=MALFORMED.keys())
def test_xbzrle_decode_rejects_malformed(impl, encoded):
    with pytest.raises(ValueError):
        impl.xbzrle_decode(encoded, bytes(16))


pages = st.integers(0, 300).flatmap(lambda n: st.tuples(st.binary(min_size=n, max_size=n),
                                                        st.lists(st.tuples(st.integers(0, max(n - 1, 0)),
                                                                           st.binary(max_size=20)),
                                                                 max_size=8)))


def mutate(old: bytes, edits) -> bytes:
    new = bytearray(old)
    for offset, data in edits:
        new[offset:offset + len(data)] = data[:len(old) - offset]
    return bytes(new)


@settings(max_examples=400, deadline=None)
@given(pages, st.integers(0, 700))
def test_xbzrle_properties(page, limit):
    old, edits = page
    new = mutate(old, edits)
    expected = qemu_encode(old, new)
    full = native.xbzrle_encode(old, new, 2 * len(old) + 1)
    assert full == reference.xbzrle_encode(old, new, 2 * len(old) + 1) == expected
    assert native.xbzrle_decode(full, old) == reference.xbzrle_decode(full, old) == new
    limited = expected if len(expected) <= limit else None
    assert native.xbzrle_encode(old, new, limit) == reference.xbzrle_encode(old, new, limit) == limited


def outcome(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return ValueError


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 40))
def test_xbzrle_decode_arbitrary_input(encoded, size):
    old = bytes(range(size))
    assert outcome(native.xbzrle_decode, encoded, old) == outcome(reference.xbzrle_decode, encoded, old)


# ---- dirty bitmaps -------------------------------------------------------------------

@IMPLS
def test_bitmap_pages(impl):
    words = array("Q", [1 | 1 << 63, 0, 1 << 5])
    assert list(impl.bitmap_pages(words)) == [0, 63, 133]
    assert impl.bitmap_count(words) == 3
    result = impl.bitmap_pages(words, start_page=1)
    assert isinstance(result, array) and result.typecode == "Q" and list(result) == [63, 133]
    assert list(impl.bitmap_pages(words, 64)) == [133]
    assert list(impl.bitmap_pages(words, 134)) == []
    assert list(impl.bitmap_pages(words, 10**6)) == []
    assert list(impl.bitmap_pages(words, 0, 2)) == [0, 63]
    assert list(impl.bitmap_pages(words, limit=0)) == []
    assert list(impl.bitmap_pages(b"")) == [] and impl.bitmap_count(b"") == 0
    # A length that is not a whole number of words: bytes are little-endian bit order.
    assert list(impl.bitmap_pages(b"\x81\x00\x00\x00\x00\x00\x00\x00\x02\x80\x01")) == [0, 7, 65, 79, 80]
    assert list(impl.bitmap_pages(b"\xff" * 16, 3, 70)) == list(range(3, 73))


@IMPLS
def test_bitmap_bad_arguments(impl):
    with pytest.raises(ValueError):
        impl.bitmap_pages(b"\x01", -1)
    with pytest.raises(ValueError):
        impl.bitmap_pages(b"\x01", 0, -1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.integers(0, 900), st.one_of(st.none(), st.integers(0, 900)))
def test_bitmap_properties(bitmap, start, limit):
    bits = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    expected = [i for i in bits if i >= start][:limit]
    assert list(native.bitmap_pages(bitmap, start, limit)) == list(reference.bitmap_pages(bitmap, start, limit)) \
        == expected
    assert native.bitmap_count(bitmap) == reference.bitmap_count(bitmap) == len(bits)


# ---- gather and scatter ------------------------------------------------------------

def numbered_ram(pages: int, page_size: int = PAGE) -> bytearray:
    return bytearray(b"".join(bytes([p + 1]) * page_size for p in range(pages)))


@IMPLS
@pytest.mark.parametrize("numbers", [[5, 0, 3, 3], array("Q", [5, 0, 3, 3]), range(5, -1, -2)],
                         ids=["list", "array", "range"])
def test_gather_and_scatter_round_trip(impl, numbers):
    ram = bytes(numbered_ram(8))
    out = bytearray(5 * PAGE)
    assert impl.gather_pages(ram, numbers, PAGE, out) == len(numbers) * PAGE
    assert out[:len(numbers) * PAGE] == b"".join(ram[p * PAGE:(p + 1) * PAGE] for p in numbers)
    assert out[len(numbers) * PAGE:] == bytes((5 - len(numbers)) * PAGE)
    dest = bytearray(len(ram))
    assert impl.scatter_pages(dest, numbers, PAGE, out) == len(numbers) * PAGE
    for p in range(8):
        assert dest[p * PAGE:(p + 1) * PAGE] == (ram[p * PAGE:(p + 1) * PAGE] if p in numbers else bytes(PAGE))


@IMPLS
def test_gather_and_scatter_on_mmap(impl):
    with mmap.mmap(-1, 4 * PAGE) as ram:
        ram[:] = numbered_ram(4)
        out = bytearray(2 * PAGE)
        impl.gather_pages(ram, [3, 1], PAGE, out)
        assert out == bytes([4]) * PAGE + bytes([2]) * PAGE
        impl.scatter_pages(ram, [0], PAGE, bytes([9]) * PAGE)
        assert ram[:PAGE] == bytes([9]) * PAGE and ram[PAGE:2 * PAGE] == bytes([2]) * PAGE


@IMPLS
def test_gather_and_scatter_reject_bad_input_and_write_nothing(impl):
    ram = numbered_ram(4)
    out = bytearray(2 * PAGE)
    for numbers in ([0, 4], [-1], [2**64], [0, 1, 2]):
        with pytest.raises(ValueError):
            impl.gather_pages(ram, numbers, PAGE, out)
        with pytest.raises(ValueError):
            impl.scatter_pages(ram, numbers, PAGE, out)
    assert out == bytes(2 * PAGE) and ram == numbered_ram(4)
    with pytest.raises(ValueError):
        impl.gather_pages(bytes(PAGE + 1), [0], PAGE, out)
    with pytest.raises(ValueError):
        impl.gather_pages(ram, [0], 0, out)
    with pytest.raises(TypeError):
        impl.gather_pages(ram, [0], PAGE, bytes(PAGE))  # out must be writable
    with pytest.raises(TypeError):
        impl.scatter_pages(bytes(ram), [0], PAGE, out)  # so must ram
    with pytest.raises(TypeError):
        impl.gather_pages(ram, 7, PAGE, out)
    assert impl.gather_pages(ram, [], PAGE, bytearray()) == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.data())
def test_gather_scatter_properties(page_size, data):
    pages = data.draw(st.integers(1, 12))
    ram = data.draw(st.binary(min_size=pages * page_size, max_size=pages * page_size))
    numbers = data.draw(st.lists(st.integers(0, pages - 1), max_size=16))
    outs = [bytearray(len(numbers) * page_size) for _ in range(2)]
    assert native.gather_pages(ram, numbers, page_size, outs[0]) \
        == reference.gather_pages(ram, numbers, page_size, outs[1]) == len(outs[0])
    assert outs[0] == outs[1]
    dests = [bytearray(len(ram)) for _ in range(2)]
    native.scatter_pages(dests[0], array("Q", numbers), page_size, outs[0])
    reference.scatter_pages(dests[1], numbers, page_size, outs[1])
    assert dests[0] == dests[1]


@IMPLS
def test_page_list_resized_while_read(impl):
    numbers = []

    class Shrinking:
        def __index__(self):
            numbers.clear()
            return 0
    numbers += [Shrinking(), 1, 2, 3]
    assert impl.zero_pages(bytes(4 * PAGE), PAGE, numbers) == b"\x01" * 4


def test_memcmp_bandwidth_probe():
    # The benchmark's baseline only, so it has no reference twin.
    a = numbered_ram(3)
    b = bytearray(a)
    b[PAGE + 5] ^= 1
    assert _native.memcmp_bandwidth_probe(a, b, PAGE) == 1
    assert _native.memcmp_bandwidth_probe(a, a, PAGE) == 0
    with pytest.raises(ValueError):
        _native.memcmp_bandwidth_probe(a, b[:PAGE], PAGE)


def test_environment_forces_the_reference():
    out = subprocess.run([sys.executable, "-c", "import native; print(native.IMPLEMENTATION)"],
                         env={**os.environ, "COLO_NATIVE": "0"}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


# ---- copy_pages: the COLO cache flushed into guest RAM -------------------------------

@IMPLS
def test_copy_pages_copies_only_the_listed_pages(impl):
    src = bytes(numbered_ram(8))
    with mmap.mmap(-1, 8 * PAGE) as dst:
        assert impl.copy_pages(dst, src, array("Q", [6, 1, 1]), PAGE) == 3 * PAGE
        for p in range(8):
            assert dst[p * PAGE:(p + 1) * PAGE] == (src[p * PAGE:(p + 1) * PAGE] if p in (1, 6) else bytes(PAGE))


@IMPLS
def test_copy_pages_rejects_bad_input_and_writes_nothing(impl):
    src = bytes(numbered_ram(4))
    dst = bytearray(4 * PAGE)
    for numbers in ([0, 4], [-1], [2**64]):
        with pytest.raises(ValueError):
            impl.copy_pages(dst, src, numbers, PAGE)
    with pytest.raises(ValueError):
        impl.copy_pages(dst, src[:3 * PAGE], [0], PAGE)        # sizes differ
    with pytest.raises(TypeError):
        impl.copy_pages(src, dst, [0], PAGE)                    # dst must be writable
    assert dst == bytes(4 * PAGE)


@IMPLS
@pytest.mark.parametrize("bitmap", [bytes(16), b"\xff" * 16, bytes([0b1110_0110, 0xFF, 0x01]),
                                    bytes([0x80, 0x01, 0, 0, 0xFF, 0xFF, 0x7F, 0]), os.urandom(512)],
                         ids=["empty", "full", "mixed", "across-bytes", "random"])
def test_bitmap_runs(impl, bitmap):
    bits = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    runs = impl.bitmap_runs(bitmap)
    assert isinstance(runs, array) and runs.typecode == "Q"
    pairs = list(zip(runs[::2], runs[1::2]))
    assert [p for first, count in pairs for p in range(first, first + count)] == bits
    assert all(a[0] + a[1] < b[0] for a, b in zip(pairs, pairs[1:]))      # maximal runs, ascending
    assert list(runs) == list(reference.bitmap_runs(bitmap))


# ---- equal_prefix: the COLO comparer's payload check ---------------------------------

@IMPLS
def test_equal_prefix(impl):
    data = os.urandom(100)
    assert impl.equal_prefix(data, data) == 100
    assert impl.equal_prefix(b"", b"") == 0 and impl.equal_prefix(b"", data) == 0
    assert impl.equal_prefix(data[:37], data) == 37                  # at most the shorter length
    for where in (0, 7, 8, 63, 99):                                  # inside and across 8-byte words
        changed = bytearray(data)
        changed[where] ^= 0x80
        assert impl.equal_prefix(data, changed) == where
        # Views from offset 5 (unaligned): a change before them is not seen.
        assert impl.equal_prefix(memoryview(changed)[5:], memoryview(data)[5:]) == (where - 5 if where >= 5 else 95)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80), st.integers(0, 3))
def test_equal_prefix_properties(a, tail, shift):
    b = a[:len(a) // 2] + tail                                       # a shared prefix, then anything
    expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert native.equal_prefix(a, b) == reference.equal_prefix(a, b) == expected
    # Unaligned views of the same bytes agree too.
    assert native.equal_prefix(memoryview(a)[shift:], memoryview(b)[shift:]) \
        == reference.equal_prefix(memoryview(a)[shift:], memoryview(b)[shift:])


# ---- parse_headers: the COLO network layer's frame decoding ---------------------------

def _reference_or_none(frame: bytes):
    """What the native twin must return: the reference's tuple for an IPv4 frame, None otherwise."""
    try:
        headers = reference.parse_headers(frame)
    except ValueError:
        return None
    return headers if headers[0] == 0x0800 else None


def test_parse_headers_on_crafted_frames():
    from test_netfilter_packet import MALFORMED, arp_frame, ether, icmp_frame, ipv4, tcp_frame, udp_frame
    well_formed = [tcp_frame(seq=0xFFFFFFF0, ack=5, payload=b"x" * 40), udp_frame(b"dns"), icmp_frame(),
                   icmp_frame(icmp_type=3), ether(ipv4(47, b"gre")), ether(ipv4(6, b"", flags_offset=0x2000)),
                   ether(ipv4(17, bytes.fromhex("0001000200080000")), vlan=5) + bytes(10),
                   *(ether(ipv4(47, b"", src=a, dst=b)) for a, b in (("0.0.0.0", "255.255.255.255"),
                                                                     ("10.9.0.1", "100.20.3.199")))]
    for frame in well_formed:
        assert native.parse_headers(frame) == reference.parse_headers(frame)
        assert native.parse_headers(frame)[0] == 0x0800
    assert native.parse_headers(tcp_frame(seq=0xFFFFFFF0))[12] == 0xFFFFFFF0      # u32 fields stay unsigned
    assert native.parse_headers(arp_frame()) is None and reference.parse_headers(arp_frame())[0] == 0x0806
    for name, frame in MALFORMED.items():
        assert native.parse_headers(frame) is None, name
        with pytest.raises(ValueError):
            reference.parse_headers(frame)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 2), st.sampled_from([1, 6, 17, 47]), st.integers(0, 60))
def test_parse_headers_agree_on_random_ipv4_frames(body, vlans, protocol, cut):
    from test_netfilter_packet import ether, ipv4
    frame = ether(ipv4(protocol, body))
    for _ in range(vlans):
        frame = frame[:12] + b"\x81\x00\x00\x07" + frame[12:]
    frame = frame[:max(len(frame) - cut, 0)]
    assert native.parse_headers(frame) == _reference_or_none(frame)
    mangled = bytearray(frame)
    if mangled:
        mangled[(cut * 7) % len(mangled)] ^= 0xFF                # a near miss reaches deep checks
    assert native.parse_headers(bytes(mangled)) == _reference_or_none(bytes(mangled))
