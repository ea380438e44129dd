"""The metrics HTTP endpoint: prometheus-client's WSGI app on a threaded, bounded server.

Serving happens on its own daemon threads and only reads the published state, so a
slow or busy scraper never delays a tick. The endpoint is hardened for a process that
runs as root (see docs/security.md):

- only ``/metrics`` is served (GET, HEAD, OPTIONS), every other path is 404, request
  bodies are never read;
- the request line and the whole request head are capped in bytes, and the head must
  arrive within ``request_timeout_s`` (the TLS handshake included), so a slow client
  holds one thread for a bounded time and never the accepting thread;
- at most ``MAX_CONNECTIONS_PER_ADDRESS`` connections per client address: more are
  closed on accept, before they take a thread, so slow connections from one address
  cannot hold the slots another address's scrape needs;
- at most ``MAX_CONNECTIONS`` requests are handled at once; when all are taken, a new
  connection whose request is already complete (plain HTTP; under TLS: whose handshake
  has begun) takes the slot of the connection still waiting for its head on the address
  holding the most connections, and any other new connection is closed at once, so
  stalled connections spread over many addresses (any local user can use all of
  127.0.0.0/8) cannot starve another address's scrape either;
- optional TLS (prometheus-client's own context setup, optional client certificates)
  and basic auth against a salted scrypt hash: at most ``MAX_PASSWORD_CHECKS`` checks
  run at once and no more than governor.auth.CHECKS_PER_S on average, a request waits
  at most ``PASSWORD_CHECK_WAIT_S`` for one (else 503), and an address with repeated
  failures is answered 429 without a check for a growing while; verified credentials
  are cached, so a configured scraper needs no check at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
import http.client
import io
import math
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import IO, Any, TypeAlias, cast
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client import exposition as _exposition

from governor.auth import CheckBudget, FailureBackoff, PasswordHash, parse_password_hash
from governor.config import MetricsConfig, is_loopback
from governor.metrics import Exposition, GovernorRegistry

# prometheus-client >= 0.17 sets up TLS for its own server: reuse that where present.
# Debian 12 ships 0.16, which has none: tls_context() then does the same steps itself.
_get_ssl_ctx: Callable[..., ssl.SSLContext] | None = getattr(_exposition, "_get_ssl_ctx", None)

StartResponse: TypeAlias = Callable[..., Any]
WsgiApp: TypeAlias = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType]

METRICS_PATH = "/metrics"
MAX_REQUEST_LINE_BYTES = 4096
"""A scrape's request line is well under 100 bytes; longer ones get 414."""
MAX_REQUEST_HEAD_BYTES = 16384
"""Request line and headers together; more gets 431 (wsgiref alone allows 100 headers of 64 KiB)."""
REQUEST_TIMEOUT_S = 3.0
"""Seconds a client has to send its whole request head (TLS handshake included), from when a thread takes it."""
RESPONSE_TIMEOUT_S = 10.0
"""Seconds a client has to take the response (per send)."""
MAX_CONNECTIONS = 64
"""Requests handled at once, all addresses together; further connections wait in the listen backlog."""
MAX_CONNECTIONS_PER_ADDRESS = 8
READY_WAIT_S = 0.005
"""While every slot is taken, how long a new connection may take to send its first bytes (s)."""
"""Connections one client address may hold open; more are closed at once on accept."""
LISTEN_BACKLOG = 1024
"""Connections the kernel queues for accept (capped by net.core.somaxconn): room for a burst of
reconnects from capped addresses, so a scrape's SYN is not dropped (a dropped SYN costs a 1 s retry)."""
MAX_CACHED_CREDENTIALS = 4
"""Accepted Authorization headers remembered (as keyed digests) so a scrape costs no scrypt run."""
MAX_PASSWORD_CHECKS = 1
"""scrypt checks run at once: a flood of wrong passwords burns at most one core."""
PASSWORD_CHECK_WAIT_S = 0.1
"""Seconds a request waits for a password-check slot before it is answered 503."""
METHODS = ("GET", "HEAD", "OPTIONS")
_ALLOW = ", ".join(METHODS)


