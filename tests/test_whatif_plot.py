"""--plot on replay and simulate: a valid PNG written by matplotlib, or one clear line without it."""

from __future__ import annotations

import importlib.util
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from governor.cli import main
from tests.builders import write_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (the plot extra)"
)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks of a PNG, each CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    chunks = []
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, payload = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + payload) == crc
        chunks.append((kind, payload))
        at += 12 + length
    return chunks


def check_png(path: Path) -> tuple[int, int]:
    """Assert ``path`` is a whole PNG that matplotlib wrote and can read back; returns (width, height)."""
    data = path.read_bytes()
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    texts = [payload for kind, payload in chunks if kind == b"tEXt"]
    assert any(t.startswith(b"Software\x00Matplotlib") for t in texts)
    import matplotlib.image

    image: Any = matplotlib.image.imread(str(path))
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert image.shape[:2] == (height, width)
    return width, height


@needs_matplotlib
class TestPlots:
    def test_simulate_plot(self, tmp_path: Path) -> None:
        """simulate --plot writes a valid 1200x900 PNG and says so."""
        png = tmp_path / "sim.png"
        out = io.StringIO()
        code = main(
            ["simulate", "--profile", "rtx4070", "--scenario", "leaky-process", "--duration", "5m", "--plot", str(png)],
            out=out,
            err=io.StringIO(),
        )
        assert code == 0
        assert f"wrote plot {png}" in out.getvalue()
        assert check_png(png) == (1200, 900)

    def test_replay_plot(self, tmp_path: Path) -> None:
        """replay --plot writes a valid PNG of the trace with the would-be limit and decisions."""
        write_trace(tmp_path / "t.jsonl")
        png = tmp_path / "replay.png"
        code = main(["replay", str(tmp_path / "t.jsonl"), "--plot", str(png)], out=io.StringIO(), err=io.StringIO())
        assert code == 0
        check_png(png)

    def test_unwritable_plot_path_is_one_line(self, tmp_path: Path) -> None:
        """A plot path in a missing directory: one line naming it, exit code 2."""
        write_trace(tmp_path / "t.jsonl")
        err = io.StringIO()
        target = tmp_path / "no" / "such" / "dir.png"
        code = main(["replay", str(tmp_path / "t.jsonl"), "--plot", str(target)], out=io.StringIO(), err=err)
        assert code == 2 and err.getvalue().count("\n") == 1 and str(target) in err.getvalue()


class TestWithoutMatplotlib:
    @pytest.mark.parametrize("command", ["replay", "simulate"])
    def test_clear_message_before_any_work(self, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without matplotlib, --plot fails at once with the install hint on one line and exit code 2."""
        real = importlib.util.find_spec

        def find_spec(name: str, *args: Any) -> Any:
            return None if name == "matplotlib" else real(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        write_trace(tmp_path / "t.jsonl")
        argv = {
            "replay": ["replay", str(tmp_path / "t.jsonl")],
            "simulate": ["simulate", "--profile", "rtx4070", "--scenario", "idle", "--duration", "24h"],
        }[command]
        out, err = io.StringIO(), io.StringIO()
        assert main([*argv, "--plot", str(tmp_path / "p.png")], out=out, err=err) == 2
        assert err.getvalue() == "gpu-governor: matplotlib is needed for --plot: pip install 'gpu-governor[plot]'\n"
        assert out.getvalue() == "" and not (tmp_path / "p.png").exists()
