"""How much a flat (one-buffer) optimizer state could save on the hypergradient step: a measurement for
issue 19's next lever, not a method.

    OMP_NUM_THREADS=1 python benchmarks/flat_state_prototype.py [--rounds 9] [--steps 300]

The hypergradient family's step (``pilots/hypergradient/optimizers.py``) works on per-tensor lists with
multi-tensor kernels; on a small network its cost is Python and dispatch, not arithmetic (docs/performance.md).
This script times ``optimizer.step()`` alone, on the same gradients, for

* ``sgd``: ``torch.optim.SGD`` (momentum 0.9), the reference of every ratio;
* ``hd-train``: the registry's ``hd-train`` optimizer with its defaults (the code users run: since issue 19's
  flat layout, ``pilots/hypergradient/flat.py``, its state lives on one buffer too);
* ``hd-train flat=False``: the same with the per-tensor multi-tensor path (before the flat layout);
* ``flat prototype``: the same kind of step written on one flat buffer ``B`` of shape ``(2, n)``: row 0
  the gradient (copied in with one ``_foreach_copy_`` into views of the row), row 1 the momentum direction.
  One ``B @ B.T`` gives the three dot products of the cosine in one kernel, one host read gives the cosine
  and the finiteness check (a NaN shows in the read), the multiplicative LR rule runs on the host, the
  momentum update is two in-place ops on row 1 and the weights take one ``_foreach_add_`` from its views::

      g <- grad;  c <- <g, u> / (|g| |u|);  lr <- lr * exp(beta * c);  u <- 0.9 u + g;  w <- w - lr u

It leaves out what the real step also does (tangent decay, the LR clamp, the skip of a non-finite step),
so it is a lower bound of what a flat rewrite could cost; the real step's results are not reproduced by it.
Rounds are interleaved (each round times every variant, order rotated), medians and IQR of the per-round
ratio to ``sgd`` are printed, with the machine's load average so a busy machine is visible.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lrpilot.bench.tasks.models import MLP
from lrpilot.core.registry import BuildContext, get_method, resolve_options


class FlatHypergradientPrototype:
    """The step described in the module docstring, on one ``(2, n)`` buffer."""

    def __init__(self, params: list[torch.Tensor], lr: float = 0.05, beta: float = 0.02, momentum: float = 0.9):
        self.params, self.lr, self.beta, self.momentum = params, lr, beta, momentum
        n = sum(p.numel() for p in params)
        self.buffer = torch.zeros(2, n, dtype=params[0].dtype)
        self.grad_views = self._views(self.buffer[0])
        self.direction_views = self._views(self.buffer[1])

    def _views(self, row: torch.Tensor) -> list[torch.Tensor]:
        views, start = [], 0
        for p in self.params:
            views.append(row[start:start + p.numel()].view_as(p))
            start += p.numel()
        return views

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_copy_(self.grad_views, [p.grad for p in self.params])
        gram = (self.buffer @ self.buffer.T).tolist()  # [[g.g, g.u], [u.g, u.u]]: the one host read
        gg, gu, uu = gram[0][0], gram[0][1], gram[1][1]
        if not math.isfinite(gg + gu + uu):
            return
        if gg > 0 and uu > 0:
            self.lr *= math.exp(self.beta * gu / math.sqrt(gg * uu))
        g, u = self.buffer[0], self.buffer[1]
        u.mul_(self.momentum).add_(g)
        torch._foreach_add_(self.params, self.direction_views, alpha=-self.lr)


def _hd_train(model: nn.Module, **overrides: object) -> torch.optim.Optimizer:
    info = get_method("hd-train")
    ctx = BuildContext(model=model, epochs=10**4, steps_per_epoch=100)
    options = resolve_options(info, {"rollback": False, "cooldown": 0.0, **overrides})
    return info.build(ctx, **options).optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    networks = {"mnist1d-mlp (40-100-100-10)": (40, 100, 100, 10), "fmnist-mlp (784-512-256-10)": (784, 512, 256, 10)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}")
    for name, sizes in networks.items():
        variants: dict[str, Callable[[], None]] = {}
        for label in ("sgd", "hd-train", "hd-train flat=False", "flat prototype"):
            torch.manual_seed(0)
            model = MLP(sizes)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            params = list(model.parameters())
            if label == "sgd":
                variants[label] = torch.optim.SGD(params, lr=0.05, momentum=0.9).step
            elif label == "hd-train":
                variants[label] = _hd_train(model).step
            elif label == "hd-train flat=False":
                variants[label] = _hd_train(model, flat=False).step
            else:
                variants[label] = FlatHypergradientPrototype(params).step
        for step in variants.values():  # warm-up: state, allocator
            for _ in range(20):
                step()
        times: dict[str, list[float]] = {label: [] for label in variants}
        labels = list(variants)
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                t0 = time.thread_time()
                for _ in range(args.steps):
                    variants[label]()
                times[label].append((time.thread_time() - t0) / args.steps)
        print(f"\n{name}: optimizer.step() alone, {args.rounds} interleaved rounds of {args.steps} steps")
        print("| variant | us/step (median) | x sgd (median) | IQR |")
        print("|---|---|---|---|")
        for label in labels:
            ratios = sorted(t / s for t, s in zip(times[label], times["sgd"]))
            q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
            print(f"| {label} | {statistics.median(times[label]) * 1e6:.1f} | {statistics.median(ratios):.2f} | "
                  f"{q[0]:.2f}-{q[2]:.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
