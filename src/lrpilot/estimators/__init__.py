"""Pure math used by the pilots (no training loop): each fast estimator has a slow reference beside it.

* mutual information (:mod:`~lrpilot.estimators.mi`): :func:`mi_continuous_discrete` (Ross 2014),
  :func:`mi_continuous` (KSG estimator 1), :func:`label_entropy`, and their references;
* Lipschitz constants (:mod:`~lrpilot.estimators.lipschitz`): :func:`classical_lipschitz`,
  :func:`cross_entropy_lipschitz`, :func:`binary_cross_entropy_lipschitz`, :func:`smoothness`,
  :class:`LossSpec`, :class:`PenultimateMonitor`;
* Hessian-vector products (:mod:`~lrpilot.estimators.curvature`): :func:`hvp`, :func:`gradient_with_graph`,
  :func:`hvp_reference`, :func:`hessian_reference`;
* phi-divergence closed forms and the Lambert W function (:mod:`~lrpilot.estimators.phi_divergence`,
  :mod:`~lrpilot.estimators.lambert`).

Example:
    >>> import numpy as np
    >>> from lrpilot.estimators import label_entropy
    >>> round(label_entropy(np.array([0, 1, 0, 1])), 4)  # ln 2, in nats
    0.6931

Names load on first use, so ``import lrpilot.estimators`` costs nothing until an estimator is called.
"""

from __future__ import annotations

from lrpilot.core.lazy import lazy_exports

_HOME = {
    **dict.fromkeys(
        ("label_entropy", "mi_continuous", "mi_continuous_discrete", "mi_continuous_discrete_reference",
         "mi_continuous_reference", "mi_ratio"),
        "lrpilot.estimators.mi",
    ),
    **dict.fromkeys(
        ("LossSpec", "PenultimateMonitor", "binary_cross_entropy_lipschitz", "classical_lipschitz",
         "cross_entropy_lipschitz", "smoothness"),
        "lrpilot.estimators.lipschitz",
    ),
    **dict.fromkeys(("gradient_with_graph", "hessian_reference", "hvp", "hvp_reference"), "lrpilot.estimators.curvature"),
    **dict.fromkeys(("lambertw", "lambertw_nonneg"), "lrpilot.estimators.lambert"),
}  # fmt: skip

__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
