"""MIG (Multi-Instance GPU) in the NVML backend: the mode, the MIG devices, their memory and processes.

A GPU in MIG mode (A100, H100, H200 ...) is split into instances, each with its own memory.
NVML's answers on the parent device are then aggregates: memory info and the process lists
cover every instance (and only for a privileged caller), and a process's ``usedGpuMemory``
there is not available. Per instance values come from MIG device handles (NVML API reference,
nvmlDeviceGetMemoryInfo and nvmlDeviceGetComputeRunningProcesses: "In MIG mode, if device
handle is provided, the API returns aggregate information ... Per-instance information can be
queried by using specific MIG device handles"; nvitop lists a MIG-enabled GPU's processes per
MIG device for the same reason).

Cadence (the per-tick reads of a GPU not in MIG mode do not change):

- the MIG mode (nvmlDeviceGetMigMode, its current mode) is a slow read: on the first tick and
  every ``telemetry_refresh_s`` after, with the telemetry. A GPU answering NotSupported (no
  MIG) is never asked again; a failed read keeps the mode read before.
- in MIG mode the MIG devices are listed (nvmlDeviceGetMaxMigDeviceCount, then
  nvmlDeviceGetMigDeviceHandleByIndex for each index, where an empty one answers NOT_FOUND and
  is skipped, and each device's UUID) at that cadence, and at once when a tick finds the layout
  changed: a read on a MIG device fails (an instance destroyed: NVML's handle is no longer
  valid, and it may be reused), or the parent lists a process no instance lists (an instance
  created since the last listing). At most once per tick.
- every tick, for each MIG device: its memory info and its compute processes. An instance
  destroyed and another created at the same index between two listings (NVML may hand out
  the same handle) is read right, memory and processes from the same handle, but keeps the old
  UUID until the next listing (at most ``telemetry_refresh_s``): its UUID is not read per tick.

A process in several instances of one GPU gets the sum of its bytes there (unknown when any of
them is unknown); MIG devices of one GPU instance (compute instances sharing its memory, named
by nvmlDeviceGetGpuInstanceId when the devices are listed) count a process once, at the most
any of them says. A process the parent lists but no instance does keeps the parent's entry.

When the per-instance reads fail (the listing or a read fails again after listing anew, a
driver or nvidia-ml-py without the MIG calls, NVML refusing MIG device handles), the GPU reads
as without MIG support: the parent's memory and processes. That is logged once
(``nvml_mig_fallback``) until the reads work again (``nvml_mig_recovered``); they are tried
again at the slow cadence. Nothing here marks the GPU lost: the parent's own reads do.

Validated against the fake NVML of the tests only (tests/fake_pynvml.py), never on a GPU in
MIG mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import structlog

from governor.backends._nvml_errors import Kind, NvmlCaller, NvmlFailure
from governor.backends._nvml_probe import Read, text
from governor.backends._nvml_procs import ProcessLister
from governor.model import MigInstanceReading, ProcessReading

log = structlog.get_logger("governor.nvml")

MIG_ENABLE: Final = 1  # NVML_DEVICE_MIG_ENABLE
MIG_DISABLE: Final = 0  # NVML_DEVICE_MIG_DISABLE
MAX_MIG_DEVICES: Final = 64
"""No GPU has more MIG devices than this (an H100 has at most 7): a larger count is a broken answer."""

Device = tuple[int, str, Any, int | None]
"""(MIG device index, its UUID, its NVML handle, its GPU instance id; None: unknown)."""


class MigState:
    """What the backend knows about one GPU's MIG mode and MIG devices between ticks."""

    __slots__ = ("devices", "enabled", "fallback", "listed", "stale", "unmatched")

    def __init__(self) -> None:
        self.enabled: bool | None = None  # the current MIG mode last read; None: unknown or no MIG
        self.devices: tuple[Device, ...] = ()
        self.stale = True  # the devices are listed anew before the next per-instance read
        self.listed: tuple[str, ...] | None = None  # the device UUIDs last logged
        # parent-listed pids no instance listed at the last listing (a new one triggers another)
        self.unmatched: frozenset[int] = frozenset()
        self.fallback: str | None = None  # why the per-instance reads failed (logged once); None: they work

    def lost(self) -> None:
        """The GPU stopped answering: its MIG device handles are listed anew once it is back."""
        self.devices = ()
        self.stale = True

    def store_mode(self, gpu: int, uuid: str, raw: Any) -> None:
        """Keep a read of nvmlDeviceGetMigMode (``[current, pending]``; None when it failed: the mode
        read before is kept). A GPU in MIG mode has its devices listed again (the slow cadence)."""
        self.stale = True
        if raw is None:
            return
        try:
            current = int(raw[0])
        except (TypeError, ValueError, IndexError):
            current = -1
        enabled = current == MIG_ENABLE if current in (MIG_ENABLE, MIG_DISABLE) else None
        if enabled != self.enabled:
            if enabled or self.enabled is not None:
                log.info("nvml_mig_mode_changed", gpu=gpu, uuid=uuid, mode=_mode(enabled), was=_mode(self.enabled))
            self.enabled = enabled
            self.devices, self.listed, self.unmatched, self.fallback = (), None, frozenset(), None


