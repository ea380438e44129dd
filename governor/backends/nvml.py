"""The NVML backend: the only code that imports ``pynvml`` (nvidia-ml-py).

It reads every GPU once per tick into a :class:`~governor.model.Snapshot` and sets
power limits. Units: NVML speaks milliwatts and millijoules; everything leaving this
module is watts, joules, bytes, degrees Celsius and MHz. A value the GPU cannot give is
``None``, never ``0``.

Cost: the per-tick reads (temperature, power, enforced limit, memory, utilisation,
clock event reasons, SM clock, compute and graphics processes) cost about 20 us per GPU
on an H100. The two expensive reads, the requested power limit (~170 us) and the energy
counter (~3 ms), run on a slower cadence and are carried forward in between; so does the
power-limit range with the default limit (every ``telemetry_refresh_s``, see below). There is
one read path (:meth:`NvmlBackend._read_all`). A second, unchecked "fast path" used to
skip its bookkeeping: in-process, with the NVML calls stubbed out, it was 0.4-0.6 us per
GPU per tick faster than this path (under 1 % of the 66 us H200 tick, 1-2 % of the
28.6 us NVML floor), far under the 10 % that would pay for two paths. Once every
versioned call has chosen its version, the per-tick reads call the chosen functions
directly.

Helpers: :mod:`governor.backends._nvml_errors` (the one call wrapper and the table that
classifies every NVML error as unsupported, denied, lost, fatal, no driver, missing
call or transient), :mod:`governor.backends._nvml_probe` (which version of each call
this driver has), :mod:`governor.backends._nvml_procs` (process listing) and
:mod:`governor.backends._nvml_mig` (MIG).

MIG (Multi-Instance GPU): the MIG mode is a slow read (first tick, then every
``telemetry_refresh_s``); a GPU not in MIG mode makes the same per-tick calls as before. On a
GPU in MIG mode each MIG device's memory and compute processes are read every tick (two calls
per instance), so processes get the bytes of the instance they run in and memory pressure is
judged per instance (``GpuReading.mig_instances``); power, temperature and limits stay the
physical GPU's. The MIG devices are listed at the slow cadence and at once when the layout
changed; when the per-instance reads fail, the GPU reads as before (the parent's memory and
processes), said once. Validated against the fake NVML of the tests only.

Telemetry (:mod:`governor.backends._nvml_telemetry`): each tick adds the clock event
seconds from the reasons it reads anyway; NVML's violation counters (about 1 ms each on
an H200), the ECC counts, remapped rows, memory temperature, fan speeds, memory clock
and performance state are slow reads on their own cadence (``telemetry_refresh_s``). A telemetry read that
answers NotSupported is never asked again for that GPU. XID errors come from one NVML
event set polled without waiting each tick (:mod:`governor.backends._nvml_events`).

Robustness, by kind of error (the table in ``_nvml_errors``):

- A field that answers NotSupported is ``None``, logged once per GPU and field
  (``nvml_field_not_supported``), and not asked again until ``unsupported_reprobe_s``
  has passed.
- Versioned NVML calls are probed once, newest first, and the first that works is kept.
- A GPU that stops answering (GPU_IS_LOST, GPU not found, reset required, unknown
  error) yields a reading with ``health=LOST``; the others are read as usual; its handle
  is reacquired by UUID with exponential backoff.
- The power-limit range (min/max constraints) and the default limit are read at open and again
  every ``telemetry_refresh_s`` (10 s), and at the next tick after NVML refused a limit the
  governor set as an invalid argument (the range may have moved): an admin, a BMC, a mode
  change or a driver reload can change them at runtime. A change gives the GPU a new
  :class:`~governor.model.GpuInfo` (``nvml_power_range_changed``, old and new values), which the
  core follows, so the rules clamp to it and the metrics show it. A read that fails in a way
  that may pass keeps the last value; NotSupported is None (asked again after
  ``unsupported_reprobe_s``); a lost GPU reads LOST. A part that fails
  :func:`~governor.model.checked_power_range` (a range with min above max, a bound at or below
  0 W or absurd, a maximum over 4x the default; a default outside the range) keeps its last good
  value (:func:`~governor.model.refreshed_power_range`), logged once (``nvml_power_range_refused``)
  until a read passes; without one it is None, as at open (``nvml_value_implausible``).
- A GPU that cannot be opened at start (its handle or UUID read fails: a timeout, a GPU still
  initialising) is skipped (``nvml_gpu_skipped``, once per index). Every ``limit_refresh_s``
  the adapter counts the GPUs again and opens each index not open yet, as at start: a GPU
  skipped earlier, or one that appeared since (hot-plug, a GPU back after a reset);
  ``nvml_gpu_found``. An open GPU is never opened again (a lost one is reacquired by UUID).
- A library/driver version mismatch at any call raises :class:`BackendFatal`.
- Anything else is missing for this tick only (logged once per GPU, field and code).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Container
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import structlog

from governor.backends._nvml_errors import VERSION_MISMATCH_MESSAGE, Kind, NvmlCaller, NvmlFailure
from governor.backends._nvml_events import XidEvents
from governor.backends._nvml_fans import fan_range_percent, set_fan_auto, set_fan_speed
from governor.backends._nvml_mig import MigReader, MigState
from governor.backends._nvml_probe import (
    TELEMETRY_FIELDS,
    THRESHOLD_SHUTDOWN,
    THRESHOLD_SLOWDOWN,
    Read,
    build_reads,
    text,
)
from governor.backends._nvml_procs import ProcessLister
from governor.backends._nvml_telemetry import GpuTelemetryState
from governor.clock import Clock
from governor.errors import BackendFatal, BackendUnavailable, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.model import (
    GpuHealth,
    GpuInfo,
    GpuReading,
    Snapshot,
    plausible_c,
    plausible_w,
    refreshed_power_range,
)

__all__ = ["NO_DRIVER_MESSAGE", "VERSION_MISMATCH_MESSAGE", "NvmlBackend"]

log = structlog.get_logger("governor.nvml")

NO_DRIVER_MESSAGE: Final = "no NVIDIA driver found; try --simulate"
RANGE_FIELDS: Final = frozenset({"power_limit_constraints", "power_limit_default"})
"""The reads of a GPU's power-limit range and default (:func:`_read_range`), every ``telemetry_refresh_s``."""
DRAW_MAX_RATIO: Final = 2.0
"""A power draw above this multiple of the card's maximum limit is a broken answer (real excursions
over the limit stay well under it)."""


