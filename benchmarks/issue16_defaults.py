"""The measurements that settled issue 16's defaults (docs/methods/aalr.md and mi-decay.md).

    OMP_NUM_THREADS=1 python benchmarks/issue16_defaults.py aalr OUT.jsonl      # AALR trial_length x objective
    OMP_NUM_THREADS=1 python benchmarks/issue16_defaults.py mi OUT.jsonl        # mi-decay range test, ceiling, ITY output
    OMP_NUM_THREADS=1 python benchmarks/issue16_defaults.py ity OUT.json        # ITY of logits/softmax, pre/post ReLU

Each appends one JSON line per run (resumable: runs already in OUT are skipped). Seeds 0, 1, 2; every
run is ``run_task(task, method, seed=s, method_options=...)`` at the task's budget. The mi runs after
the range-test rows give each seed's bounds to the ``ceiling="ksg"`` and ``ity_output`` runs, so the
ceiling and the output are compared at equal bounds.
"""

from __future__ import annotations

import json
import os
import sys

SEEDS = (0, 1, 2)


def _done(out: str, key: tuple[str, ...]) -> set[tuple]:
    if not os.path.exists(out):
        return set()
    return {tuple(json.loads(line)[k] for k in key) for line in open(out)}


def _append(out: str, row: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "lrs"}), flush=True)


def aalr(out: str) -> None:
    from lrpilot.bench.tasks import run_task

    done = _done(out, ("task", "trial_length", "objective", "seed"))
    for task in ("mnist1d-mlp", "mnist1d-cnn"):
        for seed in SEEDS:
            for tl in ("p", "p+1"):
                for obj in ("train-eval", "train-mean"):
                    if (task, tl, obj, seed) in done:
                        continue
                    rec = run_task(task, "aalr", seed=seed, progress=False,
                                   method_options={"trial_length": tl, "objective": obj})
                    s = rec["summary"]
                    _append(out, {
                        "task": task, "trial_length": tl, "objective": obj, "seed": seed,
                        "best": s["best_val_metric"], "final": s["final_val_metric"], "status": s["status"],
                        "train_s": s["train_s"],
                        "j_passes": sum(1 for e in rec["epochs"] if e["extra"].get("train_eval_loss") is not None),
                        "lrs": [e["lr"][0] for e in rec["epochs"]],
                    })


def mi(out: str) -> None:
    from lrpilot.bench.tasks import run_task

    done = _done(out, ("label", "seed"))
    tests = {"rt2x3-c2=1": {"c2": 1.0}, "rt3x5-c2=0.01": {"rrt_trials": 3, "rrt_epochs": 5, "c2": 0.01},
             "rt2x3-c2=0.01": {"rrt_trials": 2, "rrt_epochs": 3, "c2": 0.01}}
    rows = [json.loads(line) for line in open(out)] if os.path.exists(out) else []

    def run(label: str, seed: int, options: dict) -> None:
        rec = run_task("mnist1d-mlp", "mi-decay", seed=seed, progress=False, method_options=options)
        s, m = rec["summary"], rec["info"].get("method", {})
        row = {"label": label, "seed": seed, "best": s["best_val_metric"], "final": s["final_val_metric"],
               "bounds": m.get("bounds", {}), "search_epochs": m.get("search", {}).get("total_epochs"),
               "mi": m.get("mi", {}), "lrs": [e["lr"][0] for e in rec["epochs"]]}
        rows.append(row)
        _append(out, row)

    for seed in SEEDS:
        for label, options in tests.items():
            if (label, seed) not in done:
                run(label, seed, options)

        def given(label: str) -> dict:
            b = next(r["bounds"] for r in rows if r["label"] == label and r["seed"] == seed)
            return {k: b[k] for k in ("lr_min", "lr_max", "lr_top", "epsilon")}

        for label, base, extra in (("ceiling=ksg", "rt2x3-c2=1", {"ceiling": "ksg"}),
                                   ("ity=logits", "rt2x3-c2=0.01", {"ity_output": "logits"}),
                                   ("ity=softmax", "rt2x3-c2=0.01", {"ity_output": "softmax"})):
            if (label, seed) not in done:
                run(label, seed, {**given(base), **extra})


def ity(out: str) -> None:
    import torch

    from lrpilot.bench.tasks import get_task, make_loaders
    from lrpilot.core.seeding import seed_everything
    from lrpilot.estimators.mi import mi_continuous_discrete
    from lrpilot.loop.fit import Trainer
    from lrpilot.pilots.mi_decay import sample_probe

    info = get_task("mnist1d-mlp")
    data = info.load_data()
    rows = []
    for seed in SEEDS:
        seed_everything(seed)
        model = info.model()
        train, val = make_loaders(data, info.batch_size, seed=seed)
        probe = sample_probe(train, 1000, seed)
        labels = probe.targets.numpy()
        trainer = Trainer(model, train, val, method="sgd", epochs=30, seed=seed, progress=False,
                          method_options={"lr": 0.03, "momentum": 0.9})

        def measure(epoch: int) -> dict:
            acts: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o.detach()))
                     for n, m in model.named_modules() if n in ("body.0", "body.1", "body.2", "body.3")]
            model.eval()
            with torch.no_grad():
                logits = model(probe.inputs)
            model.train()
            for h in hooks:
                h.remove()
            est = lambda t: mi_continuous_discrete(t, labels, k=3, seed=seed)  # noqa: E731
            return {"seed": seed, "epoch": epoch, "logits": est(logits), "softmax": est(torch.softmax(logits, 1)),
                    "h1_pre": est(acts["body.0"]), "h1_post": est(acts["body.1"]),
                    "h2_pre": est(acts["body.2"]), "h2_post": est(acts["body.3"]),
                    "acc": float((logits.argmax(1) == probe.targets).double().mean())}

        trainer._begin()
        rows.append(measure(0))
        for epoch in (1, 3, 10, 30):
            trainer.run(until_epoch=epoch)
            rows.append(measure(epoch))
            print(json.dumps(rows[-1]), flush=True)
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    {"aalr": aalr, "mi": mi, "ity": ity}[sys.argv[1]](sys.argv[2])
