"""Pure-Python twins of the C hot paths in ``_native.c``: same contracts, used as
the reference in tests and wherever the extension is unavailable or disabled."""


def _check(length: int, page_size: int) -> int:
    if page_size <= 0 or length % page_size:
        raise ValueError("buffer length must be a multiple of a positive page size")
    return length // page_size


def zero_pages(buf, page_size: int) -> bytes:
    """One byte per page: 1 when the page is all zero."""
    view = memoryview(buf).cast("B")
    pages = _check(len(view), page_size)
    zero = bytes(page_size)
    return bytes(view[i * page_size:(i + 1) * page_size] == zero for i in range(pages))


def changed_pages(buf, shadow, page_size: int) -> bytes:
    """One byte per page: 1 when ``buf`` and ``shadow`` differ."""
    a, b = memoryview(buf).cast("B"), memoryview(shadow).cast("B")
    if len(a) != len(b):
        raise ValueError("buffer and shadow differ in length")
    pages = _check(len(a), page_size)
    return bytes(a[i * page_size:(i + 1) * page_size] != b[i * page_size:(i + 1) * page_size]
                 for i in range(pages))
