"""Malformed and hostile input never crashes or wedges the daemon."""
import asyncio
import json
import os
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.control.jsonstream import JSONStreamer, ParseError


def connect(path, negotiate=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    if negotiate:
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(f.readline()) == {"return": {}}
    return s, f


def still_serving(daemon):
    s, f = connect(daemon.qmp)
    s.sendall(b'{"execute": "query-status", "id": "alive"}\n')
    reply = json.loads(f.readline())
    s.close()
    assert daemon.alive(), daemon.log()
    return reply == {"return": {"running": True, "singlestep": False, "status": "running"}, "id": "alive"}


def test_garbage_bytes(daemon):
    s, f = connect(daemon.qmp)
    s.sendall(os.urandom(4096).replace(b"{", b"(").replace(b"[", b"(").replace(b'"', b"'") + b"\n")
    s.sendall(b'{"execute": "query-status", "id": 1}\n')
    while True:
        reply = json.loads(f.readline())
        if reply.get("id") == 1:
            break
        # Random bytes may also spell a valid JSON scalar, which is no JSON object.
        desc = reply["error"]["desc"]
        assert desc.startswith("JSON parse error") or desc == "QMP input must be a JSON object", desc
    s.close()
    assert still_serving(daemon)


def test_twenty_mib_message(daemon):
    s, f = connect(daemon.qmp)
    huge = b'{"execute": "migrate", "arguments": {"uri": "' + b"x" * (20 << 20) + b'"}, "id": 1}\n'
    s.sendall(huge)
    reply = json.loads(f.readline())
    assert reply == {"error": {"class": "GenericError",
                               "desc": "JSON parse error, message exceeds 16777216 bytes"}}
    s.sendall(b'{"execute": "query-status", "id": 2}\n')
    assert json.loads(f.readline())["id"] == 2
    s.close()
    assert still_serving(daemon)


def test_half_a_message_then_disconnect(daemon):
    for negotiate in (False, True):
        s, _ = connect(daemon.qmp, negotiate)
        s.sendall(b'{"execute": "query-status", "arguments": {"a": "unterminated')
        s.close()
    assert still_serving(daemon)


def test_client_that_never_reads_is_dropped(daemon):
    s, _ = connect(daemon.qmp)
    try:
        s.sendall(b'{"execute": "query-migrate-capabilities"}\n' * 20000)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    except (BrokenPipeError, ConnectionResetError):
        pass                      # dropped while still sending
    assert still_serving(daemon)
    s.close()


async def test_five_hundred_clients_at_once(daemon):
    async def one(i):
        reader, writer = await asyncio.open_unix_connection(daemon.qmp, limit=1 << 20)
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}\n'
                     b'{"execute": "query-status", "id": %d}\n' % i)
        await writer.drain()
        assert json.loads(await reader.readline()) == {"return": {}}
        reply = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
        return reply["id"]

    ids = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), 120)
    assert sorted(ids) == list(range(500))
    assert still_serving(daemon)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(["migrate", "migrate-set-parameters", "migrate-set-capabilities",
                                 "query-status", "getfd", "calc-dirty-rate", "nope", "stop", "cont"])},
    optional={"arguments": st.dictionaries(
        st.sampled_from(["uri", "capabilities", "compress-level", "max-bandwidth", "tls-creds",
                         "fdname", "calc-time", "x"]), json_values, max_size=3),
              "id": json_values})
chunks = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(chunks, min_size=1, max_size=8))
def test_fuzz_qmp_input(daemon, pieces):
    """Whatever arrives, every reply is well-formed QMP and the daemon serves on."""
    s, f = connect(daemon.qmp)
    s.sendall(b"\n".join(pieces) + b"\n")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(2)
    try:
        for line in f:
            message = json.loads(line)
            assert "return" in message or "error" in message or "event" in message
    except TimeoutError:
        pass                      # input still incomplete (an open bracket): nothing more to say
    s.close()
    c, g = connect(daemon.qmp)
    c.sendall(b'{"execute": "cont"}\n{"execute": "query-status", "id": "after"}\n')
    replies = []
    while not replies or replies[-1].get("id") != "after":
        message = json.loads(g.readline())
        if "event" not in message:
            replies.append(message)
    assert replies == [{"return": {}}, {"return": {"running": True, "singlestep": False, "status": "running"},
                                        "id": "after"}]
    c.close()
    assert daemon.alive(), daemon.log()


@given(st.lists(requests.map(lambda r: json.dumps(r).encode()), min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_streamer_splits_any_chunking(messages, cuts):
    stream = b" \n".join(messages)
    streamer, out, pos = JSONStreamer(), [], 0
    for cut in cuts * (len(stream) // max(sum(cuts), 1) + 1):
        out += streamer.feed(stream[pos:pos + cut])
        pos += cut
    out += streamer.feed(stream[pos:] + b"\n")
    assert [json.loads(m) for m in out] == [json.loads(m) for m in messages]


def test_streamer_scalars_and_stray_closers():
    out = JSONStreamer().feed(b'42 "a\\"}" } [1,{"b":"]"}] true\n')
    assert out[0] == b"42" and out[1] == b'"a\\"}"'
    assert isinstance(out[2], ParseError)
    assert out[3] == b'[1,{"b":"]"}]' and out[4] == b"true"


def test_streamer_bounds_memory():
    streamer = JSONStreamer(limit=1000)
    out = streamer.feed(b'{"a": "' + b"y" * 5000)
    assert out == [] and streamer._parts == []
    out = streamer.feed(b'"}{"ok": 1}')
    assert isinstance(out[0], ParseError) and out[1] == b'{"ok": 1}'
