"""COLO: a primary/secondary pair in lock-step (checkpoints, colo cache, heartbeat, failover).

``ColoManager`` is the node's entry point; the layers underneath are drawn in
colo/protocol.py (the checkpoint transaction) and colo/failover.py (states).
"""
from .manager import ColoError, ColoManager, ColoSettings

__all__ = ["ColoError", "ColoManager", "ColoSettings"]
