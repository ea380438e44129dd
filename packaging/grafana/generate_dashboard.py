"""Generate the gpu-governor Grafana dashboard (gpu-governor.json) with Grafana's Foundation SDK.

The JSON beside this script is what users import; this script is how it is made, so a
change goes here and the JSON is regenerated, never edited by hand::

    python3 -m venv /tmp/gfsdk
    /tmp/gfsdk/bin/pip install 'grafana-foundation-sdk==1769699379!11.6.0'
    /tmp/gfsdk/bin/python packaging/grafana/generate_dashboard.py > packaging/grafana/gpu-governor.json

(The SDK's versions carry an epoch, so pin the Grafana line you want: 11.6 here, whose
dashboards have schemaVersion 41. The SDK needs Python >= 3.11.)

Every query is filtered by the template variables ``$job``, ``$instance`` (the host) and,
for per-GPU series, ``$gpu``; the data source is the variable ``${datasource}``, so
no data source uid is baked in. tests/test_monitoring.py checks the JSON's structure and
parses every expression with promtool; tests/system/test_prometheus_e2e.py runs them all
against a real Prometheus scraping a simulated hot governor.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

UID = "gpu-governor"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
HOST = 'job=~"$job",instance=~"$instance"'
GPU = f'{HOST},gpu=~"$gpu"'
GPU_LEGEND = "{{instance}} GPU {{gpu}}"

ZONES: tuple[tuple[str, str], ...] = (
    ("optimal", "green"),
    ("warning", "yellow"),
    ("hot", "orange"),
    ("throttle", "red"),
    ("critical", "dark-red"),
)
"""Thermal zones by severity (the state timeline's value is the index) and their colours."""

DECISIONS_ANNOTATION = (
    f"gpu_governor_gpu_last_decision_timestamp_seconds{{{GPU}}} * 1000"
    f" * on (instance, job, gpu) group_left (rule, from, to) gpu_governor_gpu_last_decision_info{{{GPU}}}"
)
"""Each governor decision as an annotation on every time-series panel, at the decision's own time.

The last decision's Unix time (ms, Grafana's "series value as timestamp") and its rule and
change (from the info series): Grafana marks each distinct value once, so a decision shows
where it happened, not rounded to a query step, and the first one is not missed as an
increase() of the decisions counter would miss it. Two decisions for one GPU between two
scrapes show as the later one."""

SLOWDOWN_REASONS = "sw_power_cap|hw_slowdown|sw_thermal_slowdown|hw_thermal_slowdown|hw_power_brake_slowdown"


def query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    """A range query on the dashboard's data source."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range().datasource(DATASOURCE)


P = TypeVar("P", timeseries.Panel, statetimeline.Panel, stat.Panel)


def with_queries(panel: P, queries: list[tuple[str, str]]) -> P:
    """Attach ``(expr, legend)`` queries with refIds A, B, C, ..."""
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def graph(title: str, description: str, unit: str, queries: list[tuple[str, str]], w: int = 12) -> timeseries.Panel:
    """A time series panel with a table legend showing last and max."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(8)
        .fill_opacity(0)
        .line_width(1)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    return with_queries(panel, queries)


def per_minute(by: str, counter: str, selector: str) -> str:
    """Events per minute of ``counter``, summed by the ``by`` labels."""
    return f"sum by ({by}) (rate({counter}{{{selector}}}[$__rate_interval])) * 60"


def line_style(fill: str) -> dm.DynamicConfigValue:
    """Override property: a dashed or dotted line (for limits and thresholds)."""
    dash = [10.0, 10.0] if fill == "dash" else [0.0, 10.0]
    return dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": fill, "dash": dash})


def colour(name: str) -> dm.DynamicConfigValue:
    """Override property: a fixed colour."""
    return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": name})


def stat_panel(
    title: str, description: str, expr: str, legend: str, mapping: dict[str, tuple[str, str]] | None = None
) -> stat.Panel:
    """A small stat panel, one value per series; ``mapping`` turns values into coloured words."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(4)
        .height(4)
        .color_mode(cm.BigValueColorMode.BACKGROUND if mapping else cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mapping:
        panel = panel.mappings(
            [
                dm.ValueMap(
                    options={
                        value: dm.ValueMappingResult(text=text, color=color, index=i)
                        for i, (value, (text, color)) in enumerate(mapping.items())
                    }
                )
            ]
        )
    return with_queries(panel, [(expr, legend)])


def zone_expr() -> str:
    """One number per GPU: the index of its thermal zone in ZONES, -1 while unknown."""
    parts = [
        f'(gpu_governor_gpu_thermal_zone{{{GPU},gpu_governor_gpu_thermal_zone="{zone}"}} == 1) * {i}'
        for i, (zone, _) in enumerate(ZONES)
    ]
    parts.append(f"(max without (gpu_governor_gpu_thermal_zone) (gpu_governor_gpu_thermal_zone{{{GPU}}}) == 0) - 1")
    return "max by (instance, gpu) (\n  " + "\n  or ".join(parts) + "\n)"


def overview_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("Overview"))
    ok = {"1": ("yes", "green"), "0": ("no", "red")}
    for panel in (
        stat_panel(
            "Governing",
            "gpu_governor_ready: 1 once the backend is open and a first snapshot was taken.",
            f"min by (instance) (gpu_governor_ready{{{HOST}}})",
            "{{instance}}",
            ok,
        ),
        stat_panel(
            "Config reload OK",
            "gpu_governor_config_last_reload_successful: 0 after a refused reload (the old config stays in force).",
            f"min by (instance) (gpu_governor_config_last_reload_successful{{{HOST}}})",
            "{{instance}}",
            ok,
        ),
        stat_panel(
            "Version, backend, dry run",
            "gpu_governor_build_info. dry_run=true: decisions are logged, no limit is changed.",
            f"max by (instance, version, backend, dry_run) (gpu_governor_build_info{{{HOST}}})",
            "{{version}} {{backend}} dry_run={{dry_run}}",
        ).text_mode(cm.BigValueTextMode.NAME),
        stat_panel(
            "GPUs not healthy",
            "GPUs whose health is degraded (readings missing) or lost (gpu_governor_gpu_health).",
            f'sum by (instance) (gpu_governor_gpu_health{{{GPU},gpu_governor_gpu_health!="ok"}})',
            "{{instance}}",
        ).thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(color="green"), dm.Threshold(value=1, color="red")])
        ),
        stat_panel(
            "GPUs monitor-only",
            "GPUs whose limit the governor cannot set (gpu_governor_gpu_monitor_only): watched, not governed.",
            f"sum by (instance) (gpu_governor_gpu_monitor_only{{{GPU}}})",
            "{{instance}}",
        ).thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(color="green"), dm.Threshold(value=1, color="orange")])
        ),
        stat_panel(
            "Uptime",
            "Time since the governor started (gpu_governor_start_timestamp_seconds).",
            f"time() - gpu_governor_start_timestamp_seconds{{{HOST}}}",
            "{{instance}}",
        ).unit("s"),
    ):
        dash = dash.with_panel(panel)
    return dash


def thermal_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("Thermal"))
    temperature = graph(
        "Temperature and zone thresholds",
        "GPU temperature, with the lower bound of each thermal zone from the governor's own config "
        "(gpu_governor_gpu_thermal_zone_threshold_celsius; the highest across the selected GPUs: "
        "select one GPU to see its own).",
        "celsius",
        [
            (f"gpu_governor_gpu_temperature_celsius{{{GPU}}}", GPU_LEGEND),
            (
                f'max by (zone) (gpu_governor_gpu_thermal_zone_threshold_celsius{{{GPU},zone!="optimal"}})',
                "{{zone}} from",
            ),
        ],
        w=16,
    )
    for zone, color in ZONES[1:]:
        temperature = temperature.override_by_name(f"{zone} from", [line_style("dash"), colour(color)])
    zone_timeline = (
        statetimeline.Panel()
        .title("Thermal zone")
        .description("The zone each GPU is in (gpu_governor_gpu_thermal_zone), with hysteresis applied.")
        .datasource(DATASOURCE)
        .span(8)
        .height(8)
        .show_value(cm.VisibilityMode.NEVER)
        .mappings(
            [
                dm.ValueMap(
                    options={
                        str(i): dm.ValueMappingResult(text=zone, color=color, index=i)
                        for i, (zone, color) in enumerate(ZONES)
                    }
                    | {"-1": dm.ValueMappingResult(text="unknown", color="text", index=len(ZONES))}
                )
            ]
        )
    )
    zone_timeline = with_queries(zone_timeline, [(zone_expr(), GPU_LEGEND)])
    reasons = (
        statetimeline.Panel()
        .title("Clock slowdown reasons")
        .description(
            "NVML clock event reasons that slow the GPU down (gpu_governor_gpu_clock_event_reason_active): "
            "sw_power_cap is the power limit at work; the thermal and hw_* ones mean the GPU itself is "
            "protecting itself."
        )
        .datasource(DATASOURCE)
        .span(24)
        .height(8)
        .show_value(cm.VisibilityMode.NEVER)
        .mappings(
            [
                dm.ValueMap(
                    options={
                        "0": dm.ValueMappingResult(text="inactive", color="transparent", index=0),
                        "1": dm.ValueMappingResult(text="active", color="orange", index=1),
                    }
                )
            ]
        )
    )
    reasons = with_queries(
        reasons,
        [
            (
                "max by (instance, gpu, reason) "
                f'(gpu_governor_gpu_clock_event_reason_active{{{GPU},reason=~"{SLOWDOWN_REASONS}"}})',
                "{{instance}} GPU {{gpu}} {{reason}}",
            )
        ],
    )
    for panel in (temperature, zone_timeline, reasons):
        dash = dash.with_panel(panel)
    return dash


def power_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("Power"))
    power = graph(
        "Power draw vs enforced and target limit",
        "Draw (gpu_governor_gpu_power_watts), the limit the driver enforces (dashed) and the limit "
        "the governor wants (dotted, absent while it is hands-off). Enforced below target: someone "
        "else (a BMC, an admin) set a lower limit.",
        "watt",
        [
            (f"gpu_governor_gpu_power_watts{{{GPU}}}", f"{GPU_LEGEND} draw"),
            (f"gpu_governor_gpu_power_limit_watts{{{GPU}}}", f"{GPU_LEGEND} enforced"),
            (f"gpu_governor_gpu_power_limit_target_watts{{{GPU}}}", f"{GPU_LEGEND} target"),
        ],
        w=16,
    )
    power = power.override_by_regexp("/ enforced$/", [line_style("dash")]).override_by_regexp(
        "/ target$/", [line_style("dot"), dm.DynamicConfigValue(id_val="custom.lineWidth", value=2)]
    )
    rung = (
        graph(
            "Power ladder rung",
            "Current rung of the power ladder, 0 = top (gpu_governor_gpu_power_ladder_rung; absent while hands-off).",
            "none",
            [(f"gpu_governor_gpu_power_ladder_rung{{{GPU}}}", GPU_LEGEND)],
            w=8,
        )
        .line_interpolation(cm.LineInterpolation.STEP_AFTER)
        .decimals(0)
        .min(0)
    )
    utilization = graph(
        "GPU utilization",
        "Busy ratio of each GPU (gpu_governor_gpu_utilization_ratio).",
        "percentunit",
        [(f"gpu_governor_gpu_utilization_ratio{{{GPU}}}", GPU_LEGEND)],
        w=24,
    ).max(1)
    for panel in (power, rung, utilization):
        dash = dash.with_panel(panel)
    return dash


MIG_LEGEND = "{{instance}} GPU {{gpu}} {{mig_uuid}}"
"""A MIG instance: the host, the physical GPU and the MIG device's own UUID (``mig_uuid``)."""
PRESSURE_STATES = {"0": ("ok", "green"), "1": ("pressure", "red")}
"""Memory pressure (0/1) as words on a state timeline."""


def state_timeline(
    title: str, description: str, expr: str, legend: str, states: dict[str, tuple[str, str]], w: int
) -> statetimeline.Panel:
    """A state timeline whose values ``states`` maps to coloured words (value -> (text, colour))."""
    panel = (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(w)
        .height(8)
        .show_value(cm.VisibilityMode.NEVER)
        .mappings(
            [
                dm.ValueMap(
                    options={
                        value: dm.ValueMappingResult(text=text, color=color, index=i)
                        for i, (value, (text, color)) in enumerate(states.items())
                    }
                )
            ]
        )
    )
    return with_queries(panel, [(expr, legend)])


def vram_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("VRAM"))
    by_class = graph(
        "VRAM per class vs budget and reserve",
        "VRAM used by each process class on each GPU (gpu_governor_class_vram_used_bytes), each class's "
        "budget (dashed), all VRAM used, and the GPU's total minus the configured reserve (dotted): "
        "used above that line is memory pressure.",
        "bytes",
        [
            (
                f"sum by (instance, gpu, class) (gpu_governor_class_vram_used_bytes{{{GPU}}})",
                f"{GPU_LEGEND} {{{{class}}}}",
            ),
            (f"max by (class) (gpu_governor_class_vram_budget_bytes{{{HOST}}})", "{{class}} budget"),
            (f"gpu_governor_gpu_memory_used_bytes{{{GPU}}}", f"{GPU_LEGEND} used (all)"),
            (
                f"gpu_governor_gpu_memory_total_bytes{{{GPU}}} - gpu_governor_gpu_vram_reserve_bytes{{{GPU}}}",
                f"{GPU_LEGEND} total minus reserve",
            ),
        ],
        w=16,
    )
    by_class = by_class.override_by_regexp("/ budget$/", [line_style("dash")]).override_by_regexp(
        "/ total minus reserve$/", [line_style("dot"), colour("red")]
    )
    processes = graph(
        "Processes per class",
        "GPU processes per class (gpu_governor_class_processes), those over their class budget, and "
        "processes no class matched.",
        "none",
        [
            (
                f"sum by (instance, gpu, class) (gpu_governor_class_processes{{{GPU}}})",
                f"{GPU_LEGEND} {{{{class}}}}",
            ),
            (
                f"sum by (instance, gpu, class) (gpu_governor_class_over_budget_processes{{{GPU}}})",
                f"{GPU_LEGEND} {{{{class}}}} over budget",
            ),
            (f"gpu_governor_unclassified_processes{{{GPU}}}", f"{GPU_LEGEND} unclassified"),
        ],
        w=8,
    ).decimals(0)
    actions = (
        graph(
            "Process actions per minute",
            "What the governor did to over-budget processes (gpu_governor_process_actions_total): "
            "over_budget reports, sigterm, sigkill, by outcome (dry_run: would have).",
            "none",
            [
                (
                    per_minute("instance, class, action, outcome", "gpu_governor_process_actions_total", HOST),
                    "{{instance}} {{class}} {{action}} {{outcome}}",
                )
            ],
        )
        .draw_style(cm.GraphDrawStyle.BARS)
        .no_value("none")
    )
    pressure = state_timeline(
        "Memory pressure",
        "1 while free VRAM is below the configured reserve (gpu_governor_gpu_memory_pressure).",
        f"gpu_governor_gpu_memory_pressure{{{GPU}}}",
        GPU_LEGEND,
        PRESSURE_STATES,
        w=12,
    )
    for panel in (by_class, processes, actions, pressure):
        dash = dash.with_panel(panel)
    return dash


