"""VMM and kvstore benchmarks, against baselines measured in the same run.

    python bench/vmm_bench.py [--write docs/benchmarks.md]

* hypercall exits per second (the probe guest calling the time hypercall in a loop);
* redis-benchmark (SET and GET, unpipelined and -P 16) from a client namespace against
  kvstore on a node, and against Debian's redis-server in the same node namespace, over
  the same bridge and veth: the ratio is kvstore's throughput over redis-server's;
* exits per request: the node's exits to the VMM (its /metrics counters
  colo_appliance_hypercall_exits_total) over each kvstore run, divided by the requests served.
"""
import argparse
import os
import re
import secrets
import urllib.request
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from appliance.netns import Topology, inside  # noqa: E402
from appliance.vmm import VirtualMachine, VMConfig  # noqa: E402
from report import machine, write_section  # noqa: E402

HEADING = "## VMM and kvstore"
GUESTS = os.path.join(REPO, "build", "guest")
REQUESTS = 50000
HTTP = "127.0.0.1:18080"  # inside the node namespace
# kvstore on guest ABI v1 (a hypercall exit per frame): docs/benchmarks.md, 2026-11-25, idle AMD EPYC, 2 CPUs
KVSTORE_BEFORE_RINGS = {("SET", 1): 11450, ("GET", 1): 10511, ("SET", 16): 166667, ("GET", 16): 155763}


def exits_per_second() -> int:
    with VirtualMachine(VMConfig(image=os.path.join(GUESTS, "probe.elf"), cmdline="mode=hcbench")) as vm:
        vm.start()
        deadline = time.monotonic() + 60
        while "calls/s" not in vm.read_console():
            if time.monotonic() > deadline:
                raise RuntimeError("the probe guest did not report")
            time.sleep(0.05)
        return int(re.search(r"(\d+) calls/s", vm.read_console()).group(1))


def redis_rates(topo: Topology, host: str, port: int, pipeline: int) -> dict[str, float]:
    result = topo.run_client(["redis-benchmark", "-h", host, "-p", str(port), "-q", "-n", str(REQUESTS),
                              "-P", str(pipeline), "-t", "set,get"], capture_output=True, text=True, timeout=600)
    text = (result.stdout + result.stderr).replace("\r", "\n")
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(SET|GET): ([\d.]+) requests per second",
                                                                text, re.M)}
    if result.returncode != 0 or len(rates) != 2:
        raise RuntimeError(f"redis-benchmark failed:\n{text}")
    return rates


def start(argv, namespace_argv, log, env=None):
    return subprocess.Popen(namespace_argv(argv), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def vm_exits(namespace: str, token: str) -> int:
    """The node's exits to the VMM (colo_appliance_hypercall_exits_total, all hypercalls), from
    its /metrics inside the namespace."""
    request = urllib.request.Request(f"http://{HTTP}/metrics", headers={"Authorization": f"Bearer {token}"})
    with inside(namespace):
        text = urllib.request.urlopen(request, timeout=10).read().decode()
    counts = re.findall(r"^colo_appliance_hypercall_exits_total\{[^}]*\} ([\d.e+]+)", text, re.M)
    if not counts:
        raise RuntimeError("the node's /metrics has no hypercall exit counters")
    return int(sum(float(count) for count in counts))


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_comparison(workdir: str) -> list[tuple]:
    topo = Topology(f"bench{os.getpid() % 10000}", ["a"])
    node = topo.nodes["a"]
    procs = []
    try:
        in_node = lambda argv: topo.in_namespace(node.namespace, argv)  # noqa: E731
        log = open(os.path.join(workdir, "bench-node.log"), "w")
        qmp = os.path.join(workdir, "bench.qmp")
        console = os.path.join(workdir, "bench-console.log")
        if os.path.exists(console):
            os.unlink(console)           # a previous run's "listening" must not count
        token = secrets.token_hex(16)
        procs.append(start([sys.executable, "-m", "appliance.cli", "serve", "--name", "bench", "--qmp", qmp,
                            "--http", HTTP, "--state-dir", workdir, "--guest", "kvstore", "-m", "128",
                            "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
                            "--nic", "tap=tap0,bridge=br0"], in_node, log, {"COLO_APPLIANCE_HTTP_TOKEN": token}))
        procs.append(start(["redis-server", "--bind", node.address, "--port", "6379", "--save", "",
                            "--appendonly", "no", "--protected-mode", "no"], in_node, log))
        deadline = time.monotonic() + 30
        while not (os.path.exists(console) and "listening" in open(console).read()):
            if time.monotonic() > deadline:
                raise RuntimeError("kvstore did not start")
            time.sleep(0.1)
        time.sleep(0.5)                      # redis-server binds within this
        rows = []
        for pipeline in (1, 16):
            exits_before = vm_exits(node.namespace, token)
            ours = redis_rates(topo, topo.guest_address, 6379, pipeline)
            exits = (vm_exits(node.namespace, token) - exits_before) / (2 * REQUESTS)
            theirs = redis_rates(topo, node.address, 6379, pipeline)
            for test in ("SET", "GET"):
                rows.append((test, pipeline, ours[test], theirs[test], exits))
        return rows
    finally:
        for proc in procs:
            stop(proc)
        topo.close()


def markdown(exits: int, rows: list) -> str:
    out = [HEADING, "",
           f"`bench/vmm_bench.py` on {machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}. The guest runs",
           "entirely at CPL3 on kvm_pvm; a hypercall is a port-I/O exit handled in Python, but frames",
           "travel through the NIC rings (guest ABI v2) and the clock page, which need no exit.", "",
           f"Hypercall exits: **{exits:,} per second** (the probe guest calling the time hypercall in a loop).",
           "", f"redis-benchmark, {REQUESTS:,} requests, 50 clients, from the client namespace; the baseline is",
           "Debian's redis-server in the same node namespace, reached over the same bridge and veth.",
           "Exits per request: the node's hypercall exits (its /metrics counters) over the kvstore run (SET",
           "and GET) per request.  \"vs v1\" is kvstore over its figure before the rings (guest ABI v1,",
           "this bench on 2026-11-25 on an idle AMD EPYC: another machine, so a rough ratio; the ratio",
           "to redis-server is measured in this run):", "",
           "| test | pipeline | kvstore ops/s | redis-server ops/s | kvstore / redis-server | vs v1 | exits / request |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for test, pipeline, ours, theirs, exits_per_request in rows:
        before = KVSTORE_BEFORE_RINGS[(test, pipeline)]
        versus = f"{ours / before:.1f}x"
        out.append(f"| {test} | {pipeline} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | {versus} "
                   f"| {exits_per_request:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    args = parser.parse_args()
    workdir = os.path.join(REPO, "build", "bench")
    os.makedirs(workdir, exist_ok=True)
    section = markdown(exits_per_second(), redis_comparison(workdir))
    print(section)
    if args.write:
        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
