"""COLO between two node daemons in network namespaces, driven with QEMU's QMP library.

Every test checks RAM with --verify-ram: at every checkpoint the secondary
compares a from-scratch blake3 digest of ALL of the SVM's RAM with the PVM's,
and the test compares both nodes' per-checkpoint digest lists itself.
"""
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError, QMPClient

from appliance.netns import Topology, inside
from conftest import start_daemon, stop_daemon
from test_migration_nodes import RedisLoad, events_until, kvstore_args, wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
PORT = 4444
MEMDIRTY = ["--guest", "memdirty", "-m", "64", "--append", "mib=16 rate=40", "--verify-ram"]


@pytest.fixture
def topo():
    t = Topology(f"colo{os.getpid() % 100000}", ["a", "b", "c"])
    yield t
    t.close()


def _get_in_namespace(namespace: str, url: str, headers: dict) -> bytes:
    with inside(namespace):          # this thread only: the daemon's loopback is its namespace's
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.read()


async def http_get(daemon, path: str) -> bytes:
    token_file = os.path.join(os.path.dirname(daemon.qmp), "http-token")
    headers = {}
    if os.path.exists(token_file):
        with open(token_file) as f:
            headers["Authorization"] = f"Bearer {f.read().strip()}"
    return await asyncio.get_running_loop().run_in_executor(
        None, _get_in_namespace, daemon.namespace, f"http://{daemon.http}{path}", headers)


async def http_status(daemon) -> dict:
    return json.loads(await http_get(daemon, "/api/v1/status"))


class Pair:
    """A primary on node a, a secondary on node b (and a fresh node c for re-protection)."""

    def __init__(self, topo, tmp_path, guest_args):
        self.topo = topo
        self.tmp_path = tmp_path
        self.guest_args = guest_args
        self.daemons = {}
        self.clients = {}

    async def start(self, node, *extra, incoming=False):
        name = f"{node}{len(self.daemons)}"
        args = [*self.guest_args, *extra] + (["--incoming", f"tcp:0.0.0.0:{PORT}"] if incoming else [])
        d = start_daemon(self.tmp_path, *args, name=name, namespace=self.topo.nodes[node].namespace)
        d.namespace = self.topo.nodes[node].namespace
        qmp = QMPClient(name)
        await qmp.connect(d.qmp)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "x-colo", "state": True}]})
        self.daemons[node], self.clients[node] = d, qmp
        return d, qmp

    async def enter_colo(self, primary="a", secondary="b", delay=100):
        p, s = self.clients[primary], self.clients[secondary]
        await p.execute("migrate-set-parameters", {"x-checkpoint-delay": delay})
        with p.listener() as p_events, s.listener() as s_events:
            await p.execute("migrate", {"uri": f"tcp:{self.topo.nodes[secondary].address}:{PORT}"})
            p_seen = await events_until(p_events, "MIGRATION", "colo")
            p_seen.append(await next_event(p_events))
            s_seen = await events_until(s_events, "MIGRATION", "colo")
            s_seen.append(await next_event(s_events))
        return p_seen, s_seen

    async def checkpoints(self, node) -> int:
        return (await http_status(self.daemons[node]))["colo"]["checkpoints-total"]

    async def wait_checkpoints(self, node, count, timeout=60):
        deadline = time.monotonic() + timeout
        while (done := await self.checkpoints(node)) < count:
            assert time.monotonic() < deadline, f"only {done} checkpoints on {node}"
            await asyncio.sleep(0.1)

    async def close(self):
        for qmp in self.clients.values():
            try:
                await qmp.disconnect()
            except Exception:
                pass
        for d in self.daemons.values():
            stop_daemon(d)


async def next_event(listener, timeout=10):
    event = await asyncio.wait_for(listener.get(), timeout)
    return event["event"], event.get("data", {}).get("status")


async def events_within(listener, seconds):
    """(name, status) of every event that arrives within ``seconds``."""
    seen, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = await asyncio.wait_for(listener.get(), left)
        except asyncio.TimeoutError:
            break
        seen.append((event["event"], event.get("data", {}).get("status")))
    return seen


