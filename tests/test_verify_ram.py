"""--verify-ram catches what the dirty log missed: guest RAM written behind its back (in one
process, two VMs), once at a migration's switchover and once in a COLO checkpoint."""
import socket

import pytest

from appliance.control.migration_settings import DEFAULT_PARAMETERS
from colo import ColoManager, ColoSettings
from replication.destination import MigrationDestination
from replication.source import MigrationSource
from replication.transport import Listener
from test_migration_engine import CAPS, Run, ram_digest
from vmm_helpers import wait_for

pytestmark = pytest.mark.kvm


def poke_behind_the_dirty_log(vm) -> None:
    """Change the last page of guest RAM without KVM or the VMM seeing it (memdirty never
    touches it): a stand-in for a dirty-log bug."""
    ram = vm.ram_regions()[0][3]
    ram[len(ram) - 4096] = (ram[len(ram) - 4096] + 1) % 256


@pytest.mark.parametrize("verify", [False, True], ids=["unverified", "verified"])
def test_a_page_the_dirty_log_missed_fails_the_migration_only_when_verified(vms, guest_images, tmp_path, verify):
    run = Run(vms, tmp_path, caps={"pause-before-switchover": True})
    run.source = MigrationSource(run.src, run.uri, run.caps, run.params, {},
                                 lambda n, d: run.src_events.append((n, d)), verify_ram=verify)
    run.destination = MigrationDestination(run.dst, Listener(run.uri), run.caps, False,
                                           lambda n, d: run.dst_events.append((n, d)), verify_ram=verify)
    run.destination.start()
    run.source.start()
    wait_for(lambda: run.source.status == "pre-switchover", timeout=30, what="pre-switchover")
    poke_behind_the_dirty_log(run.src)
    run.source.continue_from("pre-switchover")
    run.wait()
    if verify:
        assert run.source.status == "failed" and run.destination.status == "failed"
        assert "whole-RAM verification failed" in run.destination.error
        assert "whole-RAM verification failed" in run.source.error
        assert run.src.state == "running"                 # the source guest runs on, intact
    else:
        # The hole --verify-ram closes: the stream's own digest follows the dirty log, so it passes.
        assert run.source.status == "completed" and run.destination.status == "completed"
        assert ram_digest(run.src) != ram_digest(run.dst)


def test_a_page_the_dirty_log_missed_fails_the_colo_checkpoint(vms, guest_images, tmp_path):
    """The secondary refuses the checkpoint: the primary runs on unprotected, the SVM stops."""
    src = vms.new("memdirty", "mib=4 rate=20", memory_mib=32)
    dst = vms.new("memdirty", "mib=4 rate=20", memory_mib=32, start_paused=True)
    assert dst.set_state("prelaunch", "inmigrate")
    src.start()
    settings = ColoSettings(verify_ram=True)
    events = {"primary": [], "secondary": []}
    primary = ColoManager(settings, lambda n, d: events["primary"].append((n, d)))
    secondary = ColoManager(settings, lambda n, d: events["secondary"].append((n, d)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    caps = dict(CAPS, **{"x-colo": True})
    params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0, "x-checkpoint-delay": 50}
    destination = MigrationDestination(dst, Listener(uri), caps, True, lambda n, d: None, verify_ram=True,
                                       colo_handover=secondary.run_secondary)
    source = MigrationSource(src, uri, caps, params, {}, lambda n, d: None, verify_ram=True,
                             colo_handover=primary.run_primary)
    destination.start()
    source.start()
    try:
        wait_for(lambda: secondary.stats.loaded >= 5, timeout=30, what="five checkpoints")
        assert primary.stats.failed_checkpoints == 0
        poke_behind_the_dirty_log(src)
        wait_for(lambda: primary.mode == "none" and secondary.mode == "none", timeout=10, what="COLO to end")
        assert ("COLO_EXIT", {"mode": "primary", "reason": "error"}) in events["primary"]
        assert ("COLO_EXIT", {"mode": "secondary", "reason": "error"}) in events["secondary"]
        assert secondary.stats.failed_checkpoints == 1 and secondary.failover.status == "none"
        assert src.state == "running" and dst.state == "paused"
        assert source.status == "completed"
    finally:
        source.join(10)
        destination.join(10)
