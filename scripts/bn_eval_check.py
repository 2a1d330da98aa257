"""Issue 15: why some ResNet-20 runs "end more than 5 points below their best" at the robustness budget.

Re-runs one (task, method, seed) exactly as ``run_task`` does, then evaluates its final weights three ways:
with the batch-norm running statistics the run ended with (what the bench scored), with those statistics
recomputed over the training set at the final weights (a cumulative average, PreciseBN: Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021), and the training loss at the final weights. If the recomputed
statistics recover the accuracy, the drop is the running statistics lagging weights that a constant LR
moves fast, not the run diverging.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bn_eval_check.py sgd 2 [--task fmnist-resnet20 --epochs 3 --train-subset 5000]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, loss_fn, metric, *, batch_stats: bool = False) -> tuple[float, float]:
    if batch_stats:  # normalise each batch by its own statistics, on a copy whose running stats may move
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    losses, outs, ys = [], [], []
    for x, y in loader:
        out = model(x)
        losses.append(float(loss_fn(out, y)) * len(y))
        outs.append(out)
        ys.append(y)
    out, y = torch.cat(outs), torch.cat(ys)
    return round(sum(losses) / len(y), 4), round(metric.batch_sum(out, y) / len(y) * metric.scale, 4)


@torch.no_grad()
def recompute_bn(model: torch.nn.Module, loader) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch of the pass
    model.train()
    for x, _ in loader:
        model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("seed", type=int)
    ap.add_argument("--task", default="fmnist-resnet20")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=5000)
    a = ap.parse_args()
    info = get_task(a.task)
    data = info.load_data(None).subset(a.train_subset)
    seed_everything(a.seed)
    model = info.model()
    train_loader, val_loader = make_loaders(data, info.batch_size, seed=a.seed)
    loss_fn, metric = info.loss(), info.build_metric(data)
    hist = Trainer(model, train_loader, val_loader, method=a.method, epochs=a.epochs, loss_fn=loss_fn, metric=metric,
                   seed=a.seed, progress=False, task_kind=info.kind).run()
    print(f"{a.task} {a.method} seed {a.seed}: per-epoch val accuracy {[round(e.val_metric, 4) for e in hist.epochs]}")
    print(f"  final weights, the run's BN statistics:        val loss/acc {evaluate(model, val_loader, loss_fn, metric)}")
    print(f"  final weights, training-set loss/acc (eval):    {evaluate(model, train_loader, loss_fn, metric)}")
    print(f"  final weights, each validation batch's own BN statistics: val loss/acc "
          f"{evaluate(model, val_loader, loss_fn, metric, batch_stats=True)}")
    recompute_bn(model, train_loader)
    print(f"  final weights, BN statistics recomputed:       val loss/acc {evaluate(model, val_loader, loss_fn, metric)}")


if __name__ == "__main__":
    main()
