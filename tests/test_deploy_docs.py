"""docs/operations.md followed as written: two hosts (network namespaces wired as its
prerequisites say: br0 with the host's address and its uplink, 10.0.0.0/24), each running the
systemd unit's own ExecStart with the shipped example config; only the unit's install paths
(/opt, /etc, /run, /var/lib) are replaced by the checkout and a temporary directory.  The guest
migrates to node-b, back to node-a (which accepts migrate-incoming without a restart), and the
two then form a COLO pair, a client's keys surviving every step."""
import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from appliance.config import load_config, split_host_port
from appliance.netns import Topology
from conftest import REPO, free_port, start_daemon, stop_daemon
from test_migration_nodes import events_until, wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
UNIT = os.path.join(REPO, "systemd", "colo-appliance@.service")
EXAMPLES = os.path.join(REPO, "systemd", "examples")
MIGRATION_PORT = 4444                    # the README's and docs/operations.md's


def unit_command(instance: str, tmp_path) -> list[str]:
    """The unit's ExecStart for ``instance``, run from this checkout: the installed program becomes
    this Python's ``-m appliance.cli``, /etc/colo-appliance the examples, /run and /var/lib tmp_path."""
    text = open(UNIT).read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart=").replace("%i", instance))
    assert argv[0] == "/opt/colo-appliance/.venv/bin/colo-appliance", argv
    replaced = []
    for arg in argv[1:]:
        for installed, here in (("/etc/colo-appliance", EXAMPLES), ("/run/colo-appliance", str(tmp_path / "run")),
                                ("/var/lib/colo-appliance", str(tmp_path / "lib"))):
            arg = arg.replace(installed, here)
        replaced.append(arg)
    return [sys.executable, "-m", "appliance.cli", *replaced]


