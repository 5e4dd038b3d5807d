"""The network layer's settings (node config [netfilter], flags), with QEMU colo-compare's defaults."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NetfilterSettings:
    compare_timeout_ms: int = 3000          # a primary frame unmatched this long forces a checkpoint
    expired_scan_cycle_ms: int = 1000       # how often held frames are checked against that timeout
    max_queue_size: int = 1024              # frames held per connection and side
    packet_port: int = 0                    # the secondary's packet channel port (0: any, told to the primary)
    passthrough: list[tuple[str, int]] = field(default_factory=list)   # (tcp|udp, port): never compared

    def validate(self) -> None:
        if not 1 <= self.compare_timeout_ms <= 600000:
            raise ValueError("netfilter compare_timeout must be within 1..600000 ms")
        if not 1 <= self.expired_scan_cycle_ms <= 60000:
            raise ValueError("netfilter expired_scan_cycle must be within 1..60000 ms")
        if not 1 <= self.max_queue_size <= 1 << 20:
            raise ValueError("netfilter max_queue_size must be within 1..1048576")
        if not 0 <= self.packet_port <= 65535:
            raise ValueError("netfilter packet_port must be within 0..65535")
        for entry in self.passthrough:
            if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or entry[0] not in ("tcp", "udp")
                    or not isinstance(entry[1], int) or not 0 < entry[1] <= 65535):
                raise ValueError(f"netfilter passthrough entries are [\"tcp\"|\"udp\", PORT], not {entry!r}")
