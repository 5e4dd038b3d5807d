"""The packet channel between a COLO pair: frames both ways, one connection per direction
(with TLS, one SSL object per thread), and what it refuses, on either connection."""
import os
import shutil
import socket
import ssl
import threading
import time

import pytest

from appliance.certs import make_certs
from netfilter.channel import (FRAME_HEAD, HELLO, MAGIC, MAX_FRAME, TO_PRIMARY, TO_SECONDARY, ChannelError,
                               PacketChannel, hear_hello, say_hello)
from replication.tls import Authz, ClientTls, ServerTls, TlsError, X509Creds

NODE_A = "CN=node-a,O=colo-appliance"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca: the nodes' CA and node-a's client certificate; intruder: same CA, a DN not allowed;
    forged: trusts the nodes' CA but shows a client certificate of another CA that says node-a."""
    root = tmp_path_factory.mktemp("pki")
    make_certs(str(root / "ca"), ["127.0.0.1"], "/O=colo-appliance/CN=node-a")
    make_certs(str(root / "intruder"), ["127.0.0.1"], "/O=colo-appliance/CN=intruder", ca_dir=str(root / "ca"))
    make_certs(str(root / "other"), ["127.0.0.1"], "/O=colo-appliance/CN=node-a")
    shutil.copytree(root / "other", root / "forged")
    shutil.copyfile(root / "ca" / "ca-cert.pem", root / "forged" / "ca-cert.pem")
    return {name: str(root / name) for name in ("ca", "intruder", "forged")}


def server_tls(pki):
    return ServerTls(X509Creds("tls0", pki["ca"], "server"), Authz("auth0", [NODE_A]))


def client_tls(directory):
    return ClientTls(X509Creds("tls0", directory, "client"), "127.0.0.1")


def accepting(listener, peer_address, tls=None, timeout=5.0):
    """The secondary's accept on a thread; its result (or error) lands in the returned dict."""
    result = {}

    def accept():
        try:
            result["channel"] = PacketChannel.accept(listener, peer_address, timeout=timeout, tls=tls)
        except ChannelError as e:
            result["error"] = e
    thread = threading.Thread(target=accept)
    thread.start()
    return thread, result


def connected_pair(tls_pki=None):
    listener = socket.create_server(("127.0.0.1", 0))
    thread, result = accepting(listener, "127.0.0.1", server_tls(tls_pki) if tls_pki else None)
    client = PacketChannel.connect("127.0.0.1", listener.getsockname()[1],
                                   tls=client_tls(tls_pki["ca"]) if tls_pki else None)
    thread.join(5)
    listener.close()
    return client, result["channel"]


def dial_from(port, direction, tls=None, source="127.0.0.1"):
    """One connection of the primary's, made by hand (from ``source``)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if tls is not None:
        sock = tls.wrap(sock, 5)
    say_hello(sock, direction, time.monotonic() + 5)
    hear_hello(sock, direction, time.monotonic() + 5)
    return sock


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_frames_both_ways_with_their_epochs(tls, pki):
    client, server = connected_pair(pki if tls else None)
    assert client.outbound is not client.inbound
    if tls:
        assert all(isinstance(sock, ssl.SSLSocket) for sock in (client.outbound, client.inbound,
                                                                server.outbound, server.inbound))
    client.send(7, b"\x01" * 1500)
    server.send(0, b"")
    for i in range(100):
        client.send(i, bytes([i]) * 60)
    assert server.recv() == (7, b"\x01" * 1500)
    assert client.recv() == (0, b"")
    assert [server.recv() for _ in range(100)] == [(i, bytes([i]) * 60) for i in range(100)]
    assert (client.frames_sent, server.frames_received) == (101, 101)
    assert (server.frames_sent, client.frames_received) == (1, 1)
    client.close()
    with pytest.raises(ChannelError, match="closed"):
        server.recv()
    server.close()


def test_full_duplex_over_tls_each_ssl_object_on_one_thread(pki):
    """Both ends send and receive at once, as the filters do: every frame arrives, in order."""
    client, server = connected_pair(pki)
    count = 3000
    frames = [(i, i.to_bytes(4, "big") * (1 + i % 300)) for i in range(count)]
    received = {}

    def send(channel):
        for start in range(0, count, 30):
            channel.send_many(frames[start:start + 30])

    def receive(name, channel):
        received[name] = [channel.recv() for _ in range(count)]
    threads = [threading.Thread(target=send, args=(client,)), threading.Thread(target=send, args=(server,)),
               threading.Thread(target=receive, args=("server", server)),
               threading.Thread(target=receive, args=("client", client))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert received["server"] == frames and received["client"] == frames
    assert (client.frames_sent, client.frames_received, server.frames_sent, server.frames_received) == (count,) * 4
    client.close()
    server.close()


def test_losing_either_connection_ends_the_channel():
    for broken in ("outbound", "inbound"):
        client, server = connected_pair()
        getattr(client, broken).shutdown(socket.SHUT_RDWR)
        with pytest.raises(ChannelError):
            if broken == "outbound":          # the secondary reads what the primary sends
                server.recv()
            else:                             # the secondary's writes meet a closed connection
                for _ in range(100):
                    server.send(0, b"x" * 1400)
                    time.sleep(0.001)
        client.close()
        server.close()


def test_stop_never_waits_on_a_frozen_peer(pki):
    """A reader and a writer blocked on a peer that never reads nor writes wake on close."""
    client, server = connected_pair(pki)
    errors = []

    def blocked(operation):
        try:
            operation()
        except ChannelError as e:
            errors.append(e)
    writer = threading.Thread(target=blocked, args=(lambda: [client.send(0, b"x" * 60000) for _ in range(1000)],))
    reader = threading.Thread(target=blocked, args=(client.recv,))
    writer.start()
    reader.start()
    time.sleep(0.3)                        # the peer's buffers are full: the writer waits
    started = time.monotonic()
    client.close()
    writer.join(5)
    reader.join(5)
    assert time.monotonic() - started < 1.0 and len(errors) == 2
    server.close()


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_native_fds_are_the_sockets_own_in_clear():
    client, server = connected_pair()
    assert client.native_fds() == (client.outbound.fileno(), client.inbound.fileno())
    assert not client.encrypted and "(TLS)" not in client.endpoints
    client.close()
    server.close()


@pytest.fixture
def tls_pair(pki):
    """A TLS channel pair, closed after the test whatever happened; no relay thread outlives it."""
    client, server = connected_pair(pki)
    yield client, server
    client.close()
    server.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("tls-relay")]


def datapath_end(fd, timeout=5.0):
    """The datapath's view of one of native_fds() (its own descriptor, as the C path has)."""
    sock = socket.socket(fileno=os.dup(fd))
    sock.settimeout(timeout)
    return sock


