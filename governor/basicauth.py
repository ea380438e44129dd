"""Basic auth for the metrics endpoint: an ``Authorization: Basic`` header checked against
bcrypt (or, from the deprecated key, scrypt) hashes, within bounds.

Password checks: at most ``MAX_PASSWORD_CHECKS`` run at once and no more than
governor.auth.CHECKS_PER_S on average, a request waits at most ``PASSWORD_CHECK_WAIT_S``
for one (else 503), and an address with repeated failures is answered 429 without a check
for a growing while; verified credentials are cached, so a configured scraper needs no
check at all.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Callable, Mapping

from governor.auth import CheckBudget, FailureBackoff, PasswordHash, parse_password_hash
from governor.httpwire import plain

MAX_CACHED_CREDENTIALS = 4
MAX_CACHED_REJECTIONS = 64
"""Refused Authorization headers remembered (keyed digests): sent again, one is refused at once,
with no bcrypt run and no failure counted, so a scraper with a stale password (a second job, an
old config) keeps failing alone instead of backing off the client it shares an address or user with."""
"""Accepted Authorization headers remembered (as keyed digests) so a scrape costs no bcrypt run."""
MAX_PASSWORD_CHECKS = 1
"""bcrypt (or scrypt) checks run at once: a flood of wrong passwords burns at most one core."""
PASSWORD_CHECK_WAIT_S = 0.1
"""Seconds a request waits for a password-check slot before it is answered 503."""


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
    address is backed off); one that was refused is remembered too, and refused again at once
    without counting as another failure (a stale password is one guess, not a flood). A check
    always runs one hash, an unknown user's against a
    configured user's hash picked by the name, so timing does not tell which users exist. Checks are bounded:
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
        self._hashes = tuple(self._users.values())  # an unknown user's password is checked against one
        self._cache_key = os.urandom(32)
        self._accepted: tuple[bytes, ...] = ()
        self._rejected: dict[bytes, None] = {}  # refused headers' digests, oldest first
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

    def verdict(self, header: str | None, address: str = "", who: Callable[[], str] | None = None) -> Verdict:
        """Check ``header`` (the raw Authorization value, or None) sent from client ``address``;
        ``who`` (when given) names the client for the back-off instead of its address, asked
        only when a password has to be checked (:func:`governor.peeruid.client_key`)."""
        return self._verdict(header, address, who)[0]

    def _verdict(self, header: str | None, address: str, who: Callable[[], str] | None) -> tuple[Verdict, str]:
        """The verdict and the key the client's failures count against."""
        if not header:
            return Verdict.MISSING, address
        digest = hmac.new(self._cache_key, header.encode("latin-1", "replace"), hashlib.sha256).digest()
        if any(hmac.compare_digest(digest, seen) for seen in self._accepted):
            return Verdict.OK, address
        if digest in self._rejected:  # the same wrong credentials again: a guess only once
            return Verdict.WRONG, address
        if who is not None:
            address = who()
        if self.backoff.blocked_for(address, time.monotonic()) > 0:
            return Verdict.BACKED_OFF, address
        credentials = _basic_credentials(header)
        if credentials is None:
            self._refused(digest, address)
            return Verdict.WRONG, address
        user, password = credentials
        hashed = self._users.get(user)
        password_ok = self._derive(hashed if hashed is not None else self._decoy(user), password, address)
        if password_ok is None:
            return Verdict.BUSY, address
        if hashed is None or not password_ok:
            self._refused(digest, address)
            return Verdict.WRONG, address
        self.backoff.succeeded(address)
        with self._lock:
            self._accepted = (digest, *self._accepted)[:MAX_CACHED_CREDENTIALS]
        return Verdict.OK, address

    def _refused(self, digest: bytes, address: str) -> None:
        """Count a failed login against ``address`` and remember the header that failed."""
        self.backoff.failed(address, time.monotonic())
        with self._lock:
            self._rejected[digest] = None
            while len(self._rejected) > MAX_CACHED_REJECTIONS:
                del self._rejected[next(iter(self._rejected))]

    def _decoy(self, user: bytes) -> PasswordHash:
        """The configured hash an unknown ``user``'s password is checked against: one picked by
        the name under the per-process key, so a name takes the same time on every try, and
        unknown names take the times of the configured hashes (which may differ in cost) in the
        same proportions as the configured names do: the time does not tell whether a name exists."""
        pick = hmac.new(self._cache_key, b"decoy:" + user, hashlib.sha256).digest()
        return self._hashes[int.from_bytes(pick[:8], "big") % len(self._hashes)]

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

    def refusal(self, header: str | None, address: str = "", who: Callable[[], str] | None = None) -> bytes | None:
        """None when ``header`` (the raw Authorization value, or None) from client ``address`` carries
        the right credentials; else the whole response refusing the request: 401 with a
        WWW-Authenticate challenge (missing or wrong), 429 with Retry-After (backed off) or 503
        with Retry-After (busy). ``who``: as for :meth:`verdict`."""
        verdict, address = self._verdict(header, address, who)
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.BACKED_OFF:
            wait_s = math.ceil(self.backoff.blocked_for(address, time.monotonic())) or 1
            return plain(429, "too many failed logins\n", [("Retry-After", str(wait_s))])
        if verdict is Verdict.BUSY:
            return plain(503, "busy, try again\n", [("Retry-After", "1")])
        return plain(401, "unauthorized\n", [("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"')])


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
