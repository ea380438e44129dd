"""The command line: ``gpu-governor run | check-config | status | record | calibrate | replay | simulate``.

Errors are one clear line on stderr and a distinct exit code, never a traceback:

====  ==========================================================
code  meaning
====  ==========================================================
0     success
1     unexpected internal error (a bug: please report it)
2     bad command-line usage
3     invalid or untrusted configuration
4     no NVIDIA driver / NVML library (try ``--simulate``)
5     the hardware backend failed fatally (e.g. driver upgraded): restart
6     the metrics address cannot be bound (port in use, bad address)
7     ``status``: the daemon's metrics endpoint cannot be reached
====  ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import getpass
import io
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from governor import __version__, earlysignals
from governor.backends import Backend, BackendFatal, BackendUnavailable
from governor.clock import Clock, RealClock
from governor.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    check_metrics,
    check_resolved,
    load_config,
    render_config,
)
from governor.model import GpuInfo

if TYPE_CHECKING:
    from governor.daemon import Daemon, Waiter

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NO_DRIVER = 4
EXIT_BACKEND_FATAL = 5
EXIT_BIND = 6
EXIT_UNREACHABLE = 7


class CliError(Exception):
    """An error with its exit code; printed as one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="gpu-governor", description="Keeps NVIDIA GPUs inside thermal, power and VRAM budgets."
    )
    parser.add_argument("--version", action="version", version=f"gpu-governor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the governor daemon")
    run.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    run.add_argument(
        "--simulate",
        nargs="?",
        const="",
        metavar="PROFILE",
        help="use the simulated GPU backend (optionally with a profile name or file)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="decide and log every action, but take none: no power limit set, no process signalled",
    )
    run.add_argument(
        "--wait-for-driver",
        action="store_true",
        help="with no NVIDIA driver yet, serve metrics and retry until it loads (instead of exiting 4)",
    )
    run.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="metrics address (default 127.0.0.1:9847)")
    run.add_argument("--log-format", choices=["auto", "console", "json", "journal"], help="log format")

    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective config, with the power ladder each GPU gets",
    )
    check.add_argument("path", nargs="?", type=Path, default=DEFAULT_CONFIG_PATH)
    check.add_argument(
        "--profile",
        action="append",
        metavar="PROFILE",
        help="show the ladder on this simulated profile (name or TOML; repeatable; 'all': every built-in one) "
        "instead of the GPUs the NVIDIA driver reports",
    )

    status = sub.add_parser("status", help="show what the running daemon sees and decided")
    status.add_argument("--url", help="metrics URL (default: from the config, http://127.0.0.1:9847/metrics)")
    status.add_argument("--config", type=Path, default=None, help="config to take the metrics address from")
    status.add_argument("--cacert", help="CA or self-signed certificate to trust for https (default: tls_cert_file)")
    status.add_argument(
        "--user", help="basic-auth user; the password comes from GPU_GOVERNOR_METRICS_PASSWORD or a prompt"
    )

    record = sub.add_parser("record", help="record NVML samples to a trace file (JSON Lines)")
    record.add_argument("--output", "-o", type=Path, required=True, help="trace file to write")
    record.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    record.add_argument("--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C)")
    record.add_argument("--simulate", nargs="?", const="", metavar="PROFILE", help="record the simulated GPU")

    calibrate = sub.add_parser("calibrate", help="fit the simulator's thermal model to a recorded trace")
    calibrate.add_argument("trace", type=Path, help="trace file written by `record`")
    calibrate.add_argument("--output", "-o", type=Path, help="write the fitted profile (TOML) here")
    calibrate.add_argument("--check", type=Path, metavar="OTHER_TRACE", help="report the error predicting this trace")
    calibrate.add_argument("--gpu", type=int, metavar="N", help="fit only GPU N (needed for --output with several)")

    replay = sub.add_parser("replay", help="what would the rules have decided on a recorded trace (open loop)")
    replay.add_argument("trace", type=Path, help="trace file written by `record`")
    replay.add_argument("--config", type=Path, help="config whose policy to replay (default: built-in defaults)")
    replay.add_argument("--plot", type=Path, metavar="FILE.png", help="write a plot (needs matplotlib)")

    simulate = sub.add_parser("simulate", help="run policies on a simulated GPU and compare them (closed loop)")
    simulate.add_argument("--profile", required=True, help="profile name (rtx4070, h100-80gb) or TOML path")
    simulate.add_argument("--scenario", required=True, help="scenario name (sustained-inference, ...) or TOML path")
    simulate.add_argument("--duration", required=True, help="simulated time: 24h, 90m, 3600s")
    simulate.add_argument("--config", type=Path, help="config whose policy to simulate (default: built-in defaults)")
    simulate.add_argument("--compare", type=Path, nargs="+", metavar="CONFIG", help="more configs, side by side")
    simulate.add_argument("--seed", type=int, default=0, help="power noise seed (default 0)")
    simulate.add_argument("--gpus", type=int, metavar="N", help="simulated GPUs (default: what the scenario needs)")
    simulate.add_argument("--plot", type=Path, metavar="FILE.png", help="write a plot (needs matplotlib)")

    sub.add_parser(
        "hash-password",
        help="read a password (stdin; prompted without echo on a terminal), print its hash for "
        "[metrics] basic_auth_password_hash",
    )
    return parser


