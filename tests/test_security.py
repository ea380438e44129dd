"""Security: loopback by default, remote only when allowed, TLS and basic auth, bounded endpoint, no shell, escaping."""

from __future__ import annotations

import ast
import base64
import getpass
import http.client
import io
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor import auth, httpserver
from governor.cli import main
from governor.config import Config, ConfigError, MetricsConfig, check_metrics, is_loopback, load_config, parse_config
from governor.httpserver import BasicAuth, MetricsServer, security_warnings
from governor.metrics import build_registry
from governor.model import ProcessRow, PublishedState
from governor.webconfig import TlsServerConfig
from tests.builders import scrape_after_ticks
from tests.support import openssl_self_signed

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5.0

# Cheap hashes for tests (bcrypt cost 4, scrypt N = 1024): the cost is part of the hash, so checks use it.
PASSWORD = "correct horse battery staple"
TlsFiles = TlsServerConfig.from_files


@pytest.fixture(scope="module")
def password_hash() -> str:
    """A bcrypt hash of PASSWORD with the lowest cost, so the tests stay fast."""
    return auth.hash_password(PASSWORD, cost=4)


@pytest.fixture(scope="module")
def scrypt_hash() -> str:
    """A hash of PASSWORD in the deprecated key's scrypt format, with a low cost."""
    return auth.hash_password_scrypt(PASSWORD, n=1024)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Pki:
    """A self-signed server certificate (also the CA clients trust) and a client certificate with its CA."""

    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made with openssl (CI is Debian, where openssl is always there)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (and the cryptography package is not used here)")
    where = tmp_path_factory.mktemp("pki")
    made = Pki(where / "cert.pem", where / "key.pem", where / "client.pem", where / "client-key.pem")
    openssl_self_signed(openssl, made.cert, made.key, "gpu-governor test server")
    openssl_self_signed(openssl, made.client_cert, made.client_key, "prometheus test client")
    return made


def tiny_registry() -> CollectorRegistry:
    """A registry with one known series."""
    registry = CollectorRegistry()
    Gauge("security_test_up", "Always 1.", registry=registry).set(1)
    return registry


@dataclass(frozen=True)
class Reply:
    """An HTTP response, read whole."""

    status: int
    headers: http.client.HTTPMessage
    body: str


