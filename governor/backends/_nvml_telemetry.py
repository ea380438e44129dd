"""What the NVML backend remembers of one GPU's telemetry between ticks.

Per tick the backend reads the clock event reasons (:meth:`GpuTelemetryState.clock_event_s`
keeps the seconds). The slow reads (NVML's violation counters, ECC counts, remapped rows,
memory temperature, fans, and the memory clock and performance state, which only the
metrics show: a scrape every 15 s or more sees one tick in ten or more anyway, and
dcgm-exporter samples every 30 s) are refreshed every ``telemetry_refresh_s``
(:meth:`GpuTelemetryState.store_slow`) and carried forward in between, as the energy
counter is; they and the XID counts make the frozen :class:`~governor.model.GpuTelemetry`
:attr:`GpuTelemetryState.record`, built again only when one of them changed (a frozen
dataclass costs microseconds to build, a tick shares the last one).

Clock event seconds: for the reasons NVML keeps a counter for
(:data:`~governor.backends._nvml_probe.VIOLATION_REASONS`) NVML's own value, since driver
load; for the others the time between two ticks is added to every reason the first of
them read (times from the backend's clock, the snapshot's ``t_s``; an interval with an
unread mask at either end, or spent lost, is not counted). All reasons start at 0 once
the mask has been read, so a rate is defined from the first scrape.
"""

from __future__ import annotations

import math
from typing import Any, Final

from governor.backends._nvml_probe import ECC_COUNTERS, VIOLATION_REASONS
from governor.model import CLOCK_EVENT_REASONS, GpuTelemetry, plausible_c

PSTATE_UNKNOWN: Final = 32  # NVML_PSTATE_UNKNOWN
_REASON_NAMES: Final = tuple(name for _, name in CLOCK_EVENT_REASONS)
_N_VIOLATIONS: Final = len(VIOLATION_REASONS)
_N_ECC: Final = len(ECC_COUNTERS)


