"""Target mode's online thermal fit on real and fast-settling cards (governor.rules.fit), and the offline replay
of recorded readings through it (governor.whatif.fitreplay)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from governor.errors import WhatIfError
from governor.rules.fit import AMBIENT_RANGE_C, FitState, observe, replay
from governor.sim.profiles import load_profile
from governor.sim.thermal import ThermalParams, ThermalState
from governor.trace import read_trace
from governor.whatif.fitreplay import raw_record, read_samples, replay_all, report, samples_from_trace, summary
from tests.support import raised_on_a_fifo

H100_TRACE = Path(__file__).parent / "data" / "h100-load.jsonl"
H200_TRACE = Path(__file__).parent / "data" / "h200-steps.jsonl"
"""A real H200 at 1 Hz under three load steps (bench/gpu_record_steps.sh): 36 C idle, 60 C at 690 W within ~5 s."""
H100 = load_profile("h100-80gb").thermal
"""The h100-80gb profile's constants, fitted by ``calibrate`` on the same trace: die tau 0.3 s, heatsink 17.7 s."""
FAST = ThermalParams(r_die_c_per_w=0.02, c_die_j_per_c=50.0, r_sink_c_per_w=0.018, c_sink_j_per_c=400.0)
"""A card that settles within seconds, as the H200 did: die tau 1 s, heatsink 7 s, 0.038 C/W."""


def plant(
    params: ThermalParams, pattern: list[tuple[int, float]], room_c: float = 30.0, then_room_c: float | None = None
) -> list[tuple[float, float | None, float | None]]:
    """Readings once a second (whole degrees, power with 1 W of noise) of ``params`` settled in ``room_c`` at
    the first phase's power and then driven through ``pattern`` (seconds, watts); the room is ``then_room_c``
    from the last phase on, when given."""
    rng = random.Random(0)
    state = ThermalState.at_steady_state(params, 1.0, pattern[0][1], room_c)
    out: list[tuple[float, float | None, float | None]] = []
    for index, (seconds, watts) in enumerate(pattern):
        room = then_room_c if then_room_c is not None and index == len(pattern) - 1 else room_c
        for _ in range(seconds):
            power = max(0.0, watts + rng.gauss(0.0, 1.0))
            out.append((float(len(out) + 1), float(round(state.step(power, room))), power))
    return out


class TestRealH100:
    def test_h100_trace_prediction_error(self) -> None:
        """On the real H100 trace (1 Hz: idle, 700 W, cool-down) the 60-s error is at most 4.5 C RMS, 3.5 C mean abs."""
        trace = read_trace(H100_TRACE)
        result = replay(((s.t_s, s.reading.temperature_c, s.reading.power_w) for s in trace.samples[0]), 700.0)
        assert len(result.errors_c) >= 25
        assert result.rms_c is not None and result.rms_c <= 4.5
        assert result.mean_abs_c is not None and result.mean_abs_c <= 3.5
        # The largest error is the first load's first half minute, before the data can tell where it settles.
        assert result.max_abs_c is not None and result.max_abs_c <= 14.0
        assert all(abs(e) <= 5.0 for e in result.errors_c[6:])

    def test_h100_trace_room_is_stable_and_the_model_near_calibrates(self) -> None:
        """On the H100 trace the room stays within 3 C; the model ends near calibrate's (0.0528 C/W, 17.7 s, 34.1 C)."""
        trace = read_trace(H100_TRACE)
        result = replay(((s.t_s, s.reading.temperature_c, s.reading.power_w) for s in trace.samples[0]), 700.0)
        assert result.rooms_c and max(result.rooms_c) - min(result.rooms_c) <= 3.0
        model = result.final.fitted
        assert model is not None
        assert abs(model.r_total_c_per_w - 0.0528) <= 0.1 * 0.0528
        assert 10.0 <= model.tau_s <= 30.0
        assert abs(model.ambient_c - 34.1) <= 2.0


class TestRealH200:
    def test_h200_trace_is_followed_after_the_first_load(self) -> None:
        """On the real H200 steps the 60-s error is within 1.5 C once a load has been seen, and the room stays put."""
        trace = read_trace(H200_TRACE)
        result = replay(((s.t_s, s.reading.temperature_c, s.reading.power_w) for s in trace.samples[0]), 700.0)
        assert len(result.errors_c) >= 50
        # Only the first two scores are from models made before the first load had settled (the prior's guess).
        assert all(abs(e) <= 1.5 for e in result.errors_c[2:])
        assert result.mean_abs_c is not None and result.mean_abs_c <= 2.0
        assert result.rooms_c and max(result.rooms_c) - min(result.rooms_c) <= 4.0
        model = result.final.fitted
        assert model is not None
        # The trace itself: (60 - 36) C over (691 - 79) W = 0.039 C/W between idle and load.
        assert abs(model.r_total_c_per_w - 0.039) <= 0.1 * 0.039


