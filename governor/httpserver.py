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
- optional TLS and basic auth from an exporter-toolkit web-config file
  (governor.webconfig), or from the deprecated ``[metrics]`` keys: the context is built
  here with the standard library, and each new connection gets the one in force, picked
  up again (at most once per ``RECHECK_S``) when the web-config file or a certificate,
  key or CA file it names changes (:class:`LiveWebConfig`: no restart; a broken change
  keeps the last good config and is logged once);
- password checks (bcrypt; scrypt for the deprecated key): at most ``MAX_PASSWORD_CHECKS``
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
from collections.abc import Callable, Iterable, Mapping
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
from governor.errors import ConfigError, ConfigIssue
from governor.metrics import Exposition, GovernorRegistry
from governor.webconfig import (
    TlsServerConfig,
    WebConfig,
    build_tls_context,
    file_states,
    from_metrics_keys,
    password_hashes,
    read_web_config,
)

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
"""Accepted Authorization headers remembered (as keyed digests) so a scrape costs no bcrypt run."""
MAX_PASSWORD_CHECKS = 1
"""bcrypt (or scrypt) checks run at once: a flood of wrong passwords burns at most one core."""
RECHECK_S = 1.0
"""At most this often (seconds, on a new connection) the web-config file and the TLS files are stat()ed for changes."""
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
    """Checks an ``Authorization: Basic`` header against user names and their password hashes.

    ``users`` maps a user name to its hash (a parsed one, or the text: bcrypt, or scrypt from
    the deprecated key). A header that once verified is remembered as an HMAC digest under a
    per-process random key, so routine scrapes cost no bcrypt run (and pass even while their
    address is backed off). A check always runs one hash, an unknown user's against another
    user's hash, so timing does not tell which users exist. Checks are bounded:
    ``check_slots`` at once, one at a time per address, each waiting at most
    ``check_wait_s`` seconds for a slot, and no more than ``budget`` allows over time
    (governor.auth.CheckBudget); an address past its free failures is refused without a
    check (governor.auth.FailureBackoff).
    """

    realm = "gpu-governor"

    def __init__(
        self,
        users: Mapping[str, PasswordHash | str],
        *,
        check_slots: int = MAX_PASSWORD_CHECKS,
        check_wait_s: float = PASSWORD_CHECK_WAIT_S,
        backoff: FailureBackoff | None = None,
        budget: CheckBudget | None = None,
    ) -> None:
        if not users:
            raise ValueError("basic auth needs at least one user")
        self._users: dict[bytes, PasswordHash] = {
            name.encode("utf-8"): parse_password_hash(hashed) if isinstance(hashed, str) else hashed
            for name, hashed in users.items()
        }
        self._decoy = next(iter(self._users.values()))  # an unknown user's password is checked against this
        self._cache_key = os.urandom(32)
        self._accepted: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(check_slots)
        self._check_wait_s = check_wait_s
        self._checking: set[str] = set()  # addresses with a password check waiting or running
        self.backoff = backoff if backoff is not None else FailureBackoff()
        self._budget = budget if budget is not None else CheckBudget()
        self.hash_checks = 0
        """Password hashes run so far (for tests and curiosity)."""

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
        hashed = self._users.get(user)
        password_ok = self._derive(hashed if hashed is not None else self._decoy, password, address)
        if password_ok is None:
            return Verdict.BUSY
        if hashed is None or not password_ok:
            self.backoff.failed(address, time.monotonic())
            return Verdict.WRONG
        self.backoff.succeeded(address)
        with self._lock:
            self._accepted = (digest, *self._accepted)[:MAX_CACHED_CREDENTIALS]
        return Verdict.OK

    def _derive(self, hashed: PasswordHash, password: bytes, address: str) -> bool | None:
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
                return hashed.matches(password)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._checking.discard(address)

    def wrap(self, app: WsgiApp) -> WsgiApp:
        """``app`` behind this check (see :meth:`answer`)."""
        return lambda environ, start_response: self.answer(app, environ, start_response)

    def answer(self, app: WsgiApp, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """``app``'s answer when the request's credentials are right; else 401 with a WWW-Authenticate
        challenge (missing or wrong), 429 with Retry-After (backed off) or 503 with Retry-After (busy)."""
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


AUTH_ENVIRON_KEY = "gpu_governor.basic_auth"
"""The WSGI environ key under which a connection's handler passes the BasicAuth in force (or None)."""


def guarded_by_connection(app: WsgiApp) -> WsgiApp:
    """``app`` behind the basic auth the connection's handler found in force (none: served as is)."""

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if AUTH_ENVIRON_KEY not in environ:  # fail closed: only _Handler serves this app, and it always says
            return _plain(start_response, "500 Internal Server Error", "no web config for this connection\n")
        auth = environ[AUTH_ENVIRON_KEY]
        if isinstance(auth, BasicAuth):
            return auth.answer(app, environ, start_response)
        return app(environ, start_response)

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


def _ready_to_serve(request: Any, tls: bool) -> bool:
    """Whether a connection accepted while every slot is taken has its request ready: for plain
    HTTP its whole request head is already in the socket buffer; under TLS (whose head cannot
    be read ahead) its first handshake bytes are. Waits at most READY_WAIT_S for the first
    bytes, which a real client sends right after connecting; a partial head is not waited for."""
    try:
        poller = select.poll()  # not select(): the descriptor may be above FD_SETSIZE
        poller.register(request, select.POLLIN)
        if not poller.poll(READY_WAIT_S * 1000):
            return False
        # A peek: nothing is consumed (TLS is set up on the request's own thread, later).
        data = request.recv(MAX_REQUEST_HEAD_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    if tls:
        return bool(data)
    return b"\r\n\r\n" in data


class _Handler(WSGIRequestHandler):
    """One request per connection, bounded in bytes and time, no access log, no body read."""

    timeout = REQUEST_TIMEOUT_S
    server: _ThreadingServer

    def setup(self) -> None:
        # The web config in force for this connection: its TLS context wraps the socket here,
        # on the request's own thread (the handshake happens in the first read, within the
        # head deadline), and its basic auth checks the request.
        self._accepted = self.request  # the server's bookkeeping knows the connection by this
        served = self.server.live.current() if self.server.live is not None else None
        self._auth = served.auth if served is not None else None
        if served is not None and served.context is not None:
            self.request = served.context.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
        super().setup()
        self.rfile.close()  # replaced below; closing it drops its hold on the socket
        self._timeout_s = self.server.request_timeout_s
        self.connection.settimeout(self._timeout_s)
        deadline = time.monotonic() + self._timeout_s
        self.rfile = io.BufferedReader(_GuardedReader(self.connection, MAX_REQUEST_HEAD_BYTES, deadline))
        self.server.waiting_for_head(self._accepted, self.connection, str(self.client_address[0]))

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ[AUTH_ENVIRON_KEY] = self._auth
        return environ

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.request is not self._accepted:
                # The TLS socket took the accepted one's descriptor: the server's shutdown_request
                # (on the accepted, now detached, socket) cannot close it, so it is closed here.
                with contextlib.suppress(OSError):
                    self.request.shutdown(socket.SHUT_WR)
                self.request.close()

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
            self.server.head_done(self._accepted)
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
    live: LiveWebConfig | None = None
    """The web config (TLS, basic auth) each new connection takes; None: plain HTTP, no auth."""
    tls = False
    """Whether connections are TLS (fixed at start: turning it on or off needs a restart)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._per_address_cap = MAX_CONNECTIONS_PER_ADDRESS
        self._open: dict[str, int] = {}  # client address -> connections accepted and not yet closed
        self._open_lock = threading.Lock()
        # Connections still waiting for their request head: accepted socket -> (address, since
        # (monotonic s), the socket to shut down to evict it: the TLS one under TLS).
        self._heads: dict[Any, tuple[str, float, Any]] = {}
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

    def waiting_for_head(self, request: Any, live_socket: Any, host: str) -> None:
        """A handler thread started reading the head of ``request`` (the accepted socket) on ``live_socket``."""
        with self._open_lock:
            self._heads[request] = (host, time.monotonic(), live_socket)

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
            victim, (_, _, live_socket) = max(
                self._heads.items(), key=lambda item: (self._open.get(item[1][0], 0), -item[1][1])
            )
            del self._heads[victim]
            self._handed_over.add(victim)  # its slot now belongs to the newcomer
            self.evicted += 1
        with contextlib.suppress(OSError):
            # The plain socket's shutdown (under TLS too): its handler's recv returns at once.
            socket.socket.shutdown(live_socket, socket.SHUT_RDWR)
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
            if not _ready_to_serve(request, self.tls):
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
class Served:
    """What a new connection gets: the web config, its TLS context (None: plain HTTP) and its basic auth."""

    config: WebConfig
    context: ssl.SSLContext | None
    auth: BasicAuth | None


def _default_log() -> Any:
    from governor import logsetup

    return logsetup.get_logger()


class LiveWebConfig:
    """The web config in force, picked up again when a file it comes from changes, without a restart.

    On a new connection, at most once per ``check_interval_s``, the web-config file and the
    certificate, key and CA files it names are stat()ed (device, inode, size, mtime, ctime:
    a handful of system calls); when one changed, the config is read and a new TLS context
    and basic auth are built. A change that fails (a broken file, a key not yet matching
    its certificate, TLS turned on or off, which needs a restart) keeps the last good
    config and is logged once, as ``web_config_reload_failed``; the next change is tried
    again. The password-check back-off and budget carry over to the new basic auth.
    """

    def __init__(
        self,
        load: Callable[[], WebConfig],
        *,
        path: str = "",
        trust_euid: int | None = None,
        auth: BasicAuth | None = None,
        log: Any = None,
        check_interval_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._path = path
        self._trust_euid = trust_euid
        self._fixed_auth = auth
        self._log = log if log is not None else _default_log()
        self._interval_s = check_interval_s
        self._clock = clock
        self._backoff = FailureBackoff()
        self._budget = CheckBudget()
        self._lock = threading.Lock()
        own = file_states((path,)) if path else ()
        config = load()
        self._served = self._build(config)  # raises at start: a bad file serves nothing
        self._states = own + file_states(self._tls_files(config))
        self._failed: tuple[tuple[Any, ...], ...] | None = None
        self._next_check_s = clock() + check_interval_s
        self._log_ignored(config)

    @classmethod
    def from_file(cls, path: str, *, trust_euid: int | None = None, log: Any = None) -> LiveWebConfig:
        """The web config of the exporter-toolkit file at ``path``; ConfigError when it is unusable now."""
        return cls(lambda: read_web_config(path, trust_euid=trust_euid), path=path, trust_euid=trust_euid, log=log)

    @classmethod
    def fixed(cls, config: WebConfig, *, auth: BasicAuth | None = None, log: Any = None) -> LiveWebConfig:
        """``config`` itself (only its TLS files are watched); ``auth`` instead of one built from its users."""
        return cls(lambda: config, auth=auth, log=log)

    @staticmethod
    def _tls_files(config: WebConfig) -> tuple[str, ...]:
        return config.tls.files() if config.tls is not None else ()

    def _build(self, config: WebConfig) -> Served:
        context = build_tls_context(config, trust_euid=self._trust_euid) if config.tls is not None else None
        auth = self._fixed_auth
        if auth is None and config.users:
            try:
                hashes = password_hashes(config)
            except ValueError as exc:  # validated on load: only a hash changed by hand in a fixed config
                raise ConfigError([ConfigIssue(config.source, "basic_auth_users", "valid hashes", str(exc))]) from None
            auth = BasicAuth(hashes, backoff=self._backoff, budget=self._budget)
        return Served(config, context, auth)

    def _log_ignored(self, config: WebConfig) -> None:
        if config.ignored:
            self._log.warning(
                "web_config_keys_ignored",
                source=config.source,
                keys=list(config.ignored),
                effect="gpu-governor does not implement them (docs/security.md)",
            )

    def current(self) -> Served:
        """The config in force, checked for changes first when ``check_interval_s`` has passed
        (by one connection at a time: the others meanwhile take the config in force)."""
        now_s = self._clock()
        if now_s < self._next_check_s or not self._lock.acquire(blocking=False):
            return self._served
        try:
            self._next_check_s = now_s + self._interval_s
            self._refresh()
        finally:
            self._lock.release()
        return self._served

    def _refresh(self) -> None:
        served = self._served
        own = file_states((self._path,)) if self._path else ()
        states = own + file_states(self._tls_files(served.config))
        if states in (self._states, self._failed):
            return
        try:
            config = self._load()
            if (config.tls is None) != (served.config.tls is None):
                wanted = "on" if config.tls is not None else "off"
                raise ConfigError(
                    [
                        ConfigIssue(
                            config.source,
                            "tls_server_config",
                            f"TLS left as it was (turning it {wanted} "
                            "needs a restart: the scheme of the endpoint changes)",
                            f"TLS turned {wanted}",
                        )
                    ]
                )
            new_states = own + file_states(self._tls_files(config))  # before the files are read
            new = self._build(config)
        except Exception as exc:  # a broken change must never stop the serving
            self._failed = states
            error = "; ".join(exc.summary()) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self._log.error(
                "web_config_reload_failed",
                source=self._path or served.config.source,
                error=error,
                effect="the last good web config stays in force until the files change again",
            )
            return
        self._served, self._states, self._failed = new, new_states, None
        self._log.info(
            "web_config_reloaded",
            source=config.source,
            tls=config.tls is not None,
            basic_auth_users=len(config.users),
        )
        if config.ignored != served.config.ignored:
            self._log_ignored(config)


def security_warnings(address: str, tls: TlsServerConfig | None, basic_auth: bool) -> tuple[str, ...]:
    """What is weak about an endpoint on ``address``: nothing on loopback; plain HTTP or no auth when remote."""
    if is_loopback(address):
        return ()
    warnings = []
    if tls is None:
        warnings.append("metrics are served to other hosts over plain HTTP (no TLS)")
    if not basic_auth and not (tls is not None and tls.requires_client_cert):
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
        tls: TlsServerConfig | None = None,
        basic_auth: BasicAuth | None = None,
        web: LiveWebConfig | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        """Bind and serve. TLS and basic auth come from ``web`` (a web-config file, picked up
        again when it changes), or, for a fixed setup, from ``tls`` and ``basic_auth``."""
        server_class = _ThreadingServer6 if ":" in address else _ThreadingServer
        if isinstance(registry, GovernorRegistry):
            registry = Exposition(registry.source)
        self.exposition = registry if isinstance(registry, Exposition) else None
        """What is served rendered once per published state (None: a plain registry, rendered per scrape)."""
        served = cached_app(registry) if isinstance(registry, Exposition) else make_wsgi_app(registry)
        if web is None and (tls is not None or basic_auth is not None):
            web = LiveWebConfig.fixed(WebConfig("MetricsServer arguments", tls=tls), auth=basic_auth)
        self.web = web  # built before binding: a bad file binds nothing
        # Unlike prometheus-client's start_http_server, the TLS handshake is not done in
        # accept() on the serving thread (where one silent client would stall every scrape)
        # but on the request's own thread, within its deadline (see _Handler.setup).
        self._server = make_server(
            address,
            port,
            guarded_by_connection(metrics_only(served)),
            server_class=server_class,
            handler_class=_Handler,
        )
        self._server.request_timeout_s = request_timeout_s
        self._server.live = web
        self.tls: TlsServerConfig | None = web.current().config.tls if web is not None else None
        """The TLS setup at start (None: plain HTTP); on or off stays so until a restart."""
        self._server.tls = self.tls is not None
        self.address = address
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls,
        metrics: MetricsConfig,
        registry: CollectorRegistry | Exposition,
        *,
        log: Any = None,
        source: str = "config",
    ) -> MetricsServer:
        """Serve ``registry`` as [metrics] says: address, port, and TLS and basic auth from the
        web-config file (``web_config_file``) or the deprecated keys (an
        :class:`~governor.metrics.Exposition` is served as bytes cached per published state)."""
        web = None
        if metrics.web_config_file:
            web = LiveWebConfig.from_file(metrics.web_config_file, trust_euid=os.geteuid(), log=log)
        else:
            legacy = from_metrics_keys(
                source,
                metrics.tls_cert_file,
                metrics.tls_key_file,
                metrics.tls_client_ca_file,
                metrics.basic_auth_username,
                metrics.basic_auth_password_hash,
            )
            web = LiveWebConfig.fixed(legacy, log=log) if legacy is not None else None
        return cls(metrics.listen_address, metrics.port, registry, web=web)

    @property
    def basic_auth(self) -> bool:
        """True when the config in force asks for a user name and password."""
        return self.web is not None and self.web.current().auth is not None

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
            parts.append("tls with client certificates" if self.tls.requires_client_cert else "tls")
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
