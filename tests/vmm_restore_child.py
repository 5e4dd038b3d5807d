"""Run by test_vmm_state.py in a fresh process: restore a memdirty state file and
report, as one JSON line, what the restored guest did."""

import json
import sys
import time

from appliance.vmm import VirtualMachine, VMConfig
from vmm_helpers import assert_one_step, last_pass, page_counters, wait_for


def main():
    state_path, image_path, cmdline, memory_mib, base, pages, saved_pass = sys.argv[1:8]
    base, pages, saved_pass = int(base), int(pages), int(saved_pass)
    vm = VirtualMachine(VMConfig(image=image_path, cmdline=cmdline, memory_mib=int(memory_mib),
                                 start_paused=True))
    try:
        assert vm.set_state("prelaunch", "inmigrate")
        vm.load_state(state_path)
        report = {"state_after_load": vm.state, "clock_after_load": vm.guest_monotonic_ns()}
        ram = vm.ram_regions()[0][3]
        assert_one_step(page_counters(ram, base, pages))
        vm.resume()
        wait_for(lambda: last_pass(vm.read_console()) > saved_pass, timeout=10, what="new passes")
        time.sleep(0.3)
        vm.pause()
        assert_one_step(page_counters(ram, base, pages))
        report.update(state=vm.state, last_pass=last_pass(vm.read_console()), console=vm.read_console(),
                      clock_after_run=vm.guest_monotonic_ns())
    finally:
        vm.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