class _Lost(Exception):
    """Internal: the GPU stopped answering; the message is the NVML reason."""


def _check_positive(**seconds: float) -> None:
    """Raise ValueError naming the first setting that is not > 0 (``unsupported_reprobe_s`` may also be None)."""
    for label, value in seconds.items():
        if not value > 0:
            extra = " or None" if label == "unsupported_reprobe_s" else ""
            raise ValueError(f"{label} must be > 0{extra}, got {value!r}")


class _GpuState:
    """Everything the backend remembers about one GPU between ticks."""

    __slots__ = (
        "backoff_s",
        "energy_due_s",
        "energy_j",
        "handle",
        "implausible",
        "index",
        "info",
        "info_due_s",
        "limit_due_s",
        "limit_requested_w",
        "lost_error",
        "mig",
        "range_due_s",
        "range_refused",
        "reported",
        "retry_at_s",
        "telemetry",
        "unsupported",
        "uuid",
    )

    def __init__(self, index: int, uuid: str, handle: Any) -> None:
        self.index = index
        self.uuid = uuid
        self.handle: Any = handle
        self.info = GpuInfo(index=index, uuid=uuid, name="unknown GPU")
        # monotonic time at which the static facts are read again (a GPU lost while they were read)
        self.info_due_s = math.inf
        # monotonic time at which the power-limit range and default are read again (_read_range)
        self.range_due_s = math.inf
        self.range_refused = False  # a range was refused (the last good one kept): logged once until a good one
        self.implausible: str | None = None  # what the last range read dropped (no good range to keep), logged once
        # field -> monotonic time at which a NotSupported field is asked again
        self.unsupported: dict[str, float] = {}
        # (field, NVML error code) pairs already logged
        self.reported: set[tuple[str, int | None]] = set()
        self.lost_error: str | None = None
        self.retry_at_s = 0.0
        self.backoff_s = 0.0
        self.limit_requested_w: float | None = None
        self.limit_due_s = -math.inf
        self.energy_j: float | None = None
        self.energy_due_s = -math.inf
        self.telemetry = GpuTelemetryState()
        self.mig = MigState()

    def mark_lost(self, reason: str, now: float, backoff_initial_s: float, backoff_max_s: float) -> None:
        """Remember that the GPU stopped answering and when to try it again (backoff doubling, seconds)."""
        self.backoff_s = backoff_initial_s if self.backoff_s == 0 else min(self.backoff_s * 2, backoff_max_s)
        self.retry_at_s = now + self.backoff_s
        self.handle = None
        self.limit_requested_w = self.energy_j = None
        self.limit_due_s = self.energy_due_s = self.range_due_s = -math.inf  # read again once it answers
        self.telemetry.lost()
        self.mig.lost()
        if self.lost_error is None:
            log.warning("nvml_gpu_lost", gpu=self.index, uuid=self.uuid, reason=reason, retry_in_s=self.backoff_s)
        self.lost_error = f"GPU lost: {reason}"

    def lost_reading(self) -> GpuReading:
        """The reading of this GPU while it does not answer."""
        return GpuReading(
            index=self.index,
            uuid=self.uuid,
            memory_total_bytes=self.info.memory_total_bytes,
            health=GpuHealth.LOST,
            error=self.lost_error,
            telemetry=self.telemetry.lost_record(),  # its XID counts
        )


