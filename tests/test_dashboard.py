"""The dashboard in a real browser (headless Chromium, driven over the DevTools protocol):
during a bandwidth-limited migration it shows the rate, what remains, the expected downtime,
the ETA and the destination, with the console's last lines; a screenshot is taken; and its
cancel button, clicked, cancels the migration (an authenticated JSON POST)."""
import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import time

import aiohttp
import pytest
from qemu.qmp import QMPClient

from conftest import free_port, start_daemon, stop_daemon

pytestmark = [pytest.mark.kvm]
# 8 MiB dirtied at 20 MiB/s, sent at 4 MiB/s: every pass takes ~2 s and never converges (until cancelled)
MEMDIRTY = ["--guest", "memdirty", "-m", "32", "--append", "mib=8 rate=20"]
LIMIT = 4 << 20                          # max-bandwidth, bytes/s
FIELDS = ("m-status", "m-destination", "m-rate", "m-sent", "m-remaining", "m-expected-downtime", "m-eta", "console")


class Browser:
    """Headless Chromium with one page, and a DevTools protocol connection to it."""

    def __init__(self, tmp_path):
        chromium = shutil.which("chromium")
        assert chromium, "chromium is missing: `make deps` installs it (Debian's chromium package)"
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,1600",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.ids = itertools.count(1)

    async def connect(self) -> None:
        line = ""
        while "DevTools listening on" not in line:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stderr.readline), 20)
            assert line or self.proc.poll() is None, "chromium exited"
        port = re.search(r"ws://[^:]+:(\d+)/", line).group(1)
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(target for target in await r.json() if target["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method: str, **params) -> dict:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = json.loads((await asyncio.wait_for(self.ws.receive(), 20)).data)
            if message.get("id") == ident:
                assert "error" not in message, message
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def close(self) -> None:
        if hasattr(self, "http"):
            await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not (result := await predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
    return result


async def test_dashboard_shows_a_migration_and_its_cancel_button_cancels_it(tmp_path):
    started = time.monotonic()
    port = free_port()
    src = start_daemon(tmp_path, *MEMDIRTY, name="dash-src")
    dst = start_daemon(tmp_path, *MEMDIRTY, "--incoming", f"tcp:127.0.0.1:{port}", name="dash-dst")
    qmp, browser = QMPClient("dash-src"), Browser(tmp_path)
    try:
        await qmp.connect(src.qmp)
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": LIMIT})
        await qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await browser.connect()
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=f"http://{src.http}/#token={src.token}")

        async def shown():
            page = await browser.evaluate("JSON.stringify(Object.fromEntries(%s.map(id => "
                                          "[id, (document.getElementById(id) || {}).textContent || ''])))"
                                          % json.dumps(FIELDS))
            page = json.loads(page)
            rated = page["m-rate"] not in ("-", "0.0 Mbps")
            return page if page["m-status"] == "active" and rated and page["console"] else None

        page = await wait_for(shown, timeout=15)
        screenshot = await browser.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(screenshot["data"])
        (tmp_path / "dashboard.png").write_bytes(png)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10000

        assert page["m-destination"] == f"tcp:127.0.0.1:{port}"
        assert re.fullmatch(r"\d+\.\d Mbps", page["m-rate"]), page
        assert 0.5 * LIMIT * 8 / 1e6 <= float(page["m-rate"].split()[0]) <= 1.5 * LIMIT * 8 / 1e6, page
        assert re.fullmatch(r"\d+\.\d MiB", page["m-remaining"]), page
        assert re.fullmatch(r"\d+ ms", page["m-expected-downtime"]), page
        assert re.fullmatch(r"(\d+ s|\d+\.\d min|< 1 s)", page["m-eta"]), page
        assert "memdirty: base=" in page["console"]
        assert (await qmp.execute("query-migrate"))["status"] == "active"
        assert await browser.evaluate("document.getElementById('cancel').hidden") is False

        await browser.evaluate("document.getElementById('cancel').click()")
        await wait_for(lambda: _status_is(qmp, "cancelled"))
        assert await wait_for(lambda: browser.evaluate("document.getElementById('cancel-result').textContent")) \
            == "cancel requested"
        assert (await qmp.execute("query-status"))["status"] == "running"       # the source guest carries on
        await wait_for(lambda: browser.evaluate("document.getElementById('cancel').hidden"))
        assert time.monotonic() - started < 30
    finally:
        await browser.close()
        await qmp.disconnect()
        stop_daemon(src)
        stop_daemon(dst)


async def _status_is(qmp, status: str) -> bool:
    return (await qmp.execute("query-migrate"))["status"] == status
