"""Who is on the other end of a loopback TCP connection: the uid that owns the client's socket.

Every local user shares 127.0.0.0/8 and ::1 with a Prometheus on the same host, so a
failed-login back-off keyed on the address alone lets any local user lock the real scraper
out. For a loopback client the kernel knows the client's own socket and its owner's uid: the
socket whose local end is the client's address and port and whose remote end is ours. The
back-off is keyed on that uid instead (:func:`client_key`).

The kernel is asked through sock_diag (netlink), an exact lookup of that one socket (about
70 us, whatever the number of sockets); where netlink is not allowed, through one bounded
scan of ``/proc/net/tcp`` (``tcp6``), in pieces up to a bound. Either runs only when a password
has to be checked. A client that closed its end before the check (its socket is then a kernel
time-wait socket, which keeps no owner and reads as uid 0) names no one: it is keyed by its
address, never taken for root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
from pathlib import Path
from typing import BinaryIO

PROC_NET = Path("/proc/net")
MAX_TABLE_BYTES = 64 * 1024 * 1024
"""The most of a /proc socket table scanned (about 440,000 sockets, TIME_WAIT ones included: a
burst of short connections leaves tens of thousands for a minute; 19 MB took 0.3 s to read here)."""
CHUNK_BYTES = 1024 * 1024
"""The table is scanned in pieces of this size, so memory stays bounded whatever its length."""
LINE_MAX_BYTES = 512
"""More than a /proc/net/tcp6 line (about 180 bytes)."""
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NO_COOKIE = 0xFFFFFFFF
DIAG_UID_OFFSET = 16 + 4 + 48 + 12
"""Where inet_diag_msg's uid lies in the answer: after nlmsghdr (16), family/state/timer/retrans (4),
the socket id (48) and expires/rqueue/wqueue (12)."""
DIAG_TIMER_OFFSET = 16 + 2
"""Where inet_diag_msg's idiag_timer lies: after nlmsghdr (16), family and state."""
TIME_WAIT_TIMER = 3
"""The timer a time-wait socket reports (idiag_timer; ``03:`` in /proc/net/tcp): the client closed its end, and
such a socket keeps no owner (the kernel names uid 0 for it), so it names no one."""
NETLINK_TIMEOUT_S = 0.5

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _loopback(host: str) -> Address | None:
    """``host`` as an address when it is a loopback one (an IPv4-mapped one as IPv4), else None."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address if address.is_loopback else None


def _by_netlink(client: Address, client_port: int, server: Address, server_port: int) -> int | None:
    """The owner of the TCP socket ``client:client_port -> server:server_port`` from sock_diag;
    None when the kernel has no such socket. Raises OSError when netlink cannot be used."""
    family = socket.AF_INET if client.version == 4 else socket.AF_INET6
    socket_id = struct.pack(
        "!HH16s16s", client_port, server_port, client.packed.ljust(16, b"\0"), server.packed.ljust(16, b"\0")
    ) + struct.pack("=III", 0, NO_COOKIE, NO_COOKIE)
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + socket_id
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as link:
        link.settimeout(NETLINK_TIMEOUT_S)
        link.sendto(header + request, (0, 0))
        answer = link.recv(4096)
    if len(answer) < DIAG_UID_OFFSET + 4 or struct.unpack_from("=H", answer, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (it closed, or is not the client's)
    if answer[DIAG_TIMER_OFFSET] == TIME_WAIT_TIMER:
        return None  # the client closed its end: no owner (not root, whose uid 0 the kernel puts there)
    uid: int = struct.unpack_from("=I", answer, DIAG_UID_OFFSET)[0]
    return uid


def _hex(address: Address) -> str:
    """An address as the kernel prints it in /proc/net/tcp*: 32-bit words in host byte order, %08X."""
    packed = address.packed
    words = struct.unpack(f"{'<' if sys.byteorder == 'little' else '>'}{len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words)


def _by_proc(client: Address, client_port: int, server: Address, server_port: int, proc_net: Path) -> int | None:
    """The owner of that socket from ``/proc/net/tcp`` (``tcp6``); None when not listed."""
    needle = f"{_hex(client)}:{client_port:04X} {_hex(server)}:{server_port:04X} ".encode()
    try:
        with open(proc_net / ("tcp" if client.version == 4 else "tcp6"), "rb") as handle:
            line = _find_line(handle, needle)
    except OSError:
        return None
    fields = line.split() if line is not None else []
    if len(fields) > 4 and fields[4].startswith(b"%02X:" % TIME_WAIT_TIMER):
        return None  # a time-wait socket: the client closed its end, and the uid column says 0
    try:  # local, remote, st, tx:rx, tr:when, retrnsmt, uid
        return int(fields[6])
    except (IndexError, ValueError):
        return None


def _find_line(handle: BinaryIO, needle: bytes) -> bytes | None:
    """The rest of the line of ``handle`` that starts with ``needle`` (from it up to the line
    end), scanned in CHUNK_BYTES pieces up to MAX_TABLE_BYTES; None when not found by then."""
    buffer, scanned = b"", 0
    while scanned < MAX_TABLE_BYTES:
        chunk = handle.read(CHUNK_BYTES)
        if not chunk:
            return None
        scanned += len(chunk)
        buffer = buffer[-(len(needle) - 1) :] + chunk  # a needle across two pieces is found whole
        at = buffer.find(needle)
        if at >= 0:
            end = buffer.find(b"\n", at)
            if end < 0:
                buffer += handle.read(LINE_MAX_BYTES)
                end = buffer.find(b"\n", at)
            return buffer[at : end if end >= 0 else len(buffer)]
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, an IPv4-mapped one)."""
    return _loopback(host) is not None


