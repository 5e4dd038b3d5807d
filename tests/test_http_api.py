"""The HTTP API: status, one QMP command, Prometheus metrics, bearer tokens."""
import subprocess
import sys

import aiohttp

from conftest import REPO, free_port, start_daemon, stop_daemon


async def test_status_qmp_and_metrics(daemon):
    base = f"http://{daemon.http}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/v1/status") as r:
            assert r.status == 200
            status = await r.json()
        assert status["node"] == "test-node"
        assert status["vm"]["status"] == "running"
        assert status["migration"] == {"status": "none"}
        async with http.get(f"{base}/") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            page = await r.text()
        assert "colo-appliance node <code>test-node</code>" in page and "/api/v1/status" in page
        assert status["colo"] == {"mode": "none", "last-mode": "none", "reason": "none"}

        async with http.post(f"{base}/api/v1/qmp", json={"execute": "query-migrate-parameters"}) as r:
            assert r.status == 200
            assert (await r.json())["return"]["downtime-limit"] == 300
        async with http.post(f"{base}/api/v1/qmp",
                             json={"execute": "migrate-set-parameters", "arguments": {"compress-level": 10}}) as r:
            assert r.status == 400
            assert await r.json() == {"error": {"class": "GenericError",
                                                "desc": "Parameter 'compress_level' expects a value between 0 and 9"}}
        async with http.post(f"{base}/api/v1/qmp", json={"execute": "nope"}) as r:
            assert (await r.json())["error"]["class"] == "CommandNotFound"
        async with http.post(f"{base}/api/v1/qmp", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["desc"].startswith("JSON parse error")
        async with http.post(f"{base}/api/v1/qmp", json={"execute": "stop", "x": 1}) as r:
            assert (await r.json())["error"]["desc"] == "QMP input member 'x' is unexpected"
        async with http.post(f"{base}/api/v1/qmp", json={"execute": "stop"}) as r:
            assert await r.json() == {"return": {}}
        async with http.get(f"{base}/api/v1/status") as r:
            assert (await r.json())["vm"] == {"status": "paused", "running": False}

        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = {line.split(" ")[0].split("{")[0]: line for line in text.splitlines() if not line.startswith("#")}
    for name in ("colo_appliance_up", "colo_appliance_vm_running", "process_resident_memory_bytes",
                 "process_cpu_seconds_total", "process_open_fds", "process_num_threads"):
        assert name in samples, name
    assert float(samples["process_resident_memory_bytes"].split()[-1]) > 1e6
    assert "# TYPE process_cpu_seconds_total counter" in text


async def test_bearer_token(tmp_path):
    d = start_daemon(tmp_path, "--http-token", "s3cret", name="token-node")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{d.http}/api/v1/status") as r:
                assert r.status == 401
            async with http.get(f"http://{d.http}/") as r:       # the page shell; its data needs the token
                assert r.status == 200
            async with http.get(f"http://{d.http}/metrics", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(f"http://{d.http}/api/v1/status",
                                headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
    finally:
        stop_daemon(d)


def test_refuses_non_loopback_bind_without_token():
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--http", f"0.0.0.0:{free_port()}"],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 2
    assert "refusing to bind the HTTP API to 0.0.0.0" in result.stderr
