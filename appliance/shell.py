"""``colo-appliance qmp SOCKET``: an interactive QMP shell, as QEMU's qmp-shell, on readline.

Input is qmp-shell's syntax, ``COMMAND key=value ...`` (a value that parses as JSON
is taken as JSON, ``k='a b'`` is a string, ``a.b=1`` builds ``{"a": {"b": 1}}``), or a raw JSON request
``{"execute": ...}``.  Tab completes command names, argument names and enum values
from the node's schema; ``help [COMMAND]`` answers from the schema's doc comments
without asking the node.  Events are printed as they arrive, also while the prompt
waits for input: a reader thread takes the node's messages into an inbox and wakes the
main thread, which alone prints and alone drives readline (readline is not thread-safe).
Ctrl-C drops the line being typed (or stops waiting for a reply), Ctrl-D leaves.  History is kept
in $XDG_STATE_HOME/colo-appliance/qmp-history, else ~/.colo-appliance-qmp-history.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import select
import signal
import sys
import textwrap
import threading
import time

from .cli import QMPClientError, SyncQMPClient
from .qapi import Schema, default_schema
from .qapi.schema import Enum

PROMPT = "(QMP) "
# qmp-shell's words: split at blanks outside quotes; quotes stay, so JSON values keep theirs.
WORD = re.compile(r"""(?:[^\s"']|"(?:\\.|[^"])*"|'(?:\\.|[^'])*')+""")
LOCAL_COMMANDS = ("help",)


class InputError(Exception):
    """A line the shell cannot turn into a QMP request."""


def history_path() -> str:
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home:
        return os.path.join(state_home, "colo-appliance", "qmp-history")
    return os.path.expanduser("~/.colo-appliance-qmp-history")


def parse_line(line: str) -> dict:
    """A QMP request from one line of input: raw JSON, or ``COMMAND key=value ...``."""
    if line.startswith(("{", "[")):
        try:
            request = json.loads(line)
        except ValueError as e:
            raise InputError(f"invalid JSON: {e}") from None
        if not isinstance(request, dict) or not ({"execute", "exec-oob"} & request.keys()):
            raise InputError('a JSON request needs "execute", e.g. {"execute": "query-status"}')
        return request
    words = WORD.findall(line)
    if WORD.sub("", line).strip():
        raise InputError("unclosed quotation")
    arguments: dict = {}
    for word in words[1:]:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise InputError(f"expected key=value, got {word!r}")
        if len(text) >= 2 and text[0] == text[-1] == "'":
            value = text[1:-1]          # single quotes: a string as it stands
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = text
        *parents, leaf = key.split(".")
        target = arguments
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise InputError(f"{key}: {parent} is both a value and an object")
        target[leaf] = value
    request: dict = {"execute": words[0]}
    if arguments:
        request["arguments"] = arguments
    return request


def completions(schema: Schema, line: str) -> list[str]:
    """What may replace the last word of ``line`` (the text before the cursor).  Python's readline
    appends nothing to a completion: a finished word carries its space, ``key=`` none."""
    words = line.split(" ")
    text = words[-1]
    if len(words) == 1 or words[0] == "help" and len(words) == 2:
        names = list(schema.commands) + (list(LOCAL_COMMANDS) if len(words) == 1 else list(schema.events))
        return sorted(f"{n} " for n in names if n.startswith(text))
    command = schema.commands.get(words[0])
    if command is None or command.args is None:
        return []
    members = {m.name: m for m in command.args.members}
    if "=" in text:
        key, _, prefix = text.partition("=")
        member = members.get(key)
        if member is None:
            return []
        kind = schema.types.get(member.type) if isinstance(member.type, str) else None
        values = kind.values if isinstance(kind, Enum) else ["true", "false"] if member.type == "bool" else []
        return [f"{key}={v} " for v in values if v.startswith(prefix)]
    given = {w.partition("=")[0] for w in words[1:-1]}
    return [f"{name}=" for name in members if name.startswith(text) and name not in given]


def _type_name(typ) -> str:
    return f"[{typ[0]}]" if isinstance(typ, list) else typ


def command_help(schema: Schema, name: str) -> str:
    """``help NAME``: the call's shape, then its doc comment from the schema."""
    definition = schema.commands.get(name) or schema.events.get(name)
    if definition is None:
        raise InputError(f"no command or event named {name!r} in the schema (help lists them)")
    members = definition.args.members if definition.args is not None else []
    shape = [f"[{m.name}={_type_name(m.type)}]" if m.optional else f"{m.name}={_type_name(m.type)}"
             for m in members]
    kind = "command" if name in schema.commands else "event"
    doc = definition.doc.splitlines()
    if doc and doc[0].strip() == f"@{name}:":
        doc = doc[1:]
    body = "\n".join(line[1:] if line.startswith("@") else line for line in doc).strip("\n")
    return f"{kind} {' '.join([name, *shape])}\n\n{textwrap.indent(body, '    ')}".rstrip() + "\n"


def overview(schema: Schema) -> str:
    """``help``: every command, and how to use the shell."""
    names = sorted(schema.commands)
    width = max(map(len, names)) + 2
    per_line = max(1, 96 // width)
    rows = [" ".join(n.ljust(width) for n in names[i:i + per_line]).rstrip() for i in range(0, len(names), per_line)]
    return ("Commands (help COMMAND shows one; help EVENT an event):\n" + "\n".join(rows) + "\n\n"
            "Input: COMMAND key=value ... (JSON values, a.b=1 nests), or a JSON request {\"execute\": ...}.\n"
            "Tab completes names; Ctrl-C drops the line; Ctrl-D quits.\n")


def _nonblocking_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


LINE_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class LineEditor:
    """GNU readline's callback interface, fed one key at a time by the shell's own select() loop.

    input() runs CPython's loop instead, which acts on a signal only when it interrupts select():
    a Ctrl-C that lands while readline still handles the previous key is noted, then ignored
    until Enter.  Here a signal is a byte on a wakeup pipe that the loop selects on, and the loop
    also prints the node's events above the prompt, all on the main thread."""

    def __init__(self):
        import readline         # sets up the completer and history that the callback interface shares
        self.lib = ctypes.CDLL(readline.__file__)     # the module's handle also resolves libreadline's symbols
        self.libc = ctypes.CDLL(None)
        self.lib.rl_callback_handler_install.argtypes = [ctypes.c_char_p, LINE_HANDLER]
        self.lib.rl_free.argtypes = [ctypes.c_void_p]
        self.libc.fflush.argtypes = [ctypes.c_void_p]
        # Readline's own handlers would eat Ctrl-C inside rl_callback_read_char: the shell's loop owns it.
        ctypes.c_int.in_dll(self.lib, "rl_catch_signals").value = 0
        self.on_line = LINE_HANDLER(self._take_line)      # kept alive: readline holds the pointer
        self.active = False
        self.done = False
        self.line: bytes | None = None

    def start(self, prompt: str) -> None:
        """Draw the prompt and take keys into a new line."""
        self.done, self.line = False, None
        self.lib.rl_callback_handler_install(prompt.encode(), self.on_line)
        self.active = True

    def feed(self) -> bool:
        """Handle one key from stdin; True once the line is complete (``line`` None: Ctrl-D)."""
        self.lib.rl_callback_read_char()
        return self.done

    def _take_line(self, text: int | None) -> None:
        self.line = ctypes.string_at(text) if text else None
        self.lib.rl_free(text)
        self.lib.rl_callback_handler_remove()
        self.active = False
        self.done = True

    def cancel(self) -> None:
        """Drop the half-typed line and give the terminal back, as CPython does on Ctrl-C."""
        self.lib.rl_free_line_state()
        self.lib.rl_callback_sigcleanup()
        self.lib.rl_cleanup_after_signal()
        self.lib.rl_callback_handler_remove()
        self.active = False

    def print_above(self, text: str, stream) -> None:
        """Print ``text`` where the prompt was, then the prompt and the half-typed line again below it
        (readline.redisplay() would draw only what changed: nothing)."""
        self.lib.rl_clear_visible_line()
        self.libc.fflush(None)          # readline writes through C's buffered stdout
        print(text, file=stream, flush=True)
        self.lib.rl_forced_update_display()

    def resize(self) -> None:
        self.lib.rl_resize_terminal()


def _wake_only(signum, frame) -> None:
    """A Python-level handler, so the signal reaches the wakeup pipe; the select() loop acts on it."""


def _save_history(path: str) -> None:
    """After every line, so a killed shell loses nothing."""
    import readline
    if os.path.exists(path):
        readline.append_history_file(1, path)
    else:
        readline.write_history_file(path)


class QMPShell:
    """One interactive session on a negotiated connection."""

    def __init__(self, client: SyncQMPClient, schema: Schema | None = None):
        self.client = client
        self.schema = schema or default_schema()
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()   # as input() decides on readline
        self.editor = LineEditor() if self.interactive else None
        self.piped_input = b""          # read from a non-terminal stdin, not yet a whole line
        # The reader thread puts each message (None: the connection ended) and rings the doorbell.
        self.inbox: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self.doorbell_r, self.doorbell_w = _nonblocking_pipe()
        self.signals_r, self.signals_w = _nonblocking_pipe()    # signal.set_wakeup_fd writes signal numbers
        self.read_error: str | None = None
        self.closed = False
        self.next_id = 0
        self.quit_sent = False          # then the node closing the connection is what was asked
        self.matches: list[str] = []
        self.reader = threading.Thread(target=self._read_loop, name="qmp-shell-reader", daemon=True)

    # -- output (main thread only) ----------------------------------------------------

    def show(self, text: str, stream=None) -> None:
        """Print; while the prompt waits for input, above it, and draw the prompt and the line again."""
        stream = stream or sys.stdout
        if self.editor is not None and self.editor.active:
            self.editor.print_above(text, stream)
        else:
            print(text, file=stream, flush=True)

    def show_event(self, event: dict) -> None:
        stamp = event.get("timestamp", {})
        when = time.strftime("%H:%M:%S", time.localtime(stamp.get("seconds", time.time())))
        when += f".{stamp.get('microseconds', 0) // 1000:03d}"
        data = f" {json.dumps(event['data'], sort_keys=True)}" if "data" in event else ""
        self.show(f"{when} event {event['event']}{data}")

    # -- the connection -------------------------------------------------------------

    def _read_loop(self) -> None:
        """The reader thread: it only passes messages on, never prints or touches readline."""
        try:
            for line in self.client.file:
                self._deliver(json.loads(line))
        except (OSError, ValueError) as e:
            self.read_error = f"error: reading from the node: {e}"
        self._deliver(None)

    def _deliver(self, message: dict | None) -> None:
        self.inbox.put(message)
        try:
            os.write(self.doorbell_w, b"\0")
        except BlockingIOError:         # the pipe is full: the main thread has been woken already
            pass

    def _wait(self, *fds: int) -> list[int]:
        """Sleep until the node sent something, a signal came, or one of ``fds`` can be read.  Ctrl-C
        raises KeyboardInterrupt here, at a known point: its byte on the wakeup pipe wakes this select()
        even when the signal landed before it, and no handler raises inside readline's callbacks."""
        ready, _, _ = select.select([*fds, self.doorbell_r, self.signals_r], [], [])
        if self.doorbell_r in ready:
            _drain(self.doorbell_r)
        if self.signals_r in ready:
            signals = _drain(self.signals_r)
            if signal.SIGWINCH in signals and self.editor is not None:
                self.editor.resize()
            if signal.SIGINT in signals:
                raise KeyboardInterrupt
        return ready

    def _next_reply(self) -> dict | None:
        """Print the events that came in, in order, up to the next reply; that reply, or None once
        the inbox is empty.  Call before every _wait(): the doorbell rang for what is still here."""
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return None
            if message is None:
                self.closed = True
                if self.read_error:
                    self.show(self.read_error, sys.stderr)
                return None
            if "event" not in message:
                return message
            self.show_event(message)

    def execute(self, request: dict) -> dict | None:
        """Send ``request``; its reply, or None when Ctrl-C stopped the wait."""
        if "id" not in request:
            self.next_id += 1
            request = {**request, "id": f"shell-{self.next_id}"}
        self.client.file.write(json.dumps(request).encode() + b"\n")
        self.client.file.flush()
        try:
            while True:
                reply = self._next_reply()
                if reply is None:
                    if self.closed:
                        raise QMPClientError("connection closed by the node")
                    self._wait()
                elif reply.get("id") == request["id"]:
                    return reply
        except KeyboardInterrupt:
            self.show("(no longer waiting for the reply)", sys.stderr)
            return None

    # -- input ----------------------------------------------------------------------

    def _show_events(self) -> None:
        """At the prompt: print what came in.  A reply here is one whose wait Ctrl-C stopped: dropped."""
        while self._next_reply() is not None:
            pass

    def read_line(self) -> str | None:
        """The next line of input; None at its end (Ctrl-D) or when the node closed the connection."""
        if self.editor is None:
            return self._read_piped_line()
        stdin = sys.stdin.fileno()
        self.editor.start(PROMPT)
        try:
            while True:
                self._show_events()
                if self.closed:
                    self.editor.cancel()
                    print()
                    return None
                if stdin in self._wait(stdin) and self.editor.feed():
                    line = self.editor.line
                    return None if line is None else line.decode(sys.stdin.encoding, "replace")
        except KeyboardInterrupt:
            self.editor.cancel()
            raise

    def _read_piped_line(self) -> str | None:
        stdin = sys.stdin.fileno()
        print(PROMPT, end="", flush=True)
        while b"\n" not in self.piped_input:
            self._show_events()
            if self.closed:
                return None
            if stdin in self._wait(stdin):
                chunk = os.read(stdin, 65536)
                if not chunk:
                    rest, self.piped_input = self.piped_input, b""
                    return rest.decode(sys.stdin.encoding, "replace") if rest else None
                self.piped_input += chunk
        line, _, self.piped_input = self.piped_input.partition(b"\n")
        return line.decode(sys.stdin.encoding, "replace")

    # -- the session ------------------------------------------------------------------

    def complete(self, text: str, state: int) -> str | None:
        import readline
        if state == 0:
            self.matches = completions(self.schema, readline.get_line_buffer()[:readline.get_endidx()])
        return self.matches[state] if state < len(self.matches) else None

    def handle(self, line: str) -> None:
        words = line.split()
        if words[0] in LOCAL_COMMANDS:
            if len(words) > 2:
                raise InputError("usage: help [COMMAND]")
            self.show(command_help(self.schema, words[1]) if len(words) == 2 else overview(self.schema))
            return
        request = parse_line(line)
        reply = self.execute(request)
        if reply is None:
            return
        if "error" in reply:
            self.show(f"error: {reply['error']['class']}: {reply['error']['desc']}", sys.stderr)
        else:
            self.quit_sent = request.get("execute") == "quit"
            self.show(json.dumps(reply["return"], indent=2, sort_keys=True))

    @contextlib.contextmanager
    def signals_to_the_loop(self):
        """Ctrl-C and window resizes come to the select() loop as bytes on the wakeup pipe."""
        watched = (signal.SIGINT, signal.SIGWINCH)
        previous_handlers = {signum: signal.signal(signum, _wake_only) for signum in watched}
        previous_wakeup_fd = signal.set_wakeup_fd(self.signals_w)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_wakeup_fd)
            for signum, handler in previous_handlers.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def run(self) -> int:
        with self.signals_to_the_loop():
            return self._session()

    def _session(self) -> int:
        import readline
        history = history_path()
        os.makedirs(os.path.dirname(history), exist_ok=True)
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.set_history_length(1000)
        readline.set_completer(self.complete)
        readline.set_completer_delims(" ")
        readline.parse_and_bind("tab: complete")
        self.client.sock.settimeout(None)      # idle at the prompt as long as the operator likes
        version = self.client.greeting["QMP"]["version"]
        print(f"connected: {version['package']}; help lists the commands, Tab completes, Ctrl-D quits")
        for event in self.client.events:
            self.show_event(event)
        self.reader.start()
        try:
            while not self.closed:
                try:
                    line = self.read_line()
                except KeyboardInterrupt:
                    print()
                    continue
                if line is None:
                    if self.closed:
                        break
                    print()
                    return 0
                line = line.strip()
                if not line:
                    continue
                readline.add_history(line)
                try:
                    self.handle(line)
                except InputError as e:
                    self.show(f"error: {e}", sys.stderr)
                finally:
                    _save_history(history)
            self.show("the node quit" if self.quit_sent else "connection closed by the node", sys.stderr)
            return 0 if self.quit_sent else 1
        except QMPClientError as e:
            self.show(f"error: {e}", sys.stderr)
            return 1