def owner_uid(
    peer: tuple[str, int], local: tuple[str, int], proc_net: Path = PROC_NET, *, netlink: bool = True
) -> int | None:
    """The uid owning the client socket of a loopback connection from ``peer`` to ``local``
    ((host, port) each, as the accepting socket sees them); None when not loopback or not found."""
    client, server = _loopback(peer[0]), _loopback(local[0])
    if client is None or server is None or client.version != server.version:
        return None
    if netlink:
        try:
            return _by_netlink(client, peer[1], server, local[1])
        except OSError:
            pass  # netlink not allowed here (a seccomp filter, RestrictAddressFamilies=): the table
    return _by_proc(client, peer[1], server, local[1], proc_net)


def client_key(sock: socket.socket, peer: tuple[str, int]) -> str:
    """The key a client's failed logins count against: ``loopback uid N`` for a loopback client
    whose socket's owner the kernel names, else its address."""
    try:
        local = sock.getsockname()
    except OSError:
        return peer[0]
    uid = owner_uid((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
    return str(peer[0]) if uid is None else f"loopback uid {uid}"


LISTEN_STATE = b"0A"
"""TCP_LISTEN as /proc/net/tcp prints a socket's state."""


def listening_uids(port: int, proc_net: Path = PROC_NET) -> set[int]:
    """The uids owning the sockets that listen on TCP ``port`` (any address, IPv4 and IPv6) in
    this network namespace, from ``/proc/net/tcp`` and ``tcp6`` (world-readable), each read up
    to MAX_TABLE_BYTES; empty when none is listed or the tables cannot be read."""
    suffix = f":{port:04X}".encode()
    uids: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(proc_net / name, "rb") as handle:
                scanned = 0
                for line in handle:
                    scanned += len(line)
                    if scanned > MAX_TABLE_BYTES:
                        break
                    fields = line.split()  # sl, local, remote, st, tx:rx, tr:when, retrnsmt, uid
                    if len(fields) > 7 and fields[3] == LISTEN_STATE and fields[1].endswith(suffix):
                        with contextlib.suppress(ValueError):
                            uids.add(int(fields[7]))
        except OSError:
            continue
    return uids
