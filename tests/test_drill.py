"""``colo-appliance drill`` run for real (a subprocess in the root namespace, on the daemons' QMP
UNIX sockets) against memdirty nodes in network namespaces; then the nodes' states through QMP."""
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest
from qemu.qmp import QMPClient

from appliance.netns import Topology
from conftest import REPO, start_daemon, stop_daemon
from test_migration_nodes import wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
PORT = 4444
MEMDIRTY = ["--guest", "memdirty", "-m", "64", "--append", "mib=16 rate=40"]


@pytest.fixture
def topo():
    t = Topology(f"drill{os.getpid() % 100000}", ["a", "b", "c"])
    yield t
    t.close()


class Nodes:
    """Node a runs the guest; b and c wait for a migration."""

    def __init__(self):
        self.daemons = {}
        self.clients = []

    def start(self, topo, tmp_path):
        for name in ("a", "b", "c"):
            incoming = [] if name == "a" else ["--incoming", f"tcp:0.0.0.0:{PORT}"]
            self.daemons[name] = start_daemon(tmp_path, *MEMDIRTY, *incoming, name=name,
                                              namespace=topo.nodes[name].namespace)

    def __getitem__(self, name):
        return self.daemons[name]

    async def qmp(self, name) -> QMPClient:
        qmp = QMPClient(f"test-{name}")
        await qmp.connect(self.daemons[name].qmp)
        self.clients.append(qmp)
        return qmp

    async def close(self):
        for qmp in self.clients:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        # Secondaries first: a COLO primary takes 30 s to stop on SIGTERM while its secondary is there.
        for daemon in reversed(self.daemons.values()):
            if daemon.alive():
                daemon.proc.send_signal(signal.SIGCONT)     # a test that failed with its primary frozen
            stop_daemon(daemon)


@pytest.fixture
async def nodes(topo, tmp_path, guest_images):
    started = Nodes()
    try:
        started.start(topo, tmp_path)
        await wait_console(await started.qmp("a"), "pass ")
        yield started
    finally:
        await started.close()


def uri(topo, node, port=PORT):
    return f"tcp:{topo.nodes[node].address}:{port}"


