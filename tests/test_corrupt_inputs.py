"""Corrupt and hostile files found by an adversarial review of every loader: each one gets
the loader's own error naming the file and the key, never a traceback, a hang or a value
that breaks the daemon later."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest

from governor.classes import parse_vram
from governor.cli import main
from governor.config import ConfigError, load_config, parse_config
from governor.errors import SimDataError, TraceError
from governor.schema import Issues
from governor.sim.profiles import load_profile
from governor.sim.scenario import PhaseTimeline, load_scenario
from governor.trace import read_trace
from governor.webconfig import parse_web_config
from tests.support import raised_on_a_fifo

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


# --------------------------------------------------------------------------- traces


class TestTraceFiles:
    def test_a_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A trace path that is a FIFO with no writer is refused at once (open() blocked forever)."""
        fifo = tmp_path / "trace.jsonl"
        raised = raised_on_a_fifo(read_trace, fifo)
        assert isinstance(raised, TraceError)
        assert str(fifo) in str(raised) and "regular file" in str(raised)

    def test_a_device_is_refused_unread(self) -> None:
        """/dev/zero (an endless line of NULs) is refused as not a regular file, not read until memory runs out."""
        with pytest.raises(TraceError, match=r"/dev/zero: .*regular file"):
            read_trace("/dev/zero")

    def test_a_directory_is_refused(self, tmp_path: Path) -> None:
        """A directory is a TraceError naming it."""
        with pytest.raises(TraceError, match=re.escape(str(tmp_path))):
            read_trace(tmp_path)

    def test_an_endless_line_is_refused(self, tmp_path: Path) -> None:
        """A line longer than any record (here 3 MiB of one string) is refused naming file:line."""
        path = write(tmp_path, "t.jsonl", DEVICE + '{"record": "sample", "x": "' + "a" * (3 << 20) + '"}\n')
        with pytest.raises(TraceError, match=re.escape(f"{path}:2") + ".*longer"):
            read_trace(path)

    @pytest.mark.parametrize(
        "value",
        ["[" * 100_000 + "]" * 100_000, "1" * 5000],
        ids=["deep-nesting", "5000-digit-int"],
    )
    def test_json_the_decoder_chokes_on(self, tmp_path: Path, value: str) -> None:
        """A line nested past the recursion limit or holding a 5000-digit integer is a TraceError
        naming file:line (RecursionError and ValueError escaped as tracebacks)."""
        path = write(tmp_path, "t.jsonl", DEVICE + '{"record": "sample", "gpu": 0, "t": 0, "x": ' + value + "}\n")
        with pytest.raises(TraceError, match=re.escape(f"{path}:2")):
            read_trace(path)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("gpu", 0.5), ("memory_used_bytes", 1.5), ("clock_event_reasons", 2.25), ("gpu", -1), ("gpu", 1e300)],
    )
    def test_an_integer_field_needs_a_whole_number(self, tmp_path: Path, field: str, value: float) -> None:
        """An int field holding a fraction (gpu 0.5 was read as GPU 0) or a GPU index outside
        0-1023 is refused naming the field."""
        record = {"record": "sample", "gpu": 0, "t": 0.0, field: value}
        path = write(tmp_path, "t.jsonl", DEVICE + json.dumps(record) + "\n")
        with pytest.raises(TraceError, match=f"field '{field}'"):
            read_trace(path)

    def test_whole_floats_still_count_as_integers(self, tmp_path: Path) -> None:
        """39.0 and 39 mean the same (docs/trace-format.md): a whole float in an int field is read."""
        record = {"record": "sample", "gpu": 0.0, "t": 0.0, "memory_used_bytes": 1024.0}
        path = write(tmp_path, "t.jsonl", DEVICE + json.dumps(record) + "\n")
        sample = read_trace(path).samples[0][0]
        assert sample.reading.memory_used_bytes == 1024

    def test_a_huge_bad_value_is_shown_cut(self, tmp_path: Path) -> None:
        """A bad 'record' value of 500 kB is shown cut short in the error, not echoed whole."""
        path = write(tmp_path, "t.jsonl", json.dumps({"record": "x" * 500_000}) + "\n")
        with pytest.raises(TraceError, match="field 'record'") as caught:
            read_trace(path)
        assert len(str(caught.value)) < 400


# --------------------------------------------------------------------------- web-config


class TestWebConfigValues:
    @pytest.mark.parametrize("key", ["client_auth_type", "min_version", "max_version"])
    @pytest.mark.parametrize("value", [[1, 2], {"a": 1}, {1, 2}], ids=["list", "mapping", "set"])
    def test_a_collection_where_a_name_belongs_names_the_key(self, tmp_path: Path, key: str, value: object) -> None:
        """A list or mapping as client_auth_type/min_version/max_version is an issue at that key
        (it was a TypeError 'unhashable type' reported against the whole file)."""
        document = {"tls_server_config": {"cert_file": "c.pem", "key_file": "k.pem", key: value}}
        with pytest.raises(ConfigError) as caught:
            parse_web_config(document, "web.yml", tmp_path)
        keys = [issue.key for issue in caught.value.issues]
        assert keys == [f"tls_server_config.{key}"]


