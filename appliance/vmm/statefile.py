"""The VM state file: guest RAM plus the named, versioned state sections.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic b"COLOVMST"
    8       4     format version (1)
    12      4     reserved, 0
    16      8     RAM size in bytes (R)
    24      R     guest RAM, guest-physical 0 .. R
    24+R    4     section count (N)
    then N times:
            2     name length (L)
            L     name, UTF-8 (e.g. "cpu.regs", "dev.nic")
            4     section version
            8     payload length (P)
            P     payload
    end-32  32    BLAKE3 digest of every byte before it

A file whose digest, magic, version, RAM size or section framing does not
check out is rejected with StateFileError before any state is applied.
"""

import os
import struct

import blake3

from .errors import StateFileError

MAGIC = b"COLOVMST"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ")
_COUNT = struct.Struct("<I")
_NAME_LEN = struct.Struct("<H")
_SECTION_HEAD = struct.Struct("<IQ")
_DIGEST_SIZE = 32
_CHUNK = 8 << 20


def write_state_file(path, ram, sections):
    """Write RAM (a buffer) and [(name, version, payload)] to `path` atomically."""
    hasher = blake3.blake3()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        def put(data):
            f.write(data)
            hasher.update(data)

        put(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(ram)))
        view = memoryview(ram)
        for start in range(0, len(ram), _CHUNK):
            put(view[start:start + _CHUNK])
        view.release()
        put(_COUNT.pack(len(sections)))
        for name, version, payload in sections:
            encoded = name.encode()
            put(_NAME_LEN.pack(len(encoded)) + encoded + _SECTION_HEAD.pack(version, len(payload)))
            put(payload)
        f.write(hasher.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state_file(path, ram, check_sections):
    """Verify `path`, copy its RAM into `ram` (same size) and return its sections.

    check_sections(sections) runs before RAM is touched, so a file that is
    well-formed but incompatible leaves the VM as it was.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise StateFileError(f"cannot open state file {path}: {exc}") from exc
    with f:
        total = os.fstat(f.fileno()).st_size
        minimum = _HEADER.size + _COUNT.size + _DIGEST_SIZE
        if total < minimum:
            raise StateFileError(f"{path}: truncated ({total} bytes)")
        magic, version, _reserved, ram_size = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise StateFileError(f"{path}: not a VM state file (bad magic)")
        if version != FORMAT_VERSION:
            raise StateFileError(f"{path}: format version {version}, this VMM reads {FORMAT_VERSION}")
        if ram_size != len(ram):
            raise StateFileError(f"{path}: RAM size {ram_size} differs from this VM's {len(ram)}")
        if total < minimum + ram_size:
            raise StateFileError(f"{path}: truncated ({total} bytes, RAM alone is {ram_size})")
        _verify_digest(f, path, total - _DIGEST_SIZE)

        f.seek(_HEADER.size + ram_size)
        rest = f.read(total - _DIGEST_SIZE - _HEADER.size - ram_size)
        sections = _parse_sections(rest, path)
        check_sections(sections)
        f.seek(_HEADER.size)
        view = memoryview(ram)
        try:
            for start in range(0, ram_size, _CHUNK):
                f.readinto(view[start:start + _CHUNK])
        finally:
            view.release()
    return sections


def _verify_digest(f, path, body_size):
    hasher = blake3.blake3()
    f.seek(0)
    remaining = body_size
    while remaining:
        chunk = f.read(min(_CHUNK, remaining))
        if not chunk:
            raise StateFileError(f"{path}: truncated while reading")
        hasher.update(chunk)
        remaining -= len(chunk)
    if f.read(_DIGEST_SIZE) != hasher.digest():
        raise StateFileError(f"{path}: digest mismatch (corrupt or truncated file)")


def _parse_sections(data: bytes, path):
    try:
        (count,) = _COUNT.unpack_from(data, 0)
        offset = _COUNT.size
        sections = []
        for _ in range(count):
            (name_len,) = _NAME_LEN.unpack_from(data, offset)
            offset += _NAME_LEN.size
            name = data[offset:offset + name_len].decode()
            offset += name_len
            version, size = _SECTION_HEAD.unpack_from(data, offset)
            offset += _SECTION_HEAD.size
            if offset + size > len(data):
                raise StateFileError(f"{path}: section {name} runs past the end")
            sections.append((name, version, data[offset:offset + size]))
            offset += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: malformed section list: {exc}") from exc
    if offset != len(data):
        raise StateFileError(f"{path}: {len(data) - offset} stray bytes after the sections")
    return sections
