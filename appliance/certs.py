"""A test CA and node certificates in QEMU's x509 layout, made with the openssl CLI.

``colo-appliance make-certs DIR`` writes, with P-256 EC keys (fast to make and to use)::

    DIR/ca-cert.pem  ca-key.pem           the CA (keep ca-key.pem off the nodes)
    DIR/server-cert.pem  server-key.pem   SAN: every --hostname (DNS names and IP addresses)
    DIR/client-cert.pem  client-key.pem   subject --client-dn, e.g. /O=colo-appliance/CN=node-a

``--ca DIR2`` signs with an existing CA (DIR2/ca-cert.pem, ca-key.pem) instead of making one,
so that several nodes' certificates share it.  For tests and drills: a production CA keeps its
key offline and sets validity to the site's policy.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]


class CertError(Exception):
    pass


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise CertError("the openssl command is missing (apt-get install openssl)")
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _san(hostnames: list[str]) -> str:
    names = []
    for name in hostnames:
        try:
            names.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            names.append(f"DNS:{name}")
    return ",".join(names)


def make_certs(directory: str, hostnames: list[str], client_dn: str, ca_dir: str | None = None,
               days: int = 365) -> None:
    """The five files QEMU's tls-creds-x509 reads (and ca-key.pem), in ``directory``."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = lambda name: os.path.join(directory, name)      # noqa: E731
    if ca_dir is None:
        _openssl("req", "-x509", *CURVE, "-nodes", "-keyout", path("ca-key.pem"), "-out", path("ca-cert.pem"),
                 "-days", str(days), "-subj", "/O=colo-appliance/CN=colo-appliance test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ca_cert, ca_key = path("ca-cert.pem"), path("ca-key.pem")
    else:
        ca_cert, ca_key = os.path.join(ca_dir, "ca-cert.pem"), os.path.join(ca_dir, "ca-key.pem")
        if os.path.abspath(ca_dir) != os.path.abspath(directory):
            shutil.copyfile(ca_cert, path("ca-cert.pem"))
    with tempfile.TemporaryDirectory() as scratch:
        for role, subject, extensions in (
                ("server", f"/O=colo-appliance/CN={hostnames[0]}",
                 f"subjectAltName={_san(hostnames)}\nextendedKeyUsage=serverAuth\n"),
                ("client", client_dn, "extendedKeyUsage=clientAuth\n")):
            request, extfile = os.path.join(scratch, f"{role}.csr"), os.path.join(scratch, f"{role}.ext")
            with open(extfile, "w") as f:
                f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n" + extensions)
            _openssl("req", "-new", *CURVE, "-nodes", "-keyout", path(f"{role}-key.pem"), "-out", request,
                     "-subj", subject)
            _openssl("x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                     "-CAserial", os.path.join(scratch, "ca.srl"), "-days", str(days),
                     "-extfile", extfile, "-out", path(f"{role}-cert.pem"))
    for name in os.listdir(directory):
        if name.endswith("-key.pem"):
            os.chmod(path(name), 0o600)
