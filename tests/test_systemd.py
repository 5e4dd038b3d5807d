"""systemd integration: sd_notify as a Type=notify unit sees it (a fake NOTIFY_SOCKET: systemd is
not PID 1 here), and the unit file as systemd-analyze judges it."""
import grp
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
import pytest

from appliance.cli import build_parser
from conftest import REPO, free_port, start_daemon, stop_daemon
from test_qmp_robustness import connect as qmp_connect

GUEST = ["--guest", "memdirty", "-m", "32", "--append", "mib=4 rate=0"]
NOBODY = 65534


def reply(f) -> dict:
    """The next reply, past any events."""
    while "event" in (message := json.loads(f.readline())):
        pass
    return message


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with its arrival time."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.messages: list[tuple[float, str]] = []

    def next(self, timeout: float = 20) -> str:
        self.sock.settimeout(timeout)
        text = self.sock.recv(4096).decode()
        self.messages.append((time.monotonic(), text))
        return text

    def next_besides_watchdog(self, timeout: float = 20) -> str:
        while (text := self.next(timeout)) == "WATCHDOG=1":
            pass
        return text

    def close(self):
        self.sock.close()


def test_notify_ready_status_watchdog_stopping(tmp_path, guest_images):
    systemd = FakeSystemd(str(tmp_path / "notify"))
    d = start_daemon(tmp_path, *GUEST, wait=False,
                     env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    try:
        assert systemd.next() == "READY=1\nSTATUS=guest running; migration none; COLO none"
        # READY means both listen: QMP and HTTP answer at once.
        s, f = qmp_connect(d.qmp)
        with pytest.raises(urllib.error.HTTPError) as unauthorised:
            urllib.request.urlopen(f"http://{d.http}/api/status", timeout=5)
        assert unauthorised.value.code == 401
        # Watchdog pings every WATCHDOG_USEC/2 = 100 ms.
        pings = [systemd.next(2) for _ in range(10)]
        assert pings == ["WATCHDOG=1"] * 10
        times = [t for t, _ in systemd.messages[-10:]]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert 0.05 < sum(gaps) / len(gaps) < 0.2, gaps
        # A change of state is told.
        s.sendall(b'{"execute": "stop", "id": 1}\n')
        assert reply(f) == {"return": {}, "id": 1}
        assert systemd.next_besides_watchdog() == "STATUS=guest paused; migration none; COLO none"
        s.sendall(b'{"execute": "cont", "id": 2}\n')
        assert reply(f) == {"return": {}, "id": 2}
        assert systemd.next_besides_watchdog() == "STATUS=guest running; migration none; COLO none"
        s.close()
        d.proc.send_signal(signal.SIGTERM)
        assert systemd.next_besides_watchdog() == "STOPPING=1\nSTATUS=stopping"
        assert d.proc.wait(20) == 0, d.log()
        systemd.sock.settimeout(0.2)
        rest = []
        while True:
            try:
                rest.append(systemd.sock.recv(4096).decode())
            except TimeoutError:
                break
        assert set(rest) <= {"WATCHDOG=1"}, rest          # nothing after STOPPING but pings
    finally:
        stop_daemon(d)
        systemd.close()


def test_notify_abstract_socket_and_migration_status(tmp_path, guest_images):
    """An abstract NOTIFY_SOCKET (@name); no WATCHDOG_USEC, no pings; a migration's states are told."""
    name = f"@colo-appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    systemd = FakeSystemd(name)
    d = start_daemon(tmp_path, *GUEST, wait=False, env={"NOTIFY_SOCKET": name})
    try:
        assert systemd.next() == "READY=1\nSTATUS=guest running; migration none; COLO none"
        s, f = qmp_connect(d.qmp)
        s.sendall(json.dumps({"execute": "migrate", "arguments": {"uri": "exec:cat > /dev/null"}, "id": 1}).encode())
        assert reply(f) == {"return": {}, "id": 1}
        seen = []
        while not seen or seen[-1] != "STATUS=guest postmigrate; migration completed; COLO none":
            seen.append(systemd.next())
        assert "WATCHDOG=1" not in seen
        assert all(message.startswith("STATUS=guest ") for message in seen), seen
        s.close()
    finally:
        stop_daemon(d)
        systemd.close()
    assert d.proc.returncode == 0, d.log()


def test_exec_children_do_not_inherit_notify_socket(tmp_path, guest_images):
    """The daemon drops NOTIFY_SOCKET from its environment: an exec: child cannot talk to systemd as it."""
    systemd = FakeSystemd(str(tmp_path / "notify"))
    env_dump = tmp_path / "child.env"
    d = start_daemon(tmp_path, *GUEST, wait=False,
                     env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "5000000"})
    try:
        assert systemd.next().startswith("READY=1")
        s, f = qmp_connect(d.qmp)
        uri = f"exec:env > {env_dump}; cat > /dev/null"
        s.sendall(json.dumps({"execute": "migrate", "arguments": {"uri": uri}, "id": 1}).encode())
        assert reply(f) == {"return": {}, "id": 1}
        deadline = time.monotonic() + 20
        while not env_dump.exists() or "PATH=" not in env_dump.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "NOTIFY_SOCKET" not in env_dump.read_text() and "WATCHDOG_USEC" not in env_dump.read_text()
        s.close()
    finally:
        stop_daemon(d)
        systemd.close()


