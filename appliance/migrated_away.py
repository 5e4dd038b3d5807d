"""The node's memory of a guest that migrated away, so that no restart boots a second copy.

After an outgoing migration completes the guest runs on the destination.  If
this node's daemon then restarts (``Restart=`` in the unit, a reboot, an
operator's ``systemctl start``), booting its configured guest again would run
two copies with one MAC and one disk.  So a completed outgoing migration
writes ``STATE_DIR/NAME.migrated-away`` (JSON: uuid, destination URI, UTC
time), and a start that would boot that guest is refused until the operator
removes the file.  Starting with ``--incoming`` (taking the guest back) is
allowed, and a completed incoming migration removes the file.
"""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


def marker_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, f"{name}.migrated-away")


def remember(state_dir: str, name: str, vm_uuid: str, destination: str) -> None:
    """Called once the guest runs elsewhere; written whole (a new file renamed into place)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = marker_path(state_dir, name)
    record = {"uuid": vm_uuid, "destination": destination,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    partial = f"{path}.{os.getpid()}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    log.info("guest %s migrated away to %s: this node will not boot it again until %s is removed",
             vm_uuid, destination, path)


def forget(state_dir: str, name: str) -> None:
    """The guest is here again (an incoming migration completed)."""
    try:
        os.unlink(marker_path(state_dir, name))
        log.info("guest migrated back: %s removed", marker_path(state_dir, name))
    except FileNotFoundError:
        pass


def refusal(state_dir: str, name: str) -> str | None:
    """Why this node must not boot its guest, or None."""
    path = marker_path(state_dir, name)
    try:
        with open(path) as f:
            record = json.load(f)
        where = f"to {record['destination']} at {record['time']} (guest {record['uuid']})"
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        where = "(its record is unreadable)"
    return (f"node {name}: its guest migrated away {where}; booting it here again would run a second copy. "
            f"If the guest no longer runs there, remove {path} and start again; to take it back, "
            "start this node with --incoming and migrate it here")
