"""The command line: ``gpu-governor run | restore | check-config | status | reload | record | calibrate |
replay | simulate``.

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
7     ``status``: no answer from the metrics endpoint (refused, timeout, unknown host, TLS)
8     ``status``: the daemon answered, and a GPU is lost or degraded
9     ``status``: an answer that is not usable gpu-governor metrics (HTTP 401/403, 404, other)
10    another gpu-governor process holds the state directory (``restore``: a daemon runs, nothing done)
11    ``restore``: something recorded could not be put back (kept for the next start or restore)
12    ``reload``: no acknowledgement (no such process, not permitted, it exited, or ``--timeout``)
130   interrupted (Ctrl-C)
141   stdout was closed early (``gpu-governor status | head -1``): the rest of the
      output is dropped quietly, as for a command killed by SIGPIPE (128 + 13)
====  ==========================================================

A file a command would write (``record --output``, ``calibrate --output``, ``--plot``)
is checked before any work starts, so a bad path fails at once, not after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import getpass
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    parse_toml,
    read_small_file,
    render_config,
)
from governor.errors import EXIT_BACKEND_FATAL as EXIT_BACKEND_FATAL  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_BAD_ANSWER as EXIT_BAD_ANSWER  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_BIND as EXIT_BIND  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_BROKEN_PIPE as EXIT_BROKEN_PIPE  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_CONFIG as EXIT_CONFIG  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_GPU_UNHEALTHY as EXIT_GPU_UNHEALTHY  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_NO_DRIVER as EXIT_NO_DRIVER  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_OK as EXIT_OK  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_UNREACHABLE as EXIT_UNREACHABLE  # noqa: PLC0414  (re-exported)
from governor.errors import EXIT_USAGE as EXIT_USAGE  # noqa: PLC0414  (re-exported)
from governor.errors import CliError as CliError  # noqa: PLC0414  (re-exported)
from governor.errors import GovernorError as GovernorError  # noqa: PLC0414  (re-exported)
from governor.model import GpuInfo

if TYPE_CHECKING:
    from governor.policy import VramPolicy
    from governor.units import UnitProperties
    from governor.waiting import Waiter

STATUS_EPILOG = """\
--url takes a URL (http://HOST:PORT/metrics, https://...) or a plain HOST:PORT (http is
assumed; https when the web-config file, from --web.config.file or the config's
[metrics] web_config_file, has tls_server_config, and its cert_file is trusted unless
--cacert says otherwise). --user NAME answers basic auth; the password comes from
GPU_GOVERNOR_METRICS_PASSWORD or a prompt. --json prints one document per line
(schema: docs/status-json.md). --watch repeats every SECONDS (default 2) until Ctrl-C.

exit codes:
  0  the daemon answered and every GPU is ok
  2  bad usage (e.g. a --url that is neither a URL nor HOST:PORT)
  3  the --config file is invalid
  7  no answer: connection refused (is it running?), timeout, unknown host, TLS failure
  8  the daemon answered, and a GPU is lost or degraded (like systemctl is-failed)
  9  an answer that is not usable gpu-governor metrics: HTTP 401/403 (credentials), 404 (not a
     gpu-governor endpoint), another HTTP error or other content
"""
RELOAD_EPILOG = """\
exit codes:
  0   the daemon applied the new config
  2   bad usage
  3   the daemon refused the new config and keeps running the old one (its errors are printed)
  10  no acknowledgement: no such process, not permitted to signal it, it exited, or none within
      --timeout (the SIGHUP stays queued: the reload may still happen)
