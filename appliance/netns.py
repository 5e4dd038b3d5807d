"""Network namespaces for the demo and the tests, built with pyroute2.

One client namespace and one namespace per node, as in docs/ARCHITECTURE::

      client ns  (PREFIX-client)                 node ns (PREFIX-NODE), one per node
    +----------------------------+            +-------------------------------------+
    | br0 10.S.0.1/24            |  veth pair | eth0 --+                            |
    |  +-- vNODE  <--------------+------------+        br0 10.S.0.1x/24 (node addr) |
    |  +-- vNODE2 ...            |            | tap0 --+  (the guest's NIC, created |
    +----------------------------+            |           by the daemon: --nic)     |
                                              +-------------------------------------+

The guest's address (10.S.0.2) is the same on every node, as it is one
guest that moves between them.  ``S`` is chosen per topology so that
several can coexist; only 10.x addresses inside these namespaces are used.
Everything is removed by ``close()`` (deleting a namespace deletes its links).
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import NetNS, netns


@contextmanager
def inside(namespace: str):
    """Sockets (and taps) created inside this block belong to ``namespace``; this thread only."""
    netns.pushns(namespace)
    try:
        yield
    finally:
        netns.popns()


@dataclass
class NodeNet:
    name: str
    namespace: str
    address: str           # the node's own address, for node-to-node channels


class Topology:
    GUEST_LAST_OCTET = 2

    def __init__(self, prefix: str, nodes: list[str], subnet: int | None = None):
        self.prefix = prefix
        self.subnet = subnet if subnet is not None else 100 + os.getpid() % 150
        self.client_ns = f"{prefix}-client"
        self.client_address = self._ip(1)
        self.guest_address = self._ip(self.GUEST_LAST_OCTET)
        self.nodes: dict[str, NodeNet] = {}
        self._created: list[str] = []
        try:
            self._create_namespace(self.client_ns)
            with NetNS(self.client_ns) as c:
                self._up(c, "lo")
                c.link("add", ifname="br0", kind="bridge")
                c.addr("add", index=c.link_lookup(ifname="br0")[0], address=self.client_address, prefixlen=24)
                self._up(c, "br0")
            for i, node in enumerate(nodes):
                self._add_node(node, self._ip(10 + i))
        except BaseException:
            self.close()
            raise

    def _ip(self, last: int) -> str:
        return f"10.{self.subnet}.0.{last}"

    def _create_namespace(self, name: str) -> None:
        netns.create(name)
        self._created.append(name)

    @staticmethod
    def _up(ns, ifname: str) -> None:
        ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")

    def _add_node(self, node: str, address: str) -> None:
        namespace = f"{self.prefix}-{node}"
        self._create_namespace(namespace)
        client_end = f"v{node}"[:15]
        with NetNS(namespace) as n:
            self._up(n, "lo")
            n.link("add", ifname="eth0", kind="veth", peer={"ifname": client_end, "net_ns_fd": self.client_ns})
            n.link("add", ifname="br0", kind="bridge")
            bridge = n.link_lookup(ifname="br0")[0]
            n.link("set", index=n.link_lookup(ifname="eth0")[0], master=bridge, state="up")
            n.addr("add", index=bridge, address=address, prefixlen=24)
            n.link("set", index=bridge, state="up")
        with NetNS(self.client_ns) as c:
            c.link("set", index=c.link_lookup(ifname=client_end)[0],
                   master=c.link_lookup(ifname="br0")[0], state="up")
        self.nodes[node] = NodeNet(node, namespace, address)

    def in_namespace(self, namespace: str, argv: list[str]) -> list[str]:
        """argv run inside a namespace (``ip netns exec`` execs it: the PID is the program's)."""
        return ["ip", "netns", "exec", namespace, *argv]

    def run_client(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.in_namespace(self.client_ns, argv), **kwargs)

    def client_sockets(self):
        """Sockets created inside this block live in the client namespace."""
        return inside(self.client_ns)

    def close(self) -> None:
        for name in reversed(self._created):
            try:
                netns.remove(name)
            except OSError:
                pass
        self._created.clear()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
