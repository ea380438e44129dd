"""How fast a workload runs under a power cap, by kind of workload.

Throughput is a ratio of full speed (1.0 = as fast as with no cap)::

    throughput = min(1, power_w / demand_w) ** exponent

``demand_w`` is the board power the workload would draw uncapped, ``power_w`` what
it gets. The exponent depends on what bounds the work:

``compute`` (0.55): matmul-heavy training, prefill, games. Board power is roughly a
    fixed part (leakage, memory, fans: ~30 % of demand) plus a dynamic part that grows
    with the cube of the SM clock (P ~ f * V^2 with V ~ f on the DVFS curve). Solving
    ``P/Pd = 0.3 + 0.7 * (f/fmax)^3`` for the clock gives ``f/fmax = (P/Pd)^k`` with
    k = 0.50 at 80 % power and 0.55 at 60 %; speed follows the clock.
``memory`` (0.15): LLM token decoding and other bandwidth-bound work. Speed follows
    memory bandwidth, which a power cap barely touches until the SM clock falls far;
    published power-capping studies of LLM inference report a few percent lost for a
    20-30 % lower cap, i.e. k ~ 0.1-0.2.
``mixed`` (0.35): serving that interleaves prefill (compute) and decode (memory).

A phase of a scenario may give its own ``perf_exponent`` instead. These are modelling
assumptions for comparing policies, not measurements of any one GPU.
"""

from __future__ import annotations

PERF_EXPONENTS: dict[str, float] = {"compute": 0.55, "memory": 0.15, "mixed": 0.35}
"""Exponent of the power ratio in the throughput law, by workload kind."""

WORKLOAD_KINDS: tuple[str, ...] = tuple(PERF_EXPONENTS)


def throughput_ratio(power_w: float, demand_w: float, exponent: float) -> float:
    """Speed as a fraction of uncapped speed (0..1) for a workload wanting ``demand_w`` watts
    and getting ``power_w``; 0 when there is no work (``demand_w`` <= 0)."""
    if demand_w <= 0.0:
        return 0.0
    if power_w >= demand_w:
        return 1.0
    if power_w <= 0.0:
        return 0.0
    ratio: float = (power_w / demand_w) ** exponent
    return ratio
