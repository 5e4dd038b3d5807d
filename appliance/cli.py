"""The ``colo-appliance`` command line.

    colo-appliance serve [--config FILE] [--name NAME] [--qmp PATH] [--http HOST:PORT] ...
    colo-appliance qmp SOCKET [COMMAND [key=value ...]]   (no COMMAND: interactive, with history)
    colo-appliance migrate SOCKET URI [--cap CAP] [--set key=value] [--keep-settings]   (with live progress)
    colo-appliance drill PRIMARY SECONDARY --to URI --method kill|freeze|lost-heartbeat [--reprotect SOCKET ...]
    colo-appliance version
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys

import appliance

from . import migrated_away
from .config import ConfigError, load_config, split_host_port

log = logging.getLogger("appliance")


class QMPClientError(Exception):
    pass


class SyncQMPClient:
    """A small blocking QMP client for the command line (tests use ``qemu.qmp``)."""

    def __init__(self, address: str, timeout: float = 30.0):
        if os.path.sep in address or not address.rpartition(":")[2].isdigit():
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = split_host_port(address, "QMP address")
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(target)
        except OSError as e:
            raise QMPClientError(f"cannot connect to {address}: {e}") from e
        self.file = self.sock.makefile("rwb")
        self.greeting = self._read()
        self.events: list[dict] = []
        self._next_id = 0
        reply = self.execute("qmp_capabilities")
        if "error" in reply:
            raise QMPClientError(f"negotiation failed: {reply['error']['desc']}")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPClientError("connection closed by the node")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        self._next_id += 1
        request: dict = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                return message

    def close(self) -> None:
        self.sock.close()


def parse_arguments(pairs: list[str]) -> dict:
    """``key=value`` pairs; a value that parses as JSON is taken as JSON (as qmp-shell does)."""
    args: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QMPClientError(f"expected key=value, got {pair!r}")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


def _print_reply(reply: dict) -> int:
    if "error" in reply:
        print(f"error: {reply['error']['class']}: {reply['error']['desc']}", file=sys.stderr)
        return 1
    print(json.dumps(reply["return"], indent=2, sort_keys=True))
    return 0


def cmd_qmp(args: argparse.Namespace) -> int:
    try:
        client = SyncQMPClient(args.socket)
        try:
            if args.command is None:
                from .shell import QMPShell
                return QMPShell(client).run()
            return _print_reply(client.execute(args.command, parse_arguments(args.arguments)))
        finally:
            client.close()
    except QMPClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_line(info: dict, width: int = 30) -> str:
    """One line of migration progress from a query-migrate reply."""
    ram = info.get("ram")
    if not ram:
        return f"{info.get('status', 'none'):<10}"
    # Pass 1 moves every page once; after it, what is left is the dirty remainder.
    seen = (ram["normal"] + ram["duplicate"]) * ram["page-size"]
    fraction = min(seen / ram["total"], 1.0) if ram["total"] else 1.0
    if ram["dirty-sync-count"] > 1 and ram["total"]:
        fraction = max(fraction, 1.0 - ram["remaining"] / ram["total"])
    bar = "#" * int(fraction * width)
    line = (f"{info['status']:<10} [{bar:<{width}}] {fraction * 100:5.1f}%  sent {_size(ram['transferred'])}"
            f"  left {_size(ram['remaining'])}  pass {ram['dirty-sync-count']}  {ram['mbps']:.0f} Mbps")
    if ram.get("dirty-pages-rate"):
        line += f"  dirtied {_size(ram['dirty-pages-rate'] * ram['page-size'])}/s"
    if "expected-downtime" in info:
        line += f"  expected downtime {info['expected-downtime']} ms"
    if "downtime" in info:
        line += f"  downtime {info['downtime']} ms"
    return line


def summary_line(info: dict) -> str:
    """The one line a finished migration leaves."""
    ram = info.get("ram", {})
    return (f"completed in {info['total-time']} ms, downtime {info['downtime']} ms, "
            f"{_size(ram.get('transferred', 0))} sent at {ram.get('mbps', 0):.0f} Mbps")


FINAL_STATES = ("completed", "failed", "cancelled", "colo")


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        client = SyncQMPClient(args.socket)
    except QMPClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _migrate_with_settings(client, args)
    except (QMPClientError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _checked(client: SyncQMPClient, command: str, arguments: dict | None = None):
    reply = client.execute(command, arguments)
    if "error" in reply:
        raise QMPClientError(reply["error"]["desc"])
    return reply["return"]


def _migrate_with_settings(client: SyncQMPClient, args: argparse.Namespace) -> int:
    """--cap and --set for this migration only: the previous values come back afterwards
    (unless --keep-settings), and the user is told either way."""
    params = parse_arguments(args.parameter or [])
    before = _checked(client, "query-migrate-parameters")
    unknown = sorted(set(params) - set(before))
    if unknown:
        raise QMPClientError(f"unknown migration parameter(s) {', '.join(unknown)}")
    old_params = {key: before[key] for key in params if before[key] != params[key]}
    enabled = {c["capability"] for c in _checked(client, "query-migrate-capabilities") if c["state"]}
    new_caps = [c for c in dict.fromkeys(args.capabilities or []) if c not in enabled]
    changed = [f"{k}={json.dumps(params[k])}" for k in old_params] + [f"capability {c}" for c in new_caps]
    status = "none"
    try:
        if new_caps:
            _checked(client, "migrate-set-capabilities",
                     {"capabilities": [{"capability": c, "state": True} for c in new_caps]})
        if params:
            _checked(client, "migrate-set-parameters", params)
        status = _migrate_with_progress(client, args)
    finally:
        if changed and args.keep_settings:
            print(f"kept for later migrations: {', '.join(changed)}")
        elif changed:
            _restore(client, old_params, new_caps, status)
    return 0 if status in ("completed", "colo") else 1


def _restore(client: SyncQMPClient, old_params: dict, new_caps: list[str], status: str) -> None:
    restored = []
    if old_params:
        _checked(client, "migrate-set-parameters", old_params)
        restored += [f"{k}={json.dumps(v)}" for k, v in old_params.items()]
    if new_caps and status == "colo":
        print(f"capabilities {', '.join(new_caps)} stay enabled while COLO runs")
    elif new_caps:
        _checked(client, "migrate-set-capabilities",
                 {"capabilities": [{"capability": c, "state": False} for c in new_caps]})
        restored += [f"capability {c} off" for c in new_caps]
    if restored:
        print(f"restored: {', '.join(restored)}")


def _migrate_with_progress(client: SyncQMPClient, args: argparse.Namespace) -> str:
    """Start the migration and show it: on a terminal a bar redrawn every --interval, else one
    line per state change; then a summary, or the error.  Returns the final status."""
    import time
    client.events.clear()
    _checked(client, "migrate", {"uri": args.uri})
    tty = sys.stdout.isatty()
    info: dict = {}
    shown = None                     # the last state given a line of its own
    try:
        while True:
            info = client.execute("query-migrate")["return"]
            status = info.get("status")
            # States between two polls are seen in the MIGRATION events (with --cap events).
            passed = [e["data"]["status"] for e in client.events if e["event"] == "MIGRATION"]
            client.events.clear()
            if tty:
                if status not in ("failed", "cancelled"):
                    print("\r" + progress_line(info) + "\x1b[K", end="", flush=True)
            else:
                for state in [s for s in passed if s != status] + [status]:
                    if state != shown and state not in ("failed", "cancelled"):
                        print(progress_line({**info, "status": state}), flush=True)
                    shown = state
            if status in FINAL_STATES:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print("\ncancelling...", file=sys.stderr)
        client.execute("migrate_cancel")
        while info.get("status") not in FINAL_STATES:
            time.sleep(0.1)
            info = client.execute("query-migrate")["return"]
    if tty:
        print()
    status = info.get("status")
    if status == "completed":
        print(summary_line(info))
    elif status == "colo":
        print("the guest is copied and COLO protects it now (query-colo-status to follow it)")
    else:
        print(f"migration {status}: {info.get('error-desc', '')}".rstrip(": "), file=sys.stderr)
    return status


# serve's flags that stand for a config key: (argparse dest, section, key, the flag as written)
SERVE_FLAGS = (("name", "node", "name", "--name"), ("qmp", "node", "qmp", "--qmp"),
               ("qmp_tcp", "node", "qmp_tcp", "--qmp-tcp"),
               ("qmp_max_clients", "node", "qmp_max_clients", "--qmp-max-clients"), ("http", "node", "http", "--http"),
               ("http_token_file", "node", "http_token_file", "--http-token-file"),
               ("http_allowed_hosts", "node", "http_allowed_hosts", "--http-allowed-host"),
               ("log_format", "node", "log_format", "--log-format"), ("incoming", "node", "incoming", "--incoming"),
               ("state_dir", "node", "state_dir", "--state-dir"),
               ("image", "guest", "image", "--guest"), ("memory", "guest", "memory", "-m"),
               ("append", "guest", "append", "--append"), ("nic", "guest", "nic", "--nic"),
               ("disk", "guest", "disk", "--disk"), ("uuid", "guest", "uuid", "--uuid"),
               ("colo_heartbeat_interval", "colo", "heartbeat_interval", "--colo-heartbeat-interval"),
               ("colo_heartbeat_timeout", "colo", "heartbeat_timeout", "--colo-heartbeat-timeout"),
               ("colo_heartbeat_port", "colo", "heartbeat_port", "--colo-heartbeat-port"),
               ("colo_failover", "colo", "failover", "--colo-failover"),
               ("colo_compare_timeout", "netfilter", "compare_timeout", "--colo-compare-timeout"),
               ("colo_expired_scan_cycle", "netfilter", "expired_scan_cycle", "--colo-expired-scan-cycle"),
               ("colo_max_queue_size", "netfilter", "max_queue_size", "--colo-max-queue-size"),
               ("colo_packet_port", "netfilter", "packet_port", "--colo-packet-port"))
# serve's on/off flags: (argparse dest, section, key, the flag as written); given, they set the key true
SERVE_SWITCHES = (("start_paused", "guest", "start_paused", "-S"),
                  ("http_allow_local_uris", "node", "http_allow_local_uris", "--http-allow-local-uris"),
                  ("migrate_file_overwrite", "node", "migrate_file_overwrite", "--migrate-file-overwrite"),
                  ("verify_ram", "colo", "verify_ram", "--verify-ram"))


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import create_vm, serve
    from .http_api import load_token
    from .logs import setup_logging
    from .qapi import QMPError
    from .vmm import VMError
    setup_logging(args.log_format or "text")      # the config file may choose another format below
    try:
        if args.http_token is not None:
            raise ConfigError("--http-token is no longer accepted: every local user can read the command line; "
                              "use --http-token-file PATH or COLO_APPLIANCE_HTTP_TOKEN")
        config = load_config(args.config)
        for dest, section, key, flag in SERVE_FLAGS:
            value = getattr(args, dest)
            if value is not None:
                config.set_from_flag(section, key, flag, value)
        for dest, section, key, flag in SERVE_SWITCHES:
            if getattr(args, dest):
                config.set_from_flag(section, key, flag, True)
        for entry in args.colo_passthrough or []:
            proto, _, port = entry.partition(":")
            if not port.isdigit():
                raise ConfigError(f"--colo-passthrough: expected tcp:PORT or udp:PORT, not {entry!r}")
            config.netfilter.passthrough.append((proto, int(port)))
        if args.no_http:
            config.set_from_flag("node", "http", "--no-http", None)
        elif args.http_only_if_configured and args.http is None and ("node", "http") not in config.file_values:
            config.http = None
        config.validate()
        config.make_state_dir()
        if config.guest.image and not config.incoming and (
                refusal := migrated_away.refusal(config.state_path(), config.name)):
            raise ConfigError(refusal)
        setup_logging(config.log_format)
        for warning in config.warnings:
            logging.getLogger("appliance.config").warning("%s", warning)
        if args.http_only_if_configured and config.http is None and not args.no_http:
            logging.getLogger("appliance.config").info("HTTP API off: the config file sets no http address")
        http_token = load_token(config) if config.http else None
    except ConfigError as e:
        log.error("%s", e)
        return 2
    vm = None
    try:
        if config.guest.image:
            vm = create_vm(config, config.state_dir)
        return asyncio.run(serve(config, vm, http_token))
    except VMError as e:
        log.error("guest: %s", e)
        return 1
    except QMPError as e:
        log.error("%s", e.desc)
        return 1
    except OSError as e:            # e.g. a QMP socket in a missing directory, an address in use
        log.error("cannot start: %s", f"{e.filename}: {e.strerror}" if e.filename else e.strerror or e)
        return 1
    except KeyboardInterrupt:       # before the event loop took SIGINT over
        log.info("interrupted while starting")
        return 130
    except Exception:               # a bug: still one log line (JSON stays parseable), the trace in its exc
        log.critical("fatal error", exc_info=True)
        return 1
    finally:
        if vm is not None:
            vm.close()


def cmd_drill(args: argparse.Namespace) -> int:
    from .drill import DrillPlan, run_drill
    return run_drill(DrillPlan(
        primary=args.primary, secondary=args.secondary, to=args.to, method=args.method,
        checkpoints=args.checkpoints, checkpoint_delay_ms=args.checkpoint_delay, reprotect=args.reprotect,
        reprotect_to=args.reprotect_to, keep_frozen=args.keep_frozen, timeout=args.timeout))


def cmd_make_certs(args: argparse.Namespace) -> int:
    from .certs import CertError, make_certs
    try:
        make_certs(args.dir, args.hostname or ["localhost", "127.0.0.1"], args.client_dn, ca_dir=args.ca,
                   days=args.days)
    except (CertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dir}: ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colo-appliance", description=(
        "Fault tolerance for a KVM guest: a node daemon with a QEMU-compatible QMP control plane, "
        "live migration and COLO, and the tools to drive them."))
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                                help="what to do ('colo-appliance COMMAND --help' explains one)")

    def command(name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {details}".strip())

    serve = command("serve", "run a node daemon", "It runs until quit over QMP, SIGTERM or SIGINT.")
    serve.add_argument("--config", help="TOML config file")
    serve.add_argument("--name", help="node name")
    serve.add_argument("--qmp", help="QMP UNIX socket path (created 0600)")
    serve.add_argument("--qmp-tcp", dest="qmp_tcp", metavar="HOST:PORT",
                       help="also listen for QMP on TCP; loopback addresses only (QMP has no authentication)")
    serve.add_argument("--qmp-max-clients", dest="qmp_max_clients", type=int, metavar="N",
                       help="QMP connections at once (default 1024); one more is refused with an error")
    serve.add_argument("--migrate-file-overwrite", dest="migrate_file_overwrite", action="store_true",
                       help="let 'migrate file:PATH' replace an existing file (default: refused)")
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP API address (default 127.0.0.1:8080)")
    serve.add_argument("--no-http", action="store_true", help="do not start the HTTP API")
    serve.add_argument("--http-only-if-configured", dest="http_only_if_configured", action="store_true",
                       help="no HTTP API unless --http or the config file's http sets its address (the systemd "
                            "unit's choice: two instances never both take the default 127.0.0.1:8080)")
    serve.add_argument("--http-token-file", dest="http_token_file", metavar="PATH",
                       help="file (mode 0600) with the HTTP API's bearer token (or $COLO_APPLIANCE_HTTP_TOKEN; "
                            "with neither: STATE_DIR/http-token, generated at first start)")
    # Gone (every local user reads /proc/PID/cmdline); kept only to refuse it instead of taking it for an
    # abbreviation of --http-token-file.
    serve.add_argument("--http-token", dest="http_token", help=argparse.SUPPRESS)
    serve.add_argument("--http-allowed-host", dest="http_allowed_hosts", action="append", metavar="NAME",
                       help="a Host name the HTTP API answers to besides its address (repeatable)")
    serve.add_argument("--http-allow-local-uris", dest="http_allow_local_uris", action="store_true",
                       help="allow exec:, file:, unix: and fd: migration URIs over HTTP (QMP always allows them)")
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"],
                       help="log lines on stderr as key=value text (default) or as JSON objects")
    serve.add_argument("--incoming", metavar="URI|defer", help="wait for an incoming migration, as QEMU's -incoming")
    serve.add_argument("--state-dir", dest="state_dir",
                       help="directory for the console log and the HTTP token (default /var/lib/colo-appliance/NAME)")
    colo = serve.add_argument_group("COLO", "fault tolerance of a primary/secondary pair")
    colo.add_argument("--colo-heartbeat-interval", dest="colo_heartbeat_interval", type=int, metavar="MS",
                      help="milliseconds between heartbeats to the COLO peer (default 100)")
    colo.add_argument("--colo-heartbeat-timeout", dest="colo_heartbeat_timeout", type=int, metavar="MS",
                      help="milliseconds of silence after which the peer counts as lost (default 500)")
    colo.add_argument("--colo-heartbeat-port", dest="colo_heartbeat_port", type=int, metavar="PORT",
                      help="UDP port of this node's heartbeat (default: any free port, told to the peer)")
    colo.add_argument("--colo-failover", dest="colo_failover", choices=["auto", "manual"],
                      help="auto (default): a lost peer fails over at once; manual: wait for x-colo-lost-heartbeat")
    colo.add_argument("--colo-compare-timeout", dest="colo_compare_timeout", type=int, metavar="MS",
                      help="milliseconds a primary frame may wait for the secondary's before a checkpoint (3000)")
    colo.add_argument("--colo-expired-scan-cycle", dest="colo_expired_scan_cycle", type=int, metavar="MS",
                      help="milliseconds between scans for frames past the compare timeout (default 1000)")
    colo.add_argument("--colo-max-queue-size", dest="colo_max_queue_size", type=int, metavar="N",
                      help="frames held per connection and side while compared (default 1024)")
    colo.add_argument("--colo-packet-port", dest="colo_packet_port", type=int, metavar="PORT",
                      help="the secondary's packet channel TCP port (default: any free port, told to the primary)")
    colo.add_argument("--colo-passthrough", dest="colo_passthrough", action="append", metavar="PROTO:PORT",
                      help="a flow never compared, e.g. udp:123 (repeatable): for time-varying protocols")
    colo.add_argument("--verify-ram", dest="verify_ram", action="store_true",
                      help="compare a digest of ALL guest RAM at every migration switchover and COLO checkpoint")
    guest = serve.add_argument_group("guest", "the VM this node hosts (QEMU-like flags)")
    guest.add_argument("--guest", dest="image", metavar="kvstore|memdirty|PATH", help="guest image")
    guest.add_argument("-m", "--memory", type=int, metavar="MiB", help="guest RAM in MiB (default 64)")
    guest.add_argument("--append", metavar="'key=value ...'", help="the guest's command line")
    guest.add_argument("--nic", metavar="tap=IFNAME[,bridge=BR][,mac=MAC]", help="a NIC backed by a tap")
    guest.add_argument("--disk", metavar="PATH", help="raw disk image")
    guest.add_argument("--uuid", help="the guest's UUID (as QEMU's -uuid; compared by validate-uuid)")
    guest.add_argument("-S", dest="start_paused", action="store_true", help="do not start the guest (prelaunch)")
    serve.set_defaults(func=cmd_serve)

    qmp = command("qmp", "send a QMP command to a node, or talk to it interactively", (
        "Without COMMAND: an interactive shell as QEMU's qmp-shell, where Tab completes command and argument "
        "names, 'help [COMMAND]' shows the schema's documentation, events print as they arrive, a line is "
        "'COMMAND key=value ...' or a JSON request, Ctrl-C drops the line and Ctrl-D quits; history is kept in "
        "$XDG_STATE_HOME/colo-appliance/qmp-history or ~/.colo-appliance-qmp-history."))
    qmp.add_argument("socket", metavar="SOCKET", help="QMP UNIX socket path or HOST:PORT")
    qmp.add_argument("command", nargs="?", metavar="COMMAND", help="command name (none: the interactive shell)")
    qmp.add_argument("arguments", nargs="*", metavar="key=value",
                     help="the command's arguments; a value that parses as JSON is taken as JSON")
    qmp.set_defaults(func=cmd_qmp)

    migrate = command("migrate", "live-migrate a node's guest, with a progress bar")
    migrate.add_argument("socket", help="the source node's QMP socket path or HOST:PORT")
    migrate.add_argument("uri", help="destination, as QEMU's migrate: tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH")
    migrate.add_argument("--cap", dest="capabilities", action="append", metavar="CAPABILITY",
                         help="enable a migration capability for this migration (repeatable), e.g. --cap multifd")
    migrate.add_argument("--set", dest="parameter", action="append", metavar="key=value",
                         help="a migration parameter for this migration (repeatable), e.g. --set downtime-limit=100")
    migrate.add_argument("--keep-settings", dest="keep_settings", action="store_true",
                         help="keep the --cap and --set values for later migrations (default: restore the previous "
                              "values once this migration ends)")
    migrate.add_argument("--interval", type=float, default=0.2,
                         help="seconds between progress updates on a terminal (default 0.2)")
    migrate.set_defaults(func=cmd_migrate)

    drill = command("drill", "COLO failover drill on two running nodes, with a timed report")
    drill.add_argument("primary", help="the primary's QMP socket path (or HOST:PORT: not with kill or freeze)")
    drill.add_argument("secondary", help="the secondary's QMP socket path or HOST:PORT (its daemon started "
                                         "with --incoming tcp:...)")
    drill.add_argument("--to", required=True, metavar="tcp:HOST:PORT", help="the secondary's migration URI")
    drill.add_argument("--method", required=True, choices=["kill", "freeze", "lost-heartbeat"],
                       help="kill: SIGKILL the primary daemon; freeze: SIGSTOP it (killed at the end); "
                            "lost-heartbeat: stop its guest, x-colo-lost-heartbeat on the secondary, quit it")
    drill.add_argument("--checkpoints", type=int, default=10, metavar="N", help="checkpoints to wait for (default 10)")
    drill.add_argument("--checkpoint-delay", dest="checkpoint_delay", type=int, default=200, metavar="MS",
                       help="x-checkpoint-delay (default 200)")
    drill.add_argument("--reprotect", metavar="SOCKET", help="a third node's QMP socket: protect the survivor onto it")
    drill.add_argument("--reprotect-to", dest="reprotect_to", metavar="tcp:HOST:PORT",
                       help="the third node's migration URI")
    drill.add_argument("--keep-frozen", dest="keep_frozen", action="store_true",
                       help="freeze: leave the frozen primary daemon stopped instead of killing it")
    drill.add_argument("--timeout", type=float, default=60, metavar="SECONDS",
                       help="longest wait of any step (default 60)")
    drill.set_defaults(func=cmd_drill)

    certs = command("make-certs", "make a test CA and node certificates in QEMU's x509 layout")
    certs.add_argument("dir", help="directory to write (ca-cert.pem, server-*.pem, client-*.pem)")
    certs.add_argument("--hostname", action="append", metavar="NAME|IP",
                       help="a name or address in the server certificate (repeatable; default localhost, 127.0.0.1)")
    certs.add_argument("--client-dn", dest="client_dn", default="/O=colo-appliance/CN=client", metavar="/O=../CN=..",
                       help="the client certificate's subject (what tls-authz lists, as CN=..,O=..)")
    certs.add_argument("--ca", metavar="DIR", help="sign with the CA in DIR (ca-cert.pem, ca-key.pem) instead of a new one")
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    certs.set_defaults(func=cmd_make_certs)

    version = command("version", "print the version")
    version.set_defaults(func=lambda a: print(f"colo-appliance {appliance.__version__}") or 0)
    for each in (parser, *sub.choices.values()):
        each.add_argument("--version", action="version", version=f"colo-appliance {appliance.__version__}",
                          help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
