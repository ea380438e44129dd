"""``gpu-governor status``: read the running daemon's metrics endpoint and show it.

It reads only what the daemon publishes, so it needs no NVML access and no root; only
the process table (``processes.json`` in the runtime directory the daemon reports,
mode 0600) needs the daemon's user. The table is shown only when it was written by
the daemon that answered (same pid and instance id) and is fresh; otherwise status
says why. ``--json`` prints the schema documented in docs/status-json.md.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from governor.errors import StatusError as StatusError  # noqa: PLC0414  (re-exported)
from governor.escaping import escape
from governor.peeruid import PROC_NET, is_loopback, listening_uids
from governor.safefile import UnusableFile, read_json, root_trust_problems

FETCH_TIMEOUT_S = 5.0
FETCH_TOTAL_S = 20.0
"""The most seconds a whole answer may take to arrive, however it trickles."""
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TABLE_BYTES = 16 * 1024 * 1024
"""The largest processes.json status reads (bytes): thousands of rows fit."""
SCHEMA_VERSION = 1
"""Version of the ``--json`` document; raised only when a key is removed or changes meaning."""
UNHEALTHY = ("lost", "degraded")
"""GPU health states that make ``status`` exit non-zero."""


@dataclass
class PowerDecision:
    """The last power-limit decision for a GPU; limits in watts, ``at_s`` Unix time."""

    rule: str
    from_w: float | None
    to_w: float | None
    reason: str
    outcome: str
    at_s: float | None = None


@dataclass
class VramDecision:
    """The last decision about a process's VRAM on a GPU; sizes in bytes, ``at_s`` Unix time."""

    rule: str
    action: str
    pid: int | None
    klass: str | None
    used_bytes: float | None
    budget_bytes: float | None
    reason: str
    outcome: str
    at_s: float | None = None


@dataclass
class StoppedUnitRow:
    """A unit the governor stopped: class, why, when (Unix time), its resume delay (s; None when
    its class does not resume it) and when it resumes if the reserve stays clear (Unix time)."""

    unit: str
    klass: str
    reason: str
    stopped_at_s: float | None = None
    resume_after_s: float | None = None
    resume_at_s: float | None = None


@dataclass
class MigRow:
    """One MIG instance of a GPU in MIG mode: its memory (bytes) and whether it is under memory pressure."""

    uuid: str
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    memory_pressure: bool | None = None


@dataclass
class GpuRow:
    """What status shows for one GPU; every missing value is None (never 0)."""

    gpu: str
    uuid: str
    name: str | None = None
    temperature_c: float | None = None
    zone: str | None = None
    health: str | None = None
    power_w: float | None = None
    limit_w: float | None = None
    limit_min_w: float | None = None
    limit_max_w: float | None = None
    limit_default_w: float | None = None
    target_w: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    utilization_ratio: float | None = None
    monitor_only: bool | None = None
    last_power: PowerDecision | None = None
    last_vram: VramDecision | None = None
    mig_enabled: bool | None = None  # the GPU's MIG mode; None: unknown, or a GPU without MIG
    mig_instances: dict[str, MigRow] = field(default_factory=dict)  # by MIG UUID

    @property
    def index(self) -> int | None:
        """The GPU index as a number (None when the label is not one)."""
        return int(self.gpu) if self.gpu.isdigit() else None


@dataclass
class DaemonStatus:
    """The daemon-level facts and every GPU row (``*_s`` are Unix times, seconds)."""

    is_governor: bool = False  # the answer had gpu_governor_build_info
    version: str | None = None
    backend: str | None = None
    dry_run: bool | None = None
    config: str | None = None
    config_ok: bool | None = None
    pid: int | None = None
    instance: str | None = None
    runtime_dir: str | None = None
    table_written_s: float | None = None  # the written_at_s of the last process table the daemon wrote
    table_ok: bool | None = None  # False: the daemon can no longer write its process table
    started_at_s: float | None = None
    last_poll_s: float | None = None
    poll_interval_s: float | None = None
    ready: bool | None = None
    gpus: dict[str, GpuRow] = field(default_factory=dict)
    stopped_units: dict[str, StoppedUnitRow] = field(default_factory=dict)
    restart_loops: list[str] = field(default_factory=list)
    systemd_reachable: bool | None = None  # None: the daemon never asked systemd

    def rows(self) -> list[GpuRow]:
        """The GPUs in index order."""
        return sorted(self.gpus.values(), key=lambda r: (r.index is None, r.index or 0, r.gpu))

    def unhealthy(self) -> list[GpuRow]:
        """The GPUs that are lost or degraded."""
        return [r for r in self.rows() if r.health in UNHEALTHY]

    @property
    def mode(self) -> str | None:
        """``dry-run``, ``monitor-only`` (every GPU only watched) or ``enforcing``; None if unknown."""
        if self.dry_run is None:
            return None
        if self.dry_run:
            return "dry-run"
        if self.gpus and all(r.monitor_only for r in self.gpus.values()):
            return "monitor-only"
        return "enforcing"


