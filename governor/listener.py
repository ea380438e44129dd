"""The metrics endpoint's binding: at start, and again while its address is unavailable.

The governor's job is the GPUs; the endpoint only shows what it does. A port that another
process holds when the daemon starts (any local user may bind a port above 1023 first, and
a restart can race the old socket) or an address not on the host yet (a network service
that adds it later) must not keep the GPUs unprotected: the daemon starts governing
without its endpoint, logs ``metrics_listen_failed`` once per distinct error, and tries to
bind again every ``RETRY_S`` seconds on the ticks after (this is an observer), logging
``metrics_listening`` once it serves. Any other bind error (no permission for a port under
1024, an address of the wrong family) cannot go away by waiting and still ends the start
(exit code 6).

A local user who holds the port can serve made-up metrics in the daemon's place: the
journal says so (``metrics_listen_failed``); a web config with TLS lets Prometheus tell the
daemon's endpoint from any other (docs/security.md).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from governor.clock import Clock
from governor.config import MetricsConfig
from governor.core import TICK, TickReport
from governor.errors import EXIT_BIND, CliError, ListenUnavailable
from governor.model import PublishedState

RETRY_S = 10.0
"""Seconds between two tries to bind an unavailable metrics address."""

WAITABLE_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})
"""Bind errors that waiting can clear: the port taken, the address not on the host (yet)."""

Factory = Callable[[Callable[[], PublishedState | None]], Any]
"""Builds and binds the endpoint over the function that returns the last published state."""


def metrics_factory(metrics: MetricsConfig, config_source: str) -> Factory:
    """The factory that serves the published state as ``[metrics]`` says (address, port, web config)."""

    def serve(source: Callable[[], PublishedState | None]) -> Any:
        from governor.httpserver import MetricsServer  # the daemon's own path only: not for what-if runs
        from governor.metrics import build_registry

        try:
            return MetricsServer.from_config(metrics, build_registry(source), source=config_source)
        except OSError as exc:
            raise bind_error(exc, f"{metrics.listen_address}:{metrics.port}") from None

    return serve


def bind_error(exc: OSError, where: str) -> CliError:
    """The error a failed bind of ``where`` (``address:port``) raises: ListenUnavailable when waiting may clear it."""
    message = f"cannot listen for metrics on {where}: {exc.strerror or exc}"
    if exc.errno in WAITABLE_ERRNOS:
        return ListenUnavailable(message)
    return CliError(message, EXIT_BIND)


class MetricsListener:
    """Holds the metrics server, binding it at start and, while unavailable, again every RETRY_S."""

    def __init__(
        self,
        factory: Factory | None,
        published: Callable[[], PublishedState | None],
        log: Any,
        clock: Clock,
        on_bound: Callable[[Any], None],
    ) -> None:
        self._factory = factory
        self._published = published
        self._log = log
        self._clock = clock
        self._on_bound = on_bound
        self.server: Any = None
        """The bound metrics server (None: none configured, or the address is unavailable)."""
        self.unavailable: str | None = None
        """Why the endpoint is not served while its address is unavailable (None when served or off)."""
        self._retry_at_s: float | None = None  # monotonic seconds of the next try

    def bind(self) -> None:
        """Bind now (at start): an unavailable address is logged and tried again later; other errors raise."""
        if self._factory is None or self.server is not None:
            return
        try:
            self.server = self._factory(self._published)
        except ListenUnavailable as exc:
            self._failed(str(exc))
            return
        self.unavailable = self._retry_at_s = None
        self._on_bound(self.server)

    def observe(self, report: TickReport) -> None:
        """On a tick, try again once RETRY_S has passed since the last failed try."""
        due = self._retry_at_s is not None and self._clock.monotonic() >= self._retry_at_s
        if due and report.kind == TICK:
            try:
                self.bind()
            except Exception as exc:  # once governing, no endpoint error ends it (a web config broken since)
                self._failed(str(exc))

    def _failed(self, error: str) -> None:
        """Log ``error`` once (until it changes) and try again in RETRY_S."""
        self._retry_at_s = self._clock.monotonic() + RETRY_S
        if error != self.unavailable:
            self._log.error("metrics_listen_failed", error=error, retry_s=RETRY_S)
        self.unavailable = error

    def close(self) -> None:
        """Close the server, if one is bound; no more tries."""
        self._retry_at_s = None
        if self.server is not None:
            self.server.close()
            self.server = None
