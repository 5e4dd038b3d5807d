"""End-to-end tests of the guest TCP/IP stack and kvstore, hosted on Linux.

The hosted build (appliance/guest/hosted) runs the same net/ and kvstore/
sources as the unikernel, on a tap device.  Each topology is two network
namespaces created here:

    guest ns:  tap0 (opened by kvstore-hosted) --- br0 --- vg
    client ns: vc (10.77.0.1/24), the veth peer of vg

The guest is 10.77.0.2.  Clients (redis-cli, redis-benchmark, Python
sockets) run in the client ns.  Everything is torn down by name and PID.
"""

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("pyroute2")
from pyroute2 import NetNS, netns  # noqa: E402

from appliance.netns import inside  # noqa: E402

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
HOSTED = ROOT / "appliance" / "guest" / "hosted"
BUILD = ROOT / "build" / "hosted"
BIN = BUILD / "kvstore-hosted-asan"
GUEST_IP = "10.77.0.2"
CLIENT_IP = "10.77.0.1"
GUEST_MAC = "52:54:00:12:34:56"


def _missing_prereqs():
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool in ("ip", "redis-cli", "redis-benchmark", "make", "gcc"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    return None


@pytest.fixture(autouse=True)
def prerequisites():
    """These are real tests: without what they need they fail, loudly, never skip."""
    missing = _missing_prereqs()
    if missing:
        pytest.fail(f"test_guest_tcpip: {missing}", pytrace=False)


@pytest.fixture(scope="module")
def binary():
    subprocess.run(["make", "-s", "-C", str(HOSTED), f"BUILD={BUILD}", "all", "freestanding"],
                   check=True, capture_output=True, timeout=120)
    return BIN


class Topology:
    """The two namespaces, the bridge and the tap; `close` removes them."""

    _seq = 0

    def __init__(self):
        Topology._seq += 1
        tag = f"{os.getpid()}x{Topology._seq}"
        self.gns, self.cns = f"kvg{tag}", f"kvc{tag}"
        self.created = []
        try:
            for ns in (self.gns, self.cns):
                netns.create(ns)
                self.created.append(ns)
            with NetNS(self.gns) as g:
                g.link("add", ifname="tap0", kind="tuntap", mode="tap")
                g.link("add", ifname="br0", kind="bridge")
                g.link("add", ifname="vg", kind="veth", peer={"ifname": "vc", "net_ns_fd": self.cns})
                br = g.link_lookup(ifname="br0")[0]
                for name in ("tap0", "vg"):
                    g.link("set", index=g.link_lookup(ifname=name)[0], master=br, state="up")
                g.link("set", index=br, state="up")
            with NetNS(self.cns) as c:
                vc = c.link_lookup(ifname="vc")[0]
                c.addr("add", index=vc, address=CLIENT_IP, prefixlen=24)
                c.link("set", index=vc, state="up")
                c.link("set", index=c.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.close()
            raise

    def close(self):
        # Deleting a namespace deletes the tap, bridge and veth pair in it.
        for ns in self.created:
            try:
                netns.remove(ns)
            except OSError:
                pass
        self.created = []

    def run(self, *argv, input=None, timeout=30):
        """Runs a command in the client namespace."""
        return subprocess.run(["ip", "netns", "exec", self.cns, *argv], input=input,
                              capture_output=True, timeout=timeout)

    def cli(self, *args, input=None):
        r = self.run("redis-cli", "-h", GUEST_IP, *args, input=input)
        return r.stdout

    def in_client(self):
        """Sockets created inside this block live in the client namespace."""
        return inside(self.cns)

    def connect(self, timeout=10):
        with self.in_client():
            return socket.create_connection((GUEST_IP, 6379), timeout=timeout)


class Guest:
    """kvstore-hosted in the guest namespace; stopped by PID."""

    def __init__(self, topo, binary, tmp_path, env=None, args=()):
        self.log_path = tmp_path / f"guest-{topo.gns}.log"
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ, HOSTED_MAC=GUEST_MAC, ASAN_OPTIONS="detect_leaks=0",
                        **(env or {}))
        # `ip netns exec` execs the program, so this PID is kvstore's own.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.gns, str(binary),
             f"ip={GUEST_IP}/24", f"gw={CLIENT_IP}", "tap=tap0", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 10
        while topo.cli("PING") != b"PONG\n":
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "guest did not answer PING"
            time.sleep(0.05)

    def output(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        text = self.output()
        assert "AddressSanitizer" not in text and "runtime error" not in text, text
        assert self.proc.returncode in (0, -signal.SIGTERM), text


@pytest.fixture(scope="module")
def topo():
    t = Topology()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def guest(topo, binary, tmp_path_factory):
    g = Guest(topo, binary, tmp_path_factory.mktemp("guest"))
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
def fresh_topo():
    t = Topology()
    try:
        yield t
    finally:
        t.close()


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def payload(n, seed):
    rnd = random.Random(seed)
    return bytes(rnd.randrange(33, 127) for _ in range(n))


def big_roundtrip(topo, key, size, seed):
    """SET then GET a large value through redis-cli; returns the GET output."""
    value = payload(size, seed)
    assert topo.cli("-x", "SET", key, input=value) == b"OK\n"
    got = topo.cli("GET", key)
    assert len(got) == size + 1 and got == value + b"\n"


# ---- basic protocol ----

def test_commands_roundtrip(topo, guest):
    cli = topo.cli
    assert cli("FLUSHALL") == b"OK\n"
    assert cli("PING") == b"PONG\n"
    assert cli("PING", "hello world") == b"hello world\n"
    assert cli("ECHO", "x y") == b"x y\n"
    assert cli("SET", "foo", "bar") == b"OK\n"
    assert cli("GET", "foo") == b"bar\n"
    assert cli("GET", "nokey") == b"\n"
    assert cli("INCR", "n") == b"1\n"
    assert cli("INCRBY", "n", "41") == b"42\n"
    assert cli("DECR", "n") == b"41\n"
    assert cli("DECRBY", "n", "50") == b"-9\n"
    assert cli("MSET", "a", "1", "b", "2") == b"OK\n"
    assert cli("MGET", "a", "b", "missing") == b"1\n2\n\n"
    assert cli("EXISTS", "a", "b", "missing", "a") == b"3\n"
    assert cli("DBSIZE") == b"4\n"
    assert cli("DEL", "a", "b", "missing") == b"2\n"
    assert cli("DBSIZE") == b"2\n"
    assert cli("SELECT", "0") == b"OK\n"
    assert cli("SET", "t", "v", "PX", "100000") == b"OK\n"
    assert cli("SET", "short", "v", "PX", "100") == b"OK\n"
    time.sleep(0.2)
    assert cli("GET", "short") == b"\n"
    assert cli("SET", "foo", "baz", "NX") == b"\n"
    assert cli("GET", "foo") == b"bar\n"
    info = cli("INFO").decode()
    assert info.startswith("# Server\r\nredis_version:")
    assert "# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=0\r\n" in info
    assert cli("COMMAND") == b"\n"  # an empty array prints nothing
    assert cli("FLUSHALL") == b"OK\n"
    assert cli("DBSIZE") == b"0\n"


def test_error_replies(topo, guest):
    # redis-cli prints an error reply's text followed by a blank line.
    def cli(*args):
        out = topo.cli(*args)
        assert out.endswith(b"\n\n") or out == b"OK\n", out
        return out.rstrip(b"\n") + b"\n"

    assert cli("foo", "bar", "baz") == \
        b"ERR unknown command 'foo', with args beginning with: 'bar' 'baz' \n"
    assert cli("nosuch") == b"ERR unknown command 'nosuch', with args beginning with: \n"
    assert cli("GET") == b"ERR wrong number of arguments for 'get' command\n"
    assert cli("get", "a", "b") == b"ERR wrong number of arguments for 'get' command\n"
    assert cli("MSET", "a", "1", "b") == b"ERR wrong number of arguments for 'mset' command\n"
    assert cli("SET", "s", "abc") == b"OK\n"
    assert cli("INCR", "s") == b"ERR value is not an integer or out of range\n"
    assert cli("INCRBY", "n", "1x") == b"ERR value is not an integer or out of range\n"
    assert cli("SET", "s", "x", "BOGUS") == b"ERR syntax error\n"
    assert cli("SET", "s", "x", "EX", "0") == b"ERR invalid expire time in 'set' command\n"
    assert cli("SELECT", "1") == b"ERR DB index is out of range\n"
    assert cli("SET", "big", "9223372036854775807") == b"OK\n"
    assert cli("INCR", "big") == b"ERR increment or decrement would overflow\n"


def test_inline_pipelining_and_partial_commands(topo, guest):
    s = topo.connect()
    try:
        s.sendall(b"PING\r\nECHO inline\r\n")
        assert read_exact(s, 7 + 12) == b"+PONG\r\n$6\r\ninline\r\n"
        # 200 commands in one send, answered in order.
        batch = b"".join(resp("SET", f"p{i}", f"v{i}") for i in range(100))
        batch += b"".join(resp("GET", f"p{i}") for i in range(100))
        s.sendall(batch)
        expect = b"+OK\r\n" * 100 + b"".join(
            b"$%d\r\nv%d\r\n" % (len(str(i)) + 1, i) for i in range(100))
        assert read_exact(s, len(expect)) == expect
        # One command split into single bytes arriving separately.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in resp("ECHO", "split"):
            s.send(bytes([b]))
            time.sleep(0.001)
        assert read_exact(s, 11) == b"$5\r\nsplit\r\n"
        # A protocol error is answered, then the server closes.
        s.sendall(b"*1\r\n$x\r\n")
        rest = b""
        while chunk := s.recv(100):
            rest += chunk
        assert rest == b"-ERR Protocol error: invalid bulk length\r\n"
    finally:
        s.close()


def test_quit_closes(topo, guest):
    s = topo.connect()
    try:
        s.sendall(resp("QUIT"))
        assert read_exact(s, 5) == b"+OK\r\n"
        assert s.recv(10) == b""
    finally:
        s.close()


# ---- transport ----

def test_ping_icmp(topo, guest):
    with topo.in_client():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.settimeout(2)
        for seq in range(3):
            body = struct.pack("!HH", 0x4242, seq) + b"colo-ping" * 5
            hdr = struct.pack("!BBH", 8, 0, 0) + body
            csum = _inet_csum(hdr)
            s.sendto(struct.pack("!BBH", 8, 0, csum) + body, (GUEST_IP, 0))
            while True:
                pkt, addr = s.recvfrom(2048)
                icmp = pkt[(pkt[0] & 0xf) * 4:]
                if addr[0] == GUEST_IP and icmp[0] == 0:
                    break
            assert icmp[4:] == body
            assert _inet_csum(icmp) == 0
    finally:
        s.close()


def _inet_csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


def test_udp_echo(topo, guest):
    with topo.in_client():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(2)
        s.sendto(b"hello over udp", (GUEST_IP, 7))
        data, addr = s.recvfrom(2048)
        assert data == b"hello over udp" and addr == (GUEST_IP, 7)
    finally:
        s.close()


def test_closed_port_gets_rst(topo, guest):
    with topo.in_client():
        s = socket.socket()
    s.settimeout(3)
    try:
        with pytest.raises(ConnectionRefusedError):
            s.connect((GUEST_IP, 6380))
    finally:
        s.close()


def test_one_mib_value(topo, guest):
    big_roundtrip(topo, "big", 1 << 20, seed=1)


def test_fifty_concurrent_clients(topo, guest):
    socks = [topo.connect() for _ in range(50)]
    try:
        for i, s in enumerate(socks):
            s.sendall(resp("SET", f"c{i}", f"value-{i}" * 50))
        for s in socks:
            assert read_exact(s, 5) == b"+OK\r\n"
        for i, s in enumerate(socks):
            s.sendall(resp("GET", f"c{i}"))
        for i, s in enumerate(socks):
            v = f"value-{i}".encode() * 50
            expect = b"$%d\r\n%s\r\n" % (len(v), v)
            assert read_exact(s, len(expect)) == expect
    finally:
        for s in socks:
            s.close()
    assert topo.cli("PING") == b"PONG\n"


def test_zero_window_then_reset(topo, guest):
    """A client that stops reading closes its window (the guest must probe
    and resume); a client that resets mid-reply must not hurt the guest."""
    value = payload(1 << 20, seed=4)
    with topo.in_client():
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((GUEST_IP, 6379))
    try:
        slow.settimeout(10)
        slow.sendall(resp("SET", "zw", value))
        assert read_exact(slow, 5) == b"+OK\r\n"
        slow.sendall(resp("GET", "zw") * 3)
        time.sleep(1.5)  # window closed: only persist probes flow now
        expect = (b"$%d\r\n%s\r\n" % (len(value), value)) * 3
        assert read_exact(slow, len(expect)) == expect

        rude = topo.connect()
        rude.sendall(resp("GET", "zw") * 5)
        time.sleep(0.05)
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # unread data: the kernel sends RST
        time.sleep(0.1)
        slow.sendall(resp("PING"))
        assert read_exact(slow, 7) == b"+PONG\r\n"
    finally:
        slow.close()


def test_redis_benchmark_pipelined(topo, guest):
    r = topo.run("redis-benchmark", "-h", GUEST_IP, "-q", "-n", "2000", "-P", "16",
                 "-t", "set,get", timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().replace("\r", "\n")
    rates = {}
    for line in out.splitlines():
        for cmd in ("SET", "GET"):
            if line.startswith(f"{cmd}: ") and "requests per second" in line:
                rates[cmd] = float(line.split()[1])
    assert rates.keys() == {"SET", "GET"} and min(rates.values()) > 0, out
    assert b"WARNING" not in r.stderr, r.stderr


def test_malformed_frames_do_not_crash(topo, guest):
    """Random and truncated Ethernet/IP/TCP frames, then the guest still serves."""
    with topo.in_client():
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        raw.bind(("vc", 0))
    rnd = random.Random(7)
    dst = bytes.fromhex(GUEST_MAC.replace(":", ""))
    src = raw.getsockname()[4]
    ip_src, ip_dst = socket.inet_aton(CLIENT_IP), socket.inet_aton(GUEST_IP)
    try:
        for i in range(2000):
            proto = rnd.choice([1, 6, 17, rnd.randrange(256)])
            ihl = rnd.choice([5, 5, 5, 0, 4, 15])
            tot = rnd.choice([20, 40, 60, rnd.randrange(65536)])
            iph = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, i, rnd.choice([0, 0x2000, 1]),
                              64, proto, 0, ip_src, ip_dst)
            csum = _inet_csum(iph)
            if rnd.random() < 0.8:
                iph = iph[:10] + struct.pack("!H", csum) + iph[12:]
            body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 80)))
            if proto == 6 and len(body) >= 13:
                body = body[:12] + bytes([rnd.choice([0x00, 0x50, 0xf0, 0x60])]) + body[13:]
            etype = rnd.choice([b"\x08\x00", b"\x08\x06", b"\x86\xdd"])
            frame = dst + src + etype + (iph + body)[: rnd.randrange(0, 20 + len(body) + 1)]
            raw.send(frame)
    finally:
        raw.close()
    assert topo.cli("PING") == b"PONG\n"
    assert guest.proc.poll() is None, guest.output()


