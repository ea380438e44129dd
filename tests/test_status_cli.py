"""``gpu-governor status`` as a user runs it: the real CLI against a real simulated daemon over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor import auth
from governor.cli import EXIT_BAD_ANSWER, EXIT_GPU_UNHEALTHY, EXIT_UNREACHABLE, EXIT_USAGE
from governor.status import SCHEMA_VERSION, DaemonStatus, load_process_table
from tests.support import free_port, openssl_self_signed, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]
STATUS = [sys.executable, "-m", "governor", "status"]
PASSWORD = "status test password"
POLL_S = 0.5
GPU_KEYS = {
    "index",
    "uuid",
    "name",
    "health",
    "zone",
    "mode",
    "readings",
    "limits",
    "target_w",
    "mig_enabled",
    "mig_instances",
    "last_power_decision",
    "last_vram_decision",
}


class Daemon:
    """``python -m governor run --simulate`` with a config written to ``where``, its log in a file."""

    def __init__(self, where: Path, toml: str, port: int, *extra: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.config = where / "g.toml"
        self.config.write_text(f'state_dir = "{where / "state"}"\npoll_interval_s = {POLL_S}\n' + toml)
        self.log = open(where / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(self.config), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def stop(self) -> int:
        """SIGTERM, wait (bounded), return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def start(where: Path, toml: str = "", *, wait: bool = True) -> Daemon:
    """A simulated daemon on a free loopback port, once its metrics answer."""
    port = free_port()
    daemon = Daemon(where, toml, port, "--listen", f"127.0.0.1:{port}")
    if wait:
        wait_for(lambda: "gpu_governor_gpu_temperature_celsius" in scrape(port), 60.0, "metrics")
    return daemon


