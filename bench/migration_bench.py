"""Migration benchmarks, each against ceilings measured in the same run.

    python bench/migration_bench.py [--write docs/benchmarks.md]

Baselines: Python ``sendall`` over loopback TCP into a C sink (what one
Python thread can push), and ``memcmp`` bandwidth (what a page diff could
reach).  Workloads: an idle 1 GiB guest, and memdirty dirtying 256 MiB
flat out (with auto-converge, as it cannot converge otherwise), migrated
over loopback TCP between two VMs in this process.  TLS: a paused guest with
256 MiB of random data in RAM migrated in clear and under TLS 1.3 (client certificate, authz),
one after the other in the same run, the ratio against the clear run.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from appliance.control.migration_settings import DEFAULT_PARAMETERS  # noqa: E402
from appliance.vmm import VirtualMachine, VMConfig  # noqa: E402
from native import _native  # noqa: E402
from replication.destination import MigrationDestination  # noqa: E402
from replication.source import MigrationSource  # noqa: E402
from replication.tls import Authz, ClientTls, ServerTls, X509Creds  # noqa: E402
from replication.transport import Listener  # noqa: E402
from appliance.certs import make_certs  # noqa: E402
from report import machine, write_section  # noqa: E402

HEADING = "## Migration"
IMAGE = os.path.join(REPO, "build", "guest", "memdirty.elf")
CAPS = {"xbzrle": False, "compress": False, "multifd": False, "auto-converge": False, "events": False,
        "pause-before-switchover": False, "validate-uuid": True, "return-path": False, "release-ram": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sendall_ceiling(total: int = 4 << 30) -> float:
    """GB/s of Python sendall over loopback into the C sink."""
    sink = os.path.join(REPO, "build", "bench", "sink")
    os.makedirs(os.path.dirname(sink), exist_ok=True)
    subprocess.run(["gcc", "-O2", "-o", sink, os.path.join(HERE, "sink.c")], check=True)
    port = free_port()
    proc = subprocess.Popen([sink, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    chunk = memoryview(bytearray(os.urandom(1 << 20)) * 64)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for _ in range(total // len(chunk)):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        received = int(proc.stdout.readline())
        elapsed = time.perf_counter() - start
    proc.wait()
    assert received == total
    return total / elapsed / 1e9


def memcmp_bandwidth(size: int = 256 << 20) -> float:
    a, b = bytearray(size), bytearray(size)
    best = min(_timed(lambda: _native.memcmp_bandwidth_probe(a, b, 4096)) for _ in range(5))
    return size / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def migrate(memory_mib: int, cmdline: str, caps: dict, params: dict, verify_ram: bool = False,
            pki: str | None = None, fill_mib: int = 0) -> dict:
    """One migration; ``pki``: a make-certs directory, for TLS with a client certificate and authz;
    ``fill_mib``: pause the guest and fill the top of its RAM with random data (a pure transfer)."""
    src = VirtualMachine(VMConfig(image=IMAGE, cmdline=cmdline, memory_mib=memory_mib))
    dst = VirtualMachine(VMConfig(image=IMAGE, cmdline=cmdline, memory_mib=memory_mib, start_paused=True))
    dst.uuid = src.uuid                 # the same guest on both sides, so validate-uuid holds
    try:
        dst.set_state("prelaunch", "inmigrate")
        src.start()
        time.sleep(1.0)                 # let the workload reach its steady state
        if fill_mib:
            src.pause()
            ram = src.ram_regions()[0][3]
            chunk = os.urandom(1 << 20)
            for mib in range(fill_mib):
                offset = len(ram) - (mib + 1) * (1 << 20)
                ram[offset:offset + (1 << 20)] = chunk
        uri = f"tcp:127.0.0.1:{free_port()}"
        caps = {**CAPS, **caps}
        params = {**DEFAULT_PARAMETERS, **params}
        server = ServerTls(X509Creds("server", pki, "server"), Authz("authz", ["CN=bench,O=colo-appliance"])) \
            if pki else None
        client = ClientTls(X509Creds("client", pki, "client"), "127.0.0.1") if pki else None
        destination = MigrationDestination(dst, Listener(uri), caps, True, lambda n, d: None,
                                           verify_ram=verify_ram, tls=lambda: server)
        destination.start()
        source = MigrationSource(src, uri, caps, params, {}, lambda n, d: None, verify_ram=verify_ram, tls=client)
        source.start()
        source.join(300)
        destination.join(60)
        info = source.info()
        if info["status"] != "completed" or destination.status != "completed":
            raise RuntimeError(f"migration failed: {info.get('error-desc') or destination.error}")
        info["converged-at"] = source.stats.expected_at_switch
        return info
    finally:
        src.close()
        dst.close()


def measure() -> tuple[dict, list]:
    ceilings = {"sendall": sendall_ceiling(), "memcmp": memcmp_bandwidth()}
    workloads = [
        ("idle guest, 1 GiB", 1024, "mib=1 rate=1", {}, {"max-bandwidth": 0}),
        ("idle guest, 1 GiB, --verify-ram", 1024, "mib=1 rate=1", {}, {"max-bandwidth": 0, "verify": True}),
        ("memdirty 256 MiB flat out, auto-converge", 384, "mib=256 rate=0", {"auto-converge": True},
         {"max-bandwidth": 0}),
        ("memdirty 256 MiB flat out, auto-converge, multifd x2", 384, "mib=256 rate=0",
         {"auto-converge": True, "multifd": True}, {"max-bandwidth": 0, "multifd-channels": 2}),
    ]
    rows = []
    for name, memory, cmdline, caps, params in workloads:
        verify = params.pop("verify", False)
        info = migrate(memory, cmdline, caps, params, verify_ram=verify)
        seconds = info["total-time"] / 1000
        rate = info["ram"]["transferred"] / seconds / 1e9 if seconds else 0.0
        covered = info["ram"]["total"] / seconds / 1e9 if seconds else 0.0
        rows.append((name, info["total-time"], info["downtime"], info["converged-at"], params.get(
            "downtime-limit", DEFAULT_PARAMETERS["downtime-limit"]), info["ram"]["transferred"] / 2**20, rate,
            rate / ceilings["sendall"], covered, info["ram"]["dirty-sync-count"],
            info.get("cpu-throttle-percentage", 0)))
    return ceilings, rows, measure_tls()


def measure_tls() -> list:
    """(workload, clear GB/s, TLS GB/s, TLS / clear, TLS total ms): the same guest, same run."""
    rows = []
    with tempfile.TemporaryDirectory() as pki:
        make_certs(pki, ["127.0.0.1"], "/O=colo-appliance/CN=bench")
        for name, caps, params in (("256 MiB of data, single channel", {}, {}),
                                   ("256 MiB of data, multifd x2", {"multifd": True}, {"multifd-channels": 2})):
            rates = []
            for tls_dir in (None, pki):
                info = migrate(384, "mib=1 rate=1", caps, {"max-bandwidth": 0, **params}, pki=tls_dir, fill_mib=256)
                rates.append((info["ram"]["transferred"] / (info["total-time"] / 1000) / 1e9, info["total-time"]))
            rows.append((name, rates[0][0], rates[1][0], rates[1][0] / rates[0][0], rates[1][1]))
    return rows


def markdown(ceilings: dict, rows: list, tls_rows: list) -> str:
    out = [HEADING, "",
           f"`bench/migration_bench.py` on {machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}: two VMs in",
           "one process, the stream over loopback TCP (both ends share the 2 CPUs with the guest's vCPU).",
           "",
           f"Ceilings measured in the same run: Python `sendall` over loopback into a C sink "
           f"**{ceilings['sendall']:.2f} GB/s**; `memcmp` over guest-sized buffers **{ceilings['memcmp']:.2f} GB/s** "
           "(the native page diff and zero scan against it: see *Native hot paths*).",
           "",
           "| workload | total ms | downtime ms | expected at switch ms | downtime-limit ms | sent MiB "
           "| stream GB/s | / sendall ceiling | guest RAM GB/s | passes | throttle % |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, total, down, expected, limit, sent, rate, ratio, covered, passes, throttle in rows:
        out.append(f"| {name} | {total} | {down} | {expected} | {limit} | {sent:.1f} | {rate:.2f} | "
                   f"{ratio:.2f} | {covered:.1f} | {passes} | {throttle} |")
    out += ["", "*stream GB/s* is bytes sent over the total time; *guest RAM GB/s* is the guest's RAM size",
            "over the total time (an idle guest's holes and zero pages cost almost nothing to send).",
            "", "Targets: idle 1 GiB under 300 ms total and 50 ms downtime; measured downtime within",
            "downtime-limit whenever the engine reports convergence (the expected figure is the engine's",
            "estimate when it stopped the guest).",
            "", "TLS 1.3 (EC P-256 certificates, client certificate and authz checked) against the same migration",
            "in clear, run just before it:", "",
            "| workload | clear GB/s | TLS GB/s | TLS / clear | TLS total ms |", "|---|---:|---:|---:|---:|"]
    for name, clear, tls, ratio, total in tls_rows:
        out.append(f"| {name} | {clear:.2f} | {tls:.2f} | {ratio:.2f} | {total} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    args = parser.parse_args()
    section = markdown(*measure())
    print(section)
    if args.write:
        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
