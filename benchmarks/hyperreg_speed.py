"""Time per training step of hyper-regularization vs plain SGD, measured in one run, interleaved.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hyperreg_speed.py [--rounds 7] [--steps 40]
        [--methods hyperreg-kl-1,...] [--problems mlp,linreg,mlp-opt] [--threads 1] [--device cpu]

Problems (synthetic data, nothing to download):

* ``mlp``: the report's MNIST network, 784-500 (sigmoid)-10, batch 128: one step is zero_grad, forward,
  backward and ``optimizer.step()``, what a training loop pays.
* ``mlp-opt``: ``optimizer.step()`` alone on that network's parameters and fixed gradients: the
  optimizer's own cost, the worst case for the ratio.
* ``linreg``: the report's linear-regression timing (full-batch least squares, 1 feature + bias,
  10,000 samples), where per-call overhead dominates.

Every round times ``--steps`` steps of each method in turn (SGD first), so machine load hits all of them
alike; the table gives the median over rounds of the time per step, and the median over rounds of its
ratio to SGD's time in the same round. ``--clock cpu`` (default) counts this process's CPU time
(``time.process_time``), which other processes on a shared machine disturb far less than the wall
clock (``--clock wall``) they preempt. The report measured 5.2x (338.8 us vs 64.9 us per full-batch
iteration on linear regression).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lrpilot.core.registry import BuildContext, build_method

VARIANTS = [f"hyperreg-{d}-{a}" for d in ("kl", "rkl", "hellinger", "chi2") for a in (1, 2, 3)]
DEFAULT_METHODS = ["sgd", *VARIANTS, "adagrad-diag", "wngrad"]


def make_optimizer(method: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: no momentum, one add per tensor
    ctx = BuildContext(model=model, epochs=1, steps_per_epoch=1, device=next(model.parameters()).device)
    return build_method(method, ctx, {"lr": lr}).optimizer


def mlp_problem(device: torch.device, optimizer_only: bool) -> tuple[nn.Module, Callable[[torch.optim.Optimizer], None]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10)).to(device)
    x = torch.randn(128, 784, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    if optimizer_only:
        loss_fn(model(x), y).backward()

        def step(opt: torch.optim.Optimizer) -> None:
            opt.step()

        return model, step

    def train_step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return model, train_step


def linreg_problem(device: torch.device) -> tuple[nn.Module, Callable[[torch.optim.Optimizer], None]]:
    torch.manual_seed(0)
    x = torch.randn(10_000, 1, device=device)
    y = 3 * x + 1 + 0.1 * torch.randn(10_000, 1, device=device)
    model = nn.Linear(1, 1).to(device)

    def train_step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    return model, train_step


def bench(
    problem: str, methods: list[str], rounds: int, steps: int, device: torch.device, clock: Callable[[], float]
) -> dict[str, list[float]]:
    if problem == "linreg":
        model, step = linreg_problem(device)
    else:
        model, step = mlp_problem(device, optimizer_only=problem == "mlp-opt")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # a small LR keeps every method finite whatever the data; the cost per step does not depend on it
    optimizers = {m: make_optimizer(m, model, lr=1e-3) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in methods:  # warm-up: lazy state, allocator, caches
        for _ in range(3):
            step(optimizers[m])
    for _ in range(rounds):
        for m in methods:
            model.load_state_dict(initial)
            sync()
            t0 = clock()
            for _ in range(steps):
                step(optimizers[m])
            sync()
            times[m].append((clock() - t0) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--problems", default="mlp,mlp-opt,linreg")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if methods[0] != "sgd":
        methods = ["sgd", *[m for m in methods if m != "sgd"]]
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures host CPU time: use --clock wall on a GPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, {args.clock} clock, "
          f"{args.rounds} rounds x {args.steps} steps, median per step")
    problems = args.problems.split(",")
    results = {p: bench(p, methods, args.rounds, args.steps, device, clock) for p in problems}
    header = f"{'method':<22}" + "".join(f"{p + ' us':>14}{'ratio':>7}" for p in problems)
    print(header)
    for m in methods:
        row = f"{m:<22}"
        for p in problems:
            med = statistics.median(results[p][m])
            ratio = statistics.median(t / s for t, s in zip(results[p][m], results[p]["sgd"]))
            row += f"{med * 1e6:>14.1f}{ratio:>7.2f}"
        print(row)


if __name__ == "__main__":
    main()
