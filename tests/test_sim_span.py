"""PhaseTimeline.span_at: the bound up to which a phase lookup may be kept."""

from __future__ import annotations

from pathlib import Path

from governor.sim import load_scenario
from governor.sim.scenario import SPAN_MARGIN_S, PhaseTimeline


def _timeline(tmp_path: Path, text: str) -> PhaseTimeline:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return PhaseTimeline(load_scenario(str(path)))


class TestSpanAt:
    def test_answer_holds_up_to_its_bound(self, tmp_path: Path) -> None:
        """Every later time up to span_at's bound gets the phase and end span_at gave (odd durations, many cycles)."""
        text = 'name="odd"\n'
        for duration in (0.1, 0.2, 0.7, 1.3):
            text += f"[[phase]]\nduration_s={duration}\ndemand_w=0\n"
        timeline = _timeline(tmp_path, text)
        times = [k * 0.05 for k in range(2000)]
        for i, t0 in enumerate(times):
            phase, end_s, until_s = timeline.span_at(t0)
            assert (phase, end_s) == timeline.phase_at(t0)
            assert until_s <= end_s - SPAN_MARGIN_S or until_s == t0
            for t in times[i:]:
                if t > until_s:
                    break
                assert timeline.phase_at(t) == (phase, end_s)

    def test_held_last_phase_is_kept_forever(self, tmp_path: Path) -> None:
        """With repeat = false, the last phase's answer holds for good (bound inf)."""
        text = 'name="h"\nrepeat=false\n[[phase]]\nduration_s=10\ndemand_w=0\n[[phase]]\nduration_s=5\ndemand_w=0\n'
        timeline = _timeline(tmp_path, text)
        assert timeline.span_at(3.0)[2] == 10.0 - SPAN_MARGIN_S
        assert timeline.span_at(12.0)[1:] == (float("inf"), float("inf"))
        assert timeline.span_at(1e6)[1:] == (float("inf"), float("inf"))
