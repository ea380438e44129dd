"""The metrics HTTP endpoint: the exposition's bytes on a threaded, bounded server.

Serving happens on its own daemon threads and only reads the published state, so a
slow or busy scraper never delays a tick. Requests are read and parsed by
governor.httpwire (no WSGI, no http.server: one ``recv`` loop, a strict parser of the
request line and headers, one write per response). The endpoint is hardened for a
process that runs as root (see docs/security.md):

- only ``/metrics`` is served (GET, HEAD, OPTIONS), every other path is 404, request
  bodies are never read; malformed heads (a bad request line, folded or colon-less
  header lines, control characters, non-ASCII outside field values, a repeated
  ``Authorization``, ``Accept``, ``Accept-Encoding`` or ``Host``) are 400;
- the request line and the whole request head are capped in bytes (414, 431), and the
  head must arrive within ``request_timeout_s`` (the TLS handshake included), so a slow
  client holds one thread for a bounded time and never the accepting thread;
- at most ``MAX_CONNECTIONS_PER_ADDRESS`` connections per client address: more are
  closed on accept, before they take a thread, so slow connections from one address
  cannot hold the slots another address's scrape needs;
- at most ``MAX_CONNECTIONS`` requests are handled at once; when all are taken, a new
  connection whose request is complete (plain HTTP; under TLS: whose handshake has begun)
  takes the slot of the connection still waiting for its head on the address holding the
  most connections, so stalled connections spread over many addresses (any local user can
  use all of 127.0.0.0/8) cannot starve another address's scrape either. The accepting
  thread never waits: a new connection whose request is not there yet is parked on a gate
  thread for ``READY_WAIT_S`` (at most ``MAX_PARKED`` at once, then closed), and one whose
  request is ready while every slot is busy answering waits there for a slot, so a flood
  of silent connections or clients that never read their answer cannot leave a scrape in
  a full listen backlog;
- optional TLS and basic auth from an exporter-toolkit web-config file
  (governor.webconfig), or from the deprecated ``[metrics]`` keys: the context is built
  here with the standard library, and each new connection gets the one in force, picked
  up again (at most once per ``RECHECK_S``) when the web-config file or a certificate,
  key or CA file it names changes (:class:`LiveWebConfig`: no restart; a broken change
  keeps the last good config and is logged once);
- password checks (governor.basicauth; bcrypt, scrypt for the deprecated key): at most
  ``MAX_PASSWORD_CHECKS`` run at once and no more than governor.auth.CHECKS_PER_S on
  average, a request waits at most ``PASSWORD_CHECK_WAIT_S`` for one (else 503), and an
  address with repeated failures is answered 429 without a check for a growing while;
  verified credentials are cached, so a configured scraper needs no check at all.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import queue
import select
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import BaseRequestHandler, TCPServer
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as prometheus_exposition
from prometheus_client.registry import Collector

from governor.auth import CheckBudget, FailureBackoff
from governor.basicauth import MAX_PASSWORD_CHECKS as MAX_PASSWORD_CHECKS  # noqa: PLC0414  (re-exported)
from governor.basicauth import PASSWORD_CHECK_WAIT_S as PASSWORD_CHECK_WAIT_S  # noqa: PLC0414
from governor.basicauth import BasicAuth as BasicAuth  # noqa: PLC0414
from governor.basicauth import Verdict as Verdict  # noqa: PLC0414
from governor.config import MetricsConfig, is_loopback
from governor.errors import ConfigError, ConfigIssue
from governor.httpwire import MAX_REQUEST_HEAD_BYTES as MAX_REQUEST_HEAD_BYTES  # noqa: PLC0414
from governor.httpwire import MAX_REQUEST_LINE_BYTES as MAX_REQUEST_LINE_BYTES  # noqa: PLC0414
from governor.httpwire import HeadError, Request, gzip_accepted, parse_head, plain, read_head, response
from governor.metrics import Exposition, GovernorRegistry
from governor.peeruid import client_key
from governor.webconfig import (
    TlsServerConfig,
    WebConfig,
    build_tls_context,
    exposed_secrets,
    file_states,
    from_metrics_keys,
    password_hashes,
    read_web_config,
)

METRICS_PATH = "/metrics"
REQUEST_TIMEOUT_S = 3.0
"""Seconds a client has to send its whole request head (TLS handshake included), from when a thread takes it."""
RESPONSE_TIMEOUT_S = 10.0
"""Seconds a client has to take the response."""
MAX_CONNECTIONS = 64
"""Requests handled at once, all addresses together; further connections wait in the listen backlog."""
MAX_CONNECTIONS_PER_ADDRESS = 8
"""Connections one client address may hold open; more are closed at once on accept."""
READY_WAIT_S = 0.1
"""While every slot is taken, how long a new connection may take to send its request (s); it
waits parked (:class:`_Gate`), never holding up the accepting thread."""
ACCEPT_BATCH = 64
"""Connections accepted one after another before the accepting thread looks at its stop flag again."""
MAX_PARKED = 256
"""Connections accepted while every slot is taken that may wait at once for their request or
for a slot; beyond that the one parked longest is closed."""
LISTEN_BACKLOG = 1024
"""Connections the kernel queues for accept (capped by net.core.somaxconn): room for a burst of
reconnects from capped addresses, so a scrape's SYN is not dropped (a dropped SYN costs a 1 s retry)."""
WORKER_IDLE_S = 60.0
"""Seconds a connection thread waits idle for the next connection before it ends."""
RECHECK_S = 1.0
"""At most this often (seconds, on a new connection) the web-config file and the TLS files are stat()ed for changes."""
METHODS = ("GET", "HEAD", "OPTIONS")
_ALLOW = ", ".join(METHODS)
MAX_NEGOTIATED = 64
"""Accept headers whose negotiated format is remembered (each at most 512 characters)."""


