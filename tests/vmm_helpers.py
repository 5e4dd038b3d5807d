"""Helpers shared by the tests/test_vmm_*.py files: guest images, waiting, memdirty checks,
a plain live migration between two VMs of this process."""

import os
import re
import subprocess
import time

import pytest

from appliance.vmm import VirtualMachine, VMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_BUILD = os.path.join(REPO, "build", "guest")
PAGE = 4096


@pytest.fixture(scope="session")
def guest_images(kvm_device):
    """Build the guests once per session (make is a no-op when they are current)."""
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "appliance", "guest"), f"BUILD={GUEST_BUILD}"],
                   check=True)
    return GUEST_BUILD


def image(name):
    return os.path.join(GUEST_BUILD, f"{name}.elf")


@pytest.fixture
def vms():
    """Create VMs through this list's `new(...)`; all are closed after the test."""
    created = []

    class Factory:
        @staticmethod
        def new(guest, cmdline="", memory_mib=32, **config):
            vm = VirtualMachine(VMConfig(image=image(guest), cmdline=cmdline, memory_mib=memory_mib, **config))
            created.append(vm)
            return vm

    yield Factory
    for vm in created:
        vm.close()


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def memdirty_layout(vm):
    """(base gpa, page count) of memdirty's working set, from its first console line."""
    wait_for(lambda: "memdirty: base=" in vm.read_console(), what="memdirty to start")
    match = re.search(r"memdirty: base=0x([0-9a-f]+) pages=(\d+)", vm.read_console())
    return int(match.group(1), 16), int(match.group(2))


def last_pass(console_text):
    passes = re.findall(r"^pass (\d+)$", console_text, re.M)
    return int(passes[-1]) if passes else 0


def page_counters(ram, base, pages):
    """The first byte of each working-set page, read straight from the guest RAM mapping."""
    return ram[base:base + pages * PAGE:PAGE]


def assert_one_step(counters):
    """memdirty's invariant: pages [0,k) hold c+1 and [k,n) hold c (mod 256)."""
    first = counters[0]
    step = next((i for i, value in enumerate(counters) if value != first), len(counters))
    below = (first - 1) % 256
    broken = [i for i in range(step, len(counters)) if counters[i] != below]
    assert not broken, f"pages {broken[:5]}... break the one-step invariant (step at {step})"


def migrate_in_process(src, dst, tmp_path):
    """Precopy from the running `src` to `dst` (in state inmigrate, left paused) over a UNIX
    socket, no capability on and no bandwidth limit; asserts both ends completed."""
    from appliance.control.migration_settings import DEFAULT_PARAMETERS
    from replication.destination import MigrationDestination
    from replication.source import MigrationSource
    from replication.transport import Listener
    caps = {"xbzrle": False, "compress": False, "multifd": False, "auto-converge": False, "events": True,
            "pause-before-switchover": False, "validate-uuid": False, "return-path": False, "release-ram": False}
    uri = f"unix:{tmp_path}/mig.sock"
    source = MigrationSource(src, uri, caps, {**DEFAULT_PARAMETERS, "max-bandwidth": 0}, {}, lambda *_: None)
    destination = MigrationDestination(dst, Listener(uri), caps, False, lambda *_: None)
    destination.start()
    source.start()
    source.join(60)
    destination.join(60)
    assert source.status == "completed" and destination.status == "completed", (source.error, destination.error)
