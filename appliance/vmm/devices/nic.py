"""The guest's NIC, apart from the host side its frames come from and go to.

            NIC thread (devices/rings.py): moves frames between the guest's rings and here
                                           |
          +--------------------------------v---------------------------------+
          | Nic: the device the guest sees (saved state: section dev.nic v2) |
          |   state: MAC, counters, ring registers, injected frames          |
          |   hook(direction, frame): where netfilter sees the frames        |
          |   inject_rx(frame) / transmit(frame): from any thread, no hook   |
          +--------------------------------+---------------------------------+
                                           | the attached backend: attach(backend)
                        +------------------+------------------+
                        |                                     |
          TapBackend(tap, bridge)                 QueueBackend(tx_limit, rx_limit)
            the host's tap: the VM starts           deliver(frame): a frame for the guest
            on it, kept as nic.tap_backend          take(timeout): a frame from the guest
            so failover can attach it again         QueueBackend(): detached (a COLO secondary)

`hook` is where netfilter attaches: hook(direction, frame) with direction
"rx" (backend -> guest) or "tx" (guest -> backend) returns the frame to pass
on (possibly changed) or None to hold or drop it.  A filter that holds frames
releases them later with inject_rx() (to the guest) or transmit() (to the
backend); both bypass the hook.  Injected frames not yet read by the guest are
part of the saved state; frames waiting in a backend are not (as a tap's
kernel queue is not).  Frames in the guest's rings are in guest RAM, and the
ring registers (where the rings are, the host's two indexes) in NicState.

Threads: the NIC thread calls wait(), read_frame(), write_frame() and
native_backend(), each of its passes inside io_pass(); the rest may be called
from any thread.  Frames cross threads through queues (injected frames, a
QueueBackend's queues, the tap), never by a call into the NIC thread; an
eventfd wakes the NIC thread's wait().  Backend calls happen under the NIC's
lock, and attach() returns only once the NIC thread neither waits on the
previous backend's fds nor is in a pass that may use it, so the previous
backend is then unused by the NIC and its owner may close it.

Counters (NicState): rx_frames the guest was given, tx_frames the backend took,
tx_dropped guest frames the backend refused (tap write error, a QueueBackend
with no room or no consumer), rx_dropped frames too big for the guest's
buffer.  A QueueBackend also counts the frames it dropped itself.  The NIC's
rx_bytes and tx_bytes (of those same frames) are this host's figures, for
metrics: not part of the saved state, so they start at 0 on every node.
"""

import collections
import fcntl
import os
import select
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

import native
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import StateFileError, VMError

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_MAX_FRAME = 65536


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(part, 16) for part in parts)


@dataclass
class NicState:
    mac: bytes = bytes(6)
    rx_frames: int = 0
    tx_frames: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rings: tuple | None = None  # (ctrl, tx_ring, tx_size, rx_ring, rx_size) once the guest set them up
    tx_cons: int = 0  # the host's ring indexes (also published in the guest's control block)
    rx_used: int = 0
    injected: list[bytes] = field(default_factory=list)  # queued for the guest by inject_rx()

    # dev.nic v2: mac, rx_frames, tx_frames, rx_dropped, tx_dropped, injected count, then
    #   ctrl, tx_ring, tx_size, rx_ring, rx_size (all 0: no rings), tx_cons, rx_used,
    # then per injected frame: u32 length, the frame.
    _HEAD = struct.Struct("<6s2xQQQQI")
    _RINGS = struct.Struct("<QQQQQII")
    _FRAME_LEN = struct.Struct("<I")

    def save(self) -> bytes:
        parts = [self._HEAD.pack(self.mac, self.rx_frames, self.tx_frames, self.rx_dropped,
                                 self.tx_dropped, len(self.injected)),
                 self._RINGS.pack(*(self.rings or (0, 0, 0, 0, 0)), self.tx_cons, self.rx_used)]
        for frame in self.injected:
            parts += [self._FRAME_LEN.pack(len(frame)), frame]
        return b"".join(parts)

    @classmethod
    def restore(cls, data: bytes) -> "NicState":
        try:
            *counters, count = cls._HEAD.unpack_from(data)
            *rings, tx_cons, rx_used = cls._RINGS.unpack_from(data, cls._HEAD.size)
            offset, injected = cls._HEAD.size + cls._RINGS.size, []
            for _ in range(count):
                (length,) = cls._FRAME_LEN.unpack_from(data, offset)
                offset += cls._FRAME_LEN.size
                if offset + length > len(data):
                    raise StateFileError("nic state: injected frame runs past the end")
                injected.append(data[offset:offset + length])
                offset += length
        except struct.error as exc:
            raise StateFileError(f"nic state: truncated ({exc})") from exc
        if offset != len(data):
            raise StateFileError(f"nic state: {len(data) - offset} stray bytes")
        return cls(*counters, rings=tuple(rings) if rings[0] else None, tx_cons=tx_cons, rx_used=rx_used,
                   injected=injected)


