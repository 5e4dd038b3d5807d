"""The node's Prometheus metrics: custom prometheus_client collectors that read the node's
state at each scrape (nothing is copied or updated on the hot paths), rendered by
prometheus_client in the text format, which escapes every label value.

    colo_appliance_up, _node_info, _run_state (a state set), _vm_running  the node and its guest
    colo_appliance_migration_*          the current or last migration (as query-migrate)
    colo_appliance_migrations_total     finished migrations by direction and outcome
    colo_appliance_migration_{sent,received}_bytes_total   every migration's bytes, this process
    colo_appliance_incoming_refused_total   incoming connections closed unadmitted, by reason
    colo_appliance_guest_nic_*_total    the guest NIC's frames, bytes and drops, rx (to the guest) and tx
    colo_appliance_hypercall_exits_total, colo_appliance_vcpu_seconds_total   the VMM's work
    colo_appliance_colo_*, colo_appliance_netfilter_*   COLO (see _colo)
    process_*                           the daemon process (psutil)
"""
from __future__ import annotations

import math
import threading
import time

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric,
                                    StateSetMetricFamily)

from appliance.vmm import abi
from appliance.vmm.machine import RUN_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("completed", "failed", "cancelled")
HYPERCALLS = {port: name[3:].lower() for name, port in vars(abi).items()
              if name.startswith("HC_") and isinstance(port, int)}
NETFILTER_COUNTERS = {
    "matched": "Primary frames released because the secondary's matched.",
    "released": "Primary frames released to the network (matched, passed through, or at a checkpoint).",
    "mismatches": "Connections whose two guests' output differed (each forces a checkpoint).",
    "timeouts": "Frames that waited longer than compare_timeout for their match.",
    "dropped": "Frames dropped: beyond max_queue_size, or secondary frames not used for a match.",
    "malformed": "Frames that could not be parsed.",
}