# --------------------------------------------------------------------------- answers

Encoder = Callable[[Collector], bytes]
_TEXT = prometheus_exposition.choose_encoder("")
_ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")
"""OpenMetrics' name escapings, as Accept headers name them. Spelled out, not taken from
prometheus_client.openmetrics.exposition: Debian 12's python3-prometheus-client (0.16), which
the .deb runs on, has no such constants and negotiates no escaping (its choices collapse to
the plain content types here)."""
CACHED_CONTENT_TYPES = frozenset(
    prometheus_exposition.choose_encoder(accept)[1]
    for accept in (
        "",
        "application/openmetrics-text",
        *(
            f"{kind};version=1.0.0;escaping={escaping}"
            for kind in ("application/openmetrics-text", "text/plain")
            for escaping in _ESCAPINGS
        ),
    )
)
"""The formats an :class:`~governor.metrics.Exposition` caches: the text format and OpenMetrics
1.0.0 in each escaping. Another version named in an Accept header is rendered for its request
alone, so made-up versions cannot fill the cache."""


class Endpoint:
    """The endpoint's answer to a parsed request, as the whole response: /metrics only, GET,
    HEAD (the GET's status and headers, no body) and OPTIONS (204 with ``Allow``); other paths
    404, other methods 405 with ``Allow``; behind ``auth`` when one is given.

    A GET gets what prometheus-client's app would answer: the format the Accept header asks
    for (the text format, or OpenMetrics), gzip when Accept-Encoding asks for it (with a weight above 0), and a
    ``name[]`` query filter. From an :class:`~governor.metrics.Exposition` the bytes rendered
    once per published state are served (a ``name[]`` filter, rare, renders the current
    state for its request alone); from another registry, a rendering per request."""

    def __init__(self, served: Exposition | CollectorRegistry) -> None:
        self._exposition = served if isinstance(served, Exposition) else None
        self._registry = served.registry if isinstance(served, Exposition) else served
        self._negotiated: dict[str, tuple[Encoder, str]] = {}

    def answer(
        self, request: Request, auth: BasicAuth | None = None, address: str = "", who: Callable[[], str] | None = None
    ) -> bytes:
        """The response to ``request`` from client ``address`` (credentials first, then path and method);
        ``who`` names the client for the failed-login back-off (:meth:`BasicAuth.verdict`)."""
        if auth is not None:
            refused = auth.refusal(request.authorization, address, who)
            if refused is not None:
                return refused
        if request.path != METRICS_PATH:
            return plain(404, f"not found: the metrics are at {METRICS_PATH}\n")
        method = request.method
        if method == "OPTIONS":
            return response(204, [("Allow", _ALLOW)])
        if method not in {"GET", "HEAD"}:
            return plain(405, f"only {_ALLOW}\n", [("Allow", _ALLOW)])
        compress = gzip_accepted(request.accept_encoding or "")
        encoder, content_type = self._negotiate(request.accept or "")
        body = self._body(request.query, encoder, content_type, compress)
        headers = [("Content-Type", content_type), *([("Content-Encoding", "gzip")] if compress else [])]
        if method == "HEAD":
            return response(200, headers, length=len(body))
        return response(200, headers, body)

    def _negotiate(self, accept: str) -> tuple[Encoder, str]:
        """prometheus-client's choice of format for ``accept``; the text format when it cannot
        choose (a version it cannot compare); remembered for a few short headers."""
        chosen = self._negotiated.get(accept)
        if chosen is None:
            try:
                chosen = prometheus_exposition.choose_encoder(accept)
            except Exception:  # e.g. "version=1.x": its version comparison raises TypeError
                chosen = _TEXT
            if len(self._negotiated) < MAX_NEGOTIATED and len(accept) <= 512:
                self._negotiated[accept] = chosen
        return chosen

    def _body(self, query: str, encoder: Encoder, content_type: str, compress: bool) -> bytes:
        names = parse_qs(query).get("name[]") if query else None
        exposition = self._exposition
        if exposition is not None and names is None and content_type in CACHED_CONTENT_TYPES:
            return exposition.render(encoder, content_type, compress=compress)
        with exposition.pinned() if exposition is not None else contextlib.nullcontext():
            registry = self._registry.restricted_registry(names) if names is not None else self._registry
            body = encoder(registry)
        return gzip.compress(body) if compress else body


