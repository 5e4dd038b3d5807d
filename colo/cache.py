"""The secondary's colo cache (QEMU's colo_init_ram_cache / colo_flush_ram_cache).

A second memfd as large as guest RAM holds the primary's RAM as of the last
checkpoint.  Received pages land here, never in the SVM's RAM; a checkpoint
is loaded by copying into the SVM's RAM every page that either the PVM (the
pages received) or the SVM (its own dirty log) changed since the last one.
"""
from __future__ import annotations

import mmap
import os

import native
from replication.ram import data_extents

PAGE_SIZE = 4096


class ColoCache:
    def __init__(self, ram_fd: int, ram, size: int):
        """A copy of guest RAM ``ram`` (backed by memfd ``ram_fd``; its holes stay holes)."""
        self.size = size
        self.fd = os.memfd_create("colo-cache", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        with memoryview(ram) as view:
            for start, end in data_extents(ram_fd, size):
                self.map[start:end] = view[start:end]

    def flush(self, ram, bitmap: bytes) -> int:
        """Copy the pages set in ``bitmap`` (KVM layout) from the cache into ``ram``; bytes copied."""
        return native.copy_pages(ram, self.map, native.bitmap_pages(bitmap), PAGE_SIZE)

    def close(self) -> None:
        if not self.map.closed:
            self.map.close()
            os.close(self.fd)
