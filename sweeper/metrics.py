"""Optional: push one run's ``sweep_finished`` summary to a Prometheus Pushgateway, once at
the end (a CronJob lives too briefly to be scraped). Each target, shard and project is its own
group; the push is a POST (``pushadd``): what a run leaves out keeps its last pushed value.
The gauges, the grouping key and the alerts: docs/metrics.md."""

from __future__ import annotations

import datetime as dt
import http.client
import math
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from sweeper.logs import SweeperError, UsageError, describe_exception

# Grouping-key values must be non-empty (the Pushgateway needs a base64 trick for "", Prometheus
# drops an empty label), so the defaults get a name. It cannot collide: "(default)" is the default
# database's real id, and namespace names ([0-9A-Za-z._-]) have no parentheses.
DEFAULT_LABEL = "(default)"

# Runs that did their job: the same set the log-based "no successful sweep" alert counts.
# ``signal`` is excluded: a run killed every time (e.g. by a too-short deadline) is not healthy.
SUCCESS_REASONS = frozenset({"complete", "max_deletes", "max_runtime"})

# Figures copied from the summary as they are: metric name, summary key, help text.
COUNT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("sweeper_matched", "matched", "Expired keys found in the last run."),
    ("sweeper_deleted", "deleted", "Keys deleted in the last run."),
    ("sweeper_skipped", "skipped", "Keys left alone by --verify in the last run."),
    ("sweeper_failed", "failed", "Keys whose delete failed after retries in the last run."),
    ("sweeper_retries", "retries", "Datastore calls retried in the last run."),
    ("sweeper_batches", "batches", "Delete commits made in the last run."),
    ("sweeper_duration_seconds", "duration_s", "Wall time of the last run."),
)

Handler = Callable[..., Callable[[], None]]


class MetricsError(SweeperError):
    """The Pushgateway could not be reached or refused the push; the sweep itself is done."""


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth for a Pushgateway behind it. The password is read from a file (a mounted
    Kubernetes Secret), never from the command line or a variable, where ``ps`` and a pod's spec
    would show it; it never reaches a log line."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def from_file(cls, username: str, path: str) -> BasicAuth:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(
                f"cannot read the Pushgateway password file {path}: {exc.strerror}"
            ) from None
        if not password:
            raise UsageError(f"the Pushgateway password file {path} is empty")
        return cls(username, password)

    def handler(
        self, url: str, method: str, timeout: float | None, headers: Any, data: bytes
    ) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, self.username, self.password)


def transport(auth: BasicAuth | None) -> Handler:
    """How pushes reach the gateway: with ``auth``'s credentials, or plain."""
    return default_handler if auth is None else auth.handler


def push_summary(
    url: str,
    summary: Mapping[str, Any],
    *,
    job: str = "sweeper",
    timeout_s: float = 10.0,
    now: Callable[[], float] = time.time,
    handler: Handler = default_handler,
) -> None:
    """Push ``summary`` to ``url`` through ``handler`` (:func:`transport`, or a stub in tests).
    Raises :class:`MetricsError` for a bad URL, a bad summary, or any network or HTTP failure."""
    check_url(url)  # which refuses credentials in the URL: it is safe to show
    registry = build_registry(summary, now())
    try:
        pushadd_to_gateway(
            url,
            job=job,
            registry=registry,
            grouping_key=grouping_key(summary),
            timeout=timeout_s,
            handler=handler,
        )
    except urllib.error.HTTPError as exc:
        raise MetricsError(
            f"Pushgateway {url} refused the push: HTTP {exc.code}: {_body(exc)}"
        ) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise MetricsError(f"could not push metrics to Pushgateway {url}: {_reason(exc)}") from exc


def succeeded(summary: Mapping[str, Any]) -> bool:
    """Whether the run did its job: stopped for a good reason and lost no batch."""
    return summary.get("stopped_reason") in SUCCESS_REASONS and _number(summary, "failed") == 0


def grouping_key(summary: Mapping[str, Any]) -> dict[str, str]:
    """The labels that make one target's group; ``job`` is added by prometheus_client."""
    keys = ("project", "kind", "namespace", "database", "property", "shard")
    values = {key: summary.get(key) for key in keys}
    return {k: DEFAULT_LABEL if v is None or v == "" else str(v) for k, v in values.items()}


