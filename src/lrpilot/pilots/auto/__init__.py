"""``auto``: lrpilot's own autopilot (an LR sweep, the LR held then cooled down, the safety net); record in ``register.py``.

docs/methods/auto.md says what it is, where each part comes from and what each contributes (the ablation).
"""

from lrpilot.pilots.auto.schedule import WarmupCosine, warmup_cosine
from lrpilot.pilots.auto.sweep import SweepResult, centred, choose_lr, run_sweep, smoothed, sweep_lrs

__all__ = ["SweepResult", "WarmupCosine", "centred", "choose_lr", "run_sweep", "smoothed", "sweep_lrs", "warmup_cosine"]
