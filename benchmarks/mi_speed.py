"""Speed of the k-NN MI estimators, and what MI costs per epoch of training. Ratios measured in one run.

    PYTHONPATH=src python benchmarks/mi_speed.py [--threads 1] [--repeats 3] [--epochs 3]
                                                 [--skip-train | --skip-estimators]

Part 1, estimators at n = 1000, k = 3: ours (dense Chebyshev matrix from SciPy's ``pdist``, and the
torch backend) against a cKDTree implementation of the same estimator
(``mi_continuous_discrete_reference``/``mi_continuous_reference``: ``query`` + ``query_ball_point``),
interleaved, median seconds of ``--repeats`` calls each; ``same`` says the values are identical.

Part 2, on ``fmnist-lenet`` with plain SGD: after every epoch, the seconds the MI pilots add (the probe's
forward pass on the 1000-sample subset + ITY of the network output, and of every layer for the
layer-wise method) as a fraction of that epoch's training seconds, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lrpilot.estimators.mi import (
    mi_continuous,
    mi_continuous_discrete,
    mi_continuous_discrete_reference,
    mi_continuous_reference,
)


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bench_estimators(repeats: int) -> None:
    rng = np.random.default_rng(0)
    n = 1000
    y = rng.integers(0, 10, n)
    target = rng.standard_normal((n, 1))
    cases: list[tuple[str, Callable[[], float], Callable[[], float], Callable[[], float]]] = []
    for d, what in ((10, "ITY, 10-dim output"), (100, "100-dim activations"), (784, "IXY, 784-dim inputs")):
        t = rng.standard_normal((n, d)) + 2.0 * np.eye(10)[y].repeat(-(-d // 10), axis=1)[:, :d]
        cases.append((f"Ross  d={d:<4} ({what})",
                      lambda t=t: mi_continuous_discrete(t, y),
                      lambda t=t: mi_continuous_discrete(t, y, backend="torch"),
                      lambda t=t: mi_continuous_discrete_reference(t, y)))
    for d in (10, 100, 784):
        t = rng.standard_normal((n, d))
        reg = t[:, :1] + 0.5 * target
        cases.append((f"KSG1  d={d:<4} vs 1-dim target",
                      lambda t=t, reg=reg: mi_continuous(t, reg),
                      lambda t=t, reg=reg: mi_continuous(t, reg, backend="torch"),
                      lambda t=t, reg=reg: mi_continuous_reference(t, reg)))
    print(f"\nEstimators, n={n}, k=3, {torch.get_num_threads()} thread(s); median of {repeats} interleaved calls")
    print(f"{'case':<40} {'ours s':>8} {'torch s':>8} {'cKDTree s':>10} {'ratio':>7} {'torch ratio':>11}  same")
    for name, ours, ours_torch, ref in cases:
        t_ours, t_torch, t_ref, values = [], [], [], set()
        for _ in range(repeats):
            for bucket, fn in ((t_ours, ours), (t_torch, ours_torch), (t_ref, ref)):
                dt, v = _timed(fn)
                bucket.append(dt)
                values.add(v)
        a, b, c = statistics.median(t_ours), statistics.median(t_torch), statistics.median(t_ref)
        print(f"{name:<40} {a:>8.4f} {b:>8.4f} {c:>10.4f} {c / a:>6.1f}x {c / b:>10.1f}x  {len(values) == 1}")


def bench_overhead(epochs: int) -> None:
    from lrpilot.bench.tasks import DataUnavailableError, get_task, make_loaders
    from lrpilot.core.contract import Probe
    from lrpilot.core.seeding import seed_everything
    from lrpilot.loop.fit import Trainer
    from lrpilot.loop.probe import run_probe
    from lrpilot.pilots.mi_decay import estimate_ceiling, estimate_mi, sample_probe
    from lrpilot.pilots.mi_decay import layer_groups as _layers

    info = get_task("fmnist-lenet")
    try:
        data = info.load_data()
    except DataUnavailableError as err:
        print(f"\nfmnist-lenet skipped: {err}")
        return
    train, val = make_loaders(data, info.batch_size, seed=0)
    seed_everything(0)
    trainer = Trainer(info.model(), train, val, method="sgd", epochs=epochs, seed=0, progress=False,
                      method_options={"lr": 0.01})
    probe = sample_probe(train, 1000, seed=0)
    labels = probe.targets.numpy()
    layers = [name for name, _ in _layers(trainer.model)]
    dims: dict[str, int] = {}
    t_ixy, _ = _timed(lambda: estimate_ceiling(probe, kind="classification")["ixy_ksg"])
    print(f"\nMI overhead on fmnist-lenet ({len(train)} steps/epoch, subset n=1000, "
          f"{torch.get_num_threads()} thread(s)); IXY once: {t_ixy:.3f} s")
    print(f"{'epoch':>5} {'train s':>8} {'probe s':>8} {'ITY s':>7} {'net %':>6} {'layers s':>9} {'layer-wise %':>12}")
    for e in range(1, epochs + 1):
        before = trainer._train_s  # noqa: SLF001 - the loop's own training clock
        trainer.run(until_epoch=e)
        train_s = trainer._train_s - before  # noqa: SLF001
        t_probe, out = _timed(lambda: run_probe(trainer.model, Probe(probe.inputs, modules=("", *layers))))
        t_ity, _ = _timed(lambda: estimate_mi(out[""], labels, classification=True))
        t_layers = 0.0
        for name in layers:
            dims[name] = int(out[name][0].numel())
            if name != "head":  # the head's output is the network output, estimated above
                dt, _ = _timed(lambda name=name: estimate_mi(out[name], labels, classification=True))
                t_layers += dt
        net = (t_probe + t_ity) / train_s
        lw = (t_probe + t_ity + t_layers) / train_s
        print(f"{e:>5} {train_s:>8.2f} {t_probe:>8.3f} {t_ity:>7.3f} {100 * net:>5.1f}% {t_layers:>9.3f} {100 * lw:>11.1f}%")
    print("layer dims: " + ", ".join(f"{k}={v}" for k, v in dims.items()))


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true", help="estimators only")
    parser.add_argument("--skip-estimators", action="store_true", help="the per-epoch overhead only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    if not args.skip_estimators:
        bench_estimators(args.repeats)
    if not args.skip_train:
        bench_overhead(args.epochs)


if __name__ == "__main__":
    main()
