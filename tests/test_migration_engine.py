"""The migration engine between two VMs in one process: RAM equal byte for byte."""
import os
import socket
import threading
import time

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication import stream
from replication.destination import MigrationDestination
from replication.source import MigrationSource, bitmap_runs
from replication.transport import Listener
from appliance.control.migration_settings import DEFAULT_PARAMETERS
from vmm_helpers import assert_one_step, last_pass, memdirty_layout, page_counters, wait_for

pytestmark = pytest.mark.kvm

CAPS = {"xbzrle": False, "compress": False, "multifd": False, "auto-converge": False, "events": True,
        "pause-before-switchover": False, "validate-uuid": False, "return-path": False, "release-ram": False}


def ram_digest(vm):
    return blake3.blake3(vm.ram_regions()[0][3]).hexdigest()


class Run:
    """A source and a destination VM and the events each side announced."""

    def __init__(self, vms, tmp_path, mib=8, memory=32, cmdline=None, caps=None, params=None, uri=None,
                 dst_caps=None):
        cmdline = cmdline or f"mib={mib} rate=0"
        self.src = vms.new("memdirty", cmdline, memory_mib=memory)
        self.dst = vms.new("memdirty", cmdline, memory_mib=memory, start_paused=True)
        assert self.dst.set_state("prelaunch", "inmigrate")
        self.caps = dict(CAPS, **(caps or {}))
        self.dst_caps = dict(CAPS, **(dst_caps or {})) if dst_caps is not None else self.caps
        self.params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0, **(params or {})}
        self.uri = uri or f"unix:{tmp_path}/mig.sock"
        self.src_events, self.dst_events = [], []
        self.src.start()
        memdirty_layout(self.src)

    def migrate(self, autostart=False, wait=True):
        self.source = MigrationSource(self.src, self.uri, self.caps, self.params, {},
                                      lambda n, d: self.src_events.append((n, d)))
        one_way = self.uri.startswith("file:")
        if one_way:                      # the file must be written before it can be read
            self.source.start()
            self.source.join(60)
        self.destination = MigrationDestination(self.dst, Listener(self.uri), self.dst_caps, autostart,
                                                lambda n, d: self.dst_events.append((n, d)))
        self.destination.start()
        if not one_way:
            self.source.start()
        if wait:
            self.wait()
        return self

    def wait(self, timeout=60):
        self.source.join(timeout)
        self.destination.join(timeout)
        assert not self.source._thread.is_alive() and not self.destination._thread.is_alive()


def statuses(events):
    return [d["status"] for n, d in events if n == "MIGRATION"]


def assert_memdirty_intact(run, vm):
    """The one-step invariant, with the working set's layout from the source's console
    (the destination's console log starts empty)."""
    base, pages = memdirty_layout(run.src)
    assert_one_step(page_counters(vm.ram_regions()[0][3], base, pages))


def test_bitmap_runs():
    assert bitmap_runs(bytes(8)) == []
    assert bitmap_runs(bytes([0b1110_0110, 0xFF, 0x01])) == [(1, 2), (5, 12)]
    assert bitmap_runs(b"\xff" * 16) == [(0, 128)]