# --------------------------------------------------------------------------- config values


def vram_issue_keys(vram: object = None, classes: object = None) -> list[str]:
    """The keys of the problems parse_vram finds in ``[vram]`` and ``[[class]]``."""
    out = Issues("g.toml")
    parse_vram(vram, classes, out)
    return [issue.key for issue in out.issues]


class TestVramSizes:
    @pytest.mark.parametrize(
        "size",
        [10**400, 2**64, "9999999999999999999999999999999999999999999999999999999TiB"],
        ids=["10**400", "2**64", "a-huge-string"],
    )
    def test_an_impossible_reserve_is_refused(self, size: object) -> None:
        """A reserve no GPU can have (10**400 bytes made every scrape answer 500: 'int too large
        to convert to float') is refused naming vram.reserve."""
        assert vram_issue_keys({"reserve": size}) == ["vram.reserve"]

    def test_an_impossible_budget_is_refused(self) -> None:
        """The same for a class budget."""
        classes = [{"name": "c", "budget": 10**400, "action": "kill", "match": {"user": "1000"}}]
        assert vram_issue_keys(None, classes) == ["class[0].budget"]

    def test_the_largest_plausible_size_is_taken(self) -> None:
        """1 PiB (far above any GPU) is still a valid budget and reserve."""
        classes = [{"name": "c", "budget": "1024TiB", "match": {"user": "1000"}}]
        assert vram_issue_keys({"reserve": "1024TiB"}, classes) == []


class TestListenAddress:
    @pytest.mark.parametrize("address", ["\x00", "127.0.0.1\x00", "a b", "h\n", "x" * 254])
    def test_an_address_no_socket_takes_is_refused(self, address: str) -> None:
        """A listen_address with a NUL (a TypeError traceback at start), a control character,
        a space or more than 253 characters is a config issue naming metrics.listen_address."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"listen_address": address, "allow_remote": True}}, "g.toml")
        assert [issue.key for issue in caught.value.issues] == ["metrics.listen_address"]

    @pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost", "gpu-node-7.example.org", "0.0.0.0"])
    def test_addresses_and_host_names_are_taken(self, address: str) -> None:
        """IP addresses and host names still load."""
        config = parse_config({"metrics": {"listen_address": address, "allow_remote": True}}, "g.toml")
        assert config.metrics.listen_address == address


# --------------------------------------------------------------------------- profiles and scenarios


def profile_with(tmp_path: Path, old: str, new: str) -> Path:
    """The shipped H100 profile with the line ``old`` replaced by ``new``."""
    assert old in H100_PROFILE
    return write(tmp_path, "p.toml", H100_PROFILE.replace(old, new))


class TestProfileValues:
    @pytest.mark.parametrize(
        ("old", "new", "key"),
        [
            ("r_die_c_per_w = 0.026487", "r_die_c_per_w = 1e308", "thermal.r_die_c_per_w"),
            ("r_sink_c_per_w = 0.026288", "r_sink_c_per_w = 5e-324", "thermal.r_sink_c_per_w"),
            ("c_die_j_per_c = 12.1593", "c_die_j_per_c = 5e-324", "thermal.c_die_j_per_c"),
            ("c_sink_j_per_c = 673.21", "tau_sink_s = 1e308", "thermal.tau_sink_s"),
            ("max_w = 700.0\ndefault_w = 700.0", "max_w = 1e308\ndefault_w = 1e308", "power_limit.max_w"),
            ("memory_total_bytes = 85520809984", "memory_total_bytes = 1" + "0" * 400, "memory_total_bytes"),
        ],
        ids=["r-huge", "r-tiny", "c-tiny", "tau-huge", "limit-huge", "memory-huge"],
    )
    def test_a_constant_no_gpu_has_is_refused(self, tmp_path: Path, old: str, new: str, key: str) -> None:
        """Thermal constants, powers and memory outside any GPU's range are refused naming the key
        (they loaded, then the simulator died of OverflowError, ZeroDivisionError or ValueError)."""
        with pytest.raises(SimDataError) as caught:
            load_profile(str(profile_with(tmp_path, old, new)))
        assert key in {issue.key for issue in caught.value.issues}


class TestScenarioValues:
    def test_a_vanishing_phase_is_refused(self, tmp_path: Path) -> None:
        """A phase of 5e-324 s (OverflowError in the phase timeline at the first tick) is refused
        naming phase[0].duration_s."""
        path = write(tmp_path, "s.toml", scenario_text("duration_s = 5e-324\ndemand_fraction = 0.5\n"))
        with pytest.raises(SimDataError) as caught:
            load_scenario(str(path))
        assert [issue.key for issue in caught.value.issues] == ["phase[0].duration_s"]

    def test_a_one_millisecond_phase_runs(self, tmp_path: Path) -> None:
        """The shortest phase taken (1 ms) still gives the timeline a finite answer late in a run."""
        path = write(tmp_path, "s.toml", scenario_text("duration_s = 0.001\ndemand_fraction = 0.5\n"))
        timeline = PhaseTimeline(load_scenario(str(path)))
        index, end_s = timeline.phase_at(1e9)
        assert index == 0 and 1e9 <= end_s <= 1e9 + 0.002

    @pytest.mark.parametrize(
        ("rest", "key"),
        [
            ('[[event]]\nat_s = 1.0\ngpu = 100000000000000000000\nfault = "lost"\n', "event[0].gpu"),
            ('[[process]]\nname = "p"\ngpu = 64\nmemory_gib = 1.0\n', "process[0].gpu"),
            ('[[process]]\nname = "p"\nmemory_bytes = 1' + "0" * 400 + "\n", "process[0].memory_bytes"),
            (
                '[[process]]\nname = "p"\nmemory_gib = 1.0\ngrowth_bytes_per_s = 1e308\n',
                "process[0].growth_bytes_per_s",
            ),
        ],
        ids=["event-gpu-1e20", "process-gpu-64", "memory-10**400", "growth-1e308"],
    )
    def test_an_impossible_gpu_or_size_is_refused(self, tmp_path: Path, rest: str, key: str) -> None:
        """A GPU index past the 64 GPUs a simulation has (simulate sized itself to 10**20 GPUs and
        hung), or a size no GPU holds (OverflowError turning it into a float) is refused naming the key."""
        path = write(tmp_path, "s.toml", scenario_text(rest=rest))
        with pytest.raises(SimDataError) as caught:
            load_scenario(str(path))
        assert [issue.key for issue in caught.value.issues] == [key]

    def test_a_phase_gpu_override_past_64_is_refused(self, tmp_path: Path) -> None:
        """The same for a phase's per-GPU override."""
        phase = "duration_s = 60.0\ndemand_fraction = 0.5\n[[phase.gpu]]\nindex = 64\ndemand_fraction = 0.1\n"
        path = write(tmp_path, "s.toml", scenario_text(phase))
        with pytest.raises(SimDataError) as caught:
            load_scenario(str(path))
        assert [issue.key for issue in caught.value.issues] == ["phase[0].gpu[0].index"]