_GAUGES = {
    "gpu_governor_gpu_temperature_celsius": "temperature_c",
    "gpu_governor_gpu_power_watts": "power_w",
    "gpu_governor_gpu_power_limit_watts": "limit_w",
    "gpu_governor_gpu_power_limit_min_watts": "limit_min_w",
    "gpu_governor_gpu_power_limit_max_watts": "limit_max_w",
    "gpu_governor_gpu_power_limit_default_watts": "limit_default_w",
    "gpu_governor_gpu_power_limit_target_watts": "target_w",
    "gpu_governor_gpu_memory_used_bytes": "memory_used_bytes",
    "gpu_governor_gpu_memory_total_bytes": "memory_total_bytes",
    "gpu_governor_gpu_utilization_ratio": "utilization_ratio",
}
_MIG_GAUGES = {
    "gpu_governor_mig_instance_memory_used_bytes": "memory_used_bytes",
    "gpu_governor_mig_instance_memory_total_bytes": "memory_total_bytes",
}
_DAEMON_GAUGES = {
    "gpu_governor_start_timestamp_seconds": "started_at_s",
    "gpu_governor_last_poll_timestamp_seconds": "last_poll_s",
    "gpu_governor_poll_interval_seconds": "poll_interval_s",
    "gpu_governor_process_table_written_timestamp_seconds": "table_written_s",
}

_UNIT_GAUGES = {
    "gpu_governor_unit_stopped_timestamp_seconds": "stopped_at_s",
    "gpu_governor_unit_resume_delay_seconds": "resume_after_s",
    "gpu_governor_unit_resume_timestamp_seconds": "resume_at_s",
}


