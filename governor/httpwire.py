"""HTTP/1.0 and HTTP/1.1 on the wire, for the metrics endpoint: a request head read within
byte and time bounds and parsed strictly, and a response built as one piece of bytes.

Only what one GET of /metrics needs, and nothing that grows with the client's input:

- the head (request line, header lines, the blank line) is read with ``recv`` until its
  end, at most ``MAX_REQUEST_HEAD_BYTES`` in all and the request line at most
  ``MAX_REQUEST_LINE_BYTES``, before a deadline; what follows the head (a body) is never
  waited for nor looked at;
- the request line is exactly ``METHOD SP TARGET SP HTTP/1.x`` (RFC 9112 section 3): a
  token, visible ASCII, single spaces; HTTP/0.9's two-word form is refused, and another
  major version is 505;
- lines end in CRLF (a bare LF is taken too, as RFC 9112 section 2.2 allows; a bare CR
  is refused); a header line is ``name: value`` with a token name and no space before the
  colon; obsolete line folding, a line without a colon, control characters and
  non-ASCII bytes outside field values are refused (field values may hold obs-text,
  bytes 0x80-0xFF, RFC 9110 section 5.5: an ``Authorization`` header carrying them is
  simply wrong credentials);
- at most ``MAX_HEADERS`` header lines; a repeated ``Authorization`` or ``Host`` is
  refused; repeated ``Accept`` and ``Accept-Encoding`` lines are joined with commas, as
  a list-valued field is (RFC 9110 section 5.3); every other header is checked and
  dropped.

A refused head raises :class:`HeadError` with the status to answer (400, 414, 431, 505).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate

MAX_REQUEST_LINE_BYTES = 4096
"""A scrape's request line is well under 100 bytes; longer ones (with their line end) get 414."""
MAX_REQUEST_HEAD_BYTES = 16384
"""Request line and headers together, with the blank line ending them; more gets 431."""
MAX_HEADERS = 100
"""Header lines in one request head; more gets 431 (as http.client's limit did)."""

REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.[0-9]")
_VERSION_LIKE = re.compile(rb"(?:" + _TOKEN + rb") (?:[\x21-\x7e]+) HTTP/[0-9]+\.[0-9]+")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)")
_KEPT = {b"authorization": "authorization", b"accept": "accept", b"accept-encoding": "accept-encoding"}
_SINGLE = {b"authorization", b"host"}
_OWS = b" \t"


class HeadError(Exception):
    """A request head that is refused: ``status`` is the answer (400, 414, 431, 505), ``reason`` one line why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request head: what the endpoint looks at, and nothing else.

    ``path`` and ``query`` split the request target at its first ``?`` (neither is
    percent-decoded); header values are latin-1 text with the surrounding blanks removed,
    None when the header was not sent."""

    method: str
    path: str
    query: str
    minor_version: int
    authorization: str | None = None
    accept: str | None = None
    accept_encoding: str | None = None


def _head_end(buffer: bytearray | bytes, start: int) -> int:
    """The index just past the blank line ending the head in ``buffer`` (searched from ``start``), or -1."""
    crlf = buffer.find(b"\n\r\n", start)
    lf = buffer.find(b"\n\n", start)
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if lf < 0 or crlf < lf:
        return crlf + 3
    return lf + 2


def _too_long(buffer: bytearray | bytes) -> HeadError | None:
    """414 when the request line in ``buffer`` is already over its cap (ended or not), else None."""
    line_end = buffer.find(b"\n", 0, MAX_REQUEST_LINE_BYTES)
    if line_end < 0 and len(buffer) >= MAX_REQUEST_LINE_BYTES:
        return HeadError(414, f"request line over {MAX_REQUEST_LINE_BYTES} bytes")
    return None