class NvmlBackend:
    """Reads NVIDIA GPUs through NVML and sets their power limits.

    ``nvml`` is the ``pynvml`` module (imported when omitted) or any object with the
    same API, for tests. ``limit_refresh_s``, ``energy_refresh_s`` and ``telemetry_refresh_s``
    are the cadences (seconds) of the slow reads (the GPUs are counted again, to open those not
    open yet, at ``limit_refresh_s``); ``unsupported_reprobe_s`` how long a
    NotSupported field rests before it is asked again (``None``: never; telemetry: never);
    ``lost_backoff_initial_s``/``lost_backoff_max_s`` bound the exponential backoff
    between attempts to reacquire a lost GPU. ``proc_root`` is where process names are
    read (``<proc_root>/<pid>/comm``).

    Raises BackendUnavailable when NVML cannot start (no driver, no library, no GPU) and
    BackendFatal on a driver/library version mismatch.
    """

    name = "nvml"
    waiting_reason: str | None = None  # open means the driver answered
    state_warning: str | None = None  # keeps no state of its own

    def __init__(
        self,
        clock: Clock,
        nvml: Any = None,
        *,
        limit_refresh_s: float = 30.0,
        energy_refresh_s: float = 60.0,
        unsupported_reprobe_s: float | None = 600.0,
        telemetry_refresh_s: float = 10.0,
        lost_backoff_initial_s: float = 1.0,
        lost_backoff_max_s: float = 60.0,
        proc_root: Path | str = "/proc",
    ) -> None:
        _check_positive(
            limit_refresh_s=limit_refresh_s,
            energy_refresh_s=energy_refresh_s,
            telemetry_refresh_s=telemetry_refresh_s,
            lost_backoff_initial_s=lost_backoff_initial_s,
            lost_backoff_max_s=lost_backoff_max_s,
            unsupported_reprobe_s=math.inf if unsupported_reprobe_s is None else unsupported_reprobe_s,
        )
        self._clock = clock
        self._limit_refresh_s = limit_refresh_s
        self._energy_refresh_s = energy_refresh_s
        self._telemetry_refresh_s = telemetry_refresh_s
        self._reprobe_s = math.inf if unsupported_reprobe_s is None else unsupported_reprobe_s
        self._backoff_initial_s = lost_backoff_initial_s
        self._backoff_max_s = lost_backoff_max_s
        self._lister = ProcessLister(Path(proc_root))
        self._closed = False

        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise BackendUnavailable(f"{NO_DRIVER_MESSAGE} (nvidia-ml-py is not installed: {exc})") from None
        self._nvml: Any = nvml
        self._call = NvmlCaller(nvml)
        self._reads = build_reads(nvml, self._call)
        self._per_tick = self._reads.per_tick  # the chosen versions once all have settled
        self._settled = False
        self._mig = MigReader(nvml, self._call, self._reads.mig_memory, self._reads.mig_compute, self._lister)

        try:
            self._call(nvml.nvmlInit)
        except NvmlFailure as exc:
            if exc.kind is Kind.NO_DRIVER:
                raise BackendUnavailable(f"{NO_DRIVER_MESSAGE} (NVML: {exc})") from None
            raise BackendUnavailable(f"NVML failed to initialise: {exc}") from None
        self._xid = XidEvents(nvml, self._call)
        self._driver: str | None = None
        self._recount = _Recount(clock.monotonic() + limit_refresh_s)
        try:
            self._states = self._open_gpus()
        except BaseException:
            self._shutdown()
            raise
        self._by_uuid = {st.uuid: st for st in self._states}
        self._infos = tuple(st.info for st in self._states)

    # ----------------------------------------------------------------- setup

    def _open_gpus(self) -> list[_GpuState]:
        """Get a handle and the static facts of every GPU."""
        nvml, call = self._nvml, self._call
        try:
            count = int(call(nvml.nvmlDeviceGetCount))
            self._driver = text(call(nvml.nvmlSystemGetDriverVersion))
        except NvmlFailure as exc:
            raise BackendUnavailable(f"NVML cannot list GPUs: {exc}") from None
        if count == 0:
            raise BackendUnavailable("NVML found no NVIDIA GPU; try --simulate")
        states: list[_GpuState] = []
        now = self._clock.monotonic()
        for index in range(count):
            st = _open_index(self, index, {s.uuid for s in states}, now)
            if st is not None:
                states.append(st)
        if not states:
            raise BackendUnavailable("NVML could not open any GPU")
        return states

    # ----------------------------------------------------------------- reads

    def _get(self, st: _GpuState, field: str, read: Read, now: float) -> Any:
        """One read of one GPU outside the per-tick set: its value, or None (see _read_all)."""
        return self._read_all(st, ((field, read),), now)[0]

    def _read_all(self, st: _GpuState, reads: tuple[tuple[str, Read], ...], now: float) -> list[Any]:
        """The value of each (field, read) of one GPU, None where NVML cannot give it.

        The one read path: a resting NotSupported field is skipped; a failure means what
        its kind says (:meth:`_failed`).
        """
        handle, resting = st.handle, st.unsupported
        values: list[Any] = []
        append = values.append
        for field, read in reads:
            if resting:  # usually empty: the common read below skips every resting check
                retry_at = resting.get(field)
                if retry_at is not None:
                    append(_read_resting(self, st, handle, field, read, retry_at, now))
                    continue
            try:
                append(read(handle))
            except (self._call.error, NvmlFailure) as exc:
                self._failed(st, field, exc, now)
                append(None)
        return values

    def _supported_again(self, st: _GpuState, field: str) -> None:
        del st.unsupported[field]
        log.info("nvml_field_supported_again", gpu=st.index, uuid=st.uuid, field=field)

    def _failed(self, st: _GpuState, field: str, exc: BaseException, now: float) -> None:
        """What a failed read means, by kind: the value is None (resting when UNSUPPORTED); raises _Lost
        when the GPU stopped answering, BackendFatal on a version mismatch."""
        failure = exc if isinstance(exc, NvmlFailure) else self._call.failure(exc)
        if failure.kind is Kind.LOST:
            raise _Lost(str(failure))
        first = (field, failure.code) not in st.reported
        st.reported.add((field, failure.code))
        if failure.kind is Kind.UNSUPPORTED:
            st.unsupported[field] = math.inf if field in TELEMETRY_FIELDS else now + self._reprobe_s
            if first:
                log.info("nvml_field_not_supported", gpu=st.index, uuid=st.uuid, field=field)
        elif first:  # anything else is missing for this tick only
            log.warning("nvml_field_failed", gpu=st.index, uuid=st.uuid, field=field, reason=str(failure))

    def _mark_lost(self, st: _GpuState, reason: str, now: float) -> None:
        st.mark_lost(reason, now, self._backoff_initial_s, self._backoff_max_s)

    def _read_gpu(self, st: _GpuState, now: float) -> GpuReading:
        """The per-tick reads of one GPU (plus the slow reads when they are due)."""
        temperature, power_mw, enforced_mw, memory, util, reasons, sm_clock, compute, graphics = self._read_all(
            st, self._per_tick, now
        )
        if now >= st.limit_due_s:
            requested_mw = self._get(st, "power_limit_requested", self._reads.requested, now)
            st.limit_requested_w = None if requested_mw is None else requested_mw / 1000.0
            st.limit_due_s = now + self._limit_refresh_s
        if now >= st.energy_due_s:
            energy_mj = self._get(st, "energy", self._reads.energy, now)
            st.energy_j = None if energy_mj is None else energy_mj / 1000.0
            st.energy_due_s = now + self._energy_refresh_s
        telemetry = st.telemetry
        if now >= telemetry.due_s:
            _read_slow_telemetry(self, st, now)
        temperature_c, error = _celsius(st, temperature)
        used_bytes, total_bytes = _memory_bytes(st, memory)
        processes = self._lister.processes(compute, graphics, total_bytes or st.info.memory_total_bytes)
        mig, instances = st.mig, None
        if mig.enabled:  # MIG mode: memory and processes per MIG device (governor.backends._nvml_mig)
            instances, processes = self._mig.read(st.index, st.uuid, st.handle, mig, processes)
        return GpuReading(
            index=st.index,
            uuid=st.uuid,
            temperature_c=temperature_c,
            power_w=_draw_w(st, power_mw),
            power_limit_w=_watts(enforced_mw),
            memory_used_bytes=used_bytes,
            memory_total_bytes=total_bytes,
            utilization_gpu_ratio=None if util is None or not 0 <= util.gpu <= 100 else util.gpu / 100.0,
            clock_event_reasons=None if reasons is None else int(reasons),
            sm_clock_mhz=None if sm_clock is None else float(sm_clock),
            power_limit_requested_w=st.limit_requested_w,
            energy_j=st.energy_j,
            processes=processes,
            health=GpuHealth.OK if temperature_c is not None else GpuHealth.DEGRADED,
            error=error,
            clock_event_s=telemetry.clock_event_s(None if reasons is None else int(reasons), now),
            telemetry=telemetry.record,
            mig_enabled=mig.enabled,
            mig_instances=instances,
        )

    # ----------------------------------------------------------------- Backend

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Facts of every GPU NVML could open, in NVML index order; a new tuple when a power-limit range changed."""
        return self._infos

    def read(self) -> Snapshot:
        """Read every GPU now; a lost GPU yields a LOST reading, the others read normally.

        Raises BackendFatal on a driver/library version mismatch or after close().
        """
        if self._closed:
            raise BackendFatal("NVML backend is closed")
        now = self._clock.monotonic()
        wall = self._clock.wall()
        if now >= self._recount.due_s:
            _recount(self, now)
        readings = []
        self._xid.poll()  # counted into each GPU's telemetry, read below
        for st in self._states:
            if st.lost_error is not None and (now < st.retry_at_s or not _reacquire(self, st, now)):
                readings.append(st.lost_reading())
                continue
            try:
                reading = self._read_gpu(st, now)
                if now >= st.info_due_s:
                    _reread_static(self, st, now)
                if now >= st.range_due_s:
                    _refresh_range(self, st, now)
            except _Lost as exc:
                self._mark_lost(st, str(exc), now)
                readings.append(st.lost_reading())
                continue
            if st.lost_error is not None:
                st.lost_error = None
                st.backoff_s = 0.0
                log.info("nvml_gpu_recovered", gpu=st.index, uuid=st.uuid)
            readings.append(reading)
        self._lister.prune(readings)
        if not self._settled and (settled := self._reads.settled()) is not None:
            self._per_tick, self._settled = settled, True
        return Snapshot(t_s=now, wall_time_s=wall, gpus=tuple(readings))

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set the GPU's power limit to ``limit_w`` watts (sent to NVML in milliwatts).

        The caller clamps; a value outside the GPU's constraints raises SetLimitFailed.
        By the kind of NVML error: UNSUPPORTED / DENIED raise SetLimitRefused, LOST
        GpuLostError, FATAL BackendFatal, anything else SetLimitFailed.
        """
        st = _answering(self, uuid)
        if not math.isfinite(limit_w):
            raise SetLimitFailed(f"GPU {st.index}: power limit must be a finite number of watts, got {limit_w!r}")
        limit_mw = round(limit_w * 1000.0)
        low, high = st.info.power_limit_min_w, st.info.power_limit_max_w
        if (low is not None and limit_mw < round(low * 1000.0)) or (
            high is not None and limit_mw > round(high * 1000.0)
        ):
            raise SetLimitFailed(f"GPU {st.index}: power limit {limit_w:g} W outside its range {low}-{high} W")
        try:
            self._call(self._nvml.nvmlDeviceSetPowerManagementLimit, st.handle, limit_mw)
        except NvmlFailure as exc:
            where = f"GPU {st.index} ({uuid}): setting the power limit to {limit_w:g} W"
            if exc.kind in (Kind.UNSUPPORTED, Kind.DENIED):
                raise SetLimitRefused(f"{where} was refused: {exc}") from None
            if exc.kind is Kind.LOST:
                self._mark_lost(st, str(exc), self._clock.monotonic())
                raise GpuLostError(f"{where} failed: {exc}") from None
            if exc.kind is Kind.INVALID:  # outside the range the GPU takes now: read it at the next tick
                st.range_due_s = -math.inf
            raise SetLimitFailed(f"{where} failed: {exc}") from None
        st.limit_due_s = -math.inf  # read the requested limit back on the next tick

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Set fan ``fan`` to ``percent`` of its maximum, manual control (governor.backends._nvml_fans)."""
        st = _answering(self, uuid)
        set_fan_speed(self._call, self._nvml, st.handle, f"GPU {st.index} ({uuid})", fan, percent)

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Hand fan ``fan`` back to the card's automatic control (governor.backends._nvml_fans)."""
        st = _answering(self, uuid)
        set_fan_auto(self._call, self._nvml, st.handle, f"GPU {st.index} ({uuid})", fan)

    def close(self) -> None:
        """nvmlShutdown. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        """Free the XID event set, then nvmlShutdown; a failure (even a fatal one) is logged."""
        self._xid.close()
        try:
            self._nvml.nvmlShutdown()
        except self._call.error as exc:
            log.warning("nvml_shutdown_failed", reason=str(exc), kind=self._call.kind(exc).value)

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Recount:
    """When the GPUs are counted again, and what was warned about (once): the indexes not opened,
    the NVML codes of a failed count."""

    __slots__ = ("count_failed", "due_s", "skipped")

    def __init__(self, due_s: float) -> None:
        self.due_s = due_s  # monotonic seconds
        self.skipped: set[int] = set()
        self.count_failed: set[int | None] = set()


def _open_index(backend: NvmlBackend, index: int, open_uuids: Container[str], now: float) -> _GpuState | None:
    """Open GPU ``index`` (its handle, its UUID, its static facts, its XID watch); None when it cannot
    be opened now, warned once per index (``nvml_gpu_skipped``). A UUID in ``open_uuids`` is refused:
    all is keyed by UUID, so the repeat would get the other's writes. A GPU lost while its static
    facts are read is opened lost (reacquired by UUID, its facts read once it answers)."""
    call, nvml = backend._call, backend._nvml
    skipped = backend._recount.skipped
    try:
        handle = call(nvml.nvmlDeviceGetHandleByIndex, index)
        uuid = text(call(nvml.nvmlDeviceGetUUID, handle))
    except NvmlFailure as exc:
        reason = str(exc)
    else:
        reason = f"UUID {uuid} repeats an open GPU's" if uuid in open_uuids else ""
    if reason:
        if index not in skipped:
            skipped.add(index)
            log.warning("nvml_gpu_skipped", gpu=index, reason=reason)
        return None
    skipped.discard(index)
    st = _GpuState(index, uuid, handle)
    try:
        _read_static(backend, st, now)
    except (_Lost, NvmlFailure) as exc:
        backend._mark_lost(st, str(exc), now)
        st.info_due_s = now  # read once it answers again
    _watch_xid(backend, st, now)
    return st


def _recount(backend: NvmlBackend, now: float) -> None:
    """Count the GPUs again (every ``limit_refresh_s``) and open each index not open yet: one skipped
    at start or at an earlier count, or one that appeared since. A GPU already open is never opened
    again; a failed count is warned once per NVML code and tried at the next cadence. The core
    follows :meth:`NvmlBackend.gpus`, so a GPU found here is governed from its next tick."""
    recount = backend._recount
    recount.due_s = now + backend._limit_refresh_s
    try:
        count = int(backend._call(backend._nvml.nvmlDeviceGetCount))
    except NvmlFailure as exc:
        if exc.code not in recount.count_failed:
            recount.count_failed.add(exc.code)
            log.warning("nvml_gpu_count_failed", reason=str(exc), retry_in_s=backend._limit_refresh_s)
        return
    open_indexes = {st.index for st in backend._states}
    found = []
    for index in range(count):
        if index in open_indexes:
            continue
        st = _open_index(backend, index, backend._by_uuid, now)
        if st is not None:
            backend._by_uuid[st.uuid] = st
            found.append(st)
            log.info("nvml_gpu_found", gpu=index, uuid=st.uuid, name=st.info.name)
    if found:
        backend._states = sorted((*backend._states, *found), key=lambda s: s.index)
        backend._infos = tuple(s.info for s in backend._states)


def _answering(backend: NvmlBackend, uuid: str) -> _GpuState:
    """The state of a GPU that answers, for a write; BackendFatal after close, SetLimitFailed
    for an unknown UUID, GpuLostError for a lost GPU."""
    if backend._closed:
        raise BackendFatal("NVML backend is closed")
    st = backend._by_uuid.get(uuid)
    if st is None:
        raise SetLimitFailed(f"no GPU with UUID {uuid}")
    if st.lost_error is not None or st.handle is None:
        raise GpuLostError(f"GPU {st.index} ({uuid}): {st.lost_error or 'GPU lost'}")
    return st


def _reacquire(backend: NvmlBackend, st: _GpuState, now: float) -> bool:
    """Try to get a fresh handle for a lost GPU; on failure back off further."""
    try:
        st.handle = backend._call(backend._nvml.nvmlDeviceGetHandleByUUID, st.uuid)
    except NvmlFailure as exc:
        backend._mark_lost(st, str(exc), now)
        return False
    return _watch_xid(backend, st, now)  # a new handle: watched too (a no-op for the same device key)


def _reread_static(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """Read a GPU's facts again: the GPU was lost while they were read at open (its name unknown, its
    range too). The core follows :meth:`NvmlBackend.gpus`, so a GPU monitor-only for want of a range
    is governed once it has one."""
    before = st.info
    try:
        _read_static(backend, st, now)
    except NvmlFailure as exc:  # LOST raises _Lost (the caller's); anything else: next time
        st.info_due_s = now + backend._limit_refresh_s
        backend._failed(st, "static_facts", exc, now)
    if st.info != before:
        backend._infos = tuple(s.info for s in backend._states)
        info = st.info
        log.info(
            "nvml_gpu_facts_read",
            gpu=st.index,
            uuid=st.uuid,
            name=info.name,
            power_limit_min_w=info.power_limit_min_w,
            power_limit_max_w=info.power_limit_max_w,
        )


def _read_static(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """Read the facts of one GPU into its state, its power-limit range and default too (:func:`_read_range`,
    read again every ``telemetry_refresh_s``); the other facts are not read again. Raises _Lost /
    NvmlFailure as the reads do."""
    st.info = _static_info(backend, st, backend._driver, now)
    _static_fans(backend, st, now)
    _read_range(backend, st, now)
    st.info_due_s = math.inf
    # Only the telemetry and the range keep their rest after NotSupported: the other facts are never
    # asked on their own (and per-tick reads then find no rest to check).
    st.unsupported = {f: t for f, t in st.unsupported.items() if f in TELEMETRY_FIELDS or f in RANGE_FIELDS}


def _refresh_range(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """Read a GPU's power-limit range and default again (:func:`_read_range`); a change is logged once,
    old and new values, and handed out by :meth:`NvmlBackend.gpus`."""
    before = st.info
    _read_range(backend, st, now)
    info = st.info
    if info is before:
        return
    backend._infos = tuple(s.info for s in backend._states)
    log.info(
        "nvml_power_range_changed",
        gpu=st.index,
        uuid=st.uuid,
        old_min_w=before.power_limit_min_w,
        old_max_w=before.power_limit_max_w,
        old_default_w=before.power_limit_default_w,
        min_w=info.power_limit_min_w,
        max_w=info.power_limit_max_w,
        default_w=info.power_limit_default_w,
    )


def _read_range(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """Read one GPU's power-limit range and default (watts) into its facts (a new GpuInfo only when they
    changed), and read them again in ``telemetry_refresh_s``. Each read that fails in a way that may pass
    keeps the value in force; NotSupported is None; a lost GPU raises _Lost.

    What the reads give is used where it passes :func:`~governor.model.checked_power_range`; a part that
    does not keeps its last good value (:func:`~governor.model.refreshed_power_range`;
    ``nvml_power_range_refused``, once until a read passes), or with none is None, as at open
    (``nvml_value_implausible``, once per answer)."""
    st.range_due_s = now + backend._telemetry_refresh_s
    nvml, get, info = backend._nvml, backend._get, st.info
    constraints = get(st, "power_limit_constraints", nvml.nvmlDeviceGetPowerManagementLimitConstraints, now)
    default_mw = get(st, "power_limit_default", nvml.nvmlDeviceGetPowerManagementDefaultLimit, now)
    last = (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w)
    # No answer: None after NotSupported (now, or still resting), else (a failure that may pass) the last value.
    if constraints is not None:
        min_w, max_w = constraints[0] / 1000.0, constraints[1] / 1000.0
    else:
        min_w, max_w = (None, None) if "power_limit_constraints" in st.unsupported else last[:2]
    if default_mw is not None:
        default_w: float | None = default_mw / 1000.0
    else:
        default_w = None if "power_limit_default" in st.unsupported else last[2]
    used, problem, kept = refreshed_power_range(last, min_w, max_w, default_w)
    if kept and not st.range_refused:  # the last good values stay
        log.warning(
            "nvml_power_range_refused",
            gpu=st.index,
            uuid=st.uuid,
            dropped=problem,
            min_w=used[0],
            max_w=used[1],
            default_w=used[2],
        )
    elif problem is not None and not kept and problem != st.implausible:  # a broken answer, nothing to keep
        log.warning("nvml_value_implausible", gpu=st.index, uuid=st.uuid, dropped=problem)
    st.implausible, st.range_refused = problem, kept
    if used != last:
        low, high, default = used
        st.info = replace(info, power_limit_min_w=low, power_limit_max_w=high, power_limit_default_w=default)


def _static_fans(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """The fan count (kept for the telemetry too) and the speed range a fan may be set to, into the GPU's facts."""
    fans = backend._get(st, "fan_count", backend._reads.fan_count, now)
    st.telemetry.fan_count = None if fans is None else int(fans)
    low, high = fan_range_percent(backend._call, backend._nvml, st.handle) if fans else (None, None)
    if low is not None and high is not None and not 0.0 <= low <= high <= 100.0:
        # Inverted or outside 0-100 %: clamping to it would drive a fan to a speed no curve asked for.
        _implausible(st, "fan_range", f"fan speed range {low:g}-{high:g} %")
        low = high = None
    st.info = replace(st.info, fan_count=st.telemetry.fan_count, fan_speed_min_percent=low, fan_speed_max_percent=high)