class GpuTelemetryState:
    """One GPU's telemetry between ticks (see the module docstring)."""

    __slots__ = (
        "_names",
        "due_s",
        "ecc",
        "event_s",
        "fan_count",
        "fans",
        "mask",
        "mask_read",
        "mask_t",
        "memory_clock_mhz",
        "memory_temperature_c",
        "pstate",
        "record",
        "remap",
        "violated",
        "xid_errors",
        "xid_key",
        "xid_refused",
    )

    def __init__(self) -> None:
        self.due_s = -math.inf  # monotonic time the slow reads are due
        self.fan_count: int | None = None
        self.fans: tuple[tuple[int, float], ...] | None = None
        self.memory_temperature_c: float | None = None
        self.memory_clock_mhz: float | None = None
        self.pstate: int | None = None
        self.ecc: tuple[tuple[str, str, int], ...] | None = None
        self.remap: tuple[int, int, int, int] | None = None
        # seconds by reason: NVML's counter for the reasons in ``violated``, else integrated
        self.event_s: dict[str, float] = {}
        self.violated: set[str] = set()
        self.mask_read = False  # the mask was read once: every reason has its seconds from then on
        self.mask: int | None = None  # the reasons read last tick, at monotonic time mask_t
        self.mask_t = 0.0
        self._names: dict[int, tuple[str, ...]] = {}  # mask -> the integrated reasons it sets
        self.record = GpuTelemetry()
        """The slow reads kept and the XID counts as one frozen record, built again only when one changed."""
        self.xid_errors: tuple[tuple[int, int], ...] | None = None  # by code; None: not watched
        self.xid_key: Any = None  # the event device key it is watched under
        self.xid_refused = False  # NVML refused to watch it: never asked again

    def lost(self) -> None:
        """The GPU stopped answering: nothing is integrated over the time it is away, and
        the slow reads are due as soon as it is back."""
        self.mask = None
        self.due_s = -math.inf

    def lost_record(self) -> GpuTelemetry | None:
        """What a lost GPU's reading carries: its XID counts (XID 79, "fallen off the bus",
        arrives just as it is lost)."""
        return None if self.xid_errors is None else GpuTelemetry(xid_errors=self.xid_errors)

    def count_xid(self, xid: int) -> None:
        """One more XID error of code ``xid``."""
        counts = dict(self.xid_errors or ())
        counts[xid] = counts.get(xid, 0) + 1
        self.xid_errors = tuple(sorted(counts.items()))
        self._rebuild()

    def store_slow(self, values: list[Any], fan_percents: list[Any] | None, due_s: float) -> None:
        """Keep one refresh of the slow reads: ``values`` in the order of
        :data:`~governor.backends._nvml_probe.SLOW_FIELDS` (None where NVML gave nothing),
        ``fan_percents`` per fan; the next refresh is due at ``due_s``."""
        for (reason, _), ns in zip(VIOLATION_REASONS, values, strict=False):
            if ns is not None:
                self.event_s[reason] = int(ns) / 1e9
                if reason not in self.violated:
                    self.violated.add(reason)
                    self._names.clear()
        ecc = tuple(
            (kind, scope, int(count))
            for (_, kind, scope, _, _), count in zip(ECC_COUNTERS, values[_N_VIOLATIONS:], strict=False)
            if count is not None
        )
        self.ecc = ecc or None
        remap, memory_c, memory_clock, pstate = values[_N_VIOLATIONS + _N_ECC :]
        self.memory_clock_mhz = None if memory_clock is None else float(memory_clock)
        self.pstate = None if pstate is None or pstate == PSTATE_UNKNOWN else int(pstate)
        self.remap = None if remap is None else (int(remap[0]), int(remap[1]), int(remap[2]), int(remap[3]))
        self.memory_temperature_c = float(memory_c) if memory_c is not None and plausible_c(float(memory_c)) else None
        if self.fan_count:
            self.fans = None if fan_percents is None else tuple((i, int(p) / 100.0) for i, p in enumerate(fan_percents))
        self.due_s = due_s
        self._rebuild()

    def clock_event_s(self, reasons: int | None, now: float) -> tuple[tuple[str, float], ...] | None:
        """Seconds each clock event reason was active so far, ``reasons`` being this tick's
        mask read at ``now`` (see the module docstring); None when nothing is known."""
        event_s = self.event_s
        if reasons is not None:
            if not self.mask_read:
                self.mask_read = True
                for name in _REASON_NAMES:
                    event_s.setdefault(name, 0.0)
            elif self.mask:
                names = self._names.get(self.mask)
                if names is None:
                    names = self._names[self.mask] = tuple(
                        name for bit, name in CLOCK_EVENT_REASONS if self.mask & bit and name not in self.violated
                    )
                dt = now - self.mask_t
                for name in names:
                    event_s[name] += dt
            self.mask_t = now
        self.mask = reasons
        return tuple(event_s.items()) if event_s else None

    def watched(self, key: Any) -> None:
        """XID events of this GPU are watched, under device ``key``: from now on it counts them."""
        self.xid_key = key
        if self.xid_errors is None:
            self.xid_errors = ()
            self._rebuild()

    def _rebuild(self) -> None:
        """Build :attr:`record` again from what is kept (after a slow refresh or an XID)."""
        remap = self.remap
        self.record = GpuTelemetry(
            memory_clock_mhz=self.memory_clock_mhz,
            pstate=self.pstate,
            memory_temperature_c=self.memory_temperature_c,
            fan_speed_ratios=self.fans,
            xid_errors=self.xid_errors,
            ecc_errors=self.ecc,
            remapped_rows_correctable=None if remap is None else remap[0],
            remapped_rows_uncorrectable=None if remap is None else remap[1],
            row_remap_pending=None if remap is None else bool(remap[2]),
            row_remap_failed=None if remap is None else bool(remap[3]),
        )
