"""Shared fixtures: a running node daemon, free ports, and the KVM requirement."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

# The VMM tests' fixtures (guest_images, vms) are available to every test file.
pytest_plugins = ("vmm_helpers",)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: subprocess.Popen
    qmp: str
    http: str
    log_path: str
    token: str | None = None     # the HTTP API's bearer token, from the state directory's http-token

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authenticate to the node's HTTP API."""
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_daemon(tmp_path, *extra: str, name: str = "test-node", wait: bool = True,
                 namespace: str | None = None, env: dict[str, str] | None = None) -> Daemon:
    """A node daemon; in ``namespace`` if given (``ip netns exec`` execs it, so the PID is the daemon's),
    with ``env`` added to its environment."""
    qmp = str(tmp_path / f"{name}.qmp")
    http = f"127.0.0.1:{free_port()}"
    log_path = str(tmp_path / f"{name}.log")
    argv = [sys.executable, "-m", "appliance.cli", "serve", "--name", name, "--qmp", qmp, "--http", http,
            "--state-dir", str(tmp_path), *extra]
    if namespace:
        argv = ["ip", "netns", "exec", namespace, *argv]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    daemon = Daemon(proc, qmp, http, log_path)
    if wait:
        deadline = time.monotonic() + 20
        while "ready" not in daemon.log():
            if not daemon.alive() or time.monotonic() > deadline:
                stop_daemon(daemon)
                raise RuntimeError(f"daemon did not start:\n{daemon.log()}")
            time.sleep(0.05)
        token_file = tmp_path / "http-token"
        if token_file.exists():
            daemon.token = token_file.read_text().strip()
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    if daemon.alive():
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(10)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()


MEMDIRTY_GUEST = ["--guest", "memdirty", "-m", "32", "--append", "mib=4 rate=0"]


@pytest.fixture
def pair(tmp_path, guest_images):
    """start(*flags, name=...) starts a memdirty node daemon; all are stopped afterwards."""
    started = []

    def start(*extra, name):
        d = start_daemon(tmp_path, *MEMDIRTY_GUEST, *extra, name=name)
        started.append(d)
        return d

    yield start
    for d in started:
        stop_daemon(d)


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path)
    yield d
    stop_daemon(d)
    assert d.proc.returncode == 0, d.log()


@pytest.fixture(scope="session")
def kvm_device():
    """KVM tests are real tests: without /dev/kvm they fail, loudly, never skip."""
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: this test needs KVM (kvm_pvm or hardware KVM)", pytrace=False)
    return "/dev/kvm"
