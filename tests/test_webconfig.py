"""The exporter-toolkit web-config file: schema, TLS files, real htpasswd and curl, rotation without restart."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge

from governor import auth
from governor.cli import main
from governor.config import ConfigError, MetricsConfig, check_metrics, parse_config
from governor.httpserver import LiveWebConfig, MetricsServer
from governor.webconfig import (
    IGNORED_KEYS,
    MAX_WEB_CONFIG_BYTES,
    TLS_VERSIONS,
    build_tls_context,
    exposed_secrets,
    load_web_config,
    parse_web_config,
    parse_yaml,
    read_web_config,
)
from tests.support import free_port, openssl_self_signed, require_tool, wait_for

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple"
TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Pair:
    """A self-signed certificate for 127.0.0.1 and its key."""

    cert: Path
    key: Path

    def der_sha256(self) -> str:
        """The SHA-256 of the certificate's DER form (what a TLS client receives)."""
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        return hashlib.sha256(der).hexdigest()


def make_pair(where: Path, name: str) -> Pair:
    """A new certificate and key, made by openssl, under ``where``."""
    openssl = require_tool("openssl")
    where.mkdir(parents=True, exist_ok=True)
    pair = Pair(where / f"{name}.crt", where / f"{name}.key")
    openssl_self_signed(openssl, pair.cert, pair.key, name)
    return pair


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Pair]:
    """Two different server certificates (one to start with, one to rotate to)."""
    where = tmp_path_factory.mktemp("pki")
    return make_pair(where, "first"), make_pair(where, "second")