async def colo_exit(listener, timeout=10):
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        if event["event"] == "COLO_EXIT":
            return event["data"]


async def assert_digests_match(pair, minimum):
    """The test's own comparison: each checkpoint's whole-RAM digest, PVM vs SVM."""
    primary = (await http_status(pair.daemons["a"]))["colo"]["ram-digests"]
    secondary = (await http_status(pair.daemons["b"]))["colo"]["ram-digests"]
    common = {n for n, _ in primary} & {n for n, _ in secondary}
    assert len(common) >= minimum, (len(primary), len(secondary))
    assert [d for n, d in primary if n in common] == [d for n, d in secondary if n in common]


async def test_enter_colo_checkpoint_and_planned_exit(topo, guest_images, tmp_path):
    pair = Pair(topo, tmp_path, MEMDIRTY)
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "pass ")
        p_seen, s_seen = await pair.enter_colo(delay=10)
        names = [n if n != "MIGRATION" else f"MIGRATION {s}" for n, s in p_seen if n != "MIGRATION_PASS"]
        assert names == ["MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION device", "MIGRATION colo",
                         "RESUME"]
        # (the secondary's setup came when it started listening)
        assert s_seen == [("MIGRATION", "active"), ("MIGRATION", "colo"), ("RESUME", None)]
        assert await a.execute("query-colo-status") == {"mode": "primary", "last-mode": "none", "reason": "none"}
        assert await b.execute("query-colo-status") == {"mode": "secondary", "last-mode": "none", "reason": "none"}
        assert (await a.execute("query-migrate"))["status"] == "colo"
        assert (await b.execute("query-migrate"))["status"] == "colo"
        await pair.wait_checkpoints("a", 200)
        assert (await a.execute("query-status"))["status"] in ("running", "colo")   # colo: mid-checkpoint
        assert (await b.execute("query-status"))["status"] in ("running", "colo")
        await assert_digests_match(pair, 190)
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["checkpoints"]["periodic"] >= 200 and status["failed-checkpoints"] == 0
        assert 0 < status["pause-ms"]["p50"] <= status["pause-ms"]["p99"]

        # Planned exit: the primary leaves COLO and its secondary stops instead of taking over.
        with a.listener() as a_events, b.listener() as b_events:
            await a.execute("x-colo-lost-heartbeat")
            assert await colo_exit(a_events) == {"mode": "primary", "reason": "request"}
            assert await colo_exit(b_events) == {"mode": "secondary", "reason": "request"}
            assert await events_within(a_events, 1.0) == [("MIGRATION", "completed")]
            # The SVM stops (a STOP, unless it was already stopped mid-checkpoint), no takeover.
            assert (await events_within(b_events, 1.0))[-1] == ("MIGRATION", "completed")
        assert await a.execute("query-colo-status") == {"mode": "none", "last-mode": "primary", "reason": "request"}
        assert await b.execute("query-colo-status") == {"mode": "none", "last-mode": "secondary",
                                                        "reason": "request"}
        assert (await a.execute("query-migrate"))["status"] == "completed"
        assert (await a.execute("query-status"))["status"] == "running"
        assert (await b.execute("query-status"))["status"] == "paused"
        a_status = (await http_status(pair.daemons["a"]))["colo"]
        assert a_status["failover-history"] == ["none", "require", "active", "completed"]
        b_status = (await http_status(pair.daemons["b"]))["colo"]
        assert b_status["failover-history"] == ["none"]
        await wait_console(a, "pass ")
    finally:
        await pair.close()


async def started_pair(topo, tmp_path, guest_args=MEMDIRTY, secondary_args=(), delay=100, checkpoints=3):
    pair = Pair(topo, tmp_path, guest_args)
    _, a = await pair.start("a")
    _, b = await pair.start("b", *secondary_args, incoming=True)
    if "memdirty" in guest_args:
        await wait_console(a, "pass ")
    await pair.enter_colo(delay=delay)
    await pair.wait_checkpoints("a", checkpoints)
    return pair, a, b


