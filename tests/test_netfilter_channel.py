"""The packet channel between a COLO pair: frames both ways, and what it refuses."""
import socket
import threading

import pytest

from netfilter.channel import FRAME_HEAD, HELLO, MAX_FRAME, ChannelError, PacketChannel


def connected_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result = {}
    thread = threading.Thread(target=lambda: result.update(server=PacketChannel.accept(listener, "127.0.0.1")))
    thread.start()
    client = PacketChannel.connect("127.0.0.1", port)
    thread.join(5)
    listener.close()
    return client, result["server"]


def test_frames_both_ways_with_their_epochs():
    client, server = connected_pair()
    client.send(7, b"\x01" * 1500)
    server.send(0, b"")
    for i in range(100):
        client.send(i, bytes([i]) * 60)
    assert server.recv() == (7, b"\x01" * 1500)
    assert client.recv() == (0, b"")
    assert [server.recv() for _ in range(100)] == [(i, bytes([i]) * 60) for i in range(100)]
    assert (client.frames_sent, server.frames_received) == (101, 101)
    client.close()
    with pytest.raises(ChannelError, match="closed"):
        server.recv()
    server.close()


def test_oversized_frame_and_garbage_hello_end_the_channel():
    client, server = connected_pair()
    client.sock.sendall(FRAME_HEAD.pack(1, MAX_FRAME + 1))
    with pytest.raises(ChannelError, match="a frame of 65537 bytes"):
        server.recv()
    client.close()
    server.close()
    listener = socket.create_server(("127.0.0.1", 0))
    garbage = socket.create_connection(listener.getsockname())
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ChannelError, match="not a colo-appliance packet channel"):
        PacketChannel.accept(listener, "127.0.0.1")
    garbage.close()
    listener.close()


def test_only_the_primary_may_connect():
    """A stranger that connects first is closed unread; the primary still gets in."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    result = {}
    thread = threading.Thread(target=lambda: result.update(server=PacketChannel.accept(listener, "127.0.0.2")))
    thread.start()
    stranger = socket.create_connection(("127.0.0.1", port))
    assert stranger.recv(16) == b""                       # closed without a hello
    primary = socket.socket()
    primary.bind(("127.0.0.2", 0))
    primary.connect(("127.0.0.1", port))
    channel = PacketChannel._greet(primary, 5)
    thread.join(5)
    result["server"].send(3, b"hi")
    assert channel.recv() == (3, b"hi")
    assert HELLO.size == 12
    channel.close()
    result["server"].close()
    stranger.close()
    listener.close()