# --------------------------------------------------------------------------- connections


def _peek_ready(request: Any, tls: bool) -> bool | None:
    """Whether a connection accepted while every slot is taken has its request ready, without
    waiting: for plain HTTP its whole request head is in the socket buffer; under TLS (whose
    head cannot be read ahead) its first handshake bytes are. None while nothing has come yet;
    False for a partial head, an end or an error (not waited for: such a client is closed)."""
    try:
        # A peek: nothing is consumed (TLS is set up on the request's own thread, later).
        data = request.recv(MAX_REQUEST_HEAD_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except (OSError, ValueError):
        return False
    if tls:
        return bool(data)
    return b"\n\r\n" in data or b"\n\n" in data


class _Connection(BaseRequestHandler):
    """One request per connection: its head read within the byte caps and the deadline, one
    answer in one write, then the connection is closed; no access log, no body read."""

    server: _ThreadingServer

    def setup(self) -> None:
        # The web config in force for this connection: its TLS context wraps the socket here,
        # on the request's own thread (the handshake happens in the first read, within the
        # head deadline), and its basic auth checks the request.
        self._accepted = self.request  # the server's bookkeeping knows the connection by this
        served = self.server.live.current() if self.server.live is not None else None
        self._auth = served.auth if served is not None else None
        self._host = str(self.client_address[0])
        self._socket: socket.socket = self.request
        if served is not None and served.context is not None:
            self._socket = served.context.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
        self._deadline_s = time.monotonic() + self.server.request_timeout_s
        self.server.waiting_for_head(self._accepted, self._socket, self._host)

    def handle(self) -> None:
        try:
            try:
                request: Request | HeadError = parse_head(read_head(self._socket, self._deadline_s))
            except HeadError as refused:
                request = refused
        except (OSError, ValueError):
            return  # timed out, reset, evicted, or a failed TLS handshake: nothing to answer
        finally:
            self.server.head_done(self._accepted)
        self._socket.settimeout(RESPONSE_TIMEOUT_S)  # a fresh allowance to send the response
        if isinstance(request, HeadError):
            answer = plain(request.status, request.reason + "\n")
        else:
            try:
                answer = self.server.endpoint.answer(request, self._auth, self._host, self._client_key)
            except Exception:  # a failing collector: answered 500 and reported, as wsgiref did
                traceback.print_exc(file=sys.stderr)
                answer = plain(500, "internal error: the metrics could not be rendered\n")
        self._socket.sendall(answer)

    def _client_key(self) -> str:
        """The failed-login back-off's key for this client: the uid owning a loopback client's
        socket (every local user shares 127.0.0.0/8 with a local Prometheus), else the address."""
        return client_key(self._accepted, (self._host, int(self.client_address[1])))

    def finish(self) -> None:
        if self._socket is not self._accepted:
            # The TLS socket took the accepted one's descriptor: the server's shutdown_request
            # (on the accepted, now detached, socket) cannot close it, so it is closed here.
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_WR)
            self._socket.close()