@pytest.fixture(scope="module")
def htpasswd_hash() -> str:
    """PASSWORD hashed by the real `htpasswd -B` (apache2-utils), cost 10, as the toolkit's docs show."""
    htpasswd = require_tool("htpasswd")
    line = subprocess.run(
        [htpasswd, "-nbBC", "10", "prometheus", PASSWORD], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    user, _, hashed = line.partition(":")
    assert user == "prometheus" and hashed.startswith("$2y$10$"), line
    return hashed


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    """``text`` into ``path`` with ``mode``."""
    path.write_text(text)
    path.chmod(mode)
    return path


def issues(text: str, tmp_path: Path) -> dict[str, str]:
    """The problems of a web-config text: key -> 'expected ..., got ...'."""
    path = write(tmp_path / "web-config.yml", text)
    with pytest.raises(ConfigError) as caught:
        read_web_config(path)
    assert all(i.file == str(path) for i in caught.value.issues)
    return {i.key: f"expected {i.expected}, got {i.got}" for i in caught.value.issues}


def peer_sha256(port: int, *, version: ssl.TLSVersion | None = None) -> str:
    """The SHA-256 of the DER certificate a new TLS connection to 127.0.0.1:port is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only looking at which certificate is served
    if version is not None:
        context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def tiny_registry() -> CollectorRegistry:
    """A registry with one known series."""
    registry = CollectorRegistry()
    Gauge("webconfig_test_up", "Always 1.", registry=registry).set(1)
    return registry


class Recorder:
    """A structlog-shaped logger that keeps the events it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _keep(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._keep("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._keep("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._keep("error", event, **fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        """The fields of every event called ``event``."""
        return [fields for _, name, fields in self.events if name == event]


def swap_in(source: Pair, target: Pair) -> None:
    """Replace ``target``'s certificate and key with ``source``'s, each by an atomic rename."""
    for src, dst in ((source.cert, target.cert), (source.key, target.key)):
        staged = dst.with_suffix(dst.suffix + ".new")
        shutil.copyfile(src, staged)
        staged.chmod(0o600 if dst == target.key else 0o644)
        os.replace(staged, dst)


# --------------------------------------------------------------------------- the schema


class TestSchema:
    """A strict reading of the toolkit's format: every problem names the file and the key."""

    def test_the_toolkit_sample_is_read(self, tmp_path: Path, htpasswd_hash: str) -> None:
        """The toolkit's own sample (relative TLS files, two users, rate_limit) is read; rate_limit is ignored."""
        text = (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            f"basic_auth_users:\n  alice: {htpasswd_hash}\n  bob: '{htpasswd_hash}'\n"
            'rate_limit:\n  interval: "1s"\n  burst: 20\n'
        )
        config = read_web_config(write(tmp_path / "web-config.yml", text))
        assert config.tls is not None
        assert (config.tls.cert_file, config.tls.key_file) == (
            str(tmp_path / "server.crt"),
            str(tmp_path / "server.key"),
        )
        assert (config.tls.client_auth_type, config.tls.min_version, config.tls.max_version) == (
            "NoClientCert",
            "TLS12",
            "TLS13",
        )
        assert [user for user, _ in config.users] == ["alice", "bob"]
        assert config.ignored == ("rate_limit",)

    def test_the_shipped_sample_is_valid(self) -> None:
        """config/examples/web-config.yml parses: TLS files beside it, one user whose hash nobody can answer."""
        sample = REPO / "config" / "examples" / "web-config.yml"
        config = read_web_config(sample)
        assert config.tls is not None and config.tls.cert_file == str(sample.parent / "tls" / "cert.pem")
        ((user, hashed),) = config.users
        assert user == "prometheus" and not auth.verify_password("", hashed) and config.ignored == ()

    def test_unknown_key_is_an_error_with_a_suggestion(self, tmp_path: Path) -> None:
        """A misspelt top-level key is refused with did-you-mean, as is an unknown TLS key."""
        found = issues(
            "basic_auth_user:\n  a: b\ntls_server_config:\n  cert_file: c\n  key_file: k\n  certfile: x\n", tmp_path
        )
        assert "did you mean 'basic_auth_users'" in found["basic_auth_user"]
        assert "did you mean 'cert_file'" in found["tls_server_config.certfile"]

    @pytest.mark.parametrize(
        ("text", "key", "words"),
        [
            ("basic_auth_users: [a, b]\n", "basic_auth_users", "a mapping of user name to bcrypt hash"),
            ("tls_server_config: yes\n", "tls_server_config", "a mapping"),
            ("tls_server_config:\n  cert_file: 5\n  key_file: k\n", "tls_server_config.cert_file", "a file name"),
            ("tls_server_config:\n  cert_file: c\n", "tls_server_config.key_file", "cert_file and key_file"),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS14\n",
                "tls_server_config.min_version",
                "one of TLS10, TLS11, TLS12, TLS13",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAnyClientCert\n",
                "tls_server_config.client_auth_type",
                "without verifying it",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: Sometimes\n",
                "tls_server_config.client_auth_type",
                "one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca\n",
                "tls_server_config.client_auth_type",
                "since client_ca_file is set",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n",
                "tls_server_config.client_ca_file",
                "the CA that signs client certificates",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS13\n  max_version: TLS12\n",
                "tls_server_config.max_version",
                "at least min_version",
            ),
            ("tls_server_config:\n  cert_file: c\n  key_file: k\n  cert: PEM\n", "tls_server_config.cert", "inline"),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_allowed_sans: [a]\n",
                "tls_server_config.client_allowed_sans",
                "would admit every client",
            ),
            ("basic_auth_users:\n  'a:b': x\n", "basic_auth_users.a:b", "without ':'"),
            ("basic_auth_users:\n  1: x\n", "basic_auth_users.1", "a user name"),
            ("basic_auth_users:\n  a: 12\n", "basic_auth_users.a", "a bcrypt hash"),
        ],
    )
    def test_bad_values_name_the_key(self, tmp_path: Path, text: str, key: str, words: str) -> None:
        """Wrong types, bad values and contradictions are errors at the key, saying what was expected."""
        found = issues(text, tmp_path)
        assert key in found, found
        assert words in found[key]

    def test_a_password_where_the_hash_belongs_is_not_echoed(self, tmp_path: Path) -> None:
        """A plain password, an scrypt hash or a bcrypt hash costing 31 is refused, and never printed back."""
        scrypt_hash = auth.hash_password_scrypt("x", n=1024)
        costly = auth.hash_password("x", cost=4).replace("$04$", "$31$")
        text = f"basic_auth_users:\n  a: hunter2hunter2\n  b: '{scrypt_hash}'\n  c: '{costly}'\n"
        path = write(tmp_path / "web-config.yml", text)
        with pytest.raises(ConfigError) as caught:
            read_web_config(path)
        message = str(caught.value)
        assert {i.key for i in caught.value.issues} == {
            "basic_auth_users.a",
            "basic_auth_users.b",
            "basic_auth_users.c",
        }
        assert "hunter2" not in message and scrypt_hash not in message and costly not in message
        assert "a bcrypt cost of 31" in message

    @pytest.mark.parametrize(
        ("data", "words"),
        [
            (b"", "an empty document"),
            (b"# only a comment\n", "an empty document"),
            (b"{}\n", "an empty document"),
            (b"- a\n- b\n", "a mapping with tls_server_config"),
            (b"a: &x [1]\nb: *x\n", "aliases"),
            (b"basic_auth_users:\n  a: x\n  a: y\n", "duplicate key 'a'"),
            (b"basic_auth_users: [\n", "valid YAML"),
            (b"basic_auth_users:\n  a: \xff\n", "UTF-8"),
            (b"basic_auth_users:\n  a: b\x00\n", "NUL"),
            (b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested"),
        ],
    )
    def test_unusable_documents_are_errors(self, tmp_path: Path, data: bytes, words: str) -> None:
        """Empty, non-mapping, aliased, duplicated, broken, binary or deeply nested YAML is one clear error."""
        path = tmp_path / "web-config.yml"
        path.write_bytes(data)
        with pytest.raises(ConfigError) as caught:
            read_web_config(path)
        assert str(path) in str(caught.value) and words in str(caught.value), str(caught.value)

    def test_ignored_keys_are_listed_with_a_reason(self, tmp_path: Path) -> None:
        """http_server_config and TLS cipher settings are read and ignored, each with its reason in the table."""
        text = (
            "http_server_config:\n  http2: false\n"
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"
            "  prefer_server_cipher_suites: true\n  curve_preferences: [X25519]\n"
        )
        config = read_web_config(write(tmp_path / "w.yml", text))
        assert set(config.ignored) == {
            "http_server_config",
            "tls_server_config.cipher_suites",
            "tls_server_config.prefer_server_cipher_suites",
            "tls_server_config.curve_preferences",
        }
        assert set(config.ignored) <= set(IGNORED_KEYS)

    def test_parse_yaml_is_pyyaml_safe(self) -> None:
        """A Python object tag is refused (the safe loader builds no objects)."""
        with pytest.raises(ConfigError, match="valid YAML"):
            parse_yaml(b"a: !!python/object/apply:os.system [true]\n", "f")

    def test_parse_refuses_a_non_string_top_key(self, tmp_path: Path) -> None:
        """A key that YAML reads as a number is an unknown key, not a crash."""
        with pytest.raises(ConfigError, match="unknown key '3'"):
            parse_web_config({3: "x"}, "f", tmp_path)


class TestFiles:
    """The web-config file and the files it names are read as untrusted input."""

    def test_large_file_is_refused_unread(self, tmp_path: Path) -> None:
        """A web-config over MAX_WEB_CONFIG_BYTES is refused before it is parsed."""
        path = tmp_path / "big.yml"
        path.write_bytes(b"#" * (MAX_WEB_CONFIG_BYTES + 1))
        with pytest.raises(ConfigError, match=f"at most {MAX_WEB_CONFIG_BYTES} bytes"):
            read_web_config(path)

    def test_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO in place of the file (or of its certificate) is refused at once."""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(ConfigError, match="a regular file"):
            read_web_config(fifo)
        text = f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n"
        with pytest.raises(ConfigError, match=r"tls_server_config\.cert_file: expected a regular file"):
            load_web_config(write(tmp_path / "w.yml", text))

    def test_untrusted_files_are_refused_when_root(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> None:
        """Running as root, a group-writable web-config or key (or one another user owns) is refused."""
        first, _ = pairs
        path = write(tmp_path / "w.yml", "basic_auth_users:\n  a: '$2y$04$" + "a" * 53 + "'\n", mode=0o664)
        with pytest.raises(ConfigError, match="writable by group or others"):
            read_web_config(path, trust_euid=0)
        read_web_config(path, trust_euid=1000)  # the rule is root's
        key = tmp_path / "key.pem"
        shutil.copyfile(first.key, key)
        key.chmod(0o620)
        text = f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {key}\n"
        with pytest.raises(ConfigError, match=r"tls_server_config\.key_file: expected a file owned by root"):
            load_web_config(write(tmp_path / "t.yml", text), trust_euid=0)
        if os.geteuid() == 0:
            key.chmod(0o600)
            os.chown(key, 65534, 65534)
            with pytest.raises(ConfigError, match="owned by uid 65534"):
                load_web_config(tmp_path / "t.yml", trust_euid=0)

    def test_mismatched_key_and_bad_ca_name_their_keys(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> None:
        """Another certificate's key fails at cert_file; a CA file without a certificate fails at client_ca_file."""
        first, second = pairs
        mismatched = write(
            tmp_path / "m.yml", f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {second.key}\n"
        )
        with pytest.raises(ConfigError) as caught:
            load_web_config(mismatched)
        assert [i.key for i in caught.value.issues] == ["tls_server_config.cert_file"]
        assert "matching unencrypted private key" in caught.value.issues[0].expected
        not_ca = write(tmp_path / "ca.pem", "not a certificate\n")
        text = (
            f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {first.key}\n"
            f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {not_ca}\n"
        )
        with pytest.raises(ConfigError) as caught:
            load_web_config(write(tmp_path / "c.yml", text))
        assert [i.key for i in caught.value.issues] == ["tls_server_config.client_ca_file"]

    def test_versions_bound_the_handshake(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> None:
        """min_version TLS13 refuses a TLS 1.2 client; max_version TLS12 makes a TLS 1.3 client fail."""
        first, _ = pairs
        for bounds, refused, accepted in (
            ("min_version: TLS13", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
            ("max_version: TLS12", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2),
        ):
            text = f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {first.key}\n  {bounds}\n"
            web = LiveWebConfig.from_file(str(write(tmp_path / "v.yml", text)), log=Recorder())
            server = MetricsServer("127.0.0.1", 0, tiny_registry(), web=web)
            try:
                with pytest.raises((ssl.SSLError, OSError)):
                    peer_sha256(server.port, version=refused)
                assert peer_sha256(server.port, version=accepted) == first.der_sha256()
            finally:
                server.close()
        assert set(TLS_VERSIONS) == {"TLS10", "TLS11", "TLS12", "TLS13"}

    def test_secrets_readable_by_others_are_named(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> None:
        """A TLS key or a basic-auth file readable by group or others is named with its key and mode; 0600 is not."""
        first, _ = pairs
        key = tmp_path / "server.key"
        shutil.copyfile(first.key, key)
        key.chmod(0o640)
        hashed = auth.hash_password("x", cost=4)
        text = f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {key}\nbasic_auth_users:\n  a: '{hashed}'\n"
        web = read_web_config(write(tmp_path / "w.yml", text, mode=0o604))
        assert exposed_secrets(web) == (
            f"tls_server_config.key_file: {key} is readable by group or others (mode 640; chmod go-r)",
            f"basic_auth_users: {tmp_path / 'w.yml'} is readable by group or others (mode 604; chmod go-r)",
        )
        key.chmod(0o600)
        (tmp_path / "w.yml").chmod(0o600)
        assert exposed_secrets(web) == ()
        no_users = read_web_config(write(tmp_path / "t.yml", text.split("basic_auth_users")[0], mode=0o644))
        assert exposed_secrets(no_users) == ()  # a world-readable file with no hashes in it holds no secret

    def test_exposed_secret_is_logged_at_start_and_when_a_change_exposes_it(self, tmp_path: Path) -> None:
        """The endpoint warns once at start, not again while unchanged, and again when a chmod exposes the file."""
        hashed = auth.hash_password("x", cost=4)
        web = write(tmp_path / "w.yml", f"basic_auth_users:\n  a: '{hashed}'\n", mode=0o600)
        now = [0.0]
        log = Recorder()
        live = LiveWebConfig(
            lambda: read_web_config(web), path=str(web), log=log, check_interval_s=1.0, clock=lambda: now[0]
        )
        assert log.named("web_config_secret_exposed") == []
        web.chmod(0o644)
        now[0] = 5.0
        live.current()
        (warned,) = log.named("web_config_secret_exposed")
        assert warned["exposed"] == [f"basic_auth_users: {web} is readable by group or others (mode 644; chmod go-r)"]
        write(web, f"basic_auth_users:\n  b: '{hashed}'\n", mode=0o644)  # still exposed: said once
        now[0] = 10.0
        assert live.current().config.users[0][0] == "b"
        assert len(log.named("web_config_secret_exposed")) == 1
        started = Recorder()
        LiveWebConfig(lambda: read_web_config(web), path=str(web), log=started)
        assert len(started.named("web_config_secret_exposed")) == 1

    def test_build_needs_tls(self) -> None:
        """Building a context for a config without TLS is a programming error, said plainly."""
        from governor.webconfig import WebConfig

        with pytest.raises(ValueError, match="no tls_server_config"):
            build_tls_context(WebConfig("f"))


# --------------------------------------------------------------------------- the config keys


class TestConfigKeys:
    """[metrics] web_config_file, the flag, check-config and the deprecated keys."""

    def test_web_config_file_and_deprecated_keys_together_is_an_error(self, tmp_path: Path) -> None:
        """Setting web_config_file and a deprecated TLS or auth key is refused, naming web_config_file."""
        web = write(tmp_path / "w.yml", "basic_auth_users:\n  a: '" + auth.hash_password("x", cost=4) + "'\n")
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"web_config_file": str(web), "tls_cert_file": "/c", "tls_key_file": "/k"}}, "g")
        keys = [i.key for i in caught.value.issues]
        assert "metrics.web_config_file" in keys
        assert "metrics.tls_cert_file" in str(caught.value)

    def test_the_flag_goes_through_the_same_check(self, tmp_path: Path) -> None:
        """check_metrics (what `run --web.config.file` applies) reads and validates the named file."""
        broken = write(tmp_path / "w.yml", "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /k\n")
        with pytest.raises(ConfigError) as caught:
            check_metrics(MetricsConfig(web_config_file=str(broken)), "--web.config.file")
        assert [(i.file, i.key) for i in caught.value.issues] == [(str(broken), "tls_server_config.cert_file")]

    def test_status_takes_https_from_the_configs_web_config(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> None:
        """`status --config` with a web_config_file that has TLS asks for https (here: nobody listens)."""
        first, _ = pairs
        web = write(tmp_path / "w.yml", f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {first.key}\n")
        port = free_port()
        config = write(tmp_path / "g.toml", f'[metrics]\nport = {port}\nweb_config_file = "{web}"\n')
        err = io.StringIO()
        assert main(["status", "--config", str(config)], out=io.StringIO(), err=err) == 7
        assert f"https://127.0.0.1:{port}/metrics" in err.getvalue() and "connection refused" in err.getvalue()

    def test_check_config_validates_the_web_config(self, tmp_path: Path) -> None:
        """check-config of a config whose web-config is broken exits 3, naming the web-config and its key."""
        web = write(tmp_path / "w.yml", "basic_auth_users:\n  prometheus: hunter2\n")
        config = write(tmp_path / "g.toml", f'[metrics]\nweb_config_file = "{web}"\n')
        err = io.StringIO()
        assert main(["check-config", str(config), "--profile", "rtx4070"], out=io.StringIO(), err=err) == 3
        assert f"{web}: basic_auth_users.prometheus: expected a bcrypt hash" in err.getvalue()
        assert "hunter2" not in err.getvalue()

    def test_check_config_warns_about_deprecated_and_ignored_keys(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config names the deprecated [metrics] keys, and the web-config keys it ignores."""
        hashed = auth.hash_password("x", cost=4)
        old = write(
            tmp_path / "old.toml", f'[metrics]\nbasic_auth_username = "p"\nbasic_auth_password_hash = "{hashed}"\n'
        )
        assert main(["check-config", str(old), "--profile", "rtx4070"], out=io.StringIO(), err=io.StringIO()) == 0
        warned = capsys.readouterr().err
        assert "metrics.basic_auth_username, metrics.basic_auth_password_hash: deprecated" in warned
        web = write(tmp_path / "w.yml", f"basic_auth_users:\n  p: '{hashed}'\nrate_limit:\n  burst: 1\n")
        new = write(tmp_path / "new.toml", f'[metrics]\nweb_config_file = "{web}"\n')
        out = io.StringIO()
        assert main(["check-config", str(new), "--profile", "rtx4070"], out=out, err=io.StringIO()) == 0
        warned = capsys.readouterr().err
        assert f"{web}: rate_limit: ignored" in warned and "deprecated" not in warned
        assert f"{web}: basic_auth_users: {web} is readable by group or others (mode 644" in warned
        assert f'web_config_file = "{web}"' in out.getvalue()


# --------------------------------------------------------------------------- changes picked up while serving


class TestLiveReload:
    """The endpoint picks up a changed web-config or certificate on new connections, without a restart."""

    @pytest.fixture
    def served(self, tmp_path: Path, pairs: tuple[Pair, Pair]) -> Iterator[tuple[MetricsServer, Path, Pair, Recorder]]:
        """An https endpoint from a web-config naming copies of the first certificate, rechecked every 0.05 s."""
        first, _ = pairs
        live = Pair(tmp_path / "tls" / "server.crt", tmp_path / "tls" / "server.key")
        live.cert.parent.mkdir()
        swap_in(first, live)
        hashed = auth.hash_password(PASSWORD, cost=4)
        web = write(
            tmp_path / "web-config.yml",
            f"tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n"
            f"basic_auth_users:\n  prometheus: '{hashed}'\n",
        )
        log = Recorder()
        config = LiveWebConfig(lambda: read_web_config(web), path=str(web), log=log, check_interval_s=0.05)
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), web=config)
        yield server, web, live, log
        server.close()

    def test_replaced_certificate_is_served_to_new_connections(
        self, served: tuple[MetricsServer, Path, Pair, Recorder], pairs: tuple[Pair, Pair]
    ) -> None:
        """Swapping the certificate and key files: a new TLS connection sees the new certificate."""
        server, _, live, log = served
        first, second = pairs
        assert peer_sha256(server.port) == first.der_sha256()
        swap_in(second, live)
        wait_for(lambda: peer_sha256(server.port) == second.der_sha256(), 10.0, "the new certificate")
        assert log.named("web_config_reloaded") and not log.named("web_config_reload_failed")

    def test_broken_change_keeps_the_last_good_config_and_logs_once(
        self, served: tuple[MetricsServer, Path, Pair, Recorder], pairs: tuple[Pair, Pair]
    ) -> None:
        """A certificate without its key: the old one is served, one error logged; the key arriving fixes it."""
        server, _, live, log = served
        first, second = pairs
        shutil.copyfile(second.cert, live.cert)  # the key still the first's: they do not match
        # Changes are looked for when a connection comes: each poll connects.
        wait_for(lambda: bool(peer_sha256(server.port) and log.named("web_config_reload_failed")), 10.0, "the failure")
        for _ in range(5):
            assert peer_sha256(server.port) == first.der_sha256()
            time.sleep(0.06)
        (failed,) = log.named("web_config_reload_failed")
        assert "tls_server_config.cert_file" in failed["error"] and "last good" in failed["effect"]
        shutil.copyfile(second.key, live.key)
        wait_for(lambda: peer_sha256(server.port) == second.der_sha256(), 10.0, "the repaired certificate")
        assert len(log.named("web_config_reload_failed")) == 1

    def test_edited_users_apply_without_restart(self, served: tuple[MetricsServer, Path, Pair, Recorder]) -> None:
        """A user added to basic_auth_users gets in on the next connections; TLS turned off is refused."""
        server, web, _, log = served
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

        def status(user: str, password: str) -> int:
            import base64

            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=TIMEOUT_S, context=context)
            try:
                conn.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
                return conn.getresponse().status
            finally:
                conn.close()

        assert status("grafana", "other") == 401
        text = web.read_text() + f"  grafana: '{auth.hash_password('other', cost=4)}'\n"
        write(web, text)
        wait_for(lambda: status("grafana", "other") == 200, 10.0, "the new user")
        assert status("prometheus", PASSWORD) == 200
        write(web, f"basic_auth_users:\n  grafana: '{auth.hash_password('other', cost=4)}'\n")
        wait_for(lambda: bool(status("x", "y") and log.named("web_config_reload_failed")), 10.0, "TLS off refused")
        assert "restart" in log.named("web_config_reload_failed")[-1]["error"]
        assert status("prometheus", PASSWORD) == 200  # the last good config is in force

    def test_unchanged_files_are_not_read_again(self, tmp_path: Path) -> None:
        """Without a change nothing is reloaded; a check runs at most once per interval."""
        hashed = auth.hash_password("x", cost=4)
        web = write(tmp_path / "w.yml", f"basic_auth_users:\n  a: '{hashed}'\n")
        loads = []

        def load() -> Any:
            loads.append(1)
            return read_web_config(web)

        now = [0.0]
        live = LiveWebConfig(load, path=str(web), log=Recorder(), check_interval_s=1.0, clock=lambda: now[0])
        first = live.current()
        for step in range(1, 30):
            now[0] = step * 0.5
            assert live.current() is first
        assert len(loads) == 1
        write(web, f"basic_auth_users:\n  b: '{hashed}'\n")
        now[0] = 100.0
        assert live.current() is not first and live.current().config.users[0][0] == "b"
        assert len(loads) == 2


# --------------------------------------------------------------------------- acceptance with the real tools


def start_daemon(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """`gpu-governor run --simulate` with the exporter-style flags and ``extra``."""
    config = write(tmp_path / "g.toml", f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\n')
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "governor",
            "run",
            "--simulate",
            "--config",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--log.format",
            "json",
            "--log.level",
            "info",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def curl(url: str, cert: Path, *auth_args: str) -> tuple[int, str]:
    """(HTTP status, body) of a real curl GET trusting ``cert``; (0, curl's error) without an HTTP answer."""
    result = subprocess.run(
        [
            require_tool("curl"),
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(cert),
            *auth_args,
            "-w",
            "\n%{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return 0, result.stderr  # no HTTP answer (not listening yet, TLS refused)
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


class TestAcceptance:
    def test_htpasswd_hash_curl_and_status_over_tls(
        self, tmp_path: Path, pairs: tuple[Pair, Pair], htpasswd_hash: str
    ) -> None:
        """A web-config with an `htpasswd -B` hash and an openssl certificate: curl gets 401 without
        credentials and 200 with them, over TLS; `status --web.config.file` reads it; a certificate
        swapped on disk is served to the next connection by the same process."""
        first, second = pairs
        live = Pair(tmp_path / "server.crt", tmp_path / "server.key")
        swap_in(first, live)
        web = write(
            tmp_path / "web-config.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            f"basic_auth_users:\n  prometheus: {htpasswd_hash}\n",
        )
        port = free_port()
        url = f"https://127.0.0.1:{port}/metrics"
        proc = start_daemon(tmp_path, port, "--web.config.file", str(web))
        try:
            wait_for(lambda: curl(url, first.cert)[0] == 401, 30.0, "the https endpoint")
            code, body = curl(url, first.cert)
            assert code == 401 and "gpu_governor" not in body
            assert curl(url, first.cert, "-u", "prometheus:wrong")[0] == 401
            code, body = curl(url, first.cert, "-u", f"prometheus:{PASSWORD}")
            assert code == 200 and "gpu_governor_ready" in body
            command = ["status", "--url", f"127.0.0.1:{port}", "--web.config.file", str(web), "--user", "prometheus"]
            shown = subprocess.run(
                [sys.executable, "-m", "governor", *command],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "GPU_GOVERNOR_METRICS_PASSWORD": PASSWORD},
                cwd=REPO,
                check=False,
            )
            assert shown.returncode == 0, shown.stderr
            assert "NVIDIA GeForce RTX 4070" in shown.stdout
            swap_in(second, live)
            wait_for(lambda: curl(url, second.cert, "-u", f"prometheus:{PASSWORD}")[0] == 200, 15.0, "the rotation")
            assert peer_sha256(port) == second.der_sha256()
            assert proc.poll() is None  # the same process: no restart
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        listening = next(e for e in events if e["event"] == "metrics_listening")
        assert listening["url"].startswith("https://") and "basic auth" in listening["security"]
        assert any(e["event"] == "web_config_reloaded" for e in events)

    def test_our_hash_verifies_with_htpasswd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """`gpu-governor hash-password` prints a bcrypt hash that the real htpasswd accepts for the password."""
        htpasswd = require_tool("htpasswd")
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PASSWORD}\n"))
        out = io.StringIO()
        assert main(["hash-password", "--cost", "5"], out=out, err=io.StringIO()) == 0
        hashed = out.getvalue().strip()
        assert hashed.startswith("$2b$05$")
        users = write(tmp_path / "users", f"prometheus:{hashed}\n")
        ok = subprocess.run(
            [htpasswd, "-vb", str(users), "prometheus", PASSWORD], capture_output=True, timeout=60, check=False
        )
        bad = subprocess.run(
            [htpasswd, "-vb", str(users), "prometheus", "wrong"], capture_output=True, timeout=60, check=False
        )
        assert (ok.returncode, bad.returncode != 0) == (0, True)

    def test_hash_password_refuses_a_bad_cost_and_a_long_password(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--cost outside 4-14 and a password over bcrypt's 72 bytes are usage errors (exit 2)."""
        monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
        err = io.StringIO()
        assert main(["hash-password", "--cost", "31"], out=io.StringIO(), err=err) == 2
        assert "--cost: expected 4 to 14" in err.getvalue()
        monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 73 + "\n"))
        err = io.StringIO()
        assert main(["hash-password"], out=io.StringIO(), err=err) == 2
        assert "73 bytes" in err.getvalue()
        assert not auth.parse_bcrypt_hash(auth.hash_password("y" * 72, cost=4)).matches("y" * 73)