class RawPeer:
    """A hand-made TCP/IP peer on a raw socket in the client namespace, using
    an address the client kernel does not own (so its TCP never interferes)."""

    IP = "10.77.0.9"
    MAC = bytes.fromhex("020000000009")

    def __init__(self, topo):
        with topo.in_client():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind(("vc", 0))
        self.ip = socket.inet_aton(self.IP)
        self.guest_ip = socket.inet_aton(GUEST_IP)
        self.guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        self.ip_id = 0

    def close(self):
        self.sock.close()

    def send_arp(self, op, target_ip, target_mac=b"\0" * 6, dst=b"\xff" * 6):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, self.MAC, self.ip,
                          target_mac, target_ip)
        self.sock.send(dst + self.MAC + b"\x08\x06" + arp)

    def send_ip(self, proto, body, frag=0x4000):
        self.ip_id += 1
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), self.ip_id, frag, 64, proto,
                          0, self.ip, self.guest_ip)
        hdr = hdr[:10] + struct.pack("!H", _inet_csum(hdr)) + hdr[12:]
        self.sock.send(self.guest_mac + self.MAC + b"\x08\x00" + hdr + body)

    def tcp(self, sport, dport, seq, ack, flags, data=b"", opts=b"", wnd=65535, bad_csum=False,
            frag=0x4000):
        off = (20 + len(opts)) // 4
        seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xffffffff, ack & 0xffffffff,
                          off << 4, flags, wnd, 0, 0) + opts + data
        pseudo = self.ip + self.guest_ip + struct.pack("!BBH", 0, 6, len(seg))
        csum = _inet_csum(pseudo + seg) ^ (0x5555 if bad_csum else 0)
        self.send_ip(6, seg[:16] + struct.pack("!H", csum) + seg[18:], frag)

    def recv(self, timeout=1.0, want=None):
        """Returns the guest's next TCP segment to us (dict) matching want,
        answering its ARP requests on the way; None on timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                f = self.sock.recv(65535)
            except socket.timeout:
                return None
            if f[6:12] != self.guest_mac:
                continue
            if f[12:14] == b"\x08\x06" and f[38:42] == self.ip and f[20:22] == b"\0\1":
                self.send_arp(2, self.guest_ip, self.guest_mac, self.guest_mac)
                continue
            if f[12:14] != b"\x08\x00" or f[23] != 6 or f[30:34] != self.ip:
                continue
            ip = f[14:]
            tcp = ip[(ip[0] & 0xf) * 4: struct.unpack("!H", ip[2:4])[0]]
            sport, dport, seq, ack, off, flags, wnd = struct.unpack("!HHIIBBH", tcp[:16])
            seg = dict(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, wnd=wnd,
                       opts=tcp[20:(off >> 4) * 4], data=tcp[(off >> 4) * 4:])
            if want is None or want(seg):
                return seg
        return None


def _options(raw):
    out, i = {}, 0
    while i < len(raw) and raw[i] != 0:
        if raw[i] == 1:
            i += 1
            continue
        out[raw[i]] = raw[i + 2: i + raw[i + 1]]
        i += raw[i + 1]
    return out


SYN, RST, PSH, ACK, FIN = 0x02, 0x04, 0x08, 0x10, 0x01


def test_tcp_edge_cases_with_raw_peer(topo, guest):
    peer = RawPeer(topo)
    try:
        # Our ARP request for the guest teaches it our MAC.
        peer.send_arp(1, peer.guest_ip)
        # Handshake: MSS and SACK-permitted come back in the SYN-ACK.
        sport, seq = 40001, 1000
        peer.tcp(sport, 6379, seq, 0, SYN, opts=b"\x02\x04\x02\x18\x01\x01\x04\x02")
        synack = peer.recv(want=lambda s: s["flags"] & SYN)
        assert synack and synack["flags"] == SYN | ACK and synack["ack"] == seq + 1
        opts = _options(synack["opts"])
        assert opts[2] == struct.pack("!H", 1460) and 4 in opts
        seq, gseq = seq + 1, synack["seq"] + 1
        peer.tcp(sport, 6379, seq, gseq, ACK)

        def reply(timeout=1.0):
            return peer.recv(timeout, want=lambda s: s["data"] and s["seq"] == gseq)

        # Out of order: the second half first gets a duplicate ACK with SACK.
        cmd = resp("SET", "raw", "value")
        a, b = cmd[:10], cmd[10:]
        peer.tcp(sport, 6379, seq + len(a), gseq, ACK | PSH, b)
        dup = peer.recv(want=lambda s: s["flags"] == ACK)
        assert dup["ack"] == seq
        assert _options(dup["opts"])[5] == struct.pack("!II", seq + len(a), seq + len(cmd))
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, a)
        r = reply()
        assert r["data"] == b"+OK\r\n" and r["ack"] == seq + len(cmd)
        seq, gseq = seq + len(cmd), gseq + len(r["data"])

        # A bad checksum and an IP fragment are dropped; the good copy works.
        ping = resp("PING")
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, ping, bad_csum=True)
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, ping, frag=0x2000)
        assert reply(0.3) is None
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, ping)
        r = reply()
        assert r["data"] == b"+PONG\r\n"
        seq, gseq = seq + len(ping), gseq + len(r["data"])

        # An in-window RST that is not exact draws a challenge ACK only.
        peer.tcp(sport, 6379, seq + 100, 0, RST)
        chal = peer.recv(want=lambda s: s["flags"] == ACK)
        assert chal and chal["ack"] == seq
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, ping)
        r = reply()
        assert r["data"] == b"+PONG\r\n"
        seq, gseq = seq + len(ping), gseq + len(r["data"])

        # The exact RST ends it: later data is answered with RST.
        peer.tcp(sport, 6379, seq, 0, RST)
        time.sleep(0.05)
        peer.tcp(sport, 6379, seq, gseq, ACK | PSH, ping)
        rst = peer.recv(want=lambda s: s["flags"] & RST)
        assert rst and rst["seq"] == gseq

        # SYN to a closed port: RST|ACK acknowledging the SYN.
        peer.tcp(40002, 6380, 5000, 0, SYN)
        rst = peer.recv(want=lambda s: s["sport"] == 6380)
        assert rst["flags"] == RST | ACK and rst["ack"] == 5001
    finally:
        peer.close()
    assert topo.cli("GET", "raw") == b"value\n"


def test_random_commands_under_asan(fresh_topo, binary, tmp_path):
    """Thousands of random commands (expiry, globs, SCAN, MULTI/WATCH, CLIENT,
    HELLO, bytes of noise) on interleaved connections: the ASan/UBSan build
    answers every one, in order, and stays clean."""
    rng = random.Random(10)
    commands = [b"SET", b"GET", b"DEL", b"EXPIRE", b"PEXPIRE", b"TTL", b"PTTL", b"PERSIST", b"KEYS", b"SCAN",
                b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH", b"APPEND", b"STRLEN", b"GETSET", b"INCR",
                b"MSET", b"CLIENT", b"HELLO", b"INFO", b"CONFIG", b"FLUSHALL", b"TYPE", b"EXISTS", b"DBSIZE"]
    words = [b"k", b"k1", b"*", b"?", b"[", b"]", b"[^a]", b"\\", b"-1", b"0", b"1", b"100",
             b"9223372036854775807", b"NX", b"XX", b"GT", b"LT", b"EX", b"PX", b"MATCH", b"COUNT", b"TYPE",
             b"string", b"SETNAME", b"GETNAME", b"AUTH", b"default", b"2", b"3", b"memory", b"GET",
             b"maxmemory*", b"", b"a b", b"x" * 300]

    def word():
        if rng.random() < 0.2:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
        return rng.choice(words)

    g = Guest(fresh_topo, binary, tmp_path)
    try:
        for _ in range(10):
            socks = [fresh_topo.connect() for _ in range(3)]
            for _ in range(300):
                rng.choice(socks).sendall(resp(rng.choice(commands), *(word() for _ in range(rng.randrange(5)))))
            for s in socks:
                # Leave any transaction, then a marker that only comes back once all was answered.
                s.sendall(resp("DISCARD") + resp("PING", "end"))
                reply = b""
                while not reply.endswith(b"$3\r\nend\r\n"):
                    chunk = s.recv(65536)
                    assert chunk, reply[-200:]
                    reply += chunk
                s.close()
        assert fresh_topo.cli("PING") == b"PONG\n"
    finally:
        g.stop()


def test_maxmemory_from_the_command_line(fresh_topo, binary, tmp_path):
    """maxmemory=3mb: CONFIG GET and INFO show it, and writes past it get -OOM
    while reads, DEL and the connection carry on (here under ASan)."""
    g = Guest(fresh_topo, binary, tmp_path, args=["maxmemory=3mb"])
    try:
        assert fresh_topo.cli("CONFIG", "GET", "maxmemory") == b"maxmemory\n3145728\n"
        assert b"maxmemory:3145728\r\n" in fresh_topo.cli("INFO", "memory")
        s = fresh_topo.connect()
        try:
            value = b"v" * 262144
            for i in range(12):
                s.sendall(resp("SET", f"big{i}", value))
                reply = read_exact(s, 5)
                if reply != b"+OK\r\n":
                    break
            oom = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
            assert reply + read_exact(s, len(oom) - 5) == oom and i >= 8
            s.sendall(resp("STRLEN", "big0") + resp("DEL", "big0", "big1", "big2") + resp("SET", "small", "ok"))
            assert read_exact(s, 18) == b":262144\r\n:3\r\n+OK\r\n"
        finally:
            s.close()
    finally:
        g.stop()
    # A value it cannot read stops the guest at boot, saying why.
    empty = tmp_path / "empty.rec"
    empty.write_bytes(b"HREC0002" + struct.pack("=Q", 0))
    bad = subprocess.run([str(binary), f"ip={GUEST_IP}/24", "maxmemory=3xb"],
                         env=dict(os.environ, HOSTED_REPLAY=str(empty), ASAN_OPTIONS="detect_leaks=0"),
                         capture_output=True, timeout=30)
    assert bad.returncode == 1 and b"kvstore: bad maxmemory=3xb" in bad.stdout + bad.stderr


# ---- loss, reordering, determinism ----

def _netem_available(topo):
    r = topo.run("tc", "qdisc", "add", "dev", "vc", "root", "netem",
                 "loss", "5%", "delay", "1ms", "reorder", "10%")
    return r.returncode == 0


def test_loss_and_reordering(fresh_topo, binary, tmp_path):
    """Without sch_netem, the hosted runtime drops every 7th frame each way
    and swaps every 5th received frame with its successor."""
    env = None if _netem_available(fresh_topo) else {"HOSTED_DROP_EVERY": "7",
                                                      "HOSTED_REORDER_EVERY": "5"}
    g = Guest(fresh_topo, binary, tmp_path, env=env)
    try:
        big_roundtrip(fresh_topo, "lossy", 1 << 20, seed=2)
        s = fresh_topo.connect()
        try:
            batch = b"".join(resp("SET", f"k{i}", "x" * i) for i in range(300))
            batch += b"".join(resp("GET", f"k{i}") for i in range(300))
            s.sendall(batch)
            expect = b"+OK\r\n" * 300 + b"".join(
                b"$%d\r\n%s\r\n" % (i, b"x" * i) for i in range(300))
            assert read_exact(s, len(expect)) == expect
        finally:
            s.close()
    finally:
        g.stop()


def _frames(path):
    return _frames_of(path.read_bytes())


def _frames_of(data):
    assert data[:8] == b"HREC0002"
    pos, frames = 16, []
    while pos < len(data):
        ts, n = struct.unpack_from("=QI", data, pos)
        frames.append((ts, data[pos + 12: pos + 12 + n]))
        pos += 12 + n
    return frames


def _tcp_payloads(frames):
    out = b""
    for _, f in frames:
        if len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 6:
            ip = f[14:]
            ihl = (ip[0] & 0xf) * 4
            tot = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:tot]
            out += tcp[(tcp[12] >> 4) * 4:]
    return out


def _replay(binary, rec_in, out):
    r = subprocess.run([str(binary), f"ip={GUEST_IP}/24", f"gw={CLIENT_IP}"],
                       env=dict(os.environ, HOSTED_MAC=GUEST_MAC, HOSTED_REPLAY=str(rec_in),
                                HOSTED_RECORD_OUT=str(out), ASAN_OPTIONS="detect_leaks=0"),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"AddressSanitizer" not in r.stderr and b"runtime error" not in r.stderr, r.stderr
    return out.read_bytes()


def _shift_after(rec_in, rec_out, index, delta_ns):
    """Copies a recording, moving every record from the index-th on by delta_ns:
    the guest sees its clock jump, as after a VM pause or migration."""
    data = rec_in.read_bytes()
    out, pos, i = bytearray(data[:16]), 16, 0
    while pos < len(data):
        ts, n = struct.unpack_from("=QI", data, pos)
        out += struct.pack("=QI", ts + (delta_ns if i >= index else 0), n)
        out += data[pos + 12: pos + 12 + n]
        pos, i = pos + 12 + n, i + 1
    rec_out.write_bytes(bytes(out))
    return i


def _rebatch(rec_in, rec_out):
    """Copies a recording, giving each frame its own wake-up at the same time."""
    data = rec_in.read_bytes()
    out, pos, prev_frame = bytearray(data[:16]), 16, False
    while pos < len(data):
        ts, n = struct.unpack_from("=QI", data, pos)
        if n and prev_frame:
            out += struct.pack("=QI", ts, 0)
        out += data[pos: pos + 12 + n]
        prev_frame = n > 0
        pos += 12 + n
    rec_out.write_bytes(bytes(out))


def test_replay_is_deterministic(fresh_topo, binary, tmp_path):
    """Record a live session's input (frames and wake-up times), replay it
    twice with the fake clock: the output frames are byte-identical to each
    other, to what the live guest sent, and to a replay that delivers every
    frame in its own loop iteration."""
    rec_in, live_out = tmp_path / "in.rec", tmp_path / "live.out"
    g = Guest(fresh_topo, binary, tmp_path,
              env={"HOSTED_RECORD_IN": str(rec_in), "HOSTED_RECORD_OUT": str(live_out)})
    try:
        cli = fresh_topo.cli
        assert cli("SET", "k", "v") == b"OK\n"
        assert cli("GET", "k") == b"v\n"
        assert cli("INCR", "ctr") == b"1\n"
        assert cli("INCR", "ctr") == b"2\n"
        # Clock-dependent commands: TTLs, expiry (lazy and the periodic sweep), a transaction.
        assert cli("SET", "ttl", "v", "PX", "100000") == b"OK\n"
        assert cli("PEXPIRE", "gone", "1") == b"0\n"
        assert cli("SET", "short", "v", "PX", "150") == b"OK\n"
        assert 0 < int(cli("PTTL", "ttl")) <= 100000
        assert fresh_topo.cli(input=b"MULTI\nINCR ctr\nKEYS ct*\nEXEC\n") == b"OK\nQUEUED\nQUEUED\n3\nctr\n"
        time.sleep(0.4)  # "short" expires; the sweep's wake-ups are part of the recording
        assert cli("GET", "short") == b"\n"
        big_roundtrip(fresh_topo, "blob", 200_000, seed=3)
        time.sleep(0.3)  # let the last ACKs and FINs settle
    finally:
        g.stop()

    outs = [_replay(binary, rec_in, tmp_path / f"replay{i}.out") for i in range(2)]
    assert outs[0] == outs[1]
    live = _frames(live_out)
    replayed = _frames(tmp_path / "replay0.out")
    assert len(replayed) > 20
    assert replayed == live
    payload_bytes = _tcp_payloads(replayed)
    for reply in (b"+PONG\r\n", b"+OK\r\n", b"$1\r\nv\r\n", b":1\r\n", b":2\r\n", b"+QUEUED\r\n",
                  b"*2\r\n:3\r\n*1\r\n$3\r\nctr\r\n"):
        assert reply in payload_bytes

    # The same frames at the same times, but every frame read in its own
    # loop iteration (as a COLO secondary's NIC might deliver them): the
    # output does not depend on the batching.
    single = tmp_path / "single.rec"
    _rebatch(rec_in, single)
    assert _frames_of(_replay(binary, single, tmp_path / "single.out")) == replayed

    # The same input with the clock jumping 30 s half way: timers fire once
    # (spurious retransmissions are fine), nothing crashes, replies still flow.
    jumped = tmp_path / "jumped.rec"
    count = _shift_after(rec_in, jumped, 0, 0)
    _shift_after(rec_in, jumped, count // 2, 30 * 10**9)
    payload_bytes = _tcp_payloads(_frames_of(_replay(binary, jumped, tmp_path / "jumped.out")))
    assert b"+OK\r\n" in payload_bytes and b":2\r\n" in payload_bytes
