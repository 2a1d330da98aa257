"""The LR finder people know beside ours: Lightning's ``Tuner.lr_find`` and the MI range test.

For each task: the LR each suggests, what finding it cost in optimizer steps (and seconds on this
machine), and the best validation accuracy of a run at each suggestion (``sgd-cosine`` and ``sgd``, the
task's default budget, seed 0), beside the same runs at the registry's default LR (0.1).

* **Lightning** (``lightning.pytorch.tuner.Tuner.lr_find``, its defaults): from the task's initial model
  (seed 0) with the runs' optimizer (SGD, momentum 0.9), 100 steps at LRs growing exponentially from
  1e-8 to 1, stopping early when the loss exceeds 4x its best; the suggestion is the LR of the steepest
  descent of the smoothed loss curve.
* **Ours** (``lrpilot range-test``, ``lrpilot.bench.range_test.range_test_task``, its defaults): Algorithm 2
  of Vasudevan (2020), 9 candidate LRs (1e-4 .. 1, half decades) x 2 trials x 3 epochs; it returns
  ``lr_min``, ``lr_max`` and ``lr_top`` (the LR MI decay starts at); ``lr_top`` is its single suggestion.

Usage::

    python benchmarks/lr_finder_comparison.py [--tasks mnist1d-mlp digits-mlp] [--out out.json]

Prints a Markdown table (the one in ``docs/methods/mi-decay.md``). One thread, seed 0 everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from typing import Any

import torch

from lrpilot.bench.range_test import range_test_task
from lrpilot.bench.tasks import get_task, run_task
from lrpilot.core.seeding import seed_everything


def lightning_suggestion(task: str, seed: int = 0) -> dict[str, Any]:
    """``Tuner.lr_find`` with its defaults on ``task``'s initial model, SGD momentum 0.9."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    info = get_task(task)
    data = info.load_data(None)
    seed_everything(seed)
    net = info.model()
    loss_fn = info.loss()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.lr = 0.1  # lr_find overrides it

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=info.batch_size, shuffle=True,
        generator=g,
    )
    with tempfile.TemporaryDirectory() as root:  # lr_find saves and restores a checkpoint there
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, max_epochs=100, default_root_dir=root)
        t0 = time.perf_counter()
        result = Tuner(trainer).lr_find(Module(), train_dataloaders=train)
        seconds = time.perf_counter() - t0
    return {"lr": float(result.suggestion()), "steps": len(result.results["lr"]), "seconds": seconds}


def our_suggestion(task: str, seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = range_test_task(task, seed=seed)
    seconds = time.perf_counter() - t0
    rt, search = report["range_test"], report["search"]
    return {"lr": rt["lr_top"], "lr_min": rt["lr_min"], "lr_max": rt["lr_max"], "steps": search["total_steps"],
            "epochs": search["total_epochs"], "seconds": seconds}


def best_accuracy(task: str, method: str, lr: float, seed: int = 0) -> float:
    record = run_task(task, method, seed=seed, progress=False, method_options={"lr": lr})
    return float(record["summary"]["best_val_metric"]) if "summary" in record else float(record["best_val_metric"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mnist1d-mlp", "digits-mlp"])
    parser.add_argument("--methods", nargs="+", default=["sgd-cosine", "sgd"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--finder-seeds", nargs="*", type=int, default=[1, 2],
                        help="also report each finder's suggestion at these seeds (no runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    rows = []
    for task in args.tasks:
        finders = {"default": {"lr": 0.1, "steps": 0, "seconds": 0.0},
                   "lightning": lightning_suggestion(task), "ours": our_suggestion(task)}
        for seed in args.finder_seeds:
            finders["lightning"].setdefault("other_seeds", []).append(lightning_suggestion(task, seed)["lr"])
            finders["ours"].setdefault("other_seeds", []).append(our_suggestion(task, seed)["lr"])
        for name, found in finders.items():
            acc = {m: best_accuracy(task, m, found["lr"]) for m in args.methods}
            rows.append({"task": task, "finder": name, **found, "best_val_accuracy": acc})
            print(json.dumps(rows[-1]), flush=True)

    print()
    methods = " | ".join(f"best acc. {m}" for m in args.methods)
    print(f"| task | finder | suggested LR (seed 0) | at seeds {args.finder_seeds} | cost (steps) | cost (s) | {methods} |")
    print("|---|---|---|---|---|---|" + "---|" * len(args.methods))
    for r in rows:
        lr = f"{r['lr']:.3g}"
        if "lr_min" in r:
            lr += f" (range {r['lr_min']:.3g} .. {r['lr_max']:.3g})"
        accs = " | ".join(f"{r['best_val_accuracy'][m]:.4f}" for m in args.methods)
        name = {"default": "none (registry default)", "lightning": "Lightning `lr_find`", "ours": "MI range test"}[r["finder"]]
        others = ", ".join(f"{v:.3g}" for v in r.get("other_seeds", [])) or "-"
        print(f"| {r['task']} | {name} | {lr} | {others} | {r['steps']} | {r['seconds']:.1f} | {accs} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