def read_head(
    sock: socket.socket | ssl.SSLSocket, deadline_s: float, clock: Callable[[], float] = time.monotonic
) -> bytes:
    """Read a request head from ``sock`` until its blank line, and return it (blank line included).

    ``deadline_s`` is on ``clock`` (monotonic seconds): every ``recv`` waits at most until
    then, so a client sending a byte at a time is cut off at the deadline too (TimeoutError).
    Reads at most ``MAX_REQUEST_HEAD_BYTES`` (bytes after the head that came with it are
    dropped unread). Raises HeadError 414 or 431 past the caps, 400 when the client ends
    its side mid-head, ConnectionError when it closes before sending anything; a reset or
    a failed TLS handshake raises OSError."""
    buffer = bytearray()
    while True:
        remaining_s = deadline_s - clock()
        if remaining_s <= 0:
            raise TimeoutError("request head not received in time")
        sock.settimeout(remaining_s)
        chunk = sock.recv(MAX_REQUEST_HEAD_BYTES - len(buffer))
        if not chunk:
            if not buffer:
                raise ConnectionError("closed before a request was sent")
            raise _too_long(buffer) or HeadError(400, "the connection ended inside the request head")
        searched = max(0, len(buffer) - 2)
        buffer += chunk
        end = _head_end(buffer, searched)
        if end >= 0:
            line_end = buffer.find(b"\n")
            if line_end + 1 > MAX_REQUEST_LINE_BYTES:
                raise HeadError(414, f"request line over {MAX_REQUEST_LINE_BYTES} bytes")
            return bytes(buffer[:end])
        too_long = _too_long(buffer)
        if too_long is not None:
            raise too_long
        if len(buffer) >= MAX_REQUEST_HEAD_BYTES:
            raise HeadError(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")


def _lines(head: bytes) -> list[bytes]:
    """The head's lines without their line ends (CRLF or LF), the blank last line dropped."""
    lines = head.split(b"\n")
    del lines[-2:]  # the blank line and the empty rest after its LF
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_head(head: bytes) -> Request:
    """The request a head read by :func:`read_head` asks for; HeadError (400, 431, 505) when it is malformed."""
    lines = _lines(head)
    if not lines:
        raise HeadError(400, "no request line")
    line = lines[0]
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if _VERSION_LIKE.fullmatch(line) is not None:
            raise HeadError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise HeadError(400, "malformed request line (METHOD SP TARGET SP HTTP/1.x)")
    method, target, major = match.groups()
    if major != b"1":
        raise HeadError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    minor = int(line[-1:])
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, f"over {MAX_HEADERS} header lines")
    kept: dict[str, str] = {}
    seen_single: set[bytes] = set()
    for header in lines[1:]:
        found = _HEADER_LINE.fullmatch(header)
        if found is None:
            if header[:1] in (b" ", b"\t"):
                raise HeadError(400, "obsolete line folding in the request head")
            raise HeadError(400, "malformed header line (NAME: VALUE, visible characters only)")
        name = found.group(1).lower()
        if name in _SINGLE:
            if name in seen_single:
                raise HeadError(400, f"more than one {name.decode().title()} header")
            seen_single.add(name)
        key = _KEPT.get(name)
        if key is not None:
            value = found.group(2).strip(_OWS).decode("latin-1")
            kept[key] = f"{kept[key]}, {value}" if key in kept else value
    path, _, query = target.decode("ascii").partition("?")
    return Request(
        method.decode("ascii"),
        path,
        query,
        minor,
        kept.get("authorization"),
        kept.get("accept"),
        kept.get("accept-encoding"),
    )


_date: list[tuple[int, bytes]] = [(0, b"")]


def http_date(now_s: float | None = None) -> bytes:
    """The ``Date`` value for ``now_s`` (Unix seconds; default: now), formatted once per second."""
    second = int(time.time() if now_s is None else now_s)
    cached_second, cached = _date[0]
    if second != cached_second:
        cached = formatdate(second, usegmt=True).encode("ascii")
        _date[0] = (second, cached)
    return cached


def response(
    status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *, length: int | None = None
) -> bytes:
    """A whole HTTP/1.0 response as one piece of bytes: status line, ``Date``, ``headers``,
    ``Content-Length`` (``length``, default the body's; none on a 204), ``Connection: close`` and ``body``
    (pass ``body=b""`` with the GET body's ``length`` to answer a HEAD)."""
    lines = [b"HTTP/1.0 %d %s\r\nDate: %s\r\n" % (status, REASONS[status].encode("ascii"), http_date())]
    lines.extend(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers)
    if status != 204:  # a 204 has no Content-Length (RFC 9110 section 8.6)
        lines.append(b"Content-Length: %d\r\n" % (len(body) if length is None else length))
    lines.append(b"Connection: close\r\n\r\n")
    lines.append(body)
    return b"".join(lines)


def plain(status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A response with a short text/plain body (an error, a refusal)."""
    return response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode("utf-8"))
