"""MI-driven LR decay (Vasudevan 2020): the pilot (Algorithm 1), its LR range test (Algorithm 2); records in ``register.py``."""

from lrpilot.pilots.mi_decay.pilot import (
    MIDecayPilot,
    MIProbeData,
    estimate_ceiling,
    estimate_mi,
    layer_groups,
    mi_decay_lr,
    sample_probe,
    saturation,
)
from lrpilot.pilots.mi_decay.range_test import DEFAULT_RRT_LRS, RangeTestResult, run_range_test, select_bounds

__all__ = ["DEFAULT_RRT_LRS", "MIDecayPilot", "MIProbeData", "RangeTestResult", "estimate_ceiling", "estimate_mi", "layer_groups", "mi_decay_lr", "run_range_test", "sample_probe", "saturation", "select_bounds"]
