"""Prometheus metrics: the no-op recorder and the exporter over real HTTP on 127.0.0.1."""

from __future__ import annotations

import errno
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gated import metrics as metrics_module
from gated.errors import ConfigError, GatedError
from gated.metrics import Metrics, create_metrics, parse_listen

# Deadline of one scrape of the local exporter, in seconds.
SCRAPE_TIMEOUT_S = 5.0


@pytest.fixture
def exporter() -> Iterator[Metrics]:
    recorder = create_metrics("127.0.0.1:0")
    yield recorder
    recorder.close()


def scrape(recorder: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Fetch /metrics over HTTP; return sample name and sorted labels -> value."""
    assert recorder.address is not None
    host, port = recorder.address
    # trust_env=False: a proxy set in the environment must not see this request.
    with httpx.Client(trust_env=False, timeout=SCRAPE_TIMEOUT_S) as client:
        response = client.get(f"http://{host}:{port}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_disabled_is_noop() -> None:
    recorder = create_metrics(None)

    assert type(recorder) is Metrics
    assert recorder.enabled is False
    assert recorder.address is None
    recorder.decision("entry-1", "granted", 0.01)
    recorder.set_backlog(3)
    recorder.api_error("unavailable")
    recorder.scanner_reconnect("entry-1")
    recorder.set_online(True)
    recorder.set_sessions_cached(10)
    recorder.close()


def test_exporter_serves_metrics(exporter: Metrics) -> None:
    exporter.decision("entry-1", "granted", 0.004)
    exporter.decision("entry-1", "granted", 0.3)
    exporter.decision("exit-1", "unknown_code", 1.5)
    exporter.set_backlog(7)
    exporter.api_error("unavailable")
    exporter.api_error("unavailable")
    exporter.scanner_reconnect("exit-1")
    exporter.set_online(True)
    exporter.set_sessions_cached(42)

    samples = scrape(exporter)

    assert exporter.enabled is True
    granted = (("lane", "entry-1"), ("outcome", "granted"))
    assert samples[("gated_decisions_total", granted)] == 2
    unknown = (("lane", "exit-1"), ("outcome", "unknown_code"))
    assert samples[("gated_decisions_total", unknown)] == 1
    assert samples[("gated_decision_seconds_count", (("lane", "entry-1"),))] == 2
    assert samples[("gated_decision_seconds_sum", (("lane", "entry-1"),))] == pytest.approx(0.304)
    bucket = (("lane", "entry-1"), ("le", "0.005"))
    assert samples[("gated_decision_seconds_bucket", bucket)] == 1
    assert samples[("gated_journal_backlog", ())] == 7
    assert samples[("gated_api_errors_total", (("kind", "unavailable"),))] == 2
    assert samples[("gated_scanner_reconnects_total", (("lane", "exit-1"),))] == 1
    assert samples[("gated_api_online", ())] == 1
    assert samples[("gated_sessions_cached", ())] == 42


def test_online_gauge_follows_state(exporter: Metrics) -> None:
    exporter.set_online(True)
    exporter.set_online(False)

    assert scrape(exporter)[("gated_api_online", ())] == 0


def test_metric_names_prefixed(exporter: Metrics) -> None:
    exporter.decision("entry-1", "granted", 0.01)
    exporter.api_error("auth")
    exporter.scanner_reconnect("entry-1")

    names = {name for name, _ in scrape(exporter)}

    assert names
    assert all(name.startswith("gated_") for name in names), names


def test_instances_do_not_clash() -> None:
    first = create_metrics("127.0.0.1:0")
    second = create_metrics("127.0.0.1:0")
    try:
        first.set_sessions_cached(1)
        second.set_sessions_cached(2)

        assert first.address != second.address
        assert scrape(first)[("gated_sessions_cached", ())] == 1
        assert scrape(second)[("gated_sessions_cached", ())] == 2
    finally:
        first.close()
        second.close()


def test_close_stops_exporter() -> None:
    with capture_logs() as logs:
        recorder = create_metrics("127.0.0.1:0")
        assert recorder.address is not None
        host, port = recorder.address
        recorder.close()
        recorder.close()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{host}:{port}/metrics", trust_env=False, timeout=SCRAPE_TIMEOUT_S)
    events = [entry["event"] for entry in logs]
    assert events == ["metrics.listening", "metrics.stopped"]


@pytest.mark.anyio
async def test_aclose_stops_exporter() -> None:
    recorder = create_metrics("127.0.0.1:0")
    assert recorder.address is not None
    host, port = recorder.address

    await recorder.aclose()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{host}:{port}/metrics", trust_env=False, timeout=SCRAPE_TIMEOUT_S)


def test_missing_library_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import prometheus_client` raise ImportError.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(ConfigError, match=r"gated\[metrics\]"):
        create_metrics("127.0.0.1:0")
    assert create_metrics(None).enabled is False


@pytest.mark.parametrize(
    "listen", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536", "[]:9464"]
)
def test_invalid_listen_rejected(listen: str) -> None:
    with pytest.raises(ConfigError, match="is not host:port"):
        create_metrics(listen)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


def test_port_in_use_is_not_config_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(GatedError, match="cannot listen on") as raised:
            create_metrics(f"127.0.0.1:{port}")
        # A port in use may free up, so the daemon should exit for a restart.
        assert not isinstance(raised.value, ConfigError)
    finally:
        holder.close()


class _FailingPrometheus:
    """Stand-in for prometheus_client whose exporter fails to bind with one errno."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def start_http_server(self, port: int, addr: str, registry: Any) -> Any:
        raise self.error


@pytest.mark.parametrize("code", [errno.EADDRNOTAVAIL, errno.EACCES])
def test_unbindable_address_is_config_error(code: int) -> None:
    fake = _FailingPrometheus(OSError(code, "bind failed"))

    expected = re.escape("metrics.listen: cannot listen on 192.0.2.1:9464")
    with pytest.raises(ConfigError, match=expected):
        metrics_module._start_exporter(fake, registry=None, listen=("192.0.2.1", 9464))


def test_unresolvable_host_is_config_error() -> None:
    fake = _FailingPrometheus(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    with pytest.raises(ConfigError, match="cannot be resolved"):
        metrics_module._start_exporter(fake, registry=None, listen=("no-such-host", 9464))
