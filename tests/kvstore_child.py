"""Run inside a node namespace by test_kvstore_guest.py: one process's life of a kvstore VM.

    kvstore_child.py boot    IMAGE STATE CMDLINE   boot, then on "save" pause, save state to STATE and exit
    kvstore_child.py restore IMAGE STATE CMDLINE   restore STATE in this new process, run until "quit"

Progress is reported as lines on stdout: "listening", "saved", "resumed", "closed".
"""
import sys

from appliance.vmm import VirtualMachine, VMConfig
from vmm_helpers import wait_for


def main():
    mode, image, state, cmdline = sys.argv[1:5]
    config = VMConfig(image=image, memory_mib=64, cmdline=cmdline, tap="tap0", bridge="br0",
                      start_paused=mode == "restore")
    with VirtualMachine(config) as vm:
        if mode == "boot":
            vm.start()
            wait_for(lambda: "listening" in vm.read_console(), timeout=10, what="kvstore to listen")
            print("listening", flush=True)
            assert sys.stdin.readline().strip() == "save"
            vm.pause()
            vm.save_state(state)
            print("saved", flush=True)
        else:
            assert vm.set_state("prelaunch", "inmigrate")
            vm.load_state(state)
            vm.resume()
            print("resumed", flush=True)
            assert sys.stdin.readline().strip() == "quit"
    print("closed", flush=True)


if __name__ == "__main__":
    main()
