"""Shared fixtures: tiny seeded tasks that run in a fraction of a second on one CPU core."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lrpilot.bench.tasks.models import MLP
from lrpilot.core.data import TensorLoader
from lrpilot.core.seeding import seed_everything

# One thread: the default suite must not fight the other CI core, and results must repeat.
torch.set_num_threads(1)
os.environ.setdefault("LRPILOT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "lrpilot"))


def blobs(n: int = 192, classes: int = 3, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: ``classes`` well separated clusters in ``dim`` dimensions."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


class TinyTask:
    """A 3-class blob problem with a small MLP: every method must lower its loss in a few epochs."""

    def __init__(self, seed: int = 0, batch_size: int = 32) -> None:
        x, y = blobs(seed=0)
        xv, yv = blobs(n=96, seed=1)
        self.train = TensorLoader(x, y, batch_size, shuffle=True, seed=seed)
        self.val = TensorLoader(xv, yv, 96, shuffle=False)
        self.seed = seed

    def model(self, seed: int | None = None) -> nn.Module:
        seed_everything(self.seed if seed is None else seed)
        return MLP((4, 16, 3))


@pytest.fixture
def tiny() -> TinyTask:
    return TinyTask()


def fmnist_available() -> bool:
    from lrpilot.bench.tasks.sources import fmnist_dir

    return (fmnist_dir() / "train-images-idx3-ubyte.gz").exists() or (fmnist_dir() / "train-images-idx3-ubyte").exists()


needs_fmnist = pytest.mark.skipif(
    not fmnist_available(), reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
)
