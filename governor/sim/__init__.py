"""The GPU simulator: thermal model, GPU profiles, workload scenarios and calibration.

:mod:`governor.backends.simulated` puts it behind the Backend Protocol. See
docs/simulation.md for the models, the data formats and the shipped profiles and scenarios.
"""

from governor.sim._schema import SimDataError
from governor.sim.calibrate import (
    FitResult,
    ThermalSample,
    fit_thermal,
    predict,
    samples_from_trace,
    validate_split,
)
from governor.sim.gpu import SimStats
from governor.sim.profiles import GpuProfile, load_profile, render_profile, shipped_names
from governor.sim.scenario import FAULTS, Scenario, load_scenario
from governor.sim.thermal import ThermalParams, steady_temperature_c
from governor.sim.workload import PERF_EXPONENTS, throughput_ratio

__all__ = [
    "FAULTS",
    "PERF_EXPONENTS",
    "FitResult",
    "GpuProfile",
    "Scenario",
    "SimDataError",
    "SimStats",
    "ThermalParams",
    "ThermalSample",
    "fit_thermal",
    "load_profile",
    "load_scenario",
    "predict",
    "render_profile",
    "samples_from_trace",
    "shipped_names",
    "steady_temperature_c",
    "throughput_ratio",
    "validate_split",
]