def _watch_xid(backend: NvmlBackend, st: _GpuState, now: float) -> bool:
    """Watch a GPU's handle for XID errors (governor.backends._nvml_events); False when it is (now) lost."""
    if st.handle is None:
        return False
    try:
        backend._xid.watch(st.index, st.uuid, st.handle, st.telemetry)
    except NvmlFailure as exc:  # LOST: watched once it is reacquired
        backend._mark_lost(st, str(exc), now)
        return False
    return True


def _read_resting(
    backend: NvmlBackend, st: _GpuState, handle: Any, field: str, read: Read, retry_at: float, now: float
) -> Any:
    """One read (see NvmlBackend._read_all) of a field resting after NotSupported until ``retry_at``: None
    before then, else asked again (its value once it answers, and it no longer rests; None when it fails again)."""
    if now < retry_at:
        return None
    try:
        value = read(handle)
    except (backend._call.error, NvmlFailure) as exc:
        backend._failed(st, field, exc, now)
        return None
    backend._supported_again(st, field)
    return value


def _read_slow_telemetry(backend: NvmlBackend, st: _GpuState, now: float) -> None:
    """The slow telemetry reads of one GPU, kept on its state until the next refresh, and its MIG mode."""
    telemetry = st.telemetry
    st.mig.store_mode(st.index, st.uuid, backend._get(st, "mig_mode", backend._reads.mig_mode, now))
    values = backend._read_all(st, backend._reads.slow, now)
    count = telemetry.fan_count
    fans = backend._get(st, "fan_speed", backend._reads.fan_speeds(count), now) if count else None
    telemetry.store_slow(values, fans, now + backend._telemetry_refresh_s)