"""
LOG_LEVELS = ("debug", "info", "warning", "error")


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _watch_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0.1 <= seconds <= 86400:  # also false for NaN
        raise argparse.ArgumentTypeError(f"expected seconds between 0.1 and 86400, got {value!r}")
    return seconds


def _pid(value: str) -> int:
    if not value.isdigit() or not 1 < int(value) <= 2**22:  # PID 1 is init: never the daemon
        raise argparse.ArgumentTypeError(f"expected the daemon's process ID, got {value!r}")
    return int(value)


def _timeout_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:  # also false for NaN
        raise argparse.ArgumentTypeError(f"expected seconds above 0, at most 3600, got {value!r}")
    return seconds


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
    # Each exporter-style spelling (node_exporter's, Prometheus's) is the same option as ours.
    run.add_argument(
        "--listen",
        "--web.listen-address",
        type=_listen,
        metavar="HOST:PORT",
        help="metrics address (default 127.0.0.1:9847)",
    )
    run.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="exporter-toolkit web-config file: TLS and basic auth (default: [metrics] web_config_file)",
    )
    run.add_argument("--log-format", "--log.format", choices=["auto", "console", "json", "journal"], help="log format")
    run.add_argument(
        "--log-level", "--log.level", choices=LOG_LEVELS, help="lowest level logged (default: the config's, info)"
    )

    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective config, with the power ladder each GPU gets",
    )
    check.add_argument(
        "path",
        nargs="?",
        type=Path,
        help=f"config file (default {DEFAULT_CONFIG_PATH}, or the built-in defaults when it does not exist)",
    )
    check.add_argument(
        "--profile",
        action="append",
        metavar="PROFILE",
        help="show the ladder on this simulated profile (name or TOML; repeatable; 'all': every built-in one) "
        "instead of the GPUs the NVIDIA driver reports",
    )

    restore = sub.add_parser(
        "restore",
        help="with no daemon running, put back the power limits and fans a crashed or killed daemon left changed",
    )
    restore.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    restore.add_argument(
        "--simulate",
        nargs="?",
        const="",
        metavar="PROFILE",
        help="restore on the simulated GPU backend, as `run --simulate [PROFILE]` governed it",
    )
    restore.add_argument("--dry-run", action="store_true", help="say what would be put back, change and clear nothing")
    restore.add_argument(
        "--quiet",
        action="store_true",
        help="log nothing when nothing is recorded, nor the units left stopped after a run systemd calls clean "
        "(SERVICE_RESULT=success: that daemon said so itself); for the unit's ExecStopPost=",
    )

    status = sub.add_parser(
        "status",
        help="show what the running daemon sees and decided",
        description="Show what the running daemon sees and decided, from its metrics endpoint.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--url",
        help="metrics URL or HOST:PORT (default: from the config, http://127.0.0.1:9847/metrics)",
    )
    status.add_argument("--json", action="store_true", help="print a JSON document (docs/status-json.md)")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_watch_seconds,
        metavar="SECONDS",
        help="repeat every SECONDS (default 2) until Ctrl-C, like nvidia-smi -l",
    )
    status.add_argument("--config", type=Path, default=None, help="config to take the metrics address from")
    status.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="the daemon's web-config file: https, trusting its certificate (default: the config's)",
    )
    status.add_argument(
        "--cacert", help="CA or self-signed certificate to trust for https (default: the web-config's cert_file)"
    )
    status.add_argument(
        "--user", help="basic-auth user; the password comes from GPU_GOVERNOR_METRICS_PASSWORD or a prompt"
    )

    reload = sub.add_parser(
        "reload",
        help="ask the running daemon to re-read its config; return once it has applied or refused it",
        description="Send SIGHUP to the daemon --pid and wait until it acknowledges a reload that began\n"
        "after the signal (in DIR/reload.json). The unit's ExecReload= runs it, so that\n"
        "`systemctl reload gpu-governor` returns only once the reload is done, and fails when\n"
        "the new config was refused.",
        epilog=RELOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reload.add_argument("--pid", type=_pid, required=True, help="the daemon's process ID (in the unit: $MAINPID)")
    reload.add_argument(
        "--timeout",
        type=_timeout_seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up after SECONDS (default 60; below the unit's TimeoutStartSec=, which systemd applies to "
        "ExecReload=)",
    )
    reload.add_argument(
        "--runtime-dir",
        type=Path,
        metavar="DIR",
        help="where the daemon acknowledges each reload (default: $RUNTIME_DIRECTORY, which systemd sets for "
        "the unit's commands, else /run/gpu-governor)",
    )

    record = sub.add_parser("record", help="record NVML samples to a trace file (JSON Lines)")
    record.add_argument("--output", "-o", type=Path, required=True, help="trace file to write")
    record.add_argument("--interval", default="1", help="time between samples: 1, 0.5, 10s, 1m (default 1 s)")
    record.add_argument("--duration", default=None, help="time to record: 600, 10m, 2h (default: until Ctrl-C)")
    record.add_argument("--simulate", nargs="?", const="", metavar="PROFILE", help="record the simulated GPU")
    record.add_argument(
        "--config",
        type=Path,
        help="with --simulate: config whose [simulation] section (scenario, time_scale, ...) to use",
    )

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
    simulate.add_argument(
        "--json", action="store_true", help="print one JSON document instead of the table (docs/whatif.md)"
    )

    hashing = sub.add_parser(
        "hash-password",
        help="read a password (stdin; prompted without echo on a terminal), print its bcrypt hash for "
        "the web-config file's basic_auth_users",
    )
    hashing.add_argument("--cost", type=int, default=10, help="bcrypt cost, 4-14 (default 10, as htpasswd -nBC 10)")
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
    if args.web_config_file is not None:
        config = replace(config, metrics=replace(config.metrics, web_config_file=args.web_config_file))
    if args.log_format is not None:
        config = replace(config, logging=replace(config.logging, format=args.log_format))
    if args.log_level is not None:
        config = replace(config, logging=replace(config.logging, level=args.log_level))
    return config


def _keys_in(path: Path | None) -> set[str]:
    """The top-level keys the config file at ``path`` sets (none without a file)."""
    if path is None:
        return set()
    try:
        return set(parse_toml(read_small_file(path), str(path)))
    except (ConfigError, OSError):
        return set()


def _private_dirs(config: Config, private: Path, path: Path | None) -> Config:
    """``config`` with ``state_dir`` and ``runtime_dir`` under ``private``, unless the file at ``path`` sets them."""
    explicit = _keys_in(path)
    if "state_dir" not in explicit:
        config = replace(config, state_dir=str(private / "state"))
    if "runtime_dir" not in explicit:
        config = replace(config, runtime_dir=str(private / "run"))
    return config


def _make_private_dir() -> Path:
    """A new directory only this user can enter, for a simulation's files: under
    $XDG_RUNTIME_DIR when that is usable, else a fresh temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        path = Path(runtime) / f"gpu-governor-sim-{os.getpid()}"
        with contextlib.suppress(OSError):
            path.mkdir(mode=0o700)
            return path
    return Path(tempfile.mkdtemp(prefix="gpu-governor-sim-"))


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from governor.waiting import PipeWaiter

    # Handlers first (main() blocked the signals until now): a SIGHUP or SIGTERM during
    # the rest of start-up lands in the waiter's pipe and the loop handles it once running.
    clock = RealClock()
    waiter = PipeWaiter(clock)
    previous = {signum: signal.getsignal(signum) for signum in earlysignals.HELD}
    waiter.install_signal_handlers()
    earlysignals.release()
    try:
        return _configure_and_run(args, clock, waiter)
    finally:
        waiter.close()  # closed already when the daemon ran; here for a start that failed
        for signum, handler in previous.items():
            signal.signal(signum, earlysignals.after_run(handler))