class TestByteOrderMark:
    def test_a_config_saved_with_a_bom_loads(self, tmp_path: Path) -> None:
        """A config an editor saved with a UTF-8 byte-order mark loads as written (it was refused
        as 'Invalid statement (at line 1, column 1)', naming nothing a person could see)."""
        path = tmp_path / "g.toml"
        path.write_bytes(b"\xef\xbb\xbfpoll_interval_s = 2.5\n")
        assert load_config(path, enforce_trust=False).poll_interval_s == 2.5

    def test_a_bom_inside_is_still_refused(self, tmp_path: Path) -> None:
        """Only a leading mark is dropped: one inside the text is still a TOML error naming the file."""
        path = tmp_path / "g.toml"
        path.write_bytes(b"poll_interval_s = 2.5\n\xef\xbb\xbfdry_run = true\n")
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_config(path, enforce_trust=False)

    def test_a_file_of_only_a_bom_is_empty(self, tmp_path: Path) -> None:
        """A file holding nothing but the mark is an empty file (refused), not all defaults."""
        path = tmp_path / "g.toml"
        path.write_bytes(b"\xef\xbb\xbf\n")
        with pytest.raises(ConfigError, match="an empty file"):
            load_config(path, enforce_trust=False)


class TestWebConfigFileKey:
    @pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "empty"])
    def test_a_web_config_file_that_cannot_be_used_names_the_config_key(self, tmp_path: Path, kind: str) -> None:
        """A web_config_file that is missing, a directory, a FIFO or empty is reported at
        metrics.web_config_file of the config that names it (the issue named only the web-config
        path, with no key, so nothing said which setting pointed there)."""
        web = tmp_path / "web.yml"
        if kind == "directory":
            web.mkdir()
        elif kind == "fifo":
            os.mkfifo(web)
        elif kind == "empty":
            web.write_text("")
        with pytest.raises(ConfigError) as caught:
            parse_config({"metrics": {"web_config_file": str(web)}}, "g.toml")
        [issue] = caught.value.issues
        assert (issue.file, issue.key) == ("g.toml", "metrics.web_config_file")
        assert str(web) in issue.got