def _float(text: str | None) -> float | None:
    """A label holding a number, or None when empty or not a number."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def parse_status(text: str) -> DaemonStatus:
    """Build a DaemonStatus from Prometheus text exposition (ValueError when it is not that)."""
    status = DaemonStatus()
    times: dict[tuple[str, str], float] = {}  # (gpu, "power" | "vram") -> Unix time of that decision

    def row(labels: dict[str, str]) -> GpuRow:
        key = labels["gpu"]
        if key not in status.gpus:
            status.gpus[key] = GpuRow(gpu=key, uuid=labels.get("uuid", ""))
        return status.gpus[key]

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "gpu_governor_build_info":
                status.is_governor = True
                status.version = labels.get("version") or None
                status.backend = labels.get("backend") or None
                status.dry_run = labels.get("dry_run") == "true"
            elif name == "gpu_governor_daemon_info":
                status.pid = _int(labels.get("pid"))
                status.instance = labels.get("instance_id") or None
                status.runtime_dir = labels.get("runtime_dir", "")
            elif name == "gpu_governor_config_info":
                status.config = labels.get("source") or None
            elif name == "gpu_governor_config_last_reload_successful":
                status.config_ok = sample.value == 1
            elif name == "gpu_governor_ready":
                status.ready = sample.value == 1
            elif name == "gpu_governor_process_table_ok":
                status.table_ok = sample.value == 1
            elif name in _DAEMON_GAUGES:
                setattr(status, _DAEMON_GAUGES[name], sample.value)
            elif name in _UNIT_GAUGES and "unit" in labels:
                key = labels["unit"]
                unit = status.stopped_units.setdefault(
                    key, StoppedUnitRow(key, labels.get("class", ""), labels.get("reason", ""))
                )
                setattr(unit, _UNIT_GAUGES[name], sample.value)
            elif name == "gpu_governor_unit_restart_loop" and sample.value == 1:
                status.restart_loops.append(labels.get("unit", ""))
            elif name == "gpu_governor_systemd_reachable":
                status.systemd_reachable = sample.value == 1
            elif "gpu" not in labels:
                continue
            elif name == "gpu_governor_gpu_info":
                row(labels).name = labels.get("name") or None
            elif name in _GAUGES:
                setattr(row(labels), _GAUGES[name], sample.value)
            elif name == "gpu_governor_gpu_mig_mode":
                row(labels).mig_enabled = sample.value == 1
            elif name in _MIG_GAUGES or name == "gpu_governor_mig_instance_memory_pressure":
                key = labels.get("mig_uuid", "")
                instance = row(labels).mig_instances.setdefault(key, MigRow(key))
                if name in _MIG_GAUGES:
                    setattr(instance, _MIG_GAUGES[name], sample.value)
                else:
                    instance.memory_pressure = sample.value == 1
            elif name == "gpu_governor_gpu_thermal_zone" and sample.value == 1:
                row(labels).zone = labels[name]
            elif name == "gpu_governor_gpu_health" and sample.value == 1:
                row(labels).health = labels[name]
            elif name == "gpu_governor_gpu_monitor_only":
                row(labels).monitor_only = sample.value == 1
            elif name == "gpu_governor_gpu_last_power_decision_info":
                row(labels).last_power = PowerDecision(
                    rule=labels.get("rule", ""),
                    from_w=_float(labels.get("from_watts")),
                    to_w=_float(labels.get("to_watts")),
                    reason=labels.get("reason", ""),
                    outcome=labels.get("outcome", ""),
                )
            elif name == "gpu_governor_gpu_last_vram_decision_info":
                row(labels).last_vram = VramDecision(
                    rule=labels.get("rule", ""),
                    action=labels.get("action", ""),
                    pid=_int(labels.get("pid")),
                    klass=labels.get("class") or None,
                    used_bytes=_float(labels.get("used_bytes")),
                    budget_bytes=_float(labels.get("budget_bytes")),
                    reason=labels.get("reason", ""),
                    outcome=labels.get("outcome", ""),
                )
            elif name == "gpu_governor_gpu_last_power_decision_timestamp_seconds":
                times[(labels["gpu"], "power")] = sample.value
            elif name == "gpu_governor_gpu_last_vram_decision_timestamp_seconds":
                times[(labels["gpu"], "vram")] = sample.value
    for key, gpu in status.gpus.items():
        if gpu.last_power is not None:
            gpu.last_power.at_s = times.get((key, "power"))
        if gpu.last_vram is not None:
            gpu.last_vram.at_s = times.get((key, "vram"))
    return status


# ---------------------------------------------------------------------------- fetching

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})(/.*)?$")


def normalize_url(value: str, *, tls: bool = False) -> str:
    """``--url``: a URL (http or https) or a plain ``HOST:PORT[/PATH]`` (https when ``tls``);
    the path defaults to /metrics. StatusError (``usage``) naming the expected form."""
    value = value.strip()
    expected = "expected a URL such as http://127.0.0.1:9847/metrics or HOST:PORT such as 127.0.0.1:9847"
    if "://" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise StatusError(f"--url: unsupported scheme {parts.scheme!r} in {value!r}: {expected}", "usage")
        if not parts.hostname:
            raise StatusError(f"--url: no host in {value!r}: {expected}", "usage")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            raise StatusError(f"--url: bad port in {value!r}: {expected}", "usage") from None
        return value if parts.path not in ("", "/") else urllib.parse.urlunsplit(parts._replace(path="/metrics"))
    match = _HOST_PORT.match(value)
    if match is None or not 0 < int(match.group(2)) <= 65535:
        raise StatusError(f"--url: {value!r} has no scheme and is not HOST:PORT: {expected}", "usage")
    host, port, path = match.group(1), match.group(2), match.group(3) or "/metrics"
    return f"{'https' if tls else 'http'}://{host}:{port}{path}"


def fetch_text(url: str, *, cafile: str | None = None, username: str | None = None, password: str | None = None) -> str:
    """GET ``url``; StatusError naming the actual cause when there is no usable answer.

    ``cafile`` trusts a self-signed TLS certificate, ``username``/``password`` answer basic auth.
    The whole exchange takes at most FETCH_TOTAL_S: the socket timeout bounds each read only,
    and whoever holds the port (any local user, while the daemon is down) could send a byte
    every few seconds for ever. The fetch runs on a thread of its own, left behind if late.
    """
    outcome: list[str | BaseException] = []

    def fetch() -> None:
        try:
            outcome.append(_fetch_text(url, cafile, username, password))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=fetch, name="status-fetch", daemon=True)
    worker.start()
    worker.join(FETCH_TOTAL_S)
    if not outcome:
        raise StatusError(f"the governor at {url} did not finish its answer within {FETCH_TOTAL_S:g} s", "answer")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _fetch_text(url: str, cafile: str | None, username: str | None, password: str | None) -> str:
    """The fetch itself (see :func:`fetch_text`)."""
    request = urllib.request.Request(url)  # noqa: S310 - URL checked by normalize_url
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    except (OSError, ssl.SSLError) as exc:
        raise StatusError(f"cannot use the CA file {cafile}: {exc}", "usage") from None
    where = f"the governor at {url}"
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S, context=context) as response:  # noqa: S310
            body: bytes = response.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as exc:
        raise StatusError(_http_error(url, exc.code, exc.reason, username), "answer") from None
    except urllib.error.URLError as exc:
        raise StatusError(_network_error(where, exc.reason), "unreachable") from None
    except TimeoutError:
        raise StatusError(f"{where} did not answer within {FETCH_TIMEOUT_S:g} s", "unreachable") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        hint = " (is it https? try https://)" if url.startswith("http:") else ""
        raise StatusError(f"{where} closed the connection without an HTTP answer: {exc!r}{hint}", "answer") from None
    except OSError as exc:
        raise StatusError(_network_error(where, exc), "unreachable") from None
    return body.decode("utf-8", errors="replace")


def _http_error(url: str, code: int, reason: object, username: str | None) -> str:
    if code in (401, 403):
        fix = (
            f"the user {username!r} or its password is wrong "
            "(the password comes from GPU_GOVERNOR_METRICS_PASSWORD or the prompt)"
            if username is not None
            else "it needs credentials: pass --user NAME and set GPU_GOVERNOR_METRICS_PASSWORD"
        )
        return f"{url} refused the credentials (HTTP {code} {reason}): {fix}"
    if code == 404:
        return f"{url} answered HTTP 404 Not Found: not a gpu-governor metrics endpoint (the governor serves /metrics)"
    return f"{url} answered HTTP {code} {reason}: not gpu-governor metrics"


def _network_error(where: str, reason: object) -> str:
    """One line naming why there was no answer; "is it running?" only for a refused connection."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        detail = reason.verify_message or str(reason)
        return (
            f"TLS certificate of {where} not trusted ({detail}): pass --cacert FILE "
            "(or --web.config.file FILE, whose tls_server_config.cert_file is then trusted)"
        )
    if isinstance(reason, ssl.SSLError):
        return f"TLS handshake with {where} failed ({reason.reason or reason}): is it plain http? try http://"
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot reach {where}: connection refused (is it running?)"
    if isinstance(reason, TimeoutError):
        return f"{where} did not answer within {FETCH_TIMEOUT_S:g} s"
    if isinstance(reason, socket.gaierror):
        return f"cannot reach {where}: unknown host ({reason.strerror or reason})"
    if isinstance(reason, OSError):
        return f"cannot reach {where}: {reason.strerror or reason}"
    return f"cannot reach {where}: {reason}"


