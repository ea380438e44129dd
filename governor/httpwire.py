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
- at most ``MAX_HEADERS`` header lines; a repeated ``Authorization``, ``Accept``,
  ``Accept-Encoding`` or ``Host`` is refused (no scraper sends one twice, and which copy
  counts would be a guess); every other header is checked and dropped.

A refused head raises :class:`HeadError` with the status to answer (400, 414, 431, 505).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import NamedTuple

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

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"  # field-vchar, SP, HTAB: no CR, LF, NUL, other controls, DEL
_REQUEST_LINE = re.compile(_TCHAR + rb"+ [\x21-\x7e]+ HTTP/([0-9])\.[0-9]")
_VERSION_LIKE = re.compile(_TCHAR + rb"+ [\x21-\x7e]+ HTTP/[0-9]+\.[0-9]+")
_HEADER_LINE = re.compile(_TCHAR + rb"+:(?=(" + _VALUE + rb"))\1")
_HEAD = re.compile(
    rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/1\.([0-9])\r?\n"
    rb"((?:" + _TCHAR + rb"+:(?=(?P<value>" + _VALUE + rb"))(?P=value)\r?\n)*)\r?\n"
)
"""A whole well-formed head, matched at once. A failing match costs time linear in the head:
each repeated part ends at a byte it cannot hold (a token at the space or colon, a value at
CR or LF), and a value is matched atomically (a lookahead captures it, a backreference
consumes it: Python 3.10 has no possessive quantifiers), so it is never given back byte by byte."""
_SINGLE = (b"\nhost:", b"\nauthorization:", b"\naccept:", b"\naccept-encoding:")
"""Headers refused when repeated: the ones the endpoint reads (which one would count?) and Host."""


class HeadError(Exception):
    """A request head that is refused: ``status`` is the answer (400, 414, 431, 505), ``reason`` one line why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Request(NamedTuple):
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
    chunk = _receive(sock, deadline_s, clock, MAX_REQUEST_HEAD_BYTES)
    end = _head_end(chunk, 0)
    if end >= 0 and chunk.find(b"\n") < MAX_REQUEST_LINE_BYTES:  # all at once: the usual case
        return chunk[:end]
    buffer = bytearray()
    while True:
        if not chunk:
            if not buffer:
                raise ConnectionError("closed before a request was sent")
            raise _too_long(buffer) or HeadError(400, "the connection ended inside the request head")
        searched = max(0, len(buffer) - 2)
        buffer += chunk
        end = _head_end(buffer, searched)
        if end >= 0:
            if buffer.find(b"\n") + 1 > MAX_REQUEST_LINE_BYTES:
                raise HeadError(414, f"request line over {MAX_REQUEST_LINE_BYTES} bytes")
            return bytes(buffer[:end])
        too_long = _too_long(buffer)
        if too_long is not None:
            raise too_long
        first = buffer.find(b"\n")
        if first >= 0 and _VERSION_LIKE.fullmatch(bytes(buffer[:first]).removesuffix(b"\r")) is None:
            # HTTP/0.9's "GET /metrics" (or junk): no blank line will ever come, so answer now
            raise HeadError(400, "malformed request line (METHOD SP TARGET SP HTTP/1.x)")
        if len(buffer) >= MAX_REQUEST_HEAD_BYTES:
            raise HeadError(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        chunk = _receive(sock, deadline_s, clock, MAX_REQUEST_HEAD_BYTES - len(buffer))


def _receive(sock: socket.socket | ssl.SSLSocket, deadline_s: float, clock: Callable[[], float], limit: int) -> bytes:
    """At most ``limit`` bytes from ``sock``, waiting no later than ``deadline_s`` (TimeoutError); b"" at its end."""
    remaining_s = deadline_s - clock()
    if remaining_s <= 0:
        raise TimeoutError("request head not received in time")
    sock.settimeout(remaining_s)
    return sock.recv(limit)


def _lines(head: bytes) -> list[bytes]:
    """The head's lines without their line ends (CRLF or LF), the blank last line dropped."""
    lines = head.split(b"\n")
    del lines[-2:]  # the blank line and the empty rest after its LF
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_head(head: bytes) -> Request:
    """The request a head read by :func:`read_head` asks for; HeadError (400, 431, 505) when it is malformed."""
    match = _HEAD.fullmatch(head) if head.count(b"\n") <= MAX_HEADERS + 2 else None
    if match is None:
        raise _what_is_wrong(head)
    method, target, minor, block = match.group(1, 2, 3, 4)
    lowered = b"\n" + block.lower()  # each field name now follows a LF
    for single in _SINGLE:
        if lowered.count(single) > 1:
            raise HeadError(400, f"more than one {single[1:-1].decode().title()} header")
    path, _, query = target.decode("ascii").partition("?")
    return Request(
        method.decode("ascii"),
        path,
        query,
        int(minor),
        _field(block, lowered, b"\nauthorization:"),
        _field(block, lowered, b"\naccept:"),
        _field(block, lowered, b"\naccept-encoding:"),
    )


def _field(block: bytes, lowered: bytes, name: bytes) -> str | None:
    """The value of header ``name`` (b"\\nNAME:", lower case) in a checked ``block`` of header lines
    where it appears at most once, as latin-1 text without the blanks around it; None if absent."""
    start = lowered.find(name)
    if start < 0:
        return None
    value_start = start + len(name) - 1  # ``lowered`` has one byte more in front
    return block[value_start : block.index(b"\n", value_start)].strip(b" \t\r").decode("latin-1")


def _what_is_wrong(head: bytes) -> HeadError:
    """Why :func:`parse_head` refuses ``head``: its first wrong line, named."""
    line = head[: head.find(b"\n")].removesuffix(b"\r")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if _VERSION_LIKE.fullmatch(line) is not None:
            return HeadError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        return HeadError(400, "malformed request line (METHOD SP TARGET SP HTTP/1.x)")
    if match.group(1) != b"1":
        return HeadError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if head.count(b"\n") - 2 > MAX_HEADERS:
        return HeadError(431, f"over {MAX_HEADERS} header lines")
    for header in _lines(head)[1:]:
        if header[:1] in (b" ", b"\t"):
            return HeadError(400, "obsolete line folding in the request head")
        if _HEADER_LINE.fullmatch(header) is None:
            return HeadError(400, "malformed header line (NAME: VALUE, visible characters only)")
    return HeadError(400, "malformed request head")  # a bare CR before a LF, say


_date: list[tuple[int, bytes]] = [(0, b"")]


_QVALUE = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")


def gzip_accepted(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value asks for gzip: a ``gzip`` (or ``x-gzip``) coding whose
    weight is above 0 (RFC 9110 section 12.5.3; no ``q`` is 1). ``gzip;q=0`` says gzip is not
    acceptable, which prometheus-client's check ignores; a malformed weight leaves gzip out
    (identity is always acceptable). ``*`` is not taken as gzip, as prometheus-client does not."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        weight = "1"
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = value.strip()
        if _QVALUE.fullmatch(weight) and float(weight) > 0:
            return True
    return False


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