def mig_row(dash: db.Dashboard) -> db.Dashboard:
    """MIG (Multi-Instance GPU): each instance's own memory and pressure, which the VRAM rule judges
    per instance, and each GPU's MIG mode. The instance series exist only while a GPU in MIG mode is
    read per instance, and the mode is absent on GPUs without MIG: on other hosts the row is empty.
    Last on the dashboard, so the panel ids before it (links with viewPanel=N) stay as they were."""
    dash = dash.with_row(db.Row("MIG"))
    mode = state_timeline(
        "MIG mode",
        "Whether each GPU is in MIG mode (gpu_governor_gpu_mig_mode, read every 10 s); no series for a GPU "
        "without MIG support or whose mode NVML does not know.",
        f"max by (instance, gpu) (gpu_governor_gpu_mig_mode{{{GPU}}})",
        GPU_LEGEND,
        {"0": ("off", "text"), "1": ("MIG", "blue")},
        w=8,
    )
    memory = graph(
        "MIG instance memory used vs total",
        "VRAM used in each MIG instance (gpu_governor_mig_instance_memory_used_bytes) against the "
        "instance's own total (dashed, gpu_governor_mig_instance_memory_total_bytes). The reserve and "
        "pressure_used_ratio apply to each instance's memory, not to the card's.",
        "bytes",
        [
            (f"gpu_governor_mig_instance_memory_used_bytes{{{GPU}}}", f"{MIG_LEGEND} used"),
            (f"gpu_governor_mig_instance_memory_total_bytes{{{GPU}}}", f"{MIG_LEGEND} total"),
        ],
        w=16,
    ).override_by_regexp("/ total$/", [line_style("dash")])
    pressure = state_timeline(
        "MIG instance memory pressure",
        "1 while a MIG instance's free VRAM is below the reserve or its use above pressure_used_ratio "
        "(gpu_governor_mig_instance_memory_pressure): over-budget processes in it are acted on before "
        "their grace, one per cooldown in each instance.",
        f"gpu_governor_mig_instance_memory_pressure{{{GPU}}}",
        MIG_LEGEND,
        PRESSURE_STATES,
        w=24,
    )
    for panel in (mode, memory, pressure):
        dash = dash.with_panel(panel)
    return dash


