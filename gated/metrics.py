"""Optional Prometheus metrics, served over HTTP when ``[metrics] listen`` is set.

prometheus-client is an optional dependency (``pip install 'gated[metrics]'``)
and is imported only when the exporter is enabled. Without it, or with no
listen address, ``create_metrics`` returns a ``Metrics`` whose methods do
nothing, so callers never check whether metrics are on.

Every instance has its own ``CollectorRegistry``, not prometheus-client's
global one, so two instances (two tests, or a test and the daemon) never
clash on metric names. The exporter therefore serves only gated's metrics,
without the process and Python collectors of the global registry.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

import anyio

from gated.errors import ConfigError, GatedError
from gated.logs import get_logger

# Upper bounds of the decision-time histogram, in seconds: a decision from the
# local cache takes milliseconds, one that waits for an API lookup takes up to
# api.lookup_timeout_s, which the config caps at 30 s.
DECISION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# Errors of bind() that no restart fixes: the address is not on this host, or
# the port needs privileges the service does not have.
_CONFIG_BIND_ERRNOS = {errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM}


class Metrics:
    """Recorder of the daemon's metrics; this base class records nothing.

    ``create_metrics`` returns a subclass that records into Prometheus when
    the exporter is enabled. Every method is safe to call from any thread.
    """

    enabled = False

    @property
    def address(self) -> tuple[str, int] | None:
        """Host and port the exporter listens on, or None when there is no exporter."""
        return None

    def decision(self, lane: str, outcome: str, seconds: float) -> None:
        """Count one gate decision and record how long it took, in seconds."""

    def set_backlog(self, pending: int) -> None:
        """Set the number of journal events not yet delivered to the API."""

    def api_error(self, kind: str) -> None:
        """Count one failed API request, by error kind (``unavailable``, ``auth``, ...)."""

    def scanner_reconnect(self, lane: str) -> None:
        """Count one reconnection of a lane's scanner."""

    def set_online(self, online: bool) -> None:
        """Set whether the API is reachable."""

    def set_sessions_cached(self, count: int) -> None:
        """Set the number of sessions in the local cache."""

    def close(self) -> None:
        """Stop the exporter, if any; metrics recorded afterwards are dropped.

        Stopping waits up to 0.5 s, the poll interval of the exporter's server
        loop, so async code calls ``aclose`` instead.
        """

    async def aclose(self) -> None:
        """Stop the exporter in a worker thread, without blocking the event loop."""
        await anyio.to_thread.run_sync(self.close)


class _PrometheusMetrics(Metrics):
    enabled = True

    def __init__(self, prometheus: Any, listen: tuple[str, int]) -> None:
        registry = prometheus.CollectorRegistry(auto_describe=True)
        self._create_metrics(prometheus, registry)

        self._server, self._thread = _start_exporter(prometheus, registry, listen)
        host, port = self._server.server_address[:2]
        self._address = (str(host), int(port))
        self._close_lock = threading.Lock()
        self._log = get_logger("metrics")
        self._log.info("metrics.listening", host=self._address[0], port=self._address[1])

    def _create_metrics(self, prometheus: Any, registry: Any) -> None:
        self._decisions = prometheus.Counter(
            "gated_decisions",
            "Gate decisions, by lane and outcome.",
            ["lane", "outcome"],
            registry=registry,
        )
        self._decision_seconds = prometheus.Histogram(
            "gated_decision_seconds",
            "Time from a scanned code to the gate decision, in seconds.",
            ["lane"],
            buckets=DECISION_BUCKETS_S,
            registry=registry,
        )
        self._backlog = prometheus.Gauge(
            "gated_journal_backlog",
            "Gate events in the local journal not yet delivered to the API.",
            registry=registry,
        )
        self._api_errors = prometheus.Counter(
            "gated_api_errors",
            "Failed API requests, by error kind.",
            ["kind"],
            registry=registry,
        )
        self._scanner_reconnects = prometheus.Counter(
            "gated_scanner_reconnects",
            "Reconnections of a lane's scanner after it was lost.",
            ["lane"],
            registry=registry,
        )
        self._online = prometheus.Gauge(
            "gated_api_online",
            "1 while the API is reachable, 0 while gated decides offline.",
            registry=registry,
        )
        self._sessions_cached = prometheus.Gauge(
            "gated_sessions_cached",
            "Sessions in the local cache.",
            registry=registry,
        )

    @property
    def address(self) -> tuple[str, int] | None:
        return self._address

    def decision(self, lane: str, outcome: str, seconds: float) -> None:
        self._decisions.labels(lane=lane, outcome=outcome).inc()
        self._decision_seconds.labels(lane=lane).observe(max(seconds, 0.0))

    def set_backlog(self, pending: int) -> None:
        self._backlog.set(pending)

    def api_error(self, kind: str) -> None:
        self._api_errors.labels(kind=kind).inc()

    def scanner_reconnect(self, lane: str) -> None:
        self._scanner_reconnects.labels(lane=lane).inc()

    def set_online(self, online: bool) -> None:
        self._online.set(1 if online else 0)

    def set_sessions_cached(self, count: int) -> None:
        self._sessions_cached.set(count)

    def close(self) -> None:
        with self._close_lock:
            if self._server is None:
                return
            server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        self._thread.join()
        self._log.info("metrics.stopped")


def create_metrics(listen: str | None) -> Metrics:
    """Return the metrics recorder, starting the exporter on ``listen`` (``host:port``).

    ``None`` returns a recorder that does nothing. Port 0 picks a free port,
    which ``address`` then contains. An IPv6 host is written in brackets,
    ``[::1]:9464``.

    Raises ConfigError when ``listen`` is invalid, when prometheus-client is not
    installed, or when the host is not an address of this machine. Raises
    GatedError when the port is in use.
    """
    if listen is None:
        return Metrics()
    address = parse_listen(listen)
    try:
        import prometheus_client  # noqa: PLC0415 (an optional dependency, imported on use)
    except ImportError:
        raise ConfigError(
            [
                f"metrics.listen: {listen!r} is set but prometheus-client is not installed;"
                " install gated[metrics] or remove metrics.listen"
            ]
        ) from None
    return _PrometheusMetrics(prometheus_client, address)


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6-host]:port`` into host and port.

    Raises ConfigError if ``listen`` has no host or no port from 0 to 65535.
    """
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid = bool(sep and host and port_text.isdigit() and int(port_text) <= 65535)
    if not valid:
        raise ConfigError(
            [f"metrics.listen: {listen!r} is not host:port, for example '127.0.0.1:9464'"]
        )
    return host, int(port_text)


def _start_exporter(prometheus: Any, registry: Any, listen: tuple[str, int]) -> tuple[Any, Any]:
    host, port = listen
    try:
        # start_http_server serves from a daemon thread; close() stops it.
        started = prometheus.start_http_server(port, addr=host, registry=registry)
    except socket.gaierror as exc:
        raise ConfigError([f"metrics.listen: host {host!r} cannot be resolved: {exc}"]) from exc
    except OSError as exc:
        if exc.errno in _CONFIG_BIND_ERRNOS:
            raise ConfigError(
                [f"metrics.listen: cannot listen on {host}:{port}: {exc.strerror}"]
            ) from exc
        # EADDRINUSE lands here: the holder of the port may be a previous gated
        # that is still stopping, so this is not a config error and a restart may help.
        raise GatedError(
            f"metrics exporter cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    if not isinstance(started, tuple):
        # Old prometheus-client versions return None, which leaves no way to stop the server.
        raise GatedError("prometheus-client is too old for gated; install gated[metrics]")
    server, thread = started
    return server, thread