def _configure_and_run(args: argparse.Namespace, clock: Clock, waiter: Waiter) -> int:
    """Logging, config and (for a simulation) a private directory, then the daemon."""
    from governor import logsetup

    with contextlib.suppress(io.UnsupportedOperation, ValueError):  # stderr without a file descriptor
        faulthandler.enable()  # a watchdog kill (SIGABRT) leaves every thread's stack in the journal
    logsetup.configure(args.log_format or "auto", args.log_level or "info")
    config = _apply_run_flags(_load_run_config(args.config), args)
    where = "--listen {}:{}".format(*args.listen) if args.listen is not None else config.source
    if args.web_config_file is not None:
        where = f"{where} with --web.config.file"
    check_metrics(config.metrics, where)  # --listen gets the same loopback/allow_remote check as the file
    logsetup.configure(config.logging.format, config.logging.level)
    if config.metrics.deprecated_keys:
        logsetup.get_logger().warning(
            "config_deprecated",
            source=config.source,
            keys=list(config.metrics.deprecated_keys),
            effect="still read in this release; move them into a web-config file ([metrics] web_config_file, "
            "docs/security.md)",
        )
    if config.backend != "simulated":
        return _run_daemon(args, config, clock, waiter)
    # A simulation never touches the system: what it would write under /var/lib and /run
    # goes to a private directory, removed when it stops, unless the config names a directory.
    private = _make_private_dir()
    path = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    try:
        return _run_daemon(
            args,
            _private_dirs(config, private, path),
            clock,
            waiter,
            lambda path: _private_dirs(load_config(path), private, path),
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_daemon(
    args: argparse.Namespace,
    config: Config,
    clock: Clock,
    waiter: Waiter,
    load: Callable[[Path], Config] = load_config,
) -> int:
    """Hold the state directory (governor.statelock: a `restore` refuses meanwhile), then serve."""
    from governor.logsetup import get_logger
    from governor.statelock import hold_for_daemon

    hold = hold_for_daemon(config, waiter, clock, get_logger())  # before the backend and the state files
    if hold.stopped:
        return EXIT_OK  # asked to stop while another process held it
    with hold:
        return _serve_daemon(args, config, clock, waiter, load)


def _serve_daemon(
    args: argparse.Namespace,
    config: Config,
    clock: Clock,
    waiter: Waiter,
    load: Callable[[Path], Config],
) -> int:
    """Open the backend, start the daemon on ``config``; ``load`` reads the file again on reload."""
    from governor.listener import metrics_factory
    from governor.service import Service

    backend = _open_backend(config, clock)
    metrics = config.metrics

    from governor.logsetup import get_logger
    from governor.processes import ProcessInspector, foreign_pid_namespace, own_system_unit
    from governor.units import SystemdUnits

    foreign = None if config.backend == "simulated" else foreign_pid_namespace()
    if foreign is not None:  # VRAM enforcement then signals only processes that hold an NVIDIA device here
        get_logger().warning("pid_namespace_foreign", reason=foreign)

    daemon = Service(
        config,
        backend,
        clock,
        units=SystemdUnits(),  # connects on first use only: a config without units never opens the bus
        # NVML may list host PIDs: in a PID namespace of its own the governor checks each one first.
        inspector=ProcessInspector(own_unit=own_system_unit(), foreign_pids=foreign),
        config_path=args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None),
        metrics_server_factory=metrics_factory(metrics, config.source) if metrics.enabled else None,
        waiter=waiter,
        # The command line wins over the file on every reload too: a SIGHUP must never
        # turn a `--dry-run` daemon live (nor undo --simulate, --listen, --log-format).
        load=lambda path: _apply_run_flags(load(path), args),
    )
    daemon.install_signal_handlers()
    return daemon.run()


