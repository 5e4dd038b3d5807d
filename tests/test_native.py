"""Every native hot path agrees with its pure-Python reference on the same cases."""
import os
import subprocess
import sys

import pytest

import native
from native import reference

PAGE = 4096


def cases():
    zero = bytes(PAGE * 4)
    mixed = bytearray(PAGE * 5)
    mixed[PAGE + 17] = 1
    mixed[4 * PAGE - 1] = 0xFF
    return [zero, bytes(mixed), os.urandom(PAGE * 3), b""]


def test_native_is_in_use():
    assert native.IMPLEMENTATION == "native"


@pytest.mark.parametrize("impl", [native, reference], ids=["native", "reference"])
def test_zero_pages(impl):
    expected = [b"\x01" * 4, b"\x01\x00\x01\x00\x01", b"\x00" * 3, b""]
    assert [impl.zero_pages(c, PAGE) for c in cases()] == expected


@pytest.mark.parametrize("impl", [native, reference], ids=["native", "reference"])
def test_changed_pages(impl):
    base = bytes(cases()[1])
    changed = bytearray(base)
    changed[2 * PAGE] = 9
    changed[4 * PAGE + 100] = 9
    assert impl.changed_pages(changed, base, PAGE) == b"\x00\x00\x01\x00\x01"
    assert impl.changed_pages(base, base, PAGE) == b"\x00" * 5


@pytest.mark.parametrize("impl", [native, reference], ids=["native", "reference"])
def test_bad_arguments(impl):
    with pytest.raises(ValueError):
        impl.zero_pages(bytes(100), PAGE)
    with pytest.raises(ValueError):
        impl.changed_pages(bytes(PAGE), bytes(2 * PAGE), PAGE)


def test_environment_forces_the_reference():
    out = subprocess.run([sys.executable, "-c", "import native; print(native.IMPLEMENTATION)"],
                         env={**os.environ, "COLO_NATIVE": "0"}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
