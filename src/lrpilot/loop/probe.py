"""The :data:`~lrpilot.core.contract.PROBE` signal: module outputs on a pilot's fixed probe inputs.

A pilot that wants to look inside the network (the MI pilots estimate I(T; Y) of each layer's
activations T) lists ``PROBE`` in its ``needs`` and sets ``pilot.probe`` to a
:class:`~lrpilot.core.contract.Probe`. The loop then runs the model on those inputs in evaluation mode,
without gradients and inside the method's ``eval_context``, with a forward hook on every requested
module, and hands the outputs to the pilot in ``EpochSignals.extra["probe"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lrpilot.core.contract import Probe

__all__ = ["probe_signal", "run_probe"]


def run_probe(
    model: nn.Module,
    probe: Probe,
    *,
    device: torch.device | str | None = None,
    eval_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """``{module name: outputs}`` of ``model`` on ``probe.inputs`` (``""``: the model's output).

    The outputs are detached and stay on the model's device, concatenated over batches. The model's
    train/eval mode is restored and every hook removed, whatever happens.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"the pilot's probe must be a lrpilot.core.contract.Probe, got {type(probe).__name__}")
    if not (isinstance(probe.batch_size, int) and probe.batch_size > 0):
        raise ValueError(f"probe batch_size must be a positive integer, got {probe.batch_size!r}")
    named = dict(model.named_modules())
    unknown = [name for name in probe.modules if name and name not in named]
    if unknown:
        raise ValueError(
            f"probe asks for module(s) {unknown} that the model does not have; "
            f"valid names: {[n for n in named if n]}"
        )
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in probe.modules}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"probe module {name!r} returned {type(output).__name__}, not a tensor")
            parts[name].append(output.detach())

        return hook

    handles = [named[name].register_forward_hook(keep(name)) for name in probe.modules if name]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (eval_context() if eval_context is not None else contextlib.nullcontext()):
            for chunk in probe.inputs.split(probe.batch_size):
                out = model(chunk.to(device, non_blocking=True))
                if "" in parts:
                    parts[""].append(out.detach())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    outputs = {name: torch.cat(chunks) for name, chunks in parts.items()}
    for name, value in outputs.items():
        if len(value) != len(probe.inputs):
            raise ValueError(
                f"probe module {name!r} produced {len(value)} rows for {len(probe.inputs)} inputs "
                "(a module called more than once per forward pass cannot be probed)"
            )
    return outputs


def probe_signal(pilot: Any, model: nn.Module, *, device: torch.device | None, eval_context: Any) -> dict[str, torch.Tensor]:
    """The :data:`~lrpilot.core.contract.PROBE` signal for ``pilot``: its :attr:`Pilot.probe` run on ``model``
    (the training loop and the integrations hand it the same way)."""
    if pilot.probe is None:
        raise ValueError(f"pilot {type(pilot).__name__} needs signal 'probe' but sets no `probe`")
    return run_probe(model, pilot.probe, device=device, eval_context=eval_context)
