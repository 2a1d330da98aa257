"""Seeding and capture/restore of every random source the loop touches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "rng_preserved", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng() -> dict[str, Any]:
    """The state of every global random source, to restore bit for bit later."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_preserved(*loaders: Any) -> Iterator[None]:
    """Run a side pass (an evaluation, a probe, a search) without moving any random source the training
    order depends on: the global RNGs, and the ``torch.Generator`` a ``DataLoader``, its sampler or its
    batch sampler's sampler holds (a shuffling ``DataLoader`` draws its order from its own generator when
    given one, else from torch's global RNG, once per iteration)."""
    generators: dict[int, torch.Generator] = {}
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator):
                generators[id(gen)] = gen
    states = [(gen, gen.get_state()) for gen in generators.values()]
    rng = capture_rng()
    try:
        yield
    finally:
        restore_rng(rng)
        for gen, state in states:
            gen.set_state(state)
