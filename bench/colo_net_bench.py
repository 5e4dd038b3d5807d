"""COLO network benchmark: kvstore under redis-benchmark unprotected and under COLO, and the
failover a client sees on its own TCP connection.

    python bench/colo_net_bench.py [--write docs/benchmarks.md]

Node daemons in network namespaces as bench/colo_bench.py starts them (Node, colo_pair),
kvstore on the service network, every client in the client namespace.  The baseline is
the same guest on a single node without COLO, measured in the same run.  Per
configuration (COLO also with TLS on its channels): redis-benchmark (SET and GET, 50
clients, the median of 3 runs) for throughput and latency, the checkpoints taken
meanwhile by reason, the daemons' CPU per request; then one verifying
client (one connection, numbered keys, every reply checked) for single-connection latency.
Failover: the primary daemon gets SIGKILL while that client runs; the longest silence
between two replies around it is the outage the client saw, and every acknowledged key
must still be there.  Then two unprotected guests side by side: the work COLO gives the
host's CPUs (two guests), without COLO.  Last, unprotected and COLO again with each node's
daemon pinned to a CPU of its own, as when each node is a host: this is where the 0.5x floor
is taken, since on this 2-CPU machine two nodes cannot each have what one node had alone.
"""
import argparse
import asyncio
import csv
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psutil

from colo_bench import Node, colo_pair
from appliance.certs import make_certs  # (colo_bench has put the repository on sys.path)
from appliance.netns import Topology
from report import machine, write_section

HEADING = "## COLO network"
REQUESTS = 20000
ROUNDS = 3                      # redis-benchmark runs per configuration; the median is reported
CLIENTS = 50
CLIENT_SECONDS = 3.0            # the verifying client alone, before a kill and after the takeover
DELAYS_MS = (1000, 200)
FAILOVER_DELAY_MS = 1000
FLOOR_RATIO = 0.5
FLOOR_GAP_S = 1.0
SECOND_MAC = "52:54:00:12:34:57"  # two_unprotected's second guest (the first has the config's default)
STALL_S = 0.15                  # a silence this long on one connection is counted as a stall


def kvstore_args(topo: Topology) -> list[str]:
    return ["--guest", "kvstore", "-m", "64", "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
            "--nic", "tap=tap0,bridge=br0"]


async def wait_listening(node: Node, timeout: float = 30) -> None:
    seen, deadline = "", time.monotonic() + timeout
    while "listening" not in seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"kvstore on {node.name} did not start: {seen!r}")
        seen += await node.qmp.execute("ringbuf-read", {"device": "console", "size": 65536})
        await asyncio.sleep(0.05)


