"""Pushgateway metrics without a network: a fake transport captures what would be sent.

The real Pushgateway's handling of the same pushes is in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import socket
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sweeper.logs import SweeperError
from sweeper.metrics import MetricsError, push_summary, succeeded
from sweeper.result import SweepResult
from sweeper.settings import SweepSettings

URL = "http://pushgateway.test:9091"
NOW = 1_717_243_200.0
# prometheus_client puts the grouping labels in sorted order after the job.
GROUP = "/metrics/job/sweeper/database/%28default%29/kind/eq-session"
GROUP += "/namespace/%28default%29/project/eq-prod/property/expires_at"
GROUP += "/shard@base64/MC8x"  # "0/1": a shard is I/N, and a "/" is base64-encoded in the path


@dataclass
class Request:
    url: str
    method: str
    timeout: float | None
    headers: list[tuple[str, str]]
    data: bytes


@dataclass
class FakeHandler:
    """prometheus_client's handler hook: records each request, optionally fails like urllib."""

    error: BaseException | None = None
    requests: list[Request] = field(default_factory=list)

    def __call__(self, **kwargs: Any) -> Callable[[], None]:
        def send() -> None:
            self.requests.append(Request(**kwargs))
            if self.error is not None:
                raise self.error

        return send

    def samples(self) -> dict[str, tuple[dict[str, str], float]]:
        """The last push's samples by name: (labels, value); the handler saw one per name."""
        (*_, last) = self.requests
        families = text_string_to_metric_families(last.data.decode())
        return {s.name: (s.labels, s.value) for f in families for s in f.samples}


def summary(**overrides: Any) -> dict[str, Any]:
    """A real ``sweep_finished`` summary, so these tests follow the engine's contract."""
    settings = SweepSettings(
        kind="eq-session",
        prop="expires_at",
        format="auto",
        grace=dt.timedelta(hours=3),
        dry_run=overrides.pop("dry_run", False),
        namespace=overrides.pop("namespace", None),
        database=overrides.pop("database", None),
        project=overrides.pop("project", "eq-prod"),
    )
    result = SweepResult(settings, dt.datetime(2024, 6, 1, 9, tzinfo=dt.UTC), "epoch-seconds")
    counts = {"matched": 1200, "deleted": 1200, "retries": 2, "batches": 3, "duration_s": 4.25}
    for name, value in {**counts, **overrides}.items():
        setattr(result, name, value)
    return result.summary()


def failure() -> dict[str, Any]:
    return summary(deleted=700, failed=500, stopped_reason="error", error="deleting failed")


def push(data: dict[str, Any], **kwargs: Any) -> FakeHandler:
    handler = FakeHandler()
    push_summary(URL, data, now=lambda: NOW, handler=handler, **kwargs)
    return handler


def test_a_success_is_one_post_to_the_targets_group() -> None:
    handler = push(summary(), timeout_s=3.5)
    (request,) = handler.requests
    assert request.method == "POST"  # pushadd: replaces only the names it carries
    assert request.url == URL + GROUP
    assert request.timeout == 3.5
    assert ("Content-Type", "text/plain; version=0.0.4; charset=utf-8") in request.headers


def test_a_success_pushes_every_figure_and_both_timestamps() -> None:
    values = {name: value for name, (_, value) in push(summary()).samples().items()}
    assert values == {
        "sweeper_last_run_timestamp_seconds": NOW,
        "sweeper_last_success_timestamp_seconds": NOW,
        "sweeper_last_run_success": 1.0,
        "sweeper_dry_run": 0.0,
        "sweeper_matched": 1200.0,
        "sweeper_deleted": 1200.0,
        "sweeper_skipped": 0.0,
        "sweeper_failed": 0.0,
        "sweeper_retries": 2.0,
        "sweeper_batches": 3.0,
        "sweeper_duration_seconds": 4.25,
        "sweeper_stopped_reason": 1.0,
    }


def test_only_the_stopped_reason_carries_a_label_of_its_own() -> None:
    samples = push(summary(stopped_reason="max_runtime")).samples()
    assert samples["sweeper_stopped_reason"] == ({"reason": "max_runtime"}, 1.0)
    others = {name: labels for name, (labels, _) in samples.items()}
    del others["sweeper_stopped_reason"]
    assert all(labels == {} for labels in others.values())  # the group supplies the target


def test_every_metric_has_help_text() -> None:
    (request,) = push(summary()).requests
    families = list(text_string_to_metric_families(request.data.decode()))
    assert len(families) == 12
    assert all(f.type == "gauge" and f.documentation for f in families)


def test_a_failure_leaves_out_the_success_time_so_the_gateway_keeps_the_old_one() -> None:
    samples = push(failure()).samples()
    assert "sweeper_last_success_timestamp_seconds" not in samples
    assert samples["sweeper_last_run_timestamp_seconds"][1] == NOW
    assert samples["sweeper_last_run_success"][1] == 0.0
    assert samples["sweeper_failed"][1] == 500.0
    assert samples["sweeper_deleted"][1] == 700.0
    assert samples["sweeper_stopped_reason"] == ({"reason": "error"}, 1.0)


@pytest.mark.parametrize(
    ("stopped_reason", "failed", "ok"),
    [
        ("complete", 0, True),
        ("max_deletes", 0, True),
        ("max_runtime", 0, True),
        ("complete", 1, False),  # a lost batch is never a success
        ("signal", 0, False),  # killed before it finished: not a success either
        ("error", 0, False),
    ],
)
def test_what_counts_as_success(stopped_reason: str, failed: int, ok: bool) -> None:
    data = summary(stopped_reason=stopped_reason, failed=failed)
    assert succeeded(data) is ok
    samples = push(data).samples()
    assert ("sweeper_last_success_timestamp_seconds" in samples) is ok
    assert samples["sweeper_last_run_success"][1] == float(ok)


