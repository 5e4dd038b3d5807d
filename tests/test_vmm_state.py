"""Saving and restoring the complete VM state, across processes, and rejecting bad state."""

import json
import os
import subprocess
import sys
import time

import pytest

from appliance.vmm import PAUSED, StateFileError, VMError
from vmm_helpers import REPO, assert_one_step, image, last_pass, memdirty_layout, page_counters, wait_for

pytestmark = pytest.mark.kvm


def _paused_memdirty(vms, **config):
    vm = vms.new("memdirty", "mib=8 rate=0", **config)
    vm.start()
    base, pages = memdirty_layout(vm)
    wait_for(lambda: last_pass(vm.read_console()) >= 2, what="memdirty passes")
    vm.pause()
    return vm, base, pages


def test_memdirty_continues_after_restore_in_a_new_process(guest_images, vms, tmp_path):
    vm, base, pages = _paused_memdirty(vms)
    saved_pass = last_pass(vm.read_console())
    saved_clock = vm.guest_monotonic_ns()
    state_path = tmp_path / "vm.state"
    vm.save_state(state_path)
    vm.close()

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run(
        [sys.executable, os.path.join(tests_dir, "vmm_restore_child.py"), str(state_path), image("memdirty"),
         "mib=8 rate=0", "32", str(base), str(pages), str(saved_pass)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, tests_dir])})
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["state_after_load"] == PAUSED
    assert report["clock_after_load"] == saved_clock, "guest monotonic time jumped across restore"
    assert report["clock_after_run"] > saved_clock
    assert report["last_pass"] > saved_pass
    assert "invariant broken" not in report["console"]
    assert report["state"] == PAUSED


def test_save_requires_a_stopped_vm(guest_images, vms, tmp_path):
    vm = vms.new("memdirty", "mib=4 rate=0")
    vm.start()
    with pytest.raises(VMError, match="pause"):
        vm.save_state(tmp_path / "running.state")


@pytest.fixture
def saved_state(guest_images, vms, tmp_path):
    vm, _, _ = _paused_memdirty(vms)
    path = tmp_path / "vm.state"
    vm.save_state(path)
    return path


def _fresh(vms):
    return vms.new("memdirty", "mib=8 rate=0", start_paused=True)


def test_corrupt_state_file_is_rejected(saved_state, vms):
    data = bytearray(saved_state.read_bytes())
    data[len(data) // 2] ^= 0x40
    saved_state.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="digest mismatch"):
        _fresh(vms).load_state(saved_state)


def test_truncated_state_file_is_rejected(saved_state, vms):
    data = saved_state.read_bytes()
    for size in (10, 1000, len(data) - 1):
        saved_state.write_bytes(data[:size])
        with pytest.raises(StateFileError, match="truncated|digest mismatch"):
            _fresh(vms).load_state(saved_state)


def test_not_a_state_file_is_rejected(vms, guest_images, tmp_path):
    path = tmp_path / "junk.state"
    path.write_bytes(os.urandom(64 << 10))
    with pytest.raises(StateFileError, match="bad magic"):
        _fresh(vms).load_state(path)


def test_state_for_a_different_ram_size_is_rejected(saved_state, vms):
    other = vms.new("memdirty", "mib=8 rate=0", memory_mib=64, start_paused=True)
    with pytest.raises(StateFileError, match="RAM size"):
        other.load_state(saved_state)


def test_section_mismatches_are_rejected(guest_images, vms):
    vm, _, _ = _paused_memdirty(vms)
    sections = vm.save_devices()
    target = _fresh(vms)
    with pytest.raises(StateFileError, match="missing"):
        target.load_devices(sections[1:])
    with pytest.raises(StateFileError, match="version"):
        target.load_devices([(name, version + 1, payload) for name, version, payload in sections])
    with pytest.raises(StateFileError, match="bytes"):
        target.load_devices([(name, version, payload[:-1] if name == "cpu.regs" else payload)
                             for name, version, payload in sections])
    target.load_devices(sections)  # the intact list still loads


def test_loading_into_a_running_vm_is_refused(saved_state, vms):
    vm = vms.new("memdirty", "mib=8 rate=0")
    vm.start()
    with pytest.raises(VMError):
        vm.load_state(saved_state)


def test_sections_are_named_and_versioned(guest_images, vms):
    vm, _, _ = _paused_memdirty(vms)
    names = {name for name, version, payload in vm.save_devices()}
    assert {"cpu.regs", "cpu.sregs", "cpu.msrs", "cpu.mp_state", "vm.clock", "dev.console"} <= names


def test_rollback_to_an_in_memory_checkpoint(guest_images, vms):
    """What COLO does on the secondary: keep a checkpoint, run on, then go back to it."""
    vm, base, pages = _paused_memdirty(vms)
    ram = vm.ram_regions()[0][3]
    checkpoint_ram, checkpoint = bytes(ram), vm.save_devices()
    checkpoint_clock = vm.guest_monotonic_ns()
    vm.resume()
    time.sleep(0.2)
    vm.pause()
    assert bytes(ram) != checkpoint_ram
    ram[:] = checkpoint_ram
    vm.load_devices(checkpoint)
    assert vm.guest_monotonic_ns() == checkpoint_clock
    vm.resume()
    passes = last_pass(vm.read_console())
    wait_for(lambda: last_pass(vm.read_console()) > passes, what="passes after the rollback")
    vm.pause()
    assert "invariant broken" not in vm.read_console()
    assert_one_step(page_counters(ram, base, pages))
