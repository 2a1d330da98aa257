"""Fake methods for the bench tests, registered by ``register_fakes()``.

Bench workers import this module (``--import tests.bench_plugin`` / ``imports=``), which registers them
there. In the test process they are registered only inside a fixture and removed afterwards, so the
registry-generated contract tests never see them (``test-crash`` would end the test process).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import _REGISTRY, BuildContext, MethodInfo, register

#: What ``fake-tuned`` reports its (pretend) grid search cost: fixed numbers the tests can check.
FAKE_SEARCH = {"grid": [0.01, 0.1], "chosen": 0.1, "runs": 2, "total_epochs": 4, "total_steps": 100, "total_train_s": 5.0}


def _sgd(ctx: BuildContext, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(ctx.params(), lr=lr, momentum=0.9)


def build_tuned(ctx: BuildContext, lr: float) -> MethodParts:
    return MethodParts(_sgd(ctx, lr), info={"search": dict(FAKE_SEARCH)})


def build_raise(ctx: BuildContext, lr: float) -> MethodParts:
    raise RuntimeError("this method always fails to build")


def build_crash(ctx: BuildContext, lr: float) -> MethodParts:
    os._exit(3)  # a worker dying without a word (segfault, OOM kill)


def build_print(ctx: BuildContext, lr: float) -> MethodParts:
    # Python-level writes and a write to file descriptor 1 (as a C extension would): a run's log holds both.
    print("fake-print: stdout", flush=True)
    print("fake-print: stderr", file=sys.stderr, flush=True)
    os.write(1, b"fake-print: fd 1\n")
    return MethodParts(_sgd(ctx, lr))


class _SlowSGD(torch.optim.SGD):
    def __init__(self, params: Any, lr: float, sleep: float) -> None:
        super().__init__(params, lr=lr)
        self.sleep = sleep

    def step(self, closure: Any = None) -> Any:  # noqa: D102
        time.sleep(self.sleep)
        return super().step(closure)


def build_sleep(ctx: BuildContext, lr: float, sleep: float) -> MethodParts:
    return MethodParts(_SlowSGD(ctx.params(), lr=lr, sleep=sleep))


def _seen() -> dict[str, Any]:
    """What a run finds in its process: the state a previous run in the same worker could have left."""
    import warnings

    import numpy as np

    return {
        "dtype": str(torch.get_default_dtype()), "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(), "env": os.environ.get("LRPILOT_TEST_LEAK"),
        "anomaly": torch.is_anomaly_enabled(), "warnings_as_errors": any(f[0] == "error" for f in warnings.filters),
        "cwd": os.getcwd(), "np_draw": float(np.random.random()), "torch_draw": float(torch.rand(()))
    }  # fmt: skip


def build_probe(ctx: BuildContext, lr: float) -> MethodParts:
    # The draws come after run_task's seeding: equal draws mean the RNGs were seeded, not left as found.
    return MethodParts(_sgd(ctx, lr), info={"seen": _seen()})


def build_leak(ctx: BuildContext, lr: float) -> MethodParts:
    """Change every process-wide setting a careless method could, then train (in float64 from here on)."""
    import warnings

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.autograd.set_detect_anomaly(True)
    torch.set_grad_enabled(True)
    os.environ["LRPILOT_TEST_LEAK"] = "1"
    os.chdir("/")
    warnings.simplefilter("error")
    return MethodParts(_sgd(ctx, lr), info={"seen": _seen()})


FAKES = (
    MethodInfo("fake-tuned", "test", "SGD pretending to have run a 2-point LR grid", build_tuned, {"lr": 0.1},
               tags=frozenset({"tuned"})),
    MethodInfo("fake-raise", "test", "raises while being built", build_raise, {"lr": 0.1}),
    MethodInfo("fake-crash", "test", "kills its process while being built", build_crash, {"lr": 0.1}),
    MethodInfo("fake-sleep", "test", "SGD sleeping before every step", build_sleep, {"lr": 0.1, "sleep": 0.2}),
    MethodInfo("fake-print", "test", "SGD that prints to stdout and stderr while being built", build_print, {"lr": 0.1}),
    MethodInfo("fake-probe", "test", "SGD recording the process state it was built in", build_probe, {"lr": 0.1}),
    MethodInfo("fake-leak", "test", "SGD that changes torch's global settings, the environment and the cwd", build_leak,
               {"lr": 0.1}),
)  # fmt: skip


def register_fakes() -> None:
    for info in FAKES:
        register(info, replace=True)


def unregister_fakes() -> None:
    for info in FAKES:
        _REGISTRY.pop(info.name, None)


# Importing the module registers the fakes (what a bench worker's `--import` needs). Test modules must
# import it only inside a fixture that unregisters them again, never at their top (collection time).
register_fakes()