# --------------------------------------------------------------------------- WSGI layers


def _plain(
    start_response: StartResponse, status: str, text: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    body = text.encode("utf-8")
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


def _head(app: WsgiApp, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """``app``'s answer to a GET, without the body: same status and headers, Content-Length of the body."""
    answer: list[tuple[str, list[tuple[str, str]]]] = []

    def remember(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        answer.append((status, headers))
        return lambda data: None

    result = app({**environ, "REQUEST_METHOD": "GET"}, remember)
    try:
        length = sum(len(chunk) for chunk in result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = answer[-1]
    kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
    start_response(status, [*kept, ("Content-Length", str(length))])
    return []


def metrics_only(app: WsgiApp) -> WsgiApp:
    """Serve ``app`` at /metrics only: GET; HEAD (the GET's status and headers, no body);
    OPTIONS (204 with ``Allow: GET, HEAD, OPTIONS``). Other paths are 404, other methods 405
    (checked here rather than left to prometheus-client, which answers neither HEAD nor OPTIONS
    this way, and whose older releases answer POST)."""

    def route(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _plain(start_response, "404 Not Found", f"not found: the metrics are at {METRICS_PATH}\n")
        method = environ.get("REQUEST_METHOD")
        if method == "OPTIONS":
            start_response("204 No Content", [("Allow", _ALLOW)])
            return []
        if method == "HEAD":
            return _head(app, environ, start_response)
        if method != "GET":
            return _plain(start_response, "405 Method Not Allowed", f"only {_ALLOW}\n", [("Allow", _ALLOW)])
        return app(environ, start_response)

    return route


def cached_app(exposition: Exposition) -> WsgiApp:
    """A WSGI app answering GET with ``exposition``'s cached bytes, as prometheus-client's app
    would answer it: the format the Accept header asks for (text or OpenMetrics), gzip when
    Accept-Encoding allows it. A ``name[]`` filter (rare, never cached) is answered by
    prometheus-client's own app over a registry of the current state."""
    uncached = make_wsgi_app(exposition.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        if query and "name[]" in parse_qs(query):
            return _uncached(exposition, uncached, environ, start_response)
        compress = _exposition.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        encoder, content_type = _exposition.choose_encoder(environ.get("HTTP_ACCEPT") or "")
        body = exposition.render(encoder, content_type, compress=compress)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


def _uncached(
    exposition: Exposition, app: WsgiApp, environ: dict[str, Any], start_response: StartResponse
) -> Iterable[bytes]:
    """prometheus-client's answer over the current state (the registry pins it while it renders)."""
    with exposition.pinned():
        return list(app(environ, start_response))


class Verdict(enum.Enum):
    """The outcome of checking one request's credentials."""

    OK = "ok"
    MISSING = "missing"  # no Authorization header: 401 with a challenge, not counted as a failure
    WRONG = "wrong"  # 401, counted against the address
    BACKED_OFF = "backed_off"  # 429: too many failures from this address, not checked
    BUSY = "busy"  # 503: no password-check slot came free in time


class BasicAuth:
    """Checks an ``Authorization: Basic`` header against a user name and a scrypt hash.

    The hash is parsed once here; a header that once verified is remembered as an
    HMAC digest under a per-process random key, so routine scrapes cost no scrypt run
    (and pass even while their address is backed off). Checks that need scrypt are
    bounded: ``check_slots`` at once, one at a time per address, each waiting at most
    ``check_wait_s`` seconds for a slot, and no more than ``budget`` allows over time
    (governor.auth.CheckBudget); an address past its free failures is refused without
    a check (governor.auth.FailureBackoff).
    """

    realm = "gpu-governor"

    def __init__(
        self,
        username: str,
        password_hash: str,
        *,
        check_slots: int = MAX_PASSWORD_CHECKS,
        check_wait_s: float = PASSWORD_CHECK_WAIT_S,
        backoff: FailureBackoff | None = None,
        budget: CheckBudget | None = None,
    ) -> None:
        self._username = username.encode("utf-8")
        self._hash: PasswordHash = parse_password_hash(password_hash)
        self._cache_key = os.urandom(32)
        self._accepted: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(check_slots)
        self._check_wait_s = check_wait_s
        self._checking: set[str] = set()  # addresses with a scrypt check waiting or running
        self.backoff = backoff if backoff is not None else FailureBackoff()
        self._budget = budget if budget is not None else CheckBudget()
        self.hash_checks = 0
        """scrypt derivations run so far (for tests and curiosity)."""

    def check(self, header: str | None, address: str = "") -> bool:
        """True when ``header`` (the raw Authorization value, or None) carries the right credentials."""
        return self.verdict(header, address) is Verdict.OK

    def verdict(self, header: str | None, address: str = "") -> Verdict:
        """Check ``header`` (the raw Authorization value, or None) sent from client ``address``."""
        if not header:
            return Verdict.MISSING
        digest = hmac.new(self._cache_key, header.encode("latin-1", "replace"), hashlib.sha256).digest()
        if any(hmac.compare_digest(digest, seen) for seen in self._accepted):
            return Verdict.OK
        if self.backoff.blocked_for(address, time.monotonic()) > 0:
            return Verdict.BACKED_OFF
        credentials = _basic_credentials(header)
        if credentials is None:
            self.backoff.failed(address, time.monotonic())
            return Verdict.WRONG
        user, password = credentials
        password_ok = self._derive(password, address)
        if password_ok is None:
            return Verdict.BUSY
        if not (hmac.compare_digest(user, self._username) and password_ok):
            self.backoff.failed(address, time.monotonic())
            return Verdict.WRONG
        self.backoff.succeeded(address)
        with self._lock:
            self._accepted = (digest, *self._accepted)[:MAX_CACHED_CREDENTIALS]
        return Verdict.OK

    def _derive(self, password: bytes, address: str) -> bool | None:
        """Whether ``password`` matches the hash; None when the check budget is spent or no slot came free in time."""
        with self._lock:
            if address in self._checking:
                return None  # one check at a time per address: a flood from one address queues nothing
            if not self._budget.take(time.monotonic()):
                return None
            self._checking.add(address)
        try:
            if not self._slots.acquire(timeout=self._check_wait_s):
                return None
            try:
                self.hash_checks += 1
                # Always derive, so a wrong user name takes as long as a wrong password.
                return self._hash.matches(password)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._checking.discard(address)

    def wrap(self, app: WsgiApp) -> WsgiApp:
        """``app`` behind this check: 401 with a WWW-Authenticate challenge on a missing or wrong
        credential, 429 with Retry-After for a backed-off address, 503 with Retry-After when busy."""

        def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            address = str(environ.get("REMOTE_ADDR", ""))
            verdict = self.verdict(environ.get("HTTP_AUTHORIZATION"), address)
            if verdict is Verdict.OK:
                return app(environ, start_response)
            if verdict is Verdict.BACKED_OFF:
                wait_s = math.ceil(self.backoff.blocked_for(address, time.monotonic())) or 1
                retry = ("Retry-After", str(wait_s))
                return _plain(start_response, "429 Too Many Requests", "too many failed logins\n", [retry])
            if verdict is Verdict.BUSY:
                return _plain(start_response, "503 Service Unavailable", "busy, try again\n", [("Retry-After", "1")])
            challenge = ("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"')
            return _plain(start_response, "401 Unauthorized", "unauthorized\n", [challenge])

        return guarded


def _basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from a ``Basic`` Authorization value, or None when it is not one."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


# --------------------------------------------------------------------------- connections


class _GuardedReader(io.RawIOBase):
    """The request's socket as a raw stream that stops after ``budget`` bytes or at ``deadline``.

    Past the budget a read raises http.client.LineTooLong (the handler answers 414/431);
    past the deadline TimeoutError. Each recv waits at most until the deadline, so a
    client dripping one byte at a time is cut off too.
    """

    def __init__(self, sock: socket.socket, budget: int, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._left = budget
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise http.client.LineTooLong(f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request head not received in time")
        self._sock.settimeout(remaining)
        view = memoryview(buffer)[: self._left]
        count = self._sock.recv_into(view)
        self._left -= count
        return count


def _ready_to_serve(request: Any) -> bool:
    """Whether a connection accepted while every slot is taken has its request ready: for plain
    HTTP its whole request head is already in the socket buffer; under TLS (whose head cannot
    be read ahead) its first handshake bytes are. Waits at most READY_WAIT_S for the first
    bytes, which a real client sends right after connecting; a partial head is not waited for."""
    try:
        poller = select.poll()  # not select(): the descriptor may be above FD_SETSIZE
        poller.register(request, select.POLLIN)
        if not poller.poll(READY_WAIT_S * 1000):
            return False
        # The plain socket's recv (an SSLSocket refuses flags): a peek, nothing is consumed.
        data = socket.socket.recv(request, MAX_REQUEST_HEAD_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    if isinstance(request, ssl.SSLSocket):
        return bool(data)
    return b"\r\n\r\n" in data


class _Handler(WSGIRequestHandler):
    """One request per connection, bounded in bytes and time, no access log, no body read."""

    timeout = REQUEST_TIMEOUT_S
    server: _ThreadingServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced below; closing it drops its hold on the socket
        self._timeout_s = self.server.request_timeout_s
        self.connection.settimeout(self._timeout_s)
        deadline = time.monotonic() + self._timeout_s
        self.rfile = io.BufferedReader(_GuardedReader(self.connection, MAX_REQUEST_HEAD_BYTES, deadline))
        self.server.waiting_for_head(self.request, str(self.client_address[0]))

    def handle(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            too_long = len(self.raw_requestline) > MAX_REQUEST_LINE_BYTES
            parsed = not too_long and self.parse_request()
        except http.client.LineTooLong:
            too_long, parsed = True, False
        except (OSError, ValueError):
            self.close_connection = True
            return  # timed out, reset, evicted, or a failed TLS handshake: nothing to answer
        finally:
            self.server.head_done(self.request)
        self.connection.settimeout(RESPONSE_TIMEOUT_S)  # a fresh allowance to send the response
        if too_long:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not parsed:
            return  # parse_request has sent the error (400, 431, ...)
        app = self.server.get_app()
        if app is None:  # pragma: no cover - MetricsServer always sets one
            return
        body_ignored = io.BytesIO()
        # The response is gathered and sent in one write: wsgiref writes the status line,
        # each header and the body separately, a system call (and a packet) each.
        response = io.BytesIO()
        handler = ServerHandler(body_ignored, response, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back-pointer for logging
        try:
            handler.run(app)
        finally:
            cast("IO[bytes]", self.wfile).write(response.getvalue())

    def log_message(self, format: str, *args: Any) -> None:
        return  # scrapes every few seconds would drown the journal


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    request_timeout_s = REQUEST_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._per_address_cap = MAX_CONNECTIONS_PER_ADDRESS
        self._open: dict[str, int] = {}  # client address -> connections accepted and not yet closed
        self._open_lock = threading.Lock()
        # Connections still waiting for their request head: socket -> (address, since, monotonic s).
        self._heads: dict[Any, tuple[str, float]] = {}
        self._handed_over: set[Any] = set()  # evicted connections whose slot went to another
        self.shed = 0
        """Connections closed on accept while every slot was taken, their request not yet sent."""
        self.evicted = 0
        """Connections closed before their head arrived, to make room for another address."""
        self.refused = 0
        """Connections closed on accept because their address was at its cap."""
        self.closing = False
        super().__init__(*args, **kwargs)

    def _admit(self, host: str) -> bool:
        with self._open_lock:
            held = self._open.get(host, 0)
            if held >= self._per_address_cap:
                self.refused += 1
                return False
            self._open[host] = held + 1
            return True

    def _leave(self, host: str) -> None:
        with self._open_lock:
            held = self._open.pop(host, 1) - 1
            if held > 0:
                self._open[host] = held

    def waiting_for_head(self, request: Any, host: str) -> None:
        """A handler thread started reading this connection's request head."""
        with self._open_lock:
            self._heads[request] = (host, time.monotonic())

    def head_done(self, request: Any) -> None:
        """The head arrived (or the connection ended): the connection is no longer evictable."""
        with self._open_lock:
            self._heads.pop(request, None)

    def _evict_for(self, host: str) -> bool:
        """Every slot is taken: close one connection still waiting for its head to make room
        for ``host``, handing its slot over. The victim comes from the address holding the most connections (the
        oldest of its waiting ones; ``host``'s own only if it holds the most). So stalled
        connections spread over many addresses cannot keep a scrape from another address
        waiting: each new arrival takes the slot of a stalled one, and a scrape, whose head
        arrives at once, is never the one waiting long. True if one was closed."""
        with self._open_lock:
            if not self._heads:
                return False
            victim, _ = max(self._heads.items(), key=lambda item: (self._open.get(item[1][0], 0), -item[1][1]))
            del self._heads[victim]
            self._handed_over.add(victim)  # its slot now belongs to the newcomer
            self.evicted += 1
        with contextlib.suppress(OSError):
            # The plain socket's shutdown (under TLS too): its handler's recv returns at once.
            socket.socket.shutdown(victim, socket.SHUT_RDWR)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the accepting thread: a refusal costs one close and no thread.
        host = str(client_address[0])
        if not self._admit(host):
            self.shutdown_request(request)
            return
        acquired = self._slots.acquire(blocking=False)
        if not acquired:
            # Every slot taken (an attack, or a burst): only a client ready to be served now
            # gets the slot of an evicted stalled connection (handed over at once: its thread
            # ends without releasing it); anyone else is closed at once, so the backlog, where
            # a scrape may be queued behind thousands of reconnects, drains in microseconds each.
            if not _ready_to_serve(request):
                self.shed += 1
                self._leave(host)
                self.shutdown_request(request)
                return
            acquired = self._evict_for(host)
        while not acquired:
            acquired = self._slots.acquire(timeout=0.2) or self._evict_for(host)
            if not acquired and self.closing:
                self._leave(host)
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self._leave(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                handed_over = request in self._handed_over
                self._handed_over.discard(request)
            if not handed_over:
                self._slots.release()
            self._leave(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (OSError, ValueError)):
            return  # a client going away mid-response is not news
        super().handle_error(request, client_address)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for HTTPS; with ``client_ca_file`` clients must present a certificate it signed."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """A server context, TLS 1.2 at least: prometheus-client's own TLS setup where it has one
    (0.17 and later), else the same steps with the standard library (Debian 12 ships 0.16)."""
    if _get_ssl_ctx is not None:
        context: ssl.SSLContext = _get_ssl_ctx(
            tls.cert_file,
            tls.key_file,
            ssl.PROTOCOL_TLS_SERVER,
            tls.client_ca_file or None,
            None,
            bool(tls.client_ca_file),
        )
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if tls.client_ca_file:
            context.load_verify_locations(tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def security_warnings(address: str, tls: TlsFiles | None, basic_auth: bool) -> tuple[str, ...]:
    """What is weak about an endpoint on ``address``: nothing on loopback; plain HTTP or no auth when remote."""
    if is_loopback(address):
        return ()
    warnings = []
    if tls is None:
        warnings.append("metrics are served to other hosts over plain HTTP (no TLS)")
    if not basic_auth and not (tls is not None and tls.client_ca_file):
        warnings.append("metrics are served to other hosts without authentication")
    return tuple(warnings)


class MetricsServer:
    """A running /metrics endpoint; ``port`` is the bound port (useful with port 0).

    Given an :class:`~governor.metrics.Exposition`, or the registry
    :func:`~governor.metrics.build_registry` returns, it serves the bytes rendered once per
    published state (the daemon's way); given another registry, prometheus-client's app
    renders it on every scrape."""

    def __init__(
        self,
        address: str,
        port: int,
        registry: CollectorRegistry | Exposition,
        *,
        tls: TlsFiles | None = None,
        basic_auth: BasicAuth | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        server_class = _ThreadingServer6 if ":" in address else _ThreadingServer
        if isinstance(registry, GovernorRegistry):
            registry = Exposition(registry.source)
        self.exposition = registry if isinstance(registry, Exposition) else None
        """What is served rendered once per published state (None: a plain registry, rendered per scrape)."""
        served = cached_app(registry) if isinstance(registry, Exposition) else make_wsgi_app(registry)
        app: WsgiApp = metrics_only(served)
        if basic_auth is not None:
            app = basic_auth.wrap(app)
        context = tls_context(tls) if tls is not None else None  # before binding: a bad file binds nothing
        self._server = make_server(address, port, app, server_class=server_class, handler_class=_Handler)
        self._server.request_timeout_s = request_timeout_s
        if context is not None:
            # Unlike prometheus-client's start_http_server, the handshake is not done in
            # accept() on the serving thread (where one silent client would stall every
            # scrape) but on the request's own thread, within its deadline.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.address = address
        self.port: int = self._server.server_address[1]
        self.tls = tls
        self.basic_auth = basic_auth is not None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, metrics: MetricsConfig, registry: CollectorRegistry | Exposition) -> MetricsServer:
        """Serve ``registry`` as [metrics] says: address, port, TLS files, basic auth (an
        :class:`~governor.metrics.Exposition` is served as bytes cached per published state)."""
        tls = TlsFiles(metrics.tls_cert_file, metrics.tls_key_file, metrics.tls_client_ca_file) if metrics.tls else None
        auth = BasicAuth(metrics.basic_auth_username, metrics.basic_auth_password_hash) if metrics.basic_auth else None
        return cls(metrics.listen_address, metrics.port, registry, tls=tls, basic_auth=auth)

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}{METRICS_PATH}"

    @property
    def refused_connections(self) -> int:
        """Connections closed on accept so far because their address held MAX_CONNECTIONS_PER_ADDRESS."""
        return self._server.refused

    @property
    def evicted_connections(self) -> int:
        """Connections closed so far while still waiting for their request head, because every
        slot was taken when another connection arrived."""
        return self._server.evicted

    @property
    def shed_connections(self) -> int:
        """Connections closed on accept while every slot was taken, their request not yet complete."""
        return self._server.shed

    @property
    def remote(self) -> bool:
        """True when hosts other than this one may connect."""
        return not is_loopback(self.address)

    def security_warnings(self) -> tuple[str, ...]:
        """What is weak about this endpoint (empty on loopback, or remote with TLS and auth)."""
        return security_warnings(self.address, self.tls, self.basic_auth)

    def security_summary(self) -> str:
        """One line for the start-up log: where, how protected, and what is weak."""
        parts = ["remote" if self.remote else "loopback only"]
        if self.tls is None:
            parts.append("plain http")
        else:
            parts.append("tls with client certificates" if self.tls.client_ca_file else "tls")
        parts.append("basic auth" if self.basic_auth else "no basic auth")
        warnings = self.security_warnings()
        if warnings:
            parts.append("WARNING: " + "; ".join(warnings))
        return ", ".join(parts)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.closing = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
