"""The node's HTTP API (aiohttp).

    GET  /                the dashboard: run state; a migration's rate, remaining, expected downtime, ETA and
                          destination, with a cancel button (migrate_cancel, with the token); COLO;
                          the console's last lines; refreshed every second
    GET  /api/v1/status   node, VM run state, migration (as query-migrate) and COLO state (JSON)
    POST /api/v1/qmp      one QMP command: {"execute": NAME, "arguments": {...}}
                          -> {"return": ...} (200) or {"error": {"class", "desc"}} (400)
    GET  /api/v1/console  the guest's console output (text); ?tail=N: its last N bytes
    GET  /metrics         Prometheus text format (appliance/metrics.py)

Every request must name this node in ``Host`` (its address or a configured name: no DNS
rebinding) and, when it has an ``Origin``, come from that same origin (no cross-site requests);
every request but the dashboard page must carry ``Authorization: Bearer TOKEN`` (the dashboard
reads it from ``/#token=TOKEN``); a POST must be ``application/json``.  Migration URIs other than
``tcp:`` (which run commands or open files on this host) are refused unless allowed.  Threat
model and details: docs/security.md.
"""
from __future__ import annotations

import asyncio
import errno
import hmac
import html
import logging
import os
import re
import secrets
import socket
import stat

from aiohttp import web

from appliance.config import ConfigError, NodeConfig, is_loopback, split_host_port
from appliance.control.dispatch import CallContext
from appliance.control.jsonstream import ParseError, parse
from appliance.control.node import Node
from appliance.control.qmp import check_envelope
from appliance.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, registry_for, render
from appliance.qapi import QMPError

log = logging.getLogger(__name__)


TOKEN_ENV = "COLO_APPLIANCE_HTTP_TOKEN"
TOKEN_FILE = "http-token"                # in the node's state directory, when generated
_TOKEN = re.compile(r"[\x21-\x7e]{16,}")  # printable ASCII, no spaces: it travels in a header
MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 256
IDLE_TIMEOUT = 5.0      # aiohttp's keep-alive timeout, armed from the connection's start (aiohttp >= 3.14):
                        # an idle connection, or a request head that never ends, is closed
BODY_TIMEOUT = 5.0      # the whole body of a request must arrive within this
LINGER_TIME = 2.0       # what is left of an unread body is read (and dropped) this long before closing


