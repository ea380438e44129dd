"""Tune before you deploy: calibrate a model of your GPU, replay a trace through the rules,
simulate policies on the model, and plot the result.

- :mod:`governor.whatif.calibrate` - fit the thermal model to a trace, check it, write a profile;
- :mod:`governor.whatif.replay` - open loop: what the rules would have decided on a trace;
- :mod:`governor.whatif.simulate` - closed loop: the daemon on a simulated GPU, policy against policy;
- :mod:`governor.whatif.plot` - PNG plots (matplotlib, optional);
- :mod:`governor.whatif.commands` - the ``calibrate``, ``replay`` and ``simulate`` subcommands.

See docs/whatif.md.
"""

from governor.whatif.common import WhatIfError, parse_duration
from governor.whatif.replay import ReplayResult, replay_trace
from governor.whatif.simulate import Comparison, RunOutcome, SimSetup, compare, run_policy

__all__ = [
    "Comparison",
    "ReplayResult",
    "RunOutcome",
    "SimSetup",
    "WhatIfError",
    "compare",
    "parse_duration",
    "replay_trace",
    "run_policy",
]
