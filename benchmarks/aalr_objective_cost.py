"""What AALR's default J costs: one pass over the training data, as a fraction of a training epoch.

    OMP_NUM_THREADS=1 python benchmarks/aalr_objective_cost.py [--tasks mnist1d-mlp,fmnist-lenet]
        [--repeats 5] [--threads 1] [--adversarial]

In one process, per task: a warm-up epoch, then ``repeats`` rounds of (one training epoch of plain
SGD, one ``train_eval_loss`` pass over the training set, one validation pass), interleaved so that
load from other processes hits all three alike. Prints the medians and the ratios pass / epoch.
With ``--adversarial`` both the epoch and the pass use FGSM examples (the pass then needs an input
gradient per batch too) and the PGD validation score is timed as well.

AALR asks for the pass once per trial: every epoch of phase 1, once per trial in phase 2 (a trial is
p or p + 1 epochs, p >= 1). Its overhead on a run is (passes / epochs) x the ratio printed here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.adversarial import AdversarialConfig, adversarial_hooks
from lrpilot.loop.fit import Trainer


def measure(task_name: str, repeats: int, adversarial: bool) -> dict[str, float]:
    info = get_task(task_name)
    data = info.load_data()
    seed_everything(0)
    model = info.model()
    train, val = make_loaders(data, info.batch_size, seed=0)
    loss_fn, metric = info.loss(), info.build_metric(data)
    transform = evaluator = None
    if adversarial:
        transform, evaluator = adversarial_hooks(
            AdversarialConfig(eval_samples=2000), loss_fn=loss_fn, metric=metric,
            input_scale=data.input_scale, input_bounds=data.input_bounds,
        )  # fmt: skip
    trainer = Trainer(model, train, val, method="sgd", epochs=repeats + 1, loss_fn=loss_fn, metric=metric,
                      progress=False, train_transform=transform, extra_eval=evaluator)  # fmt: skip
    trainer.run(until_epoch=1)  # warm-up
    epoch_s, pass_s, val_s, adv_s = [], [], [], []
    for k in range(repeats):
        before = trainer.history.epochs[-1].train_s
        trainer.run(until_epoch=2 + k)
        epoch_s.append(trainer.history.epochs[-1].train_s - before)  # training only, evaluation excluded
        t0 = time.perf_counter()
        trainer.evaluate(trainer.train_loader, transform=True)
        pass_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.evaluate()
        val_s.append(time.perf_counter() - t0)
        if evaluator is not None:
            trainer.model.eval()
            t0 = time.perf_counter()
            evaluator(trainer.model, trainer.val_loader)
            adv_s.append(time.perf_counter() - t0)
            trainer.model.train()
    out = {
        "steps": len(train),
        "epoch_s": statistics.median(epoch_s),
        "pass_s": statistics.median(pass_s),
        "val_s": statistics.median(val_s),
        "ratio": statistics.median(p / e for p, e in zip(pass_s, epoch_s)),
    }
    if adv_s:
        out["pgd_s"] = statistics.median(adv_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mnist1d-mlp,fmnist-lenet")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adversarial", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved rounds"
          + (", FGSM training / PGD-10 on 2000 validation samples" if args.adversarial else ""))
    header = f"{'task':<16} {'steps':>5} {'epoch s':>8} {'J pass s':>8} {'val s':>7} {'J/epoch':>8}"
    print(header + (f" {'PGD s':>7}" if args.adversarial else ""))
    for name in args.tasks.split(","):
        r = measure(name, args.repeats, args.adversarial)
        line = f"{name:<16} {r['steps']:>5} {r['epoch_s']:>8.3f} {r['pass_s']:>8.3f} {r['val_s']:>7.3f} {r['ratio']:>8.3f}"
        print(line + (f" {r['pgd_s']:>7.3f}" if "pgd_s" in r else ""))


if __name__ == "__main__":
    main()