class _Workers:
    """Daemon threads that run one connection each at a time: started when none is idle, and
    kept for the next connections (handing a connection over costs much less than starting a
    thread); one idle for ``idle_s`` seconds ends. The server's slots bound the connections in
    flight, and so the threads."""

    def __init__(self, run: Callable[[Any, Any], None], *, daemon: bool, idle_s: float = WORKER_IDLE_S) -> None:
        self._run = run
        self._daemon = daemon
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Any, Any] | None]] = []  # idle threads' mailboxes, latest last
        self._closed = False
        self.started = 0
        """Threads started so far (for tests and curiosity)."""

    def submit(self, request: Any, client_address: Any) -> None:
        """Run ``request`` on an idle thread, or on a new one when none is idle."""
        with self._lock:
            mailbox = self._idle.pop() if self._idle else None
        if mailbox is not None:
            mailbox.put((request, client_address))
            return
        self.started += 1
        worker = threading.Thread(
            target=self._work, args=((request, client_address),), name="metrics-http-conn", daemon=self._daemon
        )
        worker.start()

    def _work(self, job: tuple[Any, Any] | None) -> None:
        mailbox: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        while job is not None:
            self._run(*job)
            job = None  # the closed connection is not kept alive while idle
            with self._lock:
                if self._closed:
                    return
                self._idle.append(mailbox)
            try:
                job = mailbox.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if mailbox in self._idle:
                        self._idle.remove(mailbox)
                        return
                job = mailbox.get()  # taken by a submit meanwhile: its connection is on the way

    def close(self) -> None:
        """End the idle threads; busy ones end after their connection."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for mailbox in idle:
            mailbox.put(None)


@dataclass(slots=True)
class _Parked:
    """A connection accepted while every slot was taken, waiting until ``deadline_s`` (monotonic)."""

    request: Any
    client_address: Any
    deadline_s: float


class _Gate:
    """Where connections accepted while every slot is taken wait, on one thread of its own, so
    the accepting thread spends microseconds on each and never waits: a flood of connections
    that send nothing (from as many addresses as it likes: all of 127.0.0.0/8 is local) cannot
    leave a scrape queued in the listen backlog, or dropped from a full one.

    A parked connection whose request arrives (plain HTTP: its whole head; TLS: its first
    handshake bytes) within READY_WAIT_S takes a free slot, or the slot of a connection still
    waiting for its head (:meth:`_ThreadingServer._evict_for`); while every slot is busy
    answering, it waits for one until its head deadline, the first ready first. One that sends
    nothing in time, a partial head, or nothing at all is closed (counted as shed); at most
    MAX_PARKED wait at once, the one parked longest closed first (one still silent before one
    ready)."""

    def __init__(self, server: _ThreadingServer) -> None:
        self._server = server
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._lock = threading.Lock()
        # By descriptor, in the order parked (so in deadline order): not yet sent their request
        # (watched by the epoll), and request ready, waiting for a slot.
        self._silent: dict[int, _Parked] = {}
        self._ready: dict[int, _Parked] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="metrics-http-gate", daemon=True)
        self._thread.start()

    @property
    def has_waiting(self) -> bool:
        """Whether a parked connection with its request ready waits for a slot (it goes first)."""
        return bool(self._ready)

    def park(self, request: Any, client_address: Any) -> None:
        """Keep ``request`` (accepted, admitted, no slot) until its request is ready or its time is up."""
        fd = request.fileno()
        entry = _Parked(request, client_address, time.monotonic() + READY_WAIT_S)
        dropped = None
        with self._lock:
            if self._closed:
                dropped = entry
            else:
                if len(self._silent) + len(self._ready) >= MAX_PARKED:
                    dropped = self._unpark(next(iter(self._silent or self._ready)))
                idle = not self._silent and not self._ready
                self._silent[fd] = entry
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        if dropped is not None:
            self._shed(dropped)
        elif idle:
            self.wake()  # it slept without a deadline to keep

    def wake(self) -> None:
        """Have the gate look again (a slot came free, a first connection was parked)."""
        with contextlib.suppress(OSError):  # a full pipe: it is awake anyway
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Close every parked connection and end the gate's thread."""
        with self._lock:
            self._closed = True
            parked = [self._unpark(fd) for fd in [*self._silent, *self._ready]]
        for entry in parked:
            self._shed(entry)
        self.wake()
        self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _unpark(self, fd: int) -> _Parked:
        """Take ``fd``'s entry out (under the lock), its descriptor no longer watched."""
        entry = self._ready.pop(fd, None)
        if entry is None:
            entry = self._silent.pop(fd)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        return entry

    def _shed(self, entry: _Parked) -> None:
        server = self._server
        with server._open_lock:
            server.shed += 1
        server._leave(str(entry.client_address[0]))
        server.shutdown_request(entry.request)

    def _timeout_s(self) -> float | None:
        """How long the epoll may wait (under the lock): until the first deadline, or while a ready
        connection waits for a slot, briefly (a connection may start waiting for its head)."""
        firsts = [next(iter(parked.values())).deadline_s for parked in (self._silent, self._ready) if parked]
        if not firsts:
            return None
        wait_s = max(0.0, min(firsts) - time.monotonic())
        return min(wait_s, 0.05) if self._ready else wait_s

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                timeout_s = self._timeout_s()
            try:
                events = self._epoll.poll(-1 if timeout_s is None else timeout_s)
            except (OSError, ValueError):
                return  # closed meanwhile
            with self._lock:
                if self._closed:
                    return
                dropped, admitted = self._sort(events)
            for entry in dropped:
                self._shed(entry)
            for entry in admitted:
                self._server._submit(entry.request, entry.client_address)

    def _sort(self, events: list[tuple[int, int]]) -> tuple[list[_Parked], list[_Parked]]:
        """Under the lock: (connections to close, connections given a slot) after ``events``."""
        dropped: list[_Parked] = []
        for fd, _ in events:
            if fd == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                continue
            entry = self._silent.get(fd)
            if entry is None:
                continue
            ready = _peek_ready(entry.request, self._server.tls)
            if ready is None:
                continue  # woken for nothing
            del self._silent[fd]
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
            if not ready:
                dropped.append(entry)
                continue
            entry.deadline_s = time.monotonic() + self._server.request_timeout_s
            self._ready[fd] = entry
        now_s = time.monotonic()
        for parked in (self._silent, self._ready):
            while parked and next(iter(parked.values())).deadline_s <= now_s:
                dropped.append(self._unpark(next(iter(parked))))
        admitted: list[_Parked] = []
        while self._ready:
            fd, entry = next(iter(self._ready.items()))
            if not (
                self._server._slots.acquire(blocking=False) or self._server._evict_for(str(entry.client_address[0]))
            ):
                break  # every slot busy answering: the first ready waits first
            admitted.append(self._unpark(fd))
        return dropped, admitted


