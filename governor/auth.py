"""Password hashes for the metrics endpoint's basic auth, and the back-off for wrong guesses.

Only hashes are stored, never a password, and a password is never logged or echoed:

- bcrypt (``$2y$``, ``$2b$``, ``$2a$``), the hash of the exporter-toolkit web-config file's
  ``basic_auth_users``, made by ``gpu-governor hash-password`` or ``htpasswd -nBC 10 USER``;
- salted scrypt, ``scrypt$N$r$p$salt_b64$hash_b64``, the format of the deprecated
  ``[metrics] basic_auth_password_hash`` key (which takes a bcrypt hash too), still checked.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
import threading
from dataclasses import dataclass
from typing import Protocol, TextIO

BCRYPT_COST = 10
"""Cost of new bcrypt hashes: about 0.075 s per check (as ``htpasswd -nBC 10``)."""
BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 14
"""A bcrypt hash costing more than this (about 1.2 s of CPU per check) is refused: each
check of a guessed password would cost that much."""
BCRYPT_MAX_PASSWORD_BYTES = 72
"""bcrypt reads at most 72 bytes; a longer password never matches (not silently cut)."""
BCRYPT_FORMAT = "a bcrypt hash such as $2y$10$... (htpasswd -nBC 10 USER, or gpu-governor hash-password)"
_BCRYPT = re.compile(r"\$(2[aby])\$(\d\d)\$([./A-Za-z0-9]{53})")
SCRYPT_N = 2**15
"""CPU/memory cost of scrypt hashes made for tests and old configs: 32 MiB and roughly 0.1 s per check."""
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_MEMORY_BYTES = 256 * 2**20
"""A hash asking for more memory than this per check is refused (128 * N * r * p bytes)."""
HASH_FORMAT = "scrypt$N$r$p$salt_b64$hash_b64"

FREE_FAILURES = 5
"""Failed logins an address may make before it is backed off."""
BACKOFF_FIRST_S = 1.0
"""The first back-off period (seconds); it doubles with each further failure."""
BACKOFF_MAX_S = 60.0
"""The longest back-off period (seconds)."""
BACKOFF_FORGET_S = 900.0
"""An address with no failure for this long (seconds) starts afresh."""
BACKOFF_MAX_ADDRESSES = 4096
"""Addresses remembered at most; beyond that the one whose last failure is oldest is forgotten."""
CHECKS_PER_S = 2.0
"""Password checks (bcrypt or scrypt runs) allowed per second on average, all addresses together."""
CHECK_BURST = 8
"""Password checks allowed in a burst, beyond the average rate."""


class PasswordHash(Protocol):
    """A parsed password hash of either format."""

    def matches(self, password: str | bytes) -> bool:
        """True when ``password`` (text, or its UTF-8 bytes) is the one hashed."""
        ...  # pragma: no cover - a protocol


def _secret(password: str | bytes) -> bytes:
    return password.encode("utf-8", "surrogatepass") if isinstance(password, str) else password


@dataclass(frozen=True, slots=True)
class BcryptHash:
    """A parsed bcrypt hash; ``encoded`` has the ``$2b$`` prefix (``$2y$`` is the same algorithm)."""

    cost: int
    encoded: bytes

    def matches(self, password: str | bytes) -> bool:
        """True when ``password`` hashes to this; False for one over 72 bytes (bcrypt would cut it)."""
        secret = _secret(password)
        if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
            return False
        try:
            import bcrypt  # here: only a configured password loads it

            return bool(bcrypt.checkpw(secret, self.encoded))
        except ValueError:  # a NUL byte, on some bcrypt versions
            return False


def parse_bcrypt_hash(text: str) -> BcryptHash:
    """Parse a bcrypt hash; ValueError (never quoting ``text``) when it is not one or costs too much."""
    match = _BCRYPT.fullmatch(text.strip())
    if match is None:
        if text.strip().startswith(("$2x$", "$2$")):
            raise ValueError("a bcrypt variant ($2x$ or $2$) that is not supported: make a new hash")
        raise ValueError("not a bcrypt hash ($2y$, $2b$ or $2a$, a two-digit cost, then 53 characters)")
    cost = int(match.group(2))
    if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
        raise ValueError(f"a bcrypt cost of {cost}, outside {BCRYPT_MIN_COST}-{BCRYPT_MAX_COST}")
    return BcryptHash(cost, f"$2b${match.group(2)}${match.group(3)}".encode("ascii"))


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """A parsed scrypt hash: its cost parameters, salt and derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def matches(self, password: str | bytes) -> bool:
        """True when ``password`` (text, or its UTF-8 bytes) derives to this hash; constant-time comparison."""
        derived = _scrypt(_secret(password), self.salt, self.n, self.r, self.p, len(self.key))
        return hmac.compare_digest(derived, self.key)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    maxmem = 128 * n * r * p + 2**20
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parse_password_hash(text: str) -> PasswordHash:
    """Parse a bcrypt or scrypt hash; ValueError (never quoting ``text``) when it is neither."""
    if text.strip().startswith("$2"):
        return parse_bcrypt_hash(text)
    if not text.strip().startswith("scrypt$"):
        raise ValueError(f"neither a bcrypt hash ($2y$...) nor of the form {HASH_FORMAT}")
    return parse_scrypt_hash(text)


