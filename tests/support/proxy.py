"""A small loopback TCP proxy that adds latency and cuts connections.

Production Datastore answers in tens of milliseconds and networks drop connections; the local
emulators do neither. Tests and benchmarks put this proxy between sweeper and an emulator to
get both: ``delay_s`` is added to every chunk in each direction (without serialising chunks, so
throughput is kept), and ``cut_every_s=(lo, hi)`` closes every open connection at random
intervals in that range. ``upload_bytes_per_s`` narrows the link toward the upstream, so that a
request takes time in proportion to its size. It listens on 127.0.0.1 only.

``TcpProxy.hold()`` makes every connection, open or new, a black hole until ``release()``: bytes
are still read but none is forwarded, so a call in flight never gets its answer and the peer
never sees the connection drop. :class:`BlackHole` is a listener that does that from the start:
it accepts connections and never sends a byte.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Pipe:
    """One direction of one connection: read, hold for ``delay_s``, write."""

    source: socket.socket
    sink: socket.socket
    delay_s: float
    held: threading.Event = field(default_factory=threading.Event)
    bytes_per_s: float | None = None  # a narrow link: each chunk takes len / rate to send
    _queue: list[tuple[float, int, bytes]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.source.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    due = time.monotonic() + self.delay_s
                    heapq.heappush(self._queue, (due, next(self._seq), data))
                else:
                    self._closed = True
                self._cond.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    break
                if self.held.is_set():  # a black hole: keep the bytes, send none
                    if self._closed:
                        break
                    self._cond.wait(0.1)
                    continue
                due, _, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._queue)
            if self.bytes_per_s is not None:  # the chunk arrives once it has crossed the link
                time.sleep(len(data) / self.bytes_per_s)
            try:
                self.sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            self.sink.shutdown(socket.SHUT_WR)


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; use as a context manager or start/stop."""

    upstream: tuple[str, int]
    delay_s: float = 0.0
    cut_every_s: tuple[float, float] | None = None
    # Bytes per second from the client to the upstream: a request's time grows with its size,
    # as a slow database's answer to a large commit does.
    upload_bytes_per_s: float | None = None
    seed: int = 0
    cuts: int = 0
    port: int = 0
    _listener: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _held: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self) -> None:
        """From now on forward nothing, either way, on any connection: calls hang unanswered."""
        self._held.set()

    def release(self) -> None:
        """Forward again what :meth:`hold` kept back, and everything after it."""
        self._held.clear()

    def refuse(self) -> None:
        """Close the port for good, now: new connections are refused and open ones are cut.

        Unlike :meth:`stop`, which only closes the listener: on Linux a thread blocked in
        ``accept`` keeps a closed socket listening, and one more connection gets through.
        Shutting the listener down first wakes that thread.
        """
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        self.stop()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        if self.cut_every_s is not None:
            threading.Thread(target=self._cutter, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self.cut()

    def cut(self) -> None:
        """Close every open connection now (both sides see a reset or EOF)."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            if self._stop.is_set():  # accepted as the port was being refused: drop it
                for sock in (client, server):
                    sock.close()
                return
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, server))
            _Pipe(client, server, self.delay_s, self._held, self.upload_bytes_per_s).start()
            _Pipe(server, client, self.delay_s, self._held).start()

    def _cutter(self) -> None:
        assert self.cut_every_s is not None
        rng = random.Random(self.seed)
        while not self._stop.wait(rng.uniform(*self.cut_every_s)):
            with self._lock:
                busy = bool(self._conns)
            if busy:
                self.cuts += 1
                self.cut()


@dataclass
class BlackHole:
    """Listens on 127.0.0.1:<port>, accepts every connection, reads and never answers.

    A peer's connect succeeds and its requests go out, but no reply (not even a protocol
    handshake) ever comes back: the worst case for a client, which can only time out.
    """

    port: int = 0
    accepted: int = 0
    received: int = 0  # bytes read (and dropped) over all connections
    _listener: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> BlackHole:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> BlackHole:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.received += len(data)