def cmd_restore(args: argparse.Namespace) -> int:
    """Put back what a daemon that no longer runs left changed (governor.restore)."""
    from governor import logsetup
    from governor.restore import restore_leftovers

    logsetup.configure("auto", "info")
    config = _with_simulate(_load_run_config(args.config), args.simulate)
    if args.dry_run:
        config = replace(config, dry_run=True)
    logsetup.configure(config.logging.format, config.logging.level)
    path = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    # `run` keeps a simulation's state in a private directory unless the file names one (_private_dirs).
    private = config.backend == "simulated" and "state_dir" not in _keys_in(path)
    clock = RealClock()
    log = logsetup.get_logger()
    return restore_leftovers(
        config, lambda c: _open_backend(c, clock), clock, log, quiet=args.quiet, private_simulation=private
    )


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """Validate a config; print the effective config or every error."""
    from governor.classes import config_warnings

    # No path: what `run` would use, the default file or, without one, the built-in defaults;
    # the first line of the output ("# effective configuration from ...") says which.
    config = load_config(args.path) if args.path is not None else _load_run_config(None)
    gpus, where, real = _ladder_gpus(args.profile)
    out.write(render_config(config))
    out.write(render_ladders(config, gpus, where))
    for warning in [*config_warnings(config.vram), *restart_warnings(config.vram)]:
        sys.stderr.write(f"gpu-governor: config warning: {config.source}: {warning}\n")
    for warning in _metrics_warnings(config):
        sys.stderr.write(f"gpu-governor: config warning: {warning}\n")
    if real:
        # Real GPUs: what `run` would refuse at start is an error here too.
        problems = check_resolved(config, gpus)
        if problems:
            raise ConfigError(problems)
    return EXIT_OK


