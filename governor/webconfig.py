"""The exporter-toolkit web-config file: TLS and basic auth for the metrics endpoint.

The format is the one node_exporter and every exporter built on prometheus/exporter-toolkit
read with ``--web.config.file`` (its docs/web-configuration.md)::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, default NoClientCert
      client_ca_file: clients-ca.crt                 # optional
      min_version: TLS12                             # optional, TLS10..TLS13 (default TLS12)
      max_version: TLS13                             # optional (default TLS13)
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt, as `htpasswd -nBC 10 USER` prints

The file is YAML, read bounded (256 KiB) with the config's trust checks (running as root: owned
by root, writable by no one else), parsed by PyYAML's safe loader with two refusals more:
aliases (``*name``: nothing here needs them, and they make small files expand) and duplicate
keys (the toolkit's strict parser refuses those too). The schema is strict: an unknown key, a
wrong type or a bad value is an error naming the file and the key. Keys of the toolkit that
gpu-governor does not implement are ignored with a warning when ignoring them loosens
nothing (``http_server_config``, ``rate_limit``, ``cipher_suites``, ``curve_preferences``,
``prefer_server_cipher_suites``), and refused when it would (``client_allowed_sans``; the
inline ``cert``, ``key``, ``client_ca``; the client-auth types that accept a certificate
without verifying it).

This module parses and builds (:func:`load_web_config`, :func:`build_tls_context`); the
endpoint picks a changed file up while running (governor.httpserver.LiveWebConfig).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor.auth import parse_bcrypt_hash, parse_password_hash
from governor.errors import ConfigError, ConfigIssue
from governor.safefile import root_trust_problems, untrusted_ancestor
from governor.schema import Issues, describe, short, unknown

MAX_PEM_BYTES = 1024 * 1024
"""A certificate chain or key is a few kilobytes; a larger file is refused unread."""
MAX_WEB_CONFIG_BYTES = 256 * 1024
"""A web-config file is a few hundred bytes (2000 users, about 140 KB); a larger one is refused unread
(PyYAML parses in pure Python: a megabyte of YAML costs it seconds)."""

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
"""Toolkit values that take a client certificate without checking it: refused."""
REQUIRE_CLIENT_CERT = "RequireAndVerifyClientCert"

TOP_KEYS = ("tls_server_config", "basic_auth_users")
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
IGNORED_KEYS = {
    "http_server_config": "HTTP/2 and extra response headers are not offered (the endpoint serves HTTP/1.1 metrics)",
    "rate_limit": "the endpoint has its own fixed bounds (connections per address, password-check budget)",
    "tls_server_config.cipher_suites": "OpenSSL's default cipher suites are used",
    "tls_server_config.curve_preferences": "OpenSSL's default curves are used",
    "tls_server_config.prefer_server_cipher_suites": "OpenSSL's default order is used",
}
"""Toolkit keys read and ignored with a warning (ignoring them loosens nothing), and why."""
REFUSED_TLS_KEYS = {
    "cert": "a certificate file in cert_file (inline PEM is not supported)",
    "key": "a key file in key_file (inline PEM is not supported)",
    "client_ca": "a CA file in client_ca_file (inline PEM is not supported)",
    "client_allowed_sans": "no client_allowed_sans (not supported; ignoring it would admit every client the CA signed)",
}


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """``tls_server_config``: the server's PEM certificate and key, how clients are checked, the TLS versions."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, client_ca_file: str = "") -> TlsServerConfig:
        """A certificate and key; with ``client_ca_file``, clients must present a certificate that CA signed."""
        auth = REQUIRE_CLIENT_CERT if client_ca_file else "NoClientCert"
        return cls(cert_file, key_file, auth, client_ca_file)

    @property
    def requires_client_cert(self) -> bool:
        """True when every client must present a certificate the client CA signed (mTLS)."""
        return self.client_auth_type == REQUIRE_CLIENT_CERT

    def files(self) -> tuple[str, ...]:
        """The files the context is built from."""
        return (self.cert_file, self.key_file, *((self.client_ca_file,) if self.client_ca_file else ()))


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A validated web config: TLS (None: plain HTTP) and the basic-auth users (none: no basic auth).

    ``path`` is the web-config file ("" for one made from the deprecated ``[metrics]`` keys,
    whose keys ``legacy`` names in messages); ``ignored`` lists the toolkit keys ignored.
    """

    source: str
    tls: TlsServerConfig | None = None
    users: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    path: str = ""
    legacy: bool = False

    @property
    def basic_auth(self) -> bool:
        """True when a user name and password are asked for."""
        return bool(self.users)

    def key(self, name: str) -> str:
        """The key path of the TLS setting ``name`` (a TlsServerConfig field) in messages."""
        if not self.legacy:
            return f"tls_server_config.{name}"
        return "metrics." + {"cert_file": "tls_cert_file", "key_file": "tls_key_file"}.get(name, "tls_client_ca_file")

    def watched(self) -> tuple[str, ...]:
        """The files whose change means the config in force may have changed."""
        own = (self.path,) if self.path else ()
        return own + (self.tls.files() if self.tls is not None else ())


# --------------------------------------------------------------------------- YAML


def parse_yaml(data: bytes, source: str) -> Any:
    """The YAML document in ``data`` (UTF-8); ConfigError naming ``source`` when it is not one."""
    from governor import strictyaml  # here: PyYAML loads only when a web-config file is used (about 2 MiB)

    return strictyaml.parse_yaml(data, source)


# --------------------------------------------------------------------------- schema


def _path(value: Any, key: str, base_dir: Path, out: Issues) -> str | None:
    """A file name (relative ones taken from ``base_dir``, as the toolkit does); None after an issue."""
    if not isinstance(value, str) or not value or "\x00" in value:
        out.add(key, "a file name (a non-empty string)", describe(value))
        return None
    return str(base_dir / value) if not os.path.isabs(value) else value


def _tls(value: Any, base_dir: Path, out: Issues, ignored: list[str]) -> TlsServerConfig | None:
    if value is None or value == {}:
        return None  # as the toolkit: an empty tls_server_config is plain HTTP
    if not isinstance(value, dict):
        out.add("tls_server_config", "a mapping (cert_file, key_file, ...)", describe(value))
        return None
    found: dict[str, str] = {}
    for name, item in value.items():
        key = f"tls_server_config.{short(str(name))}"
        if name in ("cert_file", "key_file", "client_ca_file"):
            path = _path(item, key, base_dir, out)
            if path is not None:
                found[name] = path
        elif name == "client_auth_type":
            if item in UNVERIFIED_CLIENT_AUTH:
                out.add(
                    key,
                    "NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert "
                    f"({item} takes a client certificate without verifying it: not supported)",
                    describe(item),
                )
            elif not isinstance(item, str) or item not in CLIENT_AUTH_TYPES:
                out.add(key, "one of " + ", ".join(CLIENT_AUTH_TYPES), describe(item))
            else:
                found[name] = item
        elif name in ("min_version", "max_version"):
            if not isinstance(item, str) or item not in TLS_VERSIONS:
                out.add(key, "one of " + ", ".join(TLS_VERSIONS), describe(item))
            else:
                found[name] = item
        elif f"tls_server_config.{name}" in IGNORED_KEYS:
            ignored.append(f"tls_server_config.{name}")
        elif name in REFUSED_TLS_KEYS:
            out.add(key, REFUSED_TLS_KEYS[name], "the key present")
        else:
            unknown(key, str(name), [*TLS_KEYS, *REFUSED_TLS_KEYS], out)
    for required in ("cert_file", "key_file"):
        if required not in value:
            out.add(f"tls_server_config.{required}", "a PEM file name (cert_file and key_file make TLS)", "nothing")
    if out.issues or "cert_file" not in found or "key_file" not in found:
        return None
    tls = TlsServerConfig(**found)
    _tls_contradictions(tls, out)
    return tls


def _tls_contradictions(tls: TlsServerConfig, out: Issues) -> None:
    if tls.client_ca_file and tls.client_auth_type == "NoClientCert":
        # The toolkit's own rule: a CA without a policy that uses it is a mistake.
        out.add(
            "tls_server_config.client_auth_type",
            "RequireAndVerifyClientCert (or VerifyClientCertIfGiven), since client_ca_file is set",
            describe(tls.client_auth_type),
        )
    if tls.client_auth_type != "NoClientCert" and not tls.client_ca_file:
        out.add(
            "tls_server_config.client_ca_file",
            f"the CA that signs client certificates, since client_auth_type is {tls.client_auth_type}",
            "nothing",
        )
    if TLS_VERSIONS[tls.max_version] < TLS_VERSIONS[tls.min_version]:
        out.add("tls_server_config.max_version", f"a version at least min_version ({tls.min_version})", tls.max_version)


def _users(value: Any, out: Issues) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        out.add("basic_auth_users", "a mapping of user name to bcrypt hash", describe(value))
        return ()
    users = []
    for name, hashed in value.items():
        key = f"basic_auth_users.{short(str(name))}"
        if not isinstance(name, str) or not name or ":" in name or not name.isprintable():
            out.add(key, "a user name: a non-empty string without ':' or control characters", describe(name))
            continue
        if not isinstance(hashed, str):
            out.add(key, "a bcrypt hash (a string; quote it if YAML reads it as something else)", type(hashed).__name__)
            continue
        try:
            parse_bcrypt_hash(hashed)
        except ValueError as exc:
            # Never echoed: it may be a password pasted where the hash belongs.
            out.add(key, "a bcrypt hash such as $2y$10$... (htpasswd -nBC 10 USER)", f"a value that is {exc}")
            continue
        users.append((name, hashed))
    return tuple(users)


def parse_web_config(document: Any, source: str, base_dir: Path) -> WebConfig:
    """Validate a parsed web-config document (no file is read); ConfigError listing every problem."""
    out = Issues(source)
    if not isinstance(document, dict) or not document:
        got = "an empty document" if document is None or document == {} else describe(document)
        expected = (
            "a mapping with tls_server_config and/or basic_auth_users (an empty file would serve "
            "without protection: to do that, set no web-config file)"
        )
        raise ConfigError([ConfigIssue(source, "", expected, got)])
    ignored: list[str] = []
    tls: TlsServerConfig | None = None
    users: tuple[tuple[str, str], ...] = ()
    for name, value in document.items():
        if name == "tls_server_config":
            tls = _tls(value, base_dir, out, ignored)
        elif name == "basic_auth_users":
            users = _users(value, out)
        elif name in IGNORED_KEYS:
            ignored.append(str(name))
        else:
            unknown(short(str(name)), str(name), [*TOP_KEYS, "http_server_config", "rate_limit"], out)
    if out.issues:
        raise ConfigError(out.issues)
    return WebConfig(source, tls, users, tuple(ignored), path=source)


def exposed_secrets(config: WebConfig) -> tuple[str, ...]:
    """The secrets ``config`` reads that users other than the owner may read: the TLS private
    key (anyone who reads it can answer scrapes as this endpoint, from a port taken first)
    and a web-config file with basic-auth users (its bcrypt hashes can be cracked offline).
    One line per file, naming the key, the file and its mode; empty when none is exposed or
    a file cannot be stat'ed (reading it reports that)."""
    secrets: list[tuple[str, str]] = []
    if config.tls is not None:
        secrets.append((config.key("key_file"), config.tls.key_file))
    if config.users and config.path:
        secrets.append(("basic_auth_users", config.path))
    out = []
    for key, path in secrets:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            out.append(f"{key}: {path} is readable by group or others (mode {mode:o}; chmod go-r)")
    return tuple(out)