def _load_run_config(path: Path | None) -> Config:
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config(source=f"built-in defaults ({DEFAULT_CONFIG_PATH} not found)")
        path = DEFAULT_CONFIG_PATH
    return load_config(path)


def make_backend(config: Config, clock: Clock) -> Backend:
    """Open the backend the config names; BackendUnavailable when there is no driver."""
    if config.backend == "simulated":
        from governor.backends.simulated import build_simulated_backend

        return build_simulated_backend(config.simulation, clock)
    from governor.backends.nvml import NvmlBackend

    if config.wait_for_driver:
        from governor.backends.deferred import DeferredBackend

        return DeferredBackend(lambda: NvmlBackend(clock), clock, name="nvml")
    return NvmlBackend(clock)


def _with_simulate(config: Config, simulate: str | None) -> Config:
    """``--simulate [PROFILE]``: the simulated backend, with the profile when one is named."""
    if simulate is None:
        return config
    simulation = replace(config.simulation, profile=simulate) if simulate else config.simulation
    return replace(config, backend="simulated", simulation=simulation)


def _open_backend(config: Config, clock: Clock) -> Backend:
    """make_backend with its failures turned into one-line errors and exit codes."""
    try:
        return make_backend(config, clock)
    except BackendUnavailable as exc:
        raise CliError(f"{exc}", EXIT_NO_DRIVER) from None
    except BackendFatal as exc:
        raise CliError(f"{exc}", EXIT_BACKEND_FATAL) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot start the {config.backend} backend: {exc}", EXIT_CONFIG) from None


def _apply_run_flags(config: Config, args: argparse.Namespace) -> Config:
    config = _with_simulate(config, args.simulate)
    if args.dry_run:
        config = replace(config, dry_run=True)
    if args.wait_for_driver:
        config = replace(config, wait_for_driver=True)
    if args.listen is not None:
        host, port = args.listen
        config = replace(config, metrics=replace(config.metrics, listen_address=host, port=port))
    if args.log_format is not None:
        config = replace(config, logging=replace(config.logging, format=args.log_format))
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from governor.daemon import PipeWaiter

    # Handlers first (main() blocked the signals until now): a SIGHUP or SIGTERM during
    # the rest of start-up lands in the waiter's pipe and the loop handles it once running.
    clock = RealClock()
    waiter = PipeWaiter(clock)
    previous = {signum: signal.getsignal(signum) for signum in earlysignals.HELD}
    waiter.install_signal_handlers()
    earlysignals.release()
    try:
        daemon = _build_daemon(args, clock, waiter)
    except BaseException:
        waiter.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise
    daemon.install_signal_handlers()
    return daemon.run()