def test_tls_relay_carries_the_datapaths_clear_bytes_as_tls(tls_pair):
    """What the C datapath writes in clear on native_fds() reaches the peer's SSL object (so
    it went on the wire as TLS), in bursts and in order, and the peer's frames come out in
    clear the other way."""
    client, server = tls_pair
    assert client.encrypted and client.endpoints.endswith("(TLS)")
    out_fd, in_fd = client.native_fds()
    assert client.native_fds() == (out_fd, in_fd)         # one relay per channel
    assert {out_fd, in_fd}.isdisjoint({client.outbound.fileno(), client.inbound.fileno()})
    frames = [(i, i.to_bytes(4, "big") * (1 + i % 300)) for i in range(2000)]
    wire = b"".join(FRAME_HEAD.pack(epoch, len(frame)) + frame for epoch, frame in frames)
    with datapath_end(out_fd) as out_sock, datapath_end(in_fd) as in_sock:
        sender = threading.Thread(target=out_sock.sendall, args=(wire,))
        sender.start()
        assert [server.recv() for _ in frames] == frames
        sender.join(5)
        server.send_many(frames[:500])
        expected = b"".join(FRAME_HEAD.pack(epoch, len(frame)) + frame for epoch, frame in frames[:500])
        assert read_exactly(in_sock, len(expected)) == expected


def test_tls_relay_a_broken_connection_is_a_closed_socket_for_the_datapath(tls_pair):
    client, server = tls_pair
    out_fd, in_fd = client.native_fds()
    with datapath_end(out_fd) as out_sock, datapath_end(in_fd) as in_sock:
        server.close()                      # the peer goes: the datapath reads the end
        assert in_sock.recv(100) == b""
        with pytest.raises((BrokenPipeError, ConnectionResetError)):   # and its writes fail soon after
            for _ in range(1000):
                out_sock.send(b"x" * 60000)
                time.sleep(0.001)


def test_tls_relay_closes_without_waiting_on_a_frozen_peer(tls_pair):
    """The relay's writer blocked in SSL on a peer that reads nothing (every buffer on the way
    full, and still full a while later), its reader on a peer that sends nothing: close()
    ends both at once."""
    client, _ = tls_pair
    out_fd, _ = client.native_fds()
    with datapath_end(out_fd) as out_sock:
        out_sock.setblocking(False)
        stuck_since = None
        while stuck_since is None or time.monotonic() - stuck_since < 0.3:
            try:
                out_sock.send(b"x" * 65536)
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                time.sleep(0.02)
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < 1.0


