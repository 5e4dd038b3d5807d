"""TLS and authz for node-to-node channels, after QEMU's tls-creds-x509 and authz-list objects.

Credentials are declared by id (the node config's ``[tls-creds.ID]`` and ``[authz.ID]``)
and chosen with the migration parameters ``tls-creds``, ``tls-hostname`` and ``tls-authz``.
A creds directory has QEMU's x509 layout::

    DIR/ca-cert.pem                       the CA that signs the peers' certificates
    DIR/server-cert.pem  server-key.pem   endpoint "server" (a destination, a COLO secondary)
    DIR/client-cert.pem  client-key.pem   endpoint "client" (a source, a COLO primary)

A client always checks the server's certificate against the CA and the host name
(``tls-hostname``, else the URI's host).  A server with ``verify-peer`` asks for a client
certificate signed by the CA; with an authz list, the certificate's subject DN, written as
RFC 4514 (``CN=node-a,O=Example,C=GB``, as gnutls and ``openssl -nameopt RFC2253`` print it),
must be one of its identities.  TLS 1.3 only; the server sends no session tickets, so that
after the handshake a source reads nothing the destination did not say.
"""
from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field

CREDS_FILES = {"server": ("server-cert.pem", "server-key.pem"), "client": ("client-cert.pem", "client-key.pem")}
# Attribute names as RFC 4514 writes them; Python's getpeercert() spells them out.
_DN_NAMES = {"commonName": "CN", "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "organizationName": "O", "organizationalUnitName": "OU", "streetAddress": "STREET",
             "domainComponent": "DC", "userId": "UID", "emailAddress": "emailAddress"}


class TlsError(Exception):
    """Credentials that cannot be used, or a peer that failed the handshake or authz."""


def distinguished_name(cert: dict) -> str:
    """A peer certificate's subject (as ``SSLSocket.getpeercert()`` returns it) in RFC 4514
    form: the last RDN first, attributes separated by commas, special characters escaped."""
    rdns = []
    for rdn in reversed(cert.get("subject", ())):
        parts = []
        for name, value in rdn:
            escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
            if escaped.startswith(("#", " ")):
                escaped = "\\" + escaped
            if escaped.endswith(" "):
                escaped = escaped[:-1] + "\\ "
            parts.append(f"{_DN_NAMES.get(name, name)}={escaped}")
        rdns.append("+".join(parts))
    return ",".join(rdns)


@dataclass
class X509Creds:
    """QEMU's tls-creds-x509: a directory, an endpoint, and whether a server checks clients."""
    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True

    def validate(self) -> None:
        if self.endpoint not in CREDS_FILES:
            raise TlsError(f"tls-creds '{self.id}': endpoint must be 'client' or 'server', not {self.endpoint!r}")
        if not isinstance(self.verify_peer, bool):
            raise TlsError(f"tls-creds '{self.id}': verify-peer must be true or false")
        for name in ("ca-cert.pem",) + CREDS_FILES[self.endpoint]:
            path = os.path.join(self.dir, name)
            if not os.path.isfile(path):
                raise TlsError(f"tls-creds '{self.id}': {path} does not exist")

    def context(self) -> ssl.SSLContext:
        """A fresh context (files are read now: renewed certificates apply to the next connection)."""
        cert, key = (os.path.join(self.dir, name) for name in CREDS_FILES[self.endpoint])
        server = self.endpoint == "server"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_verify_locations(os.path.join(self.dir, "ca-cert.pem"))
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"tls-creds '{self.id}': cannot load {self.dir}: {e}") from e
        if server:
            context.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
            context.num_tickets = 0
        else:
            context.check_hostname = True
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass
class ClientTls:
    """How a source (or COLO primary) opens its channels: verify the server as ``hostname``."""
    creds: X509Creds
    hostname: str

    def wrap(self, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
        sock.settimeout(timeout)
        try:
            return self.creds.context().wrap_socket(sock, server_hostname=self.hostname)
        except ssl.SSLCertVerificationError as e:
            raise TlsError(f"TLS: the peer's certificate is not valid for '{self.hostname}': "
                           f"{e.verify_message}") from e
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"TLS handshake failed (the peer refused our certificate, or does not "
                           f"speak TLS): {e}") from e


@dataclass
class ServerTls:
    """How a destination (or COLO secondary) admits a connection: handshake, then authz."""
    creds: X509Creds
    authz: "Authz | None" = None

    def wrap(self, sock: socket.socket, timeout: float) -> tuple[ssl.SSLSocket, str]:
        """The TLS socket and the client's DN ("" when clients are not asked for a certificate);
        TlsError when the handshake fails or the DN is not allowed."""
        sock.settimeout(timeout)
        try:
            tls = self.creds.context().wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"TLS handshake failed: {e}") from e
        dn = distinguished_name(tls.getpeercert() or {})
        if self.authz is not None and dn not in self.authz.identities:
            tls.close()
            raise TlsError(f"authz '{self.authz.id}': client certificate {dn!r} is not allowed")
        return tls, dn


@dataclass
class Authz:
    """QEMU's authz-list with policy deny: the client DNs allowed in."""
    id: str
    identities: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not isinstance(self.identities, list) or not all(isinstance(i, str) and i for i in self.identities):
            raise TlsError(f"authz '{self.id}': identities must be a list of distinguished names")


class TlsRegistry:
    """The node's declared tls-creds and authz objects, looked up by id as QEMU does."""

    def __init__(self, creds: dict[str, X509Creds] | None = None, authz: dict[str, Authz] | None = None):
        self.creds = creds or {}
        self.authz = authz or {}

    def check_parameters(self, params: dict) -> None:
        """migrate-set-parameters: ids must name declared objects (QEMU's own messages)."""
        if params["tls-creds"] and params["tls-creds"] not in self.creds:
            raise TlsError(f"No TLS credentials with id '{params['tls-creds']}'")
        if params["tls-authz"] and params["tls-authz"] not in self.authz:
            raise TlsError(f"No authz object with id '{params['tls-authz']}'")
        if params["tls-authz"] and not params["tls-creds"]:
            raise TlsError("tls-authz needs tls-creds")

    def client(self, params: dict, uri_host: str | None) -> ClientTls | None:
        """The source's TLS for these parameters, or None without tls-creds."""
        if not params["tls-creds"]:
            return None
        creds = self._creds(params["tls-creds"], "client")
        hostname = params["tls-hostname"] or uri_host
        if not hostname:
            raise TlsError("TLS over a non-TCP migration channel needs 'tls-hostname'")
        return ClientTls(creds, hostname)

    def server(self, params: dict) -> ServerTls | None:
        """The destination's TLS for these parameters, or None without tls-creds."""
        if not params["tls-creds"]:
            return None
        creds = self._creds(params["tls-creds"], "server")
        authz = self.authz[params["tls-authz"]] if params["tls-authz"] else None
        if authz is not None and not creds.verify_peer:
            raise TlsError(f"tls-authz '{authz.id}' needs tls-creds '{creds.id}' with verify-peer = true "
                           "(without a client certificate there is no identity to check)")
        return ServerTls(creds, authz)

    def _creds(self, creds_id: str, endpoint: str) -> X509Creds:
        creds = self.creds.get(creds_id)
        if creds is None:
            raise TlsError(f"No TLS credentials with id '{creds_id}'")
        if creds.endpoint != endpoint:
            raise TlsError(f"tls-creds '{creds_id}' is a {creds.endpoint} endpoint; this side needs a "
                           f"{endpoint} endpoint")
        return creds