def _implausible(st: _GpuState, field: str, what: str) -> None:
    """Log once per GPU and field that a reading was dropped as no working GPU can give it."""
    key = (f"{field}_implausible", None)
    if key not in st.reported:
        st.reported.add(key)
        log.warning("nvml_value_implausible", gpu=st.index, uuid=st.uuid, dropped=what)


def _celsius(st: _GpuState, raw: Any) -> tuple[float | None, str | None]:
    """NVML's GPU temperature as degrees C, and why the GPU is degraded: None with a reason when
    NVML gave none or one no working sensor reads (0, 255, 65535 C: :func:`~governor.model.plausible_c`)."""
    if raw is None:
        return None, "temperature not available"
    temperature_c = float(raw)
    if plausible_c(temperature_c):
        return temperature_c, None
    why = f"temperature reading implausible: {raw} C"
    _implausible(st, "temperature", why)
    return None, why


def _draw_w(st: _GpuState, milliwatts: float | None) -> float | None:
    """NVML's power draw as watts (:func:`_watts`, 0 W kept); None above :data:`DRAW_MAX_RATIO` times
    the card's maximum limit."""
    watts, max_w = _watts(milliwatts, zero_ok=True), st.info.power_limit_max_w
    if watts is None or max_w is None or watts <= DRAW_MAX_RATIO * max_w:
        return watts
    _implausible(st, "power", f"power draw {watts:g} W of a card limited to {max_w:g} W")
    return None


