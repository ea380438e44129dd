"""The NVML backend: the only module that imports ``pynvml`` (nvidia-ml-py).

It reads every GPU once per tick into a :class:`~governor.model.Snapshot` and sets
power limits. Units: NVML speaks milliwatts and millijoules; everything leaving this
module is watts, joules, bytes, degrees Celsius and MHz. A value the GPU cannot give is
``None``, never ``0``.

Cost: the per-tick reads (temperature, power, enforced limit, memory, utilisation,
clock event reasons, SM clock, compute and graphics processes) cost about 20 us per GPU
on an H100. The two expensive reads, the requested power limit (~170 us) and the energy
counter (~3 ms), run on a slower cadence and are carried forward in between.

Robustness:

- A field that answers NotSupported is ``None``, logged once per GPU and field
  (``nvml_field_not_supported``), and not asked again until ``unsupported_reprobe_s``
  has passed.
- Versioned NVML calls (temperature V, memory info v2, process info v3/v2/v1, clock
  event/throttle reasons) are probed once, newest first, and the first that works is kept.
- A GPU that stops answering (GPU_IS_LOST, GPU not found, unknown error) yields a reading
  with ``health=LOST``; the others are read as usual; its handle is reacquired by UUID
  with exponential backoff.
- A library/driver version mismatch at any call raises :class:`BackendFatal`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from governor.backends import (
    BackendFatal,
    BackendUnavailable,
    GpuLostError,
    SetLimitFailed,
    SetLimitRefused,
)
from governor.clock import Clock
from governor.model import GpuHealth, GpuInfo, GpuReading, ProcessReading, Snapshot

__all__ = ["NO_DRIVER_MESSAGE", "VERSION_MISMATCH_MESSAGE", "NvmlBackend"]

log = structlog.get_logger("governor.nvml")

NO_DRIVER_MESSAGE: Final = "no NVIDIA driver found; try --simulate"
VERSION_MISMATCH_MESSAGE: Final = "NVIDIA driver and library versions differ (driver upgraded?); restart needed"

# NVML error codes (nvml.h); read from the module when it has them.
_NOT_SUPPORTED: Final = 3
_NO_PERMISSION: Final = 4
_DRIVER_NOT_LOADED: Final = 9
_LIBRARY_NOT_FOUND: Final = 12
_FUNCTION_NOT_FOUND: Final = 13
_GPU_IS_LOST: Final = 15
_RESET_REQUIRED: Final = 16
_LIB_RM_VERSION_MISMATCH: Final = 18
_ARGUMENT_VERSION_MISMATCH: Final = 25
_GPU_NOT_FOUND: Final = 28
_UNKNOWN: Final = 999

# NVML enum values (stable across versions).
_TEMPERATURE_GPU: Final = 0
_THRESHOLD_SHUTDOWN: Final = 0
_THRESHOLD_SLOWDOWN: Final = 1
_CLOCK_SM: Final = 1

# usedGpuMemory at or above this is NVML's "not available" marker (2**64 - 1).
_NOT_AVAILABLE_BYTES: Final = 1 << 63

_Read = Callable[[Any], Any]


class _Lost(Exception):
    """Internal: the GPU stopped answering; the message is the NVML reason."""


def _text(value: Any) -> str:
    """NVML strings come as bytes in some nvidia-ml-py versions and as str in others."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _absent(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a function this nvidia-ml-py lacks; the version probe skips it."""
    raise AttributeError("not in this nvidia-ml-py")


