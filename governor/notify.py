"""sd_notify, with named methods: a no-op outside systemd (no NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    """Tells systemd about readiness, reloads, stops, liveness and status."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status: str | None = None
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        pid_ok = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s: float | None = (
            int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and pid_ok else None
        )

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str | None = None) -> None:
        """READY=1 (and STATUS=): the service is serving."""
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        if status:
            self._last_status = status

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic timestamp systemd asks for."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """WATCHDOG=1, only when systemd asked for it (WATCHDOG_USEC)."""
        if self.watchdog_interval_s is not None:
            self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """STATUS=text, sent only when it changed."""
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")