def decisions_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("Decisions and actions"))
    decisions = graph(
        "Decisions per minute by rule",
        "Decisions taken (gpu_governor_decisions_total) by GPU, rule and action: zone changes, "
        "power steps, holds, drift re-applies, restores.",
        "none",
        [
            (
                per_minute("instance, gpu, rule, action", "gpu_governor_decisions_total", GPU),
                "{{instance}} GPU {{gpu}} {{rule}} {{action}}",
            )
        ],
    ).draw_style(cm.GraphDrawStyle.BARS)
    actions = graph(
        "Power-limit actions per minute by outcome",
        "What the actuator did (gpu_governor_actions_total): applied, dry_run, unchanged, refused, failed.",
        "none",
        [
            (
                per_minute("instance, gpu, action, outcome", "gpu_governor_actions_total", GPU),
                "{{instance}} GPU {{gpu}} {{action}} {{outcome}}",
            )
        ],
    ).draw_style(cm.GraphDrawStyle.BARS)
    since = graph(
        "Time since last decision",
        "Seconds since the last decision for each GPU (gpu_governor_gpu_last_decision_timestamp_seconds).",
        "s",
        [(f"time() - gpu_governor_gpu_last_decision_timestamp_seconds{{{GPU}}}", GPU_LEGEND)],
        w=24,
    )
    for panel in (decisions, actions, since):
        dash = dash.with_panel(panel)
    return dash