async def assert_memdirty_runs_on(qmp, seconds=1.5):
    """memdirty checks its invariant at every pass and halts on a break: it must keep passing."""
    await asyncio.sleep(seconds)
    assert (await qmp.execute("query-status"))["status"] == "running"
    console = await qmp.execute("ringbuf-read", {"device": "console", "size": 1 << 20})
    assert "invariant broken" not in console
    await wait_console(qmp, "pass ")


async def test_lost_heartbeat_on_the_secondary_takes_over(topo, guest_images, tmp_path):
    pair, a, b = await started_pair(topo, tmp_path)
    try:
        with b.listener() as b_events:
            await b.execute("x-colo-lost-heartbeat")
            assert await colo_exit(b_events) == {"mode": "secondary", "reason": "request"}
            assert await events_within(b_events, 1.0) == [("MIGRATION", "completed")]
        assert await b.execute("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "request"}
        assert (await b.execute("query-migrate"))["status"] == "completed"
        status = (await http_status(pair.daemons["b"]))["colo"]
        assert status["failover-history"] == ["none", "require", "active", "completed"]
        assert status["failovers"] == 1
        await assert_memdirty_runs_on(b)
        with pytest.raises(ExecuteError) as info:
            await b.execute("x-colo-lost-heartbeat")
        assert str(info.value) == "The feature 'colo' is not enabled"
        # The primary sees its secondary go and runs on, unprotected.
        deadline = time.monotonic() + 5
        while (await a.execute("query-colo-status"))["mode"] != "none":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await a.execute("query-colo-status") == {"mode": "none", "last-mode": "primary", "reason": "error"}
        await assert_memdirty_runs_on(a, 0.5)
    finally:
        await pair.close()


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_primary_lost_the_secondary_takes_over(topo, guest_images, tmp_path, how):
    pair, a, b = await started_pair(topo, tmp_path)
    primary = pair.daemons["a"].proc
    try:
        with b.listener() as b_events:
            lost_at = time.monotonic()
            primary.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            assert await colo_exit(b_events) == {"mode": "secondary", "reason": "error"}
            took = time.monotonic() - lost_at
            assert await events_within(b_events, 1.0) == [("MIGRATION", "completed")]
        # A killed primary closes the connection at once; a frozen one is found by the heartbeat (500 ms).
        assert took < (0.5 if how == "kill" else 1.0), took
        assert await b.execute("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "error"}
        status = (await http_status(pair.daemons["b"]))["colo"]
        assert status["failover-history"] == ["none", "require", "active", "completed"]
        await assert_memdirty_runs_on(b)
    finally:
        if how == "stop":
            primary.send_signal(signal.SIGCONT)
        await pair.close()


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_secondary_lost_the_primary_runs_on(topo, guest_images, tmp_path, how):
    pair, a, b = await started_pair(topo, tmp_path)
    secondary = pair.daemons["b"].proc
    try:
        with a.listener() as a_events:
            secondary.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            assert await colo_exit(a_events) == {"mode": "primary", "reason": "error"}
            assert await events_within(a_events, 1.0) == [("MIGRATION", "completed")]
        assert await a.execute("query-colo-status") == {"mode": "none", "last-mode": "primary", "reason": "error"}
        assert (await a.execute("query-migrate"))["status"] == "completed"
        await assert_memdirty_runs_on(a)
    finally:
        if how == "stop":
            secondary.send_signal(signal.SIGCONT)
        await pair.close()


async def test_manual_failover_waits_for_the_operator(topo, guest_images, tmp_path):
    pair, a, b = await started_pair(topo, tmp_path, secondary_args=["--colo-failover", "manual"])
    primary = pair.daemons["a"].proc
    try:
        with b.listener() as b_events:
            primary.send_signal(signal.SIGSTOP)
            assert await next_event(b_events, timeout=5) == ("STOP", None)
            status = (await http_status(pair.daemons["b"]))["colo"]
            assert status["waiting-for-operator"] and status["failover-history"] == ["none"]
            assert (await b.execute("query-status"))["status"] == "paused"
            assert (await b.execute("query-colo-status"))["mode"] == "secondary"
            await asyncio.sleep(1)
            assert (await b.execute("query-status"))["status"] == "paused"      # still waiting
            await b.execute("x-colo-lost-heartbeat")
            assert await colo_exit(b_events) == {"mode": "secondary", "reason": "request"}
            assert await next_event(b_events) == ("MIGRATION", "completed")
            assert await next_event(b_events) == ("RESUME", None)
        status = (await http_status(pair.daemons["b"]))["colo"]
        assert status["failover-history"] == ["none", "require", "active", "completed"]
        await assert_memdirty_runs_on(b)
    finally:
        primary.send_signal(signal.SIGCONT)
        await pair.close()


async def test_failover_during_a_checkpoint_load_relaunches(topo, guest_images, tmp_path, monkeypatch):
    monkeypatch.setenv("COLO_APPLIANCE_TEST_LOAD_DELAY_MS", "300")
    pair, a, b = await started_pair(topo, tmp_path, delay=0)
    try:
        with b.listener() as b_events:
            # With no delay between checkpoints the secondary is loading most of the time.
            for _ in range(50):
                await asyncio.sleep(0.1)
                try:
                    await b.execute("x-colo-lost-heartbeat")
                    break
                except ExecuteError:
                    pass
            assert await colo_exit(b_events) == {"mode": "secondary", "reason": "request"}
        status = (await http_status(pair.daemons["b"]))["colo"]
        assert status["failover-history"] == ["none", "require", "active", "relaunch", "none", "require", "active",
                                              "completed"]
        await assert_memdirty_runs_on(b)
    finally:
        await pair.close()


# Fault injection at every step of the transaction (colo/faults.py), in the 2nd checkpoint.
PRIMARY_STEPS = [("before", "checkpoint-request"), ("after", "checkpoint-request"), ("after", "checkpoint-reply"),
                 ("after", "vmstate-send"), ("during", "vmstate"), ("after", "vmstate-size"),
                 ("before", "vmstate-received"), ("after", "vmstate-received"), ("after", "vmstate-loaded")]
SECONDARY_STEPS = [("after", "checkpoint-request"), ("before", "checkpoint-reply"), ("after", "checkpoint-reply"),
                   ("after", "vmstate-send"), ("after", "vmstate-size"), ("before", "vmstate-received"),
                   ("after", "vmstate-received"), ("before", "vmstate-loaded"), ("after", "vmstate-loaded")]
FAULTS = [("primary", when, message, action) for when, message in PRIMARY_STEPS for action in ("kill", "stop")] + \
         [("secondary", when, message, action) for when, message in SECONDARY_STEPS for action in ("kill", "stop")]


@pytest.mark.parametrize("side, when, message, action", FAULTS,
                         ids=["-".join(f) for f in FAULTS])
async def test_fault_at_every_step_leaves_one_consistent_guest(topo, guest_images, tmp_path, monkeypatch,
                                                               side, when, message, action):
    monkeypatch.setenv("COLO_APPLIANCE_FAULT", f"{side}:{when}:{message}:{action}:2")
    pair = Pair(topo, tmp_path, MEMDIRTY)
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "pass ")
        survivor, victim = (b, "a") if side == "primary" else (a, "b")
        with survivor.listener() as events:
            await pair.enter_colo(delay=50)
            exit_data = await colo_exit(events)
        proc = pair.daemons[victim].proc
        if action == "kill":
            assert proc.wait(5) == -signal.SIGKILL
        else:
            assert proc.poll() is None
        assert exit_data == {"mode": "secondary" if side == "primary" else "primary", "reason": "error"}
        status = (await http_status(pair.daemons["b" if side == "primary" else "a"]))["colo"]
        assert status["failover-history"] == ["none", "require", "active", "completed"]
        if side == "primary":
            # Loaded: every checkpoint the primary completed; a whole one received is loaded too.
            assert status["checkpoints-loaded"] >= 1
            if (when, message) in (("after", "vmstate-received"), ("after", "vmstate-loaded")):
                assert status["checkpoints-loaded"] == 2
        await assert_memdirty_runs_on(survivor, 1.0)
    finally:
        if action == "stop":
            pair.daemons["a" if side == "primary" else "b"].proc.send_signal(signal.SIGCONT)
        await pair.close()


async def test_reprotect_onto_a_fresh_node_five_rounds(topo, guest_images, tmp_path):
    """Kill the primary, the secondary takes over, protect it again onto a fresh node: five times."""
    pair = Pair(topo, tmp_path, MEMDIRTY)
    try:
        _, a = await pair.start("a")
        await wait_console(a, "pass ")
        primary, nodes = "a", ["b", "c", "a", "b", "c"]
        for round_number, secondary in enumerate(nodes, 1):
            _, s = await pair.start(secondary, incoming=True)
            p = pair.clients[primary]
            await pair.enter_colo(primary, secondary, delay=50)
            await pair.wait_checkpoints(primary, 5)
            assert await s.execute("query-colo-status") == {"mode": "secondary", "last-mode": "none",
                                                            "reason": "none"}
            status = (await http_status(pair.daemons[primary]))["colo"]
            assert status["failed-checkpoints"] == 0, round_number
            with s.listener() as events:
                pair.daemons[primary].proc.kill()
                assert await colo_exit(events) == {"mode": "secondary", "reason": "error"}
            with contextlib.suppress(EOFError, OSError):
                await p.disconnect()        # its daemon is dead
            await assert_memdirty_runs_on(s, 0.5)
            assert (await s.execute("query-colo-status"))["last-mode"] == "secondary"
            primary = secondary
        assert (await http_status(pair.daemons[primary]))["colo"]["failovers"] == 1
    finally:
        await pair.close()


async def test_link_cut_auto_and_manual(topo, guest_images, tmp_path):
    """A cut link looks like a dead peer from both sides.  With failover auto both sides go on
    (COLO has no quorum: the documented split brain); a secondary in manual mode waits instead."""
    pair, a, b = await started_pair(topo, tmp_path, secondary_args=["--colo-failover", "manual"])
    link = ["ip", "-n", topo.nodes["b"].namespace, "link", "set", "eth0"]
    try:
        with a.listener() as a_events, b.listener() as b_events:
            subprocess.run(link + ["down"], check=True)
            assert await colo_exit(a_events) == {"mode": "primary", "reason": "error"}
            assert await next_event(b_events, timeout=5) == ("STOP", None)
        await assert_memdirty_runs_on(a, 0.5)
        assert (await b.execute("query-status"))["status"] == "paused"
        assert (await http_status(pair.daemons["b"]))["colo"]["waiting-for-operator"]
    finally:
        subprocess.run(link + ["up"], check=True)
        await pair.close()


async def test_checkpoint_triggers_delay_request_and_refusals(topo, guest_images, tmp_path):
    pair, a, b = await started_pair(topo, tmp_path, delay=60000, checkpoints=0)
    try:
        with pytest.raises(ExecuteError) as info:
            await b.execute("xen-colo-do-checkpoint")
        assert "not a COLO primary" in str(info.value)
        syncs = (await a.execute("query-migrate"))["ram"]["dirty-sync-count"]
        for _ in range(3):
            await a.execute("xen-colo-do-checkpoint")
            await pair.wait_checkpoints("a", (await pair.checkpoints("a")) + 1, timeout=5)
        assert (await a.execute("query-migrate"))["ram"]["dirty-sync-count"] == syncs + 3   # one sync each
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["checkpoints"] == {"periodic": 0, "request": 3, "mismatch": 0}
        # x-checkpoint-delay changes live: from a minute to 50 ms.
        await a.execute("migrate-set-parameters", {"x-checkpoint-delay": 50})
        started = time.monotonic()
        await pair.wait_checkpoints("a", 3 + 20, timeout=10)
        assert time.monotonic() - started < 5
        with pytest.raises(ExecuteError) as info:
            await a.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert str(info.value) == "There's a migration process in progress"
        assert (await http_status(pair.daemons["b"]))["colo"]["checkpoints-loaded"] >= 23
    finally:
        await pair.close()


async def test_colo_refuses_what_it_cannot_do(tmp_path, guest_images):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    d = start_daemon(tmp_path, "--guest", "memdirty", "-m", "32", "--disk", str(disk))
    qmp = QMPClient("refusals")
    try:
        await qmp.connect(d.qmp)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        for uri, message in [("unix:/tmp/nope", "COLO needs a tcp: migration URI"),
                             ("tcp:127.0.0.1:1", "x-colo with a writable disk is refused")]:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("migrate", {"uri": uri})
            assert str(info.value).startswith(message)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert str(info.value).startswith("x-colo cannot be combined with multifd")
        assert (await qmp.execute("query-status"))["status"] == "running"
    finally:
        await qmp.disconnect()
        stop_daemon(d)


async def test_kvstore_under_load_checkpoints_and_takes_over(topo, guest_images, tmp_path):
    """RAM equal at every checkpoint with a client writing; after the primary dies the secondary
    serves from its tap, with what the client wrote before the last checkpoint."""
    pair = Pair(topo, tmp_path, kvstore_args(topo) + ["--verify-ram"])
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "listening")
        writer, load = RedisLoad(topo), RedisLoad(topo)
        assert writer.call(b"SET", b"before", b"colo") == b"+OK"
        load.start()
        await pair.enter_colo(delay=100)
        await pair.wait_checkpoints("a", 30)
        assert writer.call(b"SET", b"protected", b"yes") == b"+OK"
        await pair.wait_checkpoints("a", 35)
        load.stopping.set()
        load.join(10)
        assert not load.errors, load.errors
        assert load.ops > 100
        await assert_digests_match(pair, 25)
        assert (await http_status(pair.daemons["a"]))["colo"]["failed-checkpoints"] == 0
        with b.listener() as events:
            pair.daemons["a"].proc.kill()
            assert await colo_exit(events) == {"mode": "secondary", "reason": "error"}
        # A fresh connection reaches the guest on the secondary's tap (announced with RARP).
        result = topo.run_client(["redis-cli", "-h", topo.guest_address, "--raw", "MGET", "before", "protected"],
                                 capture_output=True, text=True, timeout=30)
        assert result.stdout.split() == ["colo", "yes"], result
    finally:
        await pair.close()


