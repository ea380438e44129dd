"""XID errors from NVML events: one event set for every GPU, polled without waiting.

At open the backend creates one event set and registers each GPU for
``nvmlEventTypeXidCriticalError``. A GPU whose registration NVML refuses
(NotSupported, NoPermission: a vGPU guest, an unprivileged container) or that the
bindings cannot register (no event API) has no XID monitoring: its XID counter is
absent, and that is logged once (``nvml_xid_unavailable``). Each tick
:meth:`XidEvents.poll` calls ``nvmlEventSetWait_v2(set, 0)`` until NVML answers
Timeout (nothing pending), at most :data:`MAX_EVENTS_PER_POLL` times, so a storm of
events cannot hold a tick; the rest wait for the next one. :meth:`XidEvents.close`
frees the set (before ``nvmlShutdown``).

Events name their GPU by device handle; a real handle is a ctypes pointer, compared
by the address it holds (two pointer objects to one device are not ``==``).
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

import structlog

from governor.backends._nvml_errors import Kind, NvmlCaller, NvmlFailure
from governor.backends._nvml_telemetry import GpuTelemetryState

log = structlog.get_logger("governor.nvml")

EVENT_TYPE_XID: Final = 0x8  # nvmlEventTypeXidCriticalError
MAX_EVENTS_PER_POLL: Final = 32
"""Events drained per tick at most; the others stay queued in NVML for the next tick."""


def handle_key(handle: Any) -> Any:
    """A hashable key equal for two handles of one device: the address a ctypes pointer
    holds, else the handle itself (a test's stand-in)."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


class XidEvents:
    """The event set through which the backend learns of XID errors (see the module docstring).

    Each watched GPU's :class:`GpuTelemetryState` counts its XID errors; ``poll`` adds
    those that arrived since the last tick.
    """

    def __init__(self, nvml: Any, call: NvmlCaller) -> None:
        self._nvml = nvml
        self._call = call
        self._xid = int(getattr(nvml, "nvmlEventTypeXidCriticalError", EVENT_TYPE_XID))
        self._wait: Any = getattr(nvml, "nvmlEventSetWait_v2", None) or getattr(nvml, "nvmlEventSetWait", None)
        self._register: Any = getattr(nvml, "nvmlDeviceRegisterEvents", None)
        self._free: Any = getattr(nvml, "nvmlEventSetFree", None)
        self._set: Any = None
        self.unavailable: str | None = None  # why no GPU can be watched (None: the set exists)
        self._wait_failed: set[int | None] = set()
        self._gpus: dict[Any, GpuTelemetryState] = {}  # by device key
        create: Any = getattr(nvml, "nvmlEventSetCreate", None)
        if not (callable(create) and callable(self._wait) and callable(self._register)):
            self.unavailable = "this nvidia-ml-py has no event API"
        else:
            try:
                self._set = call(create)
            except NvmlFailure as exc:
                self.unavailable = f"nvmlEventSetCreate: {exc}"
        if self.unavailable is not None:
            log.info("nvml_xid_unavailable", reason=self.unavailable, effect="no XID counter for any GPU")

    def watch(self, index: int, uuid: str, handle: Any, gpu: GpuTelemetryState) -> None:
        """Watch GPU ``index`` through ``handle``: its XID errors are counted into ``gpu``
        (which then counts them: ``xid_errors`` is no longer None). A GPU NVML refuses is
        logged once and never asked again; a handle whose device is already watched is a
        no-op.

        Raises NvmlFailure of kind LOST when the GPU stopped answering (the backend calls
        again once it has a new handle).
        """
        if self._set is None or gpu.xid_refused:
            return
        key = handle_key(handle)
        if key == gpu.xid_key:
            return
        try:
            self._call(self._register, handle, self._xid, self._set)
        except NvmlFailure as exc:
            if exc.kind is Kind.LOST:
                raise
            gpu.xid_refused = True
            log.info(
                "nvml_xid_unavailable", gpu=index, uuid=uuid, reason=str(exc), effect="no XID counter for this GPU"
            )
            return
        self._gpus[key] = gpu  # an older key of the same GPU keeps counting into it too
        gpu.watched(key)

    def poll(self) -> None:
        """Count the XID events pending now into their GPUs, without waiting.

        Raises BackendFatal on a driver/library mismatch; any other failure ends this
        poll (logged once per NVML code) and the next tick tries again.
        """
        if not self._gpus:  # no set, or no GPU NVML agreed to watch
            return
        wait, event_set, call = self._wait, self._set, self._call
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                data = wait(event_set, 0)
            except call.timeout_error:  # nothing pending: the usual answer
                break
            except call.error as exc:
                if call.kind(exc) is Kind.TIMEOUT:  # nothing pending: the usual answer
                    break
                failure = call.failure(exc)  # raises BackendFatal when FATAL
                if failure.code not in self._wait_failed:
                    self._wait_failed.add(failure.code)
                    log.warning("nvml_xid_poll_failed", reason=str(failure), kind=failure.kind.value)
                break
            if not int(data.eventType) & self._xid:
                continue
            gpu = self._gpus.get(handle_key(data.device))
            if gpu is None:
                log.warning("nvml_xid_unknown_gpu", xid=int(data.eventData))
                continue
            gpu.count_xid(int(data.eventData))

    def close(self) -> None:
        """Free the event set (idempotent); a failure is logged."""
        event_set, self._set = self._set, None
        if event_set is None or not callable(self._free):
            return
        try:
            self._free(event_set)
        except self._call.error as exc:
            log.warning("nvml_event_set_free_failed", reason=str(exc))
