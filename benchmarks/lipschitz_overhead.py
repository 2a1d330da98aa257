"""Training-time overhead of the Lipschitz methods against plain SGD, measured in one process.

    OMP_NUM_THREADS=1 python benchmarks/lipschitz_overhead.py [--task fmnist-lenet] [--epochs 32]
        [--train-subset 2560] [--methods lipschitz,lipschitz@no-rollback,adamo,...] [--threads 1]

Every method trains the same model (same initial weights, same data order) side by side with plain SGD
(momentum 0), one short epoch each in turn, so a busy machine slows all of them alike. For each epoch we
take the training seconds the loop records (evaluation excluded; a pilot's own work, e.g. the per-epoch
checkpoint and the constant, included) per optimizer step, and report the ratio of the fastest epochs (method / SGD;
interference from other processes only adds time, so the minimum is the cleanest sample) and the median
over epochs 2.. of the per-epoch ratio with its interquartile range; ``sgd@control``, a second identical
SGD run, shows how much of the spread is the machine. The first-epoch probe of ``lipschitz`` (one forward pass
over the training data at initialisation) is a one-off, reported separately in SGD epochs.

The timed settings keep every run finite (a non-finite loss ends an epoch early and would flatter the
method): ``lipschitz`` runs with ``constant="smoothness"`` and a fixed first-epoch LR (the same hook and
per-epoch machinery as the paper's constant, one more scalar operation per step, a smaller LR), AdaMo with
a 0.1 step multiplier, Auto-Adam in the authors' per-epoch configuration. The LR values cost nothing.
Target: <= 1.05x for the per-epoch pilot (``lipschitz``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer

OPTIONS = {
    "sgd": {"lr": 0.01, "momentum": 0.0},
    # an A/A control: a second, identical SGD run; its spread is the noise floor of the measurement
    "sgd@control": {"lr": 0.01, "momentum": 0.0},
    "lipschitz": {"initial_lr": 0.01, "constant": "smoothness"},
    # the same without the per-epoch checkpoint (divergence handling off): what the checkpoint costs
    "lipschitz@no-rollback": {"initial_lr": 0.01, "constant": "smoothness", "max_rollbacks": 0},
    "adamo": {"lr": 0.1},
    "lipschitz-rmsprop": {},
    "auto-adam": {"update": "epoch", "initial_lr": 1e-3, "bias_correction": "moments"},
}


def _trainer(
    task_name: str, method: str, data, epochs: int, seed: int, options: dict | None = None
) -> Trainer:
    task = get_task(task_name)
    seed_everything(seed)
    model = task.model()
    train, val = make_loaders(data, task.batch_size, seed=seed)
    opts = OPTIONS.get(method, {}) if options is None else options
    return Trainer(
        model,
        train,
        val,
        method=method.split("@")[0],
        epochs=epochs,
        loss_fn=task.loss(),
        metric=task.build_metric(data),
        seed=seed,
        progress=False,
        task_kind=task.kind,
        method_options=opts,
    )


def _last_epoch_seconds_per_step(trainer: Trainer) -> float:
    epochs = trainer.history.epochs
    before = epochs[-2] if len(epochs) > 1 else None
    seconds = epochs[-1].train_s - (before.train_s if before else 0.0)
    steps = epochs[-1].step - (before.step if before else 0)
    return seconds / max(steps, 1)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="fmnist-lenet")
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--train-subset", type=int, default=2560)
    parser.add_argument(
        "--methods", default="sgd@control,lipschitz,lipschitz@no-rollback,adamo,lipschitz-rmsprop,auto-adam"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = get_task(args.task).load_data().subset(args.train_subset)
    methods = [m for m in args.methods.split(",") if m]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), task {args.task}, {len(data.x_train)} training samples, "
        f"{args.epochs} epochs each, interleaved with plain SGD"
    )

    trainers = {name: _trainer(args.task, name, data, args.epochs, args.seed) for name in ["sgd", *methods]}
    per_step: dict[str, list[float]] = {name: [] for name in trainers}
    for epoch in range(1, args.epochs + 1):
        for name, trainer in trainers.items():
            trainer.run(until_epoch=epoch)
            per_step[name].append(_last_epoch_seconds_per_step(trainer))

    base = per_step["sgd"]
    print(
        f"\n{'method':<22} {'min ms/step':>11} {'ratio of minima':>15} {'median ratio':>12} {'IQR':>15} {'rollbacks':>9}"
    )
    for name, series in per_step.items():
        ratios = [t / b for t, b in zip(series[1:], base[1:])]
        lo, hi = _quartiles(ratios)
        rollbacks = sum("rollback" in d.reason for d in trainers[name].history.decisions)
        # Interference from other processes only ever adds time: the fastest epoch is the cleanest sample.
        print(
            f"{name:<22} {1e3 * min(series[1:]):>11.3f} {min(series[1:]) / min(base[1:]):>15.3f} "
            f"{statistics.median(ratios):>12.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {rollbacks:>9}"
        )

    # The one-off probe: `lipschitz` without initial_lr reads the training data once before epoch 1.
    probe = _trainer(args.task, "lipschitz", data, 1, args.seed, options={})
    t0 = time.perf_counter()
    probe.pilot._probe()
    probe_s = time.perf_counter() - t0
    sgd_epoch_s = statistics.median(base[1:]) * trainers["sgd"].history.epochs[0].step
    print(
        f"\nlipschitz first-epoch probe: {probe_s:.3f} s = {probe_s / sgd_epoch_s:.3f} SGD epochs (once per run)"
    )


if __name__ == "__main__":
    main()