class NicBackend(Protocol):
    """The host side of a NIC.  Called under the NIC's lock: no method may block."""

    def wait_fds(self) -> list[int]:
        """File descriptors that become readable when receive() may have a frame."""

    def receive(self) -> bytes | None:
        """The next frame for the guest, or None if none is waiting."""

    def transmit(self, frame: bytes) -> bool:
        """Send a frame from the guest on; False if it was dropped."""

    def close(self) -> None:
        """Release what the backend holds; idempotent."""


def tap_mac(guest_mac: str) -> str:
    """The host side's MAC for a tap: the guest's with its first byte made 0xFE (0xFA if it
    already is), libvirt's rule.  A bridge takes the lowest MAC of its ports unless one is
    set; 0xFE sorts above every real NIC's, so a tap joining or leaving never changes the
    bridge's MAC (and the peers' ARP caches stay right), and the host side never carries
    the guest's own MAC."""
    first = 0xFA if parse_mac(guest_mac)[0] == 0xFE else 0xFE
    return f"{first:02x}:" + guest_mac.lower().partition(":")[2]


class TapBackend:
    """A Linux tap device, one whole Ethernet frame per read/write."""

    def __init__(self, name: str, bridge: str | None = None, mac: str | None = None):
        """``mac``: the host side's address for a tap this backend creates (see tap_mac)."""
        self.name = name
        self.created = False  # close() deletes the tap only if this backend made it
        self._fd = -1
        try:
            self._set_up_tap(bridge, mac)
            self._fd = self._open_tap()
        except NetlinkError as exc:
            self.close()
            raise VMError(f"cannot set up tap {name}: {exc.args[-1]} (creating a tap needs CAP_NET_ADMIN)") \
                from None
        except BaseException:
            self.close()
            raise

    def _set_up_tap(self, bridge: str | None, mac: str | None):
        """Create the tap if missing (with ``mac``), attach it to `bridge`, bring it up.
        The bridge is looked up first, so a missing one leaves nothing behind."""
        with IPRoute() as ipr:
            bridge_index = self._bridge_index(ipr, bridge) if bridge else None
            if not ipr.link_lookup(ifname=self.name):
                ipr.link("add", ifname=self.name, kind="tuntap", mode="tap")
                self.created = True
            index = ipr.link_lookup(ifname=self.name)[0]
            if self.created and mac:
                ipr.link("set", index=index, address=mac)
            if bridge_index is not None:
                ipr.link("set", index=index, master=bridge_index)
            ipr.link("set", index=index, state="up")

    @staticmethod
    def _bridge_index(ipr: IPRoute, bridge: str) -> int:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            raise VMError(f"bridge {bridge} does not exist: create it first, e.g. "
                          f"'ip link add {bridge} type bridge && ip link set {bridge} up' "
                          "(docs/operations.md)")
        (link,) = ipr.get_links(found[0])
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "bridge":
            raise VMError(f"{bridge} is not a bridge (its kind is {kind or 'a plain device'}): "
                          "--nic bridge= names a Linux bridge")
        return found[0]

    def _open_tap(self) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", self.name.encode(), _IFF_TAP | _IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise VMError(f"cannot attach to tap {self.name}: {exc}") from exc
        return fd

    @property
    def fd(self) -> int:
        return self._fd

    def serve_rings(self, ram, dirty, ctrl, tx_ring, tx_size, rx_ring, rx_size, tx_cons, rx_used, *wakeups):
        """The NIC thread's native loop, frames straight between the rings and the tap
        (native.ring_serve_tap; the arguments are its own, less the tap)."""
        return native.ring_serve_tap(ram, dirty, ctrl, tx_ring, tx_size, rx_ring, rx_size, tx_cons, rx_used,
                                     self._fd, *wakeups)

    def wait_fds(self) -> list[int]:
        return [self._fd]

    def receive(self) -> bytes | None:
        try:
            return os.read(self._fd, _MAX_FRAME)
        except BlockingIOError:
            return None

    def transmit(self, frame: bytes) -> bool:
        try:
            os.write(self._fd, frame)
        except OSError:
            return False
        return True

    def close(self):
        """Close the tap fd, and delete the tap if this backend created it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.created:
            self.created = False
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=self.name):
                    ipr.link("del", index=index)


class QueueBackend:
    """Frames to and from the guest through in-process queues, for COLO and netfilter.

    deliver() queues a frame for the guest from any thread (an eventfd wakes the
    guest's poll); frames from the guest wait for take(), called from any thread
    (a queue rather than a callback, so no consumer code runs on the vCPU thread).
    The vCPU thread never waits: a full queue drops the frame and counts it.
    With tx_limit=0 (the default) nothing takes the guest's frames, so all are
    dropped (and counted), and the guest gets nothing unless deliver() is called:
    the NIC detached from the network, as a COLO secondary's must be.
    """

    def __init__(self, tx_limit: int = 0, rx_limit: int = 1024):
        self.tx_limit = tx_limit  # guest frames that may wait for take()
        self.rx_limit = rx_limit  # delivered frames that may wait for the guest
        self.tx_dropped = 0  # guest frames dropped for want of room (or of a consumer)
        self.rx_dropped = 0  # delivered frames dropped for want of room
        self._to_guest = collections.deque()
        self._from_guest = collections.deque()
        self._lock = threading.Lock()
        self._guest_sent = threading.Condition(self._lock)
        self._closed = False
        self._to_guest_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable while _to_guest has frames

    def deliver(self, frame: bytes) -> bool:
        """Queue a frame for the guest (any thread); False if it was dropped."""
        with self._lock:
            if self._closed or len(self._to_guest) >= self.rx_limit:
                self.rx_dropped += 1
                return False
            self._to_guest.append(bytes(frame))
            os.eventfd_write(self._to_guest_fd, 1)
        return True

    def take(self, timeout: float | None = None) -> bytes | None:
        """The guest's oldest frame not yet taken (any thread), waiting up to `timeout`
        seconds (None: until a frame comes or close()); None if there is none."""
        with self._guest_sent:
            self._guest_sent.wait_for(lambda: self._from_guest or self._closed, timeout)
            return self._from_guest.popleft() if self._from_guest else None

    def drop_undelivered(self) -> int:
        """Drop the frames the guest has not read yet (a COLO checkpoint makes them stale);
        returns how many."""
        with self._lock:
            count = len(self._to_guest)
            if count:
                self._to_guest.clear()
                os.eventfd_read(self._to_guest_fd)
            return count

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` until the guest has sent a frame (or close()), without taking
        it: the caller takes it under a lock of its own.  True if one is waiting."""
        with self._guest_sent:
            self._guest_sent.wait_for(lambda: self._from_guest or self._closed, timeout)
            return bool(self._from_guest)

    def wait_fds(self) -> list[int]:
        return [] if self._closed else [self._to_guest_fd]

    def receive(self) -> bytes | None:
        with self._lock:
            if not self._to_guest:
                return None
            frame = self._to_guest.popleft()
            if not self._to_guest:
                os.eventfd_read(self._to_guest_fd)
            return frame

    def transmit(self, frame: bytes) -> bool:
        with self._lock:
            if self._closed or len(self._from_guest) >= self.tx_limit:
                self.tx_dropped += 1
                return False
            self._from_guest.append(bytes(frame))
            self._guest_sent.notify()
        return True

    def close(self):
        """Drop the frames for the guest and wake take(); frames already sent stay takeable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._to_guest.clear()
            os.close(self._to_guest_fd)
            self._guest_sent.notify_all()


class Nic:
    SECTION, VERSION = "dev.nic", 2

    def __init__(self, mac: str, backend: NicBackend):
        """`backend` is the VM's tap: attached now, and kept as tap_backend for failover
        to attach again.  The NIC owns it (closes it now if this fails)."""
        try:
            self.state = NicState(mac=parse_mac(mac))
            self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # inject_rx() or attach()
        except BaseException:
            backend.close()
            raise
        self._hook = None
        self.tap_backend = backend
        self._backend = backend
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()  # held by the NIC thread during a pass (io_pass)
        self._wait_ended = threading.Condition(self._lock)
        self._waiting_on = None  # the backend whose fds the vCPU thread waits on, if it does
        self.guest_ipv4: bytes | None = None  # learnt from the guest's frames, for gratuitous ARP
        self.rx_bytes = 0  # bytes of the frames counted in state.rx_frames / tx_frames, on this host
        self.tx_bytes = 0

    @property
    def backend(self) -> NicBackend:
        return self._backend

    @property
    def hook(self):
        return self._hook

    @hook.setter
    def hook(self, hook):
        """Setting a hook wakes the NIC thread, so no frame bypasses it from then on."""
        with self._lock:
            self._hook = hook
            os.eventfd_write(self._event_fd, 1)

    @property
    def event_fd(self) -> int:
        """Readable after inject_rx(), attach() or a new hook: the NIC thread re-checks its path."""
        return self._event_fd

    def clear_event(self):
        """From the NIC thread, before it looks at the NIC's state again."""
        try:
            os.eventfd_read(self._event_fd)
        except BlockingIOError:
            pass

    def attach(self, backend: NicBackend) -> NicBackend:
        """Put `backend` behind the NIC (any thread, the guest may run); returns the
        previous backend, which the NIC no longer uses once this returns.

        Wakes the guest's poll so it waits on the new backend's fds.  The caller
        owns the previous backend, unless it is tap_backend, which the NIC keeps.
        """
        with self._lock:
            previous, self._backend = self._backend, backend
            os.eventfd_write(self._event_fd, 1)
            while self._waiting_on is not None and self._waiting_on is not backend:
                self._wait_ended.wait()
        with self._io_lock:  # a pass that started on the previous backend is over
            pass
        return previous

    def io_pass(self):
        """The NIC thread holds this while it moves frames, so attach() can wait for it."""
        return self._io_lock

    def native_backend(self):
        """The attached backend when it moves frames to and from the rings itself, in C
        (serve_rings): it can, no hook looks at frames and no injected frame waits to go first."""
        with self._lock:
            if hasattr(self._backend, "serve_rings") and self._hook is None and not self.state.injected:
                return self._backend
        return None

    def wait(self, other_fds: list[int], timeout: float, rx: bool = True) -> bool:
        """From the NIC thread: block until a frame for the guest may be waiting (True),
        or until one of `other_fds` is readable or `timeout` seconds pass (False).
        With rx False (no room for frames in the guest) only `other_fds` and attach() wake it."""
        with self._lock:
            if rx and self.state.injected:
                return True
            try:
                os.eventfd_read(self._event_fd)  # whatever it announced is seen from here on
            except BlockingIOError:
                pass
            self._waiting_on = self._backend
            nic_fds = [self._event_fd, *(self._backend.wait_fds() if rx else [])]
        try:
            readable, _, _ = select.select(other_fds + nic_fds, [], [], timeout)
        finally:
            with self._lock:
                self._waiting_on = None
                self._wait_ended.notify_all()
        return any(fd in readable for fd in nic_fds)

    def inject_rx(self, frame: bytes):
        """Queue a frame for the guest, bypassing the hook (from any thread)."""
        with self._lock:
            self.state.injected.append(bytes(frame))
            os.eventfd_write(self._event_fd, 1)

    def read_frame(self) -> bytes | None:
        """The next frame for the guest (injected ones first, then the backend's after
        the hook), or None when none is queued."""
        while True:
            with self._lock:
                if self.state.injected:
                    self.state.rx_frames += 1
                    frame = self.state.injected.pop(0)
                    self.rx_bytes += len(frame)
                    return frame
                frame = self._backend.receive()
            if frame is None:
                return None
            if self.hook:
                frame = self.hook("rx", frame)
                if frame is None:
                    continue
            with self._lock:
                self.state.rx_frames += 1
                self.rx_bytes += len(frame)
            return frame

    def count_rx(self, given: int, too_big: int, nbytes: int = 0):
        """Frames (and their bytes) that went to the guest without read_frame(), and frames too
        big for its buffers."""
        with self._lock:
            self.state.rx_frames += given
            self.state.rx_dropped += too_big
            self.rx_bytes += nbytes

    def count_tx(self, sent: int, dropped: int, nbytes: int):
        """Frames (and their bytes) the tap took, or refused, without write_frame()."""
        with self._lock:
            self.state.tx_frames += sent
            self.state.tx_dropped += dropped
            self.tx_bytes += nbytes

    def write_frame(self, frame: bytes) -> bool:
        """A frame from the guest: through the hook, then out through the backend."""
        self.learn_address(frame)
        if self.hook:
            frame = self.hook("tx", frame)
            if frame is None:
                return True  # held or dropped by the hook: not an error for the guest
        return self.transmit(frame)

    def learn_address(self, frame: bytes) -> None:
        """The guest's IPv4 address, as its own IPv4 packets and ARP frames give it."""
        ethertype = frame[12:14]
        if ethertype == b"\x08\x00" and len(frame) >= 30:
            self.guest_ipv4 = frame[26:30]
        elif ethertype == b"\x08\x06" and len(frame) >= 32:
            self.guest_ipv4 = frame[28:32]

    def transmit(self, frame: bytes) -> bool:
        """Send a frame out through the attached backend, bypassing the hook (from any thread)."""
        with self._lock:
            sent = self._backend.transmit(frame)
            if sent:
                self.state.tx_frames += 1
                self.tx_bytes += len(frame)
            else:
                self.state.tx_dropped += 1
        return sent

    def restore_state(self, state: NicState):
        with self._lock:
            self.state = state

    def close(self):
        """Close the attached backend and tap_backend (a tap the VM created is deleted)."""
        with self._lock:
            self._backend.close()
            self.tap_backend.close()
            os.close(self._event_fd)