def fetch(
    server: MetricsServer,
    path: str = "/metrics",
    *,
    method: str = "GET",
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One request to ``server`` on loopback, bounded by TIMEOUT_S."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=TIMEOUT_S, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read().decode("utf-8", "replace"))
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    """An Authorization header."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def client_context(pki: Pki, *, with_client_cert: bool = False) -> ssl.SSLContext:
    """A client context trusting the test server certificate."""
    context = ssl.create_default_context(cafile=str(pki.cert))
    if with_client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def raw_exchange(server: MetricsServer, data: bytes) -> bytes:
    """Send raw bytes and read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_by_server_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True


@pytest.fixture
def plain_server() -> Iterator[MetricsServer]:
    """A plain HTTP endpoint on loopback with a short request timeout."""
    server = MetricsServer("127.0.0.1", 0, tiny_registry(), request_timeout_s=0.5)
    yield server
    server.close()


def write_config(tmp_path: Path, metrics: str) -> Path:
    """A config file with the given [metrics] body."""
    path = tmp_path / "governor.toml"
    path.write_text(f'state_dir = "{tmp_path}"\nruntime_dir = ""\n[metrics]\n{metrics}\n')
    path.chmod(0o644)
    return path


# --------------------------------------------------------------------------- bind address


class TestBindAddress:
    """Loopback by default; anything else only with allow_remote."""

    def test_default_bind_is_loopback(self) -> None:
        """Config() listens on 127.0.0.1 with allow_remote off."""
        metrics = Config().metrics
        assert metrics.listen_address == "127.0.0.1" and is_loopback(metrics.listen_address)
        assert metrics.allow_remote is False

    def test_shipped_config_binds_loopback(self) -> None:
        """The shipped config/governor.toml listens on loopback, allow_remote off, no TLS or auth needed."""
        metrics = load_config(REPO / "config" / "governor.toml", enforce_trust=False).metrics
        assert is_loopback(metrics.listen_address)
        assert not metrics.allow_remote

    @pytest.mark.parametrize(
        "address", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost", "::ffff:127.0.0.1"]
    )
    def test_loopback_addresses(self, address: str) -> None:
        """127.0.0.0/8, ::1 (also IPv4-mapped) and localhost count as loopback."""
        assert is_loopback(address)

    @pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.0.0.7", "192.168.1.2", "gpu-node-01", "fe80::1%lo"])
    def test_non_loopback_addresses(self, address: str) -> None:
        """Any address, the wildcard and any host name other than localhost are remote."""
        assert not is_loopback(address)

    def test_remote_bind_refused_without_allow_remote(self, tmp_path: Path) -> None:
        """check-config refuses listen_address = 0.0.0.0 without allow_remote, naming the key."""
        path = write_config(tmp_path, 'listen_address = "0.0.0.0"')
        err = io.StringIO()
        assert main(["check-config", str(path)], out=io.StringIO(), err=err) == 3
        message = err.getvalue()
        assert f"{path}: metrics.listen_address: expected a loopback address" in message
        assert "metrics.allow_remote = true" in message and "'0.0.0.0'" in message

    def test_remote_bind_accepted_with_allow_remote(self, tmp_path: Path) -> None:
        """With allow_remote = true the same file passes check-config."""
        path = write_config(tmp_path, 'listen_address = "0.0.0.0"\nallow_remote = true')
        out = io.StringIO()
        assert main(["check-config", str(path)], out=out, err=io.StringIO()) == 0
        assert "allow_remote = true" in out.getvalue()

    def test_disabled_endpoint_is_not_checked(self) -> None:
        """With metrics disabled nothing is bound, so a remote address alone is no error."""
        config = parse_config({"metrics": {"enabled": False, "listen_address": "0.0.0.0"}}, "f")
        assert config.metrics.listen_address == "0.0.0.0"

    def test_listen_flag_goes_through_the_same_check(self) -> None:
        """check_metrics (what `run` applies after --listen) refuses a remote address without allow_remote."""
        with pytest.raises(ConfigError) as caught:
            check_metrics(MetricsConfig(listen_address="0.0.0.0"), "cli")
        assert [i.key for i in caught.value.issues] == ["metrics.listen_address"]
        check_metrics(MetricsConfig(listen_address="0.0.0.0", allow_remote=True), "cli")

    def test_run_with_remote_listen_flag_exits_3(self, tmp_path: Path) -> None:
        """`run --listen 0.0.0.0:0` exits 3 naming metrics.listen_address, before binding anything."""
        config = write_config(tmp_path, "")
        result = subprocess.run(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config), "--listen", "0.0.0.0:0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )
        assert result.returncode == 3, result.stderr
        assert "metrics.listen_address" in result.stderr

    def test_example_server_config_allows_remote_explicitly(self) -> None:
        """The h100-server example listens on 0.0.0.0 and says allow_remote = true."""
        metrics = load_config(REPO / "config" / "examples" / "h100-server.toml", enforce_trust=False).metrics
        assert metrics.listen_address == "0.0.0.0" and metrics.allow_remote

    def test_remote_plain_endpoint_is_warned_about(self) -> None:
        """A remote endpoint without TLS or auth yields two warnings; loopback or TLS plus auth none."""
        assert len(security_warnings("0.0.0.0", None, False)) == 2
        assert security_warnings("127.0.0.1", None, False) == ()
        assert security_warnings("0.0.0.0", TlsFiles("c", "k"), True) == ()
        assert security_warnings("0.0.0.0", TlsFiles("c", "k", "ca"), False) == ()


# --------------------------------------------------------------------------- config keys


class TestSecurityKeys:
    """TLS and basic-auth keys: pairs, readable files, well-formed hashes."""

    def test_cert_without_key_names_the_missing_key(self) -> None:
        """tls_cert_file alone is an issue on metrics.tls_key_file."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"tls_cert_file": "/x.pem"}}, "f")
        assert "metrics.tls_key_file" in [i.key for i in caught.value.issues]

    def test_missing_tls_file_is_reported(self, tmp_path: Path) -> None:
        """A TLS file that does not exist is named with 'no such file'."""
        missing = tmp_path / "nope.pem"
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"tls_cert_file": str(missing), "tls_key_file": str(missing)}}, "f")
        issues = {i.key: i for i in caught.value.issues}
        assert "no such file" in issues["metrics.tls_cert_file"].got
        assert issues["metrics.tls_cert_file"].expected == "a readable file"

    def test_client_ca_needs_tls(self, pki: Pki) -> None:
        """tls_client_ca_file without a certificate and key is an issue."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"tls_client_ca_file": str(pki.cert)}}, "f")
        assert [i.key for i in caught.value.issues] == ["metrics.tls_client_ca_file"]

    def test_mismatched_key_is_reported(self, pki: Pki) -> None:
        """A certificate with another certificate's key fails validation at load, not at first scrape."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.client_key)}}, "f")
        assert [i.key for i in caught.value.issues] == ["metrics.tls_cert_file"]

    def test_encrypted_key_is_reported_without_prompting(self, pki: Pki, tmp_path: Path) -> None:
        """A passphrase-protected key is an issue (the daemon cannot type a passphrase)."""
        openssl = shutil.which("openssl")
        assert openssl is not None
        encrypted = tmp_path / "enc.pem"
        subprocess.run(
            [openssl, "pkey", "-in", str(pki.key), "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"tls_cert_file": str(pki.cert), "tls_key_file": str(encrypted)}}, "f")
        assert "unencrypted private key" in caught.value.issues[0].expected

    def test_valid_tls_and_auth_keys_load(self, pki: Pki, password_hash: str) -> None:
        """Readable matching files and a well-formed hash validate, and the properties say so."""
        metrics = parse_config(
            {
                "metrics": {
                    "tls_cert_file": str(pki.cert),
                    "tls_key_file": str(pki.key),
                    "tls_client_ca_file": str(pki.client_cert),
                    "basic_auth_username": "prometheus",
                    "basic_auth_password_hash": password_hash,
                }
            },
            "f",
        ).metrics
        assert metrics.tls and metrics.basic_auth

    def test_bad_hash_is_reported_without_echoing_it(self) -> None:
        """A password pasted where the hash belongs is refused and never printed back."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"basic_auth_username": "p", "basic_auth_password_hash": "hunter2"}}, "f")
        (issue,) = caught.value.issues
        assert issue.key == "metrics.basic_auth_password_hash"
        assert "hunter2" not in str(caught.value)

    def test_username_and_hash_go_together(self, password_hash: str) -> None:
        """A hash without a user name is an issue on metrics.basic_auth_username."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"basic_auth_password_hash": password_hash}}, "f")
        assert [i.key for i in caught.value.issues] == ["metrics.basic_auth_username"]

    def test_username_with_colon_is_refused(self, password_hash: str) -> None:
        """A user name containing ':' cannot be sent in basic auth and is refused."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"basic_auth_username": "a:b", "basic_auth_password_hash": password_hash}}, "f")
        assert [i.key for i in caught.value.issues] == ["metrics.basic_auth_username"]


# --------------------------------------------------------------------------- TLS


class TestTls:
    """HTTPS with a context the governor builds itself (standard library only)."""

    def test_tls_fetch_with_trusting_context_works(self, pki: Pki) -> None:
        """A client trusting the certificate gets the metrics over https."""
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=TlsFiles(str(pki.cert), str(pki.key)))
        try:
            assert server.url.startswith("https://127.0.0.1:")
            reply = fetch(server, context=client_context(pki))
            assert reply.status == 200 and "security_test_up 1.0" in reply.body
        finally:
            server.close()

    def test_no_private_prometheus_client_name_is_used(self) -> None:
        """No module of governor/ imports or reads a private (underscore) name of prometheus_client."""
        found = []
        for path in sorted((REPO / "governor").rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            aliases = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"):
                    found += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
                    aliases |= {a.asname or a.name for a in node.names}
                elif isinstance(node, ast.Import):
                    aliases |= {a.asname or a.name for a in node.names if a.name.startswith("prometheus_client")}
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                    found += [f"{path.name}: {node.value.id}.{node.attr}"] if node.attr.startswith("_") else []
                if isinstance(node, ast.Constant) and node.value == "_get_ssl_ctx":
                    found.append(f"{path.name}: '_get_ssl_ctx'")
        assert found == []

    def test_plain_http_against_tls_port_fails(self, pki: Pki) -> None:
        """A plain-HTTP request to the TLS port gets no metrics."""
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=TlsFiles(str(pki.cert), str(pki.key)))
        try:
            with pytest.raises((http.client.HTTPException, OSError)):
                fetch(server)
        finally:
            server.close()

    def test_untrusting_client_fails(self, pki: Pki) -> None:
        """A client that does not trust the self-signed certificate refuses the connection."""
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=TlsFiles(str(pki.cert), str(pki.key)))
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                fetch(server, context=ssl.create_default_context())
        finally:
            server.close()

    def test_client_certificate_required_with_client_ca(self, pki: Pki) -> None:
        """With tls_client_ca_file a client without a certificate fails and one with a signed certificate works."""
        tls = TlsFiles(str(pki.cert), str(pki.key), str(pki.client_cert))
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=tls)
        try:
            with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
                fetch(server, context=client_context(pki))
            assert fetch(server, context=client_context(pki, with_client_cert=True)).status == 200
        finally:
            server.close()

    def test_silent_client_does_not_stall_tls_handshakes(self, pki: Pki) -> None:
        """A TCP client that never starts its handshake does not delay others, and is cut off."""
        tls = TlsFiles(str(pki.cert), str(pki.key))
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=tls, request_timeout_s=0.5)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as silent:
                started = time.monotonic()
                assert fetch(server, context=client_context(pki)).status == 200
                assert time.monotonic() - started < 0.4
                assert closed_by_server_within(silent, 3.0)
        finally:
            server.close()

    def test_full_tls_server_hands_a_silent_clients_slot_to_a_handshake(
        self, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Under TLS too, with every slot held by silent clients, a client starting its handshake takes one's
        slot (the silent one's TLS socket is shut down) and is served at once."""
        monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 2)
        tls = TlsFiles(str(pki.cert), str(pki.key))
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), tls=tls, request_timeout_s=5.0)
        try:
            silent = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) for _ in range(2)]
            time.sleep(0.1)
            started = time.monotonic()
            assert fetch(server, context=client_context(pki)).status == 200
            assert time.monotonic() - started < 2.0  # not the 5 s head deadline of a silent client
            assert server.evicted_connections == 1
            assert sum(closed_by_server_within(sock, 1.0) for sock in silent) == 1
            for sock in silent:
                sock.close()
        finally:
            server.close()

    @pytest.mark.parametrize("hash_kind", ["bcrypt", "scrypt"])
    def test_from_config_serves_tls_and_auth(
        self, pki: Pki, password_hash: str, scrypt_hash: str, hash_kind: str
    ) -> None:
        """MetricsServer.from_config turns the deprecated [metrics] keys into an https endpoint behind
        basic auth, with a bcrypt hash or an old scrypt one."""
        metrics = MetricsConfig(
            port=0,
            tls_cert_file=str(pki.cert),
            tls_key_file=str(pki.key),
            basic_auth_username="prometheus",
            basic_auth_password_hash=password_hash if hash_kind == "bcrypt" else scrypt_hash,
        )
        server = MetricsServer.from_config(metrics, tiny_registry())
        try:
            assert "tls" in server.security_summary() and "basic auth" in server.security_summary()
            assert fetch(server, context=client_context(pki)).status == 401
            reply = fetch(server, context=client_context(pki), headers=basic("prometheus", PASSWORD))
            assert reply.status == 200
        finally:
            server.close()