def test_memdirty_migrates_and_ram_matches(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, mib=16, memory=64).migrate()
    assert run.source.status == "completed", run.source.error
    assert run.destination.status == "completed", run.destination.error
    assert statuses(run.src_events) == ["setup", "active", "device", "completed"]
    assert statuses(run.dst_events) == ["setup", "active", "completed"]
    passes = [d["pass"] for n, d in run.src_events if n == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3
    # Source postmigrate, destination paused (no autostart): RAM equal byte for byte.
    assert run.src.state == "postmigrate" and run.dst.state == "paused"
    assert ram_digest(run.src) == ram_digest(run.dst)
    assert_memdirty_intact(run, run.dst)
    info = run.source.info()
    ram = info["ram"]
    assert ram["total"] == 64 << 20 and ram["page-size"] == 4096
    assert ram["normal"] >= 16 * 256 and ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["duplicate"] > 0 and ram["transferred"] >= ram["normal-bytes"]
    assert ram["dirty-sync-count"] == len(passes) and ram["mbps"] > 0
    assert 0 <= info["downtime"] <= info["total-time"] and info["setup-time"] <= info["total-time"]
    # The guest carries on at the destination, its own invariant check included.
    saved = last_pass(run.src.read_console())
    run.dst.resume()
    wait_for(lambda: last_pass(run.dst.read_console()) > saved + 2, timeout=10, what="passes at the destination")
    run.dst.pause()
    assert_memdirty_intact(run, run.dst)
    assert "FAIL" not in run.dst.read_console()


def test_autostart_resumes_the_destination(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path).migrate(autostart=True)
    assert run.destination.status == "completed" and run.dst.state == "running"


def test_paused_source_stays_paused_at_destination(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path)
    run.src.pause()
    run.migrate(autostart=True)
    assert run.destination.status == "completed" and run.dst.state == "paused"
    assert ram_digest(run.src) == ram_digest(run.dst)


@pytest.mark.parametrize("caps, params", [
    ({"compress": True}, {"compress-threads": 2}),
    ({"multifd": True}, {"multifd-channels": 3}),
    ({"multifd": True}, {"multifd-compression": "zlib"}),
    ({"multifd": True}, {"multifd-compression": "zstd", "multifd-zstd-level": 3}),
    ({"validate-uuid": False, "return-path": True}, {}),
    ({"xbzrle": True, "compress": True}, {}),
    ({"xbzrle": True, "auto-converge": True, "events": False}, {}),
    ({"multifd": True, "auto-converge": True, "pause-before-switchover": False}, {"multifd-compression": "zstd"}),
    ({"compress": True, "auto-converge": True}, {"compress-level": 9, "decompress-threads": 1}),
], ids=["compress", "multifd", "multifd-zlib", "multifd-zstd", "return-path", "xbzrle+compress",
        "xbzrle+auto-converge", "multifd-zstd+auto-converge", "compress9+auto-converge"])
def test_capabilities_migrate_correctly(vms, guest_images, tmp_path, caps, params):
    run = Run(vms, tmp_path, caps=caps, params=params).migrate()
    assert run.source.status == "completed", run.source.error
    assert ram_digest(run.src) == ram_digest(run.dst)
    assert_memdirty_intact(run, run.dst)
    info = run.source.info()
    if caps.get("compress"):
        assert info["compression"]["pages"] > 0 and info["compression"]["compression-rate"] > 1
    if caps.get("multifd"):
        assert info["ram"]["multifd-bytes"] > 0


def test_xbzrle_sends_deltas(vms, guest_images, tmp_path):
    # Pages that change by a byte between passes: the case XBZRLE is for.  With
    # downtime-limit 0 the live passes go on until the test lets them converge.
    run = Run(vms, tmp_path, cmdline="mib=1 rate=0", caps={"xbzrle": True},
              params={"xbzrle-cache-size": 16 << 20, "downtime-limit": 0, "max-bandwidth": 64 << 20})
    run.migrate(wait=False)
    wait_for(lambda: run.source.info().get("xbzrle-cache", {}).get("pages", 0) > 100, timeout=30,
             what="xbzrle pages")
    run.params["downtime-limit"] = 300           # now let it converge
    run.wait()
    assert run.source.status == "completed", run.source.error
    assert ram_digest(run.src) == ram_digest(run.dst)
    cache = run.source.info()["xbzrle-cache"]
    assert cache["cache-size"] == 16 << 20 and cache["pages"] > 100
    assert cache["bytes"] < cache["pages"] * 4096 / 10 and cache["encoding-rate"] > 10
    assert 0 <= cache["cache-miss-rate"] <= 1


def test_auto_converge_throttles_a_fast_dirtier(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, mib=16, memory=64, caps={"auto-converge": True},
              params={"max-bandwidth": 32 << 20, "downtime-limit": 50, "cpu-throttle-initial": 30,
                      "cpu-throttle-increment": 20})
    run.migrate()
    assert run.source.status == "completed", run.source.error
    info = run.source.info()
    assert info["cpu-throttle-percentage"] >= 30
    assert ram_digest(run.src) == ram_digest(run.dst)
    assert info["downtime"] < 1000


def test_pause_before_switchover(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, caps={"pause-before-switchover": True}).migrate(wait=False)
    wait_for(lambda: run.source.status == "pre-switchover", timeout=30, what="pre-switchover")
    assert run.src.state == "paused"
    time.sleep(0.2)
    assert run.source.status == "pre-switchover"
    assert run.source.continue_from("pre-switchover")
    run.wait()
    assert statuses(run.src_events) == ["setup", "active", "pre-switchover", "device", "completed"]
    assert ram_digest(run.src) == ram_digest(run.dst)


def test_release_ram_gives_the_source_memory_back(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, caps={"release-ram": True}).migrate()
    assert run.source.status == "completed" and run.source.ram_released
    memfd = run.src.ram_regions()[0][2]
    with pytest.raises(OSError):          # ENXIO: no data anywhere, the memfd is all holes
        os.lseek(memfd, 0, os.SEEK_DATA)
    assert run.destination.status == "completed"
    assert_memdirty_intact(run, run.dst)


def test_file_and_exec_uris(vms, guest_images, tmp_path):
    path = tmp_path / "guest.mig"
    run = Run(vms, tmp_path, uri=f"file:{path}")
    run.src.pause()
    run.migrate()
    assert run.source.status == "completed" and run.destination.status == "completed"
    assert ram_digest(run.src) == ram_digest(run.dst)
    assert path.read_bytes()[:8] == stream.MAGIC


def test_cancel_in_each_phase_leaves_the_source_running(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, mib=16, memory=64, params={"max-bandwidth": 32 << 20}).migrate(wait=False)
    wait_for(lambda: run.source.status == "active", timeout=30, what="active")
    before = last_pass(run.src.read_console())
    run.source.cancel()
    run.wait()
    assert run.source.status == "cancelled" and "error-desc" not in run.source.info()
    assert statuses(run.src_events) == ["setup", "active", "cancelling", "cancelled"]
    assert run.destination.status == "failed"
    assert run.src.state == "running"
    wait_for(lambda: last_pass(run.src.read_console()) > before, what="the source guest to go on")


def test_cancel_in_pre_switchover_resumes_the_source(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path, caps={"pause-before-switchover": True}).migrate(wait=False)
    wait_for(lambda: run.source.status == "pre-switchover", timeout=30, what="pre-switchover")
    run.source.cancel()
    run.wait()
    assert run.source.status == "cancelled" and run.src.state == "running"


def refused_and_still_listening(run):
    """The source was told why; the destination counted it, names nothing of its own guest, and
    waits for another source."""
    run.source.join(30)
    assert run.source.status == "failed" and run.src.state == "running"
    time.sleep(0.2)
    assert run.destination.status == "setup" and run.destination.refused["header"] == 1
    assert run.dst.state == "inmigrate"
    error = run.source.info()["error-desc"]
    assert run.dst.uuid not in error and f"{run.dst.ram_regions()[0][1] >> 20} MiB" not in error
    run.destination.abort()
    run.destination.join(10)
    return error


@pytest.mark.parametrize("source, destination", [(True, True), (True, False), (False, True)],
                         ids=["both", "source-only", "destination-only"])
def test_uuid_mismatch_is_refused(vms, guest_images, tmp_path, source, destination):
    """As in QEMU, validate-uuid set on the source alone has the destination check the UUID."""
    run = Run(vms, tmp_path, caps={"validate-uuid": source}, dst_caps={"validate-uuid": destination})
    run.migrate(wait=False)
    assert "UUID mismatch" in refused_and_still_listening(run)


def test_destination_refuses_a_different_ram_size(vms, guest_images, tmp_path):
    run = Run(vms, tmp_path)
    run.dst.close()
    run.dst = vms.new("memdirty", "mib=8 rate=0", memory_mib=16, start_paused=True)
    run.dst.set_state("prelaunch", "inmigrate")
    run.migrate(wait=False)
    assert "32 MiB of RAM" in refused_and_still_listening(run)


def test_connection_refused(vms, guest_images, tmp_path):
    src = vms.new("memdirty", "mib=4 rate=0", memory_mib=16)
    src.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = MigrationSource(src, f"tcp:127.0.0.1:{port}", CAPS, DEFAULT_PARAMETERS, {}, lambda n, d: None)
    source.start()
    source.join(10)
    assert source.status == "failed" and "Connection refused" in source.info()["error-desc"]
    assert src.state == "running"




@pytest.mark.parametrize("spoil", ["magic", "version", "truncated", "flipped-page", "bad-record", "page-range",
                                   "flipped-device"])
def test_malformed_streams_are_refused(vms, guest_images, tmp_path, spoil):
    path = tmp_path / "good.mig"
    run = Run(vms, tmp_path, uri=f"file:{path}")
    run.src.pause()
    run.migrate()
    assert run.destination.status == "completed"
    data = bytearray(path.read_bytes())
    header = stream.HEADER.size
    if spoil == "magic":
        data[0] ^= 0xFF
    elif spoil == "version":
        data[8] = 99
    elif spoil == "truncated":
        data = data[:len(data) // 2]
    elif spoil == "flipped-page":
        pos = data.find(bytes([stream.PAGES]), header)
        data[pos + 1 + 4 + 8 + 100] ^= 0x01     # a byte of the first normal page
    elif spoil == "bad-record":
        data[header] = 0x7F
    elif spoil == "page-range":
        data[header:header] = stream.pack_zero_run(1 << 40, 1)
    elif spoil == "flipped-device":
        pos = data.find(b"cpu.regs")
        data[pos + 8 + 8 + 16] ^= 0x01          # a register value inside the section
    bad = tmp_path / "bad.mig"
    bad.write_bytes(bytes(data))
    target = vms.new("memdirty", "mib=8 rate=0", memory_mib=32, start_paused=True)
    target.set_state("prelaunch", "inmigrate")
    destination = MigrationDestination(target, Listener(f"file:{bad}"), CAPS, True, lambda n, d: None)
    destination.start()
    destination.join(30)
    assert destination.status == "failed"
    expected = {"magic": "bad magic", "version": "unsupported migration stream version 99",
                "truncated": "closed", "flipped-page": "RAM digest mismatch", "bad-record": "unknown record type 127",
                "page-range": "outside the guest's RAM", "flipped-device": "device state digest mismatch"}[spoil]
    assert expected in destination.error
    assert target.state == "inmigrate"
    # The RAM was cleared: the next, good stream lands on clean memory.
    destination = MigrationDestination(target, Listener(f"file:{path}"), CAPS, False, lambda n, d: None)
    destination.start()
    destination.join(30)
    assert destination.status == "completed"
    assert ram_digest(target) == ram_digest(run.src)


class RecordedStream:
    """A stream and its guest's RAM digest, with a short repr for failure reports."""

    def __init__(self, data: bytes, ram: str):
        self.data, self.ram = data, ram

    def __repr__(self) -> str:
        return f"<stream of {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def recorded_stream(tmp_path_factory, kvm_device):
    """One good stream of a small paused guest, and the digest of that guest's RAM."""
    from appliance.vmm import VirtualMachine, VMConfig
    from vmm_helpers import image
    path = tmp_path_factory.mktemp("stream") / "good.mig"
    with VirtualMachine(VMConfig(image=image("memdirty"), cmdline="mib=1 rate=0", memory_mib=8)) as src:
        src.start()
        wait_for(lambda: "pass " in src.read_console(), what="memdirty")
        src.pause()
        source = MigrationSource(src, f"file:{path}", CAPS, DEFAULT_PARAMETERS, {}, lambda n, d: None)
        source.start()
        source.join(30)
        assert source.status == "completed"
        return RecordedStream(path.read_bytes(), ram_digest(src))


mutations = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "set"]),
                               st.integers(min_value=0), st.binary(min_size=1, max_size=16)),
                     min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          print_blob=False)
