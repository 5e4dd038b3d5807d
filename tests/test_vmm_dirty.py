"""Dirty logging: every page whose content changed, by the guest or by the VMM
on the guest's behalf, must be in the fetched bitmap."""

import os
import time

import blake3
import pytest

from appliance.vmm import dirty_pages
from vmm_helpers import PAGE, memdirty_layout, wait_for

pytestmark = pytest.mark.kvm


def _digests(ram, pages):
    return [blake3.blake3(ram[i * PAGE:(i + 1) * PAGE]).digest() for i in range(pages)]


def _assert_changes_are_logged(vm, rounds, between_rounds=lambda: None, run_seconds=0.15):
    """Round by round: run, pause, compare page digests with the last round's,
    and check every changed page is in the bitmap.  Returns the changed pages."""
    ram = vm.ram_regions()[0][3]
    pages = vm.ram_regions()[0][1] // PAGE
    vm.pause()
    vm.fetch_dirty_bitmap()
    shadow = _digests(ram, pages)
    all_changed = set()
    for _ in range(rounds):
        between_rounds()
        vm.resume()
        time.sleep(run_seconds)
        vm.pause()
        current = _digests(ram, pages)
        logged = set(dirty_pages(vm.fetch_dirty_bitmap()))
        changed = {i for i in range(pages) if current[i] != shadow[i]}
        assert changed <= logged, f"pages changed but not logged: {sorted(changed - logged)[:10]}"
        all_changed |= changed
        shadow = current
    return all_changed


def test_guest_writes_are_all_logged(guest_images, vms):
    vm = vms.new("memdirty", "mib=8 rate=0")
    vm.start_dirty_tracking()
    vm.start()
    base, pages = memdirty_layout(vm)
    changed = _assert_changes_are_logged(vm, rounds=4)
    working_set = set(range(base // PAGE, base // PAGE + pages))
    assert working_set <= changed, "memdirty's pages should have changed"


def test_vmm_writes_to_guest_ram_are_logged(guest_images, vms, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * 512))
    vm = vms.new("probe", "mode=disk", disk=str(disk))
    vm.start_dirty_tracking()
    vm.start()
    wait_for(lambda: "disk ok" in vm.read_console(), what="the disk probe")

    def new_disk_content():  # the guest reads these sectors into its buffers: VMM writes
        with open(disk, "r+b") as f:
            f.write(os.urandom(8 * 512))

    changed = _assert_changes_are_logged(vm, rounds=3, between_rounds=new_disk_content)
    assert len(changed) > 8


def test_vmm_write_while_paused_shows_up_in_the_next_fetch(guest_images, vms):
    vm = vms.new("probe", "mode=loop")
    vm.start_dirty_tracking()
    vm.start()
    vm.pause()
    vm.fetch_dirty_bitmap()
    vm.memory.write(0x200000 - 3, b"abcdef")  # straddles two pages
    assert set(dirty_pages(vm.fetch_dirty_bitmap())) == {0x1FF, 0x200}
    assert set(dirty_pages(vm.fetch_dirty_bitmap())) == set()


def test_fetch_without_tracking_is_an_error(guest_images, vms):
    vm = vms.new("probe", "mode=loop")
    with pytest.raises(RuntimeError, match="not started"):
        vm.fetch_dirty_bitmap()
    vm.start_dirty_tracking()
    vm.stop_dirty_tracking()
    with pytest.raises(RuntimeError):
        vm.fetch_dirty_bitmap()