# --------------------------------------------------------------------------- basic auth


class TestBasicAuth:
    """401 unless the right user name and password come."""

    @pytest.fixture
    def server(self, password_hash: str) -> Iterator[MetricsServer]:
        """A plain endpoint behind basic auth."""
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), basic_auth=BasicAuth({"prometheus": password_hash}))
        yield server
        server.close()

    def test_no_header_is_401_with_challenge(self, server: MetricsServer) -> None:
        """No Authorization header: 401 with a Basic WWW-Authenticate challenge and no metrics."""
        reply = fetch(server)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith('Basic realm="gpu-governor"')
        assert "security_test_up" not in reply.body

    def test_wrong_password_is_401(self, server: MetricsServer) -> None:
        """The right user with a wrong password gets 401."""
        assert fetch(server, headers=basic("prometheus", "wrong")).status == 401

    def test_wrong_user_is_401(self, server: MetricsServer) -> None:
        """The right password with a wrong user gets 401."""
        assert fetch(server, headers=basic("admin", PASSWORD)).status == 401

    def test_right_credentials_get_metrics(self, server: MetricsServer) -> None:
        """The right user and password get 200 with the metrics, and again from the cache."""
        for _ in range(2):
            reply = fetch(server, headers=basic("prometheus", PASSWORD))
            assert reply.status == 200 and "security_test_up 1.0" in reply.body

    @pytest.mark.parametrize(
        "header",
        ["Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode(), "Bearer abc", "Basic \xff"],
    )
    def test_malformed_headers_are_401(self, server: MetricsServer, header: str) -> None:
        """Malformed Authorization headers get 401, never a 500."""
        assert fetch(server, headers={"Authorization": header}).status == 401

    def test_non_utf8_password_is_401(self, server: MetricsServer) -> None:
        """Credentials that are not UTF-8 are simply wrong."""
        token = base64.b64encode(b"prometheus:\xff\xfe").decode()
        assert fetch(server, headers={"Authorization": f"Basic {token}"}).status == 401


class TestHashPassword:
    """`gpu-governor hash-password` and the hash format."""

    def run_hash_password(self, monkeypatch: pytest.MonkeyPatch, stdin: str) -> tuple[int, str, str]:
        """Run the subcommand with ``stdin``; return (code, stdout, stderr)."""
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        out, err = io.StringIO(), io.StringIO()
        return main(["hash-password"], out=out, err=err), out.getvalue(), err.getvalue()

    def test_output_verifies_and_is_salted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The printed line is a bcrypt hash (cost 10) that verifies the password, not another; two differ (salted)."""
        code, first, _ = self.run_hash_password(monkeypatch, "s3cret\n")
        _, second, _ = self.run_hash_password(monkeypatch, "s3cret\n")
        assert code == 0 and first.startswith("$2b$10$") and first.count("\n") == 1
        assert auth.verify_password("s3cret", first) and auth.verify_password("s3cret", second)
        assert not auth.verify_password("s3cret ", first)
        assert first != second
        assert "s3cret" not in first

    def test_empty_password_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty line is a usage error (exit 2)."""
        code, out, err = self.run_hash_password(monkeypatch, "\n")
        assert code == 2 and out == "" and "empty password" in err

    def test_terminal_prompts_twice_without_echo(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a terminal getpass is asked twice and a mismatch is refused."""

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        answers = iter(["one", "two"])
        monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
        with pytest.raises(ValueError, match="differ"):
            auth.read_password(Tty())

    def test_malformed_hashes_do_not_verify(self) -> None:
        """Truncated, non-base64 or absurdly expensive hash lines are rejected, not crashed on."""
        good = auth.hash_password_scrypt("x", n=1024)
        assert auth.verify_password("x", good)
        for bad in ("", good[:-10] + "$$", good.replace("scrypt", "md5"), "scrypt$1048576000$8$1$AAAA$AAAA"):
            assert not auth.verify_password("x", bad)
        bcrypt_good = auth.hash_password("x", cost=4)
        assert auth.verify_password("x", bcrypt_good)
        too_costly = bcrypt_good.replace("$04$", "$31$")
        for bad in (bcrypt_good[:-5], bcrypt_good.replace("$2b$", "$2x$"), too_costly, bcrypt_good + "!"):
            assert not auth.verify_password("x", bad)


# --------------------------------------------------------------------------- the HTTP surface


class TestHttpSurface:
    """Only /metrics, bounded requests, bodies ignored, daemon threads, slow clients cut off."""

    def test_only_metrics_path_is_served(self, plain_server: MetricsServer) -> None:
        """/metrics is 200; /, /favicon.ico, /metrics/ and others are 404."""
        assert fetch(plain_server).status == 200
        assert fetch(plain_server, "/metrics?name[]=security_test_up").status == 200
        for path in ("/", "/favicon.ico", "/metrics/", "/admin", "/../etc/passwd"):
            assert fetch(plain_server, path).status == 404, path

    def test_request_body_is_ignored(self, plain_server: MetricsServer) -> None:
        """A GET announcing a huge body is answered at once without the body being read."""
        reply = raw_exchange(plain_server, b"GET /metrics HTTP/1.0\r\nContent-Length: 100000000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 200")

    def test_post_is_refused(self, plain_server: MetricsServer) -> None:
        """POST with a body gets 405."""
        assert fetch(plain_server, method="POST", body=b"x" * 1000).status == 405

    def test_long_request_line_is_414(self, plain_server: MetricsServer) -> None:
        """A request line over the cap gets 414."""
        reply = raw_exchange(plain_server, b"GET /" + b"a" * 5000 + b" HTTP/1.0\r\n\r\n")
        assert reply.split(b" ", 2)[1] == b"414"

    def test_huge_request_head_is_431(self, plain_server: MetricsServer) -> None:
        """Headers over the total cap get 431."""
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 200) for i in range(90))
        reply = raw_exchange(plain_server, b"GET /metrics HTTP/1.0\r\n" + headers + b"\r\n")
        assert reply.split(b" ", 2)[1] == b"431"

    def test_threads_are_daemon_threads(self, plain_server: MetricsServer) -> None:
        """The serving thread and every per-request thread are daemon threads."""
        serving = [t for t in threading.enumerate() if t.name == "metrics-http"]
        assert serving and all(t.daemon for t in serving)
        assert httpserver._ThreadingServer.daemon_threads is True

    def test_silent_client_is_cut_off(self, plain_server: MetricsServer) -> None:
        """A client that connects and sends nothing is closed after the request timeout, others served meanwhile."""
        with socket.create_connection(("127.0.0.1", plain_server.port), timeout=TIMEOUT_S) as silent:
            assert fetch(plain_server).status == 200
            assert closed_by_server_within(silent, 3.0)

    def test_dripping_client_is_cut_off(self, plain_server: MetricsServer) -> None:
        """A client sending its head one byte at a time is cut off at the deadline, not per byte."""
        with socket.create_connection(("127.0.0.1", plain_server.port), timeout=TIMEOUT_S) as slow:
            slow.sendall(b"GET /metrics HTTP/1.0\r\n")
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < 3.0:
                try:
                    slow.sendall(b"X")
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.1)
                try:
                    if slow.recv(4096) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed

    def test_full_server_hands_a_silent_clients_slot_to_a_ready_scrape(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With every slot held by silent clients, a scrape takes one's slot and is served at once;
        a silent newcomer is closed instead of queued."""
        monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 2)
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), request_timeout_s=5.0)
        try:
            silent = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) for _ in range(2)]
            time.sleep(0.1)
            started = time.monotonic()
            assert fetch(server).status == 200
            assert time.monotonic() - started < 2.0  # not the 5 s head deadline of a silent client
            assert server.evicted_connections == 1
            # The scrape's slot is released just after the client sees the end of its answer: let
            # that happen, or the filler may arrive while the server is still full and be shed.
            time.sleep(0.3)
            filler = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S)  # full again
            time.sleep(0.1)
            late = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S)
            late.settimeout(2.0)
            assert late.recv(1) == b""  # closed at once: nothing sent while every slot was taken
            assert server.shed_connections == 1
            for sock in [*silent, filler, late]:
                sock.close()
        finally:
            server.close()


