"""QEMU's own Python QMP library (``qemu.qmp``) against a running node daemon."""
import asyncio
import json
import os
import socket
import stat
import sys

import pytest
from qemu.qmp import ExecuteError, QMPClient

from appliance.qapi import default_schema

OK = object()

# Every command of the schema with valid arguments: what the node answers now.
# ("return", value | OK) or ("error", class, exact message | prefix ending in "...").
EVERY_COMMAND = {
    "query-version": ("return", {"qemu": {"major": 6, "minor": 0, "micro": 0}, "package": "colo-appliance 0.1.0"}),
    "query-commands": ("return", OK),
    "query-status": ("return", {"running": True, "singlestep": False, "status": "running"}),
    "stop": ("return", {}),
    "cont": ("return", {}),
    "x-cont-after-migration": ("return", {}),
    "getfd": ("error", "GenericError", "No file descriptor supplied via SCM_RIGHTS"),
    "ringbuf-read": ("error", "DeviceNotFound", "Device 'console' not found"),
    "closefd": ("error", "GenericError", "File descriptor named 'nope' not found"),
    "query-migrate": ("return", {}),
    "migrate-set-capabilities": ("return", {}),
    "query-migrate-capabilities": ("return", OK),
    "migrate-set-parameters": ("return", {}),
    "query-migrate-parameters": ("return", OK),
    "client_migrate_info": ("error", "GenericError", "SPICE is not supported by this appliance"),
    "migrate-start-postcopy": ("error", "GenericError",
                               "Enable postcopy with migrate_set_capability before the start of migration"),
    "x-colo-lost-heartbeat": ("error", "GenericError", "The feature 'colo' is not enabled"),
    "migrate_cancel": ("return", {}),
    "migrate-continue": ("error", "GenericError", "Migration not in expected state: none"),
    "migrate_set_downtime": ("return", {}),
    "migrate_set_speed": ("return", {}),
    "migrate-set-cache-size": ("return", {}),
    "query-migrate-cache-size": ("return", 67108864),
    "migrate": ("error", "GenericError", "this node has no guest to migrate"),
    "migrate-incoming": ("error", "GenericError", "this node has no guest to migrate into (start it with --guest)"),
    "xen-save-devices-state": ("error", "GenericError", "xen-save-devices-state is a Xen command..."),
    "xen-set-global-dirty-log": ("error", "GenericError", "xen-set-global-dirty-log is a Xen command..."),
    "xen-load-devices-state": ("error", "GenericError", "xen-load-devices-state is a Xen command..."),
    "xen-set-replication": ("error", "GenericError", "xen-set-replication is a Xen command..."),
    "query-xen-replication-status": ("error", "GenericError", "query-xen-replication-status is a Xen command..."),
    "xen-colo-do-checkpoint": ("error", "GenericError",
                               "this node is not a COLO primary: only the primary takes checkpoints"),
    "query-colo-status": ("return", {"mode": "none", "last-mode": "none", "reason": "none"}),
    "migrate-recover": ("error", "GenericError", "Migrate recover can only be run when postcopy is paused."),
    "migrate-pause": ("error", "GenericError", "migrate-pause is currently only supported during postcopy-active state"),
    "calc-dirty-rate": ("error", "GenericError", "this node has no guest to measure"),
    "query-dirty-rate": ("return", {"status": "unstarted", "start-time": 0, "calc-time": 0}),
}

VALID_ARGUMENTS = {
    "getfd": {"fdname": "fd0"},
    "ringbuf-read": {"device": "console", "size": 1024},
    "closefd": {"fdname": "nope"},
    "migrate-set-capabilities": {"capabilities": [{"capability": "events", "state": True}]},
    "migrate-set-parameters": {"downtime-limit": 300},
    "client_migrate_info": {"protocol": "spice", "hostname": "peer"},
    "migrate-continue": {"state": "pre-switchover"},
    "migrate_set_downtime": {"value": 0.3},
    "migrate_set_speed": {"value": 134217728},
    "migrate-set-cache-size": {"value": 67108864},
    "migrate": {"uri": "tcp:127.0.0.1:4444"},
    "migrate-incoming": {"uri": "tcp:127.0.0.1:4444"},
    "xen-save-devices-state": {"filename": "/tmp/x"},
    "xen-set-global-dirty-log": {"enable": True},
    "xen-load-devices-state": {"filename": "/tmp/x"},
    "xen-set-replication": {"enable": True, "primary": True},
    "migrate-recover": {"uri": "tcp:127.0.0.1:4444"},
    "calc-dirty-rate": {"calc-time": 1},
}


