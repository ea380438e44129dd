"""Human sentences for the log events: one template per event name, in this one place.

The journal gets each event as a native entry whose MESSAGE= is the event's sentence
(``GPU 0 power limit 300 W -> 270 W: temperature 86 C >= 85 C for 3 consecutive
samples``), and a journal line carries it as ``msg="..."``; the JSON and console formats
keep the bare event name. Every event name logged anywhere under governor/ has a template
(tests/test_logsetup.py scans the source for logger calls to prove it).

A template is a :meth:`str.format` string over the event's keys. Values render for
people: floats without a useless ``.0`` (``300`` W, ``85.5`` C), booleans as yes/no,
lists joined with ``; ``, a missing or None value as ``?`` (a reading that is absent is
never shown as 0); the ``size`` spec turns a byte count into ``7.30GiB``. The result is
escaped (governor.escaping): no control character or newline from a process name or an
error text reaches a message. This module imports no logging library.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from governor.escaping import escape
from governor.policy import format_size

__all__ = ["MESSAGES", "UNKNOWN", "message"]

UNKNOWN = "?"
"""What a template shows for a key the event lacks or whose value is None."""

_GPU = "GPU {gpu}"
_PROCESS = "GPU {gpu}: process {pid} ({process}, class {class})"

MESSAGES: dict[str, str] = {
    # --- start, readiness, stop ---------------------------------------------------------
    "governor_starting": "gpu-governor {version} starting: {backend} backend, {gpus} GPU(s), config {config}, "
    "dry run {dry_run}",
    "governor_ready": "gpu-governor ready: {status}",
    "governor_stopping": "gpu-governor stopping: restoring the original power limits",
    "governor_stopped": "gpu-governor stopped",
    "gpu_found": _GPU + " found: {name} ({uuid})",
    "power_ladder_inert": _GPU + " power limit stays at {limit_w} W: its allowed range is "
    "{power_limit_range_w} W, so no rung of the ladder is lower",
    "gpu_gone": "GPU {uuid} is gone",
    "waiting_for_driver": "Waiting for the NVIDIA driver: {reason}",
    "backend_fatal": "The GPU backend failed, gpu-governor exits: {error}",
    "pid_namespace_foreign": "Listed GPU processes are signalled only if they hold an NVIDIA device here: {reason}",
    "tick_failed": "A governing tick failed ({failures} in a row): {error}",
    "observer_failed": "The {observer} observer failed on a report ({failures} failures so far): {error}",
    "metrics_listen_failed": "Metrics not served, governing goes on: {error} (tried again every {retry_s} s)",
    "metrics_listening": "Metrics served at {url} ({security})",
    "metrics_exposed": "The metrics endpoint {url} is exposed beyond loopback: {warnings}",
    # --- configuration --------------------------------------------------------------------
    "config_reloaded": "Configuration {config} reloaded: power steps down at {step_down_at_c} C, "
    "up at {step_up_at_c} C",
    "config_reload_failed": "Configuration {config} refused, {kept} kept: {errors}",
    "config_change_needs_restart": "A change of {key} needs a restart; the running value is kept",
    "config_still_changing": "Configuration {config} still changing after {waited_s} s; reading it anyway",
    "reload_ack_failed": "Reload acknowledgement {path} cannot be written ({error}): `gpu-governor reload` "
    "(systemctl reload) waits for it in vain",
    "config_contradiction": "Configuration contradiction: {detail}; {effect}",
    # --- GPU decisions (observers.EVENT_NAMES) --------------------------------------------
    "thermal_zone_changed": _GPU + " thermal zone {from_zone} -> {to_zone}: {reason}",
    "power_limit_stepped": _GPU + " power limit {from_w} W -> {to_w} W: {reason}",
    "power_limit_targeted": _GPU + " power limit {from_w} W -> {to_w} W (target mode): {reason}",
    "power_limit_budgeted": _GPU + " power limit {from_w} W -> {to_w} W (node power budget): {reason}",
    "power_limit_held": _GPU + " power limit held at {from_w} W: {reason}",
    "power_limit_drift_reapplied": _GPU + " power limit re-applied {from_w} W -> {to_w} W: {reason}",
    "power_limit_external_lower": _GPU + " power limit lowered outside the governor: {reason}",
    "power_limit_restored": _GPU + " power limit restored {from_w} W -> {to_w} W: {reason}",
    "power_limit_would_set": _GPU + " power limit would be set {from_w} W -> {to_w} W (dry run): {reason}",
    "power_limit_set_failed": _GPU + " power limit {from_w} W -> {to_w} W failed: {detail} (wanted because {reason})",
    "gpu_monitor_only": _GPU + " is monitor-only from now on: {reason}",
    "fan_speed_set": _GPU + " fan {fan} {from_percent} % -> {to}: {reason}",
    "fan_released": _GPU + " fan {fan} back to the card's automatic control: {reason}",
    "fan_not_following": _GPU + " fan {fan} does not follow its target: {reason}",
    "fan_control_restored": _GPU + " fan {fan} back to the card's automatic control: {reason}",
    "fan_would_set": _GPU + " would set fan {fan} to {to} (dry run): {reason}",
    "fan_set_failed": _GPU + " fan {fan} -> {to} failed: {detail} (wanted because {reason})",
    "fan_left_alone": _GPU + " fan {fan} left alone ({outcome}): {detail}",
    "gpu_fans_monitor_only": _GPU + " fans are monitor-only (fan mode {mode}): {reason}",
    "gpu_fans_controllable": _GPU + " fans can be driven again (fan mode {mode})",
    # --- GPU state changes ----------------------------------------------------------------
    "gpu_lost": _GPU + " lost: {reason}",
    "gpu_recovered": _GPU + " answers again (health {health})",
    "memory_pressure_began": _GPU + " VRAM pressure began: {used_bytes:size} used of {total_bytes:size}",
    "memory_pressure_ended": _GPU + " VRAM pressure ended: {used_bytes:size} used of {total_bytes:size}",
    "mig_memory_pressure_began": _GPU + " MIG instance {instance} VRAM pressure began: "
    "{used_bytes:size} used of {total_bytes:size}",
    "mig_memory_pressure_ended": _GPU + " MIG instance {instance} VRAM pressure ended: "
    "{used_bytes:size} used of {total_bytes:size}",
    "gpu_xid_error": _GPU + " reported XID error {xid}",
    # --- saved original limits ------------------------------------------------------------
    "state_unreadable": "The saved original limits could not be read: {detail}; moved to {moved_to}; {effect}",
    "state_write_failed": "The original power limits could not be saved: {detail}; {effect}",
    "state_entry_rejected": "A saved original limit was rejected: {detail}",
    "original_limit_unsaved": _GPU + " original power limit cannot be saved: {reason}; {effect}",
    "original_limit_saved": _GPU + " original power limit saved: the governor may change its limit",
    "backend_state_unreadable": "The simulated GPUs' state file could not be read: {detail}",
    "backend_input_ignored": "The backend ignored part of its input: {detail}",
    "fan_state_unreadable": "The saved fan takeovers could not be read: {detail}",
    "state_dir_busy": "The state directory is in use ({why}): waiting up to {wait_s} s before refusing to start",
    "state_lock_unavailable": "The state directory cannot be locked ({error}): {effect}",
    # --- gpu-governor restore (governor.restore) -------------------------------------------
    "restore_nothing_recorded": "Nothing to restore: {detail}",
    "restore_starting": "Restoring what a governor no longer running left changed in {state_dir}: "
    "{limits} power limit(s), the fans of {fan_gpus} GPU(s) (dry run {dry_run})",
    "restore_finished": "Restore finished: {restored} setting(s) put back, {unchanged} already as recorded; "
    "{state_dir} records nothing left to restore",
    "restore_dry_run_finished": "Dry run: {would} setting(s) would be put back, {unchanged} already as recorded; "
    "nothing changed in {state_dir}",
    "restore_incomplete": "Restore incomplete, still recorded in {state_dir} for the next start or restore: "
    "{left} ({detail})",
    # --- processes ------------------------------------------------------------------------
    "process_over_budget": _PROCESS + " over its VRAM budget: {used_bytes:size} > {budget_bytes:size}",
    "process_would_signal": _PROCESS + " would get {signal} (dry run): {reason}",
    "process_signalled": _PROCESS + " sent {signal}: {reason}",
    "process_signal_failed": _PROCESS + ": {signal} failed: {detail}",
    "process_left_alone": _PROCESS + " left alone ({outcome}): {reason}",
    "vram_kill_ineffective": _PROCESS + " still holds {used_bytes:size} {since_kill_s} s after its first SIGKILL "
    "(state {proc_state}, {state_means}): {effect}",
    "vram_kill_given_up": _PROCESS + " still holds {used_bytes:size} {since_kill_s} s after its first SIGKILL "
    "and every retry (state {proc_state}, {state_means}): {effect}",
    "process_inspect_failed": "Process {pid} could not be inspected: {error}",
    "process_match_timed_out": "Matching process {pid} against {key} timed out after {timeout_s} s: {outcome}",
    "process_table_disabled": "The process table {path} cannot be written ({error}): disabled",
    # --- NVML -----------------------------------------------------------------------------
    "nvml_gpu_lost": _GPU + " stopped answering NVML ({reason}); retrying in {retry_in_s} s",
    "nvml_gpu_recovered": _GPU + " answers NVML again",
    "nvml_gpu_skipped": _GPU + " skipped: {reason}; tried again at the next count of the GPUs",
    "nvml_gpu_found": _GPU + " ({name}) found: governed from now on",
    "nvml_gpu_count_failed": "Counting the GPUs through NVML failed: {reason}; tried again in {retry_in_s} s",
    "nvml_gpu_facts_read": _GPU + " ({name}) read again: power-limit range {power_limit_min_w}-{power_limit_max_w} W",
    "nvml_power_range_changed": _GPU + " ({uuid}) power-limit range changed: {old_min_w}-{old_max_w} W "
    "(default {old_default_w} W) -> {min_w}-{max_w} W (default {default_w} W)",
    "nvml_power_range_refused": _GPU + " ({uuid}) reported a power-limit range no card has ({dropped}): "
    "its last good values stay, {min_w}-{max_w} W (default {default_w} W)",
    "config_deprecated": "Config {source} uses deprecated keys {keys}: {effect}",
    "web_config_reloaded": "Web config {source} reloaded: TLS {tls}, {basic_auth_users} basic auth user(s)",
    "web_config_reload_failed": "Web config {source} could not be reloaded: {error}; {effect}",
    "web_config_keys_ignored": "Web config {source} has keys {keys} that are ignored: {effect}",
    "web_config_secret_exposed": "Web config {source}: {exposed}: {effect}",
    # --- systemd units (stop-unit classes, kill-restart loops) ---------------------------------
    "stopped_units_unreadable": "The list of units the governor stopped could not be read: {detail}",
    "unit_stopped_earlier": "Unit {unit} (class {class}) was stopped by the governor earlier: {effect}",
    "kill_will_be_undone": "Class {class} signals unit {unit}, which has Restart={restart}: {effect}",
    "unit_restart_loop": "Unit {unit} (class {class}) is in a kill-restart loop: {reason}",
    "unit_forgotten": "Unit {unit} (class {class}) is no longer tracked: {reason}",
    "unit_would_stop": "Dry run: would stop unit {unit} (class {class}): {reason}",
    "unit_would_start": "Dry run: would start unit {unit} (class {class}) again: {reason}",
    "unit_stop_failed": "Stopping unit {unit} (class {class}) failed: {reason}",
    "unit_start_failed": "Starting unit {unit} (class {class}) again failed: {reason}",
    "unit_stopped": "Stopped unit {unit} (class {class}) through systemd: {reason}",
    "unit_started": "Started unit {unit} (class {class}) again through systemd: {reason}",
    "unit_left_alone": "Unit {unit} (class {class}) left alone ({outcome}): {reason}",
    "systemd_unreachable": "systemd cannot be reached on the system bus: {error}; {effect}",
    "systemd_reachable": "systemd answers on the system bus again",
    "units_left_stopped": "Units stopped by the governor stay stopped: {units}; {effect}",
    "nvml_xid_unavailable": "XID events cannot be watched: {reason}; {effect}",
    "nvml_xid_poll_failed": "Polling NVML for XID events failed ({kind}): {reason}",
    "nvml_xid_unknown_gpu": "XID error {xid} reported for a GPU the governor does not know",
    "nvml_event_set_free_failed": "Freeing the NVML event set failed: {reason}",
    "nvml_field_not_supported": _GPU + " does not support {field}: left out",
    "nvml_field_supported_again": _GPU + " supports {field} again",
    "nvml_field_failed": _GPU + " reading {field} failed: {reason}",
    "nvml_value_implausible": _GPU + " reported what no GPU can have ({dropped}): not used",
    "nvml_version_fallback": "NVML {read}: {skipped} is missing in this driver, using an older call ({reason})",
    "nvml_shutdown_failed": "NVML shutdown failed ({kind}): {reason}",
    "nvml_mig_mode_changed": _GPU + " MIG mode {mode} (was {was})",
    "nvml_mig_instances_changed": _GPU + " has {count} MIG instance(s): {instances}",
    "nvml_mig_fallback": _GPU + " in MIG mode: the per-instance reads failed ({reason}); {effect}",
    "nvml_mig_recovered": _GPU + " in MIG mode: the per-instance reads work again ({instances} instance(s)); "
    "memory pressure is judged per instance",
    # --- the log itself -------------------------------------------------------------------
    "journal_send_failed": "The journal refused a native entry ({error}): this and later events go as lines "
    "until it accepts one again",
}
"""Event name -> :meth:`str.format` template over the event's keys."""


class _Formatter(string.Formatter):
    """str.format for people: missing keys as ``?``, floats without ``.0``, the ``size`` spec."""

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            return args[key] if key < len(args) else None
        return kwargs.get(key)

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:
            return UNKNOWN
        if format_spec == "size":
            return format_size(int(value)) if isinstance(value, (int, float)) else str(value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float) and not format_spec:
            return f"{value:g}"
        if isinstance(value, (list, tuple)) and not format_spec:
            return "; ".join(UNKNOWN if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return str(super().format_field(value, format_spec))


_FORMATTER = _Formatter()


def message(event: str, fields: Mapping[str, Any]) -> str | None:
    """The sentence for ``event`` from its ``fields``, escaped; None when the event has no template."""
    template = MESSAGES.get(event)
    if template is None:
        return None
    try:
        text = _FORMATTER.vformat(template, (), fields)
    except (ValueError, TypeError):  # a value the template's spec cannot take: the template bare
        text = template
    return escape(text)
