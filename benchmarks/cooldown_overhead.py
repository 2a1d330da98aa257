"""What the cooldown (pilots/cooldown.py) costs per step while it is active, and over a whole run.

    OMP_NUM_THREADS=1 python benchmarks/cooldown_overhead.py [--tasks mnist1d-mlp,fmnist-mlp] [--rounds 9]

A cooldown step is the method's step plus one copy of the weights before it and one interpolation after
it (two multi-tensor kernels, whatever the method). So the cost is measured on plain ``sgd`` (the
registry's, momentum 0.9), against itself: the same model and fixed mini-batches, ``sgd`` alone and
``sgd`` inside a cooldown whose clock is always in its cooling phase, timed in interleaved rounds in one
process (``benchmarks/overhead.py``'s step, clock and data). Printed per task: the median ratio of a
cooling step to a plain step with its interquartile range, and what that makes a whole run with the
default fraction 0.2 cost against the same run without a cooldown: ``1 + 0.2 * (ratio - 1)``, relative to
an ``sgd`` step (a slower method's step makes the share smaller).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402 - benchmarks/overhead.py, beside this file

from lrpilot.bench.tasks import get_task  # noqa: E402
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, with_cooldown  # noqa: E402


def measure(task: str, args: argparse.Namespace) -> dict[str, float]:
    info = get_task(task)
    data = info.load_data().subset(args.train_subset)
    device = torch.device("cpu")
    steps = args.steps or (40 if task.startswith("fmnist") else 200)
    batches = [(x, y) for x, y in zip(data.x_train.split(info.batch_size), data.y_train.split(info.batch_size))]
    batches = [b for b in batches if len(b[1]) == info.batch_size][: args.batches]
    plain = overhead._build("sgd", "optimizer", info, data, args, device, 1)
    cooled = overhead._build("sgd", "optimizer", info, data, args, device, 1)
    # Always cooling: a cooldown over the whole of a budget far longer than the steps timed (m_k < 1).
    parts = with_cooldown(cooled.trainer.parts, total_steps=10**9, fraction=1.0)
    parts.pilot.attach(cooled.trainer.model)
    cooled.trainer.parts = parts
    cooled.name = "sgd + cooldown"
    entries = [plain, cooled]
    stepper = {e.name: overhead._make_step(e, batches, []) for e in entries}
    for e in entries:
        e.trainer.model.train()
        for i in range(args.warmup):
            stepper[e.name](i)
    assert parts.pilot.multiplier() < 1.0, "the cooldown must be cooling while it is timed"
    ratios = []
    for r in range(args.rounds):
        times = {}
        for e in entries if r % 2 == 0 else entries[::-1]:
            t0 = overhead._clock()
            for i in range(steps):
                stepper[e.name](i)
            times[e.name] = (overhead._clock() - t0) / steps
        ratios.append(times["sgd + cooldown"] / times["sgd"])
    low, mid, high = overhead._quantiles(ratios)
    return {"ratio": mid, "q1": low, "q3": high, "run": 1 + DEFAULT_FRACTION * (mid - 1),
            "sgd_step_ms": 1e3 * times["sgd"]}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d-mlp,fmnist-mlp")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default 200, 40 on Fashion-MNIST)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--train-subset", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overhead._clock = overhead.time.thread_time
    torch.set_num_threads(1)
    print("| task | a cooling step / an sgd step, median [IQR] | a whole run, fraction 0.2 | sgd step (ms) |")
    print("|---|---|---|---|")
    for task in args.tasks.split(","):
        m = measure(task, args)
        print(f"| {task} | {m['ratio']:.3f}x [{m['q1']:.3f}-{m['q3']:.3f}] | {m['run']:.3f}x | {m['sgd_step_ms']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