def drill(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "drill", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def report_lines(result) -> list[str]:
    """The report without the progress lines, times replaced by T."""
    lines = [line for line in result.stdout.splitlines() if not line.startswith("... ")]
    return [re.sub(r"\d+(\.\d)? (ms|s)\b", "T", line) for line in lines]


async def assert_guest_runs_on(qmp):
    """memdirty checks its invariant at every pass and halts on a break: it must keep passing."""
    await asyncio.sleep(0.5)
    assert (await qmp.execute("query-status"))["status"] in ("running", "colo")    # colo: mid-checkpoint
    console = await qmp.execute("ringbuf-read", {"device": "console", "size": 1 << 20})
    assert "invariant broken" not in console
    await wait_console(qmp, "pass ")


async def test_kill_then_reprotect_onto_a_third_node(topo, nodes):
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    result = drill(a.qmp, b.qmp, "--to", uri(topo, "b"), "--method", "kill",
                   "--reprotect", c.qmp, "--reprotect-to", uri(topo, "c"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert report_lines(result) == [
        f"connected to 3 nodes in T (a pid {a.proc.pid}, b pid {b.proc.pid}, c pid {c.proc.pid})",
        "COLO entered in T",
        "10 checkpoints in T",
        "primary killed -> secondary took over in T (COLO_EXIT reason error)",
        "SVM running after T",
        "b out of COLO: mode none, last-mode secondary, reason error",
        "re-protected onto c in T",
        "10 checkpoints in T",
        "drill passed in T",
    ]
    progress = [line for line in result.stdout.splitlines() if line.startswith("... ")]
    assert len(progress) == 7, progress          # one per step, not one per poll
    assert a.proc.wait(5) == -signal.SIGKILL

    b_qmp, c_qmp = await nodes.qmp("b"), await nodes.qmp("c")
    assert await b_qmp.execute("query-colo-status") == {"mode": "primary", "last-mode": "secondary",
                                                        "reason": "none"}
    assert await c_qmp.execute("query-colo-status") == {"mode": "secondary", "last-mode": "none", "reason": "none"}
    b_migration = await b_qmp.execute("query-migrate")
    assert b_migration["status"] == "colo" and (await c_qmp.execute("query-migrate"))["status"] == "colo"
    # Still checkpointing after the drill, at the drill's x-checkpoint-delay.
    assert (await b_qmp.execute("query-migrate-parameters"))["x-checkpoint-delay"] == 200
    await asyncio.sleep(1)
    assert (await b_qmp.execute("query-migrate"))["ram"]["dirty-sync-count"] >= \
        b_migration["ram"]["dirty-sync-count"] + 3
    await assert_guest_runs_on(b_qmp)


@pytest.mark.parametrize("keep_frozen", [False, True], ids=["killed-at-the-end", "keep-frozen"])
async def test_freeze(topo, nodes, keep_frozen):
    a, b = nodes["a"], nodes["b"]
    result = drill(a.qmp, b.qmp, "--to", uri(topo, "b"), "--method", "freeze", "--checkpoints", "5",
                   "--checkpoint-delay", "100", *(["--keep-frozen"] if keep_frozen else []))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = report_lines(result)
    assert lines[1:5] == ["COLO entered in T", "5 checkpoints in T",
                          "primary frozen -> secondary took over in T (COLO_EXIT reason error)", "SVM running after T"]
    if keep_frozen:
        assert lines[-2] == (f"primary daemon left frozen (pid {a.proc.pid}, --keep-frozen): SIGKILL it, "
                             "never SIGCONT it while the secondary runs")
        with open(f"/proc/{a.proc.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"        # stopped, still there
        a.proc.kill()
    else:
        assert lines[-2] == f"frozen primary daemon killed (pid {a.proc.pid})"
    assert a.proc.wait(5) == -signal.SIGKILL
    assert lines[-1] == "drill passed in T"

    b_qmp = await nodes.qmp("b")
    assert await b_qmp.execute("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "error"}
    await assert_guest_runs_on(b_qmp)


async def test_lost_heartbeat_the_operators_way(topo, nodes):
    a, b = nodes["a"], nodes["b"]
    # Checkpoints 20 ms apart: a stop often lands in a checkpoint's pause, whose end resumes the PVM;
    # the drill must retry until the PVM stays stopped (it checks again before quit).
    result = drill(a.qmp, b.qmp, "--to", uri(topo, "b"), "--method", "lost-heartbeat", "--checkpoints", "5",
                   "--checkpoint-delay", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report_lines(result)[1:] == [
        "COLO entered in T",
        "5 checkpoints in T",
        "PVM stopped in T",
        "x-colo-lost-heartbeat -> secondary took over in T (COLO_EXIT reason request)",
        "SVM running after T",
        "b out of COLO: mode none, last-mode secondary, reason request",
        "old primary quit in T",
        "drill passed in T",
    ]
    assert a.proc.wait(10) == 0                 # quit: a clean exit
    b_qmp = await nodes.qmp("b")
    assert await b_qmp.execute("query-colo-status") == {"mode": "none", "last-mode": "secondary",
                                                        "reason": "request"}
    await assert_guest_runs_on(b_qmp)


async def test_nothing_listening_fails_and_leaves_the_primary_running(topo, nodes):
    a, b = nodes["a"], nodes["b"]
    result = drill(a.qmp, b.qmp, "--to", uri(topo, "b", PORT + 1), "--method", "kill")
    assert result.returncode == 1
    assert result.stderr.startswith(f"drill FAILED: entering COLO: migrate a -> {uri(topo, 'b', PORT + 1)}, "
                                    "x-checkpoint-delay 200 ms: migration failed on a: ")
    assert "Connection refused" in result.stderr and "Traceback" not in result.stderr
    assert "COLO entered" not in result.stdout
    assert a.alive() and b.alive()
    a_qmp = await nodes.qmp("a")
    assert (await a_qmp.execute("query-migrate"))["status"] == "failed"
    await assert_guest_runs_on(a_qmp)
    assert (await a_qmp.execute("query-status"))["status"] == "running"


def test_kill_and_freeze_need_the_primarys_unix_socket():
    for method in ("kill", "freeze"):
        result = drill("127.0.0.1:4000", "127.0.0.1:4001", "--to", "tcp:10.0.0.1:4444", "--method", method)
        assert result.returncode == 1
        assert result.stderr == (f"drill FAILED: --method {method} needs the primary's QMP UNIX socket: the daemon's "
                                 "PID comes from SO_PEERCRED, which a TCP address (127.0.0.1:4000) cannot give\n")
        assert result.stdout == ""          # refused before connecting to anything
