"""netfilter.primary and netfilter.secondary wired together over a real packet channel, with
stand-in NICs: the frames' paths, epochs at checkpoints, and stops that never wait on a frozen peer."""
import socket
import threading
import time

from netfilter.channel import PacketChannel
from netfilter.primary import MIRROR_QUEUE, PrimaryFilters
from netfilter.secondary import SecondaryFilters
from netfilter.settings import NetfilterSettings
from test_netfilter_packet import CLIENT, GUEST, tcp_frame


class Tap:
    """What a NIC backend needs: frames out are recorded, frames in are handed over by the test."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []

    def wait_fds(self):
        return []

    def receive(self):
        return self.incoming.pop(0) if self.incoming else None

    def transmit(self, frame):
        self.sent.append(frame)
        return True

    def close(self):
        pass


class Nic:
    def __init__(self):
        self.tap_backend = self.backend = Tap()

    def attach(self, backend):
        previous, self.backend = self.backend, backend
        return previous


def channel_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.update(channel=PacketChannel.accept(listener, "127.0.0.1")))
    thread.start()
    primary_end = PacketChannel.connect("127.0.0.1", listener.getsockname()[1])
    thread.join(5)
    listener.close()
    return primary_end, accepted["channel"]


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def client_frame(n: int) -> bytes:
    return tcp_frame(seq=1000 + n, ack=5001, payload=b"GET k\r\n", sport=40000, dport=6379, src=CLIENT, dst=GUEST)


def guest_frame(n: int, payload: bytes = b"$1\r\nv\r\n") -> bytes:
    return tcp_frame(seq=5001 + 7 * n, ack=1007 + n, payload=payload, sport=6379, dport=40000)


class Pair:
    def __init__(self):
        self.requests, self.lost = [], []
        self.pnic, self.snic = Nic(), Nic()
        primary_end, secondary_end = channel_pair()
        self.primary = PrimaryFilters(self.pnic, primary_end, NetfilterSettings(), self.requests.append,
                                      self.lost.append)
        self.secondary = SecondaryFilters(self.snic, secondary_end, self.lost.append)
        self.primary.start()
        self.secondary.start()

    def client_sends(self, frame: bytes) -> bytes:
        """A client frame reaches the PVM (read from its tap: mirrored on the way)."""
        self.pnic.tap_backend.incoming.append(frame)
        return self.pnic.backend.receive()

    def svm_reads(self):
        return self.snic.backend.receive()

    def stop(self):
        self.primary.stop()
        self.secondary.stop(takeover=False)


def test_a_pvm_frame_leaves_when_the_svm_sends_the_same():
    pair = Pair()
    try:
        request = client_frame(0)
        assert pair.client_sends(request) == request
        wait_for(lambda: pair.svm_reads() == request)          # mirrored to the SVM
        pair.pnic.backend.transmit(guest_frame(0))              # the PVM answers: held
        time.sleep(0.05)
        assert pair.pnic.tap_backend.sent == []
        pair.snic.backend.transmit(guest_frame(0))              # the SVM answers the same: released
        wait_for(lambda: pair.pnic.tap_backend.sent == [guest_frame(0)])
        assert pair.requests == [] and pair.lost == []
        assert pair.primary.counters()["tcp"]["matched"] == 1
    finally:
        pair.stop()


def test_a_diverging_svm_frame_asks_for_a_checkpoint_which_releases_the_pvms():
    pair = Pair()
    try:
        pair.pnic.backend.transmit(guest_frame(0))
        pair.snic.backend.transmit(guest_frame(0, b"$1\r\nX\r\n"))
        wait_for(lambda: pair.requests == ["mismatch"])
        assert pair.pnic.tap_backend.sent == []
        pair.secondary.checkpoint(1)
        pair.primary.checkpoint(1)
        wait_for(lambda: pair.pnic.tap_backend.sent == [guest_frame(0)])
    finally:
        pair.stop()


def test_frames_from_before_a_checkpoint_are_dropped_on_both_sides():
    pair = Pair()
    try:
        pair.client_sends(client_frame(0))
        wait_for(lambda: pair.svm_reads() == client_frame(0))
        pair.primary.checkpoint(3)
        pair.secondary.checkpoint(3)
        pair.snic.backend.transmit(guest_frame(0))  # the SVM's output after checkpoint 3
        wait_for(lambda: pair.primary.counters()["svm-frames"] == 1)
        assert pair.primary.stale_dropped == 0
        pair.primary.checkpoint(4)                  # the secondary has not loaded checkpoint 4 yet:
        pair.snic.backend.transmit(guest_frame(1))  # its output is stale for the primary
        wait_for(lambda: pair.primary.stale_dropped == 1)
        pair.secondary.checkpoint(5)                # and a client frame the PVM read before
        pair.client_sends(client_frame(1))          # checkpoint 5 is stale for the secondary
        wait_for(lambda: pair.secondary.checkpoint_dropped == 1)
        assert pair.svm_reads() is None
    finally:
        pair.stop()


def test_stopping_never_waits_on_a_frozen_secondary():
    """The secondary stops reading (SIGSTOP): mirroring fills the socket, then the bounded queue,
    beyond which frames are dropped and counted; a step-down stop returns at once and sends
    none of the held frames."""
    requests, lost = [], []
    nic = Nic()
    primary_end, frozen_end = channel_pair()            # nobody reads frozen_end
    filters = PrimaryFilters(nic, primary_end, NetfilterSettings(), requests.append, lost.append)
    filters.start()
    big = tcp_frame(seq=1, payload=bytes(1400), sport=40000, dport=6379, src=CLIENT, dst=GUEST)
    for _ in range(MIRROR_QUEUE * 5):          # more than the socket buffers and the queue hold
        nic.tap_backend.incoming.append(big)
        nic.backend.receive()
    wait_for(lambda: filters.mirror_dropped > 0)
    nic.backend.transmit(guest_frame(0))                # held: the SVM will never answer
    started = time.monotonic()
    filters.stop(release=False)
    assert time.monotonic() - started < 1.0
    assert nic.tap_backend.sent == [] and nic.backend is nic.tap_backend
    assert lost == []                                   # a planned stop is not a lost peer
    frozen_end.close()