class _Versioned:
    """One NVML read offered in several versions, newest first.

    The first version that answers is kept for the life of the backend; a version that
    is absent from the Python module, from the driver (FunctionNotFound), or rejects the
    struct version is skipped once and never tried again. Any other error (NotSupported,
    GPU lost) passes through and leaves the choice open.
    """

    __slots__ = ("_candidates", "_missing", "_skip", "chosen", "name")

    def __init__(
        self,
        name: str,
        candidates: Sequence[tuple[str, _Read]],
        skip: tuple[type[BaseException], ...],
        missing: Callable[[], Exception],
    ) -> None:
        self.name = name
        self._candidates = list(candidates)
        self._skip = skip
        self._missing = missing  # the error to raise when no version exists (NotSupported)
        self.chosen: _Read | None = None

    def __call__(self, handle: Any) -> Any:
        chosen = self.chosen
        if chosen is not None:
            return chosen(handle)
        return self._probe(handle)

    def _probe(self, handle: Any) -> Any:
        while self._candidates:
            label, read = self._candidates[0]
            try:
                value = read(handle)
            except self._skip as exc:
                if not _is_version_problem(exc):
                    raise
                self._candidates.pop(0)
                log.info("nvml_version_fallback", read=self.name, skipped=label, reason=str(exc))
                continue
            self.chosen = read
            self._candidates = [(label, read)]
            return value
        raise self._missing()


def _is_version_problem(exc: BaseException) -> bool:
    """True when ``exc`` says 'this version of the call is not here', not 'no value'."""
    if isinstance(exc, (AttributeError, TypeError)):
        return True
    value = getattr(exc, "value", None)
    if value is None:
        # nvidia-ml-py's NVMLLibraryMismatchError (an unversioned wrapper whose newest
        # symbol the driver lacks) carries no code.
        return type(exc).__name__ == "NVMLLibraryMismatchError"
    return value in (_FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH)


class _GpuState:
    """Everything the backend remembers about one GPU between ticks."""

    __slots__ = (
        "backoff_s",
        "energy_due_s",
        "energy_j",
        "handle",
        "index",
        "info",
        "limit_due_s",
        "limit_requested_w",
        "lost_error",
        "reported",
        "retry_at_s",
        "unsupported",
        "uuid",
        "verified",
    )

    def __init__(self, index: int, uuid: str, handle: Any) -> None:
        self.index = index
        self.uuid = uuid
        self.handle: Any = handle
        self.info = GpuInfo(index=index, uuid=uuid, name="unknown GPU")
        # field -> monotonic time at which a NotSupported field is asked again
        self.unsupported: dict[str, float] = {}
        # (field, error code) pairs already logged
        self.reported: set[tuple[str, int]] = set()
        # True once a field-by-field read has run: only then may the fast path be used
        self.verified = False
        self.lost_error: str | None = None
        self.retry_at_s = 0.0
        self.backoff_s = 0.0
        self.limit_requested_w: float | None = None
        self.limit_due_s = -math.inf
        self.energy_j: float | None = None
        self.energy_due_s = -math.inf


