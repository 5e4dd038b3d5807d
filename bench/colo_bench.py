"""COLO benchmarks: checkpoint pauses and bytes by dirty volume, checkpoint rate, failover time.

    python bench/colo_bench.py [--write docs/benchmarks.md]

Two node daemons in network namespaces (appliance.netns), the primary and
the secondary each in its own process, as deployed.  ``memdirty`` dirties
its working set at a set rate; MiB dirtied per checkpoint = rate x
x-checkpoint-delay.  The PVM's pause of every checkpoint (pause start to
resume) and its bytes come from the primary's own figures, cross-checked
with the secondary's count of loaded checkpoints.  Baseline measured in the
same run: the time of one TCP round trip between the node namespaces and
memcpy bandwidth, which bound a checkpoint's fixed cost and its page copy.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from qemu.qmp import QMPClient  # noqa: E402

from appliance.netns import Topology, inside  # noqa: E402
from report import machine, write_section  # noqa: E402

HEADING = "## COLO"
PORT = 4444


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, topo: Topology, node: str, workdir: str, args: list[str]):
        self.namespace = topo.nodes[node].namespace
        self.name = f"{node}{time.monotonic_ns() % 100000}"
        self.qmp_path = os.path.join(workdir, f"{self.name}.qmp")
        self.http = f"127.0.0.1:{free_port()}"
        self.state_dir = os.path.join(workdir, self.name)
        os.makedirs(self.state_dir, exist_ok=True)
        self.log = open(os.path.join(workdir, f"{self.name}.log"), "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, sys.executable, "-m", "appliance.cli", "serve",
             "--name", self.name, "--qmp", self.qmp_path, "--http", self.http, "--state-dir", self.state_dir,
             *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        self.qmp = QMPClient(self.name)

    async def connect(self) -> None:
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start")
            await asyncio.sleep(0.05)
        await self.qmp.connect(self.qmp_path)
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "x-colo", "state": True}]})

    def status(self) -> dict:
        token_path = os.path.join(self.state_dir, "http-token")
        headers = {}
        if os.path.exists(token_path):
            headers["Authorization"] = "Bearer " + open(token_path).read().strip()
        request = urllib.request.Request(f"http://{self.http}/api/v1/status", headers=headers)
        with inside(self.namespace), urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    async def close(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def colo_pair(topo, workdir, guest: list[str], delay_ms: int, a_args: tuple = (), b_args: tuple = ()):
    """Node a protected by node b; ``a_args``, ``b_args``: more daemon flags for each.  If COLO
    does not start, both daemons are stopped and the error says what the nodes said."""
    a = Node(topo, "a", workdir, guest + list(a_args))
    b = Node(topo, "b", workdir, guest + list(b_args) + ["--incoming", f"tcp:0.0.0.0:{PORT}"])
    try:
        await a.connect()
        await b.connect()
        await asyncio.sleep(1.0)                      # the workload reaches its rate
        await a.qmp.execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms, "max-bandwidth": 0})
        address = topo.nodes["b"].address
        with a.qmp.listener("MIGRATION") as events:
            await a.qmp.execute("migrate", {"uri": f"tcp:{address}:{PORT}"})
            try:
                while (await asyncio.wait_for(events.get(), 60))["data"]["status"] not in ("colo", "failed",
                                                                                          "cancelled"):
                    pass
            except asyncio.TimeoutError:
                pass
            info = await a.qmp.execute("query-migrate")
        if info["status"] != "colo":
            neighbour = subprocess.run(topo.in_namespace(a.namespace, ["ip", "neigh", "show", address]),
                                       capture_output=True, text=True)
            raise RuntimeError(f"COLO did not start: migration {info['status']} {info.get('error-desc', '')}\n"
                               f"node a's neighbour entry for {address}: "
                               f"{neighbour.stdout.strip() or neighbour.stderr.strip() or 'none'}\n"
                               f"node a's log ends:\n{log_tail(a)}\nnode b's log ends:\n{log_tail(b)}")
    except BaseException:
        await b.close()
        await a.close()
        raise
    return a, b


def log_tail(node: Node, lines: int = 15) -> str:
    with open(node.log.name) as f:
        return "".join(f.readlines()[-lines:])


async def checkpoint_figures(topo, workdir, mib_per_checkpoint: int, delay_ms: int, seconds: float,
                             rate: int | None = None, verify_ram: bool = False) -> dict:
    """``rate`` (MiB/s) defaults to what dirties ``mib_per_checkpoint`` in ``delay_ms``."""
    rate = rate if rate is not None else mib_per_checkpoint * 1000 // delay_ms
    working_set = max(2 * mib_per_checkpoint, 16)
    guest = ["--guest", "memdirty", "-m", str(working_set + 64), "--append", f"mib={working_set} rate={rate}"]
    if verify_ram:
        guest.append("--verify-ram")
    a, b = await colo_pair(topo, workdir, guest, delay_ms)
    try:
        before = a.status()["colo"]
        await asyncio.sleep(seconds)
        after = a.status()["colo"]
        loaded = b.status()["colo"]["checkpoints-loaded"]
    finally:
        await a.close()
        await b.close()
    count = after["checkpoints-total"] - before["checkpoints-total"]
    return {"mib": mib_per_checkpoint, "delay": delay_ms, "verify": verify_ram, "ram": working_set + 64,
            "count": count, "loaded": loaded,
            "p50": after["pause-ms"]["p50"], "p99": after["pause-ms"]["p99"],
            "bytes": (after["bytes-total"] - before["bytes-total"]) / max(count, 1),
            "rate": count / seconds, "failed": after["failed-checkpoints"]}


async def failover_time(topo, workdir) -> float:
    """Primary frozen (SIGSTOP) -> the SVM running, with the default heartbeat settings."""
    guest = ["--guest", "memdirty", "-m", "64", "--append", "mib=16 rate=20"]
    a, b = await colo_pair(topo, workdir, guest, 100)
    try:
        await asyncio.sleep(1.0)
        with b.qmp.listener("COLO_EXIT") as exits:
            frozen = time.monotonic()
            a.proc.send_signal(signal.SIGSTOP)
            await asyncio.wait_for(exits.get(), 10)
        while (await b.qmp.execute("query-status"))["status"] != "running":
            await asyncio.sleep(0.005)
        return time.monotonic() - frozen
    finally:
        await a.close()
        await b.close()


ECHO_SERVER = """
import socket
s = socket.create_server(("0.0.0.0", {port}))
print("ready", flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(64):
    c.sendall(data)
"""
ECHO_CLIENT = """
import socket, time
c = socket.create_connection(("{address}", {port}))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(500):
    start = time.perf_counter()
    c.sendall(b"x")
    c.recv(64)
    times.append(time.perf_counter() - start)
print(sorted(times)[len(times) // 2] * 1000)
"""


def round_trip_ms(topo) -> float:
    """Median TCP round trip of one byte from node a to node b, in Python as the daemons are."""
    port = 4555
    server = subprocess.Popen(topo.in_namespace(topo.nodes["b"].namespace, [
        sys.executable, "-c", ECHO_SERVER.format(port=port)]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(topo.in_namespace(topo.nodes["a"].namespace, [
            sys.executable, "-c", ECHO_CLIENT.format(address=topo.nodes["b"].address, port=port)]),
            capture_output=True, text=True, check=True).stdout
        return float(out)
    finally:
        server.kill()
        server.wait()


def memcpy_gbps(size: int = 64 << 20) -> float:
    a, b = bytearray(size), bytearray(os.urandom(1 << 20) * (size >> 20))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a[:] = b
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


async def measure(topo, workdir: str) -> tuple[dict, list, dict, float]:
    baseline = {"rtt": round_trip_ms(topo), "memcpy": memcpy_gbps()}
    rows = [await checkpoint_figures(topo, workdir, mib, 1000, 15) for mib in (1, 10, 100)]
    rows.append(await checkpoint_figures(topo, workdir, 10, 1000, 15, verify_ram=True))
    flat_out = await checkpoint_figures(topo, workdir, 1, 0, 10, rate=1)
    takeover = await failover_time(topo, workdir)
    return baseline, rows, flat_out, takeover


def markdown(baseline, rows, flat_out, takeover) -> str:
    out = [HEADING, "",
           f"`bench/colo_bench.py` on {machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}: a primary and a",
           "secondary daemon in two network namespaces joined by veths and a bridge, `memdirty` dirtying its",
           "working set at a set rate (MiB per checkpoint = rate x x-checkpoint-delay). `--verify-ram` hashes",
           "all guest RAM on both sides in every pause: its row shows that cost against the row above it.",
           "",
           f"Baselines measured in the same run: TCP round trip between the node namespaces "
           f"**{baseline['rtt']:.3f} ms** (a checkpoint has three), memcpy **{baseline['memcpy']:.2f} GB/s**.",
           "",
           "| MiB dirtied per checkpoint | guest RAM MiB | --verify-ram | x-checkpoint-delay ms | checkpoints "
           "| pause p50 ms | pause p99 ms | p99 / round trip | bytes per checkpoint | failed |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mib']} | {r['ram']} | {'on' if r['verify'] else 'off'} | {r['delay']} | {r['count']} | "
                   f"{r['p50']:.2f} | {r['p99']:.2f} | {r['p99'] / baseline['rtt']:.0f} | "
                   f"{r['bytes'] / 2**20:.2f} MiB | {r['failed']} |")
    out += ["",
            f"Sustained at x-checkpoint-delay 0 (1 MiB/s dirtied): **{flat_out['rate']:.0f} checkpoints/s**, "
            f"pause p50 {flat_out['p50']:.2f} ms, p99 {flat_out['p99']:.2f} ms.",
            "",
            f"Failover, primary frozen (SIGSTOP) -> SVM running, heartbeat 100 ms / timeout 500 ms: "
            f"**{takeover * 1000:.0f} ms**.",
            "",
            "Floors: p99 pause <= 20 ms at 10 MiB per checkpoint; takeover <= 1 s."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    args = parser.parse_args()
    import tempfile
    # pyroute2's namespace calls run their own event loop: the topology is made outside ours.
    with tempfile.TemporaryDirectory() as workdir, Topology(f"cb{os.getpid() % 10000}", ["a", "b"]) as topo:
        section = markdown(*asyncio.run(measure(topo, workdir)))
    print(section)
    if args.write:
        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
