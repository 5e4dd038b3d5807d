"""Node configuration: a TOML file, overridden by QEMU-like command-line flags.

Example (every key optional; a node starts with no file at all)::

    [node]
    name = "node-a"
    qmp = "/run/colo-appliance/node-a.qmp"    # UNIX socket, created 0600
    qmp_tcp = "127.0.0.1:4444"                 # optional TCP listener
    http = "127.0.0.1:8080"                    # HTTP API bind address
    http_token_file = "/etc/colo-appliance/node-a.token"  # the API's bearer token, mode 0600 (or
                                               # $COLO_APPLIANCE_HTTP_TOKEN; neither: STATE_DIR/http-token)
    http_allowed_hosts = ["node-a.example"]    # Host names the API answers to besides its address
    http_allow_local_uris = false              # true: exec:, file:, unix:, fd: migrations over HTTP too
    log_format = "text"                        # or "json"
    state_dir = "/var/lib/colo-appliance/node-a"  # console log (only when set), the generated http-token
                                               # (default /var/lib/colo-appliance/NAME)

    [guest]
    image = "kvstore"                          # kvstore | memdirty | PATH
    memory = 64                                # MiB
    append = "ip=10.0.0.2/24 gw=10.0.0.1"
    nic = "tap=tap0,bridge=br0,mac=52:54:00:12:34:56"
    disk = "/var/lib/colo-appliance/disk.img"
    start_paused = false
    uuid = "5f1c0b8e-2d7a-4c1e-9a53-0c6f1d2e3b4a"  # as QEMU's -uuid; the same on both nodes

    [colo]
    heartbeat_interval = 100                   # ms between heartbeat datagrams
    heartbeat_timeout = 500                    # ms of silence before the peer counts as lost
    heartbeat_port = 0                         # UDP port of this node's heartbeat (0: any, told to the peer)
    failover = "auto"                          # auto: a lost peer fails over; manual: wait for x-colo-lost-heartbeat
    verify_ram = false                         # compare a digest of ALL guest RAM at every switchover/checkpoint

    [netfilter]                                # COLO's packet comparison (QEMU colo-compare's defaults)
    compare_timeout = 3000                     # ms a primary frame may wait for the secondary's
    expired_scan_cycle = 1000                  # ms between scans for frames past that timeout
    max_queue_size = 1024                      # frames held per connection and side
    packet_port = 0                            # the secondary's packet channel port (0: any)
    passthrough = [["udp", 123]]               # flows never compared (time-varying protocols)

    [peers]
    secondary = "10.0.0.3"
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import uuid as uuidlib
from dataclasses import dataclass, field

from colo import ColoSettings
from netfilter.settings import NetfilterSettings

# The node's state directory when none is configured, as the systemd unit sets it: ROOT/NAME.
DEFAULT_STATE_ROOT = "/var/lib/colo-appliance"
# Where `make guests` puts the built-in guest images.
GUEST_DIR = os.environ.get(
    "COLO_GUEST_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "guest"))
BUILTIN_GUESTS = ("kvstore", "memdirty")
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


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
    uuid: str | None = None


    def image_path(self) -> str:
        """The guest ELF: a built-in name resolves to the image `make guests` builds."""
        path = os.path.join(GUEST_DIR, f"{self.image}.elf") if self.image in BUILTIN_GUESTS else self.image
        if not os.path.isfile(path):
            hint = " (run 'make guests')" if self.image in BUILTIN_GUESTS else ""
            raise ConfigError(f"guest image {path} does not exist{hint}")
        return path

    def nic_options(self) -> dict:
        """``tap=IFNAME[,bridge=BR][,mac=MAC]`` as keyword arguments for the VM config."""
        if not self.nic:
            return {}
        options = {}
        for part in self.nic.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("tap", "bridge", "mac") or not value:
                raise ConfigError(f"--nic: bad option {part!r}; expected tap=IFNAME[,bridge=BR][,mac=MAC]")
            options[key] = value
        if "tap" not in options:
            raise ConfigError("--nic: tap=IFNAME is required")
        if len(options["tap"]) > 15:
            raise ConfigError(f"--nic: interface name {options['tap']!r} is longer than 15 characters")
        if "mac" in options and not _MAC.match(options["mac"]):
            raise ConfigError(f"--nic: bad MAC address {options['mac']!r}")
        return options


@dataclass
class NodeConfig:
    name: str = "node"
    qmp: str | None = None
    qmp_tcp: str | None = None
    http: str | None = "127.0.0.1:8080"
    http_token_file: str | None = None
    http_allowed_hosts: list[str] = field(default_factory=list)
    http_allow_local_uris: bool = False
    log_format: str = "text"
    incoming: str | None = None
    state_dir: str | None = None
    guest: GuestConfig = field(default_factory=GuestConfig)
    colo: ColoSettings = field(default_factory=ColoSettings)
    netfilter: NetfilterSettings = field(default_factory=NetfilterSettings)
    peers: dict[str, str] = field(default_factory=dict)

    def state_path(self) -> str:
        """The node's own directory: state_dir, else DEFAULT_STATE_ROOT/NAME."""
        return self.state_dir or os.path.join(DEFAULT_STATE_ROOT, self.name)

    def validate(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.http:
            split_host_port(self.http, "http")
            hosts = self.http_allowed_hosts
            if not isinstance(hosts, list) or not all(isinstance(name, str) and name for name in hosts):
                raise ConfigError(f"http_allowed_hosts: expected a list of host names, got {hosts!r}")
            if not isinstance(self.http_allow_local_uris, bool):
                raise ConfigError(f"http_allow_local_uris: expected true or false, got {self.http_allow_local_uris!r}")
        if self.qmp_tcp:
            split_host_port(self.qmp_tcp, "qmp_tcp")
        try:
            self.colo.validate()
            self.netfilter.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.guest.image is not None:
            self.guest.image_path()
            self.guest.nic_options()
            if self.guest.uuid is not None:
                try:
                    self.guest.uuid = str(uuidlib.UUID(self.guest.uuid))
                except ValueError:
                    raise ConfigError(f"--uuid: {self.guest.uuid!r} is not a UUID") from None
            if self.guest.disk and not os.path.isfile(self.guest.disk):
                raise ConfigError(f"disk image {self.guest.disk} does not exist")


def is_loopback(host: str) -> bool:
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


_NODE_KEYS = {"name", "qmp", "qmp_tcp", "http", "http_token_file", "http_allowed_hosts", "http_allow_local_uris",
              "log_format", "incoming", "state_dir"}
_GUEST_KEYS = {"image", "memory", "append", "nic", "disk", "start_paused", "uuid"}
# [colo] key -> ColoSettings attribute
_COLO_KEYS = {"heartbeat_interval": "heartbeat_interval_ms", "heartbeat_timeout": "heartbeat_timeout_ms",
              "heartbeat_port": "heartbeat_port", "failover": "failover", "verify_ram": "verify_ram"}
# [netfilter] key -> NetfilterSettings attribute
_NETFILTER_KEYS = {"compare_timeout": "compare_timeout_ms", "expired_scan_cycle": "expired_scan_cycle_ms",
                   "max_queue_size": "max_queue_size", "packet_port": "packet_port", "passthrough": "passthrough"}


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
    unknown = set(data) - {"node", "guest", "colo", "netfilter", "peers"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; valid: node, guest, colo, netfilter, peers")
    for section, keys, target in (("colo", _COLO_KEYS, config.colo), ("netfilter", _NETFILTER_KEYS, config.netfilter)):
        values = data.get(section, {})
        bad = set(values) - set(keys)
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; valid: {sorted(keys)}")
        for key, value in values.items():
            setattr(target, keys[key], value)
    for section, keys, target in (("node", _NODE_KEYS, config), ("guest", _GUEST_KEYS, config.guest)):
        values = data.get(section, {})
        if section == "node" and "http_token" in values:
            raise ConfigError(f"{path}: http_token is no longer read from the config file: put the token in a "
                              "file only its owner can read and set http_token_file to its path (or remove the "
                              "key: the node then generates one in its state directory)")
        bad = set(values) - keys
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; valid: {sorted(keys)}")
        for key, value in values.items():
            setattr(target, key, value)
    config.peers = dict(data.get("peers", {}))
    return config
