"""The daemon's log: JSON lines with real fields, a start-up summary, one line per event and per
state change, a summary per finished migration, clean ends for expected conditions."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from appliance.cli import SyncQMPClient
from appliance.logs import JSONFormatter, KeyValueFormatter, fields
from appliance.netns import Topology
from conftest import REPO, free_port, start_daemon, stop_daemon

GUEST = ["--guest", "memdirty", "-m", "32", "--append", "mib=8 rate=0"]
LEVELS = {"debug", "info", "warning", "error", "critical"}


def json_lines(text: str) -> list[dict]:
    """Every line is one JSON object with the fixed keys; ts is RFC 3339 UTC."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
        assert entry["ts"].endswith("Z") and datetime.fromisoformat(entry["ts"]).tzinfo == timezone.utc, line
        assert entry["level"] in LEVELS and isinstance(entry["logger"], str), line
        entries.append(entry)
    return entries


def events(entries: list[dict], *names: str) -> list[tuple]:
    return [(e["event"], e["data"]) for e in entries if "event" in e and e["event"] in names]


def test_json_log_of_a_migration(tmp_path):
    port = free_port()
    src = start_daemon(tmp_path, *GUEST, "--log-format", "json", name="log-src")
    dst = start_daemon(tmp_path, *GUEST, "--log-format", "json", "--no-http", "--incoming",
                       f"tcp:127.0.0.1:{port}", name="log-dst")
    try:
        client = SyncQMPClient(src.qmp)
        for command, arguments in (("stop", None), ("cont", None), ("migrate-set-capabilities", {
                "capabilities": [{"capability": "events", "state": True}]})):
            assert "return" in client.execute(command, arguments)
        started = time.monotonic()
        assert "return" in client.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while (info := client.execute("query-migrate")["return"])["status"] not in ("completed", "failed"):
            time.sleep(0.02)
        wall_ms = (time.monotonic() - started) * 1000
        client.close()
        assert info["status"] == "completed", info
        dst_status = SyncQMPClient(dst.qmp)
        while dst_status.execute("query-status")["return"]["status"] != "running":
            time.sleep(0.02)
        dst_status.close()
    finally:
        stop_daemon(src)
        stop_daemon(dst)
    assert src.proc.returncode == 0 and dst.proc.returncode == 0
    src_log, dst_log = json_lines(src.log()), json_lines(dst.log())

    # The start-up summary: what runs, and where to reach it.
    summary = next(e for e in src_log if e["msg"].startswith("node log-src ready"))
    assert summary["image"].endswith("memdirty.elf") and summary["memory_mib"] == 32
    assert summary["qmp"] == [f"unix:{src.qmp}"] and summary["http"] == f"http://{src.http}"
    assert summary["console"] == str(tmp_path / "log-src-console.log") and summary["nic"] is None
    assert next(e for e in dst_log if e["msg"].startswith("node log-dst ready"))["http"] is None

    # One line per event, its name and data as fields; each state change once, in order.
    assert events(src_log, "STOP", "RESUME", "MIGRATION", "SHUTDOWN") == [
        ("RESUME", {}), ("STOP", {}), ("RESUME", {}),
        ("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}), ("STOP", {}),
        ("MIGRATION", {"status": "device"}), ("MIGRATION", {"status": "completed"}),
        ("SHUTDOWN", {"guest": False, "reason": "host-signal"})]
    passes = [data["pass"] for _, data in events(src_log, "MIGRATION_PASS")]
    assert passes == list(range(1, len(passes) + 1))
    # The destination has no 'events' capability: its status lines, the last one as the summary.
    assert [e["status"] for e in dst_log if e.get("role") == "incoming migration"] == ["setup", "active",
                                                                                        "completed"]
    assert not [e for e in src_log + dst_log if e["msg"].startswith(("run state", "VM "))]

    # One summary per finished migration, with the figures query-migrate reported.
    (done,) = [e for e in src_log if e.get("role") == "migration"]
    assert done["status"] == "completed" and done["level"] == "info"
    assert done["total_ms"] == info["total-time"] <= wall_ms + 50
    assert done["downtime_ms"] == info["downtime"] and done["bytes"] == info["ram"]["transferred"]
    assert done["bytes"] >= 8 << 20        # the guest's 8 MiB of written memory crossed
    assert done["mbps"] == pytest.approx(done["bytes"] * 8 / 1000 / done["total_ms"], abs=0.1)
    incoming = [e for e in dst_log if e.get("role") == "incoming migration"][-1]
    assert incoming["bytes"] == pytest.approx(done["bytes"], rel=0.02)     # the same stream, seen from the wire
    assert not [e for e in src_log + dst_log if e["level"] not in ("info",)]


def test_sigterm_while_waiting_for_an_incoming_migration(tmp_path):
    d = start_daemon(tmp_path, *GUEST, "--log-format", "json", "--incoming", f"tcp:127.0.0.1:{free_port()}")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    log = d.log()
    assert "Traceback" not in log
    entries = json_lines(log)
    assert [e["level"] for e in entries if e["level"] != "info"] == []
    assert [e["status"] for e in entries if e.get("role") == "incoming migration"] == ["setup", "cancelling",
                                                                                        "cancelled"]


def test_fatal_start_up_errors_go_through_the_logger(tmp_path):
    serve = [sys.executable, "-m", "appliance.cli", "serve", "--log-format", "json", "--state-dir", str(tmp_path)]
    result = subprocess.run([*serve, "--qmp", str(tmp_path / "missing" / "node.qmp"), "--no-http"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (entry,) = json_lines(result.stderr)
    assert entry["level"] == "error" and entry["msg"].startswith("cannot start: ") and "node.qmp" in entry["msg"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        result = subprocess.run([*serve, "--qmp-tcp", f"{host}:{port}", "--no-http"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (entry,) = json_lines(result.stderr)
    assert entry["msg"] == f"cannot start: QMP address {host}:{port}: Address already in use"
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nnmae = "typo"\n')
    result = subprocess.run([*serve, "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (entry,) = json_lines(result.stderr)
    assert entry["level"] == "error" and "unknown key(s) ['nmae'] in [node]" in entry["msg"]


def record(msg: str, *args, extra: dict | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("appliance.test", logging.INFO, __file__, 1, msg, args, None)
    rec.created = 1796020141.751
    rec.__dict__.update(extra or {})
    return rec


def test_formats():
    rec = record("event %s", "MIGRATION", extra=fields(event="MIGRATION", data={"status": "setup"}))
    assert json.loads(JSONFormatter().format(rec)) == {
        "ts": "2026-11-30T06:29:01.751Z", "level": "info", "logger": "appliance.test", "msg": "event MIGRATION",
        "event": "MIGRATION", "data": {"status": "setup"}}
    assert KeyValueFormatter().format(rec) == ('ts=2026-11-30T06:29:01.751Z level=info logger=appliance.test '
                                               'msg="event MIGRATION" event=MIGRATION data={"status":"setup"}')
    spaced = record("x", extra=fields(path="/a b", name='say "hi"'))
    assert KeyValueFormatter().format(spaced).endswith(' path="/a b" name="say \\"hi\\""')
    with pytest.raises(ValueError, match="may not be named"):
        fields(msg="clash")


@pytest.mark.kvm
@pytest.mark.netns
def test_start_up_summary_names_the_nic_the_wire_sees(guest_images, tmp_path):
    topo = Topology(f"lg{os.getpid() % 100000}", ["a"])
    d = None
    try:
        d = start_daemon(tmp_path, "--guest", "kvstore", "-m", "64", "--log-format", "json",
                         "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
                         "--nic", "tap=tap0,bridge=br0", namespace=topo.nodes["a"].namespace)
        console = tmp_path / "test-node-console.log"
        deadline = time.monotonic() + 20
        while not (console.exists() and "listening" in console.read_text()):
            assert d.alive() and time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        ping = topo.run_client(["redis-cli", "-h", topo.guest_address, "PING"], capture_output=True, text=True,
                               timeout=30)
        assert ping.stdout == "PONG\n", ping
        neighbour = topo.run_client(["ip", "-j", "neigh", "show", topo.guest_address], capture_output=True,
                                    text=True, timeout=30)
        (entry,) = json.loads(neighbour.stdout)
    finally:
        if d is not None:
            stop_daemon(d)
        topo.close()
    summary = next(e for e in json_lines(d.log()) if e["msg"].startswith("node test-node ready"))
    assert summary["nic"] == "tap0" and summary["bridge"] == "br0"
    assert summary["mac"].lower() == entry["lladdr"].lower()        # the MAC the guest answers ARP with
    assert summary["image"].endswith("kvstore.elf") and summary["memory_mib"] == 64
    assert summary["console"] == str(console) and "NIC tap0 (" in summary["msg"]
