"""kvstore, our unikernel Redis, on a node daemon and across a save/restore in a new process."""
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

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


@contextmanager
def kvstore_node(topo, tmp_path, memory_mib=64):
    """kvstore on a node daemon in node a's namespace, listening; stopped by PID on exit."""
    node = topo.nodes["a"]
    qmp = str(tmp_path / "a.qmp")
    log_path = tmp_path / "a.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(topo.in_namespace(node.namespace, [
            sys.executable, "-m", "appliance.cli", "serve", "--name", "a", "--qmp", qmp, "--no-http",
            "--guest", "kvstore", "-m", str(memory_mib), "--append", cmdline(topo),
            "--nic", "tap=tap0,bridge=br0", "--state-dir", str(tmp_path)]),
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            console = tmp_path / "a-console.log"
            deadline = time.monotonic() + 20
            while not (console.exists() and "listening" in console.read_text()):
                assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            yield daemon
        finally:
            daemon.terminate()
            daemon.wait(15)
    assert daemon.returncode == 0, log_path.read_text()


def test_redis_cli_against_kvstore_on_a_node_daemon(topo, guest_images, tmp_path):
    with kvstore_node(topo, tmp_path):
        assert redis_cli(topo, "PING") == "PONG\n"
        assert redis_cli(topo, "SET", "greeting", "hello world") == "OK\n"
        assert redis_cli(topo, "GET", "greeting") == "hello world\n"
        assert redis_cli(topo, "INCR", "counter") == "1\n"
        assert redis_cli(topo, "INCRBY", "counter", "41") == "42\n"
        assert redis_cli(topo, "DEL", "greeting", "nothing") == "1\n"
        assert redis_cli(topo, "EXISTS", "greeting") == "0\n"
        assert redis_cli(topo, "DBSIZE") == "1\n"
        assert "ERR unknown command 'NOPE'" in redis_cli(topo, "NOPE")


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


# ---- the command set, as Redis clients use it ----

@pytest.fixture(scope="module")
def shared(guest_images, tmp_path_factory):
    """One kvstore node for the command tests (each test uses its own keys)."""
    with Topology(f"kvs{os.getpid() % 100000}", ["a"]) as t:
        with kvstore_node(t, tmp_path_factory.mktemp("kvstore")):
            yield t


def redis_client(topo, **kwargs):
    """A redis-py client connected from the client namespace.  RESP2: kvstore
    refuses HELLO 3, which redis-py 8 sends unless told protocol=2."""
    import redis
    client = redis.Redis(host=topo.guest_address, socket_timeout=10, protocol=2, **kwargs)
    with topo.client_sockets():
        client.ping()   # connects now, inside the namespace; the pool reuses it
    return client


def test_expiry_keys_scan_and_strings_with_redis_cli(shared):
    cli = lambda *a: redis_cli(shared, *a)  # noqa: E731
    assert cli("SET", "cli:session", "x", "EX", "100") == "OK\n"
    assert cli("TTL", "cli:session") == "100\n"
    assert 99000 < int(cli("PTTL", "cli:session")) <= 100000
    assert cli("EXPIRE", "cli:session", "50", "GT") == "0\n"
    assert cli("EXPIRE", "cli:session", "500", "GT") == "1\n"
    assert cli("TTL", "cli:session") == "500\n"
    assert cli("PERSIST", "cli:session") == "1\n"
    assert cli("TTL", "cli:session") == "-1\n"
    assert cli("TTL", "cli:absent") == "-2\n"
    assert cli("PEXPIRE", "cli:session", "150") == "1\n"
    time.sleep(0.3)
    assert cli("GET", "cli:session") == "\n"            # expired: invisible
    assert cli("EXISTS", "cli:session") == "0\n"
    assert cli("EXPIRE", "cli:absent", "10") == "0\n"

    assert cli("MSET", "cli:user:1", "a", "cli:user:2", "b", "cli:usr:3", "c", "cli:h[x]", "d") == "OK\n"
    assert sorted(cli("KEYS", "cli:user:*").split()) == ["cli:user:1", "cli:user:2"]
    assert sorted(cli("KEYS", "cli:u?er:[1-2]").split()) == ["cli:user:1", "cli:user:2"]
    assert cli("KEYS", r"cli:h\[*") == "cli:h[x]\n"
    assert sorted(cli("KEYS", "cli:*[^0-9]]").split()) == ["cli:h[x]"]
    # redis-cli --scan follows the cursor to the end.
    assert sorted(cli("--scan", "--pattern", "cli:us*").split()) == ["cli:user:1", "cli:user:2", "cli:usr:3"]
    assert cli("SCAN", "nonsense") == "ERR invalid cursor\n\n"

    assert cli("APPEND", "cli:user:1", "bc") == "3\n"
    assert cli("STRLEN", "cli:user:1") == "3\n"
    assert cli("STRLEN", "cli:absent") == "0\n"
    assert cli("GETSET", "cli:user:1", "new") == "abc\n"
    assert cli("GET", "cli:user:1") == "new\n"
    assert cli("TYPE", "cli:user:1") == "string\n"
    assert "maxmemory_policy:noeviction" in cli("INFO", "memory")