def test_colo_config_keys_and_their_checks(tmp_path):
    from appliance.config import ConfigError, load_config
    path = tmp_path / "node.toml"
    path.write_text('[colo]\nheartbeat_interval = 50\nheartbeat_timeout = 300\nheartbeat_port = 7000\n'
                    'failover = "manual"\nverify_ram = true\n')
    config = load_config(str(path))
    config.validate()
    assert (config.colo.heartbeat_interval_ms, config.colo.heartbeat_timeout_ms, config.colo.heartbeat_port,
            config.colo.failover, config.colo.verify_ram) == (50, 300, 7000, "manual", True)
    for text, message in [('[colo]\nheartbeat = 1\n', "unknown key(s) ['heartbeat'] in [colo]"),
                          ('[colo]\nfailover = "sometimes"\n', "colo failover must be 'auto' or 'manual'"),
                          ('[colo]\nheartbeat_interval = 100\nheartbeat_timeout = 150\n',
                           "timeout must be at least twice the interval")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(str(path)).validate()


async def test_colo_metrics_match_what_the_test_measures(topo, guest_images, tmp_path):
    """memdirty at 40 MiB/s over a 16 MiB working set dirties 4 MiB of distinct pages per 100 ms
    checkpoint: the byte and checkpoint counters must agree with that and with the wall clock."""
    pair, a, b = await started_pair(topo, tmp_path, delay=100, checkpoints=2)
    try:
        def families(text):
            return {f.name: f for f in text_string_to_metric_families(text)}

        def value(fams, name, **labels):
            family_name = name.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
            return next(s.value for s in fams[family_name].samples
                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

        first = families((await http_get(pair.daemons["a"], "/metrics")).decode())
        started = time.monotonic()
        await asyncio.sleep(3)
        second = families((await http_get(pair.daemons["a"], "/metrics")).decode())
        elapsed = time.monotonic() - started
        checkpoints = value(second, "colo_appliance_colo_checkpoints_total", reason="periodic") - \
            value(first, "colo_appliance_colo_checkpoints_total", reason="periodic")
        assert elapsed / 0.1 * 0.5 <= checkpoints <= elapsed / 0.1 * 1.05, (checkpoints, elapsed)
        sent = value(second, "colo_appliance_colo_checkpoint_bytes_total") - \
            value(first, "colo_appliance_colo_checkpoint_bytes_total")
        assert 0.5 * 40 * 2**20 * elapsed <= sent <= 1.5 * 40 * 2**20 * elapsed, (sent, elapsed)
        paused = value(second, "colo_appliance_colo_checkpoint_pause_seconds_sum") - \
            value(first, "colo_appliance_colo_checkpoint_pause_seconds_sum")
        count = value(second, "colo_appliance_colo_checkpoint_pause_seconds_count")
        assert count == value(second, "colo_appliance_colo_checkpoints_total", reason="periodic")
        assert 0 < paused < elapsed
        p50 = value(second, "colo_appliance_colo_checkpoint_pause_seconds", quantile="0.5")
        assert 0 < p50 <= value(second, "colo_appliance_colo_checkpoint_pause_seconds", quantile="0.99")
        assert 0 <= value(second, "colo_appliance_colo_heartbeat_age_seconds") < 0.5
        assert value(second, "colo_appliance_colo_info", mode="primary", failover_status="none") == 1
        secondary = families((await http_get(pair.daemons["b"], "/metrics")).decode())
        assert value(secondary, "colo_appliance_colo_info", mode="secondary") == 1
        assert value(secondary, "colo_appliance_colo_failovers_total") == 0
    finally:
        await pair.close()


async def test_xbzrle_sends_checkpoint_pages_as_deltas(topo, guest_images, tmp_path):
    """memdirty changes one byte per page: with xbzrle a checkpoint carries deltas, not pages,
    and the SVM's RAM still equals the PVM's at every checkpoint."""
    pair = Pair(topo, tmp_path, MEMDIRTY)
    try:
        _, a = await pair.start("a")
        _, b = await pair.start("b", incoming=True)
        await wait_console(a, "pass ")
        await a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
        await pair.enter_colo(delay=100)
        start = (await http_status(pair.daemons["a"]))["colo"]
        await pair.wait_checkpoints("a", start["checkpoints-total"] + 20)
        end = (await http_status(pair.daemons["a"]))["colo"]
        per_checkpoint = (end["bytes-total"] - start["bytes-total"]) / (end["checkpoints-total"] -
                                                                       start["checkpoints-total"])
        # 40 MiB/s for 100 ms is 4 MiB of pages per checkpoint; their deltas are a small fraction.
        assert per_checkpoint < 1 << 20, per_checkpoint
        cache = (await a.execute("query-migrate"))["xbzrle-cache"]
        assert cache["pages"] > 20 * 1000 and cache["bytes"] < cache["pages"] * 64
        await assert_digests_match(pair, 15)
    finally:
        await pair.close()


@pytest.mark.parametrize("node", ["a", "b"])
async def test_sigterm_leaves_colo_at_once_and_the_peer_goes_on(topo, guest_images, tmp_path, node):
    """Stopping a node's daemon (systemd stop) is a lost peer for the other: a stopped primary's
    secondary takes over, a stopped secondary's primary runs on; the daemon exits promptly."""
    pair, a, b = await started_pair(topo, tmp_path)
    peer = b if node == "a" else a
    try:
        with peer.listener() as events:
            started = time.monotonic()
            pair.daemons[node].proc.send_signal(signal.SIGTERM)
            assert pair.daemons[node].proc.wait(10) == 0
            assert time.monotonic() - started < 5
            mode = "secondary" if node == "a" else "primary"
            assert await colo_exit(events) == {"mode": mode, "reason": "error"}
        await assert_memdirty_runs_on(peer, 1.0)
        # A node that goes away never takes over on its way out.
        assert "took over" not in pair.daemons[node].log()
    finally:
        await pair.close()


async def test_stop_during_checkpoints_is_not_undone(topo, guest_images, tmp_path):
    """At x-checkpoint-delay 0 a `stop` lands inside a checkpoint's pause most of the time; the
    checkpoint's end must leave the guest stopped, and checkpoints go on with it stopped."""
    pair, a, b = await started_pair(topo, tmp_path, delay=0)
    try:
        for _ in range(5):
            with a.listener() as events:
                await a.execute("stop")
                assert await next_event(events) == ("STOP", None)
            done = await pair.checkpoints("a")
            await pair.wait_checkpoints("a", done + 3)
            assert (await a.execute("query-status"))["status"] in ("paused", "colo")
            await asyncio.sleep(0.2)
            assert (await a.execute("query-status"))["status"] in ("paused", "colo")
            await a.execute("cont")
            await pair.wait_checkpoints("a", done + 6)
            assert (await a.execute("query-status"))["status"] in ("running", "colo")
        # stop and cont back to back, landing inside checkpoints: the capture never runs the guest.
        for _ in range(30):
            await a.execute("stop")
            await a.execute("cont")
        done = await pair.checkpoints("a")
        await pair.wait_checkpoints("a", done + 5)
        status = (await http_status(pair.daemons["a"]))["colo"]
        assert status["failed-checkpoints"] == 0 and status["mode"] == "primary"
        assert (await b.execute("query-colo-status"))["mode"] == "secondary"
    finally:
        await pair.close()


async def test_planned_exit_waits_for_a_long_checkpoint(topo, guest_images, tmp_path, monkeypatch):
    """x-colo-lost-heartbeat on the primary while the secondary takes 1.5 s to load: the exit
    comes after that checkpoint, so the secondary stops instead of taking over."""
    monkeypatch.setenv("COLO_APPLIANCE_TEST_LOAD_DELAY_MS", "1500")
    pair, a, b = await started_pair(topo, tmp_path, delay=0, checkpoints=1)
    try:
        with a.listener() as a_events, b.listener() as b_events:
            await a.execute("x-colo-lost-heartbeat")
            assert await colo_exit(a_events) == {"mode": "primary", "reason": "request"}
            assert await colo_exit(b_events, timeout=15) == {"mode": "secondary", "reason": "request"}
        assert (await http_status(pair.daemons["b"]))["colo"]["failover-history"] == ["none"]
        assert (await b.execute("query-status"))["status"] == "paused"
        await assert_memdirty_runs_on(a, 0.5)
    finally:
        await pair.close()


def test_colo_flags_reach_the_settings(tmp_path, monkeypatch):
    """serve's COLO and netfilter flags land in the node's settings (and are checked)."""
    from appliance import cli
    seen = {}

    async def serve(config, vm, token):
        seen["config"] = config
        return 0
    monkeypatch.setattr("appliance.daemon.serve", serve)
    argv = ["serve", "--no-http", "--state-dir", str(tmp_path), "--colo-heartbeat-interval", "50",
            "--colo-heartbeat-timeout", "400", "--colo-heartbeat-port", "7001", "--colo-failover", "manual",
            "--verify-ram", "--colo-compare-timeout", "2000", "--colo-expired-scan-cycle", "500",
            "--colo-max-queue-size", "64", "--colo-packet-port", "7002", "--colo-passthrough", "udp:123"]
    args = cli.build_parser().parse_args(argv)
    assert args.func(args) == 0
    config = seen["config"]
    assert (config.colo.heartbeat_interval_ms, config.colo.heartbeat_timeout_ms, config.colo.heartbeat_port,
            config.colo.failover, config.colo.verify_ram) == (50, 400, 7001, "manual", True)
    assert (config.netfilter.compare_timeout_ms, config.netfilter.expired_scan_cycle_ms,
            config.netfilter.max_queue_size, config.netfilter.packet_port,
            config.netfilter.passthrough) == (2000, 500, 64, 7002, [("udp", 123)])
