"""The NIC apart from its backend: queue backends, attach(), and a kvstore guest moved
from its tap to queues and back while it runs (what COLO does to a secondary's NIC)."""

import asyncio
import os
import select
import socket
import struct
import threading
import time
import types

import pytest

from appliance.announce import announce_self, garp_frame, rarp_frame
from appliance.netns import Topology, inside
from appliance.vmm import NicState, VirtualMachine, VMConfig
from appliance.vmm.devices import Nic, QueueBackend
from appliance.vmm.devices import nic as nic_module
from vmm_helpers import image, wait_for

GUEST_MAC = "52:54:00:00:00:42"
PEER_MAC = bytes.fromhex("02aabbccdd01")  # the made-up host that talks to the guest through a queue
PACKET_OUTGOING = 4  # sll_pkttype of frames the host sends out of an interface


def readable(fds) -> bool:
    return bool(select.select(fds, [], [], 0)[0])


# --- QueueBackend ------------------------------------------------------------------------------


def test_queue_backend_passes_frames_both_ways_in_order():
    queue = QueueBackend(tx_limit=4)
    assert queue.deliver(b"first") and queue.deliver(b"second")
    assert [queue.receive(), queue.receive(), queue.receive()] == [b"first", b"second", None]
    assert queue.transmit(b"out 1") and queue.transmit(b"out 2")
    assert [queue.take(0), queue.take(0), queue.take(0.01)] == [b"out 1", b"out 2", None]
    queue.close()


def test_queue_backend_wait_fds_are_readable_while_frames_wait_for_the_guest():
    queue = QueueBackend()
    fds = queue.wait_fds()
    assert not readable(fds)
    queue.deliver(b"one")
    queue.deliver(b"two")
    assert readable(fds)
    queue.receive()
    assert readable(fds), "a frame is still waiting"
    queue.receive()
    assert not readable(fds)
    queue.close()


def test_queue_backend_drops_and_counts_on_overflow():
    queue = QueueBackend(tx_limit=1, rx_limit=2)
    assert [queue.deliver(b"a"), queue.deliver(b"b"), queue.deliver(b"c")] == [True, True, False]
    assert [queue.transmit(b"x"), queue.transmit(b"y")] == [True, False]
    assert (queue.rx_dropped, queue.tx_dropped) == (1, 1)
    assert [queue.receive(), queue.receive(), queue.receive()] == [b"a", b"b", None]
    assert [queue.take(0), queue.take(0)] == [b"x", None]
    queue.close()


def test_a_queue_backend_without_a_consumer_is_a_detached_nic():
    detached = QueueBackend()
    assert not any(detached.transmit(b"guest frame %d" % i) for i in range(3))
    assert detached.tx_dropped == 3
    assert detached.take(0.01) is None
    assert detached.receive() is None and not readable(detached.wait_fds())
    detached.close()


def test_take_waits_for_the_guest_and_close_wakes_it():
    queue = QueueBackend(tx_limit=4)
    threading.Timer(0.05, queue.transmit, [b"later"]).start()
    assert queue.take(5) == b"later"
    threading.Timer(0.05, queue.close).start()
    started = time.monotonic()
    assert queue.take() is None
    assert time.monotonic() - started < 2
    queue.close()  # idempotent
    assert not queue.deliver(b"after close") and queue.rx_dropped == 1


# --- the NIC with queue backends ----------------------------------------------------------------


def test_nic_state_format_v2_carries_the_ring_registers():
    """dev.nic v2: v1's head, then where the rings are and the host's two indexes."""
    state = NicState(mac=bytes.fromhex("525400abcdef"), rx_frames=1, tx_frames=2, rx_dropped=3,
                     tx_dropped=4, rings=(0x1000, 0x2000, 256, 0x3000, 128), tx_cons=7, rx_used=0xFFFFFFFF,
                     injected=[b"ab"])
    expected = bytes.fromhex("525400abcdef0000" "0100000000000000" "0200000000000000" "0300000000000000"
                             "0400000000000000" "01000000"
                             "0010000000000000" "0020000000000000" "0001000000000000" "0030000000000000"
                             "8000000000000000" "07000000" "ffffffff"
                             "02000000") + b"ab"
    assert state.save() == expected
    assert NicState.restore(expected) == state
    assert NicState.restore(NicState(mac=bytes(6)).save()).rings is None
    assert (Nic.SECTION, Nic.VERSION) == ("dev.nic", 2)


