"""systemd integration: sd_notify as a Type=notify unit sees it (a fake NOTIFY_SOCKET: systemd is
not PID 1 here), and the unit file as systemd-analyze judges it."""
import json
import os
import signal
import socket
import time
import urllib.request

import pytest

from conftest import start_daemon, stop_daemon
from test_qmp_robustness import connect as qmp_connect

GUEST = ["--guest", "memdirty", "-m", "32", "--append", "mib=4 rate=0"]


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