def redis_benchmark(topo: Topology, requests: int = REQUESTS, clients: int = CLIENTS,
                    address: str | None = None) -> dict[str, dict]:
    """Per test (SET, GET): rps and latency percentiles in ms, from redis-benchmark's --csv,
    against the guest at ``address`` (the topology's guest by default)."""
    result = topo.run_client(["redis-benchmark", "-h", address or topo.guest_address, "-n", str(requests),
                              "-c", str(clients),
                              "-t", "set,get", "--csv"], capture_output=True, text=True, timeout=600)
    rows = {row["test"]: {key: float(value) for key, value in row.items() if key != "test"}
            for row in csv.DictReader(line for line in result.stdout.splitlines() if line.startswith('"'))}
    if result.returncode != 0 or set(rows) != {"SET", "GET"}:
        raise RuntimeError(f"redis-benchmark failed:\n{result.stdout}{result.stderr}")
    return {test: {"rps": row["rps"], "p50": row["p50_latency_ms"], "p99": row["p99_latency_ms"]}
            for test, row in rows.items()}


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def host_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot."""
    times = psutil.cpu_times()
    total = sum(times)
    return total - times.idle - times.iowait, total


def loaded(topo: Topology, nodes: list[Node], addresses: tuple[str | None, ...] = (None,)) -> dict:
    """redis-benchmark ROUNDS times, per test the round with the median ops/s (this shared
    2-CPU host swings between runs), with the daemons' CPU per request and how busy the host
    was over all of them.  With several ``addresses``, a redis-benchmark per guest at once: the
    rates and latencies are the guests' mean, each daemon's CPU is over its own guest's requests."""
    processes = [psutil.Process(n.proc.pid) for n in nodes]
    cpu_before = [cpu_seconds(p) for p in processes]
    busy_before, total_before = host_seconds()
    rounds = [guests_mean(at_once(topo, addresses)) for _ in range(ROUNDS)]
    busy_after, total_after = host_seconds()
    cpu = [cpu_seconds(p) - before for p, before in zip(processes, cpu_before)]
    rates = {test: sorted((r[test] for r in rounds), key=lambda t: t["rps"])[ROUNDS // 2] for test in rounds[0]}
    return {"tests": rates, "cpu-us": [c / (2 * REQUESTS * ROUNDS) * 1e6 for c in cpu],
            "host-busy": (busy_after - busy_before) / (total_after - total_before)}


def at_once(topo: Topology, addresses: tuple[str | None, ...]) -> list[dict[str, dict]]:
    """A redis-benchmark per address, all running at the same time."""
    results: list = [None] * len(addresses)

    def run(i: int) -> None:
        try:
            results[i] = redis_benchmark(topo, address=addresses[i])
        except RuntimeError as e:
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(addresses))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def guests_mean(results: list[dict[str, dict]]) -> dict[str, dict]:
    return {test: {key: sum(r[test][key] for r in results) / len(results) for key in results[0][test]}
            for test in results[0]}


class VerifyingClient(threading.Thread):
    """One TCP connection writing numbered keys (as tests/test_netfilter_failover.py's), with the
    time of every reply: the silences between replies are what a client sees of a failover."""

    def __init__(self, topo: Topology):
        super().__init__(daemon=True)
        self.topo = topo
        self.connect()
        self.acked = 0                          # key0 .. key{acked-1} were acknowledged
        self.replies: list[float] = []          # monotonic time of each reply
        self.latencies: list[float] = []        # seconds from request to reply
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def connect(self) -> None:
        with self.topo.client_sockets():
            self.conn = socket.create_connection((self.topo.guest_address, 6379), timeout=10)
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.conn.makefile("rb")

    def call(self, *words: bytes) -> bytes:
        self.conn.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        line = self.file.readline()
        if line.startswith(b"$") and line != b"$-1\r\n":
            return self.file.read(int(line[1:]) + 2)[:-2]
        return line.rstrip(b"\r\n")

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                sent = time.monotonic()
                reply = self.call(b"SET", b"key%d" % self.acked, b"value%d" % self.acked)
                now = time.monotonic()
                self.replies.append(now)
                self.latencies.append(now - sent)
                if reply != b"+OK":
                    self.errors.append(f"SET key{self.acked}: {reply!r}")
                    return
                self.acked += 1
        except OSError as e:
            self.errors.append(f"connection error after {self.acked} writes: {e}")

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)

    def keys_present(self) -> int:
        """How many acknowledged keys read back with their value (after stop()), on the same
        connection unless it broke."""
        if self.errors:
            self.conn.close()
            self.connect()
        return sum(self.call(b"GET", b"key%d" % i) == b"value%d" % i for i in range(self.acked))

    def longest_gap(self, since: float, until: float) -> float:
        """The longest silence between ``since`` and ``until``, replies in between splitting it."""
        times = [since] + [t for t in self.replies if since < t < until] + [until]
        return max(b - a for a, b in zip(times, times[1:]))

    def single_connection(self, until: float = float("inf")) -> dict:
        """ops/s, latency percentiles (ms) and silences of STALL_S or more, up to ``until``."""
        times = [t for t in self.replies if t <= until]
        chosen = sorted(self.latencies[:len(times)])
        return {"rps": (len(times) - 1) / (times[-1] - times[0]),
                "p50": chosen[len(chosen) // 2] * 1000, "p99": chosen[int(len(chosen) * 0.99)] * 1000,
                "stalls": sum(b - a >= STALL_S for a, b in zip(times, times[1:]))}


def checkpoints_total(primary: Node | None) -> int:
    return primary.status()["colo"]["checkpoints-total"] if primary is not None else 0


async def single_client(topo: Topology, primary: Node | None = None) -> dict:
    """The verifying client alone for CLIENT_SECONDS, with the checkpoints taken meanwhile."""
    before = checkpoints_total(primary)
    client = VerifyingClient(topo)
    client.start()
    await asyncio.sleep(CLIENT_SECONDS)
    client.stop()
    client.conn.close()
    return {**client.single_connection(), "checkpoints": checkpoints_total(primary) - before}


async def colo_exit(listener, timeout: float = 10) -> dict:
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        if event["event"] == "COLO_EXIT":
            return event["data"]


async def kill_primary(a: Node, b: Node, topo: Topology, load_requests: int = 0) -> dict:
    """SIGKILL to the primary daemon while a verifying client (and, with ``load_requests``,
    redis-benchmark) runs; what the client saw, and whether its keys survived."""
    checkpoints_before = checkpoints_total(a)
    client = VerifyingClient(topo)
    client.start()
    load = asyncio.create_task(asyncio.to_thread(redis_benchmark, topo, load_requests)) if load_requests else None
    await asyncio.sleep(CLIENT_SECONDS)
    acked_before = client.acked
    checkpoints = checkpoints_total(a) - checkpoints_before
    with b.qmp.listener("COLO_EXIT") as exits:
        killed = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        exit_data = await colo_exit(exits)
        took_over = time.monotonic()
    await asyncio.sleep(CLIENT_SECONDS)
    load_result = None
    if load is not None:
        try:
            load_result = await load
        except RuntimeError as e:
            load_result = str(e)
    client.stop()
    last_before = max((t for t in client.replies if t <= killed), default=killed)
    first_after_takeover = next((t for t in client.replies if t >= took_over), time.monotonic())
    present = client.keys_present()
    client.conn.close()
    return {"carried-on": not client.errors and client.acked > acked_before + 10,
            "errors": client.errors, "colo-exit": exit_data, "takeover-s": took_over - killed,
            "gap-s": client.longest_gap(last_before, first_after_takeover),
            "longest-gap-s": client.longest_gap(client.replies[0], client.replies[-1]),
            "acked": client.acked, "present": present, "load": load_result,
            "single": {**client.single_connection(until=killed), "checkpoints": checkpoints}}


async def filters_up(primary: Node, timeout: float = 10) -> dict:
    """The primary's COLO status once its network layer runs (it starts just after COLO does)."""
    deadline = time.monotonic() + timeout
    while (status := primary.status()["colo"])["netfilter"] is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the COLO network layer did not start on the primary")
        await asyncio.sleep(0.05)
    return status


def pin(nodes: list[Node]) -> None:
    """Node i's daemon, every thread of it, onto CPU i: each node a host of its own."""
    for cpu, node in enumerate(nodes):
        subprocess.run(["taskset", "--all-tasks", "--pid", "--cpu-list", str(cpu), str(node.proc.pid)],
                       check=True, capture_output=True)


async def unprotected(topo: Topology, workdir: str, pinned: bool = False) -> dict:
    node = Node(topo, "a", workdir, kvstore_args(topo))
    try:
        await node.connect()
        await wait_listening(node)
        if pinned:
            pin([node])
        figures = await asyncio.to_thread(loaded, topo, [node])
        figures["single"] = await single_client(topo)
        return figures
    finally:
        await node.close()


async def two_unprotected(topo: Topology, workdir: str) -> dict:
    """Two unprotected guests at once, node a's and node b's (each with an address and a MAC of
    its own), each loaded like the unprotected one: what this host's CPUs give a guest when
    they run two, as they do under COLO with both nodes on them."""
    second = topo.guest_address.rsplit(".", 1)[0] + f".{topo.GUEST_LAST_OCTET + 1}"
    a = Node(topo, "a", workdir, kvstore_args(topo))
    b = Node(topo, "b", workdir, ["--guest", "kvstore", "-m", "64", "--append", f"ip={second}/24 gw={topo.client_address}",
                                  "--nic", f"tap=tap0,bridge=br0,mac={SECOND_MAC}"])
    try:
        for node in (a, b):
            await node.connect()
            await wait_listening(node)
        return await asyncio.to_thread(loaded, topo, [a, b], (None, second))
    finally:
        await b.close()
        await a.close()


def tls_configs(topo: Topology, workdir: str) -> tuple[list[str], list[str]]:
    """Node configs with TLS on every COLO channel (docs/security.md): a the client, b the server."""
    pki = os.path.join(workdir, "pki")
    make_certs(pki, [topo.nodes["b"].address], "/O=colo-appliance/CN=node-a")
    configs = {"a": f'[tls-creds.tls0]\ndir = "{pki}"\nendpoint = "client"\n\n[migration]\ntls_creds = "tls0"\n',
               "b": f'[tls-creds.tls0]\ndir = "{pki}"\nendpoint = "server"\nverify-peer = true\n\n'
                    '[authz.auth0]\nidentities = ["CN=node-a,O=colo-appliance"]\n\n'
                    '[migration]\ntls_creds = "tls0"\ntls_authz = "auth0"\n'}
    flags = []
    for node, text in configs.items():
        path = os.path.join(workdir, f"{node}-tls.toml")
        with open(path, "w") as f:
            f.write(text)
        flags.append(["--config", path])
    return flags[0], flags[1]


async def protected(topo: Topology, workdir: str, delay_ms: int, failover: bool, load_requests: int = 0,
                    pinned: bool = False, tls: bool = False) -> dict:
    """Under COLO at ``delay_ms``; with ``failover``, the primary is killed at the end (with
    ``load_requests``, while redis-benchmark runs too); with ``pinned``, a CPU per node; with
    ``tls``, TLS on the COLO connection and the packet channel."""
    a_args, b_args = tls_configs(topo, workdir) if tls else ((), ())
    a, b = await colo_pair(topo, workdir, kvstore_args(topo), delay_ms, a_args, b_args)
    try:
        before = await filters_up(a)
        if pinned:
            pin([a, b])
        figures = await asyncio.to_thread(loaded, topo, [a, b])
        after = a.status()["colo"]
        figures.update(delay=delay_ms, tls=tls, checkpoints={reason: after["checkpoints"][reason] - before["checkpoints"][reason]
                                                    for reason in after["checkpoints"]},
                       pause_p99=after["pause-ms"]["p99"],
                       compare={key: after["netfilter"]["tcp"][key] - before["netfilter"]["tcp"][key]
                                for key in ("mismatches", "timeouts", "dropped")})
        if failover:
            figures["failover"] = await kill_primary(a, b, topo, load_requests)
            figures["single"] = figures["failover"]["single"]
        else:
            figures["single"] = await single_client(topo, a)
        return figures
    finally:
        await b.close()
        await a.close()


def measure(workdir: str) -> tuple[dict, dict, list[dict], dict, dict]:
    # pyroute2's namespace calls run their own event loop: each topology is made outside ours.
    def fresh_topology() -> Topology:
        return Topology(f"cnb{os.getpid() % 10000}", ["a", "b"])
    with fresh_topology() as topo:
        baseline = asyncio.run(unprotected(topo, workdir))
    with fresh_topology() as topo:
        two_guests = asyncio.run(two_unprotected(topo, workdir))
    rows = []
    for delay in DELAYS_MS:
        with fresh_topology() as topo:
            rows.append(asyncio.run(protected(topo, workdir, delay, failover=delay == FAILOVER_DELAY_MS)))
    with fresh_topology() as topo:
        rows.append(asyncio.run(protected(topo, workdir, FAILOVER_DELAY_MS, failover=False, tls=True)))
    with fresh_topology() as topo:
        pinned_baseline = asyncio.run(unprotected(topo, workdir, pinned=True))
    with fresh_topology() as topo:
        pinned_row = asyncio.run(protected(topo, workdir, FAILOVER_DELAY_MS, failover=False, pinned=True))
    return baseline, two_guests, rows, pinned_baseline, pinned_row


def throughput_rows(configurations: list[tuple[str, dict]], baseline: dict) -> list[str]:
    out = []
    for name, figures in configurations:
        cpu = " + ".join(f"{c:.0f}" for c in figures["cpu-us"])
        for test in ("SET", "GET"):
            t = figures["tests"][test]
            ratio = t["rps"] / baseline["tests"][test]["rps"]
            out.append(f"| {name} | {test} | {t['rps']:,.0f} | {ratio:.2f} | {t['p50']:.2f} | {t['p99']:.2f} | "
                       f"{cpu} | {figures['host-busy']:.0%} |")
    return out


def colo_name(row: dict) -> str:
    return f"COLO, x-checkpoint-delay {row['delay']} ms" + (", TLS channels" if row["tls"] else "")


def worst_ratio(row: dict, baseline: dict) -> float:
    return min(row["tests"][t]["rps"] / baseline["tests"][t]["rps"] for t in ("SET", "GET"))


def markdown(baseline: dict, two_guests: dict, rows: list[dict], pinned_baseline: dict, pinned_row: dict) -> str:
    out = [HEADING, "",
           f"`bench/colo_net_bench.py` on {machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}:",
           "kvstore (64 MiB) on node daemons in network namespaces, every client in the client namespace.",
           "*Unprotected* is the same guest on one node without COLO, measured in the same run; under COLO",
           "the primary and the secondary daemon share the host's CPUs. redis-benchmark: SET and GET,",
           f"{REQUESTS:,} requests, {CLIENTS} clients, unpipelined, the median of {ROUNDS} runs. *CPU/request* is",
           "the node daemons' CPU time over the requests (primary + secondary under COLO; for two guests,",
           "each over its own guest's); *host busy* the share of all the host's CPUs in use during the",
           "run. *TLS channels*: TLS (docs/security.md) on the COLO connection and the",
           "packet channel, whose frames the C datapath hands to Python's ssl through a relay.", "",
           "| configuration | test | ops/s | / unprotected | p50 ms | p99 ms | CPU/request µs | host busy |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    configurations = [("unprotected", baseline)] + [(colo_name(r), r) for r in rows]
    out += throughput_rows(configurations[:1] + [("two unprotected guests at once, per guest", two_guests)]
                           + configurations[1:], baseline)
    floor_row = next(r for r in rows if r["delay"] == FAILOVER_DELAY_MS and not r["tls"])
    colo_cpu, two_cpu = sum(floor_row["cpu-us"]), sum(two_guests["cpu-us"])
    out += ["", "*Two unprotected guests at once* is node a's and node b's guest side by side, each with its own",
            "redis-benchmark as above, all on the same two CPUs: the work COLO gives these CPUs, a primary and a",
            "secondary guest, without COLO (rates and latencies: the two guests' mean; the second",
            "redis-benchmark's CPU comes out of the same two CPUs, where COLO has one).  Under COLO at",
            "{} ms a guest gets {:.2f}x what it gets there.  Side by side, each guest's daemon spends {:.0f} µs".format(
                FAILOVER_DELAY_MS, worst_ratio(floor_row, two_guests), max(two_guests["cpu-us"])),
            "per request against {:.0f} alone (four busy threads, two vCPUs and two NIC threads, preempting".format(
                baseline["cpu-us"][0]),
            "each other on two CPUs); COLO's two spend {:.0f} µs per request against the pair's {:.0f}, the rest".format(
                colo_cpu, two_cpu),
            "being COLO's own work (channel, comparer, rewriter, checkpoints).  So on one 2-CPU host most of",
            "the gap to unprotected is the guest run twice, and the ratio moves with how fast the lone",
            "unprotected guest happens to be.",
            "",
            "The same with each node's daemon on a CPU of its own (`taskset`: the unprotected node and the",
            "primary on CPU 0, the secondary on CPU 1), as when each node is a host.  redis-benchmark is not",
            "pinned: under COLO it shares with the secondary.", "",
            "| configuration | test | ops/s | / unprotected | p50 ms | p99 ms | CPU/request µs | host busy |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    out += throughput_rows([("unprotected, one CPU", pinned_baseline),
                            (f"COLO, x-checkpoint-delay {pinned_row['delay']} ms, a CPU per node", pinned_row)],
                           pinned_baseline)

    out += ["", "Checkpoints during the redis-benchmark run by reason, the primary's pause p99, and what the",
            "comparer counted on TCP meanwhile:", "",
            "| x-checkpoint-delay ms | periodic | request | mismatch | pause p99 ms | mismatches | timeouts "
            "| dropped |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, f = r["checkpoints"], r["compare"]
        out.append(f"| {r['delay']}{' (TLS)' if r['tls'] else ''} | {c['periodic']} | {c['request']} | {c['mismatch']} | {r['pause_p99']:.1f} | "
                   f"{f['mismatches']} | {f['timeouts']} | {f['dropped']} |")

    out += ["", f"One verifying client alone for {CLIENT_SECONDS:.0f} s (one connection, one SET at a time); "
            "a *stall* is a", f"silence of {STALL_S * 1000:.0f} ms or more between two replies:", "",
            "| configuration | ops/s | p50 ms | p99 ms | stalls | checkpoints meanwhile |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, figures in configurations:
        single = figures["single"]
        out.append(f"| {name} | {single['rps']:,.0f} | {single['p50']:.2f} | {single['p99']:.2f} | "
                   f"{single['stalls']} | {single['checkpoints']} |")

    failover = next(r["failover"] for r in rows if "failover" in r)
    out += ["", f"Failover at x-checkpoint-delay {FAILOVER_DELAY_MS} ms: SIGKILL to the primary daemon while "
            "the verifying client",
            "writes. *Silence around the failover* is the longest time without a reply from the last reply",
            "before the kill to the first after the secondary's COLO_EXIT (a segment lost with the primary",
            "is retransmitted by Linux after 200 ms at the earliest).", "",
            "| SIGKILL -> COLO_EXIT on the secondary | client's connection | silence around the failover "
            "| longest silence in the run | acknowledged keys present |",
            "|---:|---|---:|---:|---:|",
            f"| {failover['takeover-s'] * 1000:.0f} ms ({failover['colo-exit']['reason']}) | "
            f"{'carried on' if failover['carried-on'] else 'broke: ' + '; '.join(failover['errors'])} | "
            f"**{failover['gap-s'] * 1000:.0f} ms** | {failover['longest-gap-s'] * 1000:.0f} ms | "
            f"{failover['present']:,} of {failover['acked']:,} |"]

    ratio, pinned_ratio = worst_ratio(floor_row, baseline), worst_ratio(pinned_row, pinned_baseline)
    alone_cpu = baseline["cpu-us"][0]
    verdict = {True: "met", False: "**missed**"}
    out += ["", f"Floors: under COLO at {FAILOVER_DELAY_MS} ms at least {FLOOR_RATIO}x the unprotected ops/s, "
            f"each node a host (a CPU per node): {verdict[pinned_ratio >= FLOOR_RATIO]} ({pinned_ratio:.2f}x at "
            f"worst), and with both nodes on the same two CPUs {verdict[ratio >= FLOOR_RATIO]} ({ratio:.2f}x at worst, "
            f"where two unprotected guests get {worst_ratio(two_guests, baseline):.2f}x); client-seen failover under "
            f"{FLOOR_GAP_S:.0f} s: {verdict[failover['gap-s'] < FLOOR_GAP_S]}; every acknowledged key kept: "
            f"{verdict[failover['present'] == failover['acked']]}.",
            "",
            f"Where the CPU goes at {FAILOVER_DELAY_MS} ms: the two daemons spend {colo_cpu:.0f} µs per request "
            f"against {alone_cpu:.0f} µs unprotected ({colo_cpu / alone_cpu:.1f}x: the SVM repeats the guest's "
            "work, and every client frame and both guests' replies cross the packet channel and the comparer, "
            "run in C by each node's NIC thread), "
            f"with the host's CPUs {floor_row['host-busy']:.0%} busy against {baseline['host-busy']:.0%}."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        section = markdown(*measure(workdir))
    print(section)
    if args.write:
        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