def _metrics_warnings(config: Config) -> list[str]:
    """The deprecated [metrics] keys set, and the web-config file's keys that are ignored."""
    metrics = config.metrics
    warnings = []
    if metrics.deprecated_keys:
        warnings.append(
            f"{config.source}: {', '.join(metrics.deprecated_keys)}: deprecated, still read in this release; "
            "move them into a web-config file ([metrics] web_config_file, docs/security.md)"
        )
    if metrics.enabled and metrics.web_config_file:
        from governor.webconfig import IGNORED_KEYS, exposed_secrets, read_web_config

        web = read_web_config(metrics.web_config_file, trust_euid=os.geteuid())  # validated with the config
        warnings.extend(f"{web.source}: {key}: ignored ({IGNORED_KEYS[key]})" for key in web.ignored)
        warnings.extend(f"{web.source}: {exposed}" for exposed in exposed_secrets(web))
    return warnings


def restart_warnings(
    vram: VramPolicy, lookup: Callable[[list[str]], dict[str, list[UnitProperties]] | None] | None = None
) -> list[str]:
    """For classes that signal and name units, the units systemd would start again after the
    kill (their Restart=), asked on the system bus; nothing when systemd does not answer."""
    from governor.policy import SIGNAL_ACTIONS
    from governor.units import restart_policies, undone_by_restart
    from governor.unitstate import SIGNALS_OF

    classes = [
        (c, c.match.unit)
        for c in vram.classes
        if c.enforced_action in SIGNAL_ACTIONS and c.match.unit and not c.protected
    ]
    if not classes:
        return []
    found = (lookup or restart_policies)(sorted({glob for _, glob in classes if glob}))
    if found is None:
        return []
    warnings = []
    for klass, glob in classes:
        for props in found.get(glob or "", []):
            if undone_by_restart(props.restart, SIGNALS_OF[klass.enforced_action]):
                warnings.append(
                    f"class '{klass.name}' ({klass.action}) matches unit {props.name}, which has "
                    f"Restart={props.restart}: systemd starts it again after the kill (a kill-restart loop); "
                    'use action = "stop-unit" for this class'
                )
    return warnings


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
        elif policy.power.target_mode:
            from governor.rules.target import target_bounds

            bounds = target_bounds(policy.power, gpu)
            span = f"{bounds[1]:g}-{bounds[0]:g} W" if bounds else "none: the card reports no limits to start from"
            shown = f"target mode: at or below {policy.power.target_c:g} C, limit {span}"
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