class MigrationTotals:
    """Finished migrations by (direction, outcome), and the bytes of those finished; a running
    migration's bytes are added at each scrape until it finishes (``finished`` from its thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = {(direction, outcome): 0 for direction in ("outgoing", "incoming") for outcome in OUTCOMES}
        self.sent = 0
        self.received = 0
        self._banked: set[int] = set()      # ids of the migrations whose bytes are in sent/received

    def finished(self, migration, direction: str, outcome: str) -> None:
        with self._lock:
            if id(migration) in self._banked:
                return
            self._banked.add(id(migration))
            self.count[direction, outcome] += 1
            sent, received = _bytes_of(migration, direction)
            self.sent += sent
            self.received += received

    def bytes(self, current, direction: str | None) -> tuple[int, int]:
        """(sent, received) by every migration so far, the current one included."""
        with self._lock:
            if current is None or id(current) in self._banked:
                return self.sent, self.received
            sent, received = _bytes_of(current, direction)
            return self.sent + sent, self.received + received


def _bytes_of(migration, direction: str) -> tuple[int, int]:
    return (migration.stats.transferred, 0) if direction == "outgoing" else (0, migration.bytes_received)


class NodeCollector:
    """Everything about one node, read from it at each scrape."""

    def __init__(self, node):
        self.node = node
        self.process = psutil.Process()
        self.started = time.time()

    def collect(self):
        node = self.node
        name = [node.name]
        status = node.status()
        yield _gauge("colo_appliance_up", "1 while the node daemon serves.", name, 1)
        vm = status["vm"]
        info = InfoMetricFamily("colo_appliance_node", "The node's version and guest.", labels=["node"])
        info.add_metric(name, {"version": status["version"], "image": vm.get("image") or "",
                               "uuid": vm.get("uuid") or "", "memory_mib": str(vm.get("memory_mib") or 0)})
        yield info
        state = StateSetMetricFamily("colo_appliance_run_state", "The guest's run state (QEMU's RunState).",
                                     labels=["node"])
        state.add_metric(name, {s: s == node.run_state for s in RUN_STATES})
        yield state
        yield _gauge("colo_appliance_vm_running", "1 when the guest is running.", name,
                     int(node.run_state == "running"), status=node.run_state)
        yield from self._migration(node, name, status["migration"])
        if node.vm is not None:
            yield from self._vmm(node.vm, name)
        yield from _colo(name, status["colo"])
        yield from self._process()

    @staticmethod
    def _migration(node, name, info: dict):
        ram = info.get("ram", {})
        yield _gauge("colo_appliance_migration_active", "1 while a migration is in progress.", name,
                     int(node.migration_running()), status=info["status"])
        for metric, help_text, value in (
                ("transferred_bytes", "Bytes sent by the current or last outgoing migration.", ram.get("transferred", 0)),
                ("remaining_bytes", "Dirty bytes still to send by the current migration.", ram.get("remaining", 0)),
                ("dirty_sync_count", "Dirty-log syncs (passes) of the current or last migration.",
                 ram.get("dirty-sync-count", 0)),
                ("downtime_milliseconds", "Measured downtime of the last completed migration.",
                 info.get("downtime", 0))):
            yield _gauge(f"colo_appliance_migration_{metric}", help_text, name, value)
        finished = CounterMetricFamily("colo_appliance_migrations", "Migrations finished, by direction and outcome.",
                                       labels=["node", "direction", "outcome"])
        for (direction, outcome), count in node.migration_totals.count.items():
            finished.add_metric([node.name, direction, outcome], count)
        yield finished
        sent, received = node.migration_totals.bytes(node.migration, node.migration_direction())
        yield _counter("colo_appliance_migration_sent_bytes", "Bytes sent by every outgoing migration.", name, sent)
        yield _counter("colo_appliance_migration_received_bytes", "Bytes received by every incoming migration.",
                       name, received)
        refused = CounterMetricFamily("colo_appliance_incoming_refused", "Incoming migration connections closed "
                                      "unadmitted, by reason (tls, authz, deadline, garbage, header, busy).",
                                      labels=["node", "reason"])
        for reason, count in sorted(node.incoming_refused.items()):
            refused.add_metric([node.name, reason], count)
        yield refused

    def _vmm(self, vm, name):
        nic = vm.nic
        if nic is not None:
            for metric, help_text, rx, tx in (
                    ("frames", "Frames the guest NIC passed: rx to the guest, tx from it.",
                     nic.state.rx_frames, nic.state.tx_frames),
                    ("bytes", "Bytes of those frames, counted on this host.", nic.rx_bytes, nic.tx_bytes),
                    ("dropped", "Frames dropped: rx too big for the guest, tx refused by the backend.",
                     nic.state.rx_dropped, nic.state.tx_dropped)):
                family = CounterMetricFamily(f"colo_appliance_guest_nic_{metric}", help_text,
                                             labels=["node", "direction"])
                family.add_metric([*name, "rx"], rx)
                family.add_metric([*name, "tx"], tx)
                yield family
        exits = CounterMetricFamily("colo_appliance_hypercall_exits", "Guest exits to the VMM, by hypercall.",
                                    labels=["node", "hypercall"])
        for port, count in list(vm.hypercall_exits.items()):
            exits.add_metric([*name, HYPERCALLS.get(port, hex(port))], count)
        yield exits
        vcpu = next((t for t in self.process.threads() if t.id == vm.vcpu_thread_id), None)
        yield _counter("colo_appliance_vcpu_seconds", "CPU time of the vCPU thread (guest and hypercalls).", name,
                       vcpu.user_time + vcpu.system_time if vcpu else 0)

    def _process(self):
        mem = self.process.memory_info()
        cpu = self.process.cpu_times()
        yield _gauge("process_resident_memory_bytes", "Resident memory size in bytes.", [], mem.rss)
        yield _gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", [], mem.vms)
        yield _counter("process_cpu_seconds", "User and system CPU time in seconds.", [], cpu.user + cpu.system)
        yield _gauge("process_open_fds", "Number of open file descriptors.", [], self.process.num_fds())
        yield _gauge("process_num_threads", "Number of OS threads.", [], self.process.num_threads())
        yield _gauge("process_start_time_seconds", "Start time of the process since the epoch.", [], self.started)


def _colo(name, colo: dict):
    """COLO's figures: checkpoints by reason, the PVM's pauses as a summary, bytes, failovers,
    heartbeat age (NaN outside COLO, as Prometheus spells 'no value'), the comparer's counters."""
    info = GaugeMetricFamily("colo_appliance_colo_info", "COLO mode and failover status of this node.",
                             labels=["node", "mode", "last_mode", "failover_status"])
    info.add_metric([*name, colo["mode"], colo["last-mode"], colo["failover-status"]], 1)
    yield info
    checkpoints = CounterMetricFamily("colo_appliance_colo_checkpoints", "COLO checkpoints taken, by what "
                                      "triggered them.", labels=["node", "reason"])
    for reason, count in colo["checkpoints"].items():
        checkpoints.add_metric([*name, reason], count)
    yield checkpoints
    pause = colo["pause-ms"]
    family = "colo_appliance_colo_checkpoint_pause_seconds"
    summary = Metric(family, "The primary guest's pause per checkpoint (quantiles over the last 1024).", "summary")
    labels = {"node": name[0]}
    summary.add_sample(family, {**labels, "quantile": "0.5"}, pause["p50"] / 1000)
    summary.add_sample(family, {**labels, "quantile": "0.99"}, pause["p99"] / 1000)
    summary.add_sample(f"{family}_sum", labels, pause["sum"] / 1000)
    summary.add_sample(f"{family}_count", labels, pause["count"])
    yield summary
    yield _counter("colo_appliance_colo_checkpoint_bytes", "Bytes sent for COLO checkpoints.", name,
                   colo["bytes-total"])
    yield _counter("colo_appliance_colo_failed_checkpoints", "COLO checkpoints that failed or were refused.", name,
                   colo["failed-checkpoints"])
    yield _counter("colo_appliance_colo_failovers", "Failovers this node completed as a secondary.", name,
                   colo["failovers"])
    age = colo["heartbeat-age-ms"]
    yield _gauge("colo_appliance_colo_heartbeat_age_seconds", "Time since the COLO peer was last heard.", name,
                 age / 1000 if age is not None else math.nan)
    yield from _netfilter(name, colo["netfilter"])


