"""DeviceThread (appliance/vmm/devices/thread.py), the console's and the NIC's life cycle:
stop() returns only once serve() finished its work, a fault stops the VM once and parks the
thread until the next start(), close() ends the thread and its control fd."""

import os
import select
import threading

import pytest

from appliance.vmm.devices.thread import DeviceThread
from vmm_helpers import wait_for


class _Device:
    """serve() waits for stop() like the devices do, then does its pending work, or raises."""

    def __init__(self, raise_exc=None):
        self.raise_exc = raise_exc
        self.log = []
        self.faults = []
        self.thread = DeviceThread("test-device", "NIC", self.serve, self.faults.append)

    def serve(self):
        self.log.append("serve")
        if self.raise_exc:
            raise self.raise_exc
        while not self.thread.stopping():
            select.select([self.thread.control_fd], [], [])
        self.log.append("flushed")


def test_stop_returns_once_serve_finished_its_work():
    device = _Device()
    try:
        for _ in range(3):
            device.thread.start()
            wait_for(lambda: device.log[-1:] == ["serve"], what="serve() to run")
            device.thread.stop()
            assert device.log[-1] == "flushed"
        assert device.log == ["serve", "flushed"] * 3 and device.faults == []
    finally:
        device.thread.close()


@pytest.mark.parametrize("exc, reason", [
    (ValueError("TX producer index overrun"), "bad NIC ring: TX producer index overrun"),
    (RuntimeError("a VMM bug"), "VMM error in the NIC thread: RuntimeError('a VMM bug')"),
])
def test_a_fault_stops_the_vm_once_and_parks_until_the_next_start(exc, reason):
    device = _Device(raise_exc=exc)
    try:
        device.thread.start()
        wait_for(lambda: device.faults, what="the fault")
        stopper = threading.Thread(target=device.thread.stop)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "stop() wedged after a fault"
        assert device.faults == [reason] and device.log == ["serve"]  # parked: no retry, no spin
        device.thread.start()  # the VM resumed: the device is served again
        wait_for(lambda: len(device.faults) == 2, what="the second fault")
        assert device.log == ["serve", "serve"]
    finally:
        device.thread.close()


def test_close_ends_the_thread_and_closes_its_control_fd():
    device = _Device()
    device.thread.start()
    wait_for(lambda: device.log == ["serve"], what="serve() to run")
    fd = device.thread.control_fd
    device.thread.close()
    assert device.log == ["serve", "flushed"]
    assert not any(t.name == "test-device" for t in threading.enumerate())
    with pytest.raises(OSError):
        os.fstat(fd)