def check_port_holder(url: str, proc_net: Path = PROC_NET, caller_uid: int | None = None) -> None:
    """On a loopback ``url``: StatusError (``answer``) when a socket listening on its port is owned
    by neither root nor the caller (``caller_uid``, the effective uid by default). Any local user
    may take the port while the daemon cannot bind it (it then governs without its endpoint and
    logs ``metrics_listen_failed``) and answer with made-up metrics; the kernel's socket table
    names who listens. Nothing is checked for another host."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if host != "localhost" and not is_loopback(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = {0, os.geteuid() if caller_uid is None else caller_uid}
    strangers = sorted(listening_uids(port, proc_net) - allowed)
    if strangers:
        raise StatusError(
            f"port {port} is held by a process of uid {', '.join(map(str, strangers))}, neither root nor you: "
            "not the governor's endpoint (it logs metrics_listen_failed while another process holds its port: "
            "journalctl -u gpu-governor)",
            "answer",
        )


def fetch_status(
    url: str, *, cafile: str | None = None, username: str | None = None, password: str | None = None
) -> DaemonStatus:
    """GET the metrics endpoint and parse it; StatusError when the answer is not the governor's."""
    body = fetch_text(url, cafile=cafile, username=username, password=password)
    check_port_holder(url)
    try:
        status = parse_status(body)
    except ValueError:
        status = DaemonStatus()
    if not status.is_governor:
        raise StatusError(
            f"{url} answered, but not with gpu-governor metrics: not a gpu-governor endpoint "
            "(or the daemon has not finished its first poll: try again)",
            "answer",
        )
    return status


