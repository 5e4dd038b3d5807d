"""The QMP server: QEMU's monitor protocol over UNIX and TCP sockets.

Per connection, as QEMU's ``monitor/qmp.c``::

    server: {"QMP": {"version": ..., "capabilities": ["oob"]}}      greeting
    client: {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
    server: {"return": {}}                                          command mode
    client: {"execute": CMD, "arguments": {...}, "id": ID}          in-band, in order
    client: {"exec-oob": CMD, "arguments": {...}, "id": ID}         out-of-band, at once
    server: {"return": ..., "id": ID} | {"error": {"class", "desc"}, "id": ID}
    server: {"event": NAME, "data": {...}, "timestamp": {...}}      to negotiated clients

Sockets are read with ``recvmsg`` so that file descriptors passed with
SCM_RIGHTS reach ``getfd``.  Parse errors are answered and the connection
kept.  What one client can make the daemon hold is bounded in bytes: reading
pauses while its queued requests exceed MAX_QUEUED_REQUEST_BYTES, and a client
whose unread replies and events exceed MAX_PENDING_REPLY_BYTES is dropped.
Beyond ``max_clients`` connections a new one gets one error and is closed.
"""
from __future__ import annotations

import array
import asyncio
import enum
import json
import logging
import os
import socket
from typing import Callable

from appliance.qapi import QMPError

from .dispatch import CallContext, Dispatcher
from .events import EventBus
from .jsonstream import JSONStreamer, ParseError, parse

log = logging.getLogger(__name__)

MAX_QUEUED_REQUESTS = 64       # in-band requests waiting; reading pauses beyond this
MAX_QUEUED_REQUEST_BYTES = 16 << 20   # ... or beyond this many bytes of them
MAX_PENDING_REPLY_BYTES = 8 << 20     # replies and events not yet written; the client is dropped beyond
                                      # this (one reply of any size is always let through)
_FD_SPACE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


