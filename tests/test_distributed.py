"""The torch.distributed helpers, on 2 CPU processes (gloo), and their single-process identities."""

from __future__ import annotations

import math

import torch

from lrpilot import distributed as D


def test_single_process_helpers_are_identities():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main_process()
    assert D.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert D.any_true(True) and not D.any_true(False)
    t = torch.tensor([1.0, 2.0])
    D.all_reduce_mean_([t])
    assert t.tolist() == [1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}


def _collectives() -> dict:
    r = D.rank()
    t = torch.full((3,), float(r + 1))
    u = torch.tensor([10.0 * (r + 1)], dtype=torch.float64)
    D.all_reduce_mean_([t, u])
    b = torch.full((2,), float(r))
    D.broadcast_tensors_([b], src=1)
    return {
        "rank": r,
        "world": D.world_size(),
        "sum": D.all_reduce_sum([r, 1.0]),
        "max": D.all_reduce_max([r, math.nan if r == 1 else 0.0]),
        "any": D.any_true(r == 1),
        "mean": t.tolist() + u.tolist(),
        "bcast": b.tolist(),
        "obj": D.broadcast_object({"from": r}),
    }


def test_two_process_collectives():
    out = D.launch(_collectives, 2)
    assert [o["rank"] for o in out] == [0, 1] and all(o["world"] == 2 for o in out)
    for o in out:
        assert o["sum"] == [1.0, 2.0]
        assert o["max"][0] == 1.0 and math.isnan(o["max"][1])
        assert o["any"] is True
        assert o["mean"] == [1.5, 1.5, 1.5, 15.0]
        assert o["bcast"] == [1.0, 1.0]
        assert o["obj"] == {"from": 0}
