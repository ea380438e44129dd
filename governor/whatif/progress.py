"""A one-line progress display for long simulations, shown only on a terminal."""

from __future__ import annotations

from typing import TextIO


class Progress:
    """Rewrites ``\\r<label>: NN%`` on ``stream`` as simulated time advances.

    Silent when ``stream`` is not a terminal (a pipe, a file, a CI log), so output
    that is captured or redirected holds no carriage returns. A line is written only
    when the whole percentage changes: at most 101 writes per run.
    """

    def __init__(self, stream: TextIO, *, enabled: bool | None = None) -> None:
        self.stream = stream
        if enabled is None:
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self._label = ""
        self._total_s = 1.0
        self._shown = -1
        self._width = 0

    def start(self, label: str, total_s: float) -> None:
        """Begin a run of ``total_s`` simulated seconds called ``label``."""
        self._label = label
        self._total_s = max(total_s, 1e-9)
        self._shown = -1
        self.update(0.0)

    def update(self, done_s: float) -> None:
        """``done_s`` simulated seconds of the run are done."""
        if not self.enabled:
            return
        percent = max(0, min(100, int(100.0 * done_s / self._total_s)))
        if percent == self._shown:
            return
        self._shown = percent
        line = f"{self._label}: {percent:3d}%"
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line)
        self.stream.flush()

    def finish(self) -> None:
        """Erase the progress line, leaving the cursor at the start of an empty line."""
        if not self.enabled or self._width == 0:
            return
        self.stream.write("\r" + " " * self._width + "\r")
        self.stream.flush()
        self._width = 0