# --------------------------------------------------------------------------- what the metrics reveal


HOSTILE = ("evil\nname", "\x1b[31mred\x1b[0m", 'quo"te\\', "bad\udcff\ud800surrogates", "c1\x9bcsi", "ls\u2028sep")


def with_processes(state: PublishedState, names: tuple[str, ...], per_process: bool) -> PublishedState:
    """``state`` with a process row per name on its first GPU."""
    rows = tuple(ProcessRow(1000 + i, name, "default", f"unit-{name}", 2**20, "test") for i, name in enumerate(names))
    first = replace(state.gpus[0], processes=rows)
    return replace(state, gpus=(first, *state.gpus[1:]), per_process_metrics=per_process)


class TestExposure:
    """Per-process series off by default; hostile process text escaped."""

    def test_per_process_series_absent_by_default(self, tmp_path: Path) -> None:
        """With the default config, process rows produce no per-process series; switched on they do."""
        daemon, _ = scrape_after_ticks(tmp_path, 2)
        assert Config().vram.per_process_metrics is False
        assert daemon.published is not None and daemon.published.per_process_metrics is False
        state = with_processes(daemon.published, ("python3",), per_process=daemon.published.per_process_metrics)
        body = generate_latest(build_registry(lambda: state)).decode()
        assert "process_vram_used_bytes" not in body
        shown = with_processes(daemon.published, ("python3",), per_process=True)
        assert 'name="python3"' in generate_latest(build_registry(lambda: shown)).decode()

    def test_hostile_names_render_escaped(self, tmp_path: Path) -> None:
        """Newlines, ANSI escapes, quotes, C1 codes and lone surrogates in a name leave every line parseable."""
        daemon, _ = scrape_after_ticks(tmp_path, 1)
        assert daemon.published is not None
        state = with_processes(daemon.published, HOSTILE, per_process=True)
        text = generate_latest(build_registry(lambda: state)).decode("utf-8")
        for line in text.split("\n"):
            assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or ch == "\u2028" for ch in line), repr(line)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = families["gpu_governor_process_vram_used_bytes"].samples
        assert len(samples) == len(HOSTILE)
        names = {s.labels["name"] for s in samples}
        assert "evil\\x0aname" in names and "\\x1b[31mred\\x1b[0m" in names and 'quo"te\\' in names


