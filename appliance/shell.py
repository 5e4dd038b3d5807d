"""``colo-appliance qmp SOCKET``: an interactive QMP shell, as QEMU's qmp-shell, on readline.

Input is qmp-shell's syntax, ``COMMAND key=value ...`` (a value that parses as JSON
is taken as JSON, ``k='a b'`` is a string, ``a.b=1`` builds ``{"a": {"b": 1}}``), or a raw JSON request
``{"execute": ...}``.  Tab completes command names, argument names and enum values
from the node's schema; ``help [COMMAND]`` answers from the schema's doc comments
without asking the node.  Events are printed as they arrive, also while the prompt
waits for input (a reader thread prints them and redraws the prompt).  Ctrl-C drops
the line being typed (or stops waiting for a reply), Ctrl-D leaves.  History is kept
in $XDG_STATE_HOME/colo-appliance/qmp-history, else ~/.colo-appliance-qmp-history.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import re
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


def _redraw_prompt() -> None:
    """Draw the prompt and the half-typed line again on a fresh line.  Python's readline.redisplay()
    only draws what changed, so nothing; GNU readline's rl_forced_update_display draws it all (the
    main thread waits in select() meanwhile, and this thread holds the GIL that readline needs)."""
    import readline
    try:
        ctypes.CDLL(readline.__file__).rl_forced_update_display()
    except (OSError, AttributeError):       # not GNU readline (libedit): draw it by hand
        sys.stdout.write(PROMPT + readline.get_line_buffer())
        sys.stdout.flush()


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
        self.interactive = sys.stdin.isatty()
        self.replies: queue.Queue[dict | None] = queue.Queue()
        self.closed = False
        self.at_prompt = False
        self.print_lock = threading.Lock()
        self.next_id = 0
        self.quit_sent = False          # then the node closing the connection is what was asked
        self.matches: list[str] = []
        self.reader = threading.Thread(target=self._read_loop, name="qmp-shell-reader", daemon=True)

    # -- output ---------------------------------------------------------------------

    def show(self, text: str, stream=None) -> None:
        """Print, also from the reader thread while the prompt waits: clear the prompt's line,
        print, and let readline draw the prompt and the half-typed line again."""
        stream = stream or sys.stdout
        with self.print_lock:
            if self.at_prompt and self.interactive:
                sys.stdout.write("\r\x1b[K")
                sys.stdout.flush()
                print(text, file=stream, flush=True)
                _redraw_prompt()
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
        # Ctrl-C must reach the main thread: readline's select() there sees it only if the
        # kernel delivers SIGINT to that thread, not to this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for line in self.client.file:
                message = json.loads(line)
                if "event" in message:
                    self.show_event(message)
                else:
                    self.replies.put(message)
        except (OSError, ValueError) as e:
            self.show(f"error: reading from the node: {e}", sys.stderr)
        self.closed = True
        self.replies.put(None)
        if self.at_prompt:
            self.show("the node quit" if self.quit_sent else "connection closed by the node", sys.stderr)
            os.kill(os.getpid(), signal.SIGINT)     # wake input() so the session ends

    def execute(self, request: dict) -> dict | None:
        """Send ``request``; its reply, or None when Ctrl-C stopped the wait."""
        if "id" not in request:
            self.next_id += 1
            request = {**request, "id": f"shell-{self.next_id}"}
        self.client.file.write(json.dumps(request).encode() + b"\n")
        self.client.file.flush()
        try:
            while True:
                try:
                    reply = self.replies.get(timeout=0.2)
                except queue.Empty:
                    continue
                if reply is None:
                    raise QMPClientError("connection closed by the node")
                if reply.get("id") == request["id"]:
                    return reply
        except KeyboardInterrupt:
            self.show("(no longer waiting for the reply)", sys.stderr)
            return None

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

    def run(self) -> int:
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
                    self.at_prompt = True
                    line = input(PROMPT).strip()
                except EOFError:
                    print()
                    return 0
                except KeyboardInterrupt:
                    print()
                    continue
                finally:
                    self.at_prompt = False
                if not line:
                    continue
                if not self.interactive:
                    readline.add_history(line)
                try:
                    self.handle(line)
                except InputError as e:
                    self.show(f"error: {e}", sys.stderr)
                finally:
                    _save_history(history)
            return 0 if self.quit_sent else 1
        except QMPClientError as e:
            self.show(f"error: {e}", sys.stderr)
            return 1
