"""kvstore, our unikernel Redis, on a node daemon and across a save/restore in a new process."""
import os
import socket
import subprocess
import sys
import time

import pytest

from appliance.netns import Topology
from conftest import REPO

pytestmark = [pytest.mark.kvm, pytest.mark.netns]


@pytest.fixture
def topo():
    t = Topology(f"kvt{os.getpid() % 100000}", ["a"])
    yield t
    t.close()


def cmdline(topo):
    return f"ip={topo.guest_address}/24 gw={topo.client_address}"


def redis_cli(topo, *args):
    result = topo.run_client(["redis-cli", "-h", topo.guest_address, *args], capture_output=True, text=True,
                             timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def ask(conn, request: bytes, reply_end: bytes) -> bytes:
    conn.sendall(request)
    reply = b""
    while not reply.endswith(reply_end):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {reply!r}"
        reply += chunk
    return reply


def test_redis_cli_against_kvstore_on_a_node_daemon(topo, guest_images, tmp_path):
    node = topo.nodes["a"]
    qmp = str(tmp_path / "a.qmp")
    log = open(tmp_path / "a.log", "w")
    daemon = subprocess.Popen(topo.in_namespace(node.namespace, [
        sys.executable, "-m", "appliance.cli", "serve", "--name", "a", "--qmp", qmp, "--no-http",
        "--guest", "kvstore", "-m", "64", "--append", cmdline(topo), "--nic", "tap=tap0,bridge=br0",
        "--state-dir", str(tmp_path)]), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        console = tmp_path / "a-console.log"
        deadline = time.monotonic() + 20
        while not (console.exists() and "listening" in console.read_text()):
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        assert redis_cli(topo, "PING") == "PONG\n"
        assert redis_cli(topo, "SET", "greeting", "hello world") == "OK\n"
        assert redis_cli(topo, "GET", "greeting") == "hello world\n"
        assert redis_cli(topo, "INCR", "counter") == "1\n"
        assert redis_cli(topo, "INCRBY", "counter", "41") == "42\n"
        assert redis_cli(topo, "DEL", "greeting", "nothing") == "1\n"
        assert redis_cli(topo, "EXISTS", "greeting") == "0\n"
        assert redis_cli(topo, "DBSIZE") == "1\n"
        assert "ERR unknown command 'NOPE'" in redis_cli(topo, "NOPE")
    finally:
        daemon.terminate()
        daemon.wait(15)
        log.close()
    assert daemon.returncode == 0


def test_data_and_open_connection_survive_restore_in_a_new_process(topo, guest_images, tmp_path):
    node = topo.nodes["a"]
    image = os.path.join(guest_images, "kvstore.elf")
    state = str(tmp_path / "kvstore.state")

    def child(mode):
        return subprocess.Popen(
            topo.in_namespace(node.namespace, [sys.executable, os.path.join(REPO, "tests", "kvstore_child.py"),
                                               mode, image, state, cmdline(topo)]),
            cwd=os.path.join(REPO, "tests"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    first = child("boot")
    second = None
    try:
        assert first.stdout.readline().strip() == "listening"
        with topo.client_sockets():
            conn = socket.create_connection((topo.guest_address, 6379), timeout=10)
        with conn:
            assert ask(conn, resp(b"SET", b"k", b"before restore"), b"\r\n") == b"+OK\r\n"
            assert ask(conn, resp(b"INCR", b"n"), b"\r\n") == b":1\r\n"

            first.stdin.write("save\n")
            first.stdin.flush()
            assert first.stdout.readline().strip() == "saved"
            assert first.stdout.readline().strip() == "closed"
            assert first.wait(15) == 0

            second = child("restore")
            assert second.stdout.readline().strip() == "resumed"
            # The same TCP connection, now served by the restored guest in another process.
            assert ask(conn, resp(b"GET", b"k"), b"restore\r\n") == b"$14\r\nbefore restore\r\n"
            assert ask(conn, resp(b"INCR", b"n"), b"\r\n") == b":2\r\n"
        assert redis_cli(topo, "GET", "k") == "before restore\n"
        second.stdin.write("quit\n")
        second.stdin.flush()
        assert second.stdout.readline().strip() == "closed"
        assert second.wait(15) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