def read_web_config(path: Path | str, *, trust_euid: int | None = None) -> WebConfig:
    """Read and validate the web-config file at ``path`` without opening the files it names
    (what ``status`` needs to find the certificate); ConfigError naming every problem."""
    path = Path(path)
    with _opened(str(path), "", str(path), trust_euid, MAX_WEB_CONFIG_BYTES) as (_, fd):
        data = _read_fd(fd, MAX_WEB_CONFIG_BYTES)
    if len(data) > MAX_WEB_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(str(path), "", f"a file of at most {MAX_WEB_CONFIG_BYTES} bytes", "more")])
    try:
        return parse_web_config(parse_yaml(data, str(path)), str(path), path.parent)
    except ConfigError:
        raise
    except Exception as exc:  # whatever a hostile file triggers is its error
        detail = short(f"{type(exc).__name__}: {exc}", 120)
        raise ConfigError([ConfigIssue(str(path), "", "a web-config file the governor can read", detail)]) from None


def load_web_config(path: Path | str, *, trust_euid: int | None = None) -> WebConfig:
    """Read and validate the web-config file and load the TLS files it names, as the endpoint will."""
    config = read_web_config(path, trust_euid=trust_euid)
    if config.tls is not None:
        build_tls_context(config, trust_euid=trust_euid)
    return config