# --------------------------------------------------------------------------- no shell


def _call_name(func: ast.expr, aliases: dict[str, str]) -> str:
    if isinstance(func, ast.Name):
        return aliases.get(func.id, func.id)
    if isinstance(func, ast.Attribute):
        return f"{_call_name(func.value, aliases)}.{func.attr}"
    return ""


def _is_text(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.BinOp) and (_is_text(node.left) or _is_text(node.right))


SHELL_CALLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
    "pty.spawn",
}
SUBPROCESS_CALLS = {
    "subprocess.run",
    "subprocess.Popen",
    "subprocess.call",
    "subprocess.check_call",
    "subprocess.check_output",
}


def shell_uses(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that could run a shell."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                found.append(f"{where}: shell={ast.unparse(keyword.value)}")
        if name in SHELL_CALLS:
            found.append(f"{where}: {name}")
        if name in SUBPROCESS_CALLS:
            command = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
            if command is not None and _is_text(command):
                found.append(f"{where}: {name} with a string command")
    return found


class TestNoShell:
    """No module of the governor can start a shell."""

    def test_scanner_finds_each_pattern(self) -> None:
        """The scan itself catches shell=True, os.system, os.popen, aliases and string commands."""
        sample = (
            "import os, subprocess\nfrom subprocess import run as r\n"
            "subprocess.run(['x'], shell=True)\nos.system('x')\nos.popen('x')\nr('ls -l')\n"
            "subprocess.Popen(f'x {y}')\nsubprocess.run(['ok'])\n"
        )
        assert len(shell_uses(sample, "sample.py")) == 5

    def test_no_module_invokes_a_shell(self) -> None:
        """An AST scan of every module in governor/ finds no shell=True, os.system, os.popen or string command."""
        modules = sorted((REPO / "governor").rglob("*.py"))
        assert len(modules) > 10
        found = [use for path in modules for use in shell_uses(path.read_text(encoding="utf-8"), str(path))]
        assert found == []


class TestRunWiring:
    def test_run_serves_https_behind_basic_auth(self, pki: Pki, password_hash: str, tmp_path: Path) -> None:
        """`gpu-governor run` with the deprecated TLS and basic-auth keys serves https, 401 without credentials,
        200 with them, and warns at start that the keys are deprecated."""
        import json
        import os
        import signal
        import subprocess
        import sys
        import time

        from tests.support import free_port

        port = free_port()
        config = tmp_path / "g.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\n[metrics]\nport = {port}\n'
            f'tls_cert_file = "{pki.cert}"\ntls_key_file = "{pki.key}"\n'
            f'basic_auth_username = "prometheus"\nbasic_auth_password_hash = "{password_hash}"\n'
        )
        config.chmod(0o644)
        STATUS = [sys.executable, "-m", "governor", "status"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config), "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    conn = http.client.HTTPSConnection(
                        "127.0.0.1", port, timeout=TIMEOUT_S, context=client_context(pki)
                    )
                    conn.request("GET", "/metrics")
                    status = conn.getresponse().status
                    conn.close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the https endpoint never answered"
                    time.sleep(0.2)
            assert status == 401
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT_S, context=client_context(pki))
            conn.request("GET", "/metrics", headers=basic("prometheus", PASSWORD))
            response = conn.getresponse()
            body = response.read().decode()
            conn.close()
            assert response.status == 200 and "gpu_governor_gpu_temperature_celsius" in body
            shown = subprocess.run(
                [
                    *STATUS,
                    "--url",
                    f"https://127.0.0.1:{port}/metrics",
                    "--cacert",
                    str(pki.cert),
                    "--user",
                    "prometheus",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "GPU_GOVERNOR_METRICS_PASSWORD": PASSWORD},
                check=False,
            )
            assert shown.returncode == 0, shown.stderr
            assert "NVIDIA GeForce RTX 4070" in shown.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        listening = next(e for e in events if e["event"] == "metrics_listening")
        assert listening["url"].startswith("https://") and "basic auth" in listening["security"]
        deprecated = next(e for e in events if e["event"] == "config_deprecated")  # the [metrics] keys used here
        assert deprecated["level"] == "warning" and "metrics.basic_auth_password_hash" in deprecated["keys"]
