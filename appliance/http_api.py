"""The node's HTTP API (aiohttp).

    GET  /                a small dashboard: the status below, refreshed every second
    GET  /api/v1/status   node, VM run state, migration (as query-migrate) and COLO state (JSON)
    POST /api/v1/qmp      one QMP command: {"execute": NAME, "arguments": {...}}
                          -> {"return": ...} (200) or {"error": {"class", "desc"}} (400)
    GET  /api/v1/console  the guest's console output (text)
    GET  /metrics         Prometheus text format, with process figures from psutil

With a bearer token configured every API request must carry
``Authorization: Bearer TOKEN`` (the dashboard reads it from ``/#token=TOKEN``); without one the API binds to loopback only
(enforced by the config check).
"""
from __future__ import annotations

import hmac
import html
import logging
import time

import psutil
from aiohttp import web

from appliance.control.dispatch import CallContext
from appliance.control.jsonstream import ParseError, parse
from appliance.control.node import Node
from appliance.control.qmp import check_envelope
from appliance.qapi import QMPError

log = logging.getLogger(__name__)

_START = time.time()
_PROCESS = psutil.Process()


def _metrics_text(node: Node) -> str:
    mem = _PROCESS.memory_info()
    cpu = _PROCESS.cpu_times()
    lines = []

    def metric(name: str, kind: str, help_text: str, value, labels: str = "") -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value}")

    metric("colo_appliance_up", "gauge", "1 while the node daemon serves.", 1, f'{{node="{node.name}"}}')
    metric("colo_appliance_vm_running", "gauge", "1 when the guest is running.",
           int(node.run_state == "running"), f'{{node="{node.name}",status="{node.run_state}"}}')
    metric("colo_appliance_migration_active", "gauge", "1 while a migration is in progress.",
           int(node.migration_running()), f'{{node="{node.name}",status="{node.migration_status}"}}')
    info = node.migration.info() if node.migration is not None else {}
    ram = info.get("ram", {})
    labels = f'{{node="{node.name}"}}'
    metric("colo_appliance_migration_transferred_bytes", "gauge",
           "Bytes sent by the current or last outgoing migration.", ram.get("transferred", 0), labels)
    metric("colo_appliance_migration_remaining_bytes", "gauge",
           "Dirty bytes still to send by the current migration.", ram.get("remaining", 0), labels)
    metric("colo_appliance_migration_dirty_sync_count", "gauge",
           "Dirty-log syncs (passes) of the current or last migration.", ram.get("dirty-sync-count", 0), labels)
    metric("colo_appliance_migration_downtime_milliseconds", "gauge",
           "Measured downtime of the last completed migration.", info.get("downtime", 0), labels)
    metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", mem.rss)
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", mem.vms)
    metric("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.",
           round(cpu.user + cpu.system, 3))
    metric("process_open_fds", "gauge", "Number of open file descriptors.", _PROCESS.num_fds())
    metric("process_num_threads", "gauge", "Number of OS threads.", _PROCESS.num_threads())
    metric("process_start_time_seconds", "gauge", "Start time of the process since the epoch.", round(_START, 3))
    return "\n".join(lines) + "\n"


DASHBOARD = """<!doctype html>
<html><head><meta charset="utf-8"><title>colo-appliance: {name}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}} th{{text-align:left;padding-right:2em}}
td,th{{padding:.2em .5em}} .bar{{background:#ddd;width:30em;height:1em}} .fill{{background:#3a7;height:1em}}</style>
</head><body><h1>colo-appliance node <code>{name}</code></h1>
<table id="status"></table><div class="bar"><div class="fill" id="fill" style="width:0"></div></div>
<p id="error" style="color:#a00"></p>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");   // open as /#token=...
async function refresh() {{
  try {{
    const r = await fetch("/api/v1/status", token ? {{headers: {{Authorization: "Bearer " + token}}}} : {{}});
    const s = await r.json(), m = s.migration, ram = m.ram || {{}};
    const rows = [["guest", s.vm.status], ["image", s.vm.image || "none"], ["migration", m.status],
      ["sent", ram.transferred ? (ram.transferred / 1048576).toFixed(1) + " MiB" : "-"],
      ["remaining", ram.remaining !== undefined ? (ram.remaining / 1048576).toFixed(1) + " MiB" : "-"],
      ["passes", ram["dirty-sync-count"] || "-"], ["downtime", m.downtime !== undefined ? m.downtime + " ms" : "-"],
      ["error", m["error-desc"] || ""], ["COLO", s.colo.mode]];
    document.getElementById("status").innerHTML = rows.map(([k, v]) =>
      "<tr><th>" + k + "</th><td>" + String(v).replace(/[<&]/g, c => c == "<" ? "&lt;" : "&amp;") + "</td></tr>").join("");
    const seen = ram.total ? (ram.normal + ram.duplicate) * ram["page-size"] / ram.total : 0;
    document.getElementById("fill").style.width = Math.min(100, seen * 100) + "%";
    document.getElementById("error").textContent = "";
  }} catch (e) {{ document.getElementById("error").textContent = "node unreachable: " + e; }}
}}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def make_app(node: Node, token: str | None) -> web.Application:
    @web.middleware
    async def require_token(request: web.Request, handler):
        # The dashboard page is only a shell: the data it shows comes from the API, with the token.
        if token is not None and request.path != "/":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=DASHBOARD.format(name=html.escape(node.name)), content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(node.status())

    async def qmp(request: web.Request) -> web.Response:
        """One command, checked exactly as on the QMP socket (same parser, same envelope rules)."""
        try:
            body = parse(await request.read())
            name, _ = check_envelope(body, oob_enabled=False)
            result = await node.dispatcher.execute(name, body.get("arguments"), CallContext(origin="http"))
        except ParseError as e:
            return web.json_response({"error": QMPError(str(e)).to_reply()}, status=400)
        except QMPError as e:
            return web.json_response({"error": e.to_reply()}, status=400)
        except Exception as e:       # a handler bug still answers in JSON
            log.exception("HTTP qmp command failed")
            return web.json_response({"error": QMPError(f"internal error: {e}").to_reply()}, status=500)
        reply = {"return": result}
        if "id" in body:
            reply["id"] = body["id"]
        return web.json_response(reply)

    async def console(request: web.Request) -> web.Response:
        if node.vm is None:
            return web.json_response({"error": "this node has no guest"}, status=404)
        return web.Response(text=node.vm.read_console(), content_type="text/plain", charset="utf-8")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=_metrics_text(node), content_type="text/plain", charset="utf-8")

    app = web.Application(middlewares=[require_token], client_max_size=1024 * 1024)
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/qmp", qmp)
    app.router.add_get("/api/v1/console", console)
    app.router.add_get("/metrics", metrics)
    return app