def test_shutting_a_tls_channel_keeps_its_ssl_objects(tls_pair):
    """SSLSocket.shutdown() would drop the SSL object before shutting the socket, so a thread
    sending in between would write clear text: the channel shuts the sockets themselves."""
    client, _ = tls_pair
    client.native_fds()
    client.shutdown()
    for sock in (client.outbound, client.inbound):
        assert sock._sslobj is not None
        with pytest.raises(OSError):
            sock.sendall(b"never in clear")


def test_filters_that_cannot_be_made_close_the_channel_and_its_relay(tls_pair, monkeypatch):
    import netfilter.secondary as secondary

    def fails(*args, **kwargs):
        raise MemoryError("no memory for the datapath")
    monkeypatch.setattr(secondary.native, "ColoSecondary", fails)
    monkeypatch.setattr(secondary.native, "IMPLEMENTATION", "native")
    client, _ = tls_pair
    with pytest.raises(MemoryError):
        secondary.make_secondary_filters(None, client, lambda why: None)
    assert client.outbound.fileno() == client.inbound.fileno() == -1
    assert not [t for t in threading.enumerate() if t.name.startswith("tls-relay")]


def test_oversized_frame_and_garbage_hello_end_the_channel():
    client, server = connected_pair()
    client.outbound.sendall(FRAME_HEAD.pack(1, MAX_FRAME + 1))
    with pytest.raises(ChannelError, match="a frame of 65537 bytes"):
        server.recv()
    client.close()
    server.close()
    for garbage_hello in (b"GET / HTTP/1.1\r\n\r\n", MAGIC + (1).to_bytes(4, "big") + b"\0" * 4):  # v1 too
        listener = socket.create_server(("127.0.0.1", 0))
        garbage = socket.create_connection(listener.getsockname())
        garbage.sendall(garbage_hello)
        with pytest.raises(ChannelError, match="not a colo-appliance packet channel v2"):
            PacketChannel.accept(listener, "127.0.0.1")
        assert garbage.recv(16) == b""                       # no hello said back
        garbage.close()
        listener.close()


def test_a_hello_for_the_wrong_direction_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    thread, result = accepting(listener, "127.0.0.1")
    with pytest.raises(ChannelError):
        dial_from(listener.getsockname()[1], TO_PRIMARY)          # the secondary expects TO_SECONDARY first
    thread.join(5)
    assert "expected 1 (primary to secondary)" in str(result["error"])
    listener.close()


def test_only_the_primary_may_connect_on_either_connection():
    """A stranger that connects first, or between the two connections, is closed unread;
    the primary still gets in."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    thread, result = accepting(listener, "127.0.0.2")
    strangers = []
    for direction in (TO_SECONDARY, TO_PRIMARY):
        strangers.append(socket.create_connection(("127.0.0.1", port)))
        assert strangers[-1].recv(16) == b""                 # closed without a hello
        if direction == TO_SECONDARY:
            outbound = dial_from(port, TO_SECONDARY, source="127.0.0.2")
        else:
            inbound = dial_from(port, TO_PRIMARY, source="127.0.0.2")
    thread.join(5)
    channel = PacketChannel(outbound, inbound)
    result["channel"].send(3, b"hi")
    channel.send(4, b"ho")
    assert channel.recv() == (3, b"hi") and result["channel"].recv() == (4, b"ho")
    assert HELLO.size == 16
    channel.close()
    result["channel"].close()
    for stranger in strangers:
        stranger.close()
    listener.close()


def test_a_wrong_certificate_on_the_second_connection_is_refused(pki):
    """The primary's first connection is in; an intruder's certificate (a DN not allowed, or one
    of another CA) on the second is refused before a hello, and the primary still gets in."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    thread, result = accepting(listener, "127.0.0.1", server_tls(pki))
    outbound = dial_from(port, TO_SECONDARY, client_tls(pki["ca"]))
    for intruder in ("intruder", "forged"):
        with pytest.raises((ChannelError, TlsError)):
            dial_from(port, TO_PRIMARY, client_tls(pki[intruder]))
    assert "channel" not in result and "error" not in result
    channel = PacketChannel(outbound, dial_from(port, TO_PRIMARY, client_tls(pki["ca"])))
    thread.join(5)
    result["channel"].send(5, b"from the svm")
    assert channel.recv() == (5, b"from the svm")
    channel.close()
    result["channel"].close()
    listener.close()


def test_no_second_connection_is_an_error_not_a_hang():
    listener = socket.create_server(("127.0.0.1", 0))
    thread, result = accepting(listener, "127.0.0.1", timeout=0.5)
    first = dial_from(listener.getsockname()[1], TO_SECONDARY)
    thread.join(5)
    assert "no connection secondary to primary" in str(result["error"])
    assert first.recv(16) == b""                             # the first connection was closed
    first.close()
    listener.close()
