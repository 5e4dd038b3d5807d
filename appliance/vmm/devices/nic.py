"""NIC backed by a Linux tap device, one whole Ethernet frame per read/write.

`hook` is where netfilter attaches: hook(direction, frame) with direction
"rx" (host -> guest) or "tx" (guest -> host) returns the frame to pass on
(possibly changed) or None to hold or drop it.  A filter that holds frames
releases them later with inject_rx() (to the guest) or transmit() (to the
tap); both bypass the hook.  Injected frames not yet read by the guest are
part of the saved state.
"""

import fcntl
import os
import struct
import threading
from dataclasses import dataclass, field

from pyroute2 import IPRoute

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
    injected: list[bytes] = field(default_factory=list)  # queued for the guest by inject_rx()

    _HEAD = struct.Struct("<6s2xQQQQI")
    _FRAME_LEN = struct.Struct("<I")

    def save(self) -> bytes:
        parts = [self._HEAD.pack(self.mac, self.rx_frames, self.tx_frames, self.rx_dropped,
                                 self.tx_dropped, len(self.injected))]
        for frame in self.injected:
            parts += [self._FRAME_LEN.pack(len(frame)), frame]
        return b"".join(parts)

    @classmethod
    def restore(cls, data: bytes) -> "NicState":
        try:
            *counters, count = cls._HEAD.unpack_from(data)
            offset, injected = cls._HEAD.size, []
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
        return cls(*counters, injected=injected)


class TapNic:
    SECTION, VERSION = "dev.nic", 1

    def __init__(self, tap_name: str, mac: str, bridge: str | None = None):
        self.tap_name = tap_name
        self.hook = None
        self.state = NicState(mac=parse_mac(mac))
        self._lock = threading.Lock()
        self.created_tap = self._ensure_tap(tap_name, bridge)
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifreq = struct.pack("16sH22x", tap_name.encode(), _IFF_TAP | _IFF_NO_PI)
            fcntl.ioctl(self.fd, _TUNSETIFF, ifreq)
        except OSError as exc:
            os.close(self.fd)
            raise VMError(f"cannot attach to tap {tap_name}: {exc}") from exc
        # Readable while injected frames wait; the guest's poll() waits on it too.
        self.inject_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @staticmethod
    def _ensure_tap(name: str, bridge: str | None) -> bool:
        """Create the tap if missing, bring it up, attach it to `bridge`; True if created."""
        with IPRoute() as ipr:
            created = not ipr.link_lookup(ifname=name)
            if created:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index = ipr.link_lookup(ifname=name)[0]
            if bridge:
                bridges = ipr.link_lookup(ifname=bridge)
                if not bridges:
                    raise VMError(f"bridge {bridge} does not exist")
                ipr.link("set", index=index, master=bridges[0])
            ipr.link("set", index=index, state="up")
        return created

    def fileno(self) -> int:
        return self.fd

    def wait_fds(self):
        """File descriptors that become readable when a frame for the guest is queued."""
        return [self.fd, self.inject_fd]

    def inject_rx(self, frame: bytes):
        """Queue a frame for the guest, bypassing the hook (from any thread)."""
        with self._lock:
            self.state.injected.append(bytes(frame))
        os.eventfd_write(self.inject_fd, 1)

    def _take_injected(self):
        with self._lock:
            if not self.state.injected:
                return None
            frame = self.state.injected.pop(0)
            if not self.state.injected:
                try:
                    os.eventfd_read(self.inject_fd)
                except BlockingIOError:
                    pass
            self.state.rx_frames += 1
            return frame

    def read_frame(self):
        """The next frame for the guest (injected ones first, then the tap's after
        the hook), or None when none is queued."""
        injected = self._take_injected()
        if injected is not None:
            return injected
        while True:
            try:
                frame = os.read(self.fd, _MAX_FRAME)
            except BlockingIOError:
                return None
            if self.hook:
                frame = self.hook("rx", frame)
                if frame is None:
                    continue
            with self._lock:
                self.state.rx_frames += 1
            return frame

    def count_rx_dropped(self):
        with self._lock:
            self.state.rx_dropped += 1

    def write_frame(self, frame: bytes) -> bool:
        """A frame from the guest: through the hook, then out of the tap."""
        if self.hook:
            frame = self.hook("tx", frame)
            if frame is None:
                return True  # held or dropped by the hook: not an error for the guest
        return self.transmit(frame)

    def transmit(self, frame: bytes) -> bool:
        """Send a frame out of the tap, bypassing the hook (from any thread)."""
        try:
            os.write(self.fd, frame)
        except OSError:
            with self._lock:
                self.state.tx_dropped += 1
            return False
        with self._lock:
            self.state.tx_frames += 1
        return True

    def restore_state(self, state: NicState):
        with self._lock:
            self.state = state
            try:
                os.eventfd_read(self.inject_fd)
            except BlockingIOError:
                pass
            if state.injected:
                os.eventfd_write(self.inject_fd, 1)

    def close(self):
        """Close the tap fd, and delete the tap if this NIC created it."""
        os.close(self.fd)
        os.close(self.inject_fd)
        if self.created_tap:
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=self.tap_name):
                    ipr.link("del", index=index)
