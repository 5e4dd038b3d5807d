"""Devices: state round trips, the block device through a guest, the tap NIC."""

import os
import socket
import struct

import pytest
from pyroute2 import IPRoute

from appliance.vmm import BlockState, ConsoleState, NicState, SHUTDOWN, StateFileError
from vmm_helpers import wait_for


@pytest.mark.parametrize("state", [
    ConsoleState(bytes_written=12345),
    NicState(mac=bytes.fromhex("525400abcdef"), rx_frames=1, tx_frames=2, rx_dropped=3, tx_dropped=4),
    NicState(mac=bytes(6), injected=[b"\x01" * 60, b"frame two" * 100]),
    BlockState(sectors=2048, reads=5, writes=6),
])
def test_device_state_round_trip(state):
    data = state.save()
    assert type(state).restore(data) == state
    with pytest.raises(StateFileError):
        type(state).restore(data + b"\0")


@pytest.mark.kvm
def test_block_device_round_trip_through_the_guest(guest_images, vms, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * 512))
    vm = vms.new("probe", "mode=disk", disk=str(disk))
    vm.start()
    wait_for(lambda: "disk ok sectors=16" in vm.read_console() or vm.state == SHUTDOWN,
             what="the disk probe")
    assert "disk ok sectors=16" in vm.read_console(), vm.read_console()
    assert disk.read_bytes()[:4096] == bytes((i * 7 + 3) & 0xFF for i in range(4096))
    vm.pause()
    saved = dict((name, payload) for name, _, payload in vm.save_devices())
    assert BlockState.restore(saved["dev.block"]).writes >= 1


@pytest.mark.kvm
@pytest.mark.netns
def test_nic_passes_frames_both_ways_through_the_hook(guest_images, vms):
    tap = f"vmmt{os.getpid() % 100000}"
    vm = vms.new("probe", "mode=echo", tap=tap, mac="52:54:00:00:00:42")
    seen, held = [], []

    def hook(direction, frame):
        seen.append(direction)
        if direction == "tx" and b"hold me" in frame:
            held.append(frame)
            return None
        return frame

    vm.nic.hook = hook
    vm.start()
    wait_for(lambda: "echo ready" in vm.read_console(), what="the echo guest")
    ethertype = 0x88B5  # local experimental
    guest_mac, host_mac = bytes.fromhex("525400000042"), bytes.fromhex("02aabbccddee")
    header = guest_mac + host_mac + struct.pack("!H", ethertype)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as sock:
        sock.bind((tap, 0))
        sock.settimeout(5)

        def echoed():
            while True:
                reply = sock.recv(2048)
                if reply[:6] == host_mac:
                    return reply

        payload = b"hello guest" * 10
        sock.send(header + payload)
        reply = echoed()
        assert reply[6:12] == guest_mac and reply[14:14 + len(payload)] == payload
        assert "rx" in seen and "tx" in seen

        # Injected frames reach the guest without the hook; held frames leave on transmit().
        vm.nic.inject_rx(header + b"hold me" * 10)
        wait_for(lambda: held, what="the hook to hold the echo")
        assert vm.nic.transmit(held[0])
        assert b"hold me" in echoed()
    vm.close()
    assert not os.path.exists(f"/sys/class/net/{tap}"), "the VM should delete the tap it created"


@pytest.mark.kvm
@pytest.mark.netns
def test_nic_attaches_its_tap_to_a_bridge(guest_images, vms):
    bridge, tap = f"vmmb{os.getpid() % 100000}", f"vmmbt{os.getpid() % 10000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=bridge, kind="bridge")
    try:
        vm = vms.new("probe", "mode=loop", tap=tap, bridge=bridge)
        assert os.path.basename(os.readlink(f"/sys/class/net/{tap}/master")) == bridge
        vm.close()
    finally:
        with IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=bridge)[0])