DASHBOARD = """<!doctype html>
<html><head><meta charset="utf-8"><title>colo-appliance: {name}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}} th{{text-align:left;padding-right:2em}}
td,th{{padding:.2em .5em}} .bar{{background:#ddd;width:30em;height:1em}} .fill{{background:#3a7;height:1em}}
pre{{background:#111;color:#ddd;padding:.5em;max-height:20em;overflow:auto;white-space:pre-wrap}}
button{{font-size:14px;padding:.3em 1em}}</style>
</head><body><h1>colo-appliance node <code>{name}</code></h1>
<table id="status"></table>
<h2>Migration</h2><table id="migration"></table>
<div class="bar"><div class="fill" id="fill" style="width:0"></div></div>
<p><button id="cancel" hidden>Cancel migration</button> <span id="cancel-result"></span></p>
<h2>COLO</h2><table id="colo"></table>
<svg id="pauses" width="600" height="80" style="background:#f4f4f4"><polyline id="line" fill="none"
 stroke="#3a7" stroke-width="1.5" points=""/></svg><div id="scale"></div>
<h2>Console</h2><pre id="console"></pre>
<p id="error" style="color:#a00"></p>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");   // open as /#token=...
const auth = {{Authorization: "Bearer " + token}};
const ACTIVE = ["setup", "active", "pre-switchover", "device", "wait-unplug"];
let pauses = [], lastCount = -1;
const esc = v => String(v).replace(/[<&]/g, c => c == "<" ? "&lt;" : "&amp;");
const mib = n => (n / 1048576).toFixed(1) + " MiB";
// rows: [[id, label, value]]; each value cell has id ID, for people and for tests
const table = (id, rows) => document.getElementById(id).innerHTML = rows.map(([key, label, v]) =>
  "<tr><th>" + label + "</th><td id=\\"" + key + "\\">" + esc(v) + "</td></tr>").join("");
function eta(ram) {{
  if (!ram.mbps || ram.remaining === undefined) return "-";
  const seconds = ram.remaining * 8 / (ram.mbps * 1e6);
  return seconds < 1 ? "< 1 s" : seconds < 120 ? seconds.toFixed(0) + " s" : (seconds / 60).toFixed(1) + " min";
}}
async function cancelMigration() {{
  const result = document.getElementById("cancel-result");
  try {{
    const r = await fetch("/api/v1/qmp", {{method: "POST", headers: {{...auth, "Content-Type": "application/json"}},
                                          body: JSON.stringify({{execute: "migrate_cancel"}})}});
    const reply = await r.json();
    result.textContent = r.ok ? "cancel requested" : "cancel refused: " + reply.error.desc;
  }} catch (e) {{ result.textContent = "cancel failed: " + e.message; }}
}}
document.getElementById("cancel").onclick = cancelMigration;
async function refreshConsole() {{
  const r = await fetch("/api/v1/console?tail=4096", {{headers: auth}});
  if (!r.ok) return;
  const box = document.getElementById("console"), atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.textContent = (await r.text()).split("\\n").slice(-40).join("\\n");
  if (atEnd) box.scrollTop = box.scrollHeight;
}}
async function refresh() {{
  try {{
    const r = await fetch("/api/v1/status", {{headers: auth}});
    const s = await r.json();
    if (!r.ok) throw new Error(s.error.desc + (r.status == 401 ? "; open this page as /#token=TOKEN" : ""));
    const m = s.migration, ram = m.ram || {{}}, active = ACTIVE.includes(m.status);
    table("status", [["vm-status", "guest", s.vm.status], ["vm-image", "image", s.vm.image || "none"],
      ["colo-mode", "COLO", s.colo.mode]]);
    table("migration", [["m-status", "status", m.status],
      ["m-destination", "destination", m.destination || (m.status == "none" ? "-" : "incoming")],
      ["m-rate", "rate", ram.mbps !== undefined ? ram.mbps.toFixed(1) + " Mbps" : "-"],
      ["m-sent", "sent", ram.transferred !== undefined ? mib(ram.transferred) : "-"],
      ["m-remaining", "remaining", ram.remaining !== undefined ? mib(ram.remaining) : "-"],
      ["m-expected-downtime", "expected downtime", m["expected-downtime"] !== undefined ?
        m["expected-downtime"] + " ms" : "-"],
      ["m-eta", "ETA", active ? eta(ram) : "-"], ["m-passes", "passes", ram["dirty-sync-count"] || "-"],
      ["m-downtime", "downtime", m.downtime !== undefined ? m.downtime + " ms" : "-"],
      ["m-error", "error", m["error-desc"] || ""]]);
    document.getElementById("cancel").hidden = !(active && m.destination);
    const c = s.colo, p = c["pause-ms"];
    table("colo", [["c-mode", "mode", c.mode + (c["last-mode"] != "none" ? " (last: " + c["last-mode"] + ")" : "")],
      ["c-failover", "failover", c["failover-status"] + " (" + c["failover-mode"] + ")" +
        (c["waiting-for-operator"] ? ": waiting for x-colo-lost-heartbeat" : "")], ["c-peer", "peer", c.peer || "-"],
      ["c-heartbeat", "heartbeat age", c["heartbeat-age-ms"] !== null ? c["heartbeat-age-ms"] + " ms" : "-"],
      ["c-checkpoints", "checkpoints", c["checkpoints-total"] + " (periodic " + c.checkpoints.periodic +
        ", request " + c.checkpoints.request + ", mismatch " + c.checkpoints.mismatch + "), loaded " +
        c["checkpoints-loaded"] + ", failed " + c["failed-checkpoints"]],
      ["c-pause", "pause", "last " + p.last + " ms, p50 " + p.p50 + " ms, p99 " + p.p99 + " ms"],
      ["c-sent", "sent", mib(c["bytes-total"])], ["c-failovers", "failovers", c.failovers]]);
    if (c.mode != "none" && p.count != lastCount) {{ pauses.push(p.last); lastCount = p.count; }}
    pauses = pauses.slice(-120);
    const top = Math.max(1, ...pauses);
    document.getElementById("line").setAttribute("points",
      pauses.map((v, i) => (i * 5) + "," + (78 - 76 * v / top)).join(" "));
    document.getElementById("pauses").style.display = pauses.length ? "" : "none";
    document.getElementById("scale").textContent = pauses.length ?
      "last checkpoint pauses, one point a second, top " + top.toFixed(2) + " ms" : "";
    const seen = ram.total ? (ram.normal + ram.duplicate) * ram["page-size"] / ram.total : 0;
    document.getElementById("fill").style.width = Math.min(100, seen * 100) + "%";
    if (s.vm.image) await refreshConsole();
    document.getElementById("error").textContent = "";
    document.body.dataset.refreshed = Date.now();
  }} catch (e) {{ document.getElementById("error").textContent = "no status: " + e.message; }}
}}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def load_token(config: NodeConfig) -> str:
    """The API's bearer token: from http_token_file, or COLO_APPLIANCE_HTTP_TOKEN, or else the
    node's own, generated in its state directory at first start and reused after.  Never from
    the command line, which every local user can read in /proc/PID/cmdline."""
    from_env = os.environ.pop(TOKEN_ENV, None)     # children (exec: migrations) do not inherit it
    if config.http_token_file and from_env is not None:
        raise ConfigError(f"the HTTP token comes from http_token_file or {TOKEN_ENV}, not both")
    if config.http_token_file:
        where = config.http_token_file
        token = _read_private(where, follow_symlinks=True)
    elif from_env is not None:
        where, token = f"the environment ({TOKEN_ENV})", from_env
    else:
        where, token = _state_token(config.state_path())
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError(f"HTTP token from {where}: expected at least 16 printable ASCII characters, no spaces")
    log.info("HTTP API bearer token: %s", where)
    return token


def _state_token(directory: str) -> tuple[str, str]:
    """(path, token) of the token file in the state directory: made 0600 at first start, never
    over an existing file or through a symlink, then reused."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the state directory {directory}: {e}") from e
    path = os.path.join(directory, TOKEN_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return path, _read_private(path, follow_symlinks=False)
    except OSError as e:
        raise ConfigError(f"cannot create the HTTP token file {path}: {e}") from e
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return f"{path} (generated)", token


def _read_private(path: str, follow_symlinks: bool) -> str:
    """A token file's text, refused unless it is a regular file of ours that no one else can access."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"cannot read the HTTP token file {path}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"HTTP token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"HTTP token file {path} belongs to uid {st.st_uid}, not to this daemon's "
                              f"(uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise ConfigError(f"HTTP token file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group and others "
                              f"must have no access to it (chmod 600 {path})")
        return os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)


def allowed_hosts(host: str, port: int, names: list[str]) -> set[str]:
    """The ``Host`` header values that name this node: its bound address, the loopback names when
    it listens on loopback (or on every address), the configured names; each with the port."""
    hosts = {host, *names}
    if is_loopback(host) or host in ("0.0.0.0", "::"):
        hosts |= {"localhost", "127.0.0.1", "::1"}
    values = set()
    for name in hosts:
        name = f"[{name.strip('[]')}]" if ":" in name else name
        values.add(f"{name.lower()}:{port}")
        if port == 80:
            values.add(name.lower())
    return values


def _error(status: int, desc: str) -> web.Response:
    """Every failure answers in QMP's error shape, never with a traceback."""
    return web.json_response({"error": {"class": "GenericError", "desc": desc}}, status=status)


def _check_uri(arguments: dict | None) -> None:
    """Refuse a ``uri`` that acts on this host (exec: runs a command, file:/unix: open paths,
    fd: uses a descriptor of the daemon) as the daemon's user: only tcp: goes over HTTP."""
    uri = (arguments or {}).get("uri")
    if not isinstance(uri, str):
        return                  # none, or not a string: the schema check refuses it
    scheme = uri.partition(":")[0]
    if scheme != "tcp":
        raise QMPError(f"the migration URI scheme '{scheme}:' is refused over HTTP, which allows tcp: only: "
                       "exec:, file:, unix: and fd: act on this host as the daemon's user. Use the QMP socket, "
                       "or allow them over HTTP with http_allow_local_uris = true (--http-allow-local-uris)")


def make_app(node: Node, token: str, hosts: set[str], allow_local_uris: bool = False) -> web.Application:
    """The API for ``hosts`` (as from allowed_hosts) and ``token``."""
    origins = {f"http://{host}" for host in hosts}
    registry = registry_for(node)
    authorization = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.headers.get("Host", "").lower() not in hosts:
            return _error(421, f"this node does not answer to host {request.headers.get('Host', '')!r}")
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in origins:
            return _error(403, f"cross-origin request from {origin!r} refused")
        # The dashboard page is only a shell: the data it shows comes from the API, with the token.
        given = request.headers.get("Authorization", "").encode(errors="surrogateescape")
        if request.path != "/" and not hmac.compare_digest(given, authorization):
            response = _error(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if request.method == "POST" and request.content_type != "application/json":
            return _error(415, "a POST must be Content-Type: application/json")
        try:
            return await handler(request)
        except web.HTTPException as e:
            response = _error(e.status, f"{e.reason}: {request.method} {request.path}")
            if "Allow" in e.headers:
                response.headers["Allow"] = e.headers["Allow"]
            return response
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, "internal error (see the node's log)")

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=DASHBOARD.format(name=html.escape(node.name)), content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(node.status())

    async def qmp(request: web.Request) -> web.Response:
        """One command, checked exactly as on the QMP socket (same parser, same envelope rules)."""
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                raw = await request.read()
        except TimeoutError:
            response = _error(408, f"the request body did not arrive within {BODY_TIMEOUT:g} seconds")
            response.force_close()
            return response
        try:
            body = parse(raw)
            name, _ = check_envelope(body, oob_enabled=False)
            if not allow_local_uris:
                _check_uri(body.get("arguments"))
            result = await node.dispatcher.execute(name, body.get("arguments"), CallContext(origin="http"))
        except ParseError as e:
            return web.json_response({"error": QMPError(str(e)).to_reply()}, status=400)
        except QMPError as e:
            return web.json_response({"error": e.to_reply()}, status=400)
        reply = {"return": result}
        if "id" in body:
            reply["id"] = body["id"]
        return web.json_response(reply)

    async def console(request: web.Request) -> web.Response:
        """The console's output, or with ``?tail=N`` its last N bytes (the dashboard's view)."""
        if node.vm is None:
            return _error(404, "this node has no guest")
        text = node.vm.read_console()
        tail = request.query.get("tail")
        if tail is not None:
            if not tail.isdigit():
                return _error(400, f"tail: expected a number of bytes, not {tail!r}")
            text = text[-int(tail):] if int(tail) else ""
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(registry), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/qmp", qmp)
    app.router.add_get("/api/v1/console", console)
    app.router.add_get("/metrics", metrics)
    return app


class _ConnectionCap:
    """The listener's protocol factory: at most ``limit`` connections at once; one more is closed
    as soon as it is accepted, so idle connections cannot use up the daemon's descriptors."""

    def __init__(self, server: web.Server, limit: int):
        self.server = server
        self.limit = limit
        self.open = 0
        self.full = False

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            if not self.full:
                log.warning("HTTP API: %d connections open, closing new ones until some end", self.limit)
            self.full = True
            return _Refused()
        self.full = False
        self.open += 1
        return _Counted(self.server(), self)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted until the connection is lost."""

    def __init__(self, inner: asyncio.Protocol, cap: _ConnectionCap):
        self.inner = inner
        self.cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cap.open -= 1
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HTTPAPI:
    """The API on its listening socket."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, address: str):
        self.runner = runner
        self.listener = listener
        self.address = address

    @classmethod
    async def start(cls, node: Node, config: NodeConfig, token: str) -> HTTPAPI:
        host, port = split_host_port(config.http, "http")
        # Bound first: the Host check needs the real port when the config asks for port 0.
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            hint = ("; every node on a host needs its own address: set http in its config file"
                    if e.errno == errno.EADDRINUSE else "")
            raise OSError(e.errno, f"HTTP address {host}:{port}: {os.strerror(e.errno) if e.errno else e}{hint}") \
                from None
        port = sock.getsockname()[1]
        app = make_app(node, token, allowed_hosts(host, port, config.http_allowed_hosts), config.http_allow_local_uris)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_TIMEOUT, lingering_time=LINGER_TIME)
        await runner.setup()
        listener = await asyncio.get_running_loop().create_server(_ConnectionCap(runner.server, MAX_CONNECTIONS),
                                                                  sock=sock)
        return cls(runner, listener, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    async def close(self) -> None:
        self.listener.close()
        await self.runner.cleanup()