def _build_daemon(args: argparse.Namespace, clock: Clock, waiter: Waiter) -> Daemon:
    """Config, backend and metrics for ``run``: every failure is a CliError or ConfigError."""
    from governor import logsetup
    from governor.daemon import Daemon
    from governor.httpserver import MetricsServer
    from governor.metrics import build_registry

    with contextlib.suppress(io.UnsupportedOperation, ValueError):  # stderr without a file descriptor
        faulthandler.enable()  # a watchdog kill (SIGABRT) leaves every thread's stack in the journal
    logsetup.configure(args.log_format or "auto")
    config = _apply_run_flags(_load_run_config(args.config), args)
    check_metrics(config.metrics, config.source)  # --listen gets the same loopback/allow_remote check as the file
    logsetup.configure(config.logging.format, config.logging.level)
    backend = _open_backend(config, clock)
    metrics = config.metrics

    def serve(source: object) -> MetricsServer:
        try:
            return MetricsServer.from_config(metrics, build_registry(source))  # type: ignore[arg-type]
        except OSError as exc:
            where = f"{metrics.listen_address}:{metrics.port}"
            raise CliError(f"cannot listen for metrics on {where}: {exc.strerror or exc}", EXIT_BIND) from None

    return Daemon(
        config,
        backend,
        clock,
        config_path=args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None),
        metrics_server_factory=serve if metrics.enabled else None,
        waiter=waiter,
        # The command line wins over the file on every reload too: a SIGHUP must never
        # turn a `--dry-run` daemon live (nor undo --simulate, --listen, --log-format).
        load=lambda path: _apply_run_flags(load_config(path), args),
    )


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """Validate a config; print the effective config or every error."""
    from governor.classes import config_warnings

    config = load_config(args.path)
    gpus, where, real = _ladder_gpus(args.profile)
    out.write(render_config(config))
    out.write(render_ladders(config, gpus, where))
    for warning in config_warnings(config.vram):
        sys.stderr.write(f"gpu-governor: config warning: {args.path}: {warning}\n")
    if real:
        # Real GPUs: what `run` would refuse at start is an error here too.
        problems = check_resolved(config, gpus)
        if problems:
            raise ConfigError(problems)
    return EXIT_OK


def _ladder_gpus(profiles: list[str] | None) -> tuple[list[GpuInfo], str, bool]:
    """The GPUs to show the effective ladder for, where they come from, and whether they are
    real: the named simulated profiles, else the GPUs the NVIDIA driver reports, else (no
    driver) every built-in profile."""
    from governor.sim.profiles import load_profile, shipped_names

    where = "simulated profile(s)"
    if not profiles:
        from governor import logsetup

        logsetup.configure("console", "warning")  # NVML's events go to stderr: stdout stays loadable TOML
        try:
            from governor.backends.nvml import NvmlBackend

            backend = NvmlBackend(RealClock())
        except (BackendUnavailable, BackendFatal, ImportError, OSError) as exc:
            where = f"the built-in simulated profiles (no NVIDIA driver answered: {_first_line(exc)})"
            profiles = ["all"]
        else:
            try:
                return list(backend.gpus()), "the GPUs the NVIDIA driver reports", True
            finally:
                backend.close()
    names: list[str] = []
    for name in profiles:
        names.extend(shipped_names("profiles") if name == "all" else [name])
    gpus = []
    for index, name in enumerate(names):
        profile = load_profile(name)  # SimDataError is a ConfigError: one line, exit 3
        gpus.append(
            GpuInfo(
                index=index,
                uuid=f"profile:{profile.name}",
                name=profile.gpu_name,
                power_limit_min_w=profile.power_limit_min_w,
                power_limit_max_w=profile.power_limit_max_w,
                power_limit_default_w=profile.power_limit_default_w,
            )
        )
    return gpus, where, False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def render_ladders(config: Config, gpus: Sequence[GpuInfo], where: str) -> str:
    """The effective power ladder per GPU as TOML comments (the rendered config stays loadable)."""
    from governor.config import deep_cap_problem
    from governor.rules.power import effective_ladder

    lines = ["", f"# Effective power ladder per GPU, on {where}:"]
    if not gpus:
        lines.append("#   (no GPU)")
    for gpu in gpus:
        policy = config.policy_for(gpu)
        label = gpu.uuid[len("profile:") :] if gpu.uuid.startswith("profile:") else f"GPU {gpu.index} {gpu.uuid}"
        limits = (
            f"default {_watts(gpu.power_limit_default_w)}, "
            f"range {_watts(gpu.power_limit_min_w)}-{_watts(gpu.power_limit_max_w)}"
        )
        ladder = effective_ladder(policy.power.ladder_w, gpu)
        if not policy.power.enabled:
            shown = "power ladder off (power.enabled = false)"
        elif not ladder:
            shown = "none: the card reports no default or maximum limit to resolve percentages against"
        else:
            shown = " -> ".join(f"{w:g}" for w in ladder) + " W"
        lines.append(f"#   {label} ({gpu.name}, {limits}): {shown}")
        problem = deep_cap_problem(policy.power, gpu)
        if problem is not None:
            lines.append(f"#     REFUSED on this card: expected {problem[0]}, got {problem[1]}")
    return "\n".join(lines) + "\n"


