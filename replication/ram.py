"""Guest RAM as the migration engine sees it: pages, holes, and a digest kept current.

Pages the guest never touched are holes in the memfd (SEEK_HOLE/SEEK_DATA),
so an idle guest's RAM is known to be zero without reading it.  The digest
is the two-level blake3 of stream.py: per-chunk digests are recomputed only
for chunks marked stale, so the final digest costs time in proportion to
what changed since the last refresh, not to the size of RAM.
"""
from __future__ import annotations

import errno
import os
import threading

import blake3

CHUNK_SIZE = 2 << 20
ZERO_CHUNK_DIGEST = blake3.blake3(bytes(CHUNK_SIZE)).digest()


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of ``fd`` that may hold data; everything else is a hole (zero)."""
    extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after pos
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        pos = end
    return extents


class RamDigest:
    def __init__(self, ram, size: int, stale_ranges: list[tuple[int, int]]):
        """``stale_ranges``: byte ranges whose content is not known to be zero."""
        if size % CHUNK_SIZE:
            raise ValueError(f"RAM size {size} is not a multiple of {CHUNK_SIZE}")
        self.ram = memoryview(ram)
        self.chunks = [ZERO_CHUNK_DIGEST] * (size // CHUNK_SIZE)
        self.stale: set[int] = set()
        self._lock = threading.Lock()      # multifd receivers mark while the main thread refreshes
        for start, end in stale_ranges:
            self.mark_range(start, end)

    def mark_range(self, start: int, end: int) -> None:
        if end > start:
            with self._lock:
                self.stale.update(range(start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1))

    def refresh(self) -> int:
        """Rehash the stale chunks; returns how many bytes were hashed."""
        with self._lock:
            stale, self.stale = self.stale, set()
        for c in stale:
            self.chunks[c] = blake3.blake3(self.ram[c * CHUNK_SIZE:(c + 1) * CHUNK_SIZE],
                                           max_threads=blake3.blake3.AUTO).digest()
        return len(stale) * CHUNK_SIZE

    def digest(self) -> bytes:
        self.refresh()
        return blake3.blake3(b"".join(self.chunks)).digest()


def full_ram_digest(ram, size: int, fd: int | None) -> bytes:
    """The stream's two-level digest computed from scratch over ALL of ``ram``, trusting no
    dirty log (--verify-ram).  With ``fd``, the memfd behind ``ram``, its holes are not read
    (which would allocate them): they are zero by the kernel's own account, not the dirty log's."""
    digest = RamDigest(ram, size, data_extents(fd, size) if fd is not None else [(0, size)])
    try:
        return digest.digest()
    finally:
        digest.ram.release()