def parse_scrypt_hash(text: str) -> ScryptHash:
    """Parse a scrypt hash line; ValueError (never quoting ``text``) when it is not one."""
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
    return ScryptHash(n, r, p, salt, key)


def hash_password(password: str, *, cost: int = BCRYPT_COST) -> str:
    """A new bcrypt hash (``$2b$``) of ``password``; ValueError when it is over 72 bytes or the cost is out of range."""
    secret = _secret(password)
    if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
        raise ValueError(f"a password of {len(secret)} bytes (bcrypt reads at most {BCRYPT_MAX_PASSWORD_BYTES})")
    if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
        raise ValueError(f"a cost between {BCRYPT_MIN_COST} and {BCRYPT_MAX_COST}")
    import bcrypt

    return bytes(bcrypt.hashpw(secret, bcrypt.gensalt(cost))).decode("ascii")


def hash_password_scrypt(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A new salted scrypt hash line for ``password`` (the deprecated TOML key's format)."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password.encode("utf-8", "surrogatepass"), salt, n, r, p, HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches the bcrypt or scrypt hash ``encoded`` (False for a malformed one)."""
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


@dataclass(slots=True)
class _Failures:
    count: int
    last_s: float
    blocked_until_s: float


class FailureBackoff:
    """Failed logins per client address, and how long each address is refused unchecked.

    After ``free_failures`` failures an address is backed off for ``first_s`` seconds, and
    each further failure (made once the period is over) doubles the period, up to
    ``max_s``. A success, or ``forget_s`` seconds without a failure, clears the address.
    At most ``max_addresses`` are remembered, so a flood from many addresses costs
    bounded memory. Times are monotonic seconds passed in by the caller; thread-safe.
    """

    def __init__(
        self,
        *,
        free_failures: int = FREE_FAILURES,
        first_s: float = BACKOFF_FIRST_S,
        max_s: float = BACKOFF_MAX_S,
        forget_s: float = BACKOFF_FORGET_S,
        max_addresses: int = BACKOFF_MAX_ADDRESSES,
    ) -> None:
        if free_failures < 1 or not 0 < first_s <= max_s or forget_s <= 0 or max_addresses < 1:
            raise ValueError("free_failures >= 1, 0 < first_s <= max_s, forget_s > 0 and max_addresses >= 1")
        self._free = free_failures
        self._first_s = first_s
        self._max_s = max_s
        self._forget_s = forget_s
        self._max_addresses = max_addresses
        self._lock = threading.Lock()
        self._seen: dict[str, _Failures] = {}  # ordered by last failure, oldest first

    def blocked_for(self, address: str, now_s: float) -> float:
        """Seconds ``address`` is still refused without a check at ``now_s`` (0.0 when it may try)."""
        with self._lock:
            record = self._seen.get(address)
            return max(0.0, record.blocked_until_s - now_s) if record is not None else 0.0

    def failed(self, address: str, now_s: float) -> None:
        """Count a failed login from ``address`` at ``now_s``; back it off once past the free failures."""
        with self._lock:
            record = self._seen.pop(address, None)
            if record is None or now_s - record.last_s > self._forget_s:
                record = _Failures(0, now_s, now_s)
            record.count += 1
            record.last_s = now_s
            beyond = record.count - self._free
            if beyond >= 0:
                period_s = min(self._max_s, self._first_s * 2.0 ** min(beyond, 32))
                record.blocked_until_s = now_s + period_s
            self._seen[address] = record
            while len(self._seen) > self._max_addresses:
                del self._seen[next(iter(self._seen))]

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address`` (it knows the password)."""
        with self._lock:
            self._seen.pop(address, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


class CheckBudget:
    """A token bucket for password checks: ``burst`` at once, refilled at ``per_s`` a second.

    It bounds the CPU that guesses from any number of addresses can burn on bcrypt
    (``per_s`` times the cost of one check) where the per-address back-off cannot.
    Times are monotonic seconds passed in by the caller; thread-safe.
    """

    def __init__(self, *, per_s: float = CHECKS_PER_S, burst: int = CHECK_BURST) -> None:
        if per_s <= 0 or burst < 1:
            raise ValueError("per_s > 0 and burst >= 1")
        self._per_s = per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at_s: float | None = None
        self._lock = threading.Lock()

    def take(self, now_s: float) -> bool:
        """Spend one check at ``now_s``; False (nothing spent) when the budget is used up."""
        with self._lock:
            if self._at_s is not None:
                self._tokens = min(self._burst, self._tokens + (now_s - self._at_s) * self._per_s)
            self._at_s = now_s
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True