def hardware_row(dash: db.Dashboard) -> db.Dashboard:
    """Issue 14's NVML telemetry. Each series is absent where the GPU does not support the
    reading (fan speed on most data-center boards, memory temperature on GeForce, ECC on
    boards without ECC), and the XID and ECC counters exist only once the hardware had an
    event: an empty panel there means "nothing reported", never "0"."""
    dash = dash.with_row(db.Row("Hardware telemetry"))
    clocks = graph(
        "SM and memory clocks",
        "Current SM clock (solid) and memory clock (dashed) of each GPU "
        "(gpu_governor_gpu_sm_clock_hertz, gpu_governor_gpu_memory_clock_hertz).",
        "hertz",
        [
            (f"gpu_governor_gpu_sm_clock_hertz{{{GPU}}}", f"{GPU_LEGEND} SM"),
            (f"gpu_governor_gpu_memory_clock_hertz{{{GPU}}}", f"{GPU_LEGEND} memory"),
        ],
    ).override_by_regexp("/ memory$/", [line_style("dash")])
    events = graph(
        "Time slowed down, by reason",
        "Share of the time each clock-event reason held the clocks down (rate of "
        "gpu_governor_gpu_clock_event_seconds_total): unlike the state timeline above, it also "
        "counts slowdowns that came and went between two scrapes. sw_power_cap is the power "
        "limit at work (often the governor's own); the thermal and hw_* reasons are the GPU "
        "protecting itself.",
        "percentunit",
        [
            (
                "sum by (instance, gpu, reason) "
                f'(rate(gpu_governor_gpu_clock_event_seconds_total{{{GPU},reason=~"{SLOWDOWN_REASONS}"}}'
                "[$__rate_interval]))",
                "{{instance}} GPU {{gpu}} {{reason}}",
            )
        ],
    ).max(1)
    xid = (
        graph(
            "XID errors",
            "XID errors the driver reported for each GPU, by XID code (gpu_governor_gpu_xid_errors_total). "
            "Empty while no GPU had one.",
            "none",
            [
                (
                    f"sum by (instance, gpu, xid) (increase(gpu_governor_gpu_xid_errors_total{{{GPU}}}"
                    "[$__rate_interval]))",
                    "{{instance}} GPU {{gpu}} XID {{xid}}",
                )
            ],
            w=8,
        )
        .draw_style(cm.GraphDrawStyle.BARS)
        .no_value("no XID reported")
    )
    ecc = (
        graph(
            "ECC errors",
            "New ECC errors by type and scope (gpu_governor_gpu_ecc_errors_total; volatile: since the "
            "driver loaded, aggregate: over the GPU's life). Uncorrected ones crash or corrupt the job. "
            "Empty on GPUs without ECC.",
            "none",
            [
                (
                    f"sum by (instance, gpu, type, scope) (increase(gpu_governor_gpu_ecc_errors_total{{{GPU}}}"
                    "[$__rate_interval]))",
                    "{{instance}} GPU {{gpu}} {{type}} {{scope}}",
                )
            ],
            w=8,
        )
        .draw_style(cm.GraphDrawStyle.BARS)
        .no_value("no ECC counters")
    )
    remap = (
        graph(
            "Remapped memory rows",
            "Rows remapped after correctable and uncorrectable errors (gpu_governor_gpu_remapped_rows), "
            "and 1 while a remap waits for a GPU reset (pending) or has failed (failed: replace the GPU).",
            "none",
            [
                (f"gpu_governor_gpu_remapped_rows{{{GPU}}}", f"{GPU_LEGEND} {{{{type}}}}"),
                (f"gpu_governor_gpu_row_remap_pending{{{GPU}}}", f"{GPU_LEGEND} pending"),
                (f"gpu_governor_gpu_row_remap_failed{{{GPU}}}", f"{GPU_LEGEND} failed"),
            ],
            w=8,
        )
        .decimals(0)
        .no_value("no row remapper")
    )
    memory_temperature = graph(
        "Memory temperature",
        "HBM / GDDR temperature of each GPU (gpu_governor_gpu_memory_temperature_celsius), where NVML reports it.",
        "celsius",
        [(f"gpu_governor_gpu_memory_temperature_celsius{{{GPU}}}", GPU_LEGEND)],
        w=8,
    )
    fans = (
        graph(
            "Fan speed",
            "Speed of each fan as a share of its maximum (gpu_governor_gpu_fan_speed_ratio); data-center "
            "GPUs cooled by the chassis have none.",
            "percentunit",
            [(f"gpu_governor_gpu_fan_speed_ratio{{{GPU}}}", f"{GPU_LEGEND} fan {{{{fan}}}}")],
            w=8,
        )
        .min(0)
        .max(1)
    )
    pstate = (
        graph(
            "Performance state",
            "NVML performance state of each GPU (gpu_governor_gpu_pstate): 0 is P0, the fastest, up to "
            "P15; an idle GPU drops to P8 or lower.",
            "none",
            [(f"gpu_governor_gpu_pstate{{{GPU}}}", GPU_LEGEND)],
            w=8,
        )
        .line_interpolation(cm.LineInterpolation.STEP_AFTER)
        .decimals(0)
        .min(0)
        .max(15)
    )
    for panel in (clocks, events, xid, ecc, remap, memory_temperature, fans, pstate):
        dash = dash.with_panel(panel)
    return dash


