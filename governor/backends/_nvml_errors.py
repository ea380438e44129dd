"""NVML failures: one classification table and the one way NVML is called.

Every NVML error code the backend treats specially is in :data:`TABLE`, mapped to a
:class:`Kind`; any other code is :attr:`Kind.TRANSIENT`. What each kind does, per
situation, is decided by the caller from the kind alone:

==============  ===============================  ===========================  ==========================
kind            reading a field                  setting a limit              at start (nvmlInit)
==============  ===============================  ===========================  ==========================
UNSUPPORTED     None; not asked again for a      SetLimitRefused              BackendUnavailable
                while (``unsupported_reprobe_s``) (GPU monitor-only)
DENIED          None for this tick               SetLimitRefused              BackendUnavailable
LOST            the GPU reads LOST; its handle   GpuLostError                 BackendUnavailable
                is reacquired with backoff
FATAL           BackendFatal                     BackendFatal                 BackendFatal
NO_DRIVER       None for this tick               SetLimitFailed               BackendUnavailable (no
                                                                              driver: try --simulate)
MISSING_CALL    the next older version of the    SetLimitFailed               BackendUnavailable
                call is tried (governor.backends._nvml_probe)
INVALID         None for this tick               SetLimitFailed; the GPU's    BackendUnavailable
                                                 range is read again at the
                                                 next tick (it may have moved)
TRANSIENT       None for this tick               SetLimitFailed               BackendUnavailable
TIMEOUT         None for this tick (an event     SetLimitFailed               BackendUnavailable
                wait: nothing is pending)
NOT_FOUND       None for this tick (listing MIG  SetLimitFailed               BackendUnavailable
                devices: an empty index, skipped)
==============  ===============================  ===========================  ==========================

:class:`NvmlCaller` is the one call wrapper (like nvitop's ``nvmlQuery``): it runs an
NVML function and turns an ``NVMLError`` into :class:`BackendFatal` (FATAL, at any call)
or an :class:`NvmlFailure` carrying its kind. The per-tick field reads keep their own
``try`` for speed (no extra frame per call) and hand the error to the same
:meth:`NvmlCaller.failure`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from governor.errors import BackendFatal

VERSION_MISMATCH_MESSAGE: Final = "NVIDIA driver and library versions differ (driver upgraded?); restart needed"

T = TypeVar("T")


class Kind(enum.Enum):
    """What an NVML error means for the governor."""

    UNSUPPORTED = "unsupported"  # this GPU cannot give it (or do it), now or later
    DENIED = "denied"  # no permission (a read or a set the governor may not do)
    LOST = "lost"  # the GPU stopped answering
    FATAL = "fatal"  # the library no longer matches the driver: only a restart helps
    NO_DRIVER = "no_driver"  # no driver / no library
    MISSING_CALL = "missing_call"  # this version of the call is not in the driver or the bindings
    INVALID = "invalid"  # NVML refused an argument: for a limit, one outside the range the GPU takes now
    TRANSIENT = "transient"  # anything else (no data ...): may pass on a later try
    TIMEOUT = "timeout"  # a wait ended with nothing to report (nvmlEventSetWait: no event pending)
    NOT_FOUND = "not_found"  # nothing at that index (nvmlDeviceGetMigDeviceHandleByIndex: no MIG device there)


TABLE: Final[Mapping[str, tuple[int, Kind]]] = {
    # nvml.h symbol: (its code, used when the bindings lack the constant; its kind)
    "NVML_ERROR_INVALID_ARGUMENT": (2, Kind.INVALID),
    "NVML_ERROR_NOT_SUPPORTED": (3, Kind.UNSUPPORTED),
    "NVML_ERROR_NO_PERMISSION": (4, Kind.DENIED),
    "NVML_ERROR_NOT_FOUND": (6, Kind.NOT_FOUND),
    "NVML_ERROR_TIMEOUT": (10, Kind.TIMEOUT),
    "NVML_ERROR_DRIVER_NOT_LOADED": (9, Kind.NO_DRIVER),
    "NVML_ERROR_LIBRARY_NOT_FOUND": (12, Kind.NO_DRIVER),
    "NVML_ERROR_FUNCTION_NOT_FOUND": (13, Kind.MISSING_CALL),
    "NVML_ERROR_GPU_IS_LOST": (15, Kind.LOST),
    "NVML_ERROR_RESET_REQUIRED": (16, Kind.LOST),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (18, Kind.FATAL),
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": (25, Kind.MISSING_CALL),
    "NVML_ERROR_GPU_NOT_FOUND": (28, Kind.LOST),
    "NVML_ERROR_UNKNOWN": (999, Kind.LOST),
}
"""Every NVML error code with a meaning of its own; any other code is TRANSIENT."""


class NvmlFailure(Exception):
    """An NVML call failed; ``kind`` says what that means, ``code`` is NVML's (None without
    one), the message is NVML's."""

    def __init__(self, kind: Kind, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class NvmlCaller:
    """Calls NVML and classifies its failures through :data:`TABLE`.

    ``nvml`` is the ``pynvml`` module or a stand-in with the same API; the codes are
    read from it where it has them.
    """

    __slots__ = ("_kinds", "_mismatch", "error", "timeout_error")

    def __init__(self, nvml: Any) -> None:
        self.error: type[Exception] = nvml.NVMLError
        self._kinds: dict[int, Kind] = {}
        for symbol, (code, kind) in TABLE.items():
            self._kinds[int(getattr(nvml, symbol, code))] = kind
        timeout = nvml.NVMLError(int(getattr(nvml, "NVML_ERROR_TIMEOUT", TABLE["NVML_ERROR_TIMEOUT"][0])))
        self.timeout_error: tuple[type[Exception], ...] = (
            (type(timeout),) if type(timeout) is not self.error and isinstance(timeout, self.error) else ()
        )
        """NVML's own class for a Timeout, to catch it without classifying (an event wait
        answers it every tick); empty when the bindings have none (then :meth:`kind` says TIMEOUT)."""
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        self._mismatch: type[BaseException] | None = (
            mismatch if isinstance(mismatch, type) and issubclass(mismatch, BaseException) else None
        )

    @property
    def probe_errors(self) -> tuple[type[BaseException], ...]:
        """What a version probe catches: NVML errors and the bindings lacking a function."""
        extra = () if self._mismatch is None else (self._mismatch,)
        return (self.error, AttributeError, TypeError, *extra)

    def kind(self, exc: BaseException) -> Kind:
        """The kind of ``exc``: through the table for an NVML error; a function the
        bindings lack (AttributeError, TypeError, nvidia-ml-py's NVMLLibraryMismatchError,
        which carries no code) is MISSING_CALL."""
        if isinstance(exc, (AttributeError, TypeError)) or (
            self._mismatch is not None and isinstance(exc, self._mismatch)
        ):
            return Kind.MISSING_CALL
        code = getattr(exc, "value", None)
        if not isinstance(code, int):
            return Kind.TRANSIENT
        return self._kinds.get(code, Kind.TRANSIENT)

    def failure(self, exc: BaseException) -> NvmlFailure:
        """``exc`` as an NvmlFailure; raises BackendFatal when its kind is FATAL."""
        kind = self.kind(exc)
        if kind is Kind.FATAL:
            raise BackendFatal(f"{VERSION_MISMATCH_MESSAGE} (NVML: {exc})") from None
        code = getattr(exc, "value", None)
        return NvmlFailure(kind, str(exc), code if isinstance(code, int) else None)

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``; an NVML error becomes NvmlFailure (or BackendFatal)."""
        try:
            return fn(*args)
        except self.error as exc:
            raise self.failure(exc) from None
