"""The NVML classification table: each class of error leads to its behaviour (read, set, start)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from governor.backends import BackendFatal, BackendUnavailable, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.backends._nvml_errors import TABLE, Kind, NvmlCaller, NvmlFailure
from governor.backends.nvml import NO_DRIVER_MESSAGE, VERSION_MISMATCH_MESSAGE, NvmlBackend
from governor.clock import VirtualClock
from governor.errors import BackendError
from governor.model import GpuHealth
from tests import fake_pynvml
from tests.fake_pynvml import NVML_ERROR_NO_DATA, FakeGpu, FakeNvml, NVMLError

UUID = "GPU-00000000-0000-0000-0000-000000000000"
GOVERNOR = Path(__file__).resolve().parents[1] / "governor"

# Every code of the table, plus one it does not list (TRANSIENT), with the kind expected.
CASES = [pytest.param(code, kind, id=symbol) for symbol, (code, kind) in TABLE.items()] + [
    pytest.param(NVML_ERROR_NO_DATA, Kind.TRANSIENT, id="NVML_ERROR_NO_DATA"),
]


def test_table_codes_match_nvml_h() -> None:
    """The fallback codes of the table are nvml.h's (as the fake, which mirrors pynvml, has them)."""
    for symbol, (code, _) in TABLE.items():
        assert getattr(fake_pynvml, symbol) == code, symbol


@pytest.mark.parametrize(("code", "kind"), CASES)
def test_classification(code: int, kind: Kind) -> None:
    """NvmlCaller classifies each code by the table; FATAL becomes BackendFatal at any call."""
    caller = NvmlCaller(FakeNvml([]))

    def fails() -> None:
        raise NVMLError(code)

    if kind is Kind.FATAL:
        with pytest.raises(BackendFatal, match="restart needed"):
            caller(fails)
        return
    with pytest.raises(NvmlFailure) as info:
        caller(fails)
    assert info.value.kind is kind
    assert info.value.code == code


def test_missing_function_in_the_bindings_is_missing_call() -> None:
    """A function the Python bindings lack (AttributeError) classifies as MISSING_CALL, not an error."""
    caller = NvmlCaller(FakeNvml([]))
    assert caller.kind(AttributeError("nvmlDeviceGetTemperatureV")) is Kind.MISSING_CALL


READ_BEHAVIOUR = {
    # kind: (health of the GPU, power read again on the next tick)
    Kind.UNSUPPORTED: (GpuHealth.OK, False),
    Kind.DENIED: (GpuHealth.OK, True),
    Kind.NO_DRIVER: (GpuHealth.OK, True),
    Kind.MISSING_CALL: (GpuHealth.OK, True),
    Kind.INVALID: (GpuHealth.OK, True),
    Kind.TRANSIENT: (GpuHealth.OK, True),
    Kind.TIMEOUT: (GpuHealth.OK, True),
    Kind.NOT_FOUND: (GpuHealth.OK, True),
    Kind.LOST: (GpuHealth.LOST, False),
}


@pytest.mark.parametrize(("code", "kind"), CASES)
def test_reading_a_field(code: int, kind: Kind) -> None:
    """A per-tick read failing with ``code``: None (resting when unsupported), LOST GPU, or BackendFatal."""
    fake_gpu = FakeGpu(uuid=UUID)
    fake = FakeNvml([fake_gpu])
    clock = VirtualClock()
    backend = NvmlBackend(clock, nvml=fake)
    fake_gpu.errors["nvmlDeviceGetPowerUsage"] = code
    if kind is Kind.FATAL:
        with pytest.raises(BackendFatal, match="restart needed"):
            backend.read()
        return
    (reading,) = backend.read().gpus
    health, asked_again = READ_BEHAVIOUR[kind]
    assert reading.health is health
    assert reading.power_w is None
    if health is GpuHealth.OK:
        assert reading.temperature_c == 40.0  # the other fields read as usual
    before = fake.calls["nvmlDeviceGetPowerUsage"]
    clock.advance(0.5)  # within the lost GPU's backoff and the unsupported field's rest
    backend.read()
    assert (fake.calls["nvmlDeviceGetPowerUsage"] > before) is asked_again


SET_BEHAVIOUR: dict[Kind, type[BackendError]] = {
    Kind.UNSUPPORTED: SetLimitRefused,
    Kind.DENIED: SetLimitRefused,
    Kind.LOST: GpuLostError,
    Kind.FATAL: BackendFatal,
    Kind.NO_DRIVER: SetLimitFailed,
    Kind.MISSING_CALL: SetLimitFailed,
    Kind.INVALID: SetLimitFailed,
    Kind.TRANSIENT: SetLimitFailed,
    Kind.TIMEOUT: SetLimitFailed,
    Kind.NOT_FOUND: SetLimitFailed,
}


@pytest.mark.parametrize(("code", "kind"), CASES)
def test_setting_a_limit(code: int, kind: Kind) -> None:
    """Setting a limit failing with ``code`` raises the error of its kind; a LOST GPU then reads LOST."""
    fake_gpu = FakeGpu(uuid=UUID)
    backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([fake_gpu]))
    fake_gpu.errors["nvmlDeviceSetPowerManagementLimit"] = code
    with pytest.raises(SET_BEHAVIOUR[kind]) as info:
        backend.set_power_limit(UUID, 500.0)
    assert type(info.value) is SET_BEHAVIOUR[kind]
    if kind is Kind.LOST:
        assert backend.read().gpus[0].health is GpuHealth.LOST


@pytest.mark.parametrize(("code", "kind"), CASES)
def test_starting(code: int, kind: Kind) -> None:
    """nvmlInit failing with ``code``: BackendFatal when FATAL, else BackendUnavailable (no driver: names the fix)."""
    fake = FakeNvml([FakeGpu(uuid=UUID)], init_error=code)
    expected = BackendFatal if kind is Kind.FATAL else BackendUnavailable
    with pytest.raises(expected) as info:
        NvmlBackend(VirtualClock(), nvml=fake)
    assert type(info.value) is expected
    if kind is Kind.FATAL:
        assert VERSION_MISMATCH_MESSAGE in str(info.value)
    elif kind is Kind.NO_DRIVER:
        assert NO_DRIVER_MESSAGE in str(info.value)
    else:
        assert "NVML failed to initialise" in str(info.value)


def test_error_codes_are_compared_only_in_the_table() -> None:
    """No governor module but the table's names an NVML error constant or reads an error's ``.value``."""
    offenders = []
    for path in sorted(GOVERNOR.rglob("*.py")):
        if path.name == "_nvml_errors.py":
            continue
        source = path.read_text()
        if "NVML_ERROR_" in source:
            offenders.append(f"{path.name}: NVML_ERROR_")
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"):
                continue
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "value":
                offenders.append(f"{path.name}:{node.lineno}: getattr(..., 'value')")
    assert offenders == []
