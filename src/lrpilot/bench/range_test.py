"""The MI LR range test (Vasudevan 2020, Algorithm 2) on its own, without training afterwards.

``mi-decay`` runs the range test when it is built (unless its four values are given); these calls build
it on a model or a bench task and return what the range test found, so the standalone result is, by
construction, the one ``mi-decay`` would train with. ``lrpilot range-test --task T --out rrt.json`` is
:func:`range_test_task`.

Example:
    >>> from lrpilot.bench.range_test import range_test_task
    >>> report = range_test_task("iris-softmax", options={"rrt_lrs": (0.01, 0.1, 1.0)})  # doctest: +SKIP
    >>> report["range_test"]["lr_min"], report["range_test"]["lr_max"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.core.registry import get_method, resolve_options
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import DEFAULT_HYPER_FRACTION, Trainer
from lrpilot.loop.history import jsonable
from lrpilot.loop.metrics import Metric

__all__ = ["range_test", "range_test_task"]

_BOUNDS = ("lr_min", "lr_max", "lr_top", "epsilon")


def range_test(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any | None = None,
    *,
    method: str = "mi-decay",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metric: Metric | str | None = None,
    task_kind: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    options: Mapping[str, Any] | None = None,
    hyper_loader: Any = None,
    hyper_fraction: float = DEFAULT_HYPER_FRACTION,
) -> dict[str, Any]:
    """Run the range test of ``method`` (``mi-decay`` or ``mi-decay-layerwise``) on ``model``.

    The trials train copies of ``model`` from its current weights; ``model`` itself is not changed.

    Returns:
        ``{"range_test": {lr_min, lr_max, lr_top, epsilon, attribute, threshold, table, ...},
        "search": {"runs", "total_epochs", "total_steps", "total_train_s"}, "mi": {ixy, ixy_ksg, h_y, ...}}``.
    """
    opts = dict(options or {})
    given = [key for key in _BOUNDS if opts.get(key) is not None]
    if given:
        raise ValueError(f"the range test finds {', '.join(_BOUNDS)}; do not give {', '.join(given)}")
    resolve_options(get_method(method), opts)  # unknown options fail before any training
    trainer = Trainer(
        model, train_loader, val_loader if val_loader is not None else train_loader, method=method, epochs=1,
        loss_fn=loss_fn, metric=metric, seed=seed, device=device, progress=False, task_kind=task_kind,
        method_options=opts, hyper_loader=hyper_loader, hyper_fraction=hyper_fraction,
    )
    info = trainer.parts.info
    # Plain JSON (non-finite numbers as None), like the run record it is a part of.
    return jsonable({"range_test": info["range_test"], "search": info["search"], "mi": info["mi"]})


def range_test_task(
    task: str,
    *,
    method: str = "mi-decay",
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    train_subset: int | None = None,
    data_dir: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`range_test` on a bench task's model (initialised by ``seed``) and data.

    Returns the same dict plus ``task``, ``method``, ``seed`` and ``config``: the JSON ``lrpilot
    range-test --out`` writes.
    """
    info = get_task(task)
    resolved = resolve_options(get_method(method), dict(options or {}))
    data = info.load_data(data_dir).subset(train_subset)
    batch_size = info.batch_size if batch_size is None else batch_size
    seed_everything(seed)
    model = info.model()
    train_loader, val_loader = make_loaders(data, batch_size, seed=seed)
    report = range_test(
        model, train_loader, val_loader, method=method, loss_fn=info.loss(), metric=info.build_metric(data),
        task_kind=info.kind, seed=seed, device=device, options=options,
    )
    config = {"batch_size": batch_size, "device": str(device), "train_subset": train_subset,
              "method_options": resolved}
    return {"task": task, "method": method, "seed": seed, "config": config, **report}
