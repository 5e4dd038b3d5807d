"""Self-announcement after a migration, as QEMU's ``qemu_announce_self``.

The guest now sits behind another switch port; until it sends a frame, the
bridges still deliver its traffic to the old node.  Like QEMU, the destination
sends RARP frames with the guest's MAC, ``announce-rounds`` times, the first
after ``announce-initial`` ms and then ``announce-step`` ms more each time, up
to ``announce-max`` ms apart; with each, a gratuitous ARP for the guest's IPv4
address when the NIC has seen it (after a COLO takeover it has).
"""
from __future__ import annotations

import asyncio
import struct

ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035


def rarp_frame(mac: bytes) -> bytes:
    """QEMU's announcement: a broadcast RARP 'request reverse' from ``mac``, padded to 60 bytes."""
    header = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (header + body).ljust(60, b"\0")


def garp_frame(mac: bytes, ip: bytes) -> bytes:
    """A gratuitous ARP request: 'who has IP? tell IP', broadcast from ``mac``, padded to 60 bytes."""
    header = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + bytes(6) + ip
    return (header + body).ljust(60, b"\0")


async def announce_self(nic, params: dict) -> int:
    """Send the announcement rounds through the NIC's attached backend (the tap, or
    nothing while a COLO secondary's NIC is detached): RARP as QEMU, and a gratuitous ARP
    too once the guest's address is known (a COLO takeover: hosts update their ARP caches
    at once).  Returns how many frames went out."""
    delay = params["announce-initial"]
    sent = 0
    for _ in range(params["announce-rounds"]):
        await asyncio.sleep(delay / 1000)
        sent += bool(nic.transmit(rarp_frame(nic.state.mac)))
        if nic.guest_ipv4 is not None:
            sent += bool(nic.transmit(garp_frame(nic.state.mac, nic.guest_ipv4)))
        delay = min(delay + params["announce-step"], params["announce-max"])
    return sent
