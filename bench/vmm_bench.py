"""VMM and kvstore benchmarks, against baselines measured in the same run.

    python bench/vmm_bench.py [--write docs/benchmarks.md]

* hypercall exits per second (the probe guest calling the time hypercall in a loop);
* redis-benchmark (SET and GET, unpipelined and -P 16) from a client namespace against
  kvstore on a node, and against Debian's redis-server in the same node namespace, over
  the same bridge and veth: the ratio is kvstore's throughput over redis-server's;
* exits per request: the node's exits to the VMM (its /metrics counters
  colo_appliance_hypercall_exits_total) over each kvstore run, divided by the requests served;
* kvstore before the NIC rings (guest ABI v1, a hypercall exit per frame): the tree of
  V1_COMMIT, checked out from this repository's history into build/v1 and built there
  (its own venv and guests), run on the same path in the same run.
Each figure is the median of ROUNDS redis-benchmark runs: runs on a shared 2-CPU host swing.
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
ROUNDS = 3
V1_COMMIT = "9c7f07c^"      # the tree before guest ABI v2: kvstore as the guest I/O issue found it
V1_TREE = os.path.join(REPO, "build", "v1")


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


def start(argv, namespace_argv, log, env=None, cwd=None):
    return subprocess.Popen(namespace_argv(argv), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, cwd=cwd)


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


def median_rates(runs: list[dict[str, float]]) -> dict[str, float]:
    return {test: sorted(run[test] for run in runs)[len(runs) // 2] for test in runs[0]}


def v1_tree() -> str | None:
    """The tree before the rings, built (its venv and guests), or None when this checkout has
    no such history (not a git clone)."""
    if os.path.exists(os.path.join(V1_TREE, ".venv", ".installed")):
        return V1_TREE
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", V1_COMMIT + "^{commit}"],
                      capture_output=True).returncode != 0:
        return None
    if not os.path.exists(V1_TREE):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--force", "--detach", V1_TREE, V1_COMMIT],
                       check=True, capture_output=True)
    subprocess.run(["make", "-s", "-C", V1_TREE, "venv", "guests"], check=True, capture_output=True)
    return V1_TREE


def start_kvstore(tree: str, topo: Topology, workdir: str, log, token: str):
    """A node daemon of `tree` serving kvstore on tap0; returns once the guest listens."""
    node = topo.nodes["a"]
    console = os.path.join(workdir, "bench-console.log")
    if os.path.exists(console):
        os.unlink(console)           # a previous run's "listening" must not count
    python = sys.executable if tree == REPO else os.path.join(tree, ".venv", "bin", "python")
    proc = start([python, "-m", "appliance.cli", "serve", "--name", "bench", "--qmp",
                  os.path.join(workdir, "bench.qmp"), "--http", HTTP, "--state-dir", workdir, "--guest", "kvstore",
                  "-m", "128", "--append", f"ip={topo.guest_address}/24 gw={topo.client_address}",
                  "--nic", "tap=tap0,bridge=br0"], lambda argv: topo.in_namespace(node.namespace, argv), log,
                 {"COLO_APPLIANCE_HTTP_TOKEN": token}, cwd=tree)
    deadline = time.monotonic() + 30
    while not (os.path.exists(console) and "listening" in open(console).read()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"kvstore of {tree} did not start")
        time.sleep(0.1)
    return proc


def redis_comparison(workdir: str, v1: str | None) -> list[tuple]:
    """Per test and pipeline: kvstore, redis-server, kvstore before the rings (None when not
    measured), kvstore's exits per request."""
    topo = Topology(f"bench{os.getpid() % 10000}", ["a"])
    node = topo.nodes["a"]
    procs = []
    try:
        log = open(os.path.join(workdir, "bench-node.log"), "w")
        token = secrets.token_hex(16)
        procs.append(start(["redis-server", "--bind", node.address, "--port", "6379", "--save", "",
                            "--appendonly", "no", "--protected-mode", "no"],
                           lambda argv: topo.in_namespace(node.namespace, argv), log))
        kvstore = start_kvstore(REPO, topo, workdir, log, token)
        figures = {}
        for pipeline in (1, 16):
            exits_before = vm_exits(node.namespace, token)
            ours, theirs = [], []
            for _ in range(ROUNDS):
                ours.append(redis_rates(topo, topo.guest_address, 6379, pipeline))
                theirs.append(redis_rates(topo, node.address, 6379, pipeline))
            exits = (vm_exits(node.namespace, token) - exits_before) / (2 * REQUESTS * ROUNDS)
            figures[pipeline] = (median_rates(ours), median_rates(theirs), exits)
        stop(kvstore)
        before = {}
        if v1 is not None:
            v1_workdir = os.path.join(workdir, "v1")
            os.makedirs(v1_workdir, exist_ok=True)
            procs.append(start_kvstore(v1, topo, v1_workdir, log, token))
            before = {pipeline: median_rates([redis_rates(topo, topo.guest_address, 6379, pipeline)
                                              for _ in range(ROUNDS)]) for pipeline in (1, 16)}
        return [(test, pipeline, ours[test], theirs[test], before[pipeline][test] if before else None, exits)
                for pipeline, (ours, theirs, exits) in figures.items() for test in ("SET", "GET")]
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
           "Exits per request: the node's hypercall exits (its /metrics counters) over the kvstore runs (SET",
           f"and GET) per request.  *v1* is kvstore before the NIC rings (guest ABI v1, commit {V1_COMMIT}",
           "built from this repository's history), on the same path in the same run.  Every figure is the",
           f"median of {ROUNDS} runs:", "",
           "| test | pipeline | kvstore ops/s | redis-server ops/s | kvstore / redis-server | v1 ops/s "
           "| kvstore / v1 | exits / request |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for test, pipeline, ours, theirs, before, exits_per_request in rows:
        v1 = ("not measured (no git history)", "-") if before is None else (f"{before:,.0f}", f"{ours / before:.1f}x")
        out.append(f"| {test} | {pipeline} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | {v1[0]} | {v1[1]} "
                   f"| {exits_per_request:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    args = parser.parse_args()
    workdir = os.path.join(REPO, "build", "bench")
    os.makedirs(workdir, exist_ok=True)
    section = markdown(exits_per_second(), redis_comparison(workdir, v1_tree()))
    print(section)
    if args.write:
        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
