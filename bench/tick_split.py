"""Where one tick's time goes on a real GPU: the NVML floor, the adapter's read, the governor step
and the observers, each timed in the same loop (read-only).

``python3 bench/tick_split.py [--iterations N]`` prints JSON with p50 microseconds per GPU of:

- ``floor``: exactly the NVML reads the governor makes per tick and the XID event wait
  (bench/nvml_floor.py's list), in a tight run;
- ``read``: ``Governor.read()`` (the NVML adapter: the same reads and the snapshot built from them);
- ``step``: ``Governor.step()`` on that snapshot (classify, rules, actuator in dry run, report);
- ``observe``: the observers on that report (decision log, telemetry, process table, status);
- ``tick``: the sum of the three, as ``Service.tick()`` runs them;
- ``step_alone`` and ``observe_alone``: the same step and observers repeated on one snapshot with
  no NVML call in between: how much of ``step``/``observe`` is the interleaving with the driver's
  ioctls (caches and branch predictors left cold by the kernel) rather than the Python itself.

The ratios ``tick / floor`` and ``(step + observe) / floor`` say how far the tick is from the goal
(tick <= 1.5x the floor on one GPU). Every governor runs with ``dry_run = true``: no GPU setting
changes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import pynvml  # noqa: E402
from nvml_floor import raw_reads, telemetry_reads  # noqa: E402

from governor import logsetup  # noqa: E402
from governor.backends.nvml import NvmlBackend  # noqa: E402
from governor.classes import VramPolicy  # noqa: E402
from governor.clock import RealClock  # noqa: E402
from governor.config import Config  # noqa: E402
from governor.daemon import Daemon, PipeWaiter  # noqa: E402
from governor.notify import Notifier  # noqa: E402


def p50(samples: list[int], gpus: int) -> float:
    """The median of ``samples`` (ns, all GPUs together) in microseconds per GPU."""
    return round(statistics.median(samples) / gpus / 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()
    logsetup.configure("json", "warning")
    clock = RealClock()
    backend = NvmlBackend(clock)
    gpus = len(backend.gpus())
    names = ("floor", "read", "step", "observe", "tick", "step_alone", "observe_alone")
    samples: dict[str, list[int]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as state:
        config = Config(dry_run=True, state_dir=state, runtime_dir="", vram=VramPolicy(per_process_metrics=True))
        service = Daemon(config, backend, clock, waiter=PipeWaiter(clock), notifier=Notifier())
        service.start()
        governor = service.governor
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
        reads = [fn for h in handles for _, fn in raw_reads(pynvml, h)]
        event_set = pynvml.nvmlEventSetCreate()
        for h in handles:
            pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, event_set)
        reads.append(dict(telemetry_reads(pynvml, handles[0], event_set))["xid_event_wait"])
        now = time.perf_counter_ns
        for i in range(args.iterations + 100):
            t0 = now()
            for fn in reads:
                fn()
            t1 = now()
            snapshot = governor.read()
            t2 = now()
            report = governor.step(snapshot, clock.wall())
            t3 = now()
            service._observe(report)  # the observers, exactly as Service.tick runs them
            t4 = now()
            governor.step(snapshot, clock.wall())
            t5 = now()
            service._observe(report)
            t6 = now()
            if i >= 100:
                for name, value in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t1, t5 - t4, t6 - t5)):
                    samples[name].append(value)
        pynvml.nvmlEventSetFree(event_set)
        service.stop()
    out = {name: p50(values, gpus) for name, values in samples.items()}
    out["gpus"] = gpus
    out["tick_over_floor"] = round(out["tick"] / out["floor"], 2)
    out["governor_python_over_floor"] = round((out["step"] + out["observe"]) / out["floor"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