def from_metrics_keys(
    source: str, cert_file: str, key_file: str, client_ca_file: str, username: str, password_hash: str
) -> WebConfig | None:
    """The web config the deprecated ``[metrics]`` TLS and basic-auth keys describe (None when unset)."""
    tls = TlsServerConfig.from_files(cert_file, key_file, client_ca_file) if cert_file and key_file else None
    users = ((username, password_hash),) if username and password_hash else ()
    if tls is None and not users:
        return None
    return WebConfig(f"{source} [metrics]", tls, users, legacy=True)


def password_hashes(config: WebConfig) -> dict[str, Any]:
    """User name -> parsed hash (bcrypt; the deprecated keys may hold scrypt too)."""
    parse = parse_password_hash if config.legacy else parse_bcrypt_hash
    return {user: parse(hashed) for user, hashed in config.users}


# --------------------------------------------------------------------------- TLS


def _no_passphrase() -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on a terminal


@contextlib.contextmanager
def _opened(
    path: str, key: str, source: str, trust_euid: int | None, max_bytes: int = MAX_PEM_BYTES
) -> Iterator[tuple[str, int]]:
    """(a name that opens this very file, its descriptor): a regular file of at most ``max_bytes``,
    owned by root and writable by no one else when ``trust_euid`` is 0 (the config's rule).

    The checks are made on the descriptor, and a file is loaded through /proc/self/fd/N, so
    a file swapped in between is never the one loaded. Symbolic links are followed (only
    root can place one where root-owned files point). ConfigError at ``key`` of ``source``.
    """

    def issue(expected: str, got: str) -> ConfigError:
        return ConfigError([ConfigIssue(source, key, expected, f"{path!r}: {got}" if key else got)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise issue("an existing file", "no such file") from None
    except PermissionError:
        raise issue("a readable file", "permission denied") from None
    except OSError as exc:
        raise issue("a readable file", exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise issue("a regular file", "a directory, device, pipe or socket")
        if info.st_size > max_bytes:
            raise issue(f"a file of at most {max_bytes} bytes", f"{info.st_size} bytes (refused unread)")
        if trust_euid == 0:
            problems = root_trust_problems(info)
            if problems:
                raise issue(
                    "a file owned by root and writable only by root (chown root:root, chmod go-w)",
                    " and ".join(problems),
                )
            swappable = untrusted_ancestor(Path(path))
            if swappable is not None:  # its owner could put a link to any root-owned file in its place
                raise issue("a file below directories only root may change", swappable)
        by_fd = f"/proc/self/fd/{fd}"
        yield (by_fd if os.path.exists(by_fd) else path), fd
    finally:
        os.close(fd)


def _read_fd(fd: int, max_bytes: int = MAX_PEM_BYTES) -> bytes:
    """The open file's content, read up to one byte past ``max_bytes`` (so a file that grew past
    the cap after its fstat is seen to be too large)."""
    chunks, left = [], max_bytes + 1
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def build_tls_context(config: WebConfig, *, trust_euid: int | None = None) -> ssl.SSLContext:
    """A server context for ``config.tls`` (which must be set), built with the standard library;
    ConfigError naming the key whose file is missing, untrusted, not PEM or not matching."""
    tls = config.tls
    if tls is None:
        raise ValueError("no tls_server_config")
    source = config.source if not config.path else config.path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    except ValueError as exc:  # an OpenSSL built without that version
        issue = ConfigIssue(source, config.key("min_version"), "a TLS version OpenSSL offers", str(exc))
        raise ConfigError([issue]) from None
    with (
        _opened(tls.cert_file, config.key("cert_file"), source, trust_euid) as (cert, _),
        _opened(tls.key_file, config.key("key_file"), source, trust_euid) as (key, _),
    ):
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [
                    ConfigIssue(
                        source,
                        config.key("cert_file"),
                        f"a PEM certificate and its matching unencrypted private key ({config.key('key_file')})",
                        describe(str(exc)),
                    )
                ]
            ) from None
    if tls.client_ca_file:
        with _opened(tls.client_ca_file, config.key("client_ca_file"), source, trust_euid) as (_, fd):
            pem = _read_fd(fd).decode("ascii", "replace")
        try:
            context.load_verify_locations(cadata=pem)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            key = config.key("client_ca_file")
            raise ConfigError([ConfigIssue(source, key, "a PEM CA certificate file", describe(str(exc)))]) from None
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    return context


def file_states(paths: Sequence[str]) -> tuple[tuple[Any, ...], ...]:
    """A cheap fingerprint of ``paths``: device, inode, size, mtime and ctime of each (what a
    replacement or an edit changes), or the error that stat met."""
    states: list[tuple[Any, ...]] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            states.append((path, "error", exc.errno))
            continue
        states.append((path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(states)
