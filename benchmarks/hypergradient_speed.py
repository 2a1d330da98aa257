"""Time per training step of the hypergradient pilots relative to plain SGD, measured in one run.

    python benchmarks/hypergradient_speed.py [--models fmnist-mlp,mnist1d-mlp] [--rounds 15]
                                             [--steps 20] [--threads 1]

Each model (the bench tasks' networks and batch sizes, on random data of the right shapes: speed does
not depend on the values) is trained by five optimizers, each on its own copy of the same initial
weights: ``torch.optim.SGD`` (foreach, momentum 0) and ``SGDHD``, ``SGDHDVal``, ``RTHPO``,
``RTHPO(objective="train")``. A step is what lrpilot's loop does for the method: zero_grad, forward,
backward and ``step`` (hd-val adds a validation mini-batch of the training batch size; rt-hpo takes a
closure and does its own differentiation). The methods run in turn, ``--steps`` steps each, for
``--rounds`` rounds, so background load hits them alike; the reported ratio is the median over rounds of
(method's time per step) / (SGD's time per step in the same round). Two clocks: the thread's CPU time
(``time.thread_time``; with one torch thread all the work runs on it, and time spent descheduled by
other processes does not count: the figure to quote from a shared machine) and wall time.

The paper reports RT-HPO 12.8x slower than First-order (Train) on ResNet-18; our targets are
<= 3x plain SGD for rt-hpo and <= 1.1x for hd-train.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lrpilot.bench.tasks.models import MLP
from lrpilot.pilots.hypergradient import RTHPO, SGDHD, SGDHDVal

#: the form these figures were measured with (docs/methods/rt-hpo.md, Speed): the paper's additive step,
#: vanilla SGD, undecayed tangent; the robustness defaults add a few norms per step (not re-measured)
PAPER = {"lr_rule": "additive", "momentum": 0.0, "tangent_decay": 1.0, "tangent_clip": False}

MODELS: dict[str, tuple[tuple[int, ...], int]] = {
    "fmnist-mlp": ((784, 512, 256, 10), 128),
    "mnist1d-mlp": ((40, 100, 100, 10), 100),
}
TARGETS = {"hd-train": 1.1, "rt-hpo": 3.0}


def make_stepper(name: str, model: nn.Module, x, y, xv, yv) -> Callable[[], None]:
    """One training step of method ``name`` on ``model``, as lrpilot's loop runs it."""
    lr, beta = 0.01, 1e-5

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def val_loss() -> torch.Tensor:
        return F.cross_entropy(model(xv), yv)

    if name in ("sgd", "hd-train", "hd-val"):
        opt = {
            "sgd": lambda: torch.optim.SGD(model.parameters(), lr=lr),
            "hd-train": lambda: SGDHD(model.parameters(), lr=lr, beta=beta, **PAPER),
            "hd-val": lambda: SGDHDVal(model.parameters(), lr=lr, beta=beta, **PAPER),
        }[name]()
        kwargs = {"val_closure": val_loss} if name == "hd-val" else {}

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            value = loss()
            float(value.detach())  # the loop reads the loss every step
            value.backward()
            opt.step(**kwargs)

        return step

    objective = "train" if name == "rt-hpo-train" else "val"
    opt = RTHPO(model.parameters(), lr=lr, beta=beta, objective=objective, **PAPER)

    def closure(*, backward: bool = True) -> torch.Tensor:
        return loss()

    def step() -> None:
        float(opt.step(closure, val_closure=val_loss).detach())

    return step


def bench(model_name: str, rounds: int, steps: int) -> dict[str, list[float]]:
    sizes, batch = MODELS[model_name]
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(batch, sizes[0], generator=g), torch.randn(batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)
    yv = torch.randint(0, sizes[-1], (batch,), generator=g)
    names = ["sgd", "hd-train", "hd-val", "rt-hpo", "rt-hpo-train"]
    steppers = {}
    for name in names:
        torch.manual_seed(0)
        steppers[name] = make_stepper(name, MLP(sizes), x, y, xv, yv)
    for step in steppers.values():  # warm-up (allocator, first-step state)
        for _ in range(3):
            step()
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # no method always runs right after another
        for name in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            cpu[name].append((time.thread_time() - c0) / steps)
            wall[name].append((time.perf_counter() - w0) / steps)
    return cpu, wall


def ratios(times: dict[str, list[float]], name: str) -> tuple[float, float, float]:
    """Median and quartiles over rounds of the method's time over SGD's time in the same round."""
    r = sorted(t / b for t, b in zip(times[name], times["sgd"]))
    return statistics.median(r), r[len(r) // 4], r[(3 * len(r)) // 4]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps")
    for model_name in args.models.split(","):
        cpu, wall = bench(model_name, args.rounds, args.steps)
        print(f"\n{model_name} (batch {MODELS[model_name][1]})")
        print(f"{'method':<14} {'cpu ms':>7} {'x SGD':>6} {'(IQR)':>11} {'wall ms':>8} {'x SGD':>6} "
              f"{'target':>7}")
        for name in cpu:
            c, c1, c3 = ratios(cpu, name)
            w, _, _ = ratios(wall, name)
            target = f"<= {TARGETS[name]}" if name in TARGETS else ""
            cpu_ms, wall_ms = statistics.median(cpu[name]) * 1e3, statistics.median(wall[name]) * 1e3
            print(f"{name:<14} {cpu_ms:>7.2f} {c:>6.2f} {f'{c1:.2f}-{c3:.2f}':>11} {wall_ms:>8.2f} {w:>6.2f} "
                  f"{target:>7}")


if __name__ == "__main__":
    main()
