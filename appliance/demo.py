"""``make demo``: kvstore on a node, loaded with redis-benchmark, live-migrated to another node;
then kvstore under COLO losing its primary under load; then a COLO drill.

    1. network namespaces: a client and two nodes (appliance.netns)
    2. node A boots the kvstore guest; node B waits for an incoming migration
    3. redis-benchmark from the client namespace measures kvstore
    4. the same benchmark runs again while the guest migrates from A to B
    5. a report: ops/s before and during, the migration's figures, client errors (none)
    6. kvstore under COLO on two fresh nodes (bench/colo_net_bench.py's steps): redis-benchmark
       unprotected and under COLO, each node's daemon on a CPU of its own as if each node were a
       host, then the primary daemon killed (SIGKILL) while redis-benchmark
       and a verifying client (one connection, numbered keys) run; a report: whether the
       client's connection carried on, the longest silence between two replies, every
       acknowledged key read back, ops/s unprotected vs under COLO, checkpoints by reason
    7. a COLO drill on three fresh memdirty nodes (appliance.drill): A protected by B, A killed,
       B takes over and is protected again onto C
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from .cli import SyncQMPClient, progress_line
from .drill import DrillPlan, run_drill
from .netns import Topology

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
PORT = 4444
COLO_DELAY_MS = 1000
COLO_LOAD_REQUESTS = 20000      # redis-benchmark across the failover: several seconds under COLO
MEMDIRTY = ["--guest", "memdirty", "-m", "64", "--append", "mib=16 rate=40"]


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def kvstore_args(topo: Topology) -> list[str]:
    return ["--guest", "kvstore", "-m", "64", "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
            "--nic", "tap=tap0,bridge=br0"]


class Node:
    def __init__(self, topo: Topology, name: str, workdir: str, guest: list[str], *extra: str):
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        argv = [sys.executable, "-m", "appliance.cli", "serve", "--name", name, "--qmp", self.qmp_path,
                "--no-http", "--state-dir", workdir, *guest, *extra]
        self.proc = subprocess.Popen(topo.in_namespace(topo.nodes[name].namespace, argv),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start; see {self.log.name}")
            time.sleep(0.05)
        self.qmp = SyncQMPClient(self.qmp_path)

    def execute(self, command: str, arguments: dict | None = None):
        reply = self.qmp.execute(command, arguments)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {command}: {reply['error']['desc']}")
        return reply["return"]

    def wait_console(self, text: str, timeout: float = 30) -> None:
        seen, deadline = "", time.monotonic() + timeout
        while text not in seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: no {text!r} on the guest console")
            seen += self.execute("ringbuf-read", {"device": "console", "size": 65536})
            time.sleep(0.05)

    def stop(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def redis_benchmark(topo: Topology, requests: int) -> tuple[dict[str, float], str]:
    """ops/s per test, and everything redis-benchmark printed."""
    result = topo.run_client(["redis-benchmark", "-h", topo.guest_address, "-q", "-n", str(requests),
                              "-c", "20", "-t", "set,get"], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    rates = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^(SET|GET): ([\d.]+) requests per second", output.replace("\r", "\n"), re.M)}
    if result.returncode != 0 or len(rates) != 2:
        raise RuntimeError(f"redis-benchmark failed:\n{output}")
    return rates, output


def migration_demo(workdir: str) -> bool:
    say(f"creating network namespaces (logs in {workdir})")
    topo = Topology(f"demo{os.getpid() % 10000}", ["a", "b"])
    nodes: list[Node] = []
    try:
        say("node a: booting the kvstore guest")
        a = Node(topo, "a", workdir, kvstore_args(topo))
        nodes.append(a)
        a.wait_console("listening")
        say("node b: waiting for an incoming migration")
        b = Node(topo, "b", workdir, kvstore_args(topo), "--incoming", "defer")
        nodes.append(b)
        for node in (a, b):
            node.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        b.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{PORT}"})
        a.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 100})

        say(f"redis-benchmark against kvstore at {topo.guest_address} (on node a)")
        before, _ = redis_benchmark(topo, 20000)
        print(f"    SET {before['SET']:.0f} ops/s, GET {before['GET']:.0f} ops/s")

        say("redis-benchmark again, migrating the guest from node a to node b meanwhile")
        outcome: dict = {}
        bench = threading.Thread(target=lambda: outcome.update(zip(("rates", "output"),
                                                                    redis_benchmark(topo, 40000))))
        bench.start()
        time.sleep(0.5)
        a.execute("migrate", {"uri": f"tcp:{topo.nodes['b'].address}:{PORT}"})
        while True:
            info = a.execute("query-migrate")
            print("    " + progress_line(info), flush=True)
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        bench.join()
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
        if "rates" not in outcome:
            raise RuntimeError("redis-benchmark did not finish during the migration")
        errors = [line for line in outcome["output"].splitlines() if "error" in line.lower()]
        where_a = a.execute("query-status")["status"]
        where_b = b.execute("query-status")["status"]

        print()
        print("Report")
        print("------")
        print(f"  before migration : SET {before['SET']:>9.0f} ops/s   GET {before['GET']:>9.0f} ops/s")
        during = outcome["rates"]
        print(f"  during migration : SET {during['SET']:>9.0f} ops/s   GET {during['GET']:>9.0f} ops/s")
        print(f"  migration        : {info['status']} in {info['total-time']} ms, downtime {info['downtime']} ms, "
              f"{info['ram']['dirty-sync-count']} passes, {info['ram']['transferred'] / 2**20:.1f} MiB sent")
        print(f"  guest            : node a {where_a}, node b {where_b}")
        print(f"  client errors    : {len(errors)}")
        for line in errors:
            print(f"    {line}")
        print(json.dumps({"before": before, "during": during, "migration": info}), file=open(
            os.path.join(workdir, "report.json"), "w"))
        return not errors and where_b == "running"
    finally:
        for node in nodes:
            node.stop()
        topo.close()


def kvstore_colo_demo(workdir: str) -> bool:
    """The COLO network layer at work: a client's connection outlives the primary."""
    sys.path.insert(0, BENCH)
    import colo_net_bench as bench      # the benchmark's steps, run once here with a report

    workdir = os.path.join(workdir, "colo")
    os.mkdir(workdir)
    say(f"kvstore under COLO: two fresh nodes in fresh namespaces (logs in {workdir})")
    # pyroute2's namespace calls run their own event loop: the topology is made outside ours.
    with Topology(f"kvcolo{os.getpid() % 10000}", ["a", "b"]) as topo:
        pinned = len(os.sched_getaffinity(0)) >= 2
        say("each node's daemon runs on a CPU of its own (taskset), as if each node were a host" if pinned
            else "one CPU: both nodes' daemons share it")
        say(f"redis-benchmark against kvstore unprotected (node a alone), {bench.REQUESTS} requests")
        alone = asyncio.run(bench.unprotected(topo, workdir, pinned=pinned))
        say(f"node a primary, node b secondary, x-checkpoint-delay {COLO_DELAY_MS} ms: redis-benchmark under COLO, "
            f"then SIGKILL to node a's daemon {bench.CLIENT_SECONDS:.0f} s into redis-benchmark and a verifying client")
        colo = asyncio.run(bench.protected(topo, workdir, COLO_DELAY_MS, failover=True,
                                           load_requests=COLO_LOAD_REQUESTS, pinned=pinned))
    failover = colo["failover"]
    all_present = failover["present"] == failover["acked"]

    print()
    print("Report")
    print("------")
    for test in ("SET", "GET"):
        unprotected_rps, colo_rps = alone["tests"][test]["rps"], colo["tests"][test]["rps"]
        print(f"  {test} ops/s        : unprotected {unprotected_rps:>7.0f}   under COLO {colo_rps:>7.0f}   "
              f"({colo_rps / unprotected_rps:.2f}x{', a CPU per node' if pinned else ''})")
    reasons = ", ".join(f"{reason} {count}" for reason, count in colo["checkpoints"].items())
    print(f"  checkpoints      : {reasons} (during the benchmark under COLO)")
    print(f"  takeover         : COLO_EXIT on node b {failover['takeover-s'] * 1000:.0f} ms after the SIGKILL "
          f"(reason {failover['colo-exit']['reason']})")
    print(f"  connection       : {'carried on' if failover['carried-on'] else 'BROKE'}"
          + "".join(f"; {error}" for error in failover["errors"]))
    print(f"  longest silence  : {failover['gap-s'] * 1000:.0f} ms around the failover, "
          f"{failover['longest-gap-s'] * 1000:.0f} ms in the whole run")
    print(f"  acknowledged keys: {failover['present']} of {failover['acked']} present afterwards")
    load = failover["load"]
    if isinstance(load, dict):
        print(f"  redis-benchmark  : finished across the failover (SET {load['SET']['rps']:.0f} ops/s, "
              f"GET {load['GET']['rps']:.0f} ops/s overall)")
    else:
        print(f"  redis-benchmark  : FAILED across the failover: {load.strip().splitlines()[-1]}")
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"unprotected": alone, "colo": colo}, f)
    return failover["carried-on"] and all_present and isinstance(load, dict)


