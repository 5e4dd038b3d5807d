"""COLO's QMP commands, registered by the node: query-colo-status, x-colo-lost-heartbeat,
and xen-colo-do-checkpoint (in this appliance: an on-demand checkpoint)."""
from __future__ import annotations

from appliance.qapi import QMPError

from .manager import ColoError, ColoManager


def handlers(colo: ColoManager) -> dict:
    def lost_heartbeat(args, ctx) -> None:
        try:
            colo.lost_heartbeat()
        except ColoError as e:
            raise QMPError(str(e)) from None

    def do_checkpoint(args, ctx) -> None:
        try:
            colo.request_checkpoint("request")
        except ColoError as e:
            raise QMPError(str(e)) from None

    return {
        "query-colo-status": lambda args, ctx: colo.query_status(),
        "x-colo-lost-heartbeat": lost_heartbeat,
        "xen-colo-do-checkpoint": do_checkpoint,
    }
