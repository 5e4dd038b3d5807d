"""Bad guests and bad images: each ends in a clear state and reason, and the
Python process stays healthy enough to run the next VM."""

import os
import struct
import threading

import pytest

from appliance.vmm import GUEST_PANICKED, SHUTDOWN, GuestImageError, VirtualMachine, VMConfig, VMError
from vmm_helpers import image, wait_for

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("mode, reason", [
    ("null", "triple fault"),
    ("priv", "triple fault"),
    ("badptr", "console text [0x7f0000000000, +0x10) is outside guest RAM"),
    ("badport", "unknown hypercall port 0x5f0"),
    ("v1net", "net read/write hypercalls are guest ABI v1; this VMM speaks guest ABI v2"),
])
def test_faulting_guest_is_stopped_with_a_reason(guest_images, vms, mode, reason):
    vm = vms.new("probe", f"mode={mode}")
    events = []
    vm.add_listener(lambda name, data: events.append((name, data)))
    vm.start()
    wait_for(lambda: vm.state == GUEST_PANICKED, what=f"{mode} to panic")
    assert reason in vm.stop_reason
    panics = [data for name, data in events if name == "GUEST_PANICKED"]
    assert panics and reason in panics[0]["reason"]
    with pytest.raises(VMError):
        vm.resume()
    # The process is fine: the next VM runs normally.
    healthy = vms.new("probe", "mode=exit status=0")
    healthy.start()
    wait_for(lambda: healthy.state == SHUTDOWN, what="a healthy guest to halt")


def test_non_elf_image_is_rejected(kvm_device, tmp_path):
    bogus = tmp_path / "bogus.elf"
    bogus.write_bytes(b"#!/bin/sh\necho not a guest\n")
    with pytest.raises(GuestImageError, match="not an ELF"):
        VirtualMachine(VMConfig(image=str(bogus)))


def test_truncated_elf_is_rejected(guest_images, tmp_path):
    with open(image("memdirty"), "rb") as f:
        head = f.read(200)
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(head)
    with pytest.raises(GuestImageError, match="past the end of the file|out of the file"):
        VirtualMachine(VMConfig(image=str(truncated)))


def test_missing_image_is_a_clear_error(kvm_device, tmp_path):
    with pytest.raises(GuestImageError, match="cannot read guest image"):
        VirtualMachine(VMConfig(image=str(tmp_path / "nope.elf")))


def test_segment_outside_ram_is_rejected(guest_images, tmp_path):
    with open(image("memdirty"), "rb") as f:
        data = bytearray(f.read())
    phoff = struct.unpack_from("<Q", data, 32)[0]
    struct.pack_into("<Q", data, phoff + 40, 64 << 20)  # first segment's p_memsz
    huge = tmp_path / "huge.elf"
    huge.write_bytes(bytes(data))
    with pytest.raises(GuestImageError, match="outside"):
        VirtualMachine(VMConfig(image=str(huge), memory_mib=8))


def test_bad_memory_size_is_rejected(guest_images):
    with pytest.raises(VMError, match="multiple of 2"):
        VirtualMachine(VMConfig(image=image("memdirty"), memory_mib=3))


def test_closing_vms_releases_every_fd_and_thread(guest_images):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    VirtualMachine(VMConfig(image=image("probe"), cmdline="mode=loop")).close()  # warm up imports
    fds, threads = open_fds(), threading.active_count()
    for mode in ("loop", "null", "exit"):
        vm = VirtualMachine(VMConfig(image=image("probe"), cmdline=f"mode={mode}"))
        vm.start()
        vm.throttle(50)
        vm.close()
        vm.close()  # idempotent
    assert open_fds() == fds
    assert threading.active_count() == threads