# ---------------------------------------------------------------------------- process table


@dataclass
class ProcessTable:
    """The process table of the daemon that answered (``rows``), or why there is none (``note``)."""

    rows: list[dict[str, object]] | None
    note: str | None
    path: str | None = None
    written_at_s: float | None = None


def read_process_table(path: str) -> list[dict[str, object]] | None:
    """The rows of a processes.json, or None when unreadable (no identity check)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    rows = data.get("processes") if isinstance(data, dict) else None
    return rows if isinstance(rows, list) else None


def _table_trust(info: os.stat_result) -> list[str]:
    """Why a process table (its ``stat``) is not shown: owned by neither root nor the caller,
    or writable by group or others."""
    problems = [p for p in root_trust_problems(info) if not p.startswith("owned by")]
    if info.st_uid not in (0, os.geteuid()):
        problems.insert(0, f"owned by uid {info.st_uid} (neither root nor you)")
    return problems


def load_process_table(status: DaemonStatus, now_s: float) -> ProcessTable:
    """The process table from the runtime directory the daemon reports, shown only when its
    identity (pid, instance) is that daemon's and it is the last one that daemon says it
    wrote (``gpu_governor_process_table_written_timestamp_seconds``), while it still can.
    The note (why it is not shown) is printable: it may quote the file and the endpoint."""
    table = _load_process_table(status, now_s)
    if table.note is not None:
        table.note = escape(table.note)
    return table


def _load_process_table(status: DaemonStatus, now_s: float) -> ProcessTable:
    if status.runtime_dir is None:
        return ProcessTable(None, "the daemon does not report its runtime directory (an older version?)")
    if not status.runtime_dir:
        return ProcessTable(None, "the daemon keeps no process table (runtime_dir is empty in its config)")
    path = f"{status.runtime_dir.rstrip('/')}/processes.json"
    try:
        # Bounded, never through a link, never blocking on a FIFO, and only a file that root or
        # the caller owns and no one else may write: the directory comes from the endpoint.
        data, _raw = read_json(Path(path), MAX_TABLE_BYTES, _table_trust)
    except FileNotFoundError:
        return ProcessTable(
            None,
            f"{path} does not exist on this machine: the daemon is remote, or cannot write there (see its log)",
            path,
        )
    except UnusableFile as exc:
        if not os.access(path, os.R_OK, follow_symlinks=False):
            return ProcessTable(
                None, f"{path} is readable only by the daemon's user (mode 0600): run status as root to see it", path
            )
        return ProcessTable(None, f"{path} cannot be used: {exc.why}", path)
    daemon = data.get("daemon") if isinstance(data, dict) else None
    rows = data.get("processes") if isinstance(data, dict) else None
    written = data.get("written_at_s") if isinstance(data, dict) else None
    if not isinstance(daemon, dict) or not isinstance(rows, list) or not isinstance(written, (int, float)):
        return ProcessTable(None, f"{path} is not a process table of this version (no daemon identity)", path)
    if daemon.get("pid") != status.pid or daemon.get("instance") != status.instance:
        return ProcessTable(
            None,
            f"{path} is from another daemon (pid {daemon.get('pid')}, written {_ago(now_s - written)}), "
            f"not from the one that answered (pid {status.pid})",
            path,
            float(written),
        )
    if status.table_ok is False:
        return ProcessTable(
            None,
            f"{path} is stale (written {_ago(now_s - written)}): the daemon can no longer write it (see its log)",
            path,
            float(written),
        )
    # Older than the last table the daemon reports writing: left over. Newer (or the metrics
    # knew of none yet) is the same daemon's table written after the scrape (a tick came
    # between the two reads), not a stale one.
    if status.table_written_s is not None and written < status.table_written_s - 0.001:
        return ProcessTable(
            None,
            f"{path} is stale (written {_ago(now_s - written)}; "
            f"the daemon's last table: {_ago(now_s - status.table_written_s)})",
            path,
            float(written),
        )
    return ProcessTable(rows, None, path, float(written))


# ---------------------------------------------------------------------------- text


def _fmt(value: float | None, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{unit}"


def _ago(seconds: float) -> str:
    """``12 s ago``, ``10 min ago``, ``3 h ago``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _gib(value: float | None) -> str:
    return _fmt(value, " GiB", 2**30, 2)