def test_transactions_with_redis_cli(shared):
    """redis-cli reading commands from stdin sends them on one connection."""
    def session(text):
        result = shared.run_client(["redis-cli", "-h", shared.guest_address], input=text,
                                   capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("\n")

    assert session("MULTI\nSET tx:a 1\nINCR tx:a\nGET tx:a\nEXEC\n")[:6] == [
        "OK", "QUEUED", "QUEUED", "QUEUED", "OK", "2"]
    # A runtime error is one element of EXEC's reply; the rest still ran.
    assert session("MULTI\nSET tx:s abc\nINCR tx:s\nSET tx:t done\nEXEC\nGET tx:t\n")[:9] == [
        "OK", "QUEUED", "QUEUED", "QUEUED", "OK", "ERR value is not an integer or out of range", "", "OK", "done"]
    # A command refused while queueing aborts the whole transaction.
    assert session("MULTI\nSET tx:u 1\nNOPE\nEXEC\nEXISTS tx:u\n")[:7] == [
        "OK", "QUEUED", "ERR unknown command 'NOPE', with args beginning with: ", "",
        "EXECABORT Transaction discarded because of previous errors.", "", "0"]
    assert session("MULTI\nSET tx:v 1\nDISCARD\nEXISTS tx:v\nEXEC\n")[:5] == [
        "OK", "QUEUED", "OK", "0", "ERR EXEC without MULTI"]
    assert session("MULTI\nMULTI\nEXEC\n")[:4] == ["OK", "ERR MULTI calls can not be nested", "", ""]


def test_redis_py_client(shared):
    import redis
    r = redis_client(shared)
    with shared.client_sockets():
        assert r.set("py:k", "v", px=200) and 0 < r.pttl("py:k") <= 200 and r.ttl("py:k") == 0
        assert r.expire("py:k", 30) and r.ttl("py:k") == 30
        assert r.pexpire("py:k", 100)
        time.sleep(0.25)
        assert r.get("py:k") is None and r.ttl("py:k") == -2

        r.mset({f"py:scan:{i}": i for i in range(300)} | {"py:other": 1})
        assert set(r.scan_iter(match="py:scan:*", count=50)) == {f"py:scan:{i}".encode() for i in range(300)}
        assert len(r.keys("py:scan:1?")) == 10
        cursor, page = r.scan(0, match="py:*", count=1000)
        assert cursor != 0 or len(page) == 301

        assert r.append("py:s", "ab") == 2 and r.append("py:s", "cd") == 4 and r.strlen("py:s") == 4
        assert r.getset("py:s", "z") == b"abcd" and r.get("py:s") == b"z"

        # MULTI/EXEC: queued, then executed together.
        pipe = r.pipeline(transaction=True)
        pipe.set("py:tx", 10).incrby("py:tx", 5).get("py:tx").expire("py:tx", 60).ttl("py:tx")
        assert pipe.execute() == [True, 15, b"15", True, 60]

        # WATCH: another client's write in between makes EXEC answer nil.
        other = redis_client(shared)
        with r.pipeline() as pipe:
            pipe.watch("py:tx")
            other.set("py:tx", "changed")
            pipe.multi()
            pipe.set("py:tx", "mine")
            with pytest.raises(redis.WatchError):
                pipe.execute()
        assert r.get("py:tx") == b"changed"
        with r.pipeline() as pipe:
            pipe.watch("py:tx")
            pipe.multi()
            pipe.set("py:tx", "mine")
            assert pipe.execute() == [True]

        assert r.client_setname("py-worker") and r.client_getname() == "py-worker"
        assert r.client_id() != other.client_id()
        with pytest.raises(redis.ResponseError, match="cannot contain spaces"):
            r.client_setname("two words")
        hello = r.execute_command("HELLO", "2")
        assert dict(zip(hello[::2], hello[1::2]))[b"proto"] == 2
        memory = r.info("memory")
        assert 0 < memory["used_memory"] <= memory["total_system_memory"] <= 64 << 20
        assert 0 < memory["maxmemory"] < memory["total_system_memory"]
        assert memory["maxmemory_policy"] == "noeviction"
        assert r.config_get("maxmemory") == {"maxmemory": str(memory["maxmemory"])}


def test_scan_spanning_a_table_growth_returns_every_key(shared):
    """SCAN's guarantee: keys present for the whole scan are all returned,
    although the hash table doubles (at least twice) half way through."""
    r = redis_client(shared)
    with shared.client_sockets():
        r.mset({f"grow:old:{i}": i for i in range(900)})
        seen, cursor, calls = set(), 0, 0
        while True:
            cursor, keys = r.scan(cursor, match="grow:*", count=50)
            seen.update(keys)
            calls += 1
            if calls == 3:
                assert cursor != 0
                r.mset({f"grow:new:{i}": i for i in range(4000)})
            if cursor == 0:
                break
        assert {f"grow:old:{i}".encode() for i in range(900)} <= seen


def test_redis_py_over_resp3_is_refused(shared):
    """redis-py 8's default handshake is HELLO 3: a RESP2 server answers NOPROTO."""
    import redis
    r = redis.Redis(host=shared.guest_address, socket_timeout=10, protocol=3)
    with shared.client_sockets(), pytest.raises(redis.ResponseError, match="NOPROTO unsupported protocol version"):
        r.ping()
    conn = _connect(shared)
    with conn:
        assert ask(conn, resp(b"HELLO", b"3"), b"\r\n") == b"-NOPROTO unsupported protocol version\r\n"
        assert ask(conn, resp(b"PING"), b"\r\n") == b"+PONG\r\n"   # still RESP2, still connected


def _connect(topo):
    with topo.client_sockets():
        return socket.create_connection((topo.guest_address, 6379), timeout=10)


class RespReader:
    """Reads whole RESP2 replies: status/error/integer lines as bytes, bulks, arrays (nil array as "nil")."""

    def __init__(self, conn):
        self.conn, self.buf = conn, b""

    def _fill(self):
        chunk = self.conn.recv(65536)
        assert chunk, f"connection closed with {self.buf!r} unread"
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self._line()
        if line[:1] in (b"+", b"-", b":"):
            return line
        if line[:1] == b"$":
            n = int(line[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        assert line[:1] == b"*", line
        n = int(line[1:])
        return "nil" if n < 0 else [self.reply() for _ in range(n)]


# Sessions, each on its own connection after FLUSHALL and MSET a 0 w1 x, replayed
# against kvstore and a real redis-server: the replies must be the same.
SAME_AS_REDIS = [
    [("MULTI",), ("SET", "k", "v"), ("INCR", "k"), ("GET", "k"), ("EXEC",)],
    [("MULTI",), ("MULTI",), ("SET", "a", "1"), ("EXEC",)],
    [("MULTI",), ("SET", "a"), ("SET", "a", "2"), ("EXEC",), ("GET", "a")],
    [("MULTI",), ("NOPE", "x"), ("EXEC",)],
    [("MULTI",), ("SET", "a", "3"), ("DISCARD",), ("GET", "a"), ("DISCARD",), ("EXEC",)],
    [("MULTI",), ("WATCH", "a"), ("EXEC",)],
    [("WATCH", "a"), ("SET", "a", "4"), ("MULTI",), ("GET", "a"), ("EXEC",), ("UNWATCH",)],
    [("WATCH", "w1", "w2"), ("MULTI",), ("PING",), ("EXEC",), ("EXEC",)],
    [("WATCH", "a"), ("FLUSHALL",), ("MULTI",), ("PING",), ("EXEC",)],
    [("WATCH", "a"), ("PEXPIRE", "a", "1"), ("MULTI",), ("PING",), ("EXEC",)],
    [("MULTI",), ("EXEC",)],
    [("MULTI",), ("INCR", "n"), ("SET", "n", "x"), ("INCR", "n"), ("GET", "n"), ("EXEC",)],
    [("SET", "e", "v"), ("PEXPIRE", "e", "-1"), ("EXISTS", "e"), ("EXPIRE", "nokey", "10"),
     ("EXPIRE", "e", "abc"), ("SET", "f", "v"), ("EXPIRE", "f", "9223372036854775807"),
     ("PEXPIRE", "f", "9223372036854775807"), ("EXPIRE", "f", "10", "gt", "lt"), ("EXPIRE", "f", "10", "nx", "xx"),
     ("EXPIRE", "f", "10", "xx"), ("EXPIRE", "f", "10", "lt"), ("TTL", "f"), ("EXPIRE", "f", "5", "gt"),
     ("EXPIRE", "f", "10", "bogus"), ("TTL", "f"), ("PERSIST", "f"), ("PERSIST", "f"), ("EXPIRE", "f"),
     ("TTL", "f", "x"), ("SET", "g", "v", "EX", "100"), ("SET", "g", "w", "KEEPTTL"), ("TTL", "g"),
     ("SET", "g", "w"), ("TTL", "g")],
    [("APPEND", "s", "abc"), ("APPEND", "s", ""), ("STRLEN", "s"), ("STRLEN", "none"), ("GETSET", "s", "n"),
     ("GETSET", "s"), ("SET", "tt", "v", "EX", "100"), ("GETSET", "tt", "w"), ("TTL", "tt"), ("APPEND", "tt", "x"),
     ("TYPE", "tt"), ("TYPE", "none"), ("INCR", "s"), ("APPEND", "n1", "5"), ("INCR", "n1")],
    [("CLIENT", "SETNAME", ""), ("CLIENT", "GETNAME"), ("CLIENT", "SETNAME", "a b"), ("CLIENT", "SETNAME"),
     ("CLIENT", "GETNAME", "x"), ("CLIENT", "SETNAME", "ok-name"), ("CLIENT", "GETNAME"), ("CLIENT", "NOPE"),
     ("CLIENT",)],
    [("HELLO", "1"), ("HELLO", "4"), ("HELLO", "x"), ("HELLO", "2", "SETNAME"), ("HELLO", "2", "AUTH", "default"),
     ("HELLO", "2", "SETNAME", "a b"), ("HELLO", "2", "AUTH", "bob", "pw"), ("HELLO", "2", "BOGUS"), ("PING",)],
    [("MSET", "k1", "a", "k2", "b", "x1", "c", "[k]", "d"), ("KEYS", "k[0-9]"), ("KEYS", "[^k]*"), ("KEYS", "*1"),
     ("KEYS", "nomatch*"), ("KEYS", "\\k1"), ("KEYS", "\\[k]"), ("KEYS", "[a-c-x]1"), ("KEYS", "[x"),
     ("KEYS", "[z-a]?"), ("KEYS", "*[1-2]*"), ("KEYS", "**k*1"), ("KEYS", "[\\]]*"), ("KEYS", "[^]k]*"),
     ("KEYS", "?"), ("KEYS", "[K]1"), ("KEYS", "[]"),
     ("SCAN", "0", "MATCH"), ("SCAN", "0", "COUNT", "x"), ("SCAN", "0", "COUNT", "0"), ("SCAN", "abc"),
     ("SCAN", "0", "FOO", "bar")],
    [("WATCH", "gone"), ("SET", "gone", "1"), ("UNWATCH",), ("MULTI",), ("EXEC",)],
]


@pytest.fixture
def real_redis(tmp_path):
    """Debian's redis-server on loopback, without persistence; stopped by PID."""
    from conftest import free_port
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True,
                             text=True).stdout != "PONG\n":
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _replies(connect):
    sessions = []
    for commands in SAME_AS_REDIS:
        with connect() as conn:
            reader = RespReader(conn)
            for setup in (resp(b"FLUSHALL"), resp(b"MSET", b"a", b"0", b"w1", b"x")):
                conn.sendall(setup)
                reader.reply()
            replies = []
            for command in commands:
                conn.sendall(resp(*(word.encode() for word in command)))
                reply = reader.reply()
                # KEYS lists in hash-table order, which differs between servers.
                replies.append(sorted(reply) if command[0] == "KEYS" else reply)
            sessions.append(replies)
    return sessions


def test_replies_match_a_real_redis_server(shared, real_redis):
    theirs = _replies(lambda: socket.create_connection(("127.0.0.1", real_redis), timeout=10))
    ours = _replies(lambda: _connect(shared))
    for commands, expected, got in zip(SAME_AS_REDIS, theirs, ours):
        for command, want, have in zip(commands, expected, got):
            assert have == want, f"{command}: redis-server answered {want!r}, kvstore {have!r}"


def test_out_of_memory_write_answers_oom_and_keeps_the_connection(topo, guest_images, tmp_path):
    """Fill a 16 MiB guest: writes get -OOM, the same connection goes on
    reading and deleting, and keys given a TTL are reclaimed without access."""
    import redis
    value = b"v" * 65536
    with kvstore_node(topo, tmp_path, memory_mib=16):
        r = redis_client(topo)
        with topo.client_sockets():
            client_id = r.client_id()
            before = r.info("memory")
            maxmemory = before["maxmemory"]
            assert 0 < maxmemory < before["total_system_memory"] <= 16 << 20

            stored, error = 0, None
            while error is None:
                pipe = r.pipeline(transaction=False)
                for i in range(stored, stored + 16):
                    pipe.set(f"fill:{i}", value)
                for result in pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        error = error or result
                    elif error is None:
                        stored += 1
                assert stored * len(value) < 2 * maxmemory, "writes never refused"
            assert isinstance(error, redis.exceptions.OutOfMemoryError)
            assert str(error) == "command not allowed when used memory > 'maxmemory'."
            # The guest really holds the data, and INFO says so within 20 %.
            full = r.info("memory")
            assert stored * len(value) >= 0.8 * maxmemory
            assert full["used_memory"] > maxmemory
            assert stored * len(value) <= full["used_memory"] <= 1.2 * stored * len(value) + before["used_memory"]
            assert full["used_memory_peak"] >= full["used_memory"]

            # The same connection answers reads and refuses every kind of growth.
            assert r.client_id() == client_id and r.ping()
            assert r.get("fill:0") == value and r.strlen(f"fill:{stored - 1}") == len(value)
            for write in (lambda: r.append("fill:0", "x"), lambda: r.incr("counter"),
                          lambda: r.getset("fill:0", "y"), lambda: r.mset({"a": 1})):
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    write()
        conn = _connect(topo)
        with conn:
            reader = RespReader(conn)
            conn.sendall(resp(b"SET", b"k", b"v") + resp(b"MULTI") + resp(b"SET", b"k", b"v") + resp(b"EXEC"))
            assert [reader.reply() for _ in range(4)] == [
                b"-OOM command not allowed when used memory > 'maxmemory'.", b"+OK",
                b"-OOM command not allowed when used memory > 'maxmemory'.",
                b"-EXECABORT Transaction discarded because of previous errors."]
        assert redis_cli(topo, "SET", "k", "v") == "OOM command not allowed when used memory > 'maxmemory'.\n\n"

        with topo.client_sockets():
            # EXPIRE does not grow memory: allowed.  The sweep then frees the
            # keys without anyone reading them.
            pipe = r.pipeline(transaction=False)
            for i in range(stored):
                pipe.pexpire(f"fill:{i}", 200)
            assert all(pipe.execute())
            deadline = time.monotonic() + 10
            while r.info("memory")["used_memory"] > full["used_memory"] - 0.95 * stored * len(value):
                assert time.monotonic() < deadline, r.info("memory")
                time.sleep(0.1)
            assert r.set("after", "reclaimed") and r.get("after") == b"reclaimed"
            assert r.dbsize() == 1 and r.client_id() == client_id
