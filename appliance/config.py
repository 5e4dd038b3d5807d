"""Node configuration: a TOML file, overridden by QEMU-like command-line flags.

Unknown sections and keys, and values of the wrong type, are errors that name the valid
keys; a flag that overrides a different value of the file is logged as a warning naming
both; two settings that would listen on the same TCP port are an error naming both.

Example (every key optional; a node starts with no file at all)::

    [node]
    name = "node-a"
    qmp = "/run/colo-appliance/node-a.qmp"    # UNIX socket, created 0600
    qmp_tcp = "127.0.0.1:4445"                 # optional TCP listener, loopback only (QMP has no auth; not
                                               # 4444: migrations use it)
    qmp_max_clients = 1024                     # QMP connections at once; more are refused
    migrate_file_overwrite = false             # true: migrate file:PATH may replace an existing file
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

    [migration]                                # every incoming node channel (docs/security.md)
    handshake_timeout = 5.0                    # s for a new connection's TLS handshake and stream header
    idle_timeout = 120.0                       # s without a byte from an admitted source
    tls_creds = "tls0"                         # initial tls-creds / tls-hostname / tls-authz parameters, so
    tls_authz = "auth0"                        # that --incoming tcp:... never takes a plaintext source

    [tls-creds.tls0]                           # QEMU's tls-creds-x509: migrate-set-parameters tls-creds=tls0
    dir = "/etc/colo-appliance/pki"            # ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem
    endpoint = "server"                        # server: receives migrations; client: sends them
    verify-peer = true                         # a server asks clients for a certificate signed by the CA

    [authz.auth0]                              # QEMU's authz-list: migrate-set-parameters tls-authz=auth0
    identities = ["CN=node-a,O=example"]       # client certificate DNs (RFC 4514) allowed in
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
from replication.destination import IDLE_TIMEOUT
from replication.incoming import HANDSHAKE_TIMEOUT
from replication.tls import Authz, TlsError, TlsRegistry, X509Creds

# The node's state directory when none is configured, as the systemd unit sets it: ROOT/NAME.
DEFAULT_STATE_ROOT = "/var/lib/colo-appliance"
# Where `make guests` puts the built-in guest images.
GUEST_DIR = os.environ.get(
    "COLO_GUEST_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "guest"))
BUILTIN_GUESTS = ("kvstore", "memdirty")
_ANY_ADDRESS = {"0.0.0.0", "::", ""}
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
    qmp_max_clients: int = 1024
    migrate_file_overwrite: bool = False
    log_format: str = "text"
    incoming: str | None = None
    state_dir: str | None = None
    guest: GuestConfig = field(default_factory=GuestConfig)
    colo: ColoSettings = field(default_factory=ColoSettings)
    netfilter: NetfilterSettings = field(default_factory=NetfilterSettings)
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    tls_creds: str = ""                    # [migration] tls_*: the initial migration parameters
    tls_hostname: str = ""
    tls_authz: str = ""
    tls: TlsRegistry = field(default_factory=TlsRegistry)      # [tls-creds.ID] and [authz.ID]
    source: str | None = None              # the file the settings were read from, if any
    # (section, key) -> value, for every key the file set: a flag that overrides one is reported
    file_values: dict[tuple[str, str], object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)   # for the log, once it is set up

    @property
    def tls_parameters(self) -> dict[str, str]:
        """The migration parameters [migration] sets before anything connects."""
        values = {"tls-creds": self.tls_creds, "tls-hostname": self.tls_hostname, "tls-authz": self.tls_authz}
        return {name: value for name, value in values.items() if value}

    def state_path(self) -> str:
        """The node's own directory: state_dir, else DEFAULT_STATE_ROOT/NAME."""
        return self.state_dir or os.path.join(DEFAULT_STATE_ROOT, self.name)

    def set_from_flag(self, section: str, key: str, flag: str, value) -> None:
        """A command-line flag wins over the file; when the file set that key to something else,
        both are reported (a warning), never overridden in silence."""
        attr, _ = _KEYS[section][key]
        in_file = self.file_values.get((section, key), value)
        if in_file != value:
            self.warnings.append(f"{flag} {_shown(value)} overrides [{section}] {key} = {_shown(in_file)} "
                                 f"of {self.source}")
        setattr(_settings_of(self, section), attr, value)

    def make_state_dir(self) -> None:
        """Create the configured state directory (mode 0700) if it is missing."""
        if self.state_dir:
            try:
                os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create the state directory {self.state_dir}: {e.strerror}") from None

    def _tcp_listeners(self) -> list[tuple[str, str, str, int]]:
        """(setting, as written, host, port) of every TCP port this node listens on by name."""
        listeners = []
        for setting, value in (("qmp_tcp (--qmp-tcp)", self.qmp_tcp), ("http (--http)", self.http)):
            if value:
                listeners.append((setting, value, *split_host_port(value, setting)))
        if self.incoming and self.incoming.startswith("tcp:"):
            try:
                listeners.append(("incoming (--incoming)", self.incoming,
                                  *split_host_port(self.incoming[4:].partition(",")[0], "incoming")))
            except ConfigError:
                pass                    # the listener itself says what is wrong with the URI
        if self.netfilter.packet_port:
            listeners.append(("[netfilter] packet_port (--colo-packet-port)", str(self.netfilter.packet_port),
                              "0.0.0.0", self.netfilter.packet_port))
        return listeners

    def _check_port_collisions(self) -> None:
        listeners = self._tcp_listeners()
        for i, (setting, value, host, port) in enumerate(listeners):
            for other, other_value, other_host, other_port in listeners[i + 1:]:
                if port and port == other_port and (host == other_host or {host, other_host} & _ANY_ADDRESS):
                    raise ConfigError(f"{setting} {value} and {other} {other_value} both listen on TCP port {port}: "
                                      "give each its own port")

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
            host, _ = split_host_port(self.qmp_tcp, "qmp_tcp")
            if not is_loopback(host):
                raise ConfigError(f"qmp_tcp: {self.qmp_tcp} is not a loopback address; QMP over TCP has no "
                                  "authentication or TLS, and whoever reaches it runs commands as this daemon's "
                                  "user: bind it to 127.0.0.1 (or use the QMP UNIX socket, --qmp)")
        if isinstance(self.qmp_max_clients, bool) or not isinstance(self.qmp_max_clients, int) \
                or self.qmp_max_clients < 1:
            raise ConfigError(f"qmp_max_clients: expected a positive integer, got {self.qmp_max_clients!r}")
        if not isinstance(self.migrate_file_overwrite, bool):
            raise ConfigError(f"migrate_file_overwrite: expected true or false, got {self.migrate_file_overwrite!r}")
        self._check_port_collisions()
        for name in ("handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"[migration] {name}: expected seconds between 0 and 3600, got {value!r}")
        try:
            for item in (*self.tls.creds.values(), *self.tls.authz.values()):
                item.validate()
            self.tls.check_parameters({"tls-creds": "", "tls-authz": "", **self.tls_parameters})
        except TlsError as e:
            raise ConfigError(str(e)) from None
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


def _shown(value) -> str:
    if value is None:
        return "(off)"
    return f'"{value}"' if isinstance(value, str) else repr(value)


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


# Every key of the file: section -> key -> (attribute of that section's settings, its type).
_KEYS: dict[str, dict[str, tuple[str, type]]] = {
    "node": {"name": ("name", str), "qmp": ("qmp", str), "qmp_tcp": ("qmp_tcp", str),
             "qmp_max_clients": ("qmp_max_clients", int), "migrate_file_overwrite": ("migrate_file_overwrite", bool),
             "http": ("http", str),
             "http_token_file": ("http_token_file", str), "http_allowed_hosts": ("http_allowed_hosts", list),
             "http_allow_local_uris": ("http_allow_local_uris", bool), "log_format": ("log_format", str),
             "incoming": ("incoming", str), "state_dir": ("state_dir", str)},
    "guest": {"image": ("image", str), "memory": ("memory", int), "append": ("append", str), "nic": ("nic", str),
              "disk": ("disk", str), "start_paused": ("start_paused", bool), "uuid": ("uuid", str)},
    "colo": {"heartbeat_interval": ("heartbeat_interval_ms", int), "heartbeat_timeout": ("heartbeat_timeout_ms", int),
             "heartbeat_port": ("heartbeat_port", int), "failover": ("failover", str),
             "verify_ram": ("verify_ram", bool)},
    "netfilter": {"compare_timeout": ("compare_timeout_ms", int), "expired_scan_cycle": ("expired_scan_cycle_ms", int),
                  "max_queue_size": ("max_queue_size", int), "packet_port": ("packet_port", int),
                  "passthrough": ("passthrough", list)},
    "migration": {"handshake_timeout": ("handshake_timeout", (int, float)),
                  "idle_timeout": ("idle_timeout", (int, float)), "tls_creds": ("tls_creds", str),
                  "tls_hostname": ("tls_hostname", str), "tls_authz": ("tls_authz", str)},
}
_KINDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list", (int, float): "a number"}
# Tables of objects by id, as QEMU's -object TYPE,id=ID,...: section -> (keys, type).
_OBJECTS = {"tls-creds": ({"dir", "endpoint", "verify-peer"}, X509Creds), "authz": ({"identities"}, Authz)}


def _settings_of(config: NodeConfig, section: str):
    return {"node": config, "guest": config.guest, "colo": config.colo, "netfilter": config.netfilter,
            "migration": config}[section]


def _objects(path: str, data: dict, section: str) -> dict:
    """``[SECTION.ID]`` tables as objects by id."""
    keys, kind = _OBJECTS[section]
    objects = {}
    for object_id, values in data.get(section, {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] holds objects by id: write [{section}.ID]")
        bad = set(values) - keys
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}.{object_id}]; valid: {sorted(keys)}")
        if section == "tls-creds" and "dir" not in values:
            raise ConfigError(f"{path}: [{section}.{object_id}] needs dir")
        objects[object_id] = kind(object_id, **{k.replace("-", "_"): v for k, v in values.items()})
    return objects


def load_config(path: str | None) -> NodeConfig:
    """Read a TOML file (or defaults when ``path`` is None); unknown sections and keys, and values
    of the wrong type, are errors that name the valid keys."""
    config = NodeConfig()
    if path is None:
        return config
    config.source = path
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    unknown = set(data) - set(_KEYS) - set(_OBJECTS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; valid: {', '.join([*_KEYS, *_OBJECTS])}")
    for section, keys in _KEYS.items():
        values = data[section] if section in data else {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table of keys, not a value")
        if section == "node" and "http_token" in values:
            raise ConfigError(f"{path}: http_token is no longer read from the config file: put the token in a "
                              "file only its owner can read and set http_token_file to its path (or remove the "
                              "key: the node then generates one in its state directory)")
        bad = set(values) - set(keys)
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; valid: {sorted(keys)}")
        for key, value in values.items():
            attr, kind = keys[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigError(f"{path}: [{section}] {key} must be {_KINDS[kind]}, not {value!r}")
            setattr(_settings_of(config, section), attr, value)
            config.file_values[(section, key)] = value
    config.tls = TlsRegistry(_objects(path, data, "tls-creds"), _objects(path, data, "authz"))
    return config