def _mode(enabled: bool | None) -> str:
    return "unknown" if enabled is None else "enabled" if enabled else "disabled"


class MigReader:
    """Reads the MIG devices of the GPUs in MIG mode (see the module docstring); one per backend.

    ``nvml`` is the pynvml module (or a stand-in), ``call`` its call wrapper, ``memory`` and
    ``compute`` the reads of one MIG device's memory info and compute processes, ``lister``
    the backend's process lister (process names)."""

    __slots__ = ("_call", "_compute", "_lister", "_memory", "_nvml")

    def __init__(self, nvml: Any, call: NvmlCaller, memory: Read, compute: Read, lister: ProcessLister) -> None:
        self._nvml = nvml
        self._call = call
        self._memory = memory
        self._compute = compute
        self._lister = lister

    def read(
        self, gpu: int, uuid: str, handle: Any, mig: MigState, parent: tuple[ProcessReading, ...] | None
    ) -> tuple[tuple[MigInstanceReading, ...] | None, tuple[ProcessReading, ...] | None]:
        """This tick's MIG instances of a GPU in MIG mode and its processes built from them; in
        fallback ``(None, parent)``: no instances, the parent's processes (``parent``)."""
        if mig.fallback is not None and not mig.stale:
            return None, parent  # failed at the last try: tried again at the slow cadence
        why = ""
        for _ in range(2):
            listed = mig.stale
            try:
                if listed:
                    self._list(gpu, uuid, handle, mig)
                instances = tuple(self._instance(device) for device in mig.devices)
            except NvmlFailure as exc:
                why = str(exc)
                mig.stale = True  # an instance may be gone: list them anew
                continue
            processes, unmatched = _merged(instances, parent)
            if not listed and unmatched - mig.unmatched:
                mig.stale = True  # the parent lists a process no instance does: an instance created since?
                continue
            mig.unmatched = unmatched if listed else mig.unmatched & unmatched
            if mig.fallback is not None:
                mig.fallback = None
                log.info("nvml_mig_recovered", gpu=gpu, uuid=uuid, instances=len(instances))
            return instances, processes
        mig.stale = False  # tried twice this tick: again at the slow cadence
        if mig.fallback is None:
            log.warning(
                "nvml_mig_fallback",
                gpu=gpu,
                uuid=uuid,
                reason=why or "the MIG devices changed while they were read",
                effect="memory and processes are read on the whole GPU, as without MIG support, "
                "until the per-instance reads work again",
            )
        mig.fallback = why or "the MIG devices changed while they were read"
        return None, parent

    def _fn(self, name: str) -> Callable[..., Any]:
        """The NVML function ``name``; one these bindings lack raises a MISSING_CALL NvmlFailure when called."""
        fn = getattr(self._nvml, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]

        def absent(*args: Any) -> Any:
            raise NvmlFailure(Kind.MISSING_CALL, f"this nvidia-ml-py has no {name}")

        return absent

    def _list(self, gpu: int, uuid: str, handle: Any, mig: MigState) -> None:
        """List the GPU's MIG devices into ``mig`` (an empty index skipped); raises NvmlFailure."""
        call = self._call
        count = call(self._fn("nvmlDeviceGetMaxMigDeviceCount"), handle)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_MIG_DEVICES:
            raise NvmlFailure(Kind.TRANSIENT, f"implausible MIG device count {count!r}")
        by_index, uuid_of = self._fn("nvmlDeviceGetMigDeviceHandleByIndex"), self._fn("nvmlDeviceGetUUID")
        devices: list[Device] = []
        for index in range(count):
            try:
                mig_handle = call(by_index, handle, index)
            except NvmlFailure as exc:
                if exc.kind is Kind.NOT_FOUND:
                    continue  # no MIG device at this index
                raise
            devices.append((index, text(call(uuid_of, mig_handle)), mig_handle, self._gpu_instance(mig_handle)))
        uuids = tuple(d[1] for d in devices)
        if len(set(uuids)) != len(uuids):
            raise NvmlFailure(Kind.TRANSIENT, f"two MIG devices answer the same UUID: {', '.join(uuids)}")
        mig.devices, mig.stale = tuple(devices), False
        if uuids != mig.listed:
            mig.listed = uuids
            log.info("nvml_mig_instances_changed", gpu=gpu, uuid=uuid, count=len(uuids), instances=list(uuids))

    def _gpu_instance(self, handle: Any) -> int | None:
        """The GPU instance id of a MIG device; None when NVML cannot say (its memory is then its own)."""
        try:
            gi = self._call(self._fn("nvmlDeviceGetGpuInstanceId"), handle)
        except NvmlFailure:
            return None
        return gi if isinstance(gi, int) and not isinstance(gi, bool) and 0 <= gi < MAX_MIG_DEVICES else None

    def _instance(self, device: Device) -> MigInstanceReading:
        """One MIG device's memory and compute processes; raises NvmlFailure."""
        index, uuid, handle, gi = device
        call = self._call
        memory = call(self._memory, handle)
        compute = call(self._compute, handle)
        total = int(memory.total) or None
        used = int(memory.used) if total is not None and 0 <= memory.used <= total else None
        processes = self._lister.processes(compute, None, total)
        return MigInstanceReading(
            uuid=uuid,
            index=index,
            memory_used_bytes=used,
            memory_total_bytes=total,
            processes=() if processes is None else processes,
            gpu_instance_id=gi,
        )