class _ThreadingServer(TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    request_timeout_s = REQUEST_TIMEOUT_S
    live: LiveWebConfig | None = None
    """The web config (TLS, basic auth) each new connection takes; None: plain HTTP, no auth."""
    tls = False
    """Whether connections are TLS (fixed at start: turning it on or off needs a restart)."""
    endpoint: Endpoint
    """What a parsed request is answered (set by MetricsServer before serving starts)."""

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
        self._workers = _Workers(self.process_request_thread, daemon=self.daemon_threads)
        self._gate = _Gate(self)  # before binding: a failed bind calls server_close, which ends it
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

    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)  # accept() until the backlog is empty, never waiting

    def _handle_request_noblock(self) -> None:
        # Up to ACCEPT_BATCH connections per wake-up of serve_forever's selector: a flood's
        # connections are taken from the backlog at a few system calls each.
        for _ in range(ACCEPT_BATCH):
            try:
                request, client_address = self.get_request()
            except OSError:  # nothing left (EAGAIN), or a connection gone before accept
                return
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the accepting thread, which never waits: a refusal costs one close and no thread.
        host = str(client_address[0])
        if not self._admit(host):
            self.shutdown_request(request)
            return
        if not self._gate.has_waiting and self._slots.acquire(blocking=False):
            self._submit(request, client_address)
            return
        # Every slot taken (an attack, or a burst): a client whose request is already here
        # (a scrape that waited in the backlog) takes the slot of an evicted stalled connection
        # at once (handed over: its thread ends without releasing it); any other waits parked
        # on the gate's thread, so the backlog drains in microseconds per connection.
        if not self._gate.has_waiting and _peek_ready(request, self.tls) and self._evict_for(host):
            self._submit(request, client_address)
            return
        self._gate.park(request, client_address)

    def _submit(self, request: Any, client_address: Any) -> None:
        """Run ``request``, which holds a slot, on a connection thread."""
        try:
            self._workers.submit(request, client_address)
        except BaseException:
            self._slots.release()
            self._leave(str(client_address[0]))
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection (on a worker thread), then give its slot and its address's count back."""
        try:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
        finally:
            with self._open_lock:
                handed_over = request in self._handed_over
                self._handed_over.discard(request)
            if not handed_over:
                self._slots.release()
                if self._gate.has_waiting:
                    self._gate.wake()
            self._leave(str(client_address[0]))

    def server_close(self) -> None:
        super().server_close()
        self._gate.close()
        self._workers.close()

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
        self._exposed: tuple[str, ...] = ()
        self._log_exposed(config)

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

    def _log_exposed(self, config: WebConfig) -> None:
        """Warn of secrets readable by others: at start, and when a change of the files exposes a new one."""
        exposed, before = exposed_secrets(config), self._exposed
        self._exposed = exposed
        if exposed and exposed != before:
            self._log.warning(
                "web_config_secret_exposed",
                source=config.source,
                exposed=list(exposed),
                effect="served as it is; a local user who reads it can pose as this endpoint or crack the hashes",
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
        self._log_exposed(config)


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
    published state (the daemon's way); given another registry, it is rendered on every
    scrape (as prometheus-client's app would)."""

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
        if web is None and (tls is not None or basic_auth is not None):
            web = LiveWebConfig.fixed(WebConfig("MetricsServer arguments", tls=tls), auth=basic_auth)
        self.web = web  # built before binding: a bad file binds nothing
        # Unlike prometheus-client's start_http_server, the TLS handshake is not done in
        # accept() on the serving thread (where one silent client would stall every scrape)
        # but on the request's own thread, within its deadline (see _Connection.setup).
        self._server = server_class((address, port), _Connection)
        self._server.endpoint = Endpoint(registry)
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
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