# -- the unit file ---------------------------------------------------------------------------

UNIT = os.path.join(REPO, "systemd", "colo-appliance@.service")


def installed_unit(tmp_path) -> str:
    """The unit as `make install` would place it, but pointing at this checkout."""
    text = open(UNIT).read().replace("/opt/colo-appliance", REPO)
    path = tmp_path / "colo-appliance@.service"
    path.write_text(text)
    return str(path)


def test_unit_verifies_clean_and_its_exposure_is_the_documented_one(tmp_path):
    unit = installed_unit(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", unit],
                              capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout).group(1))
    assert score <= 4.0, security.stdout
    with open(os.path.join(REPO, "docs", "systemd.md")) as f:
        assert f"exposure level {score:.1f}" in f.read(), "docs/systemd.md states another score"


def test_unit_command_line_is_the_daemons():
    """Every flag ExecStart passes is one `serve` takes (a typo would fail every start)."""
    text = open(UNIT).read().replace("\\\n", " ")
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).replace("%i", "node-a")
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/colo-appliance")
    args = build_parser().parse_args(argv[1:])
    assert args.cmd == "serve" and args.http_only_if_configured and args.qmp == "/run/colo-appliance/node-a.qmp"


def test_the_units_user_runs_a_guest_with_a_tap(guest_images):
    """As the unit runs it: not root, only the kvm group and CAP_NET_ADMIN, umask 0027 (setpriv
    stands in for systemd): the guest boots, its tap joins the bridge, its console log is 0640."""
    namespace = f"sdu-{os.getpid()}"
    work = tempfile.mkdtemp(prefix="colo-unit-")
    os.chown(work, NOBODY, NOBODY)
    qmp = os.path.join(work, "node.qmp")
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    proc = None
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "add", "br0", "type", "bridge"], check=True)
        argv = ["ip", "netns", "exec", namespace, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                f"--groups={grp.getgrnam('kvm').gr_gid}", "--inh-caps=-all,+net_admin",
                "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin", "--no-new-privs",
                sys.executable, "-m", "appliance.cli", "serve", "--name", "unit", "--qmp", qmp, "--no-http",
                "--state-dir", work, *GUEST, "--nic", "tap=tap0,bridge=br0"]
        with open(os.path.join(work, "log"), "w") as log:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: os.umask(0o027))
        deadline = time.monotonic() + 30
        while not os.path.exists(qmp):
            assert proc.poll() is None and time.monotonic() < deadline, open(os.path.join(work, "log")).read()
            time.sleep(0.1)
        s, f = qmp_connect(qmp)
        s.sendall(b'{"execute": "query-status", "id": 1}\n')
        assert reply(f)["return"]["status"] == "running"
        # An exec: command runs without the daemon's CAP_NET_ADMIN.
        caps = os.path.join(work, "caps")
        uri = f"exec:grep ^Cap /proc/self/status > {caps}.part && mv {caps}.part {caps}; cat > /dev/null"
        s.sendall(json.dumps({"execute": "migrate", "arguments": {"uri": uri}, "id": 2}).encode())
        assert reply(f) == {"return": {}, "id": 2}
        while not os.path.exists(caps):
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        status = dict(line.split(":\t") for line in open(caps).read().splitlines())
        assert int(status["CapEff"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
        s.close()
        assert psutil.Process(proc.pid).uids().effective == NOBODY
        with open(f"/proc/{proc.pid}/status") as proc_status:       # the daemon itself keeps it
            assert int(re.search(r"CapEff:\t(\w+)", proc_status.read()).group(1), 16) == 1 << 12   # CAP_NET_ADMIN
        links = subprocess.run(["ip", "netns", "exec", namespace, "ip", "-o", "link", "show", "master", "br0"],
                               capture_output=True, text=True, check=True).stdout
        assert "tap0" in links
        console = os.stat(os.path.join(work, "unit-console.log"))
        assert stat.S_IMODE(console.st_mode) == 0o640 and console.st_uid == NOBODY
        assert stat.S_IMODE(os.stat(qmp).st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", namespace], check=True)
        shutil.rmtree(work)


# -- instances side by side, and a guest that left ----------------------------------------------

def serve_argv(tmp_path, name, *extra):
    return [sys.executable, "-m", "appliance.cli", "serve", "--name", name, "--qmp", str(tmp_path / f"{name}.qmp"),
            "--state-dir", str(tmp_path / name), *extra]


def test_instances_take_their_http_address_from_their_config(tmp_path):
    """With the unit's flags, two instances side by side: one at its config's address, one whose
    config names none without an HTTP API (not dying on the other's :8080); a third configured onto
    a taken address fails with a clear error, and the first keeps serving."""
    port = free_port()
    (tmp_path / "a.toml").write_text(f'[node]\nhttp = "127.0.0.1:{port}"\n')
    (tmp_path / "b.toml").write_text("[node]\n")
    nodes = []
    try:
        for name in ("a", "b"):
            log = open(tmp_path / f"{name}.log", "w+")
            proc = subprocess.Popen(serve_argv(tmp_path, name, "--config", str(tmp_path / f"{name}.toml"),
                                               "--http-only-if-configured"),
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            nodes.append((proc, log))
        for proc, log in nodes:
            deadline = time.monotonic() + 30
            while "ready" not in (text := open(log.name).read()):
                assert proc.poll() is None and time.monotonic() < deadline, text
                time.sleep(0.05)
        assert f"HTTP http://127.0.0.1:{port}" in open(tmp_path / "a.log").read()
        b_log = open(tmp_path / "b.log").read()
        assert "HTTP API off: the config file sets no http address" in b_log and "no HTTP" in b_log
        (tmp_path / "c.toml").write_text(f'[node]\nhttp = "127.0.0.1:{port}"\n')
        c = subprocess.run(serve_argv(tmp_path, "c", "--config", str(tmp_path / "c.toml"), "--http-only-if-configured"),
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert c.returncode == 1
        assert (f"cannot start: HTTP address 127.0.0.1:{port}: Address already in use; every node on a host "
                "needs its own address: set http in its config file") in c.stderr
        assert "Traceback" not in c.stderr
        with pytest.raises(urllib.error.HTTPError) as unauthorised:     # a still answers
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
        assert unauthorised.value.code == 401
    finally:
        for proc, log in nodes:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            log.close()


def test_a_guest_that_migrated_away_is_not_booted_again(tmp_path, guest_images):
    """A node whose guest migrated away crashes (SIGKILL; Restart= would start it again): the new
    start refuses to boot a second copy, with exit status 2 (RestartPreventExitStatus=2) and a
    message that says how to clear it.  Taking the guest back with --incoming is allowed and clears it."""
    saved = tmp_path / "guest.mig"
    src = start_daemon(tmp_path, *GUEST, name="src")
    try:
        s, f = qmp_connect(src.qmp)
        s.sendall(json.dumps({"execute": "migrate", "arguments": {"uri": f"exec:cat > {saved}"}, "id": 1}).encode())
        assert reply(f) == {"return": {}, "id": 1}
        deadline = time.monotonic() + 60
        while True:
            s.sendall(b'{"execute": "query-migrate", "id": 2}\n')
            if reply(f)["return"]["status"] == "completed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.close()
        marker = tmp_path / "src.migrated-away"
        record = json.loads(marker.read_text())
        assert record["destination"] == f"exec:cat > {saved}" and stat.S_IMODE(marker.stat().st_mode) == 0o600
    finally:
        src.proc.kill()         # the crash the test is about (and no daemon left behind if it fails)
        src.proc.wait()

    again = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--name", "src", "--qmp", src.qmp,
                            "--no-http", "--state-dir", str(tmp_path), *GUEST],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert (f"node src: its guest migrated away to exec:cat > {saved} at {record['time']} (guest "
            f"{record['uuid']}); booting it here again would run a second copy. If the guest no longer runs "
            f"there, remove {marker} and start again; to take it back, start this node with --incoming and "
            "migrate it here") in again.stderr
    assert "Traceback" not in again.stderr

    back = start_daemon(tmp_path, *GUEST, "--incoming", f"exec:cat {saved}", name="src")
    try:
        s, f = qmp_connect(back.qmp)
        deadline = time.monotonic() + 60
        while True:
            s.sendall(b'{"execute": "query-migrate", "id": 3}\n')
            if reply(f)["return"].get("status") == "completed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.close()
        assert not marker.exists()
    finally:
        stop_daemon(back)
    normal = start_daemon(tmp_path, *GUEST, name="src")        # boots again
    stop_daemon(normal)
    assert normal.proc.returncode == 0, normal.log()