def status(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``gpu-governor status ARGS`` as a real process."""
    return subprocess.run(
        [*STATUS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def document(port: int) -> dict[str, object]:
    """``status --json`` of the daemon on ``port``."""
    result = status("--url", f"127.0.0.1:{port}", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


LEAKY = """
[power]
step_down_at_c = 40.0
step_up_at_c = 30.0
[simulation]
scenario = "leaky-process"
time_scale = 10.0
[vram]
cooldown_s = 1.0
[[class]]
name = "leaky"
budget = "3GiB"
action = "observe"
match = { name = "leaky" }
"""
"""Steps the power limit down at 40 C (the simulated card passes it in seconds) and has a
process ("leaky") that passes its 3 GiB budget after 4 s of wall time (10x time scale)."""


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the read-only tests: a non-default runtime_dir, a power and a VRAM decision."""
    where = tmp_path_factory.mktemp("busy")
    daemon = start(where, f'runtime_dir = "{where / "custom-run"}"\n' + LEAKY)
    try:

        def decided() -> bool:
            body = scrape(daemon.port)
            return "gpu_last_power_decision_info{" in body and "gpu_last_vram_decision_info{" in body

        wait_for(decided, 60.0, "a power and a VRAM decision")
        yield daemon
    finally:
        daemon.stop()


class TestJson:
    def test_schema_keys_and_units(self, busy: Daemon) -> None:
        """--json has the documented top-level, daemon, GPU and decision keys, with units and the schema version."""
        doc = document(busy.port)
        assert doc["schema_version"] == SCHEMA_VERSION
        assert set(doc) >= {"daemon", "mode", "data_age_s", "gpus", "processes", "processes_note", "healthy"}
        daemon = doc["daemon"]
        assert isinstance(daemon, dict)
        assert daemon["pid"] == busy.proc.pid and len(str(daemon["instance"])) == 32
        assert isinstance(daemon["started_at_s"], float) and daemon["version"]
        assert doc["mode"] == "enforcing" and doc["healthy"] is True
        assert isinstance(doc["data_age_s"], float) and 0 <= doc["data_age_s"] < 10
        gpus = doc["gpus"]
        assert isinstance(gpus, list) and len(gpus) == 1
        gpu = gpus[0]
        assert set(gpu) == GPU_KEYS
        assert (gpu["index"], gpu["name"], gpu["health"]) == (0, "NVIDIA GeForce RTX 4070", "ok")
        assert set(gpu["readings"]) == {
            "temperature_c",
            "power_w",
            "memory_used_bytes",
            "memory_total_bytes",
            "utilization_ratio",
        }
        assert gpu["limits"] == {"enforced_w": 180.0, "min_w": 100.0, "max_w": 220.0, "default_w": 200.0}
        power = gpu["last_power_decision"]
        assert power["rule"] == "power_step_down" and (power["from_w"], power["to_w"]) == (200.0, 180.0)
        assert ">= 40 C" in power["reason"] and power["outcome"] == "applied" and power["age_s"] >= 0
        vram = gpu["last_vram_decision"]
        assert vram["class"] == "leaky" and vram["budget_bytes"] == 3 * 2**30
        assert vram["used_bytes"] > vram["budget_bytes"] and "leaky" in vram["reason"]

    def test_missing_values_are_null_not_zero(self, tmp_path: Path) -> None:
        """A GPU with no temperature reading has temperature_c null (never 0) in --json."""
        scenario = tmp_path / "unsupported.toml"
        scenario.write_text(
            'name = "unsupported"\ndescription = "no temperature"\nrepeat = false\n'
            '[[phase]]\nname = "w"\nduration_s = 3600.0\ndemand_fraction = 0.5\nkind = "compute"\n'
            '[[event]]\nat_s = 0.0\ngpu = 0\nfault = "temperature_unsupported"\n'
        )
        daemon = start(tmp_path, f'runtime_dir = ""\n[simulation]\nscenario = "{scenario}"\n', wait=False)
        try:
            wait_for(
                lambda: 'gpu_governor_gpu_health="degraded",uuid="GPU-sim-rtx4070-0"} 1.0' in scrape(daemon.port),
                60.0,
                "degraded",
            )
            result = status("--url", f"127.0.0.1:{daemon.port}", "--json")
            assert result.returncode == EXIT_GPU_UNHEALTHY, result.stderr
            doc = json.loads(result.stdout)
            gpu = doc["gpus"][0]
            assert gpu["readings"]["temperature_c"] is None and gpu["health"] == "degraded"
            assert result.returncode == EXIT_GPU_UNHEALTHY
            assert doc["processes"] is None and "runtime_dir is empty" in doc["processes_note"]
        finally:
            daemon.stop()


class TestTable:
    def test_non_default_runtime_dir_table_is_shown(self, busy: Daemon) -> None:
        """The process table comes from the runtime_dir the daemon reports (not the default): no --config needed."""
        result = status("--url", f"http://127.0.0.1:{busy.port}/metrics")
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith("0 ") and "GiB" in line]
        processes = {row[2]: row for row in rows if row[1].isdigit()}
        assert set(processes) == {"steady", "leaky"}
        assert processes["leaky"][3] == "leaky" and "3.00" in processes["leaky"]

    def test_power_and_vram_decisions_with_units_and_reason(self, busy: Daemon) -> None:
        """The text shows the last power decision and the last VRAM decision separately, with units and reason."""
        out = status("--url", f"127.0.0.1:{busy.port}").stdout
        power = next(line for line in out.splitlines() if "last power decision" in line)
        vram = next(line for line in out.splitlines() if "last VRAM decision" in line)
        assert "200 W -> 180 W" in power and " ago: temperature " in power and ">= 40 C" in power
        assert "class leaky" in vram and "GiB > 3.00 GiB" in vram and " ago: " in vram

    def test_head_closes_the_pipe_without_a_traceback(self, busy: Daemon) -> None:
        """`status | head -1` prints one line and status exits quietly (0, or 141 if the pipe broke): no traceback."""
        shell = f"{sys.executable} -m governor status --url 127.0.0.1:{busy.port} | head -1; echo rc=${{PIPESTATUS[0]}}"
        result = subprocess.run(
            ["bash", "-c", shell], capture_output=True, text=True, timeout=30, check=False, cwd=REPO
        )
        lines = result.stdout.splitlines()
        assert lines[0].startswith("gpu-governor ") and lines[1] in ("rc=0", "rc=141")
        assert result.stderr == ""

    def test_closed_stdout_with_json(self, busy: Daemon) -> None:
        """`status --json` with stdout already closed exits 141 (as if by SIGPIPE) and writes nothing to stderr."""
        proc = subprocess.Popen(
            [*STATUS, "--url", f"127.0.0.1:{busy.port}", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 141 and err == b""


class TestWatch:
    def test_watch_json_prints_one_document_per_line_until_ctrl_c(self, busy: Daemon) -> None:
        """--watch 0.2 --json prints a fresh document per line; SIGINT (Ctrl-C) ends it with 0 and no output."""
        proc = subprocess.Popen(
            [*STATUS, "--url", f"127.0.0.1:{busy.port}", "--json", "--watch", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        docs = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr.read() == ""
        fetched = [d["fetched_at_s"] for d in docs]
        assert fetched == sorted(fetched) and len(set(fetched)) == 3

    def test_watch_rejects_a_bad_interval(self) -> None:
        """--watch 0 is a usage error naming the expected range."""
        result = status("--watch", "0")
        assert result.returncode == EXIT_USAGE and "expected seconds between 0.1 and 86400" in result.stderr


class TestErrors:
    def test_refused_says_is_it_running(self) -> None:
        """A closed port: exit 7, one line, 'connection refused (is it running?)'."""
        result = status("--url", f"127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_UNREACHABLE
        assert result.stderr.count("\n") == 1 and "connection refused (is it running?)" in result.stderr

    def test_not_found_is_not_a_governor(self, busy: Daemon) -> None:
        """A wrong path on the governor's port: exit 9, 'HTTP 404 ... not a gpu-governor metrics endpoint'."""
        result = status("--url", f"http://127.0.0.1:{busy.port}/nothing-here")
        assert result.returncode == EXIT_BAD_ANSWER
        assert "HTTP 404" in result.stderr and "not a gpu-governor metrics endpoint" in result.stderr
        assert "is it running" not in result.stderr

    def test_other_http_server_is_not_a_governor(self, tmp_path: Path) -> None:
        """A plain web server answering 200 with other text: exit 9, 'not with gpu-governor metrics'."""
        (tmp_path / "metrics").write_text("hello\n")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: scrape(port, 2.0) == "hello\n", 60.0, "http.server")
            result = status("--url", f"127.0.0.1:{port}")
        finally:
            server.terminate()
            server.wait(timeout=20)
        assert result.returncode == EXIT_BAD_ANSWER and "not with gpu-governor metrics" in result.stderr

    @pytest.mark.parametrize("url", ["localhost/metrics", "127.0.0.1", "ftp://127.0.0.1:9847/metrics", "x:99999"])
    def test_no_scheme_or_bad_url_is_a_usage_error(self, url: str) -> None:
        """A --url that is neither a URL nor HOST:PORT: exit 2 naming the expected forms, no network."""
        result = status("--url", url)
        assert result.returncode == EXIT_USAGE
        assert f"--url: {url!r}" in result.stderr or f"in {url!r}" in result.stderr
        assert "HOST:PORT" in result.stderr and "is it running" not in result.stderr

    def test_timeout_is_named(self) -> None:
        """A port that accepts but never answers: exit 7 'did not answer within 5 s', not 'is it running?'."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            port = listener.getsockname()[1]
            started = time.monotonic()
            result = status("--url", f"127.0.0.1:{port}")
            assert time.monotonic() - started < 25
        assert result.returncode == EXIT_UNREACHABLE and "did not answer within 5 s" in result.stderr
        assert "is it running" not in result.stderr

    def test_a_trickling_answer_is_given_up_on(self) -> None:
        """Whoever holds the port (the daemon is down) sends a byte every second for ever: status gives up
        after FETCH_TOTAL_S in all (exit 8, named), though no single read ever times out."""
        stop = threading.Event()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            port = listener.getsockname()[1]

            def trickle() -> None:
                connection, _ = listener.accept()
                with connection:
                    for byte in b"HTTP/1.0 200 OK\r\n" + b"X-Pad: " + b"a" * 10_000:
                        if stop.wait(1.0):
                            return
                        connection.sendall(bytes([byte]))

            server = threading.Thread(target=trickle, daemon=True)
            server.start()
            started = time.monotonic()
            result = status("--url", f"127.0.0.1:{port}", timeout=60)
            took_s = time.monotonic() - started
            stop.set()
            server.join(5)
        assert result.returncode == EXIT_BAD_ANSWER, result.stderr
        assert "did not finish its answer within 20 s" in result.stderr
        assert took_s < 50  # 20 s and the start of a Python, never the minutes the trickle would take


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    where = tmp_path_factory.mktemp("pki")
    cert, key = where / "cert.pem", where / "key.pem"
    openssl_self_signed(openssl, cert, key, "status test")
    return cert, key


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path]) -> Iterator[Daemon]:
    """A daemon serving https with basic auth (user "prometheus")."""
    where = tmp_path_factory.mktemp("secured")
    cert, key = pki
    port = free_port()
    password_hash = auth.hash_password_scrypt(PASSWORD, n=1024)  # the deprecated keys still take scrypt
    toml = (
        f'runtime_dir = ""\n[metrics]\nport = {port}\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
        f'basic_auth_username = "prometheus"\nbasic_auth_password_hash = "{password_hash}"\n'
    )
    daemon = Daemon(where, toml, port)
    daemon.config.chmod(0o600)
    try:
        ok = {"GPU_GOVERNOR_METRICS_PASSWORD": PASSWORD}
        args = ["--url", f"https://127.0.0.1:{port}", "--cacert", str(cert), "--user", "prometheus"]
        wait_for(lambda: status(*args, env=ok).returncode == 0, 60.0, "the https endpoint")
        yield daemon
    finally:
        daemon.stop()


class TestSecured:
    def test_right_credentials_show_the_table(self, secured: Daemon, pki: tuple[Path, Path]) -> None:
        """https with --cacert and the right password: exit 0 and the GPU row."""
        result = status(
            *("--url", f"https://127.0.0.1:{secured.port}", "--cacert", str(pki[0]), "--user", "prometheus"),
            env={"GPU_GOVERNOR_METRICS_PASSWORD": PASSWORD},
        )
        assert result.returncode == 0, result.stderr
        assert "NVIDIA GeForce RTX 4070" in result.stdout

    def test_missing_credentials_are_named(self, secured: Daemon, pki: tuple[Path, Path]) -> None:
        """No --user: exit 9, 'HTTP 401' and how to pass credentials; not 'is it running?'."""
        result = status("--url", f"https://127.0.0.1:{secured.port}", "--cacert", str(pki[0]))
        assert result.returncode == EXIT_BAD_ANSWER
        assert "HTTP 401" in result.stderr and "pass --user NAME" in result.stderr
        assert "is it running" not in result.stderr

    def test_wrong_password_is_named(self, secured: Daemon, pki: tuple[Path, Path]) -> None:
        """A wrong password: exit 9, 'HTTP 401' and that the user or its password is wrong."""
        result = status(
            *("--url", f"https://127.0.0.1:{secured.port}", "--cacert", str(pki[0]), "--user", "prometheus"),
            env={"GPU_GOVERNOR_METRICS_PASSWORD": "wrong"},
        )
        assert result.returncode == EXIT_BAD_ANSWER
        assert "HTTP 401" in result.stderr and "'prometheus' or its password is wrong" in result.stderr

    def test_untrusted_certificate_is_named(self, secured: Daemon) -> None:
        """https without --cacert for a self-signed certificate: exit 7, 'TLS certificate ... not trusted'."""
        result = status("--url", f"https://127.0.0.1:{secured.port}")
        assert result.returncode == EXIT_UNREACHABLE
        assert "TLS certificate of" in result.stderr and "not trusted" in result.stderr
        assert "--cacert" in result.stderr and "is it running" not in result.stderr

    def test_plain_http_to_https_is_named(self, secured: Daemon) -> None:
        """http:// to the https endpoint: one line that suggests https, not 'is it running?'."""
        result = status("--url", f"127.0.0.1:{secured.port}")
        assert result.returncode in (EXIT_UNREACHABLE, EXIT_BAD_ANSWER)
        assert result.stderr.count("\n") == 1 and "https" in result.stderr
        assert "Traceback" not in result.stderr and "is it running" not in result.stderr

    def test_host_port_uses_https_when_the_config_has_tls(self, secured: Daemon) -> None:
        """HOST:PORT with a --config that has tls_cert_file is fetched over https (CA from the config)."""
        result = status(
            *("--url", f"127.0.0.1:{secured.port}", "--config", str(secured.config), "--user", "prometheus"),
            env={"GPU_GOVERNOR_METRICS_PASSWORD": PASSWORD},
        )
        assert result.returncode == 0, result.stderr
        assert "NVIDIA GeForce RTX 4070" in result.stdout


class TestLostGpu:
    def test_lost_gpu_exits_8(self, tmp_path: Path) -> None:
        """Once the simulator loses GPU 1, status exits 8, names it, and --json says health "lost"."""
        toml = 'runtime_dir = ""\n[simulation]\ngpu_count = 2\nscenario = "gpu-lost"\ntime_scale = 60.0\n'
        daemon = start(tmp_path, toml)
        try:
            url = f"127.0.0.1:{daemon.port}"
            wait_for(lambda: status("--url", url).returncode == EXIT_GPU_UNHEALTHY, 60.0, "GPU 1 lost")
            text = status("--url", url)
            doc = json.loads(status("--url", url, "--json").stdout)
        finally:
            daemon.stop()
        assert "attention: GPU 1 (GPU-sim-rtx4070-1) is lost" in text.stdout
        assert [g["health"] for g in doc["gpus"]] == ["ok", "lost"] and doc["healthy"] is False

    def test_all_ok_exits_0_before_the_loss(self, tmp_path: Path) -> None:
        """The same two-GPU daemon exits 0 while both GPUs are ok (the loss comes after 120 simulated s)."""
        toml = '[simulation]\ngpu_count = 2\nscenario = "gpu-lost"\ntime_scale = 1.0\n'
        daemon = start(tmp_path, 'runtime_dir = ""\n' + toml)
        try:
            result = status("--url", f"127.0.0.1:{daemon.port}")
        finally:
            daemon.stop()
        assert result.returncode == 0, result.stderr
        assert "attention" not in result.stdout


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i (root on ext4/tmpfs); False when it cannot be done here."""
    chattr = shutil.which("chattr")
    if chattr is None or os.geteuid() != 0:
        return False
    flag = "+i" if on else "-i"
    return subprocess.run([chattr, flag, str(path)], capture_output=True, timeout=30, check=False).returncode == 0


class TestStaleTable:
    def test_table_of_a_stopped_daemon_is_not_shown(self, tmp_path: Path) -> None:
        """A stopped daemon's processes.json is not shown for the next daemon that cannot write its own."""
        run = tmp_path / "run"
        first = start(tmp_path / "a", f'runtime_dir = "{run}"\n[simulation]\nscenario = "leaky-process"\n')
        wait_for((run / "processes.json").exists, 60.0, "the first table")
        old = json.loads((run / "processes.json").read_text())
        assert first.stop() == 0
        assert status("--url", f"127.0.0.1:{first.port}").returncode == EXIT_UNREACHABLE
        if not _immutable(run, True):
            pytest.skip("needs root and chattr +i to stop the second daemon writing its table")
        try:
            second = start(tmp_path / "b", f'runtime_dir = "{run}"\n[simulation]\nscenario = "leaky-process"\n')
            try:
                result = status("--url", f"127.0.0.1:{second.port}")
                doc = json.loads(status("--url", f"127.0.0.1:{second.port}", "--json").stdout)
            finally:
                second.stop()
        finally:
            _immutable(run, False)
        assert old["daemon"]["pid"] == first.proc.pid
        assert "is from another daemon" in result.stdout and f"pid {first.proc.pid}" in result.stdout
        assert "leaky" not in result.stdout.split("processes:")[1]
        assert doc["processes"] is None and "another daemon" in doc["processes_note"]

    def test_table_the_daemon_stopped_updating_is_stale(self, tmp_path: Path) -> None:
        """A table the running daemon can no longer rewrite (its metrics say so) is shown as stale."""
        run = tmp_path / "run"
        daemon = start(tmp_path, f'runtime_dir = "{run}"\n[simulation]\nscenario = "leaky-process"\n')
        try:
            url = f"127.0.0.1:{daemon.port}"
            assert "steady" in status("--url", url).stdout
            if not _immutable(run, True):
                pytest.skip("needs root and chattr +i to stop the daemon writing its table")
            try:
                ok = "gpu_governor_process_table_ok 0.0"
                wait_for(lambda: ok in scrape(daemon.port), 60.0, "a failed write of the leaky process's table")
                result = status("--url", url)
            finally:
                _immutable(run, False)
        finally:
            daemon.stop()
        assert "is stale (written" in result.stdout and "steady" not in result.stdout


class TestNotRoot:
    def test_unreadable_table_is_said(self, busy: Daemon) -> None:
        """status run as a user who cannot read the 0600 table says so instead of showing nothing."""
        if os.geteuid() != 0:
            pytest.skip("needs root to run status as another user")
        from governor.cli import main

        url = f"127.0.0.1:{busy.port}"
        assert main(["status", "--url", url, "--json"], out=open(os.devnull, "w")) == 0  # noqa: SIM115 - loads modules
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody and run the real main()
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with os.fdopen(write, "w") as out:
                    code = main(["status", "--url", url, "--json"], out=out)
            finally:
                os._exit(code if "code" in locals() else 99)
        os.close(write)
        chunks = []
        reader = threading.Thread(target=lambda: chunks.append(os.fdopen(read).read()))
        reader.start()
        reader.join(30)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0
        doc = json.loads(chunks[0])
        assert doc["processes"] is None
        assert "readable only by the daemon's user (mode 0600)" in doc["processes_note"]


class TestTableAge:
    """Which process table `status` shows, by its stamp against the daemon's last write (no daemon run)."""

    @staticmethod
    def table(
        tmp_path: Path, written_s: float, table_written_s: float | None
    ) -> tuple[list[dict[str, object]] | None, str | None]:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        doc = {"daemon": {"pid": 42, "instance": "i"}, "written_at_s": written_s, "processes": [{"pid": 7}]}
        (run / "processes.json").write_text(json.dumps(doc))
        status = DaemonStatus(pid=42, instance="i", runtime_dir=str(run), table_written_s=table_written_s)
        loaded = load_process_table(status, written_s + 5.0)
        return loaded.rows, loaded.note

    def test_the_last_table_the_daemon_wrote_is_shown(self, tmp_path: Path) -> None:
        """The file's stamp equal to the daemon's last write: its rows are shown."""
        assert self.table(tmp_path, 100.0, 100.0) == ([{"pid": 7}], None)

    def test_a_table_written_after_the_scrape_is_shown(self, tmp_path: Path) -> None:
        """A tick between the scrape and the read rewrote the table (newer, or none known yet): shown."""
        assert self.table(tmp_path, 101.0, 100.0)[0] == [{"pid": 7}]
        assert self.table(tmp_path, 101.0, None)[0] == [{"pid": 7}]

    def test_a_table_older_than_the_daemons_last_write_is_stale(self, tmp_path: Path) -> None:
        """A file older than the last table the daemon reports writing is left over: not shown."""
        rows, note = self.table(tmp_path, 99.0, 100.0)
        assert rows is None and note is not None and "is stale" in note


class TestHostileTable:
    """A processes.json someone else planted where the answering endpoint says the runtime directory is."""

    @staticmethod
    def load(run: Path) -> tuple[list[dict[str, object]] | None, str | None]:
        status = DaemonStatus(pid=42, instance="i", runtime_dir=str(run))
        found: list[tuple[list[dict[str, object]] | None, str | None]] = []
        reader = threading.Thread(target=lambda: found.append(_loaded(status)), daemon=True)
        reader.start()
        reader.join(30)
        assert found, "status hung reading the process table"
        return found[0]

    @staticmethod
    def table(run: Path, rows: list[dict[str, object]] | None = None, pid: object = 42) -> Path:
        run.mkdir(exist_ok=True)
        doc = {"daemon": {"pid": pid, "instance": "i"}, "written_at_s": 100.0, "processes": rows or [{"pid": 7}]}
        path = run / "processes.json"
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        return path

    def test_a_fifo_is_refused_without_hanging(self, tmp_path: Path) -> None:
        """A FIFO in place of the table is refused at once (status never waits for a writer)."""
        (tmp_path / "run").mkdir()
        os.mkfifo(tmp_path / "run" / "processes.json", 0o600)
        rows, note = self.load(tmp_path / "run")
        assert rows is None and note is not None and "FIFO" in note

    def test_a_symlink_and_a_huge_file_are_refused(self, tmp_path: Path) -> None:
        """A link to a valid table elsewhere is not followed; a file over the size cap is not read."""
        real = self.table(tmp_path / "elsewhere")
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "processes.json").symlink_to(real)
        rows, note = self.load(tmp_path / "run")
        assert rows is None and note is not None and "symbolic link" in note
        big = tmp_path / "big"
        big.mkdir()
        with open(big / "processes.json", "wb") as handle:
            handle.truncate(64 * 1024 * 1024)
        (big / "processes.json").chmod(0o600)
        rows, note = self.load(big)
        assert rows is None and note is not None and "bytes" in note

    def test_a_table_others_can_write_or_own_is_refused(self, tmp_path: Path) -> None:
        """A table writable by group or others, or owned by someone neither root nor the caller, is not shown."""
        path = self.table(tmp_path / "run")
        path.chmod(0o666)
        rows, note = self.load(tmp_path / "run")
        assert rows is None and note is not None and "writable by group or others" in note
        if os.geteuid() != 0:
            return  # chown needs root
        path.chmod(0o600)
        os.chown(path, 1000, 1000)
        rows, note = self.load(tmp_path / "run")
        assert rows is None and note is not None and "owned by uid 1000" in note

    def test_text_from_the_table_reaches_the_terminal_escaped(self, tmp_path: Path) -> None:
        """Control characters in a table's cells or identity are printed as escapes, never raw."""
        from governor.status import render_processes

        self.table(tmp_path / "run", [{"gpu": 0, "pid": 7, "name": "\x1b]0;owned\x07", "class": "x\x1b[2J"}])
        rows, _ = self.load(tmp_path / "run")
        assert rows is not None
        text = render_processes(rows)
        assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;owned\\x07" in text
        self.table(tmp_path / "other", pid="\x1b[2J")
        rows, note = self.load(tmp_path / "other")
        assert rows is None and note is not None and "\x1b" not in note and "another daemon" in note


def test_labels_of_a_forged_endpoint_reach_the_terminal_escaped() -> None:
    """Control characters in the labels an endpoint sends are printed as escapes, never raw."""
    from governor.status import parse_status, render_problems, render_status

    text = (
        (
            'gpu_governor_build_info{version="1\u001b]0;x\u0007",backend="sim",dry_run="false"} 1\n'
            'gpu_governor_gpu_info{gpu="0",uuid="GPU-\u001b[2J",name="\u001b[31mH200"} 1\n'
            'gpu_governor_gpu_health{gpu="0",uuid="GPU-\u001b[2J",gpu_governor_gpu_health="lost"} 1\n'
            'gpu_governor_unit_stopped_timestamp_seconds{unit="a\u001b[1A.service",class="c",reason="r"} 1\n'
        )
        .encode()
        .decode("unicode_escape")
    )
    status = parse_status(text)
    shown = render_status(status, 10.0) + "".join(render_problems(status))
    assert status.gpus and status.stopped_units and "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b[31mH200" in shown


def _loaded(status: DaemonStatus) -> tuple[list[dict[str, object]] | None, str | None]:
    table = load_process_table(status, 105.0)
    return table.rows, table.note


FORGER = r"""
import os, socket
body = b'gpu_governor_build_info{version="9",backend="nvml",dry_run="false"} 1\n'
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
os.write(out, b"%d\n" % server.getsockname()[1])  # out: the pipe the test reads the port from
while True:
    conn, _ = server.accept()
    conn.recv(65536)
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    conn.sendall(head + body)
    conn.close()
"""


class TestPortHolder:
    """`status` refuses an answer from a port another local user holds (the daemon could not bind it)."""

    @staticmethod
    def tables(tmp_path: Path, *rows: tuple[str, str, int]) -> Path:
        """A /proc/net with a tcp table of (local address, state, uid) rows and an empty tcp6."""
        net = tmp_path / "net"
        net.mkdir()
        head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        lines = [
            f"   {i}: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 {uid:5d} 0 {1000 + i}\n"
            for i, (local, state, uid) in enumerate(rows)
        ]
        (net / "tcp").write_text(head + "".join(lines))
        (net / "tcp6").write_text(head)
        return net

    def test_a_listener_of_another_user_is_refused(self, tmp_path: Path) -> None:
        """A socket of uid 1000 listening on the port: refused for root ("answer", exit 9), naming the uid."""
        from governor.status import StatusError, check_port_holder

        net = self.tables(tmp_path, ("0100007F:2673", "0A", 1000))
        with pytest.raises(StatusError) as raised:
            check_port_holder("http://127.0.0.1:9843/metrics", net, caller_uid=0)
        assert raised.value.exit_code == EXIT_BAD_ANSWER and "uid 1000" in str(raised.value)

    def test_root_or_the_caller_may_hold_the_port(self, tmp_path: Path) -> None:
        """Root's listener, the caller's own (a demo daemon run by that user), a connection of another user on the
        port (not listening), another port and another host all pass."""
        from governor.status import check_port_holder

        net = self.tables(
            tmp_path,
            ("00000000:2673", "0A", 0),
            ("0100007F:2674", "0A", 1000),
            ("0100007F:2673", "01", 1001),
            ("0100007F:2675", "0A", 1002),
        )
        check_port_holder("http://127.0.0.1:9843/metrics", net, caller_uid=0)
        check_port_holder("http://127.0.0.1:9844/metrics", net, caller_uid=1000)
        check_port_holder("http://10.0.0.5:9845/metrics", net, caller_uid=0)

    def test_a_forged_endpoint_of_nobody_is_refused_by_the_real_command(self) -> None:
        """A process of uid 65534 answering with gpu-governor metrics on a loopback port: `status` run by root exits
        9 and says who holds the port, instead of showing the forged state."""
        if os.geteuid() != 0:
            pytest.skip("needs root to run the forger as another user")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, then serve the forged answer (the interpreter is root's)
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                exec(FORGER, {"out": write})
            finally:
                os._exit(99)
        os.close(write)
        try:
            with os.fdopen(read) as lines:
                port = int(lines.readline())
            result = status("--url", f"127.0.0.1:{port}")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert result.returncode == EXIT_BAD_ANSWER, result.stderr
        assert "held by a process of uid 65534" in result.stderr and "Traceback" not in result.stderr
