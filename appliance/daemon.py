"""``colo-appliance serve``: one node daemon (QMP server, HTTP API, the node's state).

It runs until ``quit`` over QMP, SIGTERM or SIGINT, then closes its sockets
and removes its QMP socket file.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import sys

from .config import NodeConfig, split_host_port
from .control import Node, QMPServer
from .control.jsonstream import MAX_NESTING
from .control.node import PACKAGE, QEMU_VERSION
from .http_api import HTTPAPI
from .logs import log_startup
from .sdnotify import Notifier

log = logging.getLogger("appliance")

GC_YOUNG_THRESHOLD = 20000     # allocations between collections of the youngest generation (Python's default: 700)


def _raise_fd_limit() -> None:
    """Many QMP clients at once need many descriptors; take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _quiet_collector() -> None:
    """Frame paths allocate a few objects per frame and free them at once (reference counting
    does); the cyclic collector only rescans what lives on.  Objects made at start-up live for
    good: frozen out of its view, and its youngest generation collected less often (profiled
    under a COLO pair's load: about 3 % of the CPU went to collections)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def create_vm(config: NodeConfig, log_dir: str | None):
    """The node's guest, not yet started.  Created before the event loop runs:
    the VMM installs its vCPU signal handler from the main thread, and its
    pyroute2 calls are synchronous."""
    from .vmm import VirtualMachine, VMConfig
    guest = config.guest
    console_log = os.path.join(log_dir, f"{config.name}-console.log") if log_dir else None
    vm = VirtualMachine(VMConfig(
        image=guest.image_path(), memory_mib=guest.memory, cmdline=guest.append, disk=guest.disk,
        console_log=console_log, start_paused=guest.start_paused or bool(config.incoming),
        **guest.nic_options()))
    if guest.uuid:
        vm.uuid = guest.uuid           # as QEMU's -uuid: what validate-uuid compares
    return vm


async def serve(config: NodeConfig, vm=None, http_token: str | None = None) -> int:
    """Serve until quit; ``vm`` (from create_vm) is started here and closed on the way out;
    ``http_token`` (from http_api.load_token) is needed when config.http is set."""
    config.validate()
    _raise_fd_limit()
    # QMP accepts JSON nested MAX_NESTING deep, as QEMU does; parsing and echoing it back
    # takes more Python frames than the default limit allows.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * MAX_NESTING))
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    node = Node(config.name, loop, incoming=config.incoming, vm=vm, autostart=not config.guest.start_paused,
                colo_settings=config.colo, netfilter_settings=config.netfilter, tls=config.tls,
                tls_parameters=config.tls_parameters, handshake_timeout=config.handshake_timeout,
                idle_timeout=config.idle_timeout, file_overwrite=config.migrate_file_overwrite,
                state_dir=config.state_path())
    server = QMPServer(node.dispatcher, node.events, QEMU_VERSION, PACKAGE, on_quit=lambda: None,
                       max_clients=config.qmp_max_clients)
    http = None
    qmp_addresses = []
    notify_task = None
    try:
        if config.qmp:
            server.listen_unix(config.qmp)
            qmp_addresses.append(f"unix:{config.qmp}")
        if config.qmp_tcp:
            host, port = split_host_port(config.qmp_tcp, "qmp_tcp")
            port = server.listen_tcp(host, port)
            qmp_addresses.append(f"tcp:{host}:{port}")
        if config.http:
            http = await HTTPAPI.start(node, config, http_token)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_quit, "host-signal")
        _quiet_collector()
        if config.incoming and config.incoming != "defer":
            node.start_incoming(config.incoming)
        elif vm is not None:
            vm.start()
        log_startup(log, node, vm, qmp_addresses, f"http://{http.address}" if http else None)
        notifier.ready(node.status_line())
        if notifier.enabled:
            changed = asyncio.Event()
            node.events.subscribe(lambda message: changed.set())
            notify_task = loop.create_task(notifier.run(node.status_line, changed))
        await node.quit_requested.wait()
        notifier.stopping()
        await asyncio.sleep(0.05)       # let the last replies and SHUTDOWN reach the clients
        log.info("node %s shutting down", node.name)
        return 0
    finally:
        await node.close()
        if notify_task is not None:
            notify_task.cancel()
        notifier.close()
        server.close()
        if http is not None:
            await http.close()