@given(mutations)
def test_fuzzed_streams_never_yield_a_wrong_guest(recorded_stream, vms, guest_images, tmp_path, changes):
    """Whatever is done to a stream, the destination fails cleanly or ends with the source's exact RAM."""
    data, expected_ram = bytearray(recorded_stream.data), recorded_stream.ram
    for kind, where, blob in changes:
        pos = where % max(len(data), 1)
        if kind == "flip":
            if data:
                data[pos] ^= blob[0] or 1
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = blob
        else:
            data[pos:pos + len(blob)] = blob
    path = tmp_path / "fuzzed.mig"
    path.write_bytes(bytes(data))
    target = vms.new("memdirty", "mib=1 rate=0", memory_mib=8, start_paused=True)
    target.set_state("prelaunch", "inmigrate")
    destination = MigrationDestination(target, Listener(f"file:{path}"), CAPS, False, lambda n, d: None)
    destination.start()
    destination.join(30)
    assert destination.status in ("failed", "completed")
    if destination.status == "completed":
        assert ram_digest(target) == expected_ram
    else:
        assert destination.error and target.state == "inmigrate"
    target.close()


def test_a_lost_verdict_keeps_the_source_paused(vms, guest_images, tmp_path, monkeypatch):
    """Once everything is sent, the source cannot know whether the destination runs the guest:
    it must not resume it (no split brain), and a late cancel is refused."""
    import replication.source as source_module
    monkeypatch.setattr(source_module, "VERDICT_TIMEOUT", 1.0)
    path = str(tmp_path / "silent.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen(1)
    drained = []

    def drain():               # a destination that admits the source, takes everything and never answers
        conn, _ = silent.accept()
        conn.recv(stream.HEADER.size, socket.MSG_WAITALL)
        conn.sendall(stream.pack_reply(True))
        while chunk := conn.recv(1 << 20):
            drained.append(len(chunk))
        conn.close()

    threading.Thread(target=drain, daemon=True).start()
    src = vms.new("memdirty", "mib=4 rate=0", memory_mib=16)
    src.start()
    source = MigrationSource(src, f"unix:{path}", CAPS, {**DEFAULT_PARAMETERS, "max-bandwidth": 0}, {},
                             lambda n, d: None)
    source.start()
    wait_for(lambda: source._committed, timeout=30, what="END to be sent")
    assert source.cancel() is False
    source.join(30)
    assert source.status == "failed" and "may be running on the destination" in source.error
    assert src.state == "paused"
    silent.close()


def test_a_destination_that_never_admits_leaves_the_source_running(vms, guest_images, tmp_path):
    """A port that swallows the stream without admitting it (not a destination, or one busy with
    a silent peer): the source never commits, so it fails and its guest runs on."""
    path = str(tmp_path / "sink.sock")
    sink = socket.socket(socket.AF_UNIX)
    sink.bind(path)
    sink.listen(1)

    def swallow():
        conn, _ = sink.accept()
        while conn.recv(1 << 20):
            pass
        conn.close()

    threading.Thread(target=swallow, daemon=True).start()
    src = vms.new("memdirty", "mib=4 rate=0", memory_mib=16)
    src.start()
    source = MigrationSource(src, f"unix:{path}", CAPS, {**DEFAULT_PARAMETERS, "max-bandwidth": 0}, {},
                             lambda n, d: None)
    source.start()
    source.join(30)
    assert source.status == "failed" and "without admitting it" in source.error
    assert not source._committed and src.state == "running"
    sink.close()
