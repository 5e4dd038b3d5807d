"""/metrics as Prometheus reads it (prometheus_client's own text parser), each figure checked
against what the test itself did or measured: migrations by outcome and their bytes, the guest
NIC's counters against the tap's kernel counters, hypercall exits and vCPU time against the
daemon's CPU time; and label values that need escaping stay one valid sample."""
import asyncio
import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import NetNS
from qemu.qmp import QMPClient

from appliance.netns import Topology, inside
from conftest import free_port, start_daemon, stop_daemon
from test_migration_nodes import kvstore_args, wait_console

pytestmark = [pytest.mark.kvm]
MEMDIRTY = ["--guest", "memdirty", "-m", "32", "--append", "mib=8 rate=0"]    # rate=0: dirties flat out, a busy vCPU
WEIRD = 'we"ird\\node'                 # a quote and a backslash: both must be escaped in a label value


def scrape(daemon, namespace: str | None = None) -> dict:
    """{(sample name, frozenset of labels): value}, parsed by prometheus_client."""
    request = urllib.request.Request(f"http://{daemon.http}/metrics", headers=daemon.auth)
    if namespace:
        with inside(namespace):
            text = urllib.request.urlopen(request, timeout=10).read().decode()
    else:
        text = urllib.request.urlopen(request, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


async def wait_status(qmp, status, timeout=60):
    deadline = time.monotonic() + timeout
    while (info := await qmp.execute("query-migrate")).get("status") != status:
        assert time.monotonic() < deadline and info.get("status") not in ("failed", "cancelled", "completed"), info
        await asyncio.sleep(0.05)
    return info


async def test_migration_counters_bytes_and_escaped_node_name(tmp_path):
    port = free_port()
    src = start_daemon(tmp_path, *MEMDIRTY, name=WEIRD)
    dst = start_daemon(tmp_path, *MEMDIRTY, "--incoming", f"tcp:127.0.0.1:{port}", name="dst")
    a, b = QMPClient("src"), QMPClient("dst")
    try:
        await a.connect(src.qmp)
        await b.connect(dst.qmp)
        before = scrape(src)
        assert value(before, "colo_appliance_up") == 1
        assert {labels for (name, labels) in before if name == "colo_appliance_up"} == {frozenset({("node", WEIRD)})}
        assert value(before, "colo_appliance_run_state", colo_appliance_run_state="running") == 1
        assert value(before, "colo_appliance_run_state", colo_appliance_run_state="paused") == 0
        assert value(before, "colo_appliance_migrations_total", direction="outgoing", outcome="completed") == 0
        assert value(before, "colo_appliance_node_info", image=os.path.realpath(
            os.path.join(os.path.dirname(__file__), "..", "build", "guest", "memdirty.elf"))) == 1

        await a.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await wait_status(a, "completed")
        await wait_status(b, "completed")
        sent, received = scrape(src), scrape(dst)
        assert value(sent, "colo_appliance_migrations_total", direction="outgoing", outcome="completed") == 1
        assert value(sent, "colo_appliance_migration_sent_bytes_total") == info["ram"]["transferred"]
        assert value(received, "colo_appliance_migrations_total", direction="incoming", outcome="completed") == 1
        # The destination counts what its sockets read: the source's bytes, framing included.
        assert 0.95 * info["ram"]["transferred"] <= value(received, "colo_appliance_migration_received_bytes_total") \
            <= 1.2 * info["ram"]["transferred"]
        assert value(sent, "colo_appliance_run_state", colo_appliance_run_state="postmigrate") == 1

        await a.execute("migrate", {"uri": f"tcp:127.0.0.1:{free_port()}"})      # nobody listens
        await wait_status(a, "failed")
        after = scrape(src)
        assert value(after, "colo_appliance_migrations_total", direction="outgoing", outcome="failed") == 1
        assert value(after, "colo_appliance_migrations_total", direction="outgoing", outcome="completed") == 1
        assert value(after, "colo_appliance_migration_sent_bytes_total") == info["ram"]["transferred"]

        # The VMM's work: memdirty's guest asks the time as it goes, and dirtied its pages flat out
        # on the source's vCPU until the switchover; that time is part of the daemon's CPU time.
        assert value(after, "colo_appliance_hypercall_exits_total", hypercall="time") > 0
        vcpu = value(after, "colo_appliance_vcpu_seconds_total")
        assert 0.05 < vcpu <= value(after, "process_cpu_seconds_total")
    finally:
        for client in (a, b):
            await client.disconnect()
        stop_daemon(src)
        stop_daemon(dst)


@pytest.fixture
def topo():
    t = Topology(f"met{os.getpid() % 100000}", ["a"])
    yield t
    t.close()


def tap_stats(namespace: str) -> dict:
    with NetNS(namespace) as ns:
        link = ns.get_links(ns.link_lookup(ifname="tap0")[0])[0]
        return dict(link.get_attr("IFLA_STATS64"))


@pytest.mark.netns
async def test_guest_nic_counters_equal_the_taps_own(topo, guest_images, tmp_path):
    """The tap's kernel counters are the other end of the same frames: what the guest sent (tx)
    the tap received, what the guest read (rx) the tap delivered to the VMM."""
    d = start_daemon(tmp_path, *kvstore_args(topo), name="nic", namespace=topo.nodes["a"].namespace)
    qmp = QMPClient("nic")
    try:
        await qmp.connect(d.qmp)
        await wait_console(qmp, "listening")
        with topo.client_sockets():
            conn = socket.create_connection((topo.guest_address, 6379), timeout=20)
        for i in range(100):
            conn.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (len(b"%d" % i), b"%d" % i))
            assert conn.recv(100) == b"+OK\r\n"
        conn.close()
        deadline = time.monotonic() + 5
        while True:                                  # until the last frames (FINs, ACKs) have been read
            samples = await asyncio.to_thread(scrape, d, topo.nodes["a"].namespace)
            tap = await asyncio.to_thread(tap_stats, topo.nodes["a"].namespace)  # pyroute2 runs a loop of its own
            rx = value(samples, "colo_appliance_guest_nic_frames_total", direction="rx")
            tx = value(samples, "colo_appliance_guest_nic_frames_total", direction="tx")
            if (tx, rx) == (tap["rx_packets"], tap["tx_packets"] - tap["tx_dropped"]) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert rx >= 100 and tx >= 100
        assert tx == tap["rx_packets"] and rx == tap["tx_packets"] - tap["tx_dropped"], (samples, tap)
        assert value(samples, "colo_appliance_guest_nic_bytes_total", direction="tx") == tap["rx_bytes"]
        assert value(samples, "colo_appliance_guest_nic_bytes_total", direction="rx") == tap["tx_bytes"]
        assert value(samples, "colo_appliance_guest_nic_dropped_total", direction="tx") == 0
        # The frames went through the NIC rings: one hypercall set them up, none moved a frame.
        assert value(samples, "colo_appliance_hypercall_exits_total", hypercall="net_setup") == 1
        assert value(samples, "colo_appliance_hypercall_exits_total", hypercall="net_write_v1") == 0
    finally:
        await qmp.disconnect()
        stop_daemon(d)
