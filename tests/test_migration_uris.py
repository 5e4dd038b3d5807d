"""Every migration URI between two node daemons on this host: unix:, exec:, fd: (getfd), file:."""
import asyncio
import socket

import aiohttp

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError, QMPClient

from conftest import free_port

pytestmark = pytest.mark.kvm


async def connect(daemon):
    qmp = QMPClient(daemon.qmp)
    await qmp.connect(daemon.qmp)
    return qmp


async def wait_status(qmp, wanted, timeout=60):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            assert info["status"] == wanted, info
            return info
        assert asyncio.get_running_loop().time() < deadline, info
        await asyncio.sleep(0.05)


async def migrate_and_check(src, dst, uri):
    a, b = await connect(src), await connect(dst)
    try:
        await a.execute("migrate", {"uri": uri})
        info = await wait_status(a, "completed")
        await wait_status(b, "completed")
        assert (await b.execute("query-status"))["status"] == "running"
        assert (await a.execute("query-status"))["status"] == "postmigrate"
        async with aiohttp.ClientSession(headers=src.auth) as http:
            async with http.get(f"http://{src.http}/metrics") as r:
                text = await r.text()
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["colo_appliance_migration_transferred_bytes"].labels == {"node": "src"}
        assert samples["colo_appliance_migration_transferred_bytes"].value == info["ram"]["transferred"]
        assert samples["colo_appliance_migration_downtime_milliseconds"].value == info["downtime"]
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_unix(pair, tmp_path):
    path = tmp_path / "mig.sock"
    src, dst = pair(name="src"), pair("--incoming", f"unix:{path}", name="dst")
    b = await connect(dst)
    assert await b.execute("query-migrate") == {"status": "setup",
                                                "socket-address": [{"type": "unix", "path": str(path)}]}
    await b.disconnect()
    await migrate_and_check(src, dst, f"unix:{path}")


async def test_cont_after_a_completed_migration_needs_the_explicit_command(pair, tmp_path):
    """The guest runs on the destination now: a plain cont on the source would run a second copy
    with the same MAC, so it is refused; x-cont-after-migration is the deliberate way."""
    path = tmp_path / "mig.sock"
    src, dst = pair(name="src"), pair("--incoming", f"unix:{path}", name="dst")
    await migrate_and_check(src, dst, f"unix:{path}")
    a = await connect(src)
    try:
        with pytest.raises(ExecuteError) as info:
            await a.execute("cont")
        assert str(info.value).startswith("the guest was migrated to another node (migration completed) and "
                                          "runs there now;")
        assert "x-cont-after-migration" in str(info.value)
        assert (await a.execute("query-status"))["status"] == "postmigrate"
        await a.execute("x-cont-after-migration")
        assert (await a.execute("query-status"))["status"] == "running"
        await a.execute("stop")                 # this copy is the one now: cont works again
        await a.execute("cont")
        assert (await a.execute("query-status"))["status"] == "running"
    finally:
        await a.disconnect()


async def test_tcp_port_zero_reports_the_port(pair):
    dst = pair("--incoming", "tcp:127.0.0.1:0", name="dst")
    b = await connect(dst)
    try:
        address = (await b.execute("query-migrate"))["socket-address"][0]
        assert address["type"] == "inet" and address["host"] == "127.0.0.1" and int(address["port"]) > 0
    finally:
        await b.disconnect()
    src = pair(name="src")
    await migrate_and_check(src, dst, f"tcp:127.0.0.1:{address['port']}")


async def test_exec_both_ways(pair, tmp_path):
    path = tmp_path / "guest.mig"
    src = pair(name="src")
    a = await connect(src)
    try:
        await a.execute("migrate", {"uri": f"exec:cat > {path}"})
        await wait_status(a, "completed")
    finally:
        await a.disconnect()
    dst = pair("--incoming", f"exec:cat {path}", name="dst")
    b = await connect(dst)
    try:
        await wait_status(b, "completed")
        assert (await b.execute("query-status"))["status"] == "running"
    finally:
        await b.disconnect()


async def test_file(pair, tmp_path):
    path = tmp_path / "guest.mig"
    src = pair(name="src")
    a = await connect(src)
    try:
        await a.execute("stop")
        await a.execute("migrate", {"uri": f"file:{path}"})
        await wait_status(a, "completed")
    finally:
        await a.disconnect()
    dst = pair("--incoming", "defer", name="dst")
    b = await connect(dst)
    try:
        await b.execute("migrate-incoming", {"uri": f"file:{path}"})
        await wait_status(b, "completed")
        assert (await b.execute("query-status"))["status"] == "paused"   # it was stopped at the source
    finally:
        await b.disconnect()


async def test_fd_passed_with_getfd(pair):
    port = free_port()
    src, dst = pair(name="src"), pair("--incoming", f"tcp:127.0.0.1:{port}", name="dst")
    a = await connect(src)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            a.send_fd_scm(sock.fileno())
            await a.execute("getfd", {"fdname": "migfd"})
        with pytest.raises(ExecuteError) as info:
            await a.execute("migrate", {"uri": "fd:other"})
        assert str(info.value) == "File descriptor named 'other' has not been found"
        await a.execute("migrate", {"uri": "fd:migfd"})
        await wait_status(a, "completed")
    finally:
        await a.disconnect()
    b = await connect(dst)
    try:
        await wait_status(b, "completed")
    finally:
        await b.disconnect()


async def test_uri_errors(pair):
    src = pair(name="src")
    a = await connect(src)
    try:
        for uri, message in [("rdma:1.2.3.4:5", "RDMA migration is not supported by this appliance"),
                             ("foo:bar", "Parameter 'uri' expects a valid migration protocol")]:
            with pytest.raises(ExecuteError) as info:
                await a.execute("migrate", {"uri": uri})
            assert str(info.value) == message
        await a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        with pytest.raises(ExecuteError) as info:
            await a.execute("migrate", {"uri": "exec:cat > /dev/null"})
        assert str(info.value) == "multifd needs a tcp: or unix: migration URI"
    finally:
        await a.disconnect()


async def test_cont_is_refused_while_migrating_and_cancel_resumes(pair):
    port = free_port()
    src = pair(name="src")
    pair("--incoming", f"tcp:127.0.0.1:{port}", name="dst")
    a = await connect(src)
    try:
        await a.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
        await a.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while (await a.execute("query-migrate"))["status"] != "pre-switchover":
            await asyncio.sleep(0.05)
        assert (await a.execute("query-status"))["status"] == "paused"
        with pytest.raises(ExecuteError) as info:
            await a.execute("cont")
        assert "cancel the migration" in str(info.value)
        await a.execute("migrate_cancel")
        await wait_status(a, "cancelled")
        assert (await a.execute("query-status"))["status"] == "running"
    finally:
        await a.disconnect()