def build_registry(summary: Mapping[str, Any], timestamp: float) -> CollectorRegistry:
    """A fresh registry per push, so nothing from another push or the process leaks in."""
    registry = CollectorRegistry(auto_describe=True)
    ok = succeeded(summary)

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(name, help_text, registry=registry).set(value)

    gauge("sweeper_last_run_timestamp_seconds", "When the last run ended (Unix time).", timestamp)
    # Absent on failure, and after a dry run (it deleted nothing, however well it went):
    # pushadd then keeps the previous success time in the group.
    if ok and not summary.get("dry_run"):
        gauge(
            "sweeper_last_success_timestamp_seconds",
            "When the last successful run ended (Unix time).",
            timestamp,
        )
    gauge("sweeper_last_run_success", "1 if the last run succeeded, else 0.", float(ok))
    gauge("sweeper_dry_run", "1 if the last run was a dry run, else 0.", _flag(summary, "dry_run"))
    for name, key, help_text in COUNT_GAUGES:
        gauge(name, help_text, _number(summary, key))
    # What is left after the run (``sweeper.result``); left out when not measured (a run stopped
    # by its deadline), so pushadd keeps the last measurement. A null oldest expiry is NaN, which
    # no alert threshold matches: left out, it would keep an old, alarming value in the group.
    if summary.get("empty") is not None:
        oldest = summary.get("oldest_expired")
        gauge(
            "sweeper_oldest_expired_timestamp_seconds",
            "Expiry of the oldest entity still past the cutoff after the last run (NaN: none).",
            math.nan if oldest is None else _epoch_seconds(str(oldest)),
        )
        gauge(
            "sweeper_expired_left",
            "Entities still past the cutoff after the last run (a lower bound past 10,000).",
            _number(summary, "expired_left"),
        )
        gauge(
            "sweeper_carrying",
            "Entities whose property holds a value (a lower bound past 10,000).",
            _number(summary, "carrying"),
        )
        gauge(
            "sweeper_target_empty",
            "1 if no entity carries the property: a misnamed kind, namespace or property.",
            _flag(summary, "empty"),
        )
    reason = Gauge(
        "sweeper_stopped_reason",
        "Why the last run stopped (always 1; the reason is the label).",
        ["reason"],
        registry=registry,
    )
    reason.labels(reason=str(summary.get("stopped_reason") or "unknown")).set(1)
    return registry


def _epoch_seconds(iso: str) -> float:
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise MetricsError(f"cannot push metrics: oldest_expired is {iso!r}") from None


def check_url(url: str) -> str:
    """Refuse what prometheus_client would silently "fix" (it prefixes http:// to anything); also
    ``--pushgateway``'s check: a bad URL is a usage error before the run, not a warning after it."""
    invalid = f"invalid Pushgateway URL {_redact(url)!r}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise MetricsError(f"{invalid}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MetricsError(f"{invalid}: expected http://host:port or https://...")
    if parts.username is not None or parts.password is not None:
        # urllib would take user:password@ for part of the host name and fail obscurely.
        raise MetricsError(f"{invalid}: credentials in the URL are not supported")
    return url


def _number(summary: Mapping[str, Any], key: str) -> float:
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricsError(f"cannot push metrics: summary field {key!r} is {value!r}, not a number")
    return float(value)


def _flag(summary: Mapping[str, Any], key: str) -> float:
    return 1.0 if summary.get(key) else 0.0


def _redact(url: str) -> str:
    """The URL without user:password@, which must never reach a log line."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.password is None and parts.username is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _reason(exc: BaseException) -> str:
    """urllib wraps the real cause (refused, timed out, DNS) in URLError.reason."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return describe_exception(exc.reason)
    return describe_exception(exc)


def _body(exc: urllib.error.HTTPError) -> str:
    """The gateway explains a 400 (e.g. an inconsistent metric) in the body; keep its start."""
    try:
        text = exc.read(300).decode("utf-8", errors="replace").strip()
    except (OSError, http.client.HTTPException):
        return str(exc.reason)
    return text or str(exc.reason)