class TestFastCards:
    def test_power_steps_are_not_a_change_of_room(self) -> None:
        """The H100 profile's plant stepping between idle and 700 W in a 30 C room: the room stays 30 +- 2 C."""
        readings = plant(
            H100, [(20, 72.0), (100, 700.0), (10, 72.0), (60, 700.0), (120, 72.0), (100, 700.0), (200, 72.0)]
        )
        result = replay(readings, 700.0)
        assert result.rooms_c and all(abs(room - 30.0) <= 2.0 for room in result.rooms_c)

    def test_a_card_that_settles_in_seconds_is_learnt(self) -> None:
        """A card with a 7-s heatsink: after its first load the 60-s error is < 1 C RMS, its slope within 5 %."""
        readings = plant(FAST, [(30, 81.0), (90, 690.0), (40, 81.0), (120, 690.0), (60, 81.0), (120, 690.0)])
        result = replay(readings, 700.0)
        later = result.errors_c[24:]
        assert len(later) >= 40 and math.sqrt(sum(e * e for e in later) / len(later)) < 1.0
        assert max(abs(e) for e in later) < 4.0  # the blocks a step falls in
        model = result.final.fitted
        assert model is not None and abs(model.r_total_c_per_w - FAST.r_total_c_per_w) <= 0.05 * FAST.r_total_c_per_w
        assert model.tau_s < 20.0

    def test_a_room_that_warms_under_a_constant_load_moves_the_room(self) -> None:
        """Under a constant 700 W a room going from 34 C to 37 C shows where the model settles within 10 minutes."""
        readings = plant(H100, [(20, 72.0), (1200, 700.0), (600, 700.0)], room_c=34.0, then_room_c=37.0)
        result = replay(readings, 700.0)
        model = result.final.fitted
        assert model is not None and abs(model.steady_c(700.0) - (37.0 + 700.0 * H100.r_total_c_per_w)) <= 1.0
        assert abs(result.errors_c[-1]) <= 1.0


