"""Password hashes for the metrics endpoint's basic auth.

The config holds only a salted scrypt hash, ``scrypt$N$r$p$salt_b64$hash_b64``, made by
``gpu-governor hash-password``; the password itself is never stored, logged or echoed.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import TextIO

SCRYPT_N = 2**15
"""CPU/memory cost of new hashes: 32 MiB and roughly 0.1 s per check."""
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_MEMORY_BYTES = 256 * 2**20
"""A hash asking for more memory than this per check is refused (128 * N * r * p bytes)."""
HASH_FORMAT = "scrypt$N$r$p$salt_b64$hash_b64"


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed scrypt hash: its cost parameters, salt and derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def matches(self, password: str | bytes) -> bool:
        """True when ``password`` (text, or its UTF-8 bytes) derives to this hash; constant-time comparison."""
        secret = password.encode("utf-8", "surrogatepass") if isinstance(password, str) else password
        derived = _scrypt(secret, self.salt, self.n, self.r, self.p, len(self.key))
        return hmac.compare_digest(derived, self.key)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    maxmem = 128 * n * r * p + 2**20
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parse_password_hash(text: str) -> PasswordHash:
    """Parse a hash line; ValueError (never quoting ``text``) when it is not one."""
    parts = text.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError(f"not of the form {HASH_FORMAT}")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = _b64decode(parts[4]), _b64decode(parts[5])
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise ValueError(f"not of the form {HASH_FORMAT} (numbers, then base64)") from None
    if n < 2**10 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range (N a power of 2 >= 1024, r 1-32, p 1-16)")
    if 128 * n * r * p > MAX_SCRYPT_MEMORY_BYTES:
        raise ValueError(f"scrypt parameters needing over {MAX_SCRYPT_MEMORY_BYTES // 2**20} MiB per check")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("a salt of at least 8 bytes and a hash of at least 16 bytes")
    return PasswordHash(n, r, p, salt, key)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A new salted hash line for ``password``."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password.encode("utf-8", "surrogatepass"), salt, n, r, p, HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches the hash line ``encoded`` (False for a malformed line)."""
    try:
        parsed = parse_password_hash(encoded)
    except ValueError:
        return False
    return parsed.matches(password)


def read_password(stdin: TextIO) -> str:
    """A password: prompted twice without echo on a terminal, else the first line of ``stdin``.

    ValueError when it is empty or the two entries differ.
    """
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Password (again): "):
            raise ValueError("the two passwords differ")
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("an empty password")
    return password
