"""Native hot paths with pure-Python references, chosen at import.

``COLO_NATIVE=0`` in the environment forces the reference implementation;
``IMPLEMENTATION`` says which one is in use.
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

__all__ = ["zero_pages", "changed_pages", "reference", "IMPLEMENTATION"]
