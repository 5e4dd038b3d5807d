"""Booting guests, run-state control and the memdirty invariant on a live VM."""

import re
import time

import pytest

from appliance.vmm import PAUSED, RUNNING, SHUTDOWN
from vmm_helpers import assert_one_step, last_pass, memdirty_layout, page_counters, wait_for

pytestmark = pytest.mark.kvm


def test_memdirty_boots_and_keeps_its_invariant(guest_images, vms):
    vm = vms.new("memdirty", "mib=8 rate=200")
    vm.start()
    base, pages = memdirty_layout(vm)
    assert pages == 8 * 256
    ram = vm.ram_regions()[0][3]
    for _ in range(5):
        time.sleep(0.05)
        vm.pause()
        assert vm.state == PAUSED
        assert_one_step(page_counters(ram, base, pages))
        vm.resume()
    wait_for(lambda: last_pass(vm.read_console()) >= 2, what="two memdirty passes")
    assert vm.state == RUNNING


def test_pause_stops_the_guest_and_resume_continues(guest_images, vms):
    vm = vms.new("memdirty", "mib=4 rate=0")
    events = []
    vm.add_listener(lambda name, data: events.append(name))
    vm.start()
    base, pages = memdirty_layout(vm)
    ram = vm.ram_regions()[0][3]
    wait_for(lambda: last_pass(vm.read_console()) >= 1, what="a pass")
    vm.pause()
    frozen = page_counters(ram, base, pages)
    clock = vm.guest_monotonic_ns()
    time.sleep(0.2)
    assert page_counters(ram, base, pages) == frozen, "guest RAM changed while paused"
    assert vm.guest_monotonic_ns() == clock, "guest time ran while paused"
    vm.resume()
    wait_for(lambda: page_counters(ram, base, pages) != frozen, what="the guest to run again")
    assert events == ["RESUME", "STOP", "RESUME"]


def test_guest_exit_status_and_shutdown_event(guest_images, vms):
    vm = vms.new("probe", "mode=exit status=7")
    events = []
    vm.add_listener(lambda name, data: events.append((name, data)))
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, what="the guest to halt")
    assert vm.exit_status == 7
    assert "exiting with 7" in vm.read_console()
    assert events[-1] == ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})


def test_sse_code_runs(guest_images, vms):
    vm = vms.new("probe", "mode=sse")
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, what="the guest to halt")
    assert vm.exit_status == 0 and "sse 749250" in vm.read_console()


def test_a_guest_spinning_without_exits_can_be_paused_and_shut_down(guest_images, vms):
    vm = vms.new("probe", "mode=loop")
    vm.start()
    wait_for(lambda: "looping" in vm.read_console(), what="the guest to loop")
    started = time.monotonic()
    vm.pause()
    vm.resume()
    vm.shutdown()
    assert time.monotonic() - started < 1.0
    assert vm.state == SHUTDOWN


def test_start_paused_stays_in_prelaunch(guest_images, vms):
    vm = vms.new("probe", "mode=exit status=0", start_paused=True)
    vm.start()
    time.sleep(0.1)
    assert vm.state == "prelaunch" and vm.read_console() == ""
    assert vm.set_state("prelaunch", "inmigrate")
    assert not vm.set_state("prelaunch", "inmigrate")
    vm.resume()
    wait_for(lambda: vm.state == SHUTDOWN, what="the guest to halt")


def test_throttle_slows_the_guest(guest_images, vms):
    vm = vms.new("memdirty", "mib=4 rate=0")
    vm.start()
    memdirty_layout(vm)

    def passes_per_second():
        wait_for(lambda: last_pass(vm.read_console()) > 0, what="a pass")
        before, started = last_pass(vm.read_console()), time.monotonic()
        time.sleep(1.0)
        return (last_pass(vm.read_console()) - before) / (time.monotonic() - started)

    full_speed = passes_per_second()
    vm.throttle(90)
    throttled = passes_per_second()
    vm.throttle(0)
    assert throttled < full_speed * 0.5, (full_speed, throttled)


def test_console_log_file(guest_images, vms, tmp_path):
    log = tmp_path / "console.log"
    vm = vms.new("probe", "mode=exit status=0", console_log=str(log))
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, what="the guest to halt")
    assert re.search("exiting with 0", log.read_text())


def test_pause_is_prompt_while_the_guest_blocks_in_poll(guest_images, vms):
    vm = vms.new("probe", "mode=echo")  # no NIC: the guest sleeps in 1 s polls
    vm.start()
    wait_for(lambda: "echo ready" in vm.read_console(), what="the guest to idle")
    time.sleep(0.1)
    for _ in range(5):
        started = time.monotonic()
        vm.pause()
        assert time.monotonic() - started < 0.2
        vm.resume()


def test_rapid_pause_resume_never_breaks_the_guest(guest_images, vms):
    # rate-limited memdirty makes time and poll hypercalls all the time, so many
    # pauses land on a pending port-I/O exit that must be completed first.
    vm = vms.new("memdirty", "mib=4 rate=400")
    vm.start()
    base, pages = memdirty_layout(vm)
    ram = vm.ram_regions()[0][3]
    for _ in range(100):
        vm.pause()
        assert_one_step(page_counters(ram, base, pages))
        vm.resume()
        time.sleep(0.001)
    before = last_pass(vm.read_console())
    wait_for(lambda: last_pass(vm.read_console()) > before, what="more passes")
    assert vm.state == RUNNING and "invariant broken" not in vm.read_console()
