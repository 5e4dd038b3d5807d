"""The control plane: QMP server, schema-driven dispatch, events and node state."""
from .node import Node
from .qmp import QMPServer

__all__ = ["Node", "QMPServer"]