def test_attach_moves_the_nic_to_another_backend():
    first, second = QueueBackend(tx_limit=8), QueueBackend(tx_limit=8)
    nic = Nic(GUEST_MAC, first)
    assert nic.backend is nic.tap_backend is first
    assert nic.write_frame(b"to first")
    assert nic.attach(second) is first
    assert nic.backend is second and nic.tap_backend is first
    assert nic.write_frame(b"to second")
    assert (first.take(0), first.take(0), second.take(0)) == (b"to first", None, b"to second")

    first.deliver(b"from first")
    second.deliver(b"from second")
    nic.inject_rx(b"injected")
    assert [nic.read_frame(), nic.read_frame(), nic.read_frame()] == [b"injected", b"from second", None]

    detached = QueueBackend()
    assert nic.attach(detached) is second
    assert not nic.write_frame(b"into the void")
    assert (nic.state.tx_frames, nic.state.tx_dropped, detached.tx_dropped) == (2, 1, 1)
    assert (nic.state.rx_frames, nic.state.rx_dropped) == (2, 0)
    assert nic.attach(first) is detached
    assert nic.read_frame() == b"from first"
    second.close()
    detached.close()
    nic.close()
    assert not first.deliver(b"closed with the nic")


def test_the_hook_sees_the_frames_of_any_backend():
    queue = QueueBackend(tx_limit=8)
    nic = Nic(GUEST_MAC, QueueBackend())
    nic.attach(queue)
    nic.hook = lambda direction, frame: None if frame == b"drop" else frame + direction.encode()
    queue.deliver(b"drop")
    queue.deliver(b"in ")
    assert nic.read_frame() == b"in rx"
    assert nic.write_frame(b"out ") and nic.write_frame(b"drop")
    assert (queue.take(0), queue.take(0)) == (b"out tx", None)
    nic.close()


def test_attach_wakes_a_wait_in_progress():
    nic = Nic(GUEST_MAC, QueueBackend())
    result = []
    waiter = threading.Thread(target=lambda: result.append(nic.wait([], 10)))
    waiter.start()
    time.sleep(0.1)
    queue = QueueBackend()
    queue.deliver(b"for the guest")
    started = time.monotonic()
    nic.attach(queue)
    waiter.join(5)
    assert result == [True] and time.monotonic() - started < 0.2
    assert nic.read_frame() == b"for the guest"
    nic.close()


def test_the_previous_backend_can_be_closed_as_soon_as_attach_returns(monkeypatch):
    """attach() waits for the vCPU thread to stop waiting on the old backend's fds,
    even when it is caught between taking them and entering select()."""
    def late_select(*args):
        time.sleep(0.2)
        return select.select(*args)

    monkeypatch.setattr(nic_module, "select", types.SimpleNamespace(select=late_select))
    old = QueueBackend()
    nic = Nic(GUEST_MAC, old)
    outcome = []

    def vcpu():
        try:
            outcome.append(nic.wait([], 10))
        except OSError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=vcpu)
    waiter.start()
    time.sleep(0.05)  # the waiter holds old's fds and sleeps before its select()
    nic.attach(QueueBackend())
    old.close()
    waiter.join(5)
    assert outcome == [True]
    nic.close()


def test_announce_goes_out_through_the_attached_backend():
    params = {"announce-initial": 1, "announce-rounds": 2, "announce-step": 1, "announce-max": 1}
    mac = bytes.fromhex("525400000042")
    nic = Nic(GUEST_MAC, QueueBackend())
    queue = QueueBackend(tx_limit=8)
    assert asyncio.run(announce_self(nic, params)) == 0  # detached: nothing leaves
    nic.attach(queue)
    assert asyncio.run(announce_self(nic, params)) == 2
    assert [queue.take(0), queue.take(0)] == [rarp_frame(mac)] * 2
    nic.close()