def _endpoint_tls(config: Config, web_config_file: str | None) -> tuple[bool, str]:
    """(whether the daemon serves https, the certificate to trust): from ``--web.config.file``,
    else the config's ``web_config_file``, else its deprecated ``tls_cert_file``. Only the
    web-config file itself is read (the key it names may be readable by root only)."""
    path = web_config_file or config.metrics.web_config_file
    if not path:
        return bool(config.metrics.tls_cert_file), config.metrics.tls_cert_file
    from governor.webconfig import read_web_config

    tls = read_web_config(path, trust_euid=os.geteuid()).tls  # a ConfigError exits 3, naming the file
    return tls is not None, tls.cert_file if tls is not None else ""


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Fetch the daemon's metrics and print a per-GPU table or a JSON document, once or
    every ``--watch`` seconds; EXIT_GPU_UNHEALTHY when a GPU is lost or degraded."""
    from governor import status as st

    config = _load_run_config(args.config) if args.config or DEFAULT_CONFIG_PATH.exists() else Config()
    https, cert = _endpoint_tls(config, args.web_config_file)
    codes = {"usage": EXIT_USAGE, "unreachable": EXIT_UNREACHABLE, "answer": EXIT_BAD_ANSWER}
    if args.url is not None:
        try:
            url = st.normalize_url(args.url, tls=https)
        except st.StatusError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    else:
        host = config.metrics.listen_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host  # noqa: S104
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"{'https' if https else 'http'}://{host}:{config.metrics.port}/metrics"
    password = None
    if args.user is not None:
        password = os.environ.get("GPU_GOVERNOR_METRICS_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ")

    def once(first: bool) -> int:
        try:
            status = st.fetch_status(url, cafile=args.cacert or cert or None, username=args.user, password=password)
        except st.StatusError as exc:
            raise CliError(str(exc), codes[exc.kind]) from None
        now_s = time.time()
        table = st.load_process_table(status, now_s)
        if args.json:
            out.write(json.dumps(st.status_json(status, table, url, now_s), separators=(",", ":")) + "\n")
        else:
            if args.watch is not None:
                out.write("\x1b[H\x1b[2J" if out.isatty() else "" if first else "\n")
            out.write(st.render_status(status, now_s))
            if table.rows is not None:
                out.write("\n" + st.render_processes(table.rows))
            else:
                out.write(f"\nprocesses: not shown: {table.note}\n")
            for problem in st.render_problems(status):
                out.write(f"attention: {problem}\n")
        out.flush()
        return EXIT_GPU_UNHEALTHY if status.unhealthy() else EXIT_OK

    try:
        if args.watch is None:
            return once(True)
        first = True
        while True:
            try:
                once(first)
            except CliError as exc:
                if exc.code == EXIT_USAGE:
                    raise
                sys.stderr.write(f"gpu-governor: {exc}\n")
                sys.stderr.flush()
            first = False
            time.sleep(args.watch)
    except KeyboardInterrupt:
        if args.watch is None:
            raise
        return EXIT_OK  # Ctrl-C ends --watch: the normal way out


def _seconds(text: str | None, option: str) -> float | None:
    """A command-line duration (``governor.durations``) in seconds; CliError naming ``option``."""
    from governor.durations import parse_seconds

    if text is None:
        return None
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", EXIT_USAGE) from None


def cmd_record(args: argparse.Namespace, out: TextIO) -> int:
    """Record samples of every GPU to a trace file.

    With ``--simulate``, ``--interval``, ``--duration`` and the trace's ``t`` are simulated
    seconds: a ``[simulation] time_scale`` of 60 records 10 simulated minutes in 10 s.
    """
    from governor import logsetup
    from governor.record import ScaledClock, run_record

    logsetup.configure("auto")
    interval_s = _seconds(args.interval, "--interval")
    duration_s = _seconds(args.duration, "--duration")
    if interval_s is None:  # the option has a default
        raise CliError("--interval: expected a duration", EXIT_USAGE)
    if args.config is not None and args.simulate is None:
        raise CliError("--config: only used with --simulate (its [simulation] section)", EXIT_USAGE)
    base = load_config(args.config) if args.config is not None else Config()
    config = _with_simulate(base, args.simulate)
    simulated = config.backend == "simulated"
    scale = config.simulation.time_scale if simulated else 1.0
    real = RealClock()
    backend = _open_backend(config, real)
    try:
        count = run_record(
            backend,
            args.output,
            interval_s,
            duration_s,
            ScaledClock(real, scale),
            sleep=lambda seconds: time.sleep(seconds / scale),
            profile=config.simulation.profile if simulated else None,
        )
    except KeyboardInterrupt:
        count = -1
    except OSError as exc:
        raise CliError(f"--output: cannot write {args.output}: {exc.strerror or exc}", EXIT_USAGE) from None
    finally:
        backend.close()
    if count >= 0:
        out.write(f"wrote {count} samples to {args.output}\n")
    return EXIT_OK


def cmd_hash_password(stdin: TextIO, out: TextIO, cost: int = 10) -> int:
    """Print a bcrypt hash of the password read from ``stdin``; the password is never echoed."""
    from governor.auth import BCRYPT_MAX_COST, BCRYPT_MIN_COST, hash_password, read_password

    if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
        raise CliError(f"--cost: expected {BCRYPT_MIN_COST} to {BCRYPT_MAX_COST}, got {cost}", EXIT_USAGE)
    try:
        password = read_password(stdin)
        hashed = hash_password(password, cost=cost)
    except ValueError as exc:
        raise CliError(f"hash-password: expected a password, got {exc}", EXIT_USAGE) from None
    out.write(hashed + "\n")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the daemon, then wait for its acknowledgement (governor.reloadack); silent when applied."""
    from governor.reloadack import DEFAULT_RUNTIME_DIR, ack_directory, request_reload

    directory = args.runtime_dir or Path(ack_directory(DEFAULT_RUNTIME_DIR))
    request_reload(args.pid, directory, args.timeout)  # ReloadRefused: exit 3, CliError: exit 12
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


