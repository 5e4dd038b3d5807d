"""Every stream record's pack and read, without KVM: each read takes back exactly what its
pack wrote, and refuses what no sender may send."""
import pytest

from replication import stream
from replication.stream import BytesReader, StreamError


def body(record: bytes, kind: int) -> BytesReader:
    """A reader positioned after ``record``'s type byte, which must be ``kind``."""
    assert record[0] == kind, stream.RECORD_NAMES.get(record[0])
    return BytesReader(record[1:])


def test_page_index_and_compressed_length():
    record = stream.pack_page_index(stream.PAGES, [7, 3, 2**40])
    assert stream.read_page_index(body(record, stream.PAGES)) == [7, 3, 2**40]
    record = stream.pack_page_index(stream.COMPRESSED, [5], stream.CODEC_ZSTD) + stream.pack_compressed_length(99)
    reader = body(record, stream.COMPRESSED)
    assert reader.read_exact(1)[0] == stream.CODEC_ZSTD
    assert stream.read_page_index(reader) == [5]
    assert stream.read_compressed_length(reader, 1, 4096) == 99 and reader.left == 0
    with pytest.raises(StreamError, match="a compressed record of 10000 bytes for 1 pages"):
        stream.read_compressed_length(BytesReader(stream.pack_compressed_length(10000)), 1, 4096)
    for count in (0, stream.MAX_BATCH_PAGES + 1):
        with pytest.raises(StreamError, match=f"a record of {count} pages"):
            stream.read_page_index(BytesReader(stream.U32.pack(count)))


def test_zero_run_xbzrle_pass_end():
    assert stream.read_zero_run(body(stream.pack_zero_run(10, 2**31), stream.ZERO_RUN)) == (10, 2**31)
    assert stream.read_xbzrle(body(stream.pack_xbzrle(4, b"\x01\x02"), stream.XBZRLE), 4096) == (4, b"\x01\x02")
    with pytest.raises(StreamError, match="XBZRLE record of 5000 bytes"):
        stream.read_xbzrle(body(stream.pack_xbzrle(4, bytes(5000)), stream.XBZRLE), 4096)
    assert stream.read_pass_end(body(stream.pack_pass_end(stream.FINAL_PASS), stream.PASS_END)) == stream.FINAL_PASS


def test_device_and_end():
    sections = [("cpu.regs", 1, b"\x00" * 40), ("dev.nic", 1, b"")]
    data = b"".join(stream.pack_device(*s) for s in sections)
    reader = BytesReader(data)
    read = []
    while reader.left:
        assert reader.read_exact(1)[0] == stream.DEVICE
        read.append(stream.read_device(reader))
    assert read == sections
    digests = (b"r" * 32, stream.devices_digest(sections))
    assert stream.read_end(body(stream.pack_end(*digests), stream.END), False) == (*digests, None)
    assert stream.read_end(body(stream.pack_end(*digests, b"f" * 32), stream.END), True) == (*digests, b"f" * 32)
    huge = stream.U16.pack(1) + b"x" + stream.DEVICE_TAIL.pack(1, stream.MAX_DEVICE_PAYLOAD + 1)
    with pytest.raises(StreamError, match="device section x claims"):
        stream.read_device(BytesReader(huge))


def test_abort_reply_and_colo_records():
    assert stream.read_abort(body(stream.pack_abort("gave up ✓"), stream.ABORT)) == "gave up ✓"
    assert stream.read_reply(BytesReader(stream.pack_reply(False, "no"))) == (False, "no")
    assert stream.read_reply(BytesReader(stream.pack_reply(True))) == (True, "")
    # QEMU's COLOMessage values, big-endian on the wire; vmstate-size (4) carries a u64 size.
    assert stream.pack_colo(1) == bytes([stream.COLO, 0, 0, 0, 1])
    assert stream.pack_colo(4, 2**33) == bytes([stream.COLO, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 0])
    assert stream.read_colo(body(stream.pack_colo(4, 2**33), stream.COLO), lambda v: v == 4) == (4, 2**33)
    assert stream.read_colo(body(stream.pack_colo(5), stream.COLO), lambda v: v == 4) == (5, None)
    assert stream.read_colo_hello(body(stream.pack_colo_hello(40000, 40001), stream.COLO_HELLO)) == (40000, 40001, None)
    assert stream.read_colo_hello(body(stream.pack_colo_hello(40000), stream.COLO_HELLO)) == (40000, 0, None)
    key = bytes(range(32))
    assert stream.read_colo_hello(body(stream.pack_colo_hello(40000, 1, key), stream.COLO_HELLO), keyed=True) \
        == (40000, 1, key)


def test_bytes_reader_refuses_to_run_past_its_buffer():
    reader = BytesReader(b"abc")
    assert reader.read_exact(2) == b"ab"
    with pytest.raises(StreamError, match="runs past the end"):
        reader.read_exact(2)


def test_header_round_trip_and_refusals():
    header = stream.Header(stream.FLAG_COLO | stream.FLAG_VERIFY_RAM, "5f1c0b8e-2d7a-4c1e-9a53-0c6f1d2e3b4a",
                           4096, 64 << 20, 0)
    back = stream.Header.unpack(header.pack())
    assert (back.flags, back.vm_uuid, back.ram_size) == (header.flags, header.vm_uuid, header.ram_size)
    with pytest.raises(StreamError, match="bad magic"):
        stream.Header.unpack(b"X" + header.pack()[1:])
