"""A loopback gRPC proxy in front of an emulator that answers chosen calls with errors.

The emulators never fail on their own, and :mod:`tests.support.proxy` works on bytes: it can
delay and cut connections, but it cannot tell one call from another. Production Datastore fails
per call, and some of its failures depend on what the call is: a commit with too many mutations
is refused as ``INVALID_ARGUMENT``, a commit can be applied while its reply is lost (the client
sees ``DEADLINE_EXCEEDED`` and cannot know), a busy database answers ``RESOURCE_EXHAUSTED`` for
a while. :class:`FaultInjector` is a gRPC server that speaks the Datastore v1 service: each call
(every one of them is unary) is either answered with an error of its choosing or forwarded, as
raw bytes, to the real emulator, whose reply goes back unchanged. Only commits are decoded, to
count their mutations.

Every rule is a plain attribute that a test may set at any time, also while calls are in flight:
each call reads each rule once, and a single assignment is atomic. Random choices come from one
``random.Random(seed)`` drawn under a lock, so a run of calls made one after another fails the
same way every time. ``__slots__`` makes a misspelt rule an ``AttributeError`` rather than a rule
that silently does nothing.

It listens on 127.0.0.1 only, on a free port: point ``DATASTORE_EMULATOR_HOST`` at :attr:`host`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc  # type: ignore[import-untyped,unused-ignore]
from google.cloud.datastore_v1.types import CommitRequest

SERVICE = "google.datastore.v1.Datastore"
# Every Datastore v1 method is unary; any other is answered UNIMPLEMENTED, as gRPC does.
METHODS = (
    "Lookup",
    "RunQuery",
    "RunAggregationQuery",
    "BeginTransaction",
    "Commit",
    "Rollback",
    "AllocateIds",
    "ReserveIds",
)
# The Firestore emulator returns large query pages; gRPC's default cap is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Metadata gRPC sets itself on every call; forwarding it would duplicate or clash with it. The
# rich error details ride in grpc-status-details-bin, which is passed on.
_RESERVED_METADATA = ("user-agent", "content-type", "te", "host", "grpc-")
_ERROR_DETAILS = "grpc-status-details-bin"
TOO_BIG = "transaction or write too big."  # production's words for an oversized commit
_NO_DEADLINE_S = 3600.0  # a client with no deadline gets a time_remaining() that is huge


def _forwardable(metadata: Any) -> list[tuple[str, str | bytes]]:
    return [
        (key, value)
        for key, value in (metadata or ())
        if key == _ERROR_DETAILS or not key.startswith((":", *_RESERVED_METADATA))
    ]


def _abort(context: Any, code: Any, details: str) -> NoReturn:
    context.abort(code, details)  # raises, always
    raise AssertionError("context.abort returned")


class FaultInjector:
    """Forwards Datastore v1 calls to ``upstream`` ("127.0.0.1:PORT"), failing some on purpose.

    Rules, checked in this order for each call:

    * :meth:`exhaust_for` -- until it runs out, every call is ``RESOURCE_EXHAUSTED``.
    * ``fail_share`` -- that share of calls is answered, without being forwarded, with a code
      drawn from ``fail_codes``: the request never reached the database.
    * ``refuse_commits_over`` -- a commit with more mutations is ``INVALID_ARGUMENT`` ("too
      big"), not forwarded.
    * ``lose_commit_replies`` -- that share of commits is forwarded and applied, and then the
      reply is replaced by ``DEADLINE_EXCEEDED``: the write happened, the client cannot know.
      ``lost_reply_codes`` sets the code (drawn from it, when it holds more than one).

    ``only_methods`` (names such as ``{"Commit", "Lookup"}``; ``None`` for all) limits the two
    random rules. A commit failed before forwarding inside a transaction leaves that transaction
    open upstream, as a lost request does in production (and the client's ``Transaction`` drops
    its id once a commit fails, so it cannot roll back). The legacy emulator takes no locks, so
    nothing else notices; the Firestore emulator keeps the locks of what the transaction read for
    about 60 s: a plain write of those keys waits that long, another transaction on them is
    ``ABORTED`` ("Transaction lock timeout.") after about 2 s.

    :attr:`counts` counts every call by method name ("Commit") and each outcome it was given:
    "Commit:refused_too_big", "Commit:reply_lost", "Lookup:UNAVAILABLE" (injected),
    "Lookup:exhausted" and the total "exhausted", and "Commit:upstream_ABORTED" for an error
    the emulator itself returned.
    """

    __slots__ = (
        "_applied",
        "_channel",
        "_counts",
        "_executor",
        "_exhausted_until",
        "_lock",
        "_port",
        "_random",
        "_server",
        "fail_codes",
        "fail_share",
        "lose_commit_replies",
        "lost_reply_codes",
        "only_methods",
        "refuse_commits_over",
        "upstream",
    )

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self.upstream = upstream
        self.refuse_commits_over: int | None = None
        self.lose_commit_replies: float = 0.0
        self.lost_reply_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.DEADLINE_EXCEEDED,)
        self.fail_share: float = 0.0
        self.fail_codes: tuple[grpc.StatusCode, ...] = (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.ABORTED,
        )
        self.only_methods: AbstractSet[str] | None = None
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._applied = 0
        self._exhausted_until = float("-inf")
        self._port: int | None = None
        self._server: Any = None
        self._channel: Any = None
        self._executor: ThreadPoolExecutor | None = None

    # --- Life cycle -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Where it listens, "127.0.0.1:PORT"; known once started."""
        if self._port is None:
            raise RuntimeError("FaultInjector is not started")
        return f"127.0.0.1:{self._port}"

    def start(self) -> FaultInjector:
        if self._server is not None:
            raise RuntimeError("FaultInjector is already started")
        self._channel = grpc.insecure_channel(self.upstream, options=_OPTIONS)
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fault-injector")
        handlers = {method: self._handler(method) for method in METHODS}
        server = grpc.server(
            self._executor,
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            options=_OPTIONS,
        )
        port: int = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise RuntimeError("FaultInjector could not bind a loopback port")
        server.start()
        self._server, self._port = server, port
        return self

    def stop(self) -> None:
        """Stop at once: calls in flight are cancelled both ways. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FaultInjector:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- Rules and records ------------------------------------------------------------------

    def exhaust_for(self, seconds: float) -> None:
        """From now, answer every call ``RESOURCE_EXHAUSTED`` for ``seconds`` (0 ends it)."""
        with self._lock:
            self._exhausted_until = time.monotonic() + seconds

    @property
    def counts(self) -> Counter[str]:
        """A copy of the counts so far: calls keep counting while a test reads it."""
        with self._lock:
            return Counter(self._counts)

    @property
    def applied_mutations(self) -> int:
        """Mutations of the commits the emulator applied, whether or not the reply got back."""
        with self._lock:
            return self._applied

    # --- Serving ----------------------------------------------------------------------------

    def _count(self, *keys: str) -> None:
        with self._lock:
            self._counts.update(keys)

    def _draw(self, share: float, method: str) -> bool:
        """Whether a random rule of ``share`` hits this call (no draw when it cannot)."""
        only = self.only_methods
        if share <= 0 or (only is not None and method not in only):
            return False
        with self._lock:
            return self._random.random() < share

    def _handler(self, method: str) -> Any:
        """Raw bytes in and out (no serializers): the injector never decodes a reply."""

        def behaviour(request: bytes, context: Any) -> bytes:
            return self._call(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour)

    def _call(self, method: str, request: bytes, context: Any) -> bytes:
        self._count(method)
        with self._lock:
            exhausted = time.monotonic() < self._exhausted_until
        if exhausted:
            self._count("exhausted", f"{method}:exhausted")
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "injected: quota exhausted")
        codes = self.fail_codes
        if codes and self._draw(self.fail_share, method):
            with self._lock:
                code = self._random.choice(codes)
            self._count(f"{method}:{code.name}")
            _abort(context, code, f"injected: {code.name.lower()}")
        mutations = 0
        if method == "Commit":
            mutations = len(CommitRequest.deserialize(request).mutations)
            limit = self.refuse_commits_over
            if limit is not None and mutations > limit:
                self._count("Commit:refused_too_big")
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, TOO_BIG)
        reply = self._forward(method, request, context)
        if method == "Commit":
            with self._lock:
                self._applied += mutations
            if self._draw(self.lose_commit_replies, method):
                self._count("Commit:reply_lost")
                lost = self.lost_reply_codes
                code = lost[0]
                if len(lost) > 1:  # one code draws nothing: seeded runs fail as they always did
                    with self._lock:
                        code = self._random.choice(lost)
                _abort(context, code, "injected: reply lost")
        return reply

    def _forward(self, method: str, request: bytes, context: Any) -> bytes:
        """Send the raw request upstream with the caller's metadata and remaining deadline;
        an error upstream goes back to the caller as it came."""
        channel = self._channel
        if channel is None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "fault injector stopped")
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None and remaining < _NO_DEADLINE_S else None
        call = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )
        try:
            reply: bytes = call(
                request, timeout=timeout, metadata=_forwardable(context.invocation_metadata())
            )
        except grpc.RpcError as error:
            code = error.code()
            self._count(f"{method}:upstream_{code.name}")
            context.set_trailing_metadata(_forwardable(error.trailing_metadata()))
            _abort(context, code, error.details() or "")
        return reply
