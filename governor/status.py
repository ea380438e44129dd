"""``gpu-governor status``: read the running daemon's metrics endpoint and print a table.

It reads only what the daemon publishes, so it needs no NVML access and no root.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

FETCH_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class GpuRow:
    """What the table shows for one GPU."""

    gpu: str
    uuid: str
    name: str = "?"
    temperature_c: float | None = None
    zone: str = "?"
    health: str = "?"
    power_w: float | None = None
    limit_w: float | None = None
    target_w: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    monitor_only: bool = False
    last_decision_s: float | None = None
    last_decision: str = "-"


@dataclass
class DaemonStatus:
    """The daemon-level facts and every GPU row."""

    version: str = "?"
    backend: str = "?"
    dry_run: bool = False
    config: str = "?"
    config_ok: bool = True
    gpus: dict[str, GpuRow] = field(default_factory=dict)


_GAUGES = {
    "gpu_governor_gpu_temperature_celsius": "temperature_c",
    "gpu_governor_gpu_power_watts": "power_w",
    "gpu_governor_gpu_power_limit_watts": "limit_w",
    "gpu_governor_gpu_power_limit_target_watts": "target_w",
    "gpu_governor_gpu_memory_used_bytes": "memory_used_bytes",
    "gpu_governor_gpu_memory_total_bytes": "memory_total_bytes",
    "gpu_governor_gpu_last_decision_timestamp_seconds": "last_decision_s",
}


def parse_status(text: str) -> DaemonStatus:
    """Build a DaemonStatus from Prometheus text exposition."""
    status = DaemonStatus()

    def row(labels: dict[str, str]) -> GpuRow:
        key = labels["gpu"]
        if key not in status.gpus:
            status.gpus[key] = GpuRow(gpu=key, uuid=labels.get("uuid", "?"))
        return status.gpus[key]

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gpu_governor_build_info":
                status.version = labels.get("version", "?")
                status.backend = labels.get("backend", "?")
                status.dry_run = labels.get("dry_run") == "true"
            elif sample.name == "gpu_governor_config_info":
                status.config = labels.get("source", "?")
            elif sample.name == "gpu_governor_config_last_reload_successful":
                status.config_ok = sample.value == 1
            elif sample.name == "gpu_governor_gpu_info":
                row(labels).name = labels.get("name", "?")
            elif sample.name in _GAUGES and "gpu" in labels:
                setattr(row(labels), _GAUGES[sample.name], sample.value)
            elif sample.name == "gpu_governor_gpu_thermal_zone" and sample.value == 1:
                row(labels).zone = labels["gpu_governor_gpu_thermal_zone"]
            elif sample.name == "gpu_governor_gpu_health" and sample.value == 1:
                row(labels).health = labels["gpu_governor_gpu_health"]
            elif sample.name == "gpu_governor_gpu_last_decision_info":
                change = f"{labels.get('from', '?')} -> {labels.get('to', '?')}"
                row(labels).last_decision = f"{labels.get('rule', '?')} {change}"
            elif sample.name == "gpu_governor_gpu_monitor_only" and "gpu" in labels:
                row(labels).monitor_only = sample.value == 1
    return status


def fetch_status(
    url: str, *, cafile: str | None = None, username: str | None = None, password: str | None = None
) -> DaemonStatus:
    """GET the metrics endpoint and parse it; ``cafile`` trusts a self-signed TLS certificate,
    ``username``/``password`` answer basic auth."""
    import base64
    import ssl

    request = urllib.request.Request(url)  # noqa: S310 - URL given by the user
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S, context=context) as response:  # noqa: S310
        body = response.read(MAX_BODY_BYTES).decode("utf-8", errors="replace")
    return parse_status(body)


def _fmt(value: float | None, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{unit}"


def _aligned(table: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]


def read_process_table(path: str) -> list[dict[str, object]] | None:
    """The daemon's process table (runtime_dir/processes.json), or None when unreadable."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    rows = data.get("processes") if isinstance(data, dict) else None
    return rows if isinstance(rows, list) else None


def render_processes(rows: list[dict[str, object]]) -> str:
    """The process table: which class each GPU process got and why."""
    header = ("GPU", "PID", "NAME", "CLASS", "VRAM", "BUDGET", "MATCHED")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        used = row.get("used_bytes")
        budget = row.get("budget_bytes")
        why = str(row.get("why") or "")
        if row.get("protected"):
            why += f" [protected: {row['protected']}]"
        table.append(
            (
                str(row.get("gpu")),
                str(row.get("pid")),
                str(row.get("name")),
                str(row.get("class")),
                _fmt(float(used), " GiB", 2**30, 2) if isinstance(used, (int, float)) else "-",
                _fmt(float(budget), " GiB", 2**30, 2) if isinstance(budget, (int, float)) else "-",
                why,
            )
        )
    return "\n".join(_aligned(table)) + "\n"


def _last_decision(row: GpuRow, now_s: float) -> str:
    """``rule from -> to (N s ago)``, or ``-`` before the first decision."""
    if row.last_decision == "-" or row.last_decision_s is None:
        return "-"
    return f"{row.last_decision} ({max(0.0, now_s - row.last_decision_s):.0f} s ago)"


def render_status(status: DaemonStatus, now_s: float | None = None) -> str:
    """The status table as text; ``now_s`` (Unix time, default now) dates the last decisions."""
    now_s = time.time() if now_s is None else now_s
    mode = "dry-run" if status.dry_run else "enforcing"
    lines = [
        f"gpu-governor {status.version}, backend {status.backend}, {mode}",
        f"config: {status.config}" + ("" if status.config_ok else "  (last reload FAILED: old config in force)"),
        "",
    ]
    header = ("GPU", "NAME", "TEMP", "ZONE", "HEALTH", "POWER", "LIMIT", "TARGET", "MEMORY", "MODE", "LAST DECISION")
    rows: list[tuple[str, ...]] = [header]
    for key in sorted(status.gpus, key=lambda k: int(k) if k.isdigit() else 0):
        r = status.gpus[key]
        memory = f"{_fmt(r.memory_used_bytes, '', 2**30, 1)}/{_fmt(r.memory_total_bytes, ' GiB', 2**30, 1)}"
        rows.append(
            (
                r.gpu,
                r.name,
                _fmt(r.temperature_c, " C"),
                r.zone,
                r.health,
                _fmt(r.power_w, " W"),
                _fmt(r.limit_w, " W"),
                _fmt(r.target_w, " W") if r.target_w is not None else "hands-off",
                memory,
                "monitor-only" if r.monitor_only else "governed",
                _last_decision(r, now_s),
            )
        )
    return "\n".join(lines + _aligned(rows)) + "\n"
