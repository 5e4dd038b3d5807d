"""Migration channels for QEMU's URIs: tcp:, unix:, exec:, fd:, file:.

Bulk data moves in threads on blocking sockets (and pipes, files); a channel
can be aborted from another thread (cancel), which makes any blocked send or
receive fail at once.  Sockets are two-way, so the destination can answer
with its verdict; exec:, file: and pipe fds are one-way.

Nothing here blocks the event loop or outlives the daemon: ``file:`` is
opened in the migration's thread with O_NONBLOCK (a fifo without a peer
would block open() itself) and O_NOFOLLOW, and never truncates an existing
file unless the node allows it; an ``exec:`` command runs in a process group
of its own, is SIGKILLed when the daemon dies (PR_SET_PDEATHSIG), and is given
up, group and all, when its pipe stops making progress for EXEC_STALL_TIMEOUT.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time


STALL_TIMEOUT = 10.0     # seconds without progress before the source gives a channel up
EXEC_STALL_TIMEOUT = 60.0  # seconds an exec: command's pipe may make no progress (ssh may be slow to connect)
FIFO_PEER_TIMEOUT = STALL_TIMEOUT   # seconds an outgoing file: fifo may wait for its reader
READ_AHEAD = 64 << 10     # small records come in batches; page data goes straight to RAM
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3     # seconds, seconds, probes
USER_TIMEOUT_MS = 30000
_POLL_SLICE = 0.2         # seconds between checks for an abort while a pipe or fifo waits
_PR_SET_PDEATHSIG = 1
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_libc = ctypes.CDLL(None, use_errno=True)


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


def shut_down(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """shutdown(2) on the socket itself, quietly: blocked and later I/O on it fails, from any
    thread.  Not SSLSocket.shutdown(), which drops the SSL object first: a thread sending on
    the socket in between would put clear text on the wire."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


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
        self._read_ahead = memoryview(bytearray(READ_AHEAD))
        self._aborted = False
        self.received = 0            # bytes read from the channel so far
        self.tls = None              # ClientTls / ServerTls (replication/tls.py) once TLS wraps the socket
        self.peer_identity = ""      # the client certificate's DN, on a destination with verify-peer
        # A pipe or fifo is used non-blocking and polled in slices, so that it stalls only this long
        # (None: as long as its peer likes) and an abort from another thread is seen.
        # An exec: command may take its time to start (e.g. waiting for its own peer); once bytes
        # flowed, a stall fails.
        self.stall_timeout = EXEC_STALL_TIMEOUT if proc is not None else None
        self._flowed = False
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, False)

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
                    try:
                        view = view[os.write(self._usable_fd(), view):]
                        self._flowed = True
                    except BlockingIOError:
                        self._wait_fd(select.POLLOUT)
        except OSError as e:
            raise TransportError(self._failure(e)) from e

    def _usable_fd(self) -> int:
        if self._aborted:
            raise OSError(errno.ECANCELED, "cancelled")
        return self.fd

    def _wait_fd(self, event: int) -> None:
        """Until the pipe/fifo fd is ready for ``event`` (or hung up): an abort or a stall fails."""
        poller = select.poll()
        poller.register(self.fd, event)
        waited = 0.0
        while not poller.poll(_POLL_SLICE * 1000):
            if self._aborted:
                raise OSError(errno.ECANCELED, "cancelled")
            waited += _POLL_SLICE
            if self.stall_timeout is not None and self._flowed and waited >= self.stall_timeout:
                self.abort()          # an exec: child that stalls goes, with its whole group
                raise TransportError(f"{self.description}: no progress for {self.stall_timeout:g} s")

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
            if self.sock is not None:
                n = self.sock.recv_into(view)
            else:
                if not self._flowed:
                    self._wait_fd(select.POLLIN)      # a fifo whose writer has not come yet reads as EOF
                while True:
                    try:
                        n = os.readv(self._usable_fd(), [view])
                        self._flowed = True
                        break
                    except BlockingIOError:
                        self._wait_fd(select.POLLIN)
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
        """Exactly ``n`` bytes.  Small records come from a read-ahead buffer (fewer syscalls); a
        record larger than that is received straight into one buffer of its size, so a record
        trickled in tiny pieces costs time and memory linear in its size."""
        if n > READ_AHEAD:
            record = bytearray(n)
            self.read_into(record)
            return bytes(record)
        while len(self._buffer) - self._pos < n:
            if self._pos:
                del self._buffer[:self._pos]      # once per refill, not once per record
                self._pos = 0
            got = self._recv_into(self._read_ahead)
            self._buffer += self._read_ahead[:got]
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
            shut_down(self.sock, socket.SHUT_WR)
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
            shut_down(self.sock)
        if self.proc is not None:
            self._kill_group()

    def _kill_group(self) -> None:
        if self.proc.poll() is None:
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
                self._kill_group()
                self.proc.wait()

    def finish(self) -> None:
        """A one-way writer is done: close it and check the child process, if any, succeeded."""
        if self.sock is None and self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            try:
                code = self.proc.wait(EXEC_STALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait()
                raise TransportError(f"{self.description}: command still running {EXEC_STALL_TIMEOUT:g} s "
                                     "after the stream ended; killed") from None
            if code != 0:
                raise TransportError(f"{self.description}: command exited with status {code}")


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:        # O_NOFOLLOW met a link
        return "the path is a symbolic link; migration files are never opened through links"
    return e.strerror or str(e)


def _spawn(command: str, **pipes) -> subprocess.Popen:
    """An exec: command: /bin/sh in a session (so a process group) of its own, killed with the daemon,
    without the daemon's ambient capabilities (the unit's CAP_NET_ADMIN is for taps, not for commands)."""
    daemon_pid = os.getpid()

    def die_with_daemon() -> None:
        # PR_SET_PDEATHSIG follows the forking *thread*: every caller forks from a thread that
        # outlives the command (the event loop's, or a migration's that waits for it).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if os.getppid() != daemon_pid:      # the daemon died before prctl took effect
            os._exit(1)

    return subprocess.Popen(["/bin/sh", "-c", command], start_new_session=True, preexec_fn=die_with_daemon,
                            **pipes)


def file_write_refusal(path: str, overwrite: bool) -> str | None:
    """Why the source may not write ``file:PATH``, or None: never through a symlink, and over an
    existing regular file only with ``overwrite``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"file:{path} is a symbolic link; migration files are never written through links"
    if stat.S_ISREG(st.st_mode) and not overwrite:
        return (f"file:{path} exists; remove it, or allow overwriting with migrate_file_overwrite = true "
                "in the node config (--migrate-file-overwrite)")
    return None


def _open_file_for_writing(path: str, overwrite: bool, cancelled) -> int:
    """The source's file: a new regular file (0600), an existing one only with ``overwrite``, or a
    fifo once its reader is there (waiting at most FIFO_PEER_TIMEOUT).  Never through a symlink."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    deadline = time.monotonic() + FIFO_PEER_TIMEOUT
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:        # ENXIO: a fifo without a reader yet
                raise
        if cancelled() or time.monotonic() > deadline:
            raise TransportError(f"file:{path}: no reader opened the fifo within {FIFO_PEER_TIMEOUT:g} s")
        time.sleep(0.05)
    if stat.S_ISREG(os.fstat(fd).st_mode):          # it was there before: replaced only if allowed
        if not overwrite:
            os.close(fd)
            raise TransportError(file_write_refusal(path, overwrite) or f"file:{path} exists")
        os.ftruncate(fd, 0)
    return fd


def connect(uri: str, named_fds: dict[str, int], *, file_overwrite: bool = False,
            cancelled=lambda: False) -> Channel:
    """The source's end of a migration URI; ``cancelled()`` ends a wait for a fifo's reader."""
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
            proc = _spawn(rest, stdin=subprocess.PIPE)
            fd = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            return Channel(fd=fd, proc=proc, description=uri)
        if scheme == "file":
            return Channel(fd=_open_file_for_writing(rest, file_overwrite, cancelled), description=uri)
    except OSError as e:
        raise TransportError(f"Failed to connect to '{uri}': {_why(e)}") from e
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
                proc = _spawn(rest, stdout=subprocess.PIPE)
                fd = os.dup(proc.stdout.fileno())
                proc.stdout.close()
                self._channel = Channel(fd=fd, proc=proc, description=uri)
            elif self.scheme == "file":
                # O_NONBLOCK: a fifo opens at once, without a writer; reads then wait in the
                # migration's thread (a fifo nobody has opened for writing polls as not ready).
                self._channel = Channel(fd=os.open(rest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC),
                                        description=uri)
            else:
                self._channel = _from_named_fd(rest, named_fds or {}, uri)
        except OSError as e:
            raise TransportError(f"Failed to listen on '{uri}': {_why(e)}") from e

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
            shut_down(sock)
            if sock.family == socket.AF_UNIX:
                path = sock.getsockname()
                if path and os.path.exists(path):
                    os.unlink(path)
            sock.close()
        if self._channel is not None:
            self._channel.abort()
            self._channel.close()
            self._channel = None
