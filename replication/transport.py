"""Migration channels for QEMU's URIs: tcp:, unix:, exec:, fd:, file:.

Bulk data moves in threads on blocking sockets (and pipes, files); a channel
can be aborted from another thread (cancel), which makes any blocked send or
receive fail at once.  Sockets are two-way, so the destination can answer
with its verdict; exec:, file: and pipe fds are one-way.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time


STALL_TIMEOUT = 10.0     # seconds without progress before the source gives a channel up
READ_AHEAD = 64 << 10     # small records come in batches; page data goes straight to RAM
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3     # seconds, seconds, probes
USER_TIMEOUT_MS = 30000


class TransportError(Exception):
    """A URI that cannot be used, or a channel that failed; the message says why."""


def _split(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in ("tcp", "unix", "exec", "fd", "file", "rdma"):
        raise TransportError("Parameter 'uri' expects a valid migration protocol")
    if scheme == "rdma":
        raise TransportError("RDMA migration is not supported by this appliance")
    if not rest:
        raise TransportError(f"migration URI {uri!r} lacks an address")
    return scheme, rest


def _host_port(rest: str) -> tuple[str, int]:
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"tcp: address {rest!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a node channel: a peer that vanished (host down, cable cut) is found in
    about KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL s even when nothing is sent, and
    unacknowledged data fails after USER_TIMEOUT instead of the kernel's ~15 minutes."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class Channel:
    """One byte stream: a socket, or a one-way pipe/file fd (maybe fed by a child process)."""

    def __init__(self, sock: socket.socket | None = None, fd: int | None = None,
                 proc: subprocess.Popen | None = None, description: str = ""):
        self.sock = sock
        self.fd = fd
        self.proc = proc
        self.description = description
        self.two_way = sock is not None
        self._buffer = bytearray()
        self._pos = 0                # bytes of _buffer already consumed
        self._aborted = False
        self.received = 0            # bytes read from the channel so far
        self.tls = None              # ClientTls / ServerTls (replication/tls.py) once TLS wraps the socket
        self.peer_identity = ""      # the client certificate's DN, on a destination with verify-peer

    def send(self, data, timeout: float | None = None) -> None:
        """All of ``data``.  Each partial send may wait the socket's timeout: a stall fails, a slow
        link does not (sendall's timeout would cover the whole call).  ``timeout`` overrides it."""
        view = memoryview(data).cast("B")
        try:
            if self.sock is not None:
                if timeout is not None:
                    self.sock.settimeout(timeout)
                while view:
                    view = view[self.sock.send(view):]
            else:
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError as e:
            raise TransportError(self._failure(e)) from e

    def peer_spoke(self) -> bool:
        """Without blocking: has the peer sent something (or hung up)?  A destination speaks
        up early only to refuse."""
        if self.sock is None or self.sock.fileno() < 0:
            return False
        if self.tls is not None and self.sock.pending():
            return True                      # already decrypted, so select would not see it
        # select, not a non-blocking recv: a socket with a timeout waits before any recv.
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _recv_into(self, view) -> int:
        try:
            n = self.sock.recv_into(view) if self.sock is not None else os.readv(self.fd, [view])
        except OSError as e:
            raise TransportError(self._failure(e)) from e
        if n == 0:
            raise TransportError(f"{self.description}: the peer closed the connection")
        self.received += n
        return n

    def _failure(self, e: OSError) -> str:
        if self._aborted:
            return f"{self.description}: channel closed (migration cancelled)"
        if isinstance(e, TimeoutError):
            return f"{self.description}: no progress for {self.sock.gettimeout():g} s (is the network down?)"
        return f"{self.description}: {e.strerror or e}"

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (reads ahead a little to spare syscalls on small records)."""
        while len(self._buffer) - self._pos < n:
            if self._pos:
                del self._buffer[:self._pos]      # once per refill, not once per record
                self._pos = 0
            chunk = bytearray(max(n - len(self._buffer), READ_AHEAD))
            got = self._recv_into(memoryview(chunk))
            self._buffer += memoryview(chunk)[:got]
        data = bytes(self._buffer[self._pos:self._pos + n])
        self._pos += n
        return data

    def read_into(self, view) -> None:
        """Fill ``view`` exactly: buffered bytes first, then straight from the channel."""
        view = memoryview(view).cast("B")
        take = min(len(self._buffer) - self._pos, len(view))
        view[:take] = self._buffer[self._pos:self._pos + take]
        self._pos += take
        view = view[take:]
        while view:
            view = view[self._recv_into(view):]

    def linger(self, seconds: float) -> None:
        """After a last message: stop sending and read (discarding) until the peer closes or
        ``seconds`` pass, so that closing does not reset the connection and lose that message."""
        if self.sock is None:
            return
        deadline = time.monotonic() + seconds
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 20):
                    return
        except OSError:
            pass

    def read_with_timeout(self, n: int, seconds: float) -> bytes | None:
        """Up to a deadline, exactly ``n`` bytes, or None when they do not come."""
        if self.sock is None:
            return None
        try:
            self.sock.settimeout(seconds)
            return self.read_exact(n)
        except (TransportError, OSError):
            return None

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """From any thread: make blocked and future I/O on this channel fail."""
        self._aborted = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)      # the whole pipeline, not just the shell

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def finish(self) -> None:
        """A one-way writer is done: close it and check the child process, if any, succeeded."""
        if self.sock is None and self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            code = self.proc.wait(60)
            if code != 0:
                raise TransportError(f"{self.description}: command exited with status {code}")


def connect(uri: str, named_fds: dict[str, int]) -> Channel:
    """The source's end of a migration URI."""
    scheme, rest = _split(uri)
    try:
        if scheme == "tcp":
            host, port = _host_port(rest)
            sock = socket.create_connection((host, port), timeout=STALL_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
            return Channel(sock=sock, description=uri)
        if scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(STALL_TIMEOUT)
            sock.connect(rest)
            return Channel(sock=sock, description=uri)
        if scheme == "exec":
            proc = subprocess.Popen(["/bin/sh", "-c", rest], stdin=subprocess.PIPE, start_new_session=True)
            fd = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            return Channel(fd=fd, proc=proc, description=uri)
        if scheme == "file":
            fd = os.open(rest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            return Channel(fd=fd, description=uri)
    except OSError as e:
        raise TransportError(f"Failed to connect to '{uri}': {e.strerror or e}") from e
    return _from_named_fd(rest, named_fds, uri)


def _from_named_fd(name: str, named_fds: dict[str, int], uri: str) -> Channel:
    fd = named_fds.pop(name, None)
    if fd is None:
        raise TransportError(f"File descriptor named '{name}' has not been found")
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        return Channel(sock=socket.socket(fileno=fd), description=uri)
    return Channel(fd=fd, description=uri)


class Listener:
    """The destination's end: ``accept()`` returns each incoming channel in turn."""

    def __init__(self, uri: str, named_fds: dict[str, int] | None = None):
        self.uri = uri
        self.scheme, rest = _split(uri)
        self.sock: socket.socket | None = None
        self._channel: Channel | None = None
        self._close_lock = threading.Lock()
        try:
            if self.scheme == "tcp":
                host, port = _host_port(rest)
                self.sock = socket.create_server((host, port), reuse_port=False)
            elif self.scheme == "unix":
                if os.path.exists(rest):
                    os.unlink(rest)
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.bind(rest)
                self.sock.listen(16)
            elif self.scheme == "exec":
                proc = subprocess.Popen(["/bin/sh", "-c", rest], stdout=subprocess.PIPE, start_new_session=True)
                fd = os.dup(proc.stdout.fileno())
                proc.stdout.close()
                self._channel = Channel(fd=fd, proc=proc, description=uri)
            elif self.scheme == "file":
                self._channel = Channel(fd=os.open(rest, os.O_RDONLY), description=uri)
            else:
                self._channel = _from_named_fd(rest, named_fds or {}, uri)
        except OSError as e:
            raise TransportError(f"Failed to listen on '{uri}': {e.strerror or e}") from e

    @property
    def address(self) -> str:
        """The URI actually listened on (a tcp: port 0 resolved)."""
        if self.scheme == "tcp" and self.sock is not None:
            host, port = self.sock.getsockname()[:2]
            return f"tcp:{host}:{port}"
        return self.uri

    def socket_addresses(self) -> list[dict]:
        """Where this listens, as QMP SocketAddress values (query-migrate's socket-address)."""
        if self.sock is None:
            return []
        if self.scheme == "unix":
            return [{"type": "unix", "path": self.sock.getsockname()}]
        host, port = self.sock.getsockname()[:2]
        return [{"type": "inet", "host": host, "port": str(port)}]

    def accept(self, timeout: float | None = None) -> Channel:
        listening = self.sock            # close() may run meanwhile, from another thread
        if listening is None:
            channel, self._channel = self._channel, None
            if channel is None:
                raise TransportError(f"{self.uri}: a one-way channel carries a single stream, or was closed")
            return channel
        try:
            listening.settimeout(timeout)
            sock, _ = listening.accept()
            sock.settimeout(None)
        except TimeoutError:
            raise TransportError(f"{self.uri}: no connection within {timeout:g} s") from None
        except OSError as e:
            raise TransportError(f"{self.uri}: accept failed: {e.strerror or e}") from e
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
        return Channel(sock=sock, description=self.uri)

    def close(self) -> None:
        """Idempotent, and safe from two threads at once (the daemon's exit and the accepting
        thread's own clean-up): whoever takes the socket closes it."""
        with self._close_lock:           # abort() and the destination's thread may both close it
            sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if sock.family == socket.AF_UNIX:
                path = sock.getsockname()
                if path and os.path.exists(path):
                    os.unlink(path)
            sock.close()
        if self._channel is not None:
            self._channel.abort()
            self._channel.close()
            self._channel = None