def _aligned(table: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]


def render_processes(rows: list[dict[str, object]]) -> str:
    """The process table: which class each GPU process got, its budget, and why."""
    header = ("GPU", "PID", "NAME", "CLASS", "VRAM", "BUDGET", "MATCHED")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        used = row.get("used_bytes")
        budget = row.get("budget_bytes")
        why = str(row.get("why") or "")
        if row.get("protected"):
            why += f" [protected: {row['protected']}]"
        cells = (
            str(row.get("gpu")),
            str(row.get("pid")),
            str(row.get("name")),
            str(row.get("class")),
            _gib(float(used)) if isinstance(used, (int, float)) else "-",
            _gib(float(budget)) if isinstance(budget, (int, float)) else "none",
            why,
        )
        table.append(tuple(escape(cell) for cell in cells))  # the file is the daemon's, its text is not
    return "\n".join(_aligned(table)) + "\n"


def describe_power(d: PowerDecision, now_s: float) -> str:
    """``200 W -> 180 W 12 s ago: temperature 77 C >= 75 C for 3 consecutive samples``."""
    change = f"{_fmt(d.from_w, ' W')} -> {_fmt(d.to_w, ' W')}"
    when = "" if d.at_s is None else f" {_ago(now_s - d.at_s)}"
    outcome = "" if d.outcome in ("applied", "reported", "") else f" [{d.outcome}]"
    return f"{change}{when}{outcome}: {d.reason or d.rule}"


def describe_vram(d: VramDecision, now_s: float) -> str:
    """``sigterm pid 4242 (class leaky, 3.10 GiB > 3.00 GiB) 5 s ago: ...``."""
    sizes = f"{_gib(d.used_bytes)} > {_gib(d.budget_bytes)}" if d.budget_bytes is not None else _gib(d.used_bytes)
    action = "report" if d.action == "none" else d.action
    when = "" if d.at_s is None else f" {_ago(now_s - d.at_s)}"
    outcome = "" if d.outcome in ("applied", "reported", "") else f" [{d.outcome}]"
    if d.action in ("stop_unit", "start_unit"):
        return f"{action} (class {d.klass}){when}{outcome}: {d.reason or d.rule}"
    return f"{action} pid {d.pid} (class {d.klass}, {sizes}){when}{outcome}: {d.reason or d.rule}"


def _in(seconds: float) -> str:
    """``in 45 s``, ``in 3 min``."""
    return "now" if seconds <= 0.5 else "in " + _ago(seconds)[: -len(" ago")]


