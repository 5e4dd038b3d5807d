"""Node configuration: a TOML file, overridden by QEMU-like command-line flags.

Example (every key optional; a node starts with no file at all)::

    [node]
    name = "node-a"
    qmp = "/run/colo-appliance/node-a.qmp"    # UNIX socket, created 0600
    qmp_tcp = "127.0.0.1:4444"                 # optional TCP listener
    http = "127.0.0.1:8080"                    # HTTP API bind address
    http_token = "secret"                      # required to bind beyond loopback
    log_format = "text"                        # or "json"

    [guest]
    image = "kvstore"                          # kvstore | memdirty | PATH
    memory = 64                                # MiB
    append = "ip=10.0.0.2/24 gw=10.0.0.1"
    nic = "tap=tap0,bridge=br0,mac=52:54:00:12:34:56"
    disk = "/var/lib/colo-appliance/disk.img"
    start_paused = false

    [peers]
    secondary = "10.0.0.3"
"""
from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field


class ConfigError(Exception):
    """A configuration the node cannot start with; the message says why."""


@dataclass
class GuestConfig:
    image: str | None = None
    memory: int = 64
    append: str = ""
    nic: str | None = None
    disk: str | None = None
    start_paused: bool = False


@dataclass
class NodeConfig:
    name: str = "node"
    qmp: str | None = None
    qmp_tcp: str | None = None
    http: str | None = "127.0.0.1:8080"
    http_token: str | None = None
    log_format: str = "text"
    incoming: str | None = None
    guest: GuestConfig = field(default_factory=GuestConfig)
    peers: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.http:
            host, _port = split_host_port(self.http, "http")
            if not _is_loopback(host) and not self.http_token:
                raise ConfigError(f"refusing to bind the HTTP API to {host}: only loopback is allowed "
                                  "without a bearer token (set http_token or --http-token)")
        if self.qmp_tcp:
            split_host_port(self.qmp_tcp, "qmp_tcp")
        if self.guest.memory < 1:
            raise ConfigError("guest memory must be at least 1 MiB")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_NODE_KEYS = {"name", "qmp", "qmp_tcp", "http", "http_token", "log_format", "incoming"}
_GUEST_KEYS = {"image", "memory", "append", "nic", "disk", "start_paused"}


def load_config(path: str | None) -> NodeConfig:
    """Read a TOML file (or defaults when ``path`` is None); unknown keys are errors."""
    config = NodeConfig()
    if path is None:
        return config
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    unknown = set(data) - {"node", "guest", "peers"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; valid: node, guest, peers")
    for section, keys, target in (("node", _NODE_KEYS, config), ("guest", _GUEST_KEYS, config.guest)):
        values = data.get(section, {})
        bad = set(values) - keys
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; valid: {sorted(keys)}")
        for key, value in values.items():
            setattr(target, key, value)
    config.peers = dict(data.get("peers", {}))
    return config
