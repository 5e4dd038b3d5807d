"""Resource attacks on a node (issue 9, bounded resources), each written as the attack: a trickled
record, a non-reading QMP client with huge ids, a flood of QMP clients, QMP TCP off loopback, fifos
without a peer, symlinks and existing files for file:, an exec: child of a killed daemon, and
numbers JSON or QMP cannot hold.  Each shows the attack fails and the node keeps serving."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import psutil
import pytest
from qemu.qmp import ExecuteError, QMPClient

from appliance.config import ConfigError, NodeConfig
from conftest import MEMDIRTY_GUEST, REPO, free_port, start_daemon, stop_daemon
from replication.transport import Channel, TransportError, connect
from test_qmp_robustness import connect as qmp_connect, still_serving



# -- read_exact ------------------------------------------------------------------------------

def test_trickled_record_reads_in_linear_time():
    """A 16 MiB record sent in 4 KiB pieces: each piece used to cost a fresh 16 MiB buffer
    (64 GiB of zeroing in all); now it is read in well under a second into one record-sized buffer."""
    record = os.urandom(16 << 20)
    reader_sock, writer_sock = socket.socketpair()
    reader_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def trickle():
        for at in range(0, len(record), 4096):
            writer_sock.sendall(record[at:at + 4096])

    channel = Channel(sock=reader_sock, description="trickle")
    pieces = 0
    recv_into = reader_sock.recv_into

    class TricklingSocket:         # what a trickling peer gives: at most 4 KiB per receive
        def recv_into(self, view):
            nonlocal pieces
            pieces += 1
            return recv_into(view[:4096])

    channel.sock = TricklingSocket()
    writer = threading.Thread(target=trickle)
    tracemalloc.start()
    start = time.perf_counter()
    writer.start()
    data = channel.read_exact(len(record))
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    writer.join()
    reader_sock.close()
    writer_sock.close()
    assert data == record
    assert pieces == 4096, pieces          # it really was trickled
    assert elapsed < 1.0, elapsed
    assert peak < 2.5 * len(record), peak  # the record, and its copy as bytes


def test_small_records_still_come_from_the_read_ahead():
    a, b = socket.socketpair()
    b.sendall(b"".join(bytes([i]) * 5 for i in range(100)))
    channel = Channel(sock=a, description="batch")
    assert [channel.read_exact(5) for _ in range(100)] == [bytes([i]) * 5 for i in range(100)]
    a.close()
    b.close()


# -- QMP budgets -----------------------------------------------------------------------------

def test_non_reading_client_with_huge_ids_is_dropped(daemon):
    """Requests with 1 MiB ids, replies never read: the client goes once its unread replies pass
    the byte budget; the daemon does not grow by hundreds of MiB and keeps serving."""
    rss_before = psutil.Process(daemon.proc.pid).memory_info().rss
    s, _ = qmp_connect(daemon.qmp)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b'{"execute": "query-status", "id": "' + b"x" * (1 << 20) + b'"}\n'
    sent = 0
    s.settimeout(20)
    try:
        for _ in range(300):          # 300 MiB of replies if all were kept
            s.sendall(request)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 300, "the daemon kept reading a client that reads nothing"
    rss_after = psutil.Process(daemon.proc.pid).memory_info().rss
    assert rss_after - rss_before < 100 << 20, (rss_before, rss_after)
    assert "is not reading its replies" in daemon.log()
    s.close()
    assert still_serving(daemon)


def test_clients_beyond_the_cap_are_refused_clearly(tmp_path):
    d = start_daemon(tmp_path, "--qmp-max-clients", "3")
    held = []
    try:
        held = [qmp_connect(d.qmp) for _ in range(3)]
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(d.qmp)
        reply = json.loads(extra.makefile("rb").readline())
        assert reply == {"error": {"class": "GenericError", "desc": "too many QMP clients: 3 are connected, the "
                                   "most this node accepts (qmp_max_clients); try again later"}}
        assert extra.recv(1) == b""         # and closed
        extra.close()
        for s, f in held:                   # the three keep working
            s.sendall(b'{"execute": "query-status", "id": 7}\n')
            assert json.loads(f.readline())["id"] == 7
        for end in held.pop():          # (the socket's file keeps it open otherwise)
            end.close()
        deadline = time.monotonic() + 5     # a freed place is taken again
        while True:
            try:
                assert still_serving(d)
                break
            except (AssertionError, json.JSONDecodeError, KeyError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s, f in held:
            f.close()
            s.close()
        stop_daemon(d)
    assert d.proc.returncode == 0, d.log()


def test_qmp_tcp_off_loopback_is_refused_at_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--no-http", "--state-dir", str(tmp_path),
                           "--qmp-tcp", f"0.0.0.0:{free_port()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "qmp_tcp: 0.0.0.0:" in proc.stderr
    assert "is not a loopback address; QMP over TCP has no authentication or TLS" in proc.stderr
    assert "Traceback" not in proc.stderr
    for address in ("[::]:4444", "10.1.2.3:4444", ":4444x"):
        with pytest.raises(ConfigError):
            NodeConfig(qmp_tcp=address, http=None).validate()
    for address in ("127.0.0.1:4444", "[::1]:4444", "localhost:4444", ":4444"):     # ":PORT" is 127.0.0.1
        NodeConfig(qmp_tcp=address, http=None).validate()


# -- numbers JSON cannot hold -----------------------------------------------------------------

HUGE_INT = "9" * 5000


NUMBER_ATTACKS = [
    ('{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": %s}, "id": 1}' % HUGE_INT,
     "JSON parse error, integer 999999999999999999999999... is out of the 64-bit range"),
    ('{"execute": "query-status", "id": %s}' % HUGE_INT,
     "JSON parse error, integer 999999999999999999999999... is out of the 64-bit range"),
    ('{"execute": "migrate_set_downtime", "arguments": {"value": 1e999}, "id": 1}',
     "JSON parse error, number 1e999 is out of the range of a double"),
    ('{"execute": "query-status", "id": 1e999}', "JSON parse error, number 1e999 is out of the range of a double"),
    ('{"execute": "query-status", "id": -1e999}', "JSON parse error, number -1e999 is out of the range of a double"),
    ('{"execute": "query-status", "id": 18446744073709551616}',
     "JSON parse error, integer 18446744073709551616 is out of the 64-bit range"),
    ('{"execute": "query-status", "id": NaN}', "JSON parse error, invalid keyword 'NaN'"),
    ('{"execute": "query-status", "id": Infinity}', "JSON parse error, invalid keyword 'Infinity'"),
]


def test_numbers_beyond_64_bits_or_not_finite_get_an_error(daemon):
    """Each used to make its reply vanish (5000 digits) or be echoed as Infinity (not JSON)."""
    s, f = qmp_connect(daemon.qmp)
    for request_text, desc in NUMBER_ATTACKS:
        s.sendall(request_text.encode() + b'\n{"execute": "query-status", "id": "next"}\n')
        assert json.loads(f.readline()) == {"error": {"class": "GenericError", "desc": desc}}, request_text[:60]
        assert json.loads(f.readline())["id"] == "next"
    s.close()
    assert still_serving(daemon)


def test_64_bit_edges_are_still_taken(daemon):
    s, f = qmp_connect(daemon.qmp)
    for value in ("18446744073709551615", "-9223372036854775808", "1.7976931348623157e308"):
        s.sendall(b'{"execute": "query-status", "id": %s}\n' % value.encode())
        assert json.loads(f.readline())["id"] == json.loads(value)
    s.close()


# -- file: and exec: --------------------------------------------------------------------------

async def qmp_client(daemon):
    qmp = QMPClient(daemon.qmp)
    await qmp.connect(daemon.qmp)
    return qmp


async def wait_status(qmp, wanted, timeout=60):
    deadline = time.monotonic() + timeout
    while (info := await qmp.execute("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)
    assert info["status"] == wanted, info
    return info


async def answers_at_once(qmp) -> float:
    start = time.monotonic()
    await asyncio.wait_for(qmp.execute("query-status"), 2)
    return time.monotonic() - start


async def test_fifos_without_a_peer_never_block_the_event_loop(pair, tmp_path):
    """The source writes into a fifo nobody reads yet, the destination waits on a fifo nobody
    writes yet: both keep answering QMP (each used to freeze in open()); then joined by `cat`
    the migration completes and the guest arrives intact (the stream's RAM digest)."""
    out_fifo, in_fifo = tmp_path / "out.fifo", tmp_path / "in.fifo"
    os.mkfifo(out_fifo)
    os.mkfifo(in_fifo)
    src, dst = pair(name="src"), pair("--incoming", "defer", name="dst")
    a, b = await qmp_client(src), await qmp_client(dst)
    cat = None
    try:
        await b.execute("migrate-incoming", {"uri": f"file:{in_fifo}"})
        assert await answers_at_once(b) < 1.0
        await a.execute("migrate", {"uri": f"file:{out_fifo}"})
        assert await answers_at_once(a) < 1.0
        assert (await a.execute("query-status"))["status"] == "running"
        assert (await b.execute("query-migrate"))["status"] == "setup"
        cat = subprocess.Popen(f"cat < {out_fifo} > {in_fifo}", shell=True)
        await wait_status(a, "completed")
        await wait_status(b, "completed")
        assert (await b.execute("query-status"))["status"] == "running"
    finally:
        await a.disconnect()
        await b.disconnect()
        if cat is not None:
            cat.wait(10)


async def test_a_destination_waiting_on_a_fifo_stops_on_sigterm(pair, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    dst = pair("--incoming", f"file:{fifo}", name="dst")
    b = await qmp_client(dst)
    assert await answers_at_once(b) < 1.0
    await b.disconnect()
    dst.proc.send_signal(signal.SIGTERM)
    assert dst.proc.wait(10) == 0, dst.log()


async def test_file_never_follows_a_symlink_nor_replaces_a_file(pair, tmp_path):
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    link = tmp_path / "link.mig"
    link.symlink_to(precious)
    src = pair(name="src")
    a = await qmp_client(src)
    try:
        with pytest.raises(ExecuteError) as refused:
            await a.execute("migrate", {"uri": f"file:{link}"})
        assert str(refused.value) == f"file:{link} is a symbolic link; migration files are never written through links"
        with pytest.raises(ExecuteError) as refused:
            await a.execute("migrate", {"uri": f"file:{precious}"})
        assert str(refused.value) == (f"file:{precious} exists; remove it, or allow overwriting with "
                                      "migrate_file_overwrite = true in the node config (--migrate-file-overwrite)")
        assert precious.read_bytes() == b"keep me"
        assert (await a.execute("query-status"))["status"] == "running"
        assert await a.execute("query-migrate") == {}
    finally:
        await a.disconnect()
    dst = pair("--incoming", "defer", name="dst")
    b = await qmp_client(dst)
    try:
        with pytest.raises(ExecuteError) as refused:
            await b.execute("migrate-incoming", {"uri": f"file:{link}"})
        assert "the path is a symbolic link; migration files are never opened through links" in str(refused.value)
        assert (await b.execute("query-status"))["status"] == "inmigrate"
    finally:
        await b.disconnect()


async def test_overwriting_a_file_when_the_node_allows_it(pair, tmp_path):
    path = tmp_path / "guest.mig"
    path.write_bytes(b"an older save" * 1000)
    src = pair("--migrate-file-overwrite", name="src")
    a = await qmp_client(src)
    try:
        await a.execute("migrate", {"uri": f"file:{path}"})
        await wait_status(a, "completed")
    finally:
        await a.disconnect()
    assert path.read_bytes().startswith(b"COLOMIG\0")
    link = tmp_path / "link.mig"
    link.symlink_to(path)
    b = await qmp_client(src)
    try:
        with pytest.raises(ExecuteError, match="symbolic link"):       # links: not even then
            await b.execute("migrate", {"uri": f"file:{link}"})
    finally:
        await b.disconnect()


def test_exec_child_dies_with_a_killed_daemon(tmp_path, guest_images):
    """SIGKILL the daemon in the middle of an exec: migration: its command is killed too, not orphaned."""
    pid_file = tmp_path / "child.pid"
    d = start_daemon(tmp_path, *MEMDIRTY_GUEST, name="src")
    try:
        s, f = qmp_connect(d.qmp)
        # The command never reads: the migration stays in progress, its pipe full.
        command = f"echo $$ > {pid_file}; exec sleep 600"
        s.sendall(json.dumps({"execute": "migrate", "arguments": {"uri": f"exec:{command}"}, "id": 1}).encode())
        assert json.loads(f.readline()) == {"return": {}, "id": 1}
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = psutil.Process(int(pid_file.read_text()))
        assert child.ppid() == d.proc.pid and os.getpgid(child.pid) == child.pid   # a group of its own
        s.sendall(b'{"execute": "query-migrate", "id": 2}\n')
        assert json.loads(f.readline())["return"]["status"] in ("setup", "active")   # in progress
        s.close()
        d.proc.kill()
        d.proc.wait(10)
        child.wait(5)                  # raises psutil.TimeoutExpired if it survived
        assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
    finally:
        stop_daemon(d)


def test_a_stalled_exec_command_is_given_up_with_its_group():
    channel = connect("exec:sleep 600 | sleep 600", {})
    channel.stall_timeout = 0.5
    group = os.getpgid(channel.proc.pid)
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"exec:sleep 600 \| sleep 600: no progress for 0.5 s"):
        channel.send(b"x" * (4 << 20))
    assert time.monotonic() - start < 5
    channel.close()
    deadline = time.monotonic() + 5
    while [p for p in psutil.process_iter() if _pgid(p.pid) == group]:
        assert time.monotonic() < deadline, "the exec: group outlived its stall"
        time.sleep(0.05)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