def test_a_dry_run_is_flagged_and_never_a_success() -> None:
    samples = push(summary(dry_run=True, deleted=0)).samples()
    assert samples["sweeper_dry_run"][1] == 1.0
    # It deleted nothing: the last real run's success time must stay the one alerted on.
    assert "sweeper_last_success_timestamp_seconds" not in samples


def test_two_projects_push_to_groups_of_their_own() -> None:
    urls = {push(summary(project=p)).requests[0].url for p in ("eq-prod", "eq-staging")}
    assert len(urls) == 2


def test_named_namespace_and_database_are_in_the_group() -> None:
    (request,) = push(summary(namespace="prod", database="sessions"), job="eq").requests
    assert request.url == (
        URL + "/metrics/job/eq/database/sessions/kind/eq-session/namespace/prod/project/eq-prod"
        "/property/expires_at/shard@base64/MC8x"
    )


def test_each_shard_of_a_target_pushes_to_a_group_of_its_own() -> None:
    urls = {push({**summary(), "shard": f"{i}/3"}).requests[0].url for i in range(3)}
    assert len(urls) == 3


def test_empty_target_labels_get_the_placeholder() -> None:
    data = {**summary(), "namespace": "", "database": ""}
    (request,) = push(data).requests
    assert request.url == URL + GROUP


def test_a_kind_with_a_slash_is_base64_encoded_in_the_group_path() -> None:
    data = {**summary(), "kind": "a/b"}
    (request,) = push(data).requests
    assert "/kind@base64/YS9i/" in request.url


@pytest.mark.parametrize(
    "url",
    [
        "pushgateway.test:9091",  # prometheus_client would guess http://; we do not
        "ftp://pushgateway.test",
        "http://",
        "http://:9091",
        "http://pushgateway.test:port",
        "https://user:secret@pushgateway.test",
        "",
    ],
)
def test_a_bad_url_is_refused_before_any_request(url: str) -> None:
    handler = FakeHandler()
    with pytest.raises(MetricsError, match="invalid Pushgateway URL") as info:
        push_summary(url, summary(), handler=handler)
    assert handler.requests == []
    assert "secret" not in info.value.message


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_an_unreachable_gateway_is_a_metrics_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(MetricsError) as info:
        push_summary(url, summary(), timeout_s=2.0)  # the real transport
    message = info.value.message
    assert message.startswith(f"could not push metrics to Pushgateway {url}:")
    assert "ConnectionRefusedError" in message
    assert "\n" not in message
    assert isinstance(info.value, SweeperError)


def test_an_http_error_from_the_gateway_carries_its_status_and_explanation() -> None:
    body = io.BytesIO(b"pushed metrics are invalid or inconsistent with existing metrics\n")
    error = urllib.error.HTTPError(URL, 400, "Bad Request", Message(), body)
    with pytest.raises(MetricsError) as info:
        push_summary(URL, summary(), handler=FakeHandler(error=error))
    assert info.value.message == (
        f"Pushgateway {URL} refused the push: HTTP 400: "
        "pushed metrics are invalid or inconsistent with existing metrics"
    )


@pytest.mark.parametrize(
    "error",
    [TimeoutError("timed out"), urllib.error.URLError(OSError("Network is unreachable"))],
)
def test_network_errors_are_metrics_errors(error: BaseException) -> None:
    with pytest.raises(MetricsError, match=f"^could not push metrics to Pushgateway {URL}: "):
        push_summary(URL, summary(), handler=FakeHandler(error=error))


def test_the_url_credentials_never_reach_the_message() -> None:
    with pytest.raises(MetricsError) as info:
        push_summary("http://u:pw@gw.test", summary(), handler=FakeHandler())
    assert "pw" not in info.value.message
    assert "http://gw.test" in info.value.message


def test_a_summary_missing_a_count_is_a_metrics_error() -> None:
    data = summary()
    del data["deleted"]
    with pytest.raises(MetricsError, match="'deleted' is None, not a number"):
        push(data)


# --- retention: what is left after a run --------------------------------------------------


def test_what_is_left_is_pushed_when_the_run_measured_it() -> None:
    data = {
        **summary(),
        "carrying": 5000,
        "empty": False,
        "expired_left": 12,
        "oldest_expired": "2024-06-01T08:00:00Z",
    }
    samples = push(data).samples()
    assert samples["sweeper_expired_left"][1] == 12.0
    assert samples["sweeper_carrying"][1] == 5000.0
    assert samples["sweeper_target_empty"][1] == 0.0
    expected = dt.datetime(2024, 6, 1, 8, tzinfo=dt.UTC).timestamp()
    assert samples["sweeper_oldest_expired_timestamp_seconds"][1] == expected


def test_nothing_expired_left_is_nan_so_an_old_alarming_value_is_replaced() -> None:
    data = {**summary(), "carrying": 0, "empty": True, "expired_left": 0, "oldest_expired": None}
    samples = push(data).samples()
    assert math.isnan(samples["sweeper_oldest_expired_timestamp_seconds"][1])
    assert samples["sweeper_target_empty"][1] == 1.0


def test_a_run_that_did_not_measure_what_is_left_pushes_none_of_it() -> None:
    samples = push(summary()).samples()  # e.g. stopped by its deadline: fields are null
    assert "sweeper_expired_left" not in samples
    assert "sweeper_oldest_expired_timestamp_seconds" not in samples
