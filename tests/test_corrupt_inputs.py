"""Corrupt and hostile files found by an adversarial review of every loader: each one gets
the loader's own error naming the file and the key, never a traceback, a hang or a value
that breaks the daemon later."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from governor.cli import main
from governor.errors import SimDataError
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario

DATA = Path(__file__).resolve().parent.parent / "governor" / "data"
H100_PROFILE = (DATA / "profiles" / "h100-80gb.toml").read_text()
DEEP_TOML = "x = " + "[" * 5000 + "]" * 5000 + "\n"
LONG_INT_TOML = "x = 1" + "0" * 5000 + "\n"
DEVICE = '{"record": "device", "gpu": 0, "uuid": "GPU-t"}\n'


def write(tmp_path: Path, name: str, text: str) -> Path:
    """``text`` written to ``tmp_path/name``."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def scenario_text(phase: str = "duration_s = 60.0\ndemand_fraction = 0.5\n", rest: str = "") -> str:
    """A scenario with one phase (its keys ``phase``) and ``rest`` after it."""
    return f'name = "t"\n[[phase]]\n{phase}{rest}'


# --------------------------------------------------------------------------- TOML


class TestTomlTheParserChokesOn:
    @pytest.mark.parametrize("text", [DEEP_TOML, LONG_INT_TOML], ids=["deep-nesting", "5000-digit-int"])
    def test_a_profile_gets_its_own_error(self, tmp_path: Path, text: str) -> None:
        """A profile the TOML parser cannot take (nesting past the recursion limit, an integer
        too long to convert) is a SimDataError naming the file, not a RecursionError/ValueError."""
        path = write(tmp_path, "p.toml", text)
        with pytest.raises(SimDataError) as caught:
            load_profile(str(path))
        assert str(path) in str(caught.value)

    @pytest.mark.parametrize("text", [DEEP_TOML, LONG_INT_TOML], ids=["deep-nesting", "5000-digit-int"])
    def test_a_scenario_gets_its_own_error(self, tmp_path: Path, text: str) -> None:
        """The same for a scenario file."""
        path = write(tmp_path, "s.toml", text)
        with pytest.raises(SimDataError) as caught:
            load_scenario(str(path))
        assert str(path) in str(caught.value)

    def test_check_config_with_such_a_profile_exits_3(self, tmp_path: Path) -> None:
        """check-config --profile with a profile nested too deeply prints one line naming the
        profile and exits 3 (it ended in a RecursionError traceback)."""
        profile = write(tmp_path, "deep.toml", DEEP_TOML)
        config = write(tmp_path, "g.toml", f'state_dir = "{tmp_path}/s"\nruntime_dir = ""\n')
        out, err = io.StringIO(), io.StringIO()
        code = main(["check-config", str(config), "--profile", str(profile)], out=out, err=err)
        assert code == 3
        assert str(profile) in err.getvalue()