def _netfilter(name, counters: dict | None):
    """The primary's comparer, per flow class (tcp, udp, icmp, other, non-ip), while in COLO."""
    if not counters or "tcp" not in counters:
        return
    flows = [flow for flow, values in counters.items() if isinstance(values, dict)]
    frames = CounterMetricFamily("colo_appliance_netfilter_frames", "Guest frames the comparer received, by side.",
                                 labels=["node", "flow", "side"])
    for flow in flows:
        for side in ("primary", "secondary"):
            frames.add_metric([*name, flow, side], counters[flow][side])
    yield frames
    for counter, help_text in NETFILTER_COUNTERS.items():
        family = CounterMetricFamily(f"colo_appliance_netfilter_{counter}", help_text, labels=["node", "flow"])
        for flow in flows:
            family.add_metric([*name, flow], counters[flow][counter])
        yield family


def _gauge(metric: str, help_text: str, node: list[str], value, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(metric, help_text, labels=["node", *labels] if node else [])
    family.add_metric([*node, *labels.values()], value)
    return family


def _counter(metric: str, help_text: str, node: list[str], value) -> CounterMetricFamily:
    family = CounterMetricFamily(metric, help_text, labels=["node"] if node else [])
    family.add_metric(node, value)
    return family


def registry_for(node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text format (prometheus_client escapes label values: quotes, backslashes, newlines)."""
    return generate_latest(registry)
