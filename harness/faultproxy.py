"""A small TCP fault-injection proxy for tests.

``FaultProxy(("127.0.0.1", upstream_port))`` listens on 127.0.0.1 (OS-assigned ``.port``; ``.url``
is ``redis://127.0.0.1:<port>/0``) and forwards every accepted connection to the upstream. One I/O
thread does all socket work (selectors, non-blocking sockets). Fault switches may be flipped from
any thread at any time; each runs on the I/O thread and returns once it is in effect, for existing
and new connections alike. Faults are decided when bytes are *read*: bytes already read keep the
fate they had (e.g. a chunk held by ``delay`` is still delivered after ``blackhole()``).

Faults and what they simulate:

- ``delay(ms, jitter_ms=0)`` -- network latency: every chunk read afterwards, in either direction,
  is held for ``ms +- jitter_ms`` (never < 0) before being written on. A chunk never overtakes the
  one before it on the same leg, so ordering within a connection is kept.
- ``blackhole()`` -- a partition / hung peer: connections are still accepted, but everything read
  afterwards is discarded in both directions, FINs included; nothing is closed, so clients time
  out and the server keeps its sessions (e.g. a blocked BLPOP) open.
- ``reset_all()`` -- a crashed middlebox / peer reboot: every current connection is aborted on both
  legs with an RST (SO_LINGER (1, 0), then close). New connections work normally.
- ``refuse()`` / ``accept_again()`` -- server down / back up: the listening socket is closed, so new
  connects get ECONNREFUSED (established connections are untouched); then reopened on the same port.
- ``reset_after_upstream_reply(n=1)`` (``drop_next_reply()`` is n=1) -- "the command ran, the reply
  was lost": the next n chunks read from upstream (on any connection) are discarded and that
  connection is reset instead. A chunk is one recv(): one small reply for request/response traffic,
  but a big reply may span chunks and pipelined replies may share one. Arm it after the client has
  connected: handshake replies (redis-py's CLIENT SETINFO) count too.
- ``heal()`` -- clean forwarding again: no delay, no blackhole, no armed resets, accepting.

Counters: ``connections_accepted``, ``bytes_up`` (client -> upstream bytes written),
``bytes_down`` (upstream -> client). ``close()`` (or leaving the ``with`` block) aborts every
connection, closes every socket and joins the I/O thread; it is idempotent.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

_CHUNK = 65536
_MAX_BUFFERED = 1 << 20  # stop reading a side while this much is waiting to be written on
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def _abort(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Leg:
    """One direction: bytes read from src wait until due, then are written to dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.src, self.dst, self.up = src, dst, up
        self.pending: deque[tuple[float, bytes]] = deque()  # (due, chunk), due ascending
        self.out = bytearray()  # due bytes dst has not accepted yet
        self.eof = False  # src sent FIN (or it was swallowed): read no more
        self.done = False  # nothing more will be written to dst

    def buffered(self) -> int:
        return len(self.out) + sum(len(chunk) for _, chunk in self.pending)


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.up, self.down = _Leg(client, upstream, True), _Leg(upstream, client, False)
        self.closed = False