def describe_units(status: DaemonStatus, now_s: float) -> list[str]:
    """The units the governor stopped and when each resumes, kill-restart loops, an unreachable systemd."""
    lines = []
    for unit in sorted(status.stopped_units.values(), key=lambda u: u.unit):
        when = "" if unit.stopped_at_s is None else f" {_ago(now_s - unit.stopped_at_s)}"
        if unit.resume_after_s is None:
            resume = "not resumed (its class has resume = false): systemctl start it"
        elif unit.resume_at_s is not None:
            resume = f"resumes {_in(unit.resume_at_s - now_s)} if the reserve stays clear"
        else:
            resume = f"resumes once the reserve and its budget have been free for {unit.resume_after_s:.0f} s"
        why = unit.reason.replace("_", " ")
        lines.append(f"unit {unit.unit} (class {unit.klass}) stopped{when} ({why}); {resume}")
    for name in sorted(status.restart_loops):
        lines.append(f"unit {name}: kill-restart loop (Restart= undoes the kill): no longer signalled")
    if status.systemd_reachable is False:
        lines.append("systemd does not answer on the system bus: units are neither stopped nor started")
    return lines


def render_status(status: DaemonStatus, now_s: float | None = None) -> str:
    """The status table as text; ``now_s`` (Unix time, default now) dates decisions and data."""
    now_s = time.time() if now_s is None else now_s
    age = "" if status.last_poll_s is None else f", data {_ago(now_s - status.last_poll_s)}"
    ident = f"pid {status.pid}" if status.pid is not None else "pid ?"
    started = "" if status.started_at_s is None else f", up {_ago(now_s - status.started_at_s)[:-4]}"
    lines = [
        f"gpu-governor {status.version or '?'} ({ident}{started}), backend {status.backend or '?'}, "
        f"{status.mode or '?'}{age}",
        f"config: {status.config or '?'}"
        + ("  (last reload FAILED: old config in force)" if status.config_ok is False else ""),
        "",
    ]
    header = ("GPU", "NAME", "TEMP", "ZONE", "HEALTH", "POWER", "LIMIT", "TARGET", "MEMORY", "MIG", "MODE")
    rows: list[tuple[str, ...]] = [header]
    decisions: list[str] = []
    for r in status.rows():
        memory = f"{_fmt(r.memory_used_bytes, '', 2**30, 1)}/{_fmt(r.memory_total_bytes, ' GiB', 2**30, 1)}"
        rows.append(
            (
                r.gpu,
                r.name or "?",
                _fmt(r.temperature_c, " C"),
                r.zone or "-",
                r.health or "-",
                _fmt(r.power_w, " W"),
                _fmt(r.limit_w, " W"),
                _fmt(r.target_w, " W") if r.target_w is not None else "hands-off",
                memory,
                "-" if r.mig_enabled is None else f"on ({len(r.mig_instances)})" if r.mig_enabled else "off",
                "monitor-only" if r.monitor_only else "dry-run" if status.dry_run else "governed",
            )
        )
        for m in sorted(r.mig_instances.values(), key=lambda m: m.uuid):
            used = f"{_fmt(m.memory_used_bytes, '', 2**30, 1)}/{_fmt(m.memory_total_bytes, ' GiB', 2**30, 1)}"
            decisions.append(
                f"GPU {r.gpu} MIG instance {m.uuid}: {used}" + (" (memory pressure)" if m.memory_pressure else "")
            )
        power = "-" if r.last_power is None else describe_power(r.last_power, now_s)
        vram = "-" if r.last_vram is None else describe_vram(r.last_vram, now_s)
        decisions.append(f"GPU {r.gpu} last power decision: {power}")
        decisions.append(f"GPU {r.gpu} last VRAM decision:  {vram}")
    units = describe_units(status, now_s)
    text = [*lines, *_aligned(rows), "", *decisions, *(["", *units] if units else [])]
    return "\n".join(escape(line) for line in text) + "\n"  # labels are whatever the endpoint sent


def render_problems(status: DaemonStatus) -> list[str]:
    """One line per lost or degraded GPU (empty when all are ok)."""
    return [escape(f"GPU {r.gpu} ({r.uuid}) is {r.health}") for r in status.unhealthy()]


# ---------------------------------------------------------------------------- JSON


def _power_json(d: PowerDecision | None, now_s: float) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "rule": d.rule,
        "from_w": d.from_w,
        "to_w": d.to_w,
        "reason": d.reason,
        "outcome": d.outcome,
        "at_s": d.at_s,
        "age_s": None if d.at_s is None else round(max(0.0, now_s - d.at_s), 3),
    }


