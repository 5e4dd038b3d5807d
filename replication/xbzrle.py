"""The XBZRLE page cache: the last copy of each page sent, to send deltas against.

Sized like QEMU's (``xbzrle-cache-size`` bytes, rounded down to a power of
two number of pages); the least recently sent page is evicted first.  The
codec itself (QEMU's format) is in ``native``.
"""
from __future__ import annotations

from collections import OrderedDict

import native


def cache_pages(cache_size: int, page_size: int) -> int:
    """How many pages QEMU's cache holds for ``cache_size`` bytes."""
    pages = max(cache_size // page_size, 1)
    return 1 << (pages.bit_length() - 1)


class XbzrleCache:
    def __init__(self, cache_size: int, page_size: int):
        self.capacity = cache_pages(cache_size, page_size)
        self.size = self.capacity * page_size
        self.page_size = page_size
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.overflows = 0
        self.pages_sent = 0
        self.bytes_sent = 0
        self.encoded_in = 0     # page bytes that were sent as deltas

    def encode(self, page: int, data: bytes) -> bytes | None:
        """A delta for ``page`` (b"" when unchanged), or None: send it whole.

        The cache keeps ``data`` as the page's new copy either way."""
        old = self._pages.get(page)
        self._pages[page] = data
        self._pages.move_to_end(page)
        if old is None:
            self.misses += 1
            if len(self._pages) > self.capacity:
                self._pages.popitem(last=False)
            return None
        self.hits += 1
        delta = native.xbzrle_encode(old, data, self.page_size - 64)
        if delta is None:
            self.overflows += 1
            return None
        if delta:
            self.pages_sent += 1
            self.bytes_sent += len(delta)
            self.encoded_in += self.page_size
        return delta

    def forget(self, first: int, count: int) -> None:
        """Pages [first, first+count) were sent another way (zero runs): their cached copies are stale."""
        if count <= len(self._pages):
            for page in range(first, first + count):
                self._pages.pop(page, None)
        else:
            for page in [p for p in self._pages if first <= p < first + count]:
                del self._pages[page]

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "cache-size": self.size,
            "bytes": self.bytes_sent,
            "pages": self.pages_sent,
            "cache-miss": self.misses,
            "cache-miss-rate": self.misses / lookups if lookups else 0.0,
            "encoding-rate": self.encoded_in / self.bytes_sent if self.bytes_sent else 0.0,
            "overflow": self.overflows,
        }
