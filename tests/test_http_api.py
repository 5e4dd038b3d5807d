"""The HTTP API: status, one QMP command, Prometheus metrics.  Then, each as the attack it stops,
what keeps the API to the node's operator: the bearer token (never on the command line), the Host
and Origin checks, local migration URIs refused, bounded requests and connections."""
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from appliance.cli import SyncQMPClient
from appliance.http_api import BODY_TIMEOUT, IDLE_TIMEOUT, LINGER_TIME, MAX_BODY, MAX_CONNECTIONS, make_app
from conftest import REPO, free_port, start_daemon, stop_daemon

MEMDIRTY = ["--guest", "memdirty", "-m", "16", "--append", "mib=1 rate=0"]
JSON = {"Content-Type": "application/json"}


def call(daemon, method, path, body=None, headers=None):
    """One request on a connection of its own: (status, the JSON body, or the text of any other)."""
    conn = http.client.HTTPConnection(daemon.http, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data.decode()


def qmp(daemon, command, arguments=None, headers=None):
    """A QMP command over HTTP, with the token and the JSON content type unless ``headers`` replace them."""
    body = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    return call(daemon, "POST", "/api/v1/qmp", body, {**JSON, **daemon.auth, **(headers or {})})


def run_state(daemon) -> str:
    status, body = call(daemon, "GET", "/api/v1/status", headers=daemon.auth)
    assert status == 200, body
    return body["vm"]["status"]


def port_of(daemon) -> str:
    return daemon.http.rpartition(":")[2]


def serve_refused(*args, env=None):
    """``serve`` with a configuration it must refuse at start: its result (it exits at once)."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--name", "refused",
                           "--http", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=30, env={**os.environ, **(env or {})})


async def test_status_qmp_and_metrics(daemon):
    base = f"http://{daemon.http}"
    async with aiohttp.ClientSession(headers=daemon.auth) as http:
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
        assert {"mode": "none", "last-mode": "none", "reason": "none"}.items() <= status["colo"].items()

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
        async with http.post(f"{base}/api/v1/qmp", data=b"{not json", headers=JSON) as r:
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


def test_token_from_a_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-s3cret-s3cret\n")
    token_file.chmod(0o600)
    d = start_daemon(tmp_path, "--http-token-file", str(token_file), name="file-node")
    try:
        assert call(d, "GET", "/api/v1/status")[0] == 401
        assert call(d, "GET", "/")[0] == 200                # the page shell; its data needs the token
        assert call(d, "GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(d, "GET", "/api/v1/status", headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})[0] == 200
        assert f"HTTP API bearer token: {token_file}" in d.log() and "s3cret" not in d.log()
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path, name="env-node", env={"COLO_APPLIANCE_HTTP_TOKEN": "env-token-env-token"})
    try:
        assert call(d, "GET", "/metrics", headers={"Authorization": "Bearer env-token-env-token"})[0] == 200
        assert "HTTP API bearer token: the environment (COLO_APPLIANCE_HTTP_TOKEN)" in d.log()
        assert "env-token" not in d.log()
        assert not (tmp_path / "http-token").exists()
    finally:
        stop_daemon(d)


def test_csrf_from_a_web_page_is_refused(daemon):
    """A page open in a browser on the host posts a cross-site "simple" request (text/plain, so
    no CORS preflight) to 127.0.0.1: refused, and the guest keeps running.  Each check stops it
    on its own, even with the token."""
    stop = json.dumps({"execute": "stop"})
    page = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    status, body = call(daemon, "POST", "/api/v1/qmp", stop, page)
    assert status == 403 and body["error"]["desc"] == "cross-origin request from 'http://evil.example' refused"
    assert call(daemon, "POST", "/api/v1/qmp", stop, {**page, **daemon.auth})[0] == 403
    assert qmp(daemon, "stop", headers={"Origin": "null"})[0] == 403
    status, body = qmp(daemon, "stop", headers={"Content-Type": "text/plain"})
    assert status == 415 and body["error"]["desc"] == "a POST must be Content-Type: application/json"
    assert qmp(daemon, "stop", headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert run_state(daemon) == "running"
    assert qmp(daemon, "stop", headers={"Origin": f"http://127.0.0.1:{port_of(daemon)}"}) == (200, {"return": {}})
    assert run_state(daemon) == "paused"                 # the node's own page may post


def test_dns_rebinding_is_refused(daemon):
    """A site whose name now resolves to 127.0.0.1 reaches the port with its own name in Host:
    refused on every path, reads included."""
    evil = {"Host": f"evil.example:{port_of(daemon)}"}
    for path in ("/", "/api/v1/status", "/api/v1/console", "/metrics"):
        status, body = call(daemon, "GET", path, headers={**evil, **daemon.auth})
        assert status == 421, path
        assert body["error"]["desc"] == f"this node does not answer to host 'evil.example:{port_of(daemon)}'"
    assert qmp(daemon, "stop", headers=evil)[0] == 421
    assert call(daemon, "GET", "/api/v1/status", headers={"Host": "127.0.0.1", **daemon.auth})[0] == 421
    assert run_state(daemon) == "running"
    for host in (f"localhost:{port_of(daemon)}", f"LocalHost:{port_of(daemon)}", f"[::1]:{port_of(daemon)}"):
        assert call(daemon, "GET", "/api/v1/status", headers={"Host": host, **daemon.auth})[0] == 200


def test_configured_host_names(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nhttp_allowed_hosts = ["node-a.example"]\n')
    d = start_daemon(tmp_path, "--config", str(config))
    try:
        named = {"Host": f"node-a.example:{port_of(d)}", "Origin": f"http://node-a.example:{port_of(d)}"}
        assert call(d, "GET", "/api/v1/status", headers={**named, **d.auth})[0] == 200
        assert qmp(d, "query-status", headers=named)[0] == 200
        assert call(d, "GET", "/api/v1/status", headers={"Host": f"node-b.example:{port_of(d)}", **d.auth})[0] == 421
    finally:
        stop_daemon(d)


def test_no_token_no_access(daemon):
    """Whoever reaches the port without the token: 401 everywhere but the page shell."""
    for path in ("/api/v1/status", "/api/v1/console", "/metrics", "/nope"):
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": daemon.token},
                     {"Authorization": f"Bearer {daemon.token[:-1]}"}, {"Authorization": f"Bearer {daemon.token}x"}):
            status, body = call(daemon, "GET", path, headers=auth)
            assert status == 401 and body["error"]["desc"] == "missing or wrong bearer token", (path, auth)
    assert qmp(daemon, "stop", headers={"Authorization": ""})[0] == 401
    assert run_state(daemon) == "running"
    status, page = call(daemon, "GET", "/")
    assert status == 200 and daemon.token not in page


NOBODY_STOP = """
import json, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], data=json.dumps({"execute": "stop"}).encode(),
                                 headers={"Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


def test_unprivileged_local_user_is_refused(tmp_path):
    """Another user of the host (nobody) reaches 127.0.0.1 but cannot read the token file."""
    state = tempfile.mkdtemp(prefix="colo-state-")     # open to all: only the file's own mode guards the token
    os.chmod(state, 0o755)
    d = start_daemon(tmp_path, "--state-dir", state)
    try:
        d.token = open(os.path.join(state, "http-token")).read().strip()
        as_nobody = ["runuser", "-u", "nobody", "--"]
        with open(os.path.join(state, "public"), "w") as f:
            f.write("readable")
        os.chmod(os.path.join(state, "public"), 0o644)
        assert subprocess.run([*as_nobody, "cat", os.path.join(state, "public")], capture_output=True).returncode == 0
        result = subprocess.run([*as_nobody, "cat", os.path.join(state, "http-token")], capture_output=True, text=True)
        assert result.returncode != 0 and "Permission denied" in result.stderr
        result = subprocess.run([*as_nobody, "/usr/bin/python3", "-c", NOBODY_STOP, f"http://{d.http}/api/v1/qmp"],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "401", result.stderr
        assert run_state(d) == "running"
    finally:
        stop_daemon(d)
        shutil.rmtree(state)


@pytest.mark.kvm
def test_local_migration_uris_are_refused_over_http(tmp_path, guest_images):
    """With the token (leaked, or a confused script): migrate to exec:CMD runs CMD as root, file:
    and unix: write or unlink any path.  Refused over HTTP, for every command with a uri; tcp: goes."""
    marker = tmp_path / "pwned"
    d = start_daemon(tmp_path, *MEMDIRTY, name="source")
    try:
        for command in ("migrate", "migrate-recover"):
            for uri in (f"exec:touch {marker}", f"file:{marker}", f"unix:{marker}", "fd:mig", f"EXEC:touch {marker}"):
                status, body = qmp(d, command, {"uri": uri})
                assert status == 400, (command, uri, body)
                assert "is refused over HTTP" in body["error"]["desc"] and "http_allow_local_uris" in body["error"]["desc"]
        assert qmp(d, "migrate", {"uri": f"tcp:127.0.0.1:{free_port()}"}) == (200, {"return": {}})
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path, *MEMDIRTY, "--incoming", "defer", name="destination")
    try:
        status, body = qmp(d, "migrate-incoming", {"uri": f"exec:touch {marker}"})
        assert status == 400 and "is refused over HTTP" in body["error"]["desc"]
    finally:
        stop_daemon(d)
    assert not marker.exists()


@pytest.mark.kvm
def test_local_migration_uris_when_allowed(tmp_path, guest_images):
    stream = tmp_path / "stream"
    d = start_daemon(tmp_path, *MEMDIRTY, "--http-allow-local-uris", name="allowing")
    try:
        assert qmp(d, "migrate", {"uri": f"exec:cat > {stream}"}) == (200, {"return": {}})
        deadline = time.monotonic() + 30
        while qmp(d, "query-migrate")[1]["return"]["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert stream.stat().st_size > 0
    finally:
        stop_daemon(d)


def test_token_is_not_on_the_command_line(daemon):
    """Every local user can read /proc/PID/cmdline: the token is never there, and --http-token,
    which would put it there, is refused without echoing it."""
    with open(f"/proc/{daemon.proc.pid}/cmdline", "rb") as f:
        assert daemon.token.encode() not in f.read()
    result = serve_refused("--http-token", "on-the-command-line")
    assert result.returncode == 2 and "--http-token is no longer accepted" in result.stderr
    assert "on-the-command-line" not in result.stderr


def test_token_in_the_config_file_is_refused(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nhttp_token = "in-a-world-readable-file"\n')
    result = serve_refused("--config", str(config))
    assert result.returncode == 2 and "http_token is no longer read from the config file" in result.stderr
    assert "set http_token_file" in result.stderr


def test_generated_token_is_private_and_reused(tmp_path):
    state = tmp_path / "new" / "state"
    d = start_daemon(tmp_path, "--state-dir", str(state))
    token_file = state / "http-token"
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.stat().st_uid == os.geteuid()
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert f"HTTP API bearer token: {token_file} (generated)" in d.log() and token not in d.log()
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path, "--state-dir", str(state))
    try:
        d.token = token
        assert token_file.read_text().strip() == token
        assert run_state(d) == "running"
        assert f"HTTP API bearer token: {token_file}\"" in d.log()
    finally:
        stop_daemon(d)


def test_token_file_others_can_read_or_write_is_refused(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t" * 32)
    for mode in (0o640, 0o604, 0o620):
        token_file.chmod(mode)
        result = serve_refused("--http-token-file", str(token_file), "--state-dir", str(tmp_path))
        assert result.returncode == 2
        assert f"HTTP token file {token_file} has mode {mode:04o}: group and others must have no access" in result.stderr
    token_file.chmod(0o600)
    os.chown(token_file, 65534, 65534)                   # private, but nobody's: nobody could rewrite it
    result = serve_refused("--http-token-file", str(token_file), "--state-dir", str(tmp_path))
    assert result.returncode == 2 and f"HTTP token file {token_file} belongs to uid 65534" in result.stderr
    generated = tmp_path / "http-token"
    generated.write_text("t" * 32)
    generated.chmod(0o644)
    result = serve_refused("--state-dir", str(tmp_path))
    assert result.returncode == 2 and f"HTTP token file {generated} has mode 0644" in result.stderr


def test_planted_symlink_is_not_followed(tmp_path):
    """Whoever can write to the state directory plants http-token -> a file elsewhere: the node
    neither creates the file through the link nor reads a token from it."""
    target = tmp_path / "elsewhere"
    (tmp_path / "http-token").symlink_to(target)
    result = serve_refused("--state-dir", str(tmp_path))
    assert result.returncode == 2 and "cannot read the HTTP token file" in result.stderr
    assert not target.exists()
    target.write_text("t" * 32)
    target.chmod(0o600)
    result = serve_refused("--state-dir", str(tmp_path))
    assert result.returncode == 2 and "Too many levels of symbolic links" in result.stderr


def test_oversized_body_is_a_json_413(daemon):
    big = json.dumps({"execute": "stop", "arguments": {"pad": "x" * MAX_BODY}}).encode()
    status, body = call(daemon, "POST", "/api/v1/qmp", big, {**JSON, **daemon.auth})
    assert status == 413 and body["error"]["class"] == "GenericError"
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
    conn = http.client.HTTPConnection(daemon.http, timeout=10)
    conn.request("POST", "/api/v1/qmp", chunks, {**JSON, **daemon.auth}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["class"] == "GenericError"
    conn.close()
    assert run_state(daemon) == "running"


def test_unknown_path_and_wrong_method_are_json_errors(daemon):
    assert call(daemon, "GET", "/nope", headers=daemon.auth) == (
        404, {"error": {"class": "GenericError", "desc": "Not Found: GET /nope"}})
    for method, path in (("PUT", "/metrics"), ("GET", "/api/v1/qmp"), ("DELETE", "/api/v1/status")):
        status, body = call(daemon, method, path, headers=daemon.auth)
        assert status == 405 and body == {"error": {"class": "GenericError",
                                                    "desc": f"Method Not Allowed: {method} {path}"}}


class BrokenNode:
    name = "broken"
    vm = None

    def status(self):
        raise RuntimeError("a detail of the daemon's insides")


async def test_handler_bug_is_a_json_500_without_traceback():
    app = make_app(BrokenNode(), "t" * 32, {"node.test:80"})
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/api/v1/status", headers={"Host": "node.test:80", "Authorization": "Bearer " + "t" * 32})
        text = await r.text()
    assert r.status == 500 and r.headers["Content-Type"].startswith("application/json")
    assert json.loads(text) == {"error": {"class": "GenericError", "desc": "internal error (see the node's log)"}}
    assert "Traceback" not in text and "insides" not in text


@pytest.mark.slow
def test_slow_loris_is_cut_off(daemon):
    """A client that sends a request head (or body) and then nothing would hold its connection
    forever: cut after a few seconds, while other clients are served."""
    host, port = daemon.http.rsplit(":", 1)
    head = socket.create_connection((host, int(port)))
    head.sendall(f"GET /api/v1/status HTTP/1.1\r\nHost: {daemon.http}\r\n".encode())   # never the blank line
    body = socket.create_connection((host, int(port)))
    body.sendall(f"POST /api/v1/qmp HTTP/1.1\r\nHost: {daemon.http}\r\nAuthorization: Bearer {daemon.token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"execute\"".encode())
    start = time.monotonic()
    assert run_state(daemon) == "running"
    head.settimeout(IDLE_TIMEOUT + 5)
    try:
        assert head.recv(4096) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < IDLE_TIMEOUT + 2
    body.settimeout(BODY_TIMEOUT + LINGER_TIME + 5)
    reply = b""
    while chunk := body.recv(4096):
        reply += chunk
    assert time.monotonic() - start < BODY_TIMEOUT + LINGER_TIME + 2
    assert reply.startswith(b"HTTP/1.1 408 ") and b'"desc": "the request body did not arrive within' in reply
    head.close()
    body.close()
    assert run_state(daemon) == "running"


@pytest.mark.slow
def test_connection_flood_is_capped(daemon):
    """Thousands of idle connections would use up the daemon's descriptors, and QMP and migration
    with them: beyond MAX_CONNECTIONS a new one is closed at once; QMP answers throughout, and
    HTTP again once the idle ones time out."""
    host, port = daemon.http.rsplit(":", 1)
    extra = 20
    flood = [socket.create_connection((host, int(port))) for _ in range(MAX_CONNECTIONS + extra)]
    try:
        time.sleep(0.5)
        closed = 0
        for conn in flood:
            conn.setblocking(False)
            try:
                closed += conn.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == extra
        client = SyncQMPClient(daemon.qmp)
        assert client.execute("query-status")["return"]["status"] == "running"
        client.close()
        time.sleep(IDLE_TIMEOUT + 1)
        assert run_state(daemon) == "running"
    finally:
        for conn in flood:
            conn.close()


def test_every_address_bind_still_needs_the_token(tmp_path):
    port = free_port()
    d = start_daemon(tmp_path, "--http", f"0.0.0.0:{port}")
    try:
        d.http = f"127.0.0.1:{port}"
        assert call(d, "GET", "/api/v1/status")[0] == 401
        assert run_state(d) == "running"
        assert call(d, "GET", "/api/v1/status", headers={"Host": f"{socket.gethostname()}:{port}", **d.auth})[0] == 421
    finally:
        stop_daemon(d)
