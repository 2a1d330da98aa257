"""Training-time overhead of the Lipschitz methods against plain SGD, measured in one process.

    OMP_NUM_THREADS=1 python benchmarks/lipschitz_overhead.py [--task fmnist-lenet] [--epochs 4]
        [--train-subset 10000] [--methods lipschitz,adamo,lipschitz-rmsprop,auto-adam] [--threads 1]

Every method trains the same model (same initial weights, same data order) side by side with plain SGD
(momentum 0), one epoch each in turn, so a busy machine slows both alike. For each epoch we take the
training seconds the loop records (evaluation excluded; a pilot's own work, e.g. the per-epoch checkpoint,
included) and report the median ratio method / SGD over the epochs after the first. The first-epoch
probe of ``lipschitz`` (a forward pass over the training data at initialisation) is a one-off, reported
separately as a fraction of one SGD epoch. ``lipschitz`` runs with a fixed first-epoch LR here so that the
per-epoch numbers do not include it. Target: <= 1.05x for the per-epoch pilot.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.loop.fit import Trainer
from lrpilot.loop.seeding import seed_everything

# Methods timed with options that keep every run finite and comparable (the LR value costs nothing).
OPTIONS = {
    "sgd": {"lr": 0.01, "momentum": 0.0},
    "lipschitz": {"initial_lr": 0.01},
    "adamo": {},
    "lipschitz-rmsprop": {},
    "auto-adam": {"k1_init": 1.0, "k2_init": 1e-6},
}


def _trainer(task_name: str, method: str, data, epochs: int, seed: int) -> Trainer:
    task = get_task(task_name)
    seed_everything(seed)
    model = task.model()
    train, val = make_loaders(data, task.batch_size, seed=seed)
    return Trainer(model, train, val, method=method, epochs=epochs, loss_fn=task.loss(), metric=task.build_metric(data),
                   seed=seed, progress=False, task_kind=task.kind, method_options=OPTIONS.get(method, {}))


def _epoch_train_s(trainer: Trainer) -> float:
    epochs = trainer.history.epochs
    previous = epochs[-2].train_s if len(epochs) > 1 else 0.0
    return epochs[-1].train_s - previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fmnist-lenet")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--methods", default="lipschitz,adamo,lipschitz-rmsprop,auto-adam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = get_task(args.task).load_data().subset(args.train_subset)
    methods = [m for m in args.methods.split(",") if m]
    print(f"torch {torch.__version__}, {args.threads} thread(s), task {args.task}, {len(data.x_train)} training samples, "
          f"{args.epochs} epochs each, interleaved with plain SGD")

    trainers = {name: _trainer(args.task, name, data, args.epochs, args.seed) for name in ["sgd", *methods]}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for epoch in range(1, args.epochs + 1):
        for name, trainer in trainers.items():
            trainer.run(until_epoch=epoch)
            times[name].append(_epoch_train_s(trainer))

    base = times["sgd"]
    print(f"\n{'method':<20} {'median s/epoch':>14} {'ratio vs SGD':>12}   per-epoch ratios (epochs 2..)")
    for name, series in times.items():
        ratios = [t / b for t, b in zip(series[1:], base[1:])] or [series[0] / base[0]]
        print(f"{name:<20} {statistics.median(series[1:] or series):>14.3f} {statistics.median(ratios):>12.3f}   "
              + " ".join(f"{r:.3f}" for r in ratios))

    # The one-off probe: lipschitz without initial_lr reads the training data once before epoch 1.
    OPTIONS["lipschitz"] = {}
    probe = _trainer(args.task, "lipschitz", data, 1, args.seed)
    t0 = time.perf_counter()
    probe.pilot._probe()
    probe_s = time.perf_counter() - t0
    print(f"\nlipschitz first-epoch probe: {probe_s:.3f} s = {probe_s / statistics.median(base):.3f} of one SGD epoch "
          f"(once per run)")


if __name__ == "__main__":
    main()
