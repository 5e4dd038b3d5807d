"""A node daemon hosting a real KVM guest, driven over QMP and HTTP."""
import asyncio
import os

import aiohttp
import pytest
from qemu.qmp import ExecuteError, QMPClient

from conftest import start_daemon, stop_daemon

pytestmark = pytest.mark.kvm


async def wait_console(qmp, text, timeout=10.0):
    seen = ""
    deadline = asyncio.get_running_loop().time() + timeout
    while text not in seen:
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r} on the console: {seen!r}"
        seen += await qmp.execute("ringbuf-read", {"device": "console", "size": 65536})
        await asyncio.sleep(0.05)
    return seen


@pytest.fixture
async def memdirty_node(tmp_path, guest_images):
    d = start_daemon(tmp_path, "--guest", "memdirty", "-m", "32", "--append", "mib=8 rate=0", name="guest-node")
    qmp = QMPClient("test")
    await qmp.connect(d.qmp)
    yield d, qmp
    await qmp.disconnect()
    stop_daemon(d)
    assert d.proc.returncode == 0, d.log()


async def test_guest_runs_and_is_controlled_over_qmp(memdirty_node, tmp_path):
    d, qmp = memdirty_node
    assert await qmp.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
    await wait_console(qmp, "pass ")
    with qmp.listener() as events:
        await qmp.execute("stop")
        assert (await asyncio.wait_for(events.get(), 5))["event"] == "STOP"
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        assert (await asyncio.wait_for(events.get(), 5))["event"] == "RESUME"
    assert (await qmp.execute("query-status"))["status"] == "running"
    assert os.path.getsize(tmp_path / "guest-node-console.log") > 0

    async with aiohttp.ClientSession(headers=d.auth) as http:
        async with http.get(f"http://{d.http}/api/v1/status") as r:
            vm = (await r.json())["vm"]
        async with http.get(f"http://{d.http}/api/v1/console") as r:
            assert "memdirty" in await r.text()
    assert vm["status"] == "running" and vm["image"].endswith("memdirty.elf") and vm["memory_mib"] == 32


async def test_calc_dirty_rate_measures_the_guest(memdirty_node):
    _, qmp = memdirty_node
    await qmp.execute("calc-dirty-rate", {"calc-time": 1})
    assert (await qmp.execute("query-dirty-rate"))["status"] == "measuring"
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
    assert "dirty rate is being measured" in str(info.value)
    await asyncio.sleep(1.2)
    while (result := await qmp.execute("query-dirty-rate"))["status"] == "measuring":
        await asyncio.sleep(0.1)
    # memdirty rewrites its 8 MiB working set many times a second: all of it is dirty each second.
    assert result["status"] == "measured" and result["calc-time"] == 1 and result["dirty-rate"] >= 8


async def test_ringbuf_read_formats_and_devices(memdirty_node):
    _, qmp = memdirty_node
    import base64
    first = b""
    while len(first) < 8:          # the guest may not have written yet
        first += base64.b64decode(await qmp.execute("ringbuf-read",
                                                    {"device": "console", "size": 8 - len(first),
                                                     "format": "base64"}))
        await asyncio.sleep(0.02)
    assert first == b"memdirty"
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("ringbuf-read", {"device": "serial0", "size": 8})
    assert info.value.error_class == "DeviceNotFound"


async def test_start_paused_then_cont(tmp_path, guest_images):
    d = start_daemon(tmp_path, "--guest", "memdirty", "-m", "16", "--append", "mib=1 rate=0", "-S",
                     name="paused-node")
    qmp = QMPClient("test")
    try:
        await qmp.connect(d.qmp)
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        await qmp.execute("cont")
        assert (await qmp.execute("query-status"))["status"] == "running"
        await wait_console(qmp, "pass ")
    finally:
        await qmp.disconnect()
        stop_daemon(d)


async def test_guest_fault_is_reported_and_the_daemon_stays_up(tmp_path, guest_images):
    d = start_daemon(tmp_path, "--guest", os.path.join(guest_images, "probe.elf"), "--append", "mode=null", "-S",
                     name="fault-node")
    qmp = QMPClient("test")
    try:
        await qmp.connect(d.qmp)
        with qmp.listener() as events:
            await qmp.execute("cont")
            names = []
            while "STOP" not in names:
                names.append((await asyncio.wait_for(events.get(), 10))["event"])
        assert names == ["RESUME", "GUEST_PANICKED", "STOP"]
        assert (await qmp.execute("query-status"))["status"] == "guest-panicked"
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("cont")
        assert str(info.value) == "Resetting the Virtual Machine is required"
        async with aiohttp.ClientSession(headers=d.auth) as http:
            async with http.get(f"http://{d.http}/api/v1/status") as r:
                vm = (await r.json())["vm"]
        assert vm["status"] == "guest-panicked" and vm["stop_reason"]
        assert d.alive()
    finally:
        await qmp.disconnect()
        stop_daemon(d)


def test_missing_image_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--no-http", "--guest",
                             str(tmp_path / "nope.elf")], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 2
    assert f"guest image {tmp_path / 'nope.elf'} does not exist" in result.stderr
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--no-http", "--guest", "/etc/passwd"],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 1 and 'level=error logger=appliance msg="guest: not an ELF file' in result.stderr
    assert "Traceback" not in result.stderr