def _watts(value: float | None) -> str:
    return "?" if value is None else f"{value:g} W"


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Fetch the daemon's metrics and print a per-GPU table."""
    from governor.status import fetch_status, render_status

    url = args.url
    config = _load_run_config(args.config) if args.config or DEFAULT_CONFIG_PATH.exists() else Config()
    tls = config.metrics.tls_cert_file
    if url is None:
        host = config.metrics.listen_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host  # noqa: S104
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"{'https' if tls else 'http'}://{host}:{config.metrics.port}/metrics"
    password = None
    if args.user is not None:
        password = os.environ.get("GPU_GOVERNOR_METRICS_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ")
    try:
        status = fetch_status(url, cafile=args.cacert or tls or None, username=args.user, password=password)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the governor at {url}: {reason} (is it running?)", EXIT_UNREACHABLE) from None
    out.write(render_status(status))
    from governor.status import read_process_table, render_processes

    runtime_dir = (_load_run_config(args.config) if args.config else Config()).runtime_dir
    rows = read_process_table(f"{runtime_dir}/processes.json") if runtime_dir else None
    if rows is None:
        out.write(
            f"\nprocesses: {runtime_dir}/processes.json is not readable: the daemon writes it (mode 0600) "
            "when it can; run status as root to see every GPU process with its class\n"
        )
    else:
        out.write("\n" + render_processes(rows))
    return EXIT_OK


def cmd_record(args: argparse.Namespace, out: TextIO) -> int:
    """Record samples of every GPU to a trace file."""
    from governor import logsetup
    from governor.record import run_record

    logsetup.configure("auto")
    if args.interval <= 0:
        raise CliError(f"--interval: expected seconds > 0, got {args.interval}", EXIT_USAGE)
    config = _with_simulate(Config(), args.simulate)
    clock = RealClock()
    backend = _open_backend(config, clock)
    try:
        count = run_record(backend, args.output, args.interval, args.duration, clock)
    except KeyboardInterrupt:
        count = -1
    finally:
        backend.close()
    if count >= 0:
        out.write(f"wrote {count} samples to {args.output}\n")
    return EXIT_OK


def cmd_hash_password(stdin: TextIO, out: TextIO) -> int:
    """Print a salted scrypt hash of the password read from ``stdin``; the password is never echoed."""
    from governor.auth import hash_password, read_password

    try:
        password = read_password(stdin)
    except ValueError as exc:
        raise CliError(f"hash-password: expected a password, got {exc}", EXIT_USAGE) from None
    out.write(hash_password(password) + "\n")
    return EXIT_OK


def _whatif(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Dispatch to governor.whatif (imported only for these commands)."""
    from governor.whatif import commands
    from governor.whatif.common import WhatIfError

    try:
        if args.command == "calibrate":
            return commands.cmd_calibrate(args, out)
        if args.command == "replay":
            return commands.cmd_replay(args, out)
        return commands.cmd_simulate(args, out, err)
    except WhatIfError as exc:
        raise CliError(str(exc), exc.code) from None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point; returns the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if earlysignals.hold_for_run(sys.argv[1:] if argv is None else argv):
        # Queued, never fatal, until cmd_run has its handlers (``python -m governor`` held them
        # even earlier, before the imports). Released by cmd_run, or below on a usage error.
        try:
            return _main(argv, out, err)
        finally:
            earlysignals.release()
    return _main(argv, out, err)


def _main(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """main() after the signals are held."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(err)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check_config(args, out)
        if args.command == "status":
            return cmd_status(args, out)
        if args.command == "record":
            return cmd_record(args, out)
        if args.command == "hash-password":
            return cmd_hash_password(sys.stdin, out)
        if args.command in ("calibrate", "replay", "simulate"):
            return _whatif(args, out, err)
    except ConfigError as exc:
        for line in exc.summary():
            err.write(f"gpu-governor: config error: {line}\n")
        return EXIT_CONFIG
    except CliError as exc:
        err.write(f"gpu-governor: {exc}\n")
        return exc.code
    except BackendUnavailable as exc:
        err.write(f"gpu-governor: {exc}\n")
        return EXIT_NO_DRIVER
    except BackendFatal as exc:
        err.write(f"gpu-governor: {exc}\n")
        return EXIT_BACKEND_FATAL
    except KeyboardInterrupt:
        return 130
    parser.print_help(err)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