def _memory_bytes(st: _GpuState, memory: Any) -> tuple[int | None, int | None]:
    """(used, total) VRAM bytes of NVML's memory info; a total of 0 is None, and so is more used than the total."""
    if memory is None:
        return None, None
    total = int(memory.total) or None
    if total is not None and 0 <= memory.used <= total:
        return int(memory.used), total
    _implausible(st, "memory", f"memory used {memory.used} of {memory.total} bytes")
    return None, total


def _watts(milliwatts: float | None, *, zero_ok: bool = False) -> float | None:
    """NVML's milliwatts as watts; None for an answer no GPU can give (at or over
    :data:`~governor.model.MAX_PLAUSIBLE_W`, or 0 W where ``zero_ok`` is off: a limit)."""
    if milliwatts is None:
        return None
    watts = milliwatts / 1000.0
    return watts if plausible_w(watts) or (zero_ok and watts == 0.0) else None


def _static_info(backend: NvmlBackend, st: _GpuState, driver: str | None, now: float) -> GpuInfo:
    """Static facts of one GPU; each one NVML cannot give is None. The power-limit range and default are
    those in force (:func:`_read_range` reads them)."""
    nvml, get = backend._nvml, backend._get
    name = get(st, "name", nvml.nvmlDeviceGetName, now)
    pci = get(st, "pci_bus_id", nvml.nvmlDeviceGetPciInfo, now)
    threshold = nvml.nvmlDeviceGetTemperatureThreshold
    slowdown = get(st, "temperature_slowdown", lambda h: threshold(h, THRESHOLD_SLOWDOWN), now)
    shutdown = get(st, "temperature_shutdown", lambda h: threshold(h, THRESHOLD_SHUTDOWN), now)
    memory = get(st, "memory", backend._reads.memory, now)
    return GpuInfo(
        index=st.index,
        uuid=st.uuid,
        name=text(name) if name is not None else "unknown GPU",
        pci_bus_id=None if pci is None else text(pci.busId),
        power_limit_min_w=st.info.power_limit_min_w,
        power_limit_max_w=st.info.power_limit_max_w,
        power_limit_default_w=st.info.power_limit_default_w,
        temperature_slowdown_c=None if slowdown is None else float(slowdown),
        temperature_shutdown_c=None if shutdown is None else float(shutdown),
        memory_total_bytes=None if memory is None else int(memory.total),
        driver_version=driver,
    )
