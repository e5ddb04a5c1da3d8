"""A small loopback TCP proxy that adds latency and cuts connections.

Production Datastore answers in tens of milliseconds and networks drop connections; the local
emulators do neither. Tests and benchmarks put this proxy between sweeper and an emulator to
get both: ``delay_s`` is added to every chunk in each direction (without serialising chunks, so
throughput is kept), and ``cut_every_s=(lo, hi)`` closes every open connection at random
intervals in that range. It listens on 127.0.0.1 only.
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
                due, _, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._queue)
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
    seed: int = 0
    cuts: int = 0
    port: int = 0
    _listener: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, server))
            _Pipe(client, server, self.delay_s).start()
            _Pipe(server, client, self.delay_s).start()

    def _cutter(self) -> None:
        assert self.cut_every_s is not None
        rng = random.Random(self.seed)
        while not self._stop.wait(rng.uniform(*self.cut_every_s)):
            with self._lock:
                busy = bool(self._conns)
            if busy:
                self.cuts += 1
                self.cut()