def _check_output(path: Path | None, option: str) -> None:
    """Fail now, not after the work, when ``path`` cannot be written: its folder must exist and be writable."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        problem = "it is a directory"
    elif not folder.is_dir():
        problem = f"no such directory {folder}"
    elif not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        problem = "permission denied"
    else:
        return
    raise CliError(f"{option}: cannot write {path}: {problem}", EXIT_USAGE)


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path the command was given, checked before it starts."""
    if args.command in ("record", "calibrate"):
        _check_output(args.output, "--output")
    elif args.command in ("replay", "simulate"):
        _check_output(args.plot, "--plot")


def _dispatch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int | None:
    """Run the chosen command; None when there is none."""
    _check_outputs(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "restore":
        return cmd_restore(args)
    if args.command == "check-config":
        return cmd_check_config(args, out)
    if args.command == "status":
        return cmd_status(args, out)
    if args.command == "reload":
        return cmd_reload(args)
    if args.command == "record":
        return cmd_record(args, out)
    if args.command == "hash-password":
        return cmd_hash_password(sys.stdin, out, args.cost)
    if args.command in ("calibrate", "replay", "simulate"):
        return _whatif(args, out, err)
    return None


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so the interpreter's last flush
    cannot fail again (the Python docs' recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if earlysignals.hold_for_run(sys.argv[1:] if argv is None else argv):
        # Queued, never fatal, until cmd_run has its handlers (``python -m governor`` held them
        # even earlier, before the imports). Released by cmd_run, or below on a usage error.
        try:
            return _flushed_main(argv, out, err)
        finally:
            earlysignals.release()
    return _flushed_main(argv, out, err)


def _flushed_main(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """_main(), with a reader that went away (closed pipe) ending quietly with EXIT_BROKEN_PIPE."""
    try:
        try:
            return _main(argv, out, err)
        finally:
            out.flush()  # a reader that went away is found here, not at interpreter exit
            if out is not sys.stdout:
                sys.stdout.flush()  # argparse's --help and --version write to sys.stdout
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """main() after the signals are held: parse, dispatch, map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(err)
        return EXIT_USAGE
    try:
        code = _dispatch(args, out, err)
    except GovernorError as exc:  # every deliberate error carries its exit code (governor.errors)
        for line in exc.lines():
            err.write(f"gpu-governor: {line}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if code is not None:
        return code
    parser.print_help(err)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