class Host:
    """One node daemon started as the unit starts it, in its host's namespace."""

    def __init__(self, topo, node: str, instance: str, tmp_path):
        (tmp_path / "run").mkdir(exist_ok=True)
        self.instance = instance
        self.qmp_path = str(tmp_path / "run" / f"{instance}.qmp")
        self.log_path = tmp_path / f"{instance}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(topo.in_namespace(topo.nodes[node].namespace,
                                                           unit_command(instance, tmp_path)),
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.qmp = QMPClient(instance)

    async def connect(self) -> QMPClient:
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_path.read_text()
            await asyncio.sleep(0.05)
        await self.qmp.connect(self.qmp_path)
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "validate-uuid", "state": True}]})
        return self.qmp

    async def stop(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class KVClient:
    """One connection from the client namespace (the hosts' LAN) to the guest's kvstore."""

    def __init__(self, topo):
        with topo.client_sockets():
            self.conn = socket.create_connection((topo.guest_address, 6379), timeout=20)
        self.file = self.conn.makefile("rb")

    def call(self, *words: bytes) -> bytes:
        self.conn.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        line = self.file.readline()
        if line.startswith(b"$") and line != b"$-1\r\n":
            return self.file.read(int(line[1:]) + 2)[:-2]
        return line.rstrip(b"\r\n")


async def migrate(source: QMPClient, destination: QMPClient, address: str, until: str = "completed") -> None:
    with source.listener("MIGRATION") as src_events, destination.listener("MIGRATION") as dst_events:
        await source.execute("migrate", {"uri": f"tcp:{address}:{MIGRATION_PORT}"})
        await events_until(src_events, "MIGRATION", until, 60)
        await events_until(dst_events, "MIGRATION", until, 60)


async def status(qmp: QMPClient) -> str:
    return (await qmp.execute("query-status"))["status"]


@pytest.fixture
def topo():
    """The docs' LAN: 10.0.0.1 the clients' side, node-a 10.0.0.10, node-b 10.0.0.11, the guest 10.0.0.2
    (inside namespaces of this test's own, so other tests' 10.0.0.0/24 do not meet it)."""
    t = Topology(f"dep{os.getpid() % 100000}", ["a", "b"], subnet=0)
    yield t
    t.close()


async def test_two_nodes_from_the_shipped_configs_migrate_there_and_back_then_form_a_colo_pair(
        topo, guest_images, tmp_path):
    hosts = []
    try:
        assert (topo.nodes["a"].address, topo.nodes["b"].address, topo.guest_address) == \
            ("10.0.0.10", "10.0.0.11", "10.0.0.2")
        node_a, node_b = Host(topo, "a", "node-a", tmp_path), Host(topo, "b", "node-b", tmp_path)
        hosts += [node_a, node_b]
        a, b = await node_a.connect(), await node_b.connect()
        assert (await status(a), await status(b)) == ("running", "inmigrate")
        await wait_console(a, "listening")
        client = KVClient(topo)
        assert client.call(b"SET", b"deployed", b"on-node-a") == b"+OK"

        await migrate(a, b, topo.nodes["b"].address)                 # validate-uuid: the same uuid on both
        assert (await status(a), await status(b)) == ("postmigrate", "running")
        assert client.call(b"GET", b"deployed") == b"on-node-a"
        assert client.call(b"SET", b"deployed", b"on-node-b") == b"+OK"

        # The way back: node-a, never restarted, accepts an incoming migration.
        await a.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{MIGRATION_PORT}"})
        assert await status(a) == "inmigrate"
        await migrate(b, a, topo.nodes["a"].address)
        assert (await status(a), await status(b)) == ("running", "postmigrate")
        assert client.call(b"GET", b"deployed") == b"on-node-b"

        # The same configs as a COLO pair: node-b waits again, x-colo on both, node-a migrates.
        await b.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{MIGRATION_PORT}"})
        for qmp in (a, b):
            await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        await a.execute("migrate-set-parameters", {"x-checkpoint-delay": 200})
        await migrate(a, b, topo.nodes["b"].address, until="colo")
        assert (await a.execute("query-colo-status"))["mode"] == "primary"
        assert (await b.execute("query-colo-status"))["mode"] == "secondary"
        assert client.call(b"SET", b"protected", b"yes") == b"+OK"      # through COLO's comparer
        assert client.call(b"GET", b"deployed") == b"on-node-b"
        client.conn.close()
        for host in hosts:
            assert "Traceback" not in host.log_path.read_text()
            assert "overrides" not in host.log_path.read_text()        # the unit's flags and the configs agree
    finally:
        for host in hosts:
            await host.stop()
            print(f"--- {host.instance}'s log\n{host.log_path.read_text()}")     # shown if the test fails


def test_make_install_puts_everything_where_the_unit_expects_it(tmp_path):
    """``make install``'s file part (its venv and guest build is `make venv guests` in PREFIX): the
    unit points at PREFIX and SYSCONFDIR, the tree is there, an operator's config is left alone."""
    prefix, etc, units = tmp_path / "opt", tmp_path / "etc", tmp_path / "units"
    etc.mkdir()
    (etc / "node-a.toml").write_text("# the operator's own\n")
    subprocess.run(["make", "-s", "install-files", f"PREFIX={prefix}", f"SYSCONFDIR={etc}", f"UNITDIR={units}"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    unit = (units / "colo-appliance@.service").read_text()
    assert f"ExecStart={prefix}/.venv/bin/colo-appliance serve --config {etc}/%i.toml" in unit
    assert f"Documentation=file://{prefix}/README.md" in unit and (prefix / "README.md").exists()
    assert (prefix / "appliance" / "cli.py").exists() and (prefix / "Makefile").exists()
    assert not (prefix / ".venv").exists() and not (prefix / ".git").exists()
    assert (etc / "examples" / "node-b.toml").read_text() == open(os.path.join(EXAMPLES, "node-b.toml")).read()
    assert (etc / "node-a.toml").read_text() == "# the operator's own\n"


def test_the_example_configs_are_valid_and_keep_qmp_off_the_migration_port(guest_images):
    for name in ("node-a", "node-b"):
        config = load_config(os.path.join(EXAMPLES, f"{name}.toml"))
        config.validate()                                   # port collisions included
        assert split_host_port(config.qmp_tcp, "qmp_tcp")[1] != MIGRATION_PORT
        assert config.guest.uuid == "5f1c0b8e-2d7a-4c1e-9a53-0c6f1d2e3b4a"     # one guest, the same on both
    assert load_config(os.path.join(EXAMPLES, "node-b.toml")).incoming == f"tcp:0.0.0.0:{MIGRATION_PORT}"


async def test_migrate_incoming_is_refused_where_a_guest_would_be_lost(guest_images, tmp_path):
    """Accepted on a node whose guest never ran (-S); refused on a running or paused one (it would
    be overwritten); a URI that cannot listen leaves the guest's state as it was."""
    memdirty = ["--guest", "memdirty", "-m", "16", "--append", "mib=1 rate=0"]
    running, prelaunch = start_daemon(tmp_path, *memdirty, name="running"), \
        start_daemon(tmp_path, *memdirty, "-S", name="prelaunch")
    a, b = QMPClient("running"), QMPClient("prelaunch")
    try:
        await a.connect(running.qmp)
        await b.connect(prelaunch.qmp)
        for state in ("running", "paused"):
            with pytest.raises(ExecuteError, match=f"the guest is {state} on this node: an incoming migration "
                                                   "would overwrite it"):
                await a.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{free_port()}"})
            assert await status(a) == state
            await a.execute("stop")
        with pytest.raises(ExecuteError):
            await b.execute("migrate-incoming", {"uri": "tcp:192.0.2.1:1"})      # not an address of this host
        assert await status(b) == "prelaunch"
        await b.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{free_port()}"})
        assert await status(b) == "inmigrate"
        assert (await b.execute("query-migrate"))["status"] == "setup"
        with pytest.raises(ExecuteError, match="The incoming migration has already been started"):
            await b.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{free_port()}"})
    finally:
        await a.disconnect()
        await b.disconnect()
        stop_daemon(running)
        stop_daemon(prelaunch)