class NvmlBackend:
    """Reads NVIDIA GPUs through NVML and sets their power limits.

    ``nvml`` is the ``pynvml`` module (imported when omitted) or any object with the
    same API, for tests. ``limit_refresh_s`` and ``energy_refresh_s`` are the cadences
    (seconds) of the two expensive reads; ``unsupported_reprobe_s`` how long a
    NotSupported field rests before it is asked again (``None``: never);
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
        lost_backoff_initial_s: float = 1.0,
        lost_backoff_max_s: float = 60.0,
        proc_root: Path | str = "/proc",
    ) -> None:
        for label, value in (
            ("limit_refresh_s", limit_refresh_s),
            ("energy_refresh_s", energy_refresh_s),
            ("lost_backoff_initial_s", lost_backoff_initial_s),
            ("lost_backoff_max_s", lost_backoff_max_s),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if unsupported_reprobe_s is not None and not unsupported_reprobe_s > 0:
            raise ValueError(f"unsupported_reprobe_s must be > 0 or None, got {unsupported_reprobe_s!r}")
        self._clock = clock
        self._limit_refresh_s = limit_refresh_s
        self._energy_refresh_s = energy_refresh_s
        self._reprobe_s = math.inf if unsupported_reprobe_s is None else unsupported_reprobe_s
        self._backoff_initial_s = lost_backoff_initial_s
        self._backoff_max_s = lost_backoff_max_s
        self._proc_root = Path(proc_root)
        self._names: dict[int, str | None] = {}
        self._closed = False

        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise BackendUnavailable(f"{NO_DRIVER_MESSAGE} (nvidia-ml-py is not installed: {exc})") from None
        self._nvml: Any = nvml
        self._error: type[Exception] = nvml.NVMLError
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        skip: tuple[type[BaseException], ...] = (self._error, AttributeError, TypeError)
        if isinstance(mismatch, type) and issubclass(mismatch, BaseException):
            skip = (*skip, mismatch)
        self._lost_codes = frozenset(
            (
                getattr(nvml, "NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST),
                getattr(nvml, "NVML_ERROR_GPU_NOT_FOUND", _GPU_NOT_FOUND),
                getattr(nvml, "NVML_ERROR_RESET_REQUIRED", _RESET_REQUIRED),
                getattr(nvml, "NVML_ERROR_UNKNOWN", _UNKNOWN),
            )
        )
        self._not_supported: int = getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED)
        self._mismatch: int = getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", _LIB_RM_VERSION_MISMATCH)
        self._build_reads(skip, lambda: self._error(self._not_supported))
        self._fast_reads: tuple[_Read, ...] | None = None

        self._start()
        try:
            self._states = self._open_gpus()
        except BaseException:
            self._shutdown()
            raise
        self._by_uuid = {st.uuid: st for st in self._states}
        self._infos = tuple(st.info for st in self._states)

    # ----------------------------------------------------------------- setup

    def _build_reads(self, skip: tuple[type[BaseException], ...], missing: Callable[[], Exception]) -> None:
        """Bind every per-tick read once, so a tick does no attribute lookups on the module."""
        nvml = self._nvml

        def has(name: str) -> bool:
            return callable(getattr(nvml, name, None))

        temperature: list[tuple[str, _Read]] = []
        if has("nvmlDeviceGetTemperatureV"):
            get_v = nvml.nvmlDeviceGetTemperatureV
            temperature.append(("nvmlDeviceGetTemperatureV", lambda h: get_v(h, _TEMPERATURE_GPU)))
        get_t = getattr(nvml, "nvmlDeviceGetTemperature", _absent)
        temperature.append(("nvmlDeviceGetTemperature", lambda h: get_t(h, _TEMPERATURE_GPU)))
        self._read_temperature = _Versioned("temperature", temperature, skip, missing)

        get_mem = getattr(nvml, "nvmlDeviceGetMemoryInfo", _absent)
        memory: list[tuple[str, _Read]] = []
        mem_v2 = getattr(nvml, "nvmlMemory_v2", None)
        if mem_v2 is not None:
            memory.append(("nvmlDeviceGetMemoryInfo_v2", lambda h: get_mem(h, version=mem_v2)))
        memory.append(("nvmlDeviceGetMemoryInfo", get_mem))
        self._read_memory = _Versioned("memory", memory, skip, missing)

        reasons = [
            (name, getattr(nvml, name))
            for name in (
                "nvmlDeviceGetCurrentClocksEventReasons",
                "nvmlDeviceGetCurrentClocksThrottleReasons",
            )
            if has(name)
        ]
        self._read_reasons = _Versioned("clock_event_reasons", reasons, skip, missing)

        def processes(kind: str) -> _Versioned:
            base = f"nvmlDeviceGet{kind}RunningProcesses"
            names = (f"{base}_v3", f"{base}_v2", base)
            return _Versioned(
                f"{kind.lower()}_processes", [(n, getattr(nvml, n)) for n in names if has(n)], skip, missing
            )

        self._read_compute = processes("Compute")
        self._read_graphics = processes("Graphics")

        get_clock = nvml.nvmlDeviceGetClockInfo
        self._read_sm_clock: _Read = lambda h: get_clock(h, _CLOCK_SM)
        self._read_power: _Read = nvml.nvmlDeviceGetPowerUsage
        self._read_enforced: _Read = nvml.nvmlDeviceGetEnforcedPowerLimit
        self._read_util: _Read = nvml.nvmlDeviceGetUtilizationRates
        self._read_requested: _Read = nvml.nvmlDeviceGetPowerManagementLimit
        self._read_energy: _Read = nvml.nvmlDeviceGetTotalEnergyConsumption

    def _start(self) -> None:
        """nvmlInit, turning its failures into BackendUnavailable / BackendFatal."""
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except self._error as exc:
            code = getattr(exc, "value", None)
            if code == self._mismatch:
                raise BackendFatal(f"{VERSION_MISMATCH_MESSAGE} (NVML: {exc})") from None
            if code in (
                getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", _DRIVER_NOT_LOADED),
                getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", _LIBRARY_NOT_FOUND),
            ):
                raise BackendUnavailable(f"{NO_DRIVER_MESSAGE} (NVML: {exc})") from None
            raise BackendUnavailable(f"NVML failed to initialise: {exc}") from None

    def _open_gpus(self) -> list[_GpuState]:
        """Get a handle and the static facts of every GPU."""
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except self._error as exc:
            if getattr(exc, "value", None) == self._mismatch:
                raise BackendFatal(f"{VERSION_MISMATCH_MESSAGE} (NVML: {exc})") from None
            raise BackendUnavailable(f"NVML cannot list GPUs: {exc}") from None
        if count == 0:
            raise BackendUnavailable("NVML found no NVIDIA GPU; try --simulate")
        states = []
        now = self._clock.monotonic()
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except self._error as exc:
                self._check_fatal(exc)
                log.warning("nvml_gpu_skipped", gpu=index, reason=str(exc))
                continue
            st = _GpuState(index, uuid, handle)
            try:
                st.info = self._static_info(st, driver, now)
            except _Lost as exc:
                self._mark_lost(st, str(exc), now)
            st.unsupported.clear()  # static facts are never read again
            states.append(st)
        if not states:
            raise BackendUnavailable("NVML could not open any GPU")
        return states

    def _static_info(self, st: _GpuState, driver: str | None, now: float) -> GpuInfo:
        """Static facts of one GPU; each one NVML cannot give is None."""
        nvml = self._nvml
        get = self._get
        name = get(st, "name", nvml.nvmlDeviceGetName, now)
        pci = get(st, "pci_bus_id", nvml.nvmlDeviceGetPciInfo, now)
        constraints = get(st, "power_limit_constraints", nvml.nvmlDeviceGetPowerManagementLimitConstraints, now)
        default_mw = get(st, "power_limit_default", nvml.nvmlDeviceGetPowerManagementDefaultLimit, now)
        threshold = nvml.nvmlDeviceGetTemperatureThreshold
        slowdown = get(st, "temperature_slowdown", lambda h: threshold(h, _THRESHOLD_SLOWDOWN), now)
        shutdown = get(st, "temperature_shutdown", lambda h: threshold(h, _THRESHOLD_SHUTDOWN), now)
        memory = get(st, "memory", self._read_memory, now)
        min_w = max_w = None
        if constraints is not None:
            min_w, max_w = constraints[0] / 1000.0, constraints[1] / 1000.0
        return GpuInfo(
            index=st.index,
            uuid=st.uuid,
            name=_text(name) if name is not None else "unknown GPU",
            pci_bus_id=None if pci is None else _text(pci.busId),
            power_limit_min_w=min_w,
            power_limit_max_w=max_w,
            power_limit_default_w=None if default_mw is None else default_mw / 1000.0,
            temperature_slowdown_c=None if slowdown is None else float(slowdown),
            temperature_shutdown_c=None if shutdown is None else float(shutdown),
            memory_total_bytes=None if memory is None else int(memory.total),
            driver_version=driver,
        )

    # ----------------------------------------------------------------- errors

    def _check_fatal(self, exc: BaseException) -> None:
        if getattr(exc, "value", None) == self._mismatch:
            raise BackendFatal(f"{VERSION_MISMATCH_MESSAGE} (NVML: {exc})") from None

    def _get(self, st: _GpuState, field: str, read: _Read, now: float) -> Any:
        """One NVML read of one GPU: its value, or None when NVML cannot give it.

        Raises _Lost when the GPU stopped answering, BackendFatal on a version mismatch.
        """
        retry_at = st.unsupported.get(field)
        if retry_at is not None and now < retry_at:
            return None
        try:
            value = read(st.handle)
        except self._error as exc:
            return self._field_error(st, field, exc, now)
        if retry_at is not None:
            del st.unsupported[field]
            log.info("nvml_field_supported_again", gpu=st.index, uuid=st.uuid, field=field)
        return value

    def _field_error(self, st: _GpuState, field: str, exc: Exception, now: float) -> None:
        code: int = getattr(exc, "value", _UNKNOWN)
        if code == self._not_supported:
            st.unsupported[field] = now + self._reprobe_s
            if (field, code) not in st.reported:
                st.reported.add((field, code))
                log.info("nvml_field_not_supported", gpu=st.index, uuid=st.uuid, field=field)
            return None
        if code in self._lost_codes:
            raise _Lost(str(exc))
        self._check_fatal(exc)
        # Anything else (timeout, no data, no permission ...) is missing for this tick only.
        if (field, code) not in st.reported:
            st.reported.add((field, code))
            log.warning("nvml_field_failed", gpu=st.index, uuid=st.uuid, field=field, reason=str(exc))
        return None

    def _mark_lost(self, st: _GpuState, reason: str, now: float) -> None:
        """Remember that the GPU stopped answering and when to try it again."""
        st.backoff_s = self._backoff_initial_s if st.backoff_s == 0 else min(st.backoff_s * 2, self._backoff_max_s)
        st.retry_at_s = now + st.backoff_s
        st.handle = None
        st.limit_requested_w = st.energy_j = None
        st.limit_due_s = st.energy_due_s = -math.inf
        if st.lost_error is None:
            log.warning("nvml_gpu_lost", gpu=st.index, uuid=st.uuid, reason=reason, retry_in_s=st.backoff_s)
        st.lost_error = f"GPU lost: {reason}"

    def _lost_reading(self, st: _GpuState) -> GpuReading:
        return GpuReading(
            index=st.index,
            uuid=st.uuid,
            memory_total_bytes=st.info.memory_total_bytes,
            health=GpuHealth.LOST,
            error=st.lost_error,
        )

    # ----------------------------------------------------------------- Backend

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Static facts of every GPU NVML could open, in NVML index order."""
        return self._infos

    def read(self) -> Snapshot:
        """Read every GPU now; a lost GPU yields a LOST reading, the others read normally.

        Raises BackendFatal on a driver/library version mismatch or after close().
        """
        if self._closed:
            raise BackendFatal("NVML backend is closed")
        clock = self._clock
        now = clock.monotonic()
        wall = clock.wall()
        readings = []
        for st in self._states:
            if st.lost_error is not None and (now < st.retry_at_s or not self._reacquire(st, now)):
                readings.append(self._lost_reading(st))
                continue
            try:
                reading = self._read_gpu(st, now)
            except _Lost as exc:
                self._mark_lost(st, str(exc), now)
                readings.append(self._lost_reading(st))
                continue
            if st.lost_error is not None:
                st.lost_error = None
                st.backoff_s = 0.0
                log.info("nvml_gpu_recovered", gpu=st.index, uuid=st.uuid)
            readings.append(reading)
        if self._names:
            self._prune_names(readings)
        return Snapshot(t_s=now, wall_time_s=wall, gpus=tuple(readings))

    def _reacquire(self, st: _GpuState, now: float) -> bool:
        """Try to get a fresh handle for a lost GPU; on failure back off further."""
        try:
            st.handle = self._nvml.nvmlDeviceGetHandleByUUID(st.uuid)
        except self._error as exc:
            self._check_fatal(exc)
            self._mark_lost(st, str(exc), now)
            return False
        return True

    def _read_fields(self, st: _GpuState, now: float) -> tuple[Any, ...]:
        """The nine per-tick values of one GPU, each None when NVML cannot give it.

        Fast path: once every versioned read has settled and the GPU has no field
        marked NotSupported, all nine calls run under one ``try``. Any error there falls
        back to the field-by-field path, which finds the culprit and remembers it.
        """
        fast = self._fast_reads
        if fast is not None and st.verified and not st.unsupported:
            h = st.handle
            temperature, power, enforced, memory, util, reasons, sm_clock, compute, graphics = fast
            try:
                return (
                    temperature(h),
                    power(h),
                    enforced(h),
                    memory(h),
                    util(h),
                    reasons(h),
                    sm_clock(h),
                    compute(h),
                    graphics(h),
                )
            except self._error:
                pass
        get = self._get
        values = (
            get(st, "temperature", self._read_temperature, now),
            get(st, "power", self._read_power, now),
            get(st, "power_limit_enforced", self._read_enforced, now),
            get(st, "memory", self._read_memory, now),
            get(st, "utilization", self._read_util, now),
            get(st, "clock_event_reasons", self._read_reasons, now),
            get(st, "sm_clock", self._read_sm_clock, now),
            get(st, "compute_processes", self._read_compute, now),
            get(st, "graphics_processes", self._read_graphics, now),
        )
        st.verified = True
        if fast is None:
            self._settle()
        return values

    def _settle(self) -> None:
        """Enable the fast path once every versioned read has chosen its version."""
        versioned = (
            self._read_temperature,
            self._read_memory,
            self._read_reasons,
            self._read_compute,
            self._read_graphics,
        )
        chosen = [v.chosen for v in versioned if v.chosen is not None]
        if len(chosen) < len(versioned):
            return
        temperature, memory, reasons, compute, graphics = chosen
        self._fast_reads = (
            temperature,
            self._read_power,
            self._read_enforced,
            memory,
            self._read_util,
            reasons,
            self._read_sm_clock,
            compute,
            graphics,
        )

    def _read_gpu(self, st: _GpuState, now: float) -> GpuReading:
        """The per-tick reads of one GPU (plus the slow reads when they are due)."""
        temperature, power_mw, enforced_mw, memory, util, reasons, sm_clock, compute, graphics = self._read_fields(
            st, now
        )
        get = self._get
        if now >= st.limit_due_s:
            requested_mw = get(st, "power_limit_requested", self._read_requested, now)
            st.limit_requested_w = None if requested_mw is None else requested_mw / 1000.0
            st.limit_due_s = now + self._limit_refresh_s
        if now >= st.energy_due_s:
            energy_mj = get(st, "energy", self._read_energy, now)
            st.energy_j = None if energy_mj is None else energy_mj / 1000.0
            st.energy_due_s = now + self._energy_refresh_s

        if temperature is None:
            health, error = GpuHealth.DEGRADED, "temperature not available"
        else:
            health, error = GpuHealth.OK, None
        return GpuReading(
            index=st.index,
            uuid=st.uuid,
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if enforced_mw is None else enforced_mw / 1000.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            utilization_gpu_ratio=None if util is None else util.gpu / 100.0,
            clock_event_reasons=None if reasons is None else int(reasons),
            sm_clock_mhz=None if sm_clock is None else float(sm_clock),
            power_limit_requested_w=st.limit_requested_w,
            energy_j=st.energy_j,
            processes=self._processes(compute, graphics),
            health=health,
            error=error,
        )

    def _processes(self, compute: Any, graphics: Any) -> tuple[ProcessReading, ...] | None:
        """Compute and graphics processes, one entry per pid (None when neither list is available)."""
        if compute is None and graphics is None:
            return None
        entries = list(compute or ()) + list(graphics or ())
        if not entries:
            return ()
        used_by_pid: dict[int, int | None] = {}
        for entry in entries:
            pid = int(entry.pid)
            used = entry.usedGpuMemory
            used = None if used is None or used >= _NOT_AVAILABLE_BYTES else int(used)
            if pid in used_by_pid:
                known = used_by_pid[pid]
                if known is None or (used is not None and used > known):
                    used_by_pid[pid] = used
            else:
                used_by_pid[pid] = used
        name = self._process_name
        return tuple(ProcessReading(pid=p, used_memory_bytes=u, name=name(p)) for p, u in used_by_pid.items())

    def _process_name(self, pid: int) -> str | None:
        """The process's command name from /proc/PID/comm, cached while the pid is on a GPU."""
        names = self._names
        if pid in names:
            return names[pid]
        try:
            name: str | None = (self._proc_root / str(pid) / "comm").read_text(errors="replace").rstrip("\n")
        except OSError:
            name = None
        names[pid] = name
        return name

    def _prune_names(self, readings: list[GpuReading]) -> None:
        """Forget the names of pids no longer on any GPU (so a reused pid is looked up again)."""
        seen = {p.pid for r in readings if r.processes for p in r.processes}
        for pid in [pid for pid in self._names if pid not in seen]:
            del self._names[pid]

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set the GPU's power limit to ``limit_w`` watts (sent to NVML in milliwatts).

        The caller clamps; a value outside the GPU's constraints raises SetLimitFailed.
        NO_PERMISSION / NOT_SUPPORTED raise SetLimitRefused, a lost GPU GpuLostError,
        a version mismatch BackendFatal, anything else SetLimitFailed.
        """
        if self._closed:
            raise BackendFatal("NVML backend is closed")
        st = self._by_uuid.get(uuid)
        if st is None:
            raise SetLimitFailed(f"no GPU with UUID {uuid}")
        if st.lost_error is not None or st.handle is None:
            raise GpuLostError(f"GPU {st.index} ({uuid}): {st.lost_error or 'GPU lost'}")
        if not math.isfinite(limit_w):
            raise SetLimitFailed(f"GPU {st.index}: power limit must be a finite number of watts, got {limit_w!r}")
        limit_mw = round(limit_w * 1000.0)
        info = st.info
        low, high = info.power_limit_min_w, info.power_limit_max_w
        if (low is not None and limit_mw < round(low * 1000.0)) or (
            high is not None and limit_mw > round(high * 1000.0)
        ):
            raise SetLimitFailed(f"GPU {st.index}: power limit {limit_w:g} W outside its range {low}-{high} W")
        nvml = self._nvml
        try:
            nvml.nvmlDeviceSetPowerManagementLimit(st.handle, limit_mw)
        except self._error as exc:
            code = getattr(exc, "value", None)
            self._check_fatal(exc)
            where = f"GPU {st.index} ({uuid}): setting the power limit to {limit_w:g} W"
            if code in (getattr(nvml, "NVML_ERROR_NO_PERMISSION", _NO_PERMISSION), self._not_supported):
                raise SetLimitRefused(f"{where} was refused: {exc}") from None
            if code in self._lost_codes:
                self._mark_lost(st, str(exc), self._clock.monotonic())
                raise GpuLostError(f"{where} failed: {exc}") from None
            raise SetLimitFailed(f"{where} failed: {exc}") from None
        st.limit_due_s = -math.inf  # read the requested limit back on the next tick

    def close(self) -> None:
        """nvmlShutdown. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._error as exc:
            log.warning("nvml_shutdown_failed", reason=str(exc))

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
