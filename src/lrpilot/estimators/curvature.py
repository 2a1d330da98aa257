r"""Hessian-vector products :math:`H v` of a loss with respect to a list of parameter tensors.

The fast path is Pearlmutter's (1994) observation that :math:`H v` is the directional derivative of the
gradient, :math:`H v = \nabla_w \langle \nabla_w \ell(w), v \rangle`, so it costs one more
differentiation of the gradient instead of the :math:`N \times N` Hessian. We compute it
reverse-over-reverse (a second backward pass through the graph of a ``create_graph=True`` gradient),
which on CPU is faster in PyTorch than the forward-over-reverse ``torch.func.jvp(grad(f))`` form of the
same product (measured on the Fashion-MNIST MLP: 2.7x vs 4.5x a plain SGD step). Both are exact.

:func:`hvp_reference` builds the explicit Hessian with ``torch.autograd.functional.hessian`` and
multiplies: slow (N backward passes, N^2 memory) and obviously right, for tests on tiny models.

Tensors are handled as lists in parameter order; a parameter the loss does not depend on gets a zero
gradient and a zero product, never ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["gradient_with_graph", "hessian_reference", "hvp", "hvp_reference"]


def gradient_with_graph(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """:math:`\\nabla_w \\ell` with its graph kept, ready for :func:`hvp`.

    Entries are ``None`` for parameters the loss does not depend on.
    """
    return list(torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True))


def hvp(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    r""":math:`H v` for the Hessian of the loss whose gradient ``grads`` was built with ``create_graph=True``.

    Args:
        grads: from :func:`gradient_with_graph` (``None`` or graph-less entries contribute nothing:
            their rows of the Hessian are zero).
        params: the parameters the gradient was taken with respect to, in the same order.
        vectors: :math:`v`, one tensor per parameter, same shapes.
        retain_graph: keep the graph for another product with the same gradient.

    Returns:
        :math:`H v` as one tensor per parameter (zeros where the loss is linear in the parameter).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> g = gradient_with_graph((w ** 3).sum(), [w])  # H = diag(6 w)
        >>> hvp(g, [w], [torch.ones(2)])[0]
        tensor([ 6., 12.])
    """
    params = list(params)
    if not (len(grads) == len(params) == len(vectors)):
        raise ValueError(f"got {len(grads)} gradients, {len(params)} parameters and {len(vectors)} vectors")
    outputs, grad_outputs = [], []
    for g, v in zip(grads, vectors):
        if g is not None and g.requires_grad:
            outputs.append(g)
            grad_outputs.append(v)
    if not outputs:  # the loss is at most linear in every parameter: H = 0
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(
        outputs, params, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if hv is None else hv for p, hv in zip(params, products)]


def hessian_reference(fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The explicit :math:`N \\times N` Hessian of ``fn(*params)`` over the flattened parameters (slow)."""
    params = [p.detach() for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_fn(flat: torch.Tensor) -> torch.Tensor:
        parts = [chunk.reshape(shape) for chunk, shape in zip(torch.split(flat, sizes), shapes)]
        return fn(*parts)

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.autograd.functional.hessian(flat_fn, flat)


def hvp_reference(
    fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """:math:`H v` by building the explicit Hessian of ``fn(*params)`` and multiplying (slow reference)."""
    hess = hessian_reference(fn, params)
    flat_v = torch.cat([v.reshape(-1) for v in vectors])
    out = hess @ flat_v
    return [chunk.reshape(p.shape) for chunk, p in zip(torch.split(out, [p.numel() for p in params]), params)]