class TestRoomBounds:
    @pytest.mark.parametrize(
        ("die_c", "low", "high"), [(95.0, None, AMBIENT_RANGE_C[1]), (-25.0, AMBIENT_RANGE_C[0], None)]
    )
    def test_an_implausible_room_is_bounded(self, die_c: float, low: float | None, high: float | None) -> None:
        """A die that reads 95 C (or -25 C) at idle gives a room at the bound of the plausible range, not beyond it."""
        result = replay([(float(t), die_c, 10.0 + (t // 60) % 2 * 50.0) for t in range(600)], 200.0)
        assert result.rooms_c
        assert all(AMBIENT_RANGE_C[0] <= room <= AMBIENT_RANGE_C[1] for room in result.rooms_c)
        assert high is None or result.rooms_c[-1] == high
        assert low is None or result.rooms_c[-1] == low

    def test_room_never_above_the_heatsink(self) -> None:
        """At every block, the fitted room is at or below the heatsink the block's die and power imply."""
        fit, block = FitState(), None
        for t, temp, power in plant(H100, [(20, 72.0), (100, 700.0), (60, 72.0), (100, 700.0)]):
            assert temp is not None and power is not None
            fit, block = observe(fit, block, t, temp, power, 700.0)
            if fit.fitted is not None and fit.last_block is not None and block.n == 1:
                temp_c, power_w = fit.last_block
                assert fit.fitted.ambient_c <= temp_c - fit.fitted.r_die_c_per_w * power_w + 1e-9


class TestReplay:
    def test_replay_skips_missing_readings_and_counts_every_score(self) -> None:
        """A sample missing its temperature or power is skipped; every error the fit scores is returned."""
        readings = plant(H100, [(20, 72.0), (200, 700.0)])
        holed = [(t, None if 100 <= t < 103 else temp, power) for t, temp, power in readings]
        result = replay(holed, 700.0)
        assert result.errors_c and len(result.errors_c) == result.final.scored
        assert result.final.last_t_s == readings[-1][0]

    def test_no_readings_no_errors(self) -> None:
        """Replaying nothing scores nothing: every statistic is None."""
        result = replay([], 700.0)
        assert result.errors_c == () and result.rms_c is None and result.mean_abs_c is None and result.max_abs_c is None


class TestFitReplayFiles:
    def test_dry_run_raw_samples_replay_like_the_trace(self, tmp_path: Path) -> None:
        """A dry run's summary.json with the raw samples of a trace replays to the same errors as the trace itself."""
        trace = read_trace(H100_TRACE)
        summary_file = tmp_path / "summary.json"
        summary_file.write_text(json.dumps({"target_c": 54.0, "raw": raw_record(trace)}))
        from_json = replay_all(read_samples(summary_file))
        from_trace = replay_all(read_samples(H100_TRACE))
        assert [r.errors_c for _, r in from_json] == [r.errors_c for _, r in from_trace]
        assert from_json[0][0].samples == samples_from_trace(trace)[0].samples
        text = report(from_json)
        assert "GPU 0 (NVIDIA H100 80GB HBM3)" in text and "RMS" in text
        assert summary(from_json)[0]["prediction_error_samples"] == len(from_json[0][1].errors_c)

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ({"target_c": 54.0}, "key 'raw': missing"),
            ({"raw": {"gpus": "x"}}, "key 'raw.gpus'"),
            ({"raw": {"gpus": [{"gpu": -1, "power_limit_default_w": 700, "samples": []}]}}, "raw.gpus[0].gpu"),
            ({"raw": {"gpus": [{"gpu": 0, "power_limit_default_w": 0, "samples": []}]}}, "power_limit_default_w"),
            ({"raw": {"gpus": [{"gpu": 0, "power_limit_default_w": 700, "samples": {}}]}}, "raw.gpus[0].samples"),
            (
                {
                    "raw": {
                        "gpus": [
                            {"gpu": 0, "power_limit_default_w": 700, "samples": [{"t": 0, "temperature_c": "hot"}]}
                        ]
                    }
                },
                "samples[0].temperature_c",
            ),
            (
                {"raw": {"gpus": [{"gpu": 0, "power_limit_default_w": 700, "samples": [{"t": 2}, {"t": 1}]}]}},
                "samples[1].t: samples must be in time order",
            ),
        ],
    )
    def test_bad_summary_names_the_file_and_key(self, tmp_path: Path, document: object, message: str) -> None:
        """A summary.json with a missing or wrong key is refused with the file and the key in the message."""
        path = tmp_path / "summary.json"
        path.write_text(json.dumps(document))
        with pytest.raises(WhatIfError) as caught:
            read_samples(path)
        assert str(path) in str(caught.value) and message in str(caught.value)

    def test_non_finite_sample_is_refused(self, tmp_path: Path) -> None:
        """A NaN temperature (Python's json reads it) is refused, naming the sample."""
        path = tmp_path / "summary.json"
        sample = '{"t": 0, "temperature_c": NaN, "power_w": 80}'
        path.write_text('{"raw": {"gpus": [{"gpu": 0, "power_limit_default_w": 700, "samples": [' + sample + "]}]}}")
        with pytest.raises(WhatIfError, match=r"samples\[0\]\.temperature_c: expected a finite number"):
            read_samples(path)

    def test_garbage_file_is_refused(self, tmp_path: Path) -> None:
        """A file that is neither a summary nor a trace is refused with its name."""
        path = tmp_path / "junk.jsonl"
        path.write_bytes(b"\xff\xfe not text")
        with pytest.raises(WhatIfError, match=str(path)):
            read_samples(path)

    def test_a_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """fit-replay's input that is a FIFO with no writer is refused at once (it used to block forever)."""
        fifo = tmp_path / "summary.json"
        raised = raised_on_a_fifo(read_samples, fifo)
        assert isinstance(raised, WhatIfError)
        assert str(fifo) in str(raised) and "regular file" in str(raised)

    def test_a_device_is_refused_unread(self) -> None:
        """/dev/zero is refused as not a regular file, not read until memory runs out."""
        with pytest.raises(WhatIfError, match=r"/dev/zero: .*regular file"):
            read_samples("/dev/zero")

    @pytest.mark.parametrize("text", ["[" * 100_000, '{"raw": ' + "9" * 5000 + "}"], ids=["deep", "long-integer"])
    def test_json_python_cannot_read_is_a_clear_error(self, tmp_path: Path, text: str) -> None:
        """A document nested too deep or with a 5000-digit integer is a WhatIfError naming the file, not a traceback."""
        path = tmp_path / "summary.json"
        path.write_text(text)
        with pytest.raises(WhatIfError, match=str(path)):
            read_samples(path)

    def test_default_limit_override(self) -> None:
        """--default-w replaces the trace's default limit, which scales the fit's prior."""
        gpus = read_samples(H100_TRACE, default_w=350.0)
        assert gpus[0].power_limit_default_w == 350.0
        assert not math.isclose(
            replay_all(gpus)[0][1].errors_c[0], replay_all(read_samples(H100_TRACE))[0][1].errors_c[0]
        )
