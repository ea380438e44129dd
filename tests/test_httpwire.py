"""The endpoint's own HTTP handling (governor.httpwire, governor.httpserver): strict head parsing,
bounded head reading, one-piece responses, and what the server answers over the wire."""

from __future__ import annotations

import email.utils
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from governor import httpwire
from governor.httpserver import CACHED_CONTENT_TYPES, MetricsServer, _Workers
from governor.httpwire import HeadError, gzip_accepted, parse_head, read_head, response
from governor.metrics import Exposition
from tests.support import wait_for

TIMEOUT_S = 5.0
PROMETHEUS_HEAD = (
    b"GET /metrics?x=1 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:9847\r\n"
    b"User-Agent: Prometheus/2.53.0\r\n"
    b"Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"Authorization: Basic cHJvbWV0aGV1czpwdw==\r\n"
    b"X-Prometheus-Scrape-Timeout-Seconds: 10\r\n"
    b"\r\n"
)


def refused(head: bytes) -> int:
    """The status parse_head refuses ``head`` with (fails the test when it is accepted)."""
    with pytest.raises(HeadError) as caught:
        parse_head(head)
    return caught.value.status


# --------------------------------------------------------------------------- parsing


class TestParseHead:
    """Request line and headers: what is taken, what is refused, and with which status."""

    def test_a_prometheus_scrape_is_parsed(self) -> None:
        """Method, path, query, version and the three kept headers come out of a real scrape's head."""
        request = parse_head(PROMETHEUS_HEAD)
        assert (request.method, request.path, request.query, request.minor_version) == ("GET", "/metrics", "x=1", 1)
        assert request.authorization == "Basic cHJvbWV0aGV1czpwdw=="
        assert request.accept == "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
        assert request.accept_encoding == "gzip"

    def test_header_names_are_case_insensitive_and_values_lose_surrounding_blanks(self) -> None:
        """``aCCept-encoding:\\t gzip \\t`` is the Accept-Encoding header with the value ``gzip``."""
        request = parse_head(b"GET /metrics HTTP/1.0\r\naCCept-encoding:\t gzip \t\r\nACCEPT:text/plain\r\n\r\n")
        assert (request.accept_encoding, request.accept, request.minor_version) == ("gzip", "text/plain", 0)

    def test_absent_headers_are_none(self) -> None:
        """A head with no Authorization, Accept or Accept-Encoding has None for each."""
        request = parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (request.authorization, request.accept, request.accept_encoding) == (None, None, None)

    def test_bare_lf_line_ends_are_taken(self) -> None:
        """Lines ended by a bare LF are read like CRLF ones (RFC 9112 section 2.2)."""
        assert parse_head(b"GET /metrics HTTP/1.1\nAccept: text/plain\n\n").accept == "text/plain"

    def test_obs_text_in_a_value_is_kept_as_latin1(self) -> None:
        """Bytes 0x80-0xFF in a field value are taken (obs-text) and decoded as latin-1."""
        assert parse_head(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic \xff\r\n\r\n").authorization == "Basic \xff"

    @pytest.mark.parametrize(
        "line",
        [
            b"GET /metrics",  # HTTP/0.9's two-word form
            b"GET",
            b"",
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics  HTTP/1.1",
            b" GET /metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 ",
            b"GET\t/metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 extra",
            b"GET /met rics HTTP/1.1",
            b"GET /metrics http/1.1",
            b"GET /metrics FOO/1.1",
            b"GET /metrics HTTP/1",
            b"GET /metrics HTTP/1.1\r",  # a bare CR before the CRLF
            b"G(T /metrics HTTP/1.1",  # not a token
            b"GET /m\xe9trics HTTP/1.1",
            b"GET /metrics\x00 HTTP/1.1",
        ],
    )
    def test_malformed_request_lines_are_400(self, line: bytes) -> None:
        """Anything but METHOD SP TARGET SP HTTP/d.d with a token method and a visible-ASCII target is 400."""
        assert refused(line + b"\r\nHost: x\r\n\r\n") == 400

    def test_an_empty_line_before_the_request_line_is_400(self) -> None:
        """A head starting with an empty line is refused rather than skipped."""
        assert refused(b"\r\nGET /metrics HTTP/1.1\r\n\r\n") == 400

    @pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0", b"HTTP/10.0", b"HTTP/1.10"])
    def test_other_http_versions_are_505(self, version: bytes) -> None:
        """A well-formed request line naming another HTTP version than 1.x is 505."""
        assert refused(b"GET /metrics " + version + b"\r\n\r\n") == 505

    def test_a_later_http1_minor_version_is_served_as_http1(self) -> None:
        """HTTP/1.2 is processed as the highest 1.x served (RFC 9110 section 2.5)."""
        assert parse_head(b"GET /metrics HTTP/1.2\r\n\r\n").minor_version == 2

    @pytest.mark.parametrize("fold", [b" folded", b"\tfolded"])
    def test_obsolete_line_folding_is_400(self, fold: bytes) -> None:
        """A header line continued on the next line (starting with a blank) is refused."""
        with pytest.raises(HeadError) as caught:
            parse_head(b"GET /metrics HTTP/1.1\r\nX-A: 1\r\n" + fold + b"\r\n\r\n")
        assert caught.value.status == 400 and "folding" in caught.value.reason

    @pytest.mark.parametrize(
        "header",
        [
            b"NoColon",
            b"X-A : 1",  # a blank before the colon (RFC 9112 section 5.1)
            b": no name",
            b"X A: 1",
            b"X-\xe9: 1",  # non-ASCII in the name
            b"X-A: a\x00b",
            b"X-A: a\rb",
            b"X-A: a\x7fb",
            b"X-A: \x1b[31m",
        ],
    )
    def test_malformed_header_lines_are_400(self, header: bytes) -> None:
        """A header line without a colon, with a non-token name or with control characters in its value is 400."""
        assert refused(b"GET /metrics HTTP/1.1\r\n" + header + b"\r\n\r\n") == 400

    @pytest.mark.parametrize("name", [b"Authorization", b"Host", b"Accept", b"Accept-Encoding"])
    def test_a_repeated_header_the_endpoint_reads_is_400(self, name: bytes) -> None:
        """Two Authorization, Accept, Accept-Encoding or Host lines (in any case) are refused."""
        head = b"GET /metrics HTTP/1.1\r\n%s: a\r\nX: y\r\n%s: b\r\n\r\n" % (name, name.lower())
        assert refused(head) == 400

    def test_more_than_100_header_lines_is_431(self) -> None:
        """101 header lines get 431; 100 are taken."""
        lines = [b"X-%d: 1\r\n" % i for i in range(101)]
        assert refused(b"GET /metrics HTTP/1.1\r\n" + b"".join(lines) + b"\r\n") == 431
        assert parse_head(b"GET /metrics HTTP/1.1\r\n" + b"".join(lines[:100]) + b"\r\n").path == "/metrics"


# --------------------------------------------------------------------------- reading


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of sockets: (the server's end, the client's end)."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


class TestReadHead:
    """The head is read within its byte caps and its deadline, and nothing after it."""

    def test_a_head_sent_in_pieces_is_read_whole(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A head arriving a few bytes at a time is returned once its blank line has come."""
        server, client = pair

        def drip() -> None:
            for start in range(0, len(PROMETHEUS_HEAD), 7):
                client.sendall(PROMETHEUS_HEAD[start : start + 7])
                time.sleep(0.001)

        sender = threading.Thread(target=drip)
        sender.start()
        try:
            assert read_head(server, time.monotonic() + TIMEOUT_S) == PROMETHEUS_HEAD
        finally:
            sender.join()

    def test_bytes_after_the_head_are_not_returned(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A body sent with the head is left out of it."""
        server, client = pair
        client.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        assert read_head(server, time.monotonic() + TIMEOUT_S) == b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n"

    def test_a_long_request_line_is_414_before_it_ends(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A request line past 4096 bytes is refused at once, without waiting for its end or the deadline."""
        server, client = pair
        client.sendall(b"GET /" + b"a" * httpwire.MAX_REQUEST_LINE_BYTES)
        with pytest.raises(HeadError) as caught:
            read_head(server, time.monotonic() + TIMEOUT_S)
        assert caught.value.status == 414

    def test_a_request_line_of_exactly_the_cap_is_taken(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A request line of 4096 bytes with its CRLF is read; one byte more is 414."""
        server, client = pair
        line = b"GET /" + b"a" * (httpwire.MAX_REQUEST_LINE_BYTES - len(b"GET / HTTP/1.0\r\n")) + b" HTTP/1.0\r\n"
        assert len(line) == httpwire.MAX_REQUEST_LINE_BYTES
        client.sendall(line + b"\r\n")
        assert read_head(server, time.monotonic() + TIMEOUT_S) == line + b"\r\n"
        client.sendall(line[:5] + b"a" + line[5:] + b"\r\n")
        with pytest.raises(HeadError) as caught:
            read_head(server, time.monotonic() + TIMEOUT_S)
        assert caught.value.status == 414

    def test_a_head_over_the_cap_is_431(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """Header lines adding up past 16 KiB without a blank line are refused with 431."""
        server, client = pair
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        client.sendall(b"X-Pad: " + b"p" * httpwire.MAX_REQUEST_HEAD_BYTES + b"\r\n")
        with pytest.raises(HeadError) as caught:
            read_head(server, time.monotonic() + TIMEOUT_S)
        assert caught.value.status == 431

    def test_the_deadline_cuts_off_a_client_that_stalls(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A head still incomplete at the deadline raises TimeoutError, however the bytes trickle in."""
        server, client = pair
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_head(server, started + 0.2)
        assert time.monotonic() - started < TIMEOUT_S

    def test_a_deadline_already_past_reads_nothing(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """With the deadline behind it (on the clock given), read_head raises TimeoutError even with a head waiting."""
        server, client = pair
        client.sendall(PROMETHEUS_HEAD)
        with pytest.raises(TimeoutError):
            read_head(server, 100.0, clock=lambda: 100.0)

    def test_an_end_inside_the_head_is_400(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A client ending its side before the blank line gets 400."""
        server, client = pair
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(HeadError) as caught:
            read_head(server, time.monotonic() + TIMEOUT_S)
        assert caught.value.status == 400

    def test_an_end_before_any_byte_is_a_connection_error(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A client closing without sending anything raises ConnectionError (nothing to answer)."""
        server, client = pair
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            read_head(server, time.monotonic() + TIMEOUT_S)


# --------------------------------------------------------------------------- responses


class TestResponse:
    """A response is one piece of bytes: status line, Date, headers, Content-Length, Connection: close, body."""

    def test_response_layout(self) -> None:
        """Status line, a current Date, the given headers, the body's length, Connection: close, then the body."""
        answer = response(200, [("Content-Type", "text/plain")], b"hello")
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.0 200 OK" and body == b"hello"
        date = email.utils.parsedate_to_datetime(lines[1].removeprefix(b"Date: ").decode())
        assert abs(date.timestamp() - time.time()) < 60
        assert lines[2:] == [b"Content-Type: text/plain", b"Content-Length: 5", b"Connection: close"]

    def test_head_answer_has_the_length_and_no_body(self) -> None:
        """With ``length`` and no body, the answer names the GET body's length and carries nothing after the head."""
        answer = response(200, [], length=1234)
        assert answer.endswith(b"Content-Length: 1234\r\nConnection: close\r\n\r\n")

    def test_204_has_no_content_length(self) -> None:
        """A 204 carries no Content-Length (RFC 9110 section 8.6)."""
        assert b"Content-Length" not in response(204, [("Allow", "GET")])


# --------------------------------------------------------------------------- over the wire


def tiny_registry() -> CollectorRegistry:
    """A registry with one known series."""
    registry = CollectorRegistry()
    Gauge("wire_test_up", "Always 1.", registry=registry).set(1)
    return registry


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:``port`` and read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    """A plain endpoint on loopback."""
    served = MetricsServer("127.0.0.1", 0, tiny_registry(), request_timeout_s=2.0)
    yield served
    served.close()


class TestOverTheWire:
    """What a running endpoint answers to raw requests."""

    @pytest.mark.parametrize(
        "data",
        [
            b"GET /metrics HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n",
            b"GET /m\xe9trics HTTP/1.1\r\n\r\n",
            b"GET /metrics\r\n\r\n",
        ],
    )
    def test_malformed_heads_get_400_with_a_status_line(self, server: MetricsServer, data: bytes) -> None:
        """A malformed head is answered ``HTTP/1.0 400`` with a text reason (not a bare HTTP/0.9 body)."""
        answer = exchange(server.port, data)
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert b"Content-Type: text/plain; charset=utf-8\r\n" in answer

    def test_an_http09_request_is_answered_without_waiting_for_a_blank_line(self) -> None:
        """``GET /metrics`` and one line end (HTTP/0.9: no blank line ever follows) gets its 400 at once, not
        when the head deadline ends (set to 60 s here: an answer after it would be the old behaviour)."""
        served = MetricsServer("127.0.0.1", 0, tiny_registry(), request_timeout_s=60.0)
        try:
            with socket.create_connection(("127.0.0.1", served.port), timeout=30.0) as sock:
                sock.sendall(b"GET /metrics\r\n")
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        finally:
            served.close()

    def test_http2_request_line_gets_505(self, server: MetricsServer) -> None:
        """An HTTP/2.0 request line is answered 505 with a status line."""
        assert exchange(server.port, b"GET /metrics HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.0 505 ")

    def test_answers_close_the_connection_and_name_no_server_software(self, server: MetricsServer) -> None:
        """A scrape's answer says Connection: close, carries no Server header, and the server closes after it."""
        answer = exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"\r\nConnection: close" in head
        assert b"\r\nServer:" not in head
        assert b"Content-Length: %d" % len(body) in head and b"wire_test_up 1.0" in body

    def test_paths_are_compared_as_sent(self, server: MetricsServer) -> None:
        """Only the literal /metrics is served: //metrics and a percent-encoded path are 404."""
        for target in (b"//metrics", b"/%6detrics", b"/metrics#x"):
            assert exchange(server.port, b"GET " + target + b" HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 "), target

    def test_an_accept_version_prometheus_client_cannot_compare_gets_the_text_format(
        self, server: MetricsServer
    ) -> None:
        """Accept: application/openmetrics-text; version=1.x (which makes prometheus-client raise) gets 200 text."""
        accept = "application/openmetrics-text; version=1.x"
        try:  # prometheus-client 0.20+ raises comparing the version; older ones (Debian 12's 0.16) pick 0.0.1
            expected = choose_encoder(accept)[1]
        except TypeError:
            expected = choose_encoder("")[1]
        answer = exchange(server.port, f"GET /metrics HTTP/1.1\r\nAccept: {accept}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and f"Content-Type: {expected}".encode() in answer

    def test_made_up_format_versions_leave_the_cache_alone(self) -> None:
        """Accept headers naming unknown OpenMetrics versions are rendered per request, never cached."""
        exposition = Exposition(lambda: None)
        served = MetricsServer("127.0.0.1", 0, exposition)
        try:
            exchange(served.port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert exposition.renders == 1
            answered = set()
            for version in range(2, 12):
                accept = b"Accept: application/openmetrics-text; version=%d.0.0\r\n" % version
                answer = exchange(served.port, b"GET /metrics HTTP/1.0\r\n" + accept + b"\r\n")
                assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
                answered.add(answer.split(b"Content-Type: ")[1].split(b"\r\n")[0].decode())
            # Only the formats the cache knows were cached (each rendered once): none with a made-up
            # version; prometheus-client 0.16 (Debian 12) answers every one with its OpenMetrics 0.0.1.
            assert exposition.renders == 1 + len((answered & CACHED_CONTENT_TYPES) - {choose_encoder("")[1]})
        finally:
            served.close()

    def test_a_failing_collector_is_answered_500_and_the_server_goes_on(self) -> None:
        """A collector raising while the metrics render gets 500; the next scrape is answered again."""

        class Broken(Collector):
            """Raises on its first collect only."""

            calls = 0

            def collect(self) -> Iterator[object]:  # type: ignore[override]
                """Raise once, then yield nothing."""
                Broken.calls += 1
                if Broken.calls == 1:
                    raise RuntimeError("collector bug")
                yield from ()

        registry = tiny_registry()
        registry.register(Broken())
        served = MetricsServer("127.0.0.1", 0, registry)
        try:
            assert exchange(served.port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 500 ")
            assert exchange(served.port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
        finally:
            served.close()

    def test_scrapes_reuse_connection_threads(self, server: MetricsServer) -> None:
        """Twenty scrapes one after another are served by far fewer than twenty threads."""
        for _ in range(20):
            assert exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
            time.sleep(0.01)
        assert server._server._workers.started <= 5


class TestWorkers:
    """Connection threads are kept for the next connection, end when idle, and are daemon threads."""

    def test_an_idle_thread_ends_and_a_new_one_takes_over(self) -> None:
        """A thread idle past ``idle_s`` ends; the next job starts another."""
        ran: list[threading.Thread] = []
        workers = _Workers(lambda request, address: ran.append(threading.current_thread()), daemon=True, idle_s=0.05)
        workers.submit(None, None)
        wait_for(lambda: len(ran) == 1, TIMEOUT_S, "the first job")
        assert ran[0].daemon
        wait_for(lambda: not ran[0].is_alive(), TIMEOUT_S, "the idle thread to end")
        workers.submit(None, None)
        wait_for(lambda: len(ran) == 2, TIMEOUT_S, "the second job")
        assert workers.started == 2 and ran[1] is not ran[0]
        workers.close()

    def test_a_busy_thread_takes_the_next_job_once_idle(self) -> None:
        """Jobs submitted one after another, each after the previous ended, run on one thread."""
        ran: list[threading.Thread] = []
        workers = _Workers(lambda request, address: ran.append(threading.current_thread()), daemon=True)
        for count in range(1, 6):
            workers.submit(None, None)
            wait_for(lambda: len(ran) == count and len(workers._idle) == 1, TIMEOUT_S, "the job run")  # noqa: B023
        assert workers.started == 1 and len(set(ran)) == 1
        workers.close()
        wait_for(lambda: not ran[0].is_alive(), TIMEOUT_S, "close to end the idle thread")


class TestGzipAccepted:
    def test_gzip_is_taken_only_with_a_weight_above_zero(self) -> None:
        """``gzip`` with no weight or q > 0 asks for gzip; ``gzip;q=0``, other codings, ``*`` and bad weights do not."""
        yes = ["gzip", "GZIP", "deflate, gzip", "gzip;q=0.5", "gzip; q=1.0", "br;q=1, x-gzip;q=0.001", "gzip;level=1"]
        no = ["", "identity", "deflate, br", "*", "gzip;q=0", "gzip;q=0.000", "gzip;q=1.5", "gzip;q=abc", "gzip;q=-1"]
        assert [v for v in yes if not gzip_accepted(v)] == []
        assert [v for v in no if gzip_accepted(v)] == []
