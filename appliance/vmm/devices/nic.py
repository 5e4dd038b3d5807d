"""NIC backed by a Linux tap device, one whole Ethernet frame per read/write.

`hook` is where netfilter attaches: hook(direction, frame) with direction
"rx" (host -> guest) or "tx" (guest -> host) returns the frame to pass on
(possibly changed) or None to drop it.
"""

import fcntl
import os
import struct
import threading
from dataclasses import dataclass

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

    _LAYOUT = struct.Struct("<6s2xQQQQ")

    def save(self) -> bytes:
        return self._LAYOUT.pack(self.mac, self.rx_frames, self.tx_frames, self.rx_dropped, self.tx_dropped)

    @classmethod
    def restore(cls, data: bytes) -> "NicState":
        if len(data) != cls._LAYOUT.size:
            raise StateFileError(f"nic state: {len(data)} bytes, expected {cls._LAYOUT.size}")
        return cls(*cls._LAYOUT.unpack(data))


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

    def read_frame(self):
        """The next frame for the guest after the hook, or None when none is queued."""
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
        if self.hook:
            frame = self.hook("tx", frame)
            if frame is None:
                return True  # consumed by the hook: not an error for the guest
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
        self.state = state

    def close(self):
        """Close the tap fd, and delete the tap if this NIC created it."""
        os.close(self.fd)
        if self.created_tap:
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=self.tap_name):
                    ipr.link("del", index=index)