@pytest.fixture
async def qmp(daemon):
    client = QMPClient("test")
    await client.connect(daemon.qmp)
    yield client
    await client.disconnect()


def test_table_covers_the_schema():
    schema = default_schema()
    assert set(EVERY_COMMAND) | {"qmp_capabilities", "quit"} == set(schema.commands)


async def test_every_command(qmp):
    for command, expected in EVERY_COMMAND.items():
        args = VALID_ARGUMENTS.get(command)
        if expected[0] == "return":
            result = await qmp.execute(command, args)
            if expected[1] is not OK:
                assert result == expected[1], command
        else:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(command, args)
            desc = str(info.value)
            assert info.value.error_class == expected[1], command
            if expected[2].endswith("..."):
                assert desc.startswith(expected[2][:-3]), (command, desc)
            else:
                assert desc == expected[2], command


async def test_greeting_and_query_commands(qmp):
    greeting = qmp.greeting._asdict()
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert greeting["QMP"]["version"]["package"] == "colo-appliance 0.1.0"
    names = {c["name"] for c in await qmp.execute("query-commands")}
    assert names == set(default_schema().commands)


async def test_reply_matched_by_id_and_schema_errors(qmp):
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("migrate-set-parameters", {"compress-level": 10})
    assert str(info.value) == "Parameter 'compress_level' expects a value between 0 and 9"
    results = await asyncio.gather(*(qmp.execute("query-status") for _ in range(50)))
    assert all(r["status"] == "running" for r in results)


async def test_stop_cont_events(qmp):
    with qmp.listener() as listener:
        await qmp.execute("stop")
        event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "STOP"
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("stop")                     # already paused: no second event
        await qmp.execute("cont")
        assert (await asyncio.wait_for(listener.get(), 5))["event"] == "RESUME"
        assert listener.empty()


async def test_events_reach_every_negotiated_client(daemon, qmp):
    other = QMPClient("other")
    await other.connect(daemon.qmp)
    try:
        with other.listener("STOP") as listener:
            await qmp.execute("stop")
            assert (await asyncio.wait_for(listener.get(), 5))["event"] == "STOP"
        await qmp.execute("cont")
    finally:
        await other.disconnect()


async def test_out_of_band(qmp):
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("migrate-pause", oob=True)
    assert str(info.value) == "migrate-pause is currently only supported during postcopy-active state"
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("query-status", oob=True)
    assert str(info.value) == "The command query-status does not support OOB"


async def test_getfd_with_scm_rights(qmp):
    r, w = os.pipe()
    try:
        qmp.send_fd_scm(r)
        assert await qmp.execute("getfd", {"fdname": "mig"}) == {}
        assert await qmp.execute("closefd", {"fdname": "mig"}) == {}
        with pytest.raises(ExecuteError):
            await qmp.execute("closefd", {"fdname": "mig"})
        qmp.send_fd_scm(r)
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("getfd", {"fdname": "0bad"})
        assert str(info.value) == "Parameter 'fdname' expects a name not starting with a digit"
    finally:
        os.close(r)
        os.close(w)


async def test_quit_shuts_the_daemon_down(daemon):
    qmp = QMPClient("quitter")
    await qmp.connect(daemon.qmp)
    with qmp.listener("SHUTDOWN") as listener:
        assert await qmp.execute("quit") == {}
        event = await asyncio.wait_for(listener.get(), 5)
    try:
        await qmp.disconnect()
    except EOFError:          # the node may close the connection first as it exits
        pass
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    await asyncio.get_running_loop().run_in_executor(None, daemon.proc.wait, 10)
    assert daemon.proc.returncode == 0
    assert not os.path.exists(daemon.qmp)


def test_socket_is_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.qmp).st_mode) == 0o600