def health_row(dash: db.Dashboard) -> db.Dashboard:
    dash = dash.with_row(db.Row("Governor health"))
    buckets = f"gpu_governor_tick_duration_seconds_bucket{{{HOST}}}"
    ticks = graph(
        "Tick duration",
        "Quantiles of one tick (read every GPU, rules, act, publish) from gpu_governor_tick_duration_seconds.",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (instance, le) (rate({buckets}[$__rate_interval])))",
                f"{{{{instance}}}} p{round(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ],
        w=8,
    )
    errors = graph(
        "NVML read errors per minute",
        "Failed or partial GPU reads (gpu_governor_gpu_read_errors_total; 0 shown for GPUs that never "
        "failed) and failed writes of the saved original limits (gpu_governor_state_write_errors_total).",
        "none",
        [
            (
                per_minute("instance, gpu", "gpu_governor_gpu_read_errors_total", GPU)
                + f" or 0 * group by (instance, gpu) (gpu_governor_gpu_info{{{GPU}}})",
                GPU_LEGEND,
            ),
            (
                per_minute("instance", "gpu_governor_state_write_errors_total", HOST),
                "{{instance}} state writes",
            ),
        ],
        w=8,
    )
    poll_age = graph(
        "Age of last poll",
        "Seconds since the governor last polled its GPUs: now minus "
        "gpu_governor_last_poll_timestamp_seconds, "
        "and at each scrape (what the GpuGovernorStale alert watches). It grows without bound when the "
        "loop is stuck.",
        "s",
        [
            (f"time() - gpu_governor_last_poll_timestamp_seconds{{{HOST}}}", "{{instance}} now"),
            (
                f"timestamp(gpu_governor_last_poll_timestamp_seconds{{{HOST}}})"
                f" - gpu_governor_last_poll_timestamp_seconds{{{HOST}}}",
                "{{instance}} at scrape",
            ),
        ],
        w=8,
    )
    cpu = graph(
        "Governor CPU",
        "CPU time the daemon uses (process_cpu_seconds_total).",
        "percentunit",
        [(f"rate(process_cpu_seconds_total{{{HOST}}}[$__rate_interval])", "{{instance}}")],
    )
    memory = graph(
        "Governor memory",
        "Resident memory of the daemon (process_resident_memory_bytes).",
        "bytes",
        [(f"process_resident_memory_bytes{{{HOST}}}", "{{instance}}")],
    )
    for panel in (ticks, errors, poll_age, cpu, memory):
        dash = dash.with_panel(panel)
    return dash


