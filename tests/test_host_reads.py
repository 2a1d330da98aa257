"""Host reads (a GPU's host-device syncs, counted on any device): the counter on closed cases, and every
registered method of ours held to its known count per training step (issue 19: a step-level method
should not stall a GPU every step)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lrpilot
from lrpilot.core.host_reads import count_host_reads, host_resident_state
from lrpilot.core.registry import list_methods


def test_every_kind_of_read_is_counted_and_device_work_is_not():
    t = torch.tensor([1.0, -2.0, 3.0])
    with count_host_reads() as reads:
        total = t.sum() * 2  # device work only
        torch.isfinite(t).all()
    assert reads.count == 0 and total.shape == ()
    with count_host_reads() as reads:
        float(t.sum())
        t.max().item()
        if torch.isfinite(t).all():  # a Python `if` on a tensor
            pass
        t[t > 0]  # a boolean mask: its size is a read
        torch.nonzero(t)
        t.tolist()
    assert reads.by_kind() == {"_local_scalar_dense": 3, "boolean index": 1, "nonzero": 1, "tolist": 1}
    assert reads.count == 6


def test_torch_optimizers_host_resident_step_counts_are_not_reads():
    """torch's Adam keeps ``state["step"]`` on the host unless capturable: reading it syncs nothing."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1, foreach=False)
    w.grad = torch.ones(3)
    opt.step()
    assert len(host_resident_state(opt)) == 1
    with count_host_reads() as everything:
        opt.step()
    with count_host_reads(host_resident_state(opt)) as reads:
        opt.step()
    assert everything.count == 1 and reads.count == 0
    opt.param_groups[0]["capturable"] = True  # (a CUDA-only option): the step would live with the parameters
    assert host_resident_state(opt) == []


# Our methods that read values back every step, and why. Every other method of ours reads none; the
# peers (their packages' code, not ours) are measured by benchmarks/overhead.py and not held here.
KNOWN_READS_PER_STEP = {
    # the cosine (or the hypergradient) finished on the host from one batched read (docs/performance.md):
    # the LR they learn is a Python float in param_groups, read back to choose the next step's LR
    "hd-train": 1, "hd-val": 1, "rt-hpo": 1,
    # the Lipschitz estimates of every group, read in one stacked tensor to set the next step size
    "adamo": 1, "lipschitz-rmsprop": 1, "auto-adam": 1,
}


def _ours() -> list[Any]:
    return [m for m in list_methods() if "peer" not in m.tags and m.available]


# Counting wraps optimizer.step after the schedules' LR scheduler was built; torch's scheduler notices and warns
# although the wrapper calls the same step.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
@pytest.mark.parametrize("info", _ours(), ids=lambda m: m.name)
def test_reads_per_training_step_are_known(tiny, info):
    """Count inside ``optimizer.step`` and the pilot's ``on_step_end`` over two epochs (a seed method's
    cooldown included), from the second step on (the first creates the optimizer's state: a one-time
    read there, e.g. hyper-regularization's initial beta, is not a per-step cost); the loop's own read of
    the loss is not the method's."""
    trainer = lrpilot.Trainer(tiny.model(), tiny.train, tiny.val, method=info.name, epochs=2, seed=0,
                              progress=False, method_options=dict(info.test_options))
    reads_in = {"step": 0, "on_step_end": 0}
    steps = 0

    def counting(hook: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal steps
            steps += hook == "step"
            if steps < 2:
                return fn(*args, **kwargs)
            with count_host_reads(host_resident_state(trainer.optimizer)) as reads:
                result = fn(*args, **kwargs)
            reads_in[hook] += reads.count
            return result

        return wrapper

    trainer.optimizer.step = counting("step", trainer.optimizer.step)
    if trainer.parts.pilot is not None:
        trainer.parts.pilot.on_step_end = counting("on_step_end", trainer.parts.pilot.on_step_end)
    trainer.run()
    assert steps >= 2 * len(tiny.train)  # closures may call step more than once per batch; never fewer
    assert sum(reads_in.values()) / (steps - 1) == KNOWN_READS_PER_STEP.get(info.name, 0), reads_in