class ConnState(enum.Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"
    CLOSED = "closed"


def check_envelope(request, oob_enabled: bool) -> tuple[str, bool]:
    """QEMU's qmp_dispatch_check_obj, with its messages: (command name, out-of-band?)."""
    if not isinstance(request, dict):
        raise QMPError("QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" in request and "exec-oob" in request:
        raise QMPError("QMP input member 'execute' clashes with 'exec-oob'")
    if "exec-oob" in request:
        return request["exec-oob"], True
    if "execute" not in request:
        raise QMPError("QMP input lacks member 'execute'")
    return request["execute"], False


class QMPConnection:
    def __init__(self, server: "QMPServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.loop = server.loop
        self.state = ConnState.NEGOTIATION
        self.oob = False
        self.ctx = CallContext(origin="qmp")
        self._streamer = JSONStreamer()
        self._requests: asyncio.Queue = asyncio.Queue()
        self._request_bytes = 0       # JSON bytes of the requests in _requests
        self._replies: asyncio.Queue = asyncio.Queue()
        self._reply_bytes = 0         # bytes in _replies plus the one being written
        self._reading = False
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks = [self.loop.create_task(self._run_requests()),
                       self.loop.create_task(self._write_replies())]
        sock.setblocking(False)
        self._send(server.greeting())
        self._resume_reading()

    # -- reading ---------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and self.state is not ConnState.CLOSED:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(65536, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.ctx.received_fds.extend(fds)
        if not data:
            self.close()
            return
        for item in self._streamer.feed(data):
            self._handle(item)
        if self._requests.qsize() >= MAX_QUEUED_REQUESTS or self._request_bytes >= MAX_QUEUED_REQUEST_BYTES:
            self._pause_reading()

    def _handle(self, item) -> None:
        """Queue what arrived; errors too, so every answer keeps the order of its request
        (parse errors carry no id: clients match them by position)."""
        request = None
        try:
            if isinstance(item, ParseError):
                raise item
            request = parse(item)
            name, oob = check_envelope(request, self.oob)
        except ParseError as e:
            self._requests.put_nowait((None, QMPError(str(e)), 0))
            return
        except QMPError as e:
            self._requests.put_nowait((request, e, 0))
            return
        if oob:
            self.loop.create_task(self._execute(request, name))
        else:
            self._request_bytes += len(item)
            self._requests.put_nowait((request, name, len(item)))

    # -- executing ---------------------------------------------------------------

    async def _run_requests(self) -> None:
        while True:
            request, name_or_error, size = await self._requests.get()
            self._request_bytes -= size
            if isinstance(name_or_error, QMPError):
                self._reply(request, error=name_or_error)
            else:
                await self._execute(request, name_or_error)
            if (self._requests.qsize() < MAX_QUEUED_REQUESTS // 2
                    and self._request_bytes < MAX_QUEUED_REQUEST_BYTES // 2):
                self._resume_reading()

    async def _execute(self, request: dict, name: str) -> None:
        try:
            result = await self._dispatch(request, name)
        except QMPError as e:
            self._reply(request, error=e)
        except Exception as e:  # a bug in a handler must not take the monitor down
            log.exception("command %s failed", name)
            self._reply(request, error=QMPError(f"internal error in {name}: {e}"))
        else:
            self._reply(request, result=result)
            if name == "quit":
                self.server.on_quit()

    async def _dispatch(self, request: dict, name: str):
        args = request.get("arguments")
        if self.state is ConnState.NEGOTIATION:
            if name != "qmp_capabilities":
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            return self._negotiate(args)
        if name == "qmp_capabilities":
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        if "exec-oob" in request:
            command = self.server.dispatcher.schema.commands.get(name)
            if command is not None and not command.allow_oob:
                raise QMPError(f"The command {name} does not support OOB")
        return await self.server.dispatcher.execute(name, args, self.ctx)

    def _negotiate(self, args) -> dict:
        schema = self.server.dispatcher.schema
        checked = schema.visit_input(schema.commands["qmp_capabilities"], args)
        self.oob = "oob" in checked.get("enable", [])
        self.state = ConnState.COMMAND
        self._unsubscribe = self.server.events.subscribe(self._send)
        return {}

    # -- writing ---------------------------------------------------------------

    def _reply(self, request, result=None, error: QMPError | None = None) -> None:
        message = {"error": error.to_reply()} if error else {"return": result}
        if isinstance(request, dict) and "id" in request:
            message["id"] = request["id"]
        self._send(message)

    def _send(self, message: dict) -> None:
        if self.state is ConnState.CLOSED:
            return
        try:
            data = json.dumps(message, allow_nan=False).encode()    # Infinity and NaN are not JSON
        except (ValueError, TypeError, RecursionError) as e:   # never let one reply stop the monitor
            log.error("cannot encode a QMP reply: %s", e)
            data = json.dumps({"error": QMPError(f"internal error: the reply could not be encoded: {e}")
                               .to_reply()}).encode()
        if self._reply_bytes and self._reply_bytes + len(data) > MAX_PENDING_REPLY_BYTES:
            log.warning("QMP client is not reading its replies (%d bytes unread); dropping it", self._reply_bytes)
            self.close()
            return
        self._reply_bytes += len(data) + 2
        self._replies.put_nowait(data + b"\r\n")

    async def _write_replies(self) -> None:
        try:
            while True:
                data = await self._replies.get()
                await self.loop.sock_sendall(self.sock, data)
                self._reply_bytes -= len(data)
        except (OSError, asyncio.CancelledError):
            self.close()

    def close(self) -> None:
        if self.state is ConnState.CLOSED:
            return
        self._pause_reading()
        self.state = ConnState.CLOSED
        if self._unsubscribe:
            self._unsubscribe()
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        self.loop.create_task(self._release(others))

    async def _release(self, tasks: list[asyncio.Task]) -> None:
        # The socket is closed only once no task still waits on it: a closed
        # fd number is soon reused by accept(), and the event loop must not
        # confuse the new connection with a stale registration of the old one.
        await asyncio.gather(*tasks, return_exceptions=True)
        for fd in self.ctx.received_fds + list(self.ctx.fds.values()):
            os.close(fd)
        self.ctx.received_fds.clear()
        self.ctx.fds.clear()
        self.sock.close()
        self.server.connections.discard(self)


class QMPServer:
    def __init__(self, dispatcher: Dispatcher, events: EventBus, version: dict, package: str,
                 on_quit: Callable[[], None], max_clients: int = 1024):
        self.dispatcher = dispatcher
        self.max_clients = max_clients
        self.events = events
        self.version = version
        self.package = package
        self.on_quit = on_quit
        self.loop = events.loop
        self.connections: set[QMPConnection] = set()
        self._listeners: list[socket.socket] = []

    def greeting(self) -> dict:
        return {"QMP": {"version": {"qemu": self.version, "package": self.package},
                        "capabilities": ["oob"]}}

    def listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)          # the socket is created 0600
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"QMP socket {path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._listen(sock)

    def listen_tcp(self, host: str, port: int) -> int:
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise OSError(e.errno, f"QMP address {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None
        self._listen(sock)
        return sock.getsockname()[1]

    def _listen(self, sock: socket.socket) -> None:
        sock.listen(1024)
        sock.setblocking(False)
        self._listeners.append(sock)
        self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:          # e.g. out of fds: keep serving the others
                log.warning("QMP accept failed: %s", e)
                return
            if len(self.connections) >= self.max_clients:
                self._refuse(sock)
                continue
            self.connections.add(QMPConnection(self, sock))

    def _refuse(self, sock: socket.socket) -> None:
        """One error line instead of the greeting, then close: the client learns why at once."""
        log.warning("QMP client refused: %d clients connected (qmp_max_clients)", len(self.connections))
        error = QMPError(f"too many QMP clients: {len(self.connections)} are connected, the most this node "
                         "accepts (qmp_max_clients); try again later")
        try:
            sock.setblocking(False)
            sock.send(json.dumps({"error": error.to_reply()}).encode() + b"\r\n")
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        for sock in self._listeners:
            self.loop.remove_reader(sock.fileno())
            if sock.family == socket.AF_UNIX:
                path = sock.getsockname()
                if path and os.path.exists(path):
                    os.unlink(path)
            sock.close()
        self._listeners.clear()
        for conn in list(self.connections):
            conn.close()