def variables(dash: db.Dashboard) -> db.Dashboard:
    refresh = dm.VariableRefresh.ON_TIME_RANGE_CHANGED
    return (
        dash.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(gpu_governor_build_info, job)")
            .refresh(refresh)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            db.QueryVariable("instance")
            .label("Host")
            .datasource(DATASOURCE)
            .query('label_values(gpu_governor_build_info{job=~"$job"}, instance)')
            .refresh(refresh)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
        )
        .with_variable(
            db.QueryVariable("gpu")
            .label("GPU")
            .datasource(DATASOURCE)
            .query('label_values(gpu_governor_gpu_info{job=~"$job",instance=~"$instance"}, gpu)')
            .refresh(refresh)
            .sort(dm.VariableSort.NUMERICAL_ASC)
            .multi(True)
            .include_all(True)
        )
    )


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    dash = (
        db.Dashboard("GPU governor")
        .uid(UID)
        .description(
            "gpu-governor: thermal zones, power-limit ladder, VRAM budgets, the governor's own health and "
            "MIG instances, per host and GPU. Source: packaging/grafana/generate_dashboard.py."
        )
        .tags(["gpu", "gpu-governor", "nvidia"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("30s")
        .timezone("browser")
    )
    dash = variables(dash)
    dash = dash.annotation(
        db.AnnotationQuery()
        .name("Governor decisions")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("purple")
        .expr(DECISIONS_ANNOTATION)
    )
    rows = (overview_row, thermal_row, power_row, vram_row, decisions_row, hardware_row, health_row, mig_row)
    for row in rows:
        dash = row(dash)
    model: dict[str, Any] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    for annotation in model["annotations"]["list"]:
        if annotation["name"] == "Governor decisions":
            # Fields of Grafana's Prometheus annotation editor the SDK has no builder for.
            annotation |= {
                "useValueForTime": True,
                "titleFormat": "{{rule}}",
                "textFormat": "{{instance}} GPU {{gpu}}: {{from}} -> {{to}}",
                "tagKeys": "rule,gpu",
            }
    for panel_id, panel in enumerate(model["panels"], start=1):
        panel["id"] = panel_id  # stable ids, so links to a panel (viewPanel=N) survive regeneration
    return model


def main() -> int:
    sys.stdout.write(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