# --- a kvstore guest moved between its tap and queues while it runs ------------------------------


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request(sender_ip: str, target_ip: str) -> bytes:
    header = b"\xff" * 6 + PEER_MAC + struct.pack("!H", 0x0806)
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, PEER_MAC, socket.inet_aton(sender_ip),
                       bytes(6), socket.inet_aton(target_ip))
    return (header + body).ljust(60, b"\0")


def is_arp_reply(frame: bytes, sender_ip: str, target_ip: str) -> bool:
    """The guest's answer to arp_request(target_ip, sender_ip)."""
    expected = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, bytes.fromhex(GUEST_MAC.replace(":", "")),
                           socket.inet_aton(sender_ip), PEER_MAC, socket.inet_aton(target_ip))
    return frame[:6] == PEER_MAC and frame[12:14] == b"\x08\x06" and frame[14:42] == expected


def icmp_echo_request(src_ip: str, dst_ip: str, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytes.fromhex(GUEST_MAC.replace(":", "")) + PEER_MAC + b"\x08\x00" + ip + icmp


def is_icmp_echo_reply(frame: bytes, src_ip: str, dst_ip: str, ident: int, seq: int, payload: bytes) -> bool:
    if frame[:6] != PEER_MAC or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return False
    ip_len = (frame[14] & 0xF) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    icmp = frame[14 + ip_len:14 + total]
    return (frame[26:30] == socket.inet_aton(src_ip) and frame[30:34] == socket.inet_aton(dst_ip)
            and checksum(icmp) == 0 and icmp[:1] == b"\0" and icmp[4:] == struct.pack("!HH", ident, seq) + payload)


def take_matching(queue: QueueBackend, matches, timeout: float = 5.0):
    """The first frame the guest sent that `matches`, skipping others (its TCP and ARP chatter)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        frame = queue.take(remaining)
        if frame is not None and matches(frame):
            return frame
    return None


def redis_cli(topo, *args) -> str:
    result = topo.run_client(["redis-cli", "-h", topo.guest_address, *args], capture_output=True, text=True,
                             timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def kvstore(guest_images):
    """A kvstore guest on tap0 + br0 in a node namespace, listening; yields (vm, topology)."""
    topo = Topology(f"nbt{os.getpid() % 100000}", ["a"])
    namespace = topo.nodes["a"].namespace
    vm = None
    try:
        with inside(namespace):
            vm = VirtualMachine(VMConfig(image=image("kvstore"), memory_mib=64, mac=GUEST_MAC, tap="tap0",
                                         bridge="br0", cmdline=f"ip={topo.guest_address}/24 gw={topo.client_address}"))
        vm.start()
        wait_for(lambda: "listening" in vm.read_console(), timeout=10, what="kvstore to listen")
        yield vm, topo
    finally:
        if vm is not None:
            with inside(namespace):
                vm.close()
        topo.close()


def guest_frames_on_tap(capture: socket.socket) -> int:
    """How many frames the guest wrote to the tap since the last call (the capture is drained)."""
    guest_mac, count = bytes.fromhex(GUEST_MAC.replace(":", "")), 0
    while True:
        try:
            frame, address = capture.recvfrom(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return count
        if frame[6:12] == guest_mac and address[2] != PACKET_OUTGOING:
            count += 1


@pytest.mark.kvm
@pytest.mark.netns
def test_guest_moves_from_its_tap_to_queues_and_back(kvstore):
    vm, topo = kvstore
    guest_ip, peer_ip = topo.guest_address, topo.guest_address.rsplit(".", 1)[0] + ".77"
    assert redis_cli(topo, "SET", "k", "before") == "OK\n"
    with inside(topo.nodes["a"].namespace):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        capture.bind(("tap0", 0))
    with topo.client_sockets():
        conn = socket.create_connection((guest_ip, 6379), timeout=10)
    with capture, conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(100) == b"+PONG\r\n"
        time.sleep(0.1)
        assert guest_frames_on_tap(capture) > 0, "the capture should see the guest's frames on its tap"

        tap = vm.nic.tap_backend
        detached = QueueBackend()
        assert vm.nic.attach(detached) is tap
        time.sleep(0.1)
        guest_frames_on_tap(capture)  # drop what was captured before the switch

        # Detached: requests get no answer, and the guest's own frames are dropped and counted.
        conn.settimeout(1)
        conn.sendall(b"PING\r\n")
        with pytest.raises(socket.timeout):
            conn.recv(100)
        with topo.client_sockets(), pytest.raises(socket.timeout):
            socket.create_connection((guest_ip, 6379), timeout=1)
        dropped = detached.tx_dropped
        assert detached.deliver(arp_request(peer_ip, guest_ip))
        wait_for(lambda: detached.tx_dropped > dropped, what="the guest's ARP reply to be dropped")

        # On queues: frames built here reach the guest, and its replies come back here.
        queue = QueueBackend(tx_limit=64)
        assert vm.nic.attach(queue) is detached
        detached.close()
        assert queue.deliver(arp_request(peer_ip, guest_ip))
        assert take_matching(queue, lambda f: is_arp_reply(f, guest_ip, peer_ip)), "no ARP reply"
        payload = os.urandom(56)
        assert queue.deliver(icmp_echo_request(peer_ip, guest_ip, 0x4242, 7, payload))
        assert take_matching(queue, lambda f: is_icmp_echo_reply(f, guest_ip, peer_ip, 0x4242, 7, payload)), \
            "no ICMP echo reply"
        time.sleep(0.1)
        assert guest_frames_on_tap(capture) == 0, "the guest wrote to its tap while detached from it"

        # Back on the tap: fresh connections work, and the old one gets its answer on a retransmit.
        assert vm.nic.attach(tap) is queue
        queue.close()
        assert redis_cli(topo, "PING") == "PONG\n"
        assert redis_cli(topo, "GET", "k") == "before\n"
        conn.settimeout(20)
        assert conn.recv(100) == b"+PONG\r\n"
        assert guest_frames_on_tap(capture) > 0


@pytest.mark.kvm
@pytest.mark.netns
def test_attach_takes_effect_while_the_guest_is_blocked_in_poll(kvstore):
    vm, topo = kvstore
    guest_ip, peer_ip = topo.guest_address, topo.guest_address.rsplit(".", 1)[0] + ".77"
    detached = QueueBackend()
    vm.nic.attach(detached)
    time.sleep(0.5)  # the idle guest is now in poll with no deadline, waiting on `detached`
    queue = QueueBackend(tx_limit=64)
    assert queue.deliver(arp_request(peer_ip, guest_ip))
    started = time.monotonic()
    assert vm.nic.attach(queue) is detached
    assert take_matching(queue, lambda f: is_arp_reply(f, guest_ip, peer_ip), timeout=2), "no ARP reply"
    assert time.monotonic() - started < 0.2
    detached.close()


def test_announce_adds_a_gratuitous_arp_once_the_guest_address_is_known():
    """The NIC learns the guest's IPv4 address from its own frames; the announcement then
    carries a gratuitous ARP (who-has IP tell IP, broadcast) after each RARP."""
    params = {"announce-initial": 1, "announce-rounds": 1, "announce-step": 1, "announce-max": 1}
    mac = bytes.fromhex("525400000042")
    queue = QueueBackend(tx_limit=8)
    nic = Nic(GUEST_MAC, queue)
    ip = bytes([10, 77, 0, 2])
    ipv4 = b"\xff" * 6 + mac + b"\x08\x00" + bytes([0x45, 0, 0, 20]) + bytes(8) + ip + bytes([10, 77, 0, 1])
    assert nic.write_frame(ipv4)
    assert nic.guest_ipv4 == ip
    queue.take(0)
    assert asyncio.run(announce_self(nic, params)) == 2
    assert queue.take(0) == rarp_frame(mac)
    garp = queue.take(0)
    assert garp == garp_frame(mac, ip)
    assert garp[:6] == b"\xff" * 6 and garp[12:14] == b"\x08\x06" and garp[20:22] == b"\x00\x01"
    assert garp[28:32] == ip and garp[38:42] == ip           # sender and target: the guest itself
    nic.close()