def drill_demo(workdir: str) -> bool:
    """The drill an operator runs (colo-appliance drill), on three fresh memdirty nodes."""
    workdir = os.path.join(workdir, "drill")
    os.mkdir(workdir)
    say(f"COLO drill: three memdirty nodes in fresh namespaces (logs in {workdir})")
    topo = Topology(f"drill{os.getpid() % 10000}", ["a", "b", "c"])
    nodes: list[Node] = []
    try:
        for name in ("a", "b", "c"):
            incoming = ["--incoming", f"tcp:0.0.0.0:{PORT}"] if name != "a" else []
            nodes.append(Node(topo, name, workdir, MEMDIRTY, *incoming))
        nodes[0].wait_console("pass ")
        a, b, c = (node.qmp_path for node in nodes)
        to_b, to_c = (f"tcp:{topo.nodes[name].address}:{PORT}" for name in ("b", "c"))
        say(f"colo-appliance drill {a} {b} --to {to_b} --method kill --reprotect {c} --reprotect-to {to_c}")
        return run_drill(DrillPlan(primary=a, secondary=b, to=to_b, method="kill", reprotect=c,
                                   reprotect_to=to_c)) == 0
    finally:
        for node in reversed(nodes):    # secondaries first: a COLO primary is slow to stop beside its secondary
            node.stop()
        topo.close()


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, taps)", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="colo-demo-")
    migrated = migration_demo(workdir)
    protected = kvstore_colo_demo(workdir)
    drilled = drill_demo(workdir)
    return 0 if migrated and protected and drilled else 1


if __name__ == "__main__":
    sys.exit(main())