def _merged(
    instances: tuple[MigInstanceReading, ...], parent: tuple[ProcessReading, ...] | None
) -> tuple[tuple[ProcessReading, ...], frozenset[int]]:
    """The GPU's processes: each pid once, its bytes summed over the GPU instances it runs in (None when
    any is None; MIG devices of one GPU instance count once, at their most), then the parent's entries
    for pids no instance lists; and those pids."""
    shares: dict[int, dict[object, int | None]] = {}  # pid -> GPU instance (or MIG UUID) -> bytes
    first: dict[int, ProcessReading] = {}
    for instance in instances:
        key = instance.uuid if instance.gpu_instance_id is None else instance.gpu_instance_id
        for process in instance.processes:
            first.setdefault(process.pid, process)
            by_key = shares.setdefault(process.pid, {})
            b = process.used_memory_bytes
            if key in by_key:
                a = by_key[key]
                b = None if a is None or b is None else max(a, b)
            by_key[key] = b
    by_pid: dict[int, ProcessReading] = {}
    for pid, process in first.items():
        values = shares[pid].values()
        total = None if None in values else sum(v for v in values if v is not None)
        by_pid[pid] = process if process.used_memory_bytes == total else replace(process, used_memory_bytes=total)
    unmatched = []
    for process in parent or ():
        if process.pid not in by_pid:
            by_pid[process.pid] = process
            unmatched.append(process.pid)
    return tuple(by_pid.values()), frozenset(unmatched)