def _vram_json(d: VramDecision | None, now_s: float) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "rule": d.rule,
        "action": d.action,
        "pid": d.pid,
        "class": d.klass,
        "used_bytes": None if d.used_bytes is None else int(d.used_bytes),
        "budget_bytes": None if d.budget_bytes is None else int(d.budget_bytes),
        "reason": d.reason,
        "outcome": d.outcome,
        "at_s": d.at_s,
        "age_s": None if d.at_s is None else round(max(0.0, now_s - d.at_s), 3),
    }


def _bytes(value: float | None) -> int | None:
    return None if value is None else int(value)


def status_json(status: DaemonStatus, table: ProcessTable, url: str, now_s: float) -> dict[str, Any]:
    """The ``--json`` document (docs/status-json.md); missing values are None, never 0."""
    gpus = []
    for r in status.rows():
        gpu_mode = "monitor-only" if r.monitor_only else None if status.dry_run is None else status.mode
        gpus.append(
            {
                "index": r.index,
                "uuid": r.uuid,
                "name": r.name,
                "health": r.health,
                "zone": r.zone,
                "mode": gpu_mode,
                "readings": {
                    "temperature_c": r.temperature_c,
                    "power_w": r.power_w,
                    "memory_used_bytes": _bytes(r.memory_used_bytes),
                    "memory_total_bytes": _bytes(r.memory_total_bytes),
                    "utilization_ratio": r.utilization_ratio,
                },
                "limits": {
                    "enforced_w": r.limit_w,
                    "min_w": r.limit_min_w,
                    "max_w": r.limit_max_w,
                    "default_w": r.limit_default_w,
                },
                "target_w": r.target_w,
                "mig_enabled": r.mig_enabled,
                "mig_instances": [
                    {
                        "uuid": m.uuid,
                        "memory_used_bytes": _bytes(m.memory_used_bytes),
                        "memory_total_bytes": _bytes(m.memory_total_bytes),
                        "memory_pressure": m.memory_pressure,
                    }
                    for m in sorted(r.mig_instances.values(), key=lambda m: m.uuid)
                ],
                "last_power_decision": _power_json(r.last_power, now_s),
                "last_vram_decision": _vram_json(r.last_vram, now_s),
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "url": url,
        "fetched_at_s": round(now_s, 3),
        "daemon": {
            "pid": status.pid,
            "instance": status.instance,
            "version": status.version,
            "backend": status.backend,
            "started_at_s": status.started_at_s,
            "uptime_s": None if status.started_at_s is None else round(max(0.0, now_s - status.started_at_s), 3),
            "runtime_dir": status.runtime_dir,
            "config": status.config,
            "config_reload_ok": status.config_ok,
            "poll_interval_s": status.poll_interval_s,
            "ready": status.ready,
        },
        "mode": status.mode,
        "last_poll_at_s": status.last_poll_s,
        "data_age_s": None if status.last_poll_s is None else round(max(0.0, now_s - status.last_poll_s), 3),
        "healthy": not status.unhealthy(),
        "gpus": gpus,
        "stopped_units": [_unit_json(u, now_s) for u in sorted(status.stopped_units.values(), key=lambda u: u.unit)],
        "restart_loops": sorted(status.restart_loops),
        "systemd_reachable": status.systemd_reachable,
        "processes": None if table.rows is None else [_process_json(row) for row in table.rows],
        "processes_note": table.note,
        "processes_written_at_s": table.written_at_s,
    }


def _process_json(row: dict[str, object]) -> dict[str, object]:
    keys = ("gpu", "pid", "name", "class", "used_bytes", "budget_bytes", "why", "unit", "user", "protected")
    return {key: row.get(key) for key in keys}


def _unit_json(unit: StoppedUnitRow, now_s: float) -> dict[str, object]:
    return {
        "unit": unit.unit,
        "class": unit.klass,
        "reason": unit.reason,
        "stopped_at_s": unit.stopped_at_s,
        "resume": unit.resume_after_s is not None,
        "resume_after_s": unit.resume_after_s,
        "resume_at_s": unit.resume_at_s,
        "resume_in_s": None if unit.resume_at_s is None else round(max(0.0, unit.resume_at_s - now_s), 3),
    }
