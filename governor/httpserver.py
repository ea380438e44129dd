"""The metrics HTTP endpoint: prometheus-client's WSGI app on a threaded server.

Serving happens on its own threads and only reads the published state, so a slow or
busy scraper never delays a tick.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes every few seconds would drown the journal."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running /metrics endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, address: str, port: int, registry: CollectorRegistry) -> None:
        server_class = _ThreadingServer6 if ":" in address else _ThreadingServer
        app = make_wsgi_app(registry)
        self._server = make_server(address, port, app, server_class=server_class, handler_class=_QuietHandler)
        self.address = address
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
