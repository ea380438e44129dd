"""One error hierarchy (governor.errors): exit codes, and fatal backend errors never swallowed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from governor import errors
from governor.actuator import Actuator
from governor.backends import BackendFatal, GpuError, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.cli import main
from governor.clock import VirtualClock
from governor.config import Config, PowerPolicy
from governor.daemon import STOP, Daemon, VirtualWaiter
from governor.model import Action, Decision, Outcome, Rule
from governor.notify import Notifier
from governor.state import OriginalLimits
from tests.helpers import CARD_200W, H100, RecordingBackend, reading, snapshot
from tests.scripted import ScriptedBackend

GOVERNOR = Path(__file__).resolve().parents[1] / "governor"


class TestHierarchy:
    """Every deliberate error is a GovernorError carrying the exit code of the README's table."""

    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (errors.ConfigError([errors.ConfigIssue("f.toml", "k", "a number", "'x'")]), 3),
            (errors.SimDataError([errors.ConfigIssue("p.toml", "k", "a number", "'x'")]), 3),
            (errors.BackendUnavailable("no NVIDIA driver found"), 4),
            (errors.BackendFatal("driver upgraded"), 5),
            (errors.CliError("cannot listen", errors.EXIT_BIND), 6),
            (errors.StatusError("refused", "usage"), 2),
            (errors.StatusError("refused", "unreachable"), 7),
            (errors.StatusError("HTTP 404", "answer"), 9),
            (errors.TraceError("t.jsonl:3: not JSON"), 2),
            (errors.WhatIfError("--duration: bad"), 2),
        ],
    )
    def test_exit_codes(self, error: errors.GovernorError, code: int) -> None:
        """Each user-facing error's own exit_code is the documented one."""
        assert isinstance(error, errors.GovernorError)
        assert error.exit_code == code

    def test_fatal_is_not_a_gpu_error(self) -> None:
        """BackendFatal and BackendUnavailable are outside GpuError, the only backend error code may carry on after."""
        assert not issubclass(errors.BackendFatal, errors.GpuError)
        assert not issubclass(errors.BackendUnavailable, errors.GpuError)
        for cls in (errors.GpuLostError, errors.SetLimitRefused, errors.SetLimitFailed):
            assert issubclass(cls, errors.GpuError)

    def test_old_import_paths_name_the_same_classes(self) -> None:
        """The names at their old homes are the classes of governor.errors, not copies."""
        from governor import backends, cli, config, safefile, status, trace
        from governor.sim import _schema
        from governor.whatif import common

        assert config.ConfigError is errors.ConfigError and config.ConfigIssue is errors.ConfigIssue
        assert _schema.SimDataError is errors.SimDataError
        assert backends.BackendFatal is errors.BackendFatal and backends.GpuLostError is errors.GpuLostError
        assert cli.CliError is errors.CliError and cli.EXIT_NO_DRIVER == errors.EXIT_NO_DRIVER == 4
        assert safefile.UnusableFile is errors.StateError
        assert status.StatusError is errors.StatusError
        assert trace.TraceError is errors.TraceError
        assert common.WhatIfError is errors.WhatIfError

    def test_cli_prints_config_error_lines_and_exits_3(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """main() maps a ConfigError through its own exit code and prints one line per problem."""
        path = tmp_path / "governor.toml"
        path.write_text("poll_interval_s = 'soon'\n")
        path.chmod(0o600)
        assert main(["check-config", str(path)]) == 3
        err = capsys.readouterr().err
        assert err.startswith("gpu-governor: config error: ")
        assert "poll_interval_s" in err


def _set_to(watts: float) -> Decision:
    """A decision asking for ``watts`` on CARD_200W."""
    return Decision(
        t_s=1.0,
        gpu_index=0,
        gpu_uuid=CARD_200W.uuid,
        rule=Rule.POWER_STEP_DOWN,
        action=Action.SET_POWER_LIMIT,
        reason="test",
        to_w=watts,
    )


class TestActuatorLetsFatalThrough:
    """The bug of issue 13: a fatal NVML error while setting was counted as a failed action."""

    def test_fatal_while_setting_propagates(self, tmp_path: Path) -> None:
        """BackendFatal from set_power_limit leaves apply(); the original stays saved for the next start."""
        backend = RecordingBackend(infos=(CARD_200W,), fail_with=BackendFatal("driver/library version mismatch"))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        decision = _set_to(180.0)
        with pytest.raises(BackendFatal, match="version mismatch"):
            act.apply([decision], snapshot(1.0, [reading(80.0, 200.0)]))
        assert backend.calls == [(CARD_200W.uuid, 180.0)]
        assert act.monitor_only == {}
        assert OriginalLimits(tmp_path).get(CARD_200W.uuid) == 200.0

    def test_fatal_while_restoring_propagates(self, tmp_path: Path) -> None:
        """restore() lets BackendFatal through too; the original not restored stays on disk."""
        backend = RecordingBackend(infos=(CARD_200W, H100))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W, H100))
        act.apply([_set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        backend.fail_with = BackendFatal("driver upgraded")
        with pytest.raises(BackendFatal):
            act.restore(snapshot(2.0, [reading(80.0, 180.0)]), 2.0, "restore_on_stop")
        assert backend.calls[-1] == (CARD_200W.uuid, 200.0)
        assert OriginalLimits(tmp_path).get(CARD_200W.uuid) == 200.0

    @pytest.mark.parametrize(
        ("error", "monitor_only"),
        [(SetLimitFailed("busy"), False), (GpuLostError("gone"), False), (SetLimitRefused("NO_PERMISSION"), True)],
    )
    def test_gpu_errors_are_counted_not_raised(self, tmp_path: Path, error: GpuError, monitor_only: bool) -> None:
        """A GpuError is one FAILED action and governing goes on (the contrast to BackendFatal)."""
        backend = RecordingBackend(infos=(CARD_200W,), fail_with=error)
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        (result,) = act.apply([_set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.FAILED
        assert (CARD_200W.uuid in act.monitor_only) is monitor_only


class _FatalBackend(ScriptedBackend):
    """Scripted hardware whose driver breaks: a set below ``fatal_below_w`` raises BackendFatal,
    and once ``broken`` every set does."""

    def __init__(self, clock: VirtualClock, *, fatal_below_w: float, stays_broken: bool) -> None:
        super().__init__(clock, lambda t, i: 50.0 if t < 10 else 90.0)
        self.fatal_below_w = fatal_below_w
        self.stays_broken = stays_broken
        self.broken = False
        self.attempts: list[float] = []

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Record the attempt; raise BackendFatal as configured, else set like hardware."""
        self.attempts.append(limit_w)
        if self.broken or limit_w < self.fatal_below_w:
            self.broken = self.stays_broken
            raise BackendFatal("NVML: driver/library version mismatch; restart needed")
        super().set_power_limit(uuid, limit_w)


class _StopAt(VirtualWaiter):
    """Virtual waiting that asks the loop to stop once the clock would pass ``stop_s``."""

    def __init__(self, clock: VirtualClock, stop_s: float) -> None:
        super().__init__(clock)
        self.stop_s = stop_s

    def wait(self, deadline_s: float) -> list[str]:
        """STOP instead of waiting past ``stop_s``."""
        return [STOP] if deadline_s > self.stop_s else super().wait(deadline_s)


def _daemon(tmp_path: Path, backend: _FatalBackend, clock: VirtualClock) -> Daemon:
    """A daemon over ``backend`` with a three-rung ladder (200, 180, 160 W), stopping at 600 s."""
    config = Config(
        state_dir=str(tmp_path),
        runtime_dir="",
        power=PowerPolicy(ladder_w=(200.0, 180.0, 160.0), min_change_interval_s=5.0),
    )
    return Daemon(config, backend, clock, waiter=_StopAt(clock, 600.0), notifier=Notifier())


class TestDaemonStopsOnFatal:
    """A daemon whose backend fails fatally while setting stops governing and exits 5."""

    def test_exits_5_after_restoring(self, tmp_path: Path) -> None:
        """Fatal on the second step down: run() returns 5 and the original 200 W is back."""
        clock = VirtualClock()
        backend = _FatalBackend(clock, fatal_below_w=170.0, stays_broken=False)
        daemon = _daemon(tmp_path, backend, clock)
        assert daemon.run() == 5
        assert clock.monotonic() < 600.0  # it stopped at the fatal error, not at the end
        assert backend.attempts == [180.0, 160.0, 200.0]  # step, fatal step, restore
        assert backend.limits_w[backend.infos[0].uuid] == 200.0
        assert OriginalLimits(tmp_path).items() == []

    def test_fatal_restore_keeps_the_original_for_the_next_start(self, tmp_path: Path) -> None:
        """The driver stays broken: the restore is tried, the error escapes (exit 5), the original stays
        saved, and the backend is still closed."""
        clock = VirtualClock()
        backend = _FatalBackend(clock, fatal_below_w=170.0, stays_broken=True)
        daemon = _daemon(tmp_path, backend, clock)
        with pytest.raises(BackendFatal) as info:
            daemon.run()
        assert info.value.exit_code == 5
        assert backend.attempts == [180.0, 160.0, 200.0]  # the restore was tried
        assert OriginalLimits(tmp_path).get(backend.infos[0].uuid) == 200.0
        assert backend.closed


def _getattr_on_backend(tree: ast.AST) -> list[int]:
    """Line numbers of ``getattr(<...backend...>, ...)`` calls in ``tree``."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        if node.func.id == "getattr" and "backend" in ast.unparse(node.args[0]).lower():
            lines.append(node.lineno)
    return lines


_PENDING: dict[str, pytest.MarkDecorator] = {}  # modules still allowed to probe: none


class TestNoBackendProbing:
    """The Backend Protocol declares its optional members: nothing probes a backend with getattr."""

    @pytest.mark.parametrize(
        "path",
        [pytest.param(p, marks=_PENDING[p.name]) if p.name in _PENDING else p for p in sorted(GOVERNOR.rglob("*.py"))],
        ids=lambda p: str(p.relative_to(GOVERNOR)),
    )
    def test_no_getattr_on_a_backend(self, path: Path) -> None:
        """No module of governor/ calls getattr on a backend object."""
        assert _getattr_on_backend(ast.parse(path.read_text())) == []

    def test_the_check_finds_probing(self) -> None:
        """The check above fails on the pattern it forbids (it is not vacuous)."""
        assert _getattr_on_backend(ast.parse("x = getattr(self.backend, 'waiting_reason', None)")) == [1]

    def test_every_backend_has_the_optional_members(self) -> None:
        """Every shipped backend answers waiting_reason and state_warning (None without the feature)."""
        from governor.backends.deferred import DeferredBackend
        from governor.backends.nvml import NvmlBackend
        from governor.backends.simulated import SimulatedBackend
        from tests.fake_pynvml import FakeGpu, FakeNvml

        clock = VirtualClock()
        nvml = NvmlBackend(clock, FakeNvml([FakeGpu(uuid="GPU-0")]))
        assert (nvml.waiting_reason, nvml.state_warning) == (None, None)
        assert SimulatedBackend.waiting_reason is None
        deferred = DeferredBackend(lambda: nvml, clock, name="nvml")
        assert (deferred.waiting_reason, deferred.state_warning) == (None, None)
