"""Native hot paths with pure-Python references, chosen at import.

``COLO_NATIVE=0`` in the environment forces the reference implementation;
``IMPLEMENTATION`` says which one is in use.  See native/reference.py for the
contracts.  ``_native.memcmp_bandwidth_probe`` is a benchmark baseline only and
is not exported.
"""
import os

from . import reference

if os.environ.get("COLO_NATIVE", "1") == "0":
    _impl = reference
    IMPLEMENTATION = "reference"
else:
    from . import _native as _impl  # built by `pip install -e .`; a missing build is an error
    IMPLEMENTATION = "native"

zero_pages = _impl.zero_pages
changed_pages = _impl.changed_pages
xbzrle_encode = _impl.xbzrle_encode
xbzrle_decode = _impl.xbzrle_decode
bitmap_pages = _impl.bitmap_pages
bitmap_count = _impl.bitmap_count
bitmap_runs = _impl.bitmap_runs
gather_pages = _impl.gather_pages
scatter_pages = _impl.scatter_pages
copy_pages = _impl.copy_pages
equal_prefix = _impl.equal_prefix
parse_headers = _impl.parse_headers
ring_tx_pop = _impl.ring_tx_pop
ring_rx_push = _impl.ring_rx_push
ring_arm = _impl.ring_arm
ring_serve_tap = _impl.ring_serve_tap
bitmap_mark = _impl.bitmap_mark
bitmap_take = _impl.bitmap_take

__all__ = ["zero_pages", "changed_pages", "xbzrle_encode", "xbzrle_decode", "bitmap_pages",
           "bitmap_count", "bitmap_runs", "gather_pages", "scatter_pages", "copy_pages", "equal_prefix", "parse_headers",
           "ring_tx_pop", "ring_rx_push", "ring_arm",
           "ring_serve_tap", "bitmap_mark", "bitmap_take", "reference", "IMPLEMENTATION"]

if IMPLEMENTATION == "native":
    # The COLO network layer.  References: netfilter.compare.PyComparer, netfilter.rewriter.PyRewriter,
    # and for the datapath (native/colo_path.c) the threads of netfilter.primary and netfilter.secondary.
    Comparer = _impl.Comparer
    Rewriter = _impl.Rewriter
    ColoPrimary = _impl.ColoPrimary
    ColoSecondary = _impl.ColoSecondary
    __all__ += ["Comparer", "Rewriter", "ColoPrimary", "ColoSecondary"]