class RawClient:
    """Speaks raw bytes, to check what a library would never send."""

    def __init__(self, path, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read() == {"return": {}}

    def send(self, data: bytes):
        self.sock.sendall(data + b"\n")

    def read(self):
        while True:
            message = json.loads(self.file.readline())
            if "event" not in message:
                return message

    def ask(self, data: bytes):
        self.send(data)
        return self.read()

    def close(self):
        self.file.close()
        self.sock.close()


def err(desc, cls="GenericError", **extra):
    return {"error": {"class": cls, "desc": desc}, **extra}


def test_negotiation_rules(daemon):
    c = RawClient(daemon.qmp, negotiate=False)
    assert c.ask(b'{"execute": "query-status"}') == err(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
    assert c.ask(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}') == err(
        "Parameter 'null' does not accept value 'foo'")
    assert c.ask(b'{"execute": "qmp_capabilities", "id": 1}') == {"return": {}, "id": 1}
    assert c.ask(b'{"execute": "qmp_capabilities"}') == err(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    assert c.ask(b'{"exec-oob": "migrate-pause"}') == err("QMP input member 'exec-oob' is unexpected")
    c.close()


@pytest.mark.parametrize("raw, reply", [
    (b"[1, 2]", err("QMP input must be a JSON object")),
    (b"42", err("QMP input must be a JSON object")),
    (b'"str"', err("QMP input must be a JSON object")),
    (b'{"foo": 1}', err("QMP input member 'foo' is unexpected")),
    (b'{"execute": 1}', err("QMP input member 'execute' must be a string")),
    (b'{"id": 7}', err("QMP input lacks member 'execute'", id=7)),
    (b'{"execute": "query-status", "arguments": []}', err("QMP input member 'arguments' must be an object")),
    (b'{"execute": "query-status", "id": "a", "extra": 1}', err("QMP input member 'extra' is unexpected", id="a")),
    (b'{"execute": "nope", "id": [1]}', err("The command nope has not been found", "CommandNotFound", id=[1])),
    (b'{"execute": }', err("JSON parse error, expecting value")),
    (b"}", err("JSON parse error, expecting value")),
    (b'{"a": 1, "a": 2}', err("JSON parse error, duplicate key")),
    (b'{"execute": NaN}', err("JSON parse error, invalid keyword 'NaN'")),
    (b'{"execute": "query-status", "id": "\\ud800"}', err("JSON parse error, \\ud800 is not a valid Unicode character")),
    (b'{"execute": "query-status", "id": "\xed\xa0\x80"}', err("JSON parse error, invalid UTF-8 sequence in string")),
])
def test_envelope_errors_match_qemu(daemon, raw, reply):
    c = RawClient(daemon.qmp)
    assert c.ask(raw) == reply
    assert c.ask(b'{"execute": "query-status", "id": "after"}')["id"] == "after"
    c.close()


def test_tcp_listener(tmp_path):
    from conftest import free_port, start_daemon, stop_daemon
    port = free_port()
    d = start_daemon(tmp_path, "--qmp-tcp", f"127.0.0.1:{port}", name="tcp-node")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rwb")
            assert "QMP" in json.loads(f.readline())
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 3}\n')
            f.flush()
            assert json.loads(f.readline()) == {"return": {}}
            assert json.loads(f.readline())["id"] == 3
    finally:
        stop_daemon(d)


def test_replies_keep_the_order_of_requests(daemon):
    """Errors without an id are matched by position: they must not overtake earlier replies."""
    c = RawClient(daemon.qmp)
    c.sock.sendall(b'{"execute": "stop", "id": 1}{"foo": 1, "id": 2}{"execute": "cont", "id": 3}} '
                   b'{"execute": "query-status", "id": 4}\n')
    replies = [c.read() for _ in range(5)]
    assert [r.get("id") for r in replies] == [1, 2, 3, None, 4]
    assert replies[1]["error"]["desc"] == "QMP input member 'foo' is unexpected"
    assert replies[3] == err("JSON parse error, expecting value")
    c.close()


def test_control_character_in_a_string_resynchronises_like_qemu(daemon):
    c = RawClient(daemon.qmp)
    c.send(b'{"execute": "query-status", "id": "a\tb"}\n{"execute": "query-status", "id": 2}\n'
           b'{"execute": "query-status", "id": 3}')
    assert c.read() == err("JSON parse error, invalid character in string")
    assert c.read() == err("JSON parse error, expecting value")      # the '}' after the bad string
    assert c.read()["id"] == 2 and c.read()["id"] == 3
    c.close()


def test_nesting_up_to_qemus_limit(daemon):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)          # for this client's own json.loads of the deep reply
    try:
        c = RawClient(daemon.qmp)
        deep = b"[" * 1023 + b"]" * 1023
        reply = c.ask(b'{"execute": "query-status", "id": ' + deep + b"}")
        assert reply["return"]["status"] == "running" and json.dumps(reply["id"]).count("[") == 1023
        assert c.ask(b'{"execute": "query-status", "id": ' + b"[" * 1025 + b"]" * 1025 + b"}") == \
            err("JSON nesting depth limit exceeded")
        assert c.ask(b'{"execute": "query-status", "id": 99}')["id"] == 99
        c.close()
    finally:
        sys.setrecursionlimit(limit)