class FaultProxy:
    """Forwards 127.0.0.1:<port> to upstream; see the module docstring for the faults."""

    def __init__(
        self,
        upstream: tuple[str, int],
        connect_timeout_s: float = 5.0,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        """listen: the address to listen on (a host's address inside a network namespace,
        see harness/hosts.py); port 0 lets the OS choose."""
        self.upstream = upstream
        self.listen_host = listen[0]
        self.connect_timeout_s = connect_timeout_s
        self.connections_accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._delay_s = self._jitter_s = 0.0
        self._blackhole = False
        self._resets_armed = 0
        self._conns: set[_Conn] = set()
        self._tasks: list[tuple[Callable[[], object], threading.Event, list[BaseException]]] = []
        self._lock = threading.Lock()
        self._stopping = self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, _READ, "wake")
        self._listener: socket.socket | None = None
        self.port = listen[1]
        self._listen()
        self._thread = threading.Thread(target=self._run, name=f"faultproxy:{self.port}")
        self._thread.daemon = True
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://{self.listen_host}:{self.port}/0"

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    def delay(self, ms: float, jitter_ms: float = 0.0) -> None:
        self._call(lambda: self._set(_delay_s=ms / 1000, _jitter_s=jitter_ms / 1000))

    def blackhole(self) -> None:
        self._call(lambda: self._set(_blackhole=True))

    def reset_after_upstream_reply(self, n: int = 1) -> None:
        self._call(lambda: self._set(_resets_armed=n))

    def drop_next_reply(self) -> None:
        self.reset_after_upstream_reply(1)

    def reset_all(self) -> None:
        self._call(lambda: [self._drop(conn) for conn in list(self._conns)])

    def refuse(self) -> None:
        self._call(self._unlisten)

    def accept_again(self) -> None:
        self._call(self._listen)

    def heal(self) -> None:
        def task() -> None:
            self._set(_delay_s=0.0, _jitter_s=0.0, _blackhole=False, _resets_armed=0)
            self._listen()

        self._call(task)

    def close(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            if not self._closed:
                self._wake_w.send(b"x")
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def _call(self, fn: Callable[[], object]) -> None:
        """Run fn on the I/O thread and wait for it; re-raise what it raised."""
        done, errors = threading.Event(), []
        with self._lock:
            if self._stopping or self._closed:
                raise RuntimeError("FaultProxy is closed")
            self._tasks.append((fn, done, errors))
            self._wake_w.send(b"x")
        done.wait()
        if errors:
            raise errors[0]

    def _listen(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.listen_host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._sel.register(sock, _READ, "listen")

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.connections_accepted += 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout_s)
        except OSError:
            _abort(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conns.add(_Conn(client, upstream))

    def _drop(self, conn: _Conn, rst: bool = True) -> None:
        conn.closed = True
        self._conns.discard(conn)
        for sock in (conn.up.src, conn.down.src):
            if sock in self._sel.get_map():
                self._sel.unregister(sock)
            _abort(sock) if rst else sock.close()

    def _read(self, conn: _Conn, leg: _Leg) -> None:
        try:
            data = leg.src.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # reset by a peer: pass the reset on to the other side
            return self._drop(conn)
        if not data:
            leg.eof = True
            leg.done = self._blackhole  # a swallowed FIN is never passed on
        elif self._blackhole:
            return
        elif not leg.up and self._resets_armed > 0:
            self._resets_armed -= 1
            self._drop(conn)
        else:
            hold = max(0.0, self._delay_s + random.uniform(-self._jitter_s, self._jitter_s))
            due = time.monotonic() + hold
            if leg.pending:
                due = max(due, leg.pending[-1][0])
            leg.pending.append((due, data))

    def _service(self, conn: _Conn, now: float) -> None:
        """Write what is due, pass FINs on once flushed, and (re)register the sockets."""
        for leg in (conn.up, conn.down):
            while leg.pending and leg.pending[0][0] <= now:
                leg.out += leg.pending.popleft()[1]
            if leg.out:
                try:
                    sent = leg.dst.send(leg.out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return self._drop(conn)
                del leg.out[:sent]
                if leg.up:
                    self.bytes_up += sent
                else:
                    self.bytes_down += sent
            if leg.eof and not leg.done and not leg.out and not leg.pending:
                leg.done = True
                try:
                    leg.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    return self._drop(conn)
        if conn.up.done and conn.down.done:
            return self._drop(conn, rst=False)
        for reader, writer in ((conn.up, conn.down), (conn.down, conn.up)):
            sock = reader.src  # == writer.dst
            want_read = not reader.eof and reader.buffered() < _MAX_BUFFERED
            events = (_READ if want_read else 0) | (_WRITE if writer.out else 0)
            key = self._sel.get_map().get(sock)
            if key is None and events:
                self._sel.register(sock, events, conn)
            elif key is not None and not events:
                self._sel.unregister(sock)
            elif key is not None and key.events != events:
                self._sel.modify(sock, events, conn)

    def _run(self) -> None:
        try:
            while not self._stopping:
                legs = [leg for conn in self._conns for leg in (conn.up, conn.down)]
                dues = [leg.pending[0][0] for leg in legs if leg.pending]
                timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
                for key, events in self._sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                        with self._lock:
                            tasks, self._tasks = self._tasks, []
                        for fn, done, errors in tasks:
                            try:
                                fn()
                            except Exception as exc:
                                errors.append(exc)
                            done.set()
                    elif key.data == "listen":
                        if self._listener is not None:
                            self._accept()
                    elif not key.data.closed and events & _READ:
                        conn = key.data
                        self._read(conn, conn.up if key.fileobj is conn.up.src else conn.down)
                now = time.monotonic()
                for conn in list(self._conns):
                    if not conn.closed:
                        self._service(conn, now)
        finally:
            with self._lock:
                self._closed = True
                for _, done, errors in self._tasks:  # callers must not hang
                    errors.append(RuntimeError("FaultProxy is closed"))
                    done.set()
                self._tasks = []
                self._wake_w.close()
            for conn in list(self._conns):
                self._drop(conn)
            self._unlisten()
            self._sel.close()
            self._wake_r.close()
