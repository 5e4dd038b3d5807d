"""A COLO pair of node daemons with TLS on every channel, from their TOML configs: the
migration/COLO connection and the packet channel under TLS with authz, the heartbeat's
datagrams MAC'd under keys exchanged inside TLS.  A primary whose client certificate is not
in the secondary's authz list is refused, and the secondary keeps waiting."""
import asyncio
import socket
import threading
import time
import uuid

import pytest

import native

from appliance.certs import make_certs
from appliance.netns import inside
from colo.heartbeat import DATAGRAM, MAGIC
from test_colo import PORT, Pair, assert_digests_match, http_status, topo  # noqa: F401 (fixture)
from test_migration_nodes import kvstore_args, wait_console

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
GUEST_UUID = uuid.UUID("7a1f3c52-0d6b-4e8a-9c2f-5b1e0a9d4c37")


class Capture:
    """Every IPv4 frame on a node namespace's eth0 (its link to the client side and to the
    other node) while the block runs: (source, destination, IP protocol, frame)."""

    def __init__(self, namespace: str):
        with inside(namespace):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)   # nothing dropped while we lag
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.05)
        self.frames: list[tuple[str, str, int, bytes]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            if frame[12:14] == b"\x08\x00":
                self.frames.append((socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), frame[23], frame))

    def __enter__(self) -> "Capture":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._thread.join()
        self.sock.close()


def write_configs(tmp_path, topo, client_dir):
    """a: the primary (client creds from ``client_dir``); b: the secondary (server creds, authz)."""
    pki = tmp_path / "pki"
    if not pki.exists():
        make_certs(str(pki), [topo.nodes["b"].address], "/O=colo-appliance/CN=node-a")
        make_certs(str(tmp_path / "intruder"), [topo.nodes["b"].address], "/O=colo-appliance/CN=intruder",
                   ca_dir=str(pki))
    (tmp_path / "a.toml").write_text(
        f'[tls-creds.tls0]\ndir = "{tmp_path / client_dir}"\nendpoint = "client"\n\n'
        '[migration]\ntls_creds = "tls0"\n')
    (tmp_path / "b.toml").write_text(
        f'[tls-creds.tls0]\ndir = "{pki}"\nendpoint = "server"\nverify-peer = true\n\n'
        '[authz.auth0]\nidentities = ["CN=node-a,O=colo-appliance"]\n\n'
        '[migration]\ntls_creds = "tls0"\ntls_authz = "auth0"\nhandshake_timeout = 2.0\n')


async def start(pair, tmp_path):
    _, a = await pair.start("a", "--config", str(tmp_path / "a.toml"))
    _, b = await pair.start("b", "--config", str(tmp_path / "b.toml"), incoming=True)
    await wait_console(a, "listening")
    return a, b


async def test_tls_colo_pair_protects_kvstore(topo, guest_images, tmp_path):
    write_configs(tmp_path, topo, "pki")
    pair = Pair(topo, tmp_path, kvstore_args(topo) + ["--verify-ram", "--uuid", str(GUEST_UUID)])
    try:
        a, b = await start(pair, tmp_path)
        assert (await a.execute("query-migrate-parameters"))["tls-creds"] == "tls0"
        await pair.enter_colo(delay=100)
        await pair.wait_checkpoints("a", 10)
        # Client traffic goes through the packet channel (TLS) and is compared; node a's wire
        # shows the client's bytes going to the guest, and never in clear to node b.
        marker = uuid.uuid4().hex.encode()
        with Capture(topo.nodes["a"].namespace) as wire:
            result = topo.run_client(["redis-cli", "-h", topo.guest_address, "SET", "k", marker],
                                     capture_output=True, text=True, timeout=30)
            assert result.stdout.strip() == "OK", result
            time.sleep(0.2)
        nodes = {topo.nodes["a"].address, topo.nodes["b"].address}
        between_nodes = [frame for src, dst, protocol, frame in wire.frames if {src, dst} == nodes]
        channel_frames = [frame for src, dst, protocol, frame in wire.frames
                          if {src, dst} == nodes and protocol == socket.IPPROTO_TCP and len(frame) > 100]
        assert any(marker in frame for src, dst, _, frame in wire.frames if dst == topo.guest_address)
        assert channel_frames and not any(marker in frame for frame in between_nodes)
        await pair.wait_checkpoints("a", 15)
        await assert_digests_match(pair, 10)
        a_colo = (await http_status(pair.daemons["a"]))["colo"]
        b_status = await http_status(pair.daemons["b"])
        b_colo = b_status["colo"]
        assert b_colo["tls-peer"] == "CN=node-a,O=colo-appliance"
        assert a_colo["heartbeat-keyed"] and b_colo["heartbeat-keyed"]
        assert a_colo["netfilter"]["mirrored"] > 0 and b_status["incoming-refused"] == {}
        # ... and the SVM's output comes back on the other connection (TLS too), one per direction.
        assert a_colo["netfilter"]["svm-frames"] > 0 and b_colo["netfilter"]["to-primary"] > 0
        assert a_colo["netfilter"]["channel"].startswith("out ") and ", in " in a_colo["netfilter"]["channel"]
        # The C datapath, its frames through the TLS relay: the peers above are SSL objects, so
        # what crossed went as TLS.
        datapath = "c" if native.IMPLEMENTATION == "native" else "python"
        assert a_colo["netfilter"]["datapath"] == b_colo["netfilter"]["datapath"] == datapath
        assert a_colo["netfilter"]["channel"].endswith("(TLS)") and b_colo["netfilter"]["channel"].endswith("(TLS)")
        # A datagram without the session's MAC, even from the primary's own address, is dropped.
        with inside(topo.nodes["a"].namespace):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                forged = DATAGRAM.pack(MAGIC, GUEST_UUID.bytes, 1 << 40)
                for _ in range(3):
                    s.sendto(forged, (topo.nodes["b"].address, b_colo["heartbeat-port"]))
        await asyncio.sleep(0.3)
        assert (await http_status(pair.daemons["b"]))["colo"]["heartbeat-rejected"] >= 3
        assert (await b.execute("query-colo-status"))["mode"] == "secondary"
    finally:
        await pair.close()


async def test_tls_colo_with_a_wrong_client_certificate_is_refused(topo, guest_images, tmp_path):
    write_configs(tmp_path, topo, "intruder")
    pair = Pair(topo, tmp_path, kvstore_args(topo))
    try:
        a, b = await start(pair, tmp_path)
        await a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
        for _ in range(200):
            info = await a.execute("query-migrate")
            if info["status"] == "failed":
                break
            await asyncio.sleep(0.1)
        assert info["status"] == "failed" and "without admitting it" in info["error-desc"]
        assert (await a.execute("query-status"))["status"] == "running"
        b_status = await http_status(pair.daemons["b"])
        assert b_status["incoming-refused"] == {"authz": 1}
        assert (await b.execute("query-migrate"))["status"] == "setup"
        assert (await b.execute("query-status"))["status"] == "inmigrate"
    finally:
        await pair.close()
