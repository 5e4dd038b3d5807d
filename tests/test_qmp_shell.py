"""The interactive QMP shell, typed at through a pseudo-terminal against a running node daemon."""
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from appliance.qapi import default_schema
from appliance.shell import InputError, QMPShell, command_help, completions, parse_line
from conftest import REPO, free_port, start_daemon, stop_daemon

CLI = [sys.executable, "-m", "appliance.cli"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """A process on a pty that is its controlling terminal (so Ctrl-C raises SIGINT, as for a user)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.master = master
        self.screen = b""       # everything the process wrote, escape sequences removed
        self.seen = 0           # how far expect() has matched

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:         # EIO: the process closed the terminal
            return False
        self.screen += ANSI.sub(b"", data)
        return bool(data)

    def expect(self, text: str, timeout: float = 15) -> str:
        """Wait until ``text`` appears after what was matched before; returns the output up to it."""
        needle = text.encode()
        deadline = time.monotonic() + timeout
        while needle not in self.screen[self.seen:]:
            if time.monotonic() > deadline or (not self._read(0.1) and self.proc.poll() is not None):
                raise AssertionError(f"{text!r} not shown; the screen since the last match:\n"
                                     f"{self.screen[self.seen:].decode(errors='replace')}")
        end = self.screen.index(needle, self.seen) + len(needle)
        out, self.seen = self.screen[self.seen:end].decode(errors="replace"), end
        return out

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def command(self, line: str) -> str:
        """Type a line; what the shell printed for it, up to its next prompt."""
        self.type(line + "\r")
        self.expect(line + "\r\n")
        return self.expect("(QMP) ")

    def finish(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)
        return self.proc.wait()


@pytest.fixture
def shell(daemon, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "TERM": "xterm", "INPUTRC": "/dev/null"}
    env.pop("XDG_STATE_HOME", None)
    term = Terminal([*CLI, "qmp", daemon.qmp], env)
    term.expect("(QMP) ")
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.proc.wait()


def test_shell_session(shell, daemon, tmp_path):
    # Tab completes a command name, then an argument name (no space after '=').
    shell.type("migrate-set-param\t")
    shell.expect("migrate-set-parameters ")
    shell.type("downtime-l\t")
    shell.expect("downtime-limit=")
    assert shell.command("345").strip().startswith("{}")
    assert '"downtime-limit": 345' in shell.command("query-migrate-parameters")
    # Local help from the schema's doc comments.
    out = shell.command("help migrate")
    assert "command migrate uri=str [blk=bool]" in out
    assert "Migrates the current running guest to another Virtual Machine." in out
    assert "uri: the Uniform Resource Identifier" in out
    # A command's result; then its event.
    assert '"status": "running"' in shell.command("query-status")
    assert "event STOP" in shell.command("stop")
    # An event that arrives while the shell sits idle at the prompt.
    assert subprocess.run([*CLI, "qmp", daemon.qmp, "cont"], cwd=REPO, capture_output=True,
                          timeout=60).returncode == 0
    shell.expect("event RESUME")
    # ... and while a line is half typed: the prompt and the line come back, and the line goes on.
    shell.type("query-sta")
    shell.expect("query-sta")
    assert subprocess.run([*CLI, "qmp", daemon.qmp, "stop"], cwd=REPO, capture_output=True,
                          timeout=60).returncode == 0
    shell.expect("event STOP")
    shell.expect("(QMP) query-sta")
    assert '"status": "paused"' in shell.command("tus")
    shell.command("cont")
    # Raw JSON, with the caller's own id.
    assert '"status": "running"' in shell.command('{"execute": "query-status", "id": "mine"}')
    # Ctrl-C drops the half-typed line; the next one runs alone.
    shell.type("query-sta")
    shell.expect("query-sta")
    shell.type("\x03")
    shell.expect("(QMP) ")
    out = shell.command("query-version")
    assert '"package": "colo-appliance' in out and "not been found" not in out
    # Ctrl-D leaves with status 0 and no traceback.
    shell.type("\x04")
    assert shell.finish() == 0
    assert "Traceback" not in shell.screen.decode(errors="replace")
    history = (tmp_path / "home" / ".colo-appliance-qmp-history").read_text().splitlines()
    assert "help migrate" in history and "query-version" in history
    assert "query-migrate-parameters" in history


def test_ctrl_c_outside_the_wait_is_not_lost():
    # The shell's main thread is often not inside select() when Ctrl-C comes (readline is still
    # handling the key before it); CPython's input() loop then ignores the signal until Enter.
    shell = QMPShell(client=None)
    with shell.signals_to_the_loop():
        os.kill(os.getpid(), signal.SIGINT)     # lands now, before the shell waits
        give_up = threading.Timer(5, shell._deliver, [None])    # wakes a wait that missed it: DID NOT RAISE
        give_up.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                shell._wait()
        finally:
            give_up.cancel()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_shell_leaves_when_the_node_quits(shell, daemon):
    shell.type("quit\r")
    shell.expect("the node quit")
    assert shell.finish() == 0
    assert daemon.proc.wait(10) == 0
    assert "Traceback" not in shell.screen.decode(errors="replace")


def test_completions_from_the_schema():
    schema = default_schema()
    assert completions(schema, "query-migrate-c") == ["query-migrate-cache-size ", "query-migrate-capabilities "]
    assert completions(schema, "he") == ["help "]
    assert completions(schema, "help migrate-inc") == ["migrate-incoming "]
    assert completions(schema, "migrate ") == ["uri=", "blk=", "inc=", "detach=", "resume="]
    assert completions(schema, "migrate uri=tcp:x:1 blk=true ") == ["inc=", "detach=", "resume="]
    assert completions(schema, "migrate-set-parameters multifd-compression=z") == [
        "multifd-compression=zlib ", "multifd-compression=zstd "]
    assert completions(schema, "migrate detach=") == ["detach=true ", "detach=false "]
    assert completions(schema, "no-such-command ") == []


def test_input_syntax():
    assert parse_line("migrate uri=tcp:127.0.0.1:4444") == {"execute": "migrate",
                                                            "arguments": {"uri": "tcp:127.0.0.1:4444"}}
    assert parse_line('migrate-set-capabilities capabilities=[{"capability":"events","state":true}]') == {
        "execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events",
                                                                                "state": True}]}}
    assert parse_line("""x s='a b' t="c d" u=007x""") == {"execute": "x", "arguments": {"s": "a b", "t": "c d",
                                                                                       "u": "007x"}}
    assert parse_line("x a.b=1 a.c=two") == {"execute": "x", "arguments": {"a": {"b": 1, "c": "two"}}}
    assert parse_line('{"execute": "stop"}') == {"execute": "stop"}
    for bad in ('{"execute": ', '["stop"]', "migrate uri", "a 'unclosed"):
        with pytest.raises(InputError):
            parse_line(bad)


def test_help_text():
    text = command_help(default_schema(), "STOP")
    assert text.startswith("event STOP\n") and "Emitted when the virtual machine is stopped" in text
    with pytest.raises(InputError, match="no command or event named 'nope'"):
        command_help(default_schema(), "nope")


def test_shell_over_tcp_with_piped_input(tmp_path):
    port = free_port()
    d = start_daemon(tmp_path, "--qmp-tcp", f"127.0.0.1:{port}")
    try:
        result = subprocess.run([*CLI, "qmp", f"127.0.0.1:{port}"], input="stop\nbogus\nhelp stop\n", text=True,
                                capture_output=True, cwd=REPO, timeout=60,
                                env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
    finally:
        stop_daemon(d)
    assert result.returncode == 0, result.stderr
    assert "event STOP" in result.stdout and "Stop all guest VCPU execution." in result.stdout
    assert "error: CommandNotFound: The command bogus has not been found" in result.stderr
    assert (tmp_path / "state" / "colo-appliance" / "qmp-history").read_text().splitlines() == [
        "stop", "bogus", "help stop"]
