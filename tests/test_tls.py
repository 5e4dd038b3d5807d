"""TLS and authz on the migration stream, tried as an attacker would: a plaintext peer, a
certificate from another CA, a valid certificate whose DN is not allowed.  Each is refused
before the destination reads a byte of guest data, learns nothing (no UUID, no sizes), and the
destination still takes the real source afterwards, with RAM verified."""
import socket
import ssl
import struct

import pytest

from appliance.certs import make_certs
from replication import stream
from replication.destination import MigrationDestination
from replication.source import MigrationSource
from replication.tls import Authz, ClientTls, ServerTls, X509Creds, distinguished_name
from replication.transport import Listener
from test_migration_engine import CAPS, assert_memdirty_intact, ram_digest
from appliance.control.migration_settings import DEFAULT_PARAMETERS
from vmm_helpers import memdirty_layout, wait_for

pytestmark = pytest.mark.kvm
NODE_A = "CN=node-a,O=colo-appliance"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca: the nodes' CA, with node-a's client certificate; intruder: same CA, another DN;
    other: a CA of its own (its client certificate says node-a too)."""
    root = tmp_path_factory.mktemp("pki")
    make_certs(str(root / "ca"), ["localhost", "127.0.0.1"], "/O=colo-appliance/CN=node-a")
    make_certs(str(root / "intruder"), ["localhost"], "/O=colo-appliance/CN=intruder", ca_dir=str(root / "ca"))
    make_certs(str(root / "other"), ["localhost", "127.0.0.1"], "/O=colo-appliance/CN=node-a")
    return {name: str(root / name) for name in ("ca", "intruder", "other")}


def server_tls(pki, authz=(NODE_A,)):
    return ServerTls(X509Creds("tls0", pki["ca"], "server"), Authz("auth0", list(authz)))


def client_tls(directory, hostname="127.0.0.1"):
    return ClientTls(X509Creds("tls0", directory, "client"), hostname)


class TlsRun:
    """A memdirty source and a destination waiting on tcp: with tls-creds and authz."""

    def __init__(self, vms, caps=None, memory=32, handshake_timeout=2.0, tls=None):
        self.src = vms.new("memdirty", "mib=8 rate=0", memory_mib=memory)
        self.dst = vms.new("memdirty", "mib=8 rate=0", memory_mib=memory, start_paused=True)
        assert self.dst.set_state("prelaunch", "inmigrate")
        self.caps = dict(CAPS, **(caps or {}))
        self.params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0}
        self.source = None
        self.src.start()
        memdirty_layout(self.src)          # read before the migration: the invariant's layout
        self.destination = MigrationDestination(self.dst, Listener("tcp:127.0.0.1:0"), self.caps, False,
                                                lambda n, d: None, verify_ram=True, tls=lambda: tls,
                                                handshake_timeout=handshake_timeout)
        self.uri = self.destination.listener.address
        self.port = int(self.uri.rpartition(":")[2])
        self.destination.start()

    def migrate(self, tls, timeout=60):
        self.source = source = MigrationSource(self.src, self.uri, self.caps, self.params, {}, lambda n, d: None,
                                               verify_ram=True, tls=tls)
        source.start()
        source.join(timeout)
        return source

    def close(self):
        self.destination.abort()
        self.destination.join(10)


def assert_migrated(run, source):
    run.destination.join(30)
    assert source.status == "completed", source.error
    assert run.destination.status == "completed", run.destination.error
    assert ram_digest(run.src) == ram_digest(run.dst)
    assert_memdirty_intact(run, run.dst)


def secrets_of(run) -> list[bytes]:
    """What the destination must not tell an unauthenticated peer: its UUID, its RAM size."""
    ram_size = run.dst.ram_regions()[0][1]
    return [run.dst.uuid.encode(), bytes.fromhex(run.dst.uuid.replace("-", "")), struct.pack("<Q", ram_size),
            f"{ram_size >> 20} MiB".encode()]


def recv_all(sock, seconds=5.0) -> bytes:
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def test_make_certs_writes_qemu_layout(pki):
    import os
    assert sorted(n for n in os.listdir(pki["ca"]) if n.endswith(".pem")) == [
        "ca-cert.pem", "ca-key.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    assert os.stat(os.path.join(pki["ca"], "server-key.pem")).st_mode & 0o077 == 0


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_tls_migration_completes_with_ram_verified(vms, guest_images, pki, multifd):
    run = TlsRun(vms, caps={"multifd": multifd}, tls=server_tls(pki))
    try:
        source = run.migrate(client_tls(pki["ca"]))
        assert_migrated(run, source)
        assert not run.destination.refused
    finally:
        run.close()


def test_plaintext_peer_is_refused_and_learns_nothing(vms, guest_images, pki):
    run = TlsRun(vms, tls=server_tls(pki))
    try:
        # An attacker with a well-formed header for this very VM, in clear.
        with socket.create_connection(("127.0.0.1", run.port)) as s:
            s.sendall(stream.Header(0, run.dst.uuid, 4096, run.dst.ram_regions()[0][1], 0).pack())
            answer = recv_all(s)
        assert not any(secret in answer for secret in secrets_of(run))
        assert not answer.startswith(bytes([1]))        # no refusal text: a TLS alert at most
        wait_for(lambda: run.destination.refused["tls"] == 1, what="the refusal to be counted")
        # A plaintext source is refused the same way; its guest runs on.
        source = run.migrate(None)
        assert source.status == "failed" and "without admitting it" in source.error
        assert run.src.state == "running" and run.destination.status == "setup"
        # The destination still listens: the real source gets through.
        assert_migrated(run, run.migrate(client_tls(pki["ca"])))
        assert run.destination.refused["tls"] == 2
    finally:
        run.close()


def test_certificate_of_another_ca_is_refused(vms, guest_images, pki):
    run = TlsRun(vms, tls=server_tls(pki))
    try:
        # The other CA's client: the destination refuses its certificate (and the client
        # refuses the destination's, not signed by its CA).
        source = run.migrate(client_tls(pki["other"]))
        assert source.status == "failed" and "TLS" in source.error and run.src.state == "running"
        # A client that trusts our CA but presents the other CA's certificate.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(f"{pki['ca']}/ca-cert.pem")
        context.load_cert_chain(f"{pki['other']}/client-cert.pem", f"{pki['other']}/client-key.pem")
        with socket.create_connection(("127.0.0.1", run.port)) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(stream.Header(0, run.dst.uuid, 4096, run.dst.ram_regions()[0][1], 0).pack())
                    answer = recv_all(s)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                answer = b""
        assert answer == b""
        wait_for(lambda: run.destination.refused["tls"] == 2, what="both refusals")
        assert run.destination.status == "setup"
        assert_migrated(run, run.migrate(client_tls(pki["ca"])))
    finally:
        run.close()


def test_valid_certificate_not_in_authz_is_refused(vms, guest_images, pki):
    run = TlsRun(vms, tls=server_tls(pki))
    try:
        intruder = client_tls(pki["intruder"])
        assert distinguished_name(ssl._ssl._test_decode_cert(f"{pki['intruder']}/client-cert.pem")) \
            == "CN=intruder,O=colo-appliance"
        source = run.migrate(intruder)
        assert source.status == "failed" and "without admitting it" in source.error
        assert run.src.state == "running"
        # The intruder's handshake succeeds (its certificate is genuine), then it gets nothing.
        with socket.create_connection(("127.0.0.1", run.port)) as raw:
            s = intruder.wrap(raw, 5)
            s.sendall(stream.Header(0, run.dst.uuid, 4096, run.dst.ram_regions()[0][1], 0).pack())
            answer = recv_all(s)
        assert answer == b""
        wait_for(lambda: run.destination.refused["authz"] == 2, what="both refusals")
        assert run.destination.status == "setup"
        assert_migrated(run, run.migrate(client_tls(pki["ca"])))
    finally:
        run.close()


def test_source_checks_the_destination_name(vms, guest_images, pki):
    """tls-hostname (or the URI's host) must be in the destination's certificate."""
    run = TlsRun(vms, tls=server_tls(pki))
    try:
        source = run.migrate(client_tls(pki["ca"], hostname="node-b.example"))
        assert source.status == "failed" and "not valid for 'node-b.example'" in source.error
        assert run.src.state == "running"
    finally:
        run.close()


def test_config_declares_creds_and_authz_by_id(tmp_path, pki):
    from appliance.config import ConfigError, load_config
    path = tmp_path / "node.toml"
    path.write_text(f'[tls-creds.tls0]\ndir = "{pki["ca"]}"\nendpoint = "server"\nverify-peer = true\n\n'
                    '[authz.auth0]\nidentities = ["CN=node-a,O=colo-appliance"]\n\n'
                    '[migration]\ntls_creds = "tls0"\ntls_authz = "auth0"\nhandshake_timeout = 2.5\n')
    config = load_config(str(path))
    config.validate()
    assert config.tls.creds["tls0"] == X509Creds("tls0", pki["ca"], "server", True)
    assert config.tls.authz["auth0"].identities == [NODE_A]
    assert config.tls_parameters == {"tls-creds": "tls0", "tls-authz": "auth0"}
    assert config.handshake_timeout == 2.5
    server = config.tls.server({"tls-creds": "tls0", "tls-authz": "auth0"})
    assert server.authz.id == "auth0"
    with pytest.raises(Exception, match="this side needs a client endpoint"):
        config.tls.client({"tls-creds": "tls0", "tls-hostname": "", "tls-authz": ""}, "127.0.0.1")
    for bad, message in (
            (f'[tls-creds.t]\ndir = "{tmp_path}"\nendpoint = "server"\n', "ca-cert.pem does not exist"),
            (f'[tls-creds.t]\ndir = "{pki["ca"]}"\nendpoint = "both"\n', "endpoint must be"),
            (f'[tls-creds.t]\ndir = "{pki["ca"]}"\ncolour = 1\n', "unknown key"),
            ('[tls-creds.t]\nendpoint = "server"\n', "needs dir"),
            ('[migration]\ntls_creds = "nope"\n', "No TLS credentials with id 'nope'"),
            ('[migration]\nhandshake_timeout = 0\n', "handshake_timeout")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_config(str(path)).validate()


def test_distinguished_name_is_rfc4514():
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "Ex, Ltd"),), (("commonName", "a+b"),))}
    assert distinguished_name(cert) == "CN=a\\+b,O=Ex\\, Ltd,C=GB"


def test_keyed_heartbeat_drops_forged_and_replayed_datagrams():
    import blake3
    from colo.heartbeat import DATAGRAM, KEYED_MAGIC, Heartbeat
    vm_uuid = "7a1f3c52-0d6b-4e8a-9c2f-5b1e0a9d4c37"
    a = Heartbeat("127.0.0.1", 0, vm_uuid, 1000, 5000, lambda why: None, keyed=True)
    b = Heartbeat("127.0.0.1", 0, vm_uuid, 1000, 5000, lambda why: None, keyed=True)
    try:
        b.start("127.0.0.1", a.port, a.key)
        wait_for(lambda: b.sent >= 1, what="b's first datagram")
        body = DATAGRAM.pack(KEYED_MAGIC, bytes.fromhex(vm_uuid.replace("-", "")), 1000)
        genuine = body + blake3.blake3(body, key=a.key).digest()
        forged = body + blake3.blake3(body, key=bytes(32)).digest()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(genuine, ("127.0.0.1", b.port))
            wait_for(lambda: b.received == 1, what="the genuine datagram")
            s.sendto(genuine, ("127.0.0.1", b.port))          # replayed
            s.sendto(forged, ("127.0.0.1", b.port))           # the wrong key
            s.sendto(body, ("127.0.0.1", b.port))             # no MAC at all
            wait_for(lambda: b.rejected == 3, what="three rejections")
        assert b.received == 1
    finally:
        a.stop()
        b.stop()
