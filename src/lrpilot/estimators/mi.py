"""k-nearest-neighbour mutual information estimators (KSG, Ross), in nats, float64.

Two estimators, one recipe:

* :func:`mi_continuous_discrete` -- Ross (2014): a continuous ``T`` (activations, network outputs,
  inputs) against discrete class labels ``y``. Used for ITY and, for classification, the k-NN IXY.
* :func:`mi_continuous` -- Kraskov, Stoegbauer & Grassberger (2004), algorithm 1 (default) or 2: a
  continuous ``T`` against a continuous ``Y`` (regression targets).

Every estimate follows the same steps:

1. :func:`prepare`: reshape to ``(n, d)``, upcast to float64, divide by one global scale (the array's
   standard deviation; 1 when it is 0), add a seeded Gaussian jitter of ``jitter * max(1, mean|A|)`` to
   break ties (ReLU zeros, saturated softmax, constant pixels). Float64 because a 1e-10 jitter vanishes
   in float32 (``1 + 1e-10 == 1``).
2. :func:`pairwise_chebyshev`: the dense ``n x n`` max-norm distance matrix (SciPy's ``pdist``/``cdist``,
   or ``torch.cdist(p=inf)`` on any device). Never the matmul Euclidean form, which returns negative
   squared distances for rows that differ only by the jitter. Max-norm distances are exact (a max of
   exact ``|a - b|``), so every backend gives bit-identical matrices.
3. Integer neighbour counts from the matrix, with the estimators' exact inequalities (``<`` and ``<=``
   on the exact distances: no ``r - 1e-15`` tricks, which are no-ops above ~16). Ross on one NumPy
   thread (what the MI pilots run every epoch) does not fill the matrix: :func:`_ross_counts_pruned`
   rules pairs out with lower bounds of the same distances and returns the same counts.
4. One shared float64 formula from the counts (digamma from SciPy), so the NumPy path, the torch path
   (CPU or GPU) and the slow cKDTree references (:func:`mi_continuous_discrete_reference`,
   :func:`mi_continuous_reference`) return *identical* values.

Estimates are raw: they may be slightly negative (independence) and are biased low when the true MI is
high or the dimension large (``docs/methods/mi-decay.md``). Clamp only ratios (:func:`mi_ratio`).

References:
    Kraskov, Stoegbauer & Grassberger, "Estimating mutual information", PRE 69, 066138 (2004).
    Ross, "Mutual information between discrete and continuous data sets", PLoS ONE 9(2) e87357 (2014).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, pdist, squareform
from scipy.special import digamma

__all__ = [
    "label_entropy",
    "mi_continuous",
    "mi_continuous_discrete",
    "mi_continuous_discrete_reference",
    "mi_continuous_reference",
    "mi_ratio",
    "pairwise_chebyshev",
    "prepare",
]

_BACKENDS = ("numpy", "torch")

# Stream ids of the jitter: the first and second argument of an estimator get independent noise.
_STREAM_T, _STREAM_Y = 0, 1


# ----------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------
def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a)


def _as_float64_2d(a: Any, name: str) -> np.ndarray:
    """``a`` as a new float64 ``(n, d)`` array (a 1-D array is ``n`` samples of one feature)."""
    arr = _to_numpy(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have one row per sample, got a scalar")
    # A tensor was already copied into a new float64 array by _to_numpy: a second copy would be waste.
    arr = arr.astype(np.float64, copy=not isinstance(a, torch.Tensor)).reshape(len(arr), -1)
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {arr.shape})")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} of {len(arr)} samples; MI needs finite values")
    return arr


def _as_labels(y: Any, name: str = "y") -> np.ndarray:
    """Integer class labels as an ``(n,)`` int64 array; anything non-integer is an error."""
    arr = _to_numpy(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one class label per sample (shape (n,)), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; class labels must be integers")
    frac = arr != np.round(arr)
    if frac.any():
        raise ValueError(
            f"{name} must hold integer class labels, got non-integer values such as {arr[frac][0]!r}; "
            "for a continuous target use mi_continuous"
        )
    return arr.astype(np.int64)


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n <= k:
        raise ValueError(f"k-NN MI needs more samples than neighbours: got n={n} samples for k={k}")
    return int(k)


def _check_lengths(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names[0]} has {len(a)} samples but {names[1]} has {len(b)}; they must be paired")


def _check_backend(backend: str, workers: int) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def prepare(a: Any, *, jitter: float = 1e-10, seed: int = 0, stream: int = 0, scale: bool = True,
            name: str = "T") -> np.ndarray:
    """Reshape, upcast, rescale and jitter one argument of an estimator.

    ``A <- A / s`` with ``s = std(A)`` over the whole array (one scalar: per-feature z-scores blow up
    near-constant pixels), ``s = 1`` if it is 0; then ``A <- A + jitter * max(1, mean|A|) * N(0, 1)``
    with a generator seeded by ``(seed, stream)``.

    Args:
        a: array-like or tensor, ``(n, ...)``; flattened to ``(n, d)``.
        jitter: relative size of the tie-breaking noise (``0`` disables it).
        seed, stream: seed of the noise; the two arguments of an estimator use different streams.
        scale: divide by the global standard deviation first.
        name: used in error messages.

    Returns:
        A new float64 ``(n, d)`` array.
    """
    if not (isinstance(jitter, (int, float)) and math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    arr = _as_float64_2d(a, name)
    if scale:
        s = float(arr.std())
        if s > 0 and math.isfinite(s):
            arr /= s
    if jitter > 0:
        arr += jitter * max(1.0, float(np.abs(arr).mean())) * _standard_normal(int(seed), int(stream), arr.shape)
    return arr


_NOISE: dict[tuple[int, int, tuple[int, ...]], np.ndarray] = {}
_NOISE_BYTES = 256 * 2**20  # kept draws in all (a layer-wise pilot asks for one shape per layer, every epoch)


def _standard_normal(seed: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """``default_rng([seed, stream]).standard_normal(shape)``, kept: the pilots jitter the same subset with
    the same seed after every epoch, and drawing ~n*d normals again cost as much as the estimate of a small
    output. A cached draw is the same array a new generator would give (read-only, so no caller changes it)."""
    key = (seed, stream, tuple(shape))
    noise = _NOISE.get(key)
    if noise is None:
        noise = np.random.default_rng([seed, stream]).standard_normal(shape)
        noise.flags.writeable = False
        while _NOISE and sum(v.nbytes for v in _NOISE.values()) + noise.nbytes > _NOISE_BYTES:
            _NOISE.pop(next(iter(_NOISE)))  # oldest first
        if noise.nbytes <= _NOISE_BYTES:
            _NOISE[key] = noise
    return noise


# ----------------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------------
def pairwise_chebyshev(a: np.ndarray, *, backend: str = "numpy", device: Any = None, workers: int = 1) -> Any:
    """Dense max-norm distance matrix ``D[i, j] = max_f |a[i, f] - a[j, f]|`` with ``+inf`` on the diagonal.

    Args:
        a: float64 ``(n, d)`` array (see :func:`prepare`).
        backend: ``"numpy"`` (SciPy; returns an ndarray) or ``"torch"`` (``torch.cdist(p=inf)`` on
            ``device``; returns a float64 tensor there).
        device: torch device for the torch backend (default CPU).
        workers: NumPy backend only: threads computing row blocks of the upper triangle (``1``: one
            ``pdist`` call, which already halves the work by symmetry).

    The diagonal is ``+inf`` so that "the k-th nearest neighbour" and "points closer than r" never
    count the point itself.
    """
    _check_backend(backend, workers)
    n = len(a)
    if backend == "torch":
        t = torch.as_tensor(a, dtype=torch.float64, device=device)
        d = torch.cdist(t.unsqueeze(0), t.unsqueeze(0), p=float("inf"))[0]
        d.fill_diagonal_(float("inf"))
        return d
    if workers == 1 or n < 256:
        d = squareform(pdist(a, "chebyshev"))
    else:
        d = np.empty((n, n))
        # Row blocks of the upper triangle; each block D[rows, rows.start:] is mirrored below.
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        blocks = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

        def fill(block: tuple[int, int]) -> None:
            lo, hi = block
            part = cdist(a[lo:hi], a[lo:], "chebyshev")
            d[lo:hi, lo:] = part
            d[lo:, lo:hi] = part.T

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, blocks))
    np.fill_diagonal(d, np.inf)
    return d


def _kth_smallest(d: Any, k: int) -> Any:
    """The k-th smallest entry (1-based) of every row."""
    if isinstance(d, torch.Tensor):
        return torch.kthvalue(d, k, dim=1).values
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _to_int_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.to("cpu", torch.int64).numpy()
    return np.asarray(x, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# Ross (continuous vs discrete)
# ----------------------------------------------------------------------------------------------------
_GROUPS: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]] = {}


def _ross_groups(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per sample: class size N_c, k_c = min(k, N_c - 1), kept (N_c >= 2); the index set of each kept class.

    Kept for the last few label vectors (read-only): a pilot estimates every layer, every epoch, against
    the same subset's labels, and the unique/flatnonzero per class cost as much as a small estimate.
    """
    key = (labels.tobytes(), int(k))
    hit = _GROUPS.get(key)
    if hit is None:
        hit = _ross_groups_uncached(labels, k)
        for arr in (*hit[:3], *hit[3]):
            arr.flags.writeable = False
        if len(_GROUPS) >= 8:
            _GROUPS.pop(next(iter(_GROUPS)))
        _GROUPS[key] = hit
    return hit


def _ross_groups_uncached(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_c = counts[inverse]
    keep = n_c >= 2
    if not keep.any():
        raise ValueError("every class label occurs once: the Ross estimator needs a class with >= 2 samples")
    k_c = np.minimum(k, n_c - 1)
    groups = [np.flatnonzero(inverse == c) for c in range(len(counts)) if counts[c] >= 2]
    return n_c, k_c, keep, groups


def _ross_value(n_c: np.ndarray, k_c: np.ndarray, m: np.ndarray) -> float:
    """``psi(N) + <psi(k_c)> - <psi(N_c)> - <psi(m)>`` over the kept samples (the shared formula)."""
    n = len(m)
    return float(digamma(n) + digamma(k_c).mean() - digamma(n_c).mean() - digamma(m).mean())


def _ross_counts(d: Any, n_c: np.ndarray, k_c: np.ndarray, keep: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """m_i = #{j != i kept : D[i, j] <= d_i}, d_i = distance to the k_c-th nearest same-class neighbour."""
    is_torch = isinstance(d, torch.Tensor)
    radius = torch.empty(len(d), dtype=torch.float64, device=d.device) if is_torch else np.empty(len(d))
    for idx in groups:
        kk = int(k_c[idx[0]])
        rows = torch.tensor(idx, device=d.device) if is_torch else idx  # a copy: idx is read-only (cached)
        radius[rows] = _kth_smallest(d[rows][:, rows], kk)
    kept = np.flatnonzero(keep)
    if is_torch:
        kept_t = torch.as_tensor(kept, device=d.device)
        sub, r = d[kept_t][:, kept_t], radius[kept_t]
        return _to_int_array((sub <= r[:, None]).sum(dim=1))
    sub = d[np.ix_(kept, kept)] if len(kept) < len(d) else d
    return (sub <= radius[kept, None]).sum(axis=1)


# Coordinates of the first pass of _ross_counts_pruned (over the pairs its sweep leaves). Measured on
# trained MLPs' layers (n = 1000, d = 100..512): 3-6 % of the pairs survive 16 coordinates, 10-15 % 8;
# checking a surviving pair one coordinate at a time costs ~2 ns, SciPy's pass ~0.35 ns a pair and
# coordinate, so the first pass takes the coordinates until few pairs are left.
_PRUNE_FIRST = 16
# Above this fraction of surviving pairs (the rate over the rows swept so far), the dense matrix is cheaper
# than checking them one by one.
_PRUNE_DENSE = 0.08
# Rows of one cdist call of the first pass (a block's columns: the union of its rows' windows).
_SWEEP_ROWS = 64


def _ross_counts_pruned(a: np.ndarray, k_c: np.ndarray, keep: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The counts of :func:`_ross_counts` (for the kept samples, in their order) without the dense matrix.

    The max-norm over any subset of the coordinates is a lower bound of the distance, computed the same
    way (``fl(|a - b|)``, then a max), so pairs can be ruled out before their distance is known:

    1. Coordinates sorted by decreasing variance (the widest rule out the most pairs).
    2. ``d_i`` (the ``k_c``-th nearest same-class distance) from exact within-class distances: one
       small ``pdist`` per class, ``1 / classes`` of the pairs.
    3. A sweep along the widest coordinate: sorted by it, the ``j`` with ``|x_j - x_i| <= d_i`` in that
       coordinate are a contiguous window (found by binary search, widened by a relative 1e-9 for the
       rounding; a wider window only adds candidates). Only pairs inside the windows are looked at: the
       max-norm over the first ``_PRUNE_FIRST`` coordinates (all of them when ``d`` is no larger: then
       it is ``D`` and ``m_i`` a count per row), in blocks of ``_SWEEP_ROWS`` rows.
    4. The other coordinates are checked in blocks of doubling width, one coordinate at a time over the
       surviving pairs, dropping a pair as soon as a block exceeds ``d_i`` (``D <= d_i`` iff every
       block's max is ``<= d_i``). What survives is exactly ``{j != i : D[i, j] <= d_i}``.

    Every comparison is on the same float64 values as the dense path's, so the counts are its, integer
    for integer (``tests/test_mi_estimators.py`` checks it, ties included). When more than
    ``_PRUNE_DENSE`` of the pairs survive step 3 (raw pixels: ties, constant borders; untrained layers)
    it falls back to the dense matrix.
    """
    kept = np.flatnonzero(keep)
    n, d = len(kept), a.shape[1]
    x = a[kept]
    if d > 1:
        x = x[:, np.argsort(-x.var(axis=0), kind="stable")]
    position = np.empty(len(a), dtype=np.int64)
    position[kept] = np.arange(n)
    radius = np.empty(n)
    for idx in groups:
        rows = position[idx]
        # pdist computes each pair once; for a few coordinates SciPy's per-call overhead dominates and
        # the square cdist (the same values: fl(|a - b|) is symmetric) saves squareform's copy.
        block = cdist(x[rows], x[rows], "chebyshev") if d <= 32 else squareform(pdist(x[rows], "chebyshev"))
        np.fill_diagonal(block, np.inf)
        kk = int(k_c[idx[0]])
        radius[rows] = np.partition(block, kk - 1, axis=1)[:, kk - 1]

    order = np.argsort(x[:, 0], kind="stable")
    x, radius = x[order], radius[order]
    first = np.ascontiguousarray(x[:, 0])
    slack = 1e-9 * (np.abs(first) + radius)
    lo = np.searchsorted(first, first - radius - slack, "left")
    hi = np.searchsorted(first, first + radius + slack, "right")
    p0 = min(d, _PRUNE_FIRST)
    head = np.ascontiguousarray(x[:, :p0])
    exact = p0 == d
    counts = np.zeros(n, dtype=np.int64)
    found_rows: list[np.ndarray] = []
    found_cols: list[np.ndarray] = []
    survivors = 0
    for r0 in range(0, n, _SWEEP_ROWS):
        r1 = min(n, r0 + _SWEEP_ROWS)
        c0, c1 = int(lo[r0:r1].min()), int(hi[r0:r1].max())
        low = cdist(head[r0:r1], head[c0:c1], "chebyshev")
        low[np.arange(r1 - r0), np.arange(r0, r1) - c0] = np.inf  # never the point itself
        inside = low <= radius[r0:r1, None]
        if exact:
            counts[r0:r1] = np.count_nonzero(inside, axis=1)
            continue
        flat = np.flatnonzero(inside)
        survivors += len(flat)
        if survivors > _PRUNE_DENSE * n * r1:  # on course for more than _PRUNE_DENSE of all pairs: stop early
            # The dense matrix of the same (sorted, kept) samples; d_i is already known.
            counts = np.count_nonzero(pairwise_chebyshev(x) <= radius[:, None], axis=1)
            exact = True
            break
        i, j = np.divmod(flat, c1 - c0)
        found_rows.append(i + r0)
        found_cols.append(j + c0)
    if not exact:
        rows = np.concatenate(found_rows)
        cols = np.concatenate(found_cols)
        r_rows = radius[rows]
        columns = np.ascontiguousarray(x.T)  # one contiguous array per coordinate: 1-D gathers are fast
        f0, width = p0, 4
        while f0 < d and len(rows):
            f1 = min(d, f0 + width)
            worst = np.abs(columns[f0][rows] - columns[f0][cols])
            for f in range(f0 + 1, f1):
                np.maximum(worst, np.abs(columns[f][rows] - columns[f][cols]), out=worst)
            ok = worst <= r_rows
            rows, cols, r_rows = rows[ok], cols[ok], r_rows[ok]
            f0, width = f1, 2 * width
        counts = np.bincount(rows, minlength=n)
    m = np.empty(n, dtype=np.int64)
    m[order] = counts
    return m


def mi_continuous_discrete(
    t: Any,
    y: Any,
    k: int = 3,
    *,
    jitter: float = 1e-10,
    seed: int = 0,
    scale: bool = True,
    backend: str = "numpy",
    device: Any = None,
    workers: int = 1,
) -> float:
    r"""Ross's k-NN estimate of I(T; Y) for continuous ``T`` and discrete labels ``y``, in nats.

    .. math::
        \hat I = \psi(N) - \langle \psi(N_{y_i}) \rangle + \langle \psi(k_i) \rangle - \langle \psi(m_i) \rangle

    where ``d_i`` is the max-norm distance from ``t_i`` to its ``k_i``-th nearest neighbour with the same
    label, ``k_i = min(k, N_{y_i} - 1)``, and ``m_i = #{j != i : ||t_i - t_j|| <= d_i}`` over every label
    (so ``m_i >= k_i``: ties at ``d_i`` are all counted, as Ross defines it). Classes with a single
    sample are dropped and ``N`` recounted (as scikit-learn does). With perfectly separated classes the
    estimate tends to ``psi(N) - <psi(N_y)>`` ~ H(Y).

    Args:
        t: ``(n, ...)`` continuous values (flattened per sample).
        y: ``(n,)`` integer class labels (ints, bools or integral floats).
        k: neighbours (3, the scikit-learn and NPEET default: larger k lowers variance, adds bias).
        jitter, seed, scale: see :func:`prepare`.
        backend, device, workers: see :func:`pairwise_chebyshev`.

    Returns:
        The raw estimate (may be slightly negative).

    Example:
        >>> import numpy as np
        >>> y = np.arange(1000) % 2
        >>> t = np.random.default_rng(0).normal(4.0 * y, 1.0)  # two classes 4 sd apart
        >>> round(mi_continuous_discrete(t, y), 2)  # truth 0.633, sd ~0.01 over seeds
        0.65

    References:
        Ross, PLoS ONE 9(2) e87357 (2014).
    """
    labels = _as_labels(y)
    arr = prepare(t, jitter=jitter, seed=seed, stream=_STREAM_T, scale=scale, name="T")
    _check_lengths(arr, labels, ("T", "y"))
    k = _check_k(k, len(arr))
    n_c, k_c, keep, groups = _ross_groups(labels, k)
    if backend == "numpy" and workers == 1:
        # One thread on a CPU: rule pairs out instead of filling the n x n matrix (same counts).
        _check_backend(backend, workers)
        m = _ross_counts_pruned(arr, k_c, keep, groups)
    else:
        d = pairwise_chebyshev(arr, backend=backend, device=device, workers=workers)
        m = _ross_counts(d, n_c, k_c, keep, groups)
    return _ross_value(n_c[keep], k_c[keep], m)


def mi_continuous_discrete_reference(t: Any, y: Any, k: int = 3, *, jitter: float = 1e-10, seed: int = 0,
                                     scale: bool = True) -> float:
    """The same estimate as :func:`mi_continuous_discrete`, the slow obvious way: SciPy KD-trees.

    One tree per class for ``d_i`` (``query`` with ``k_i + 1`` neighbours: the point itself is the
    nearest at distance 0), one tree over every kept sample for ``m_i`` (``query_ball_point`` counts
    ``<= r`` and the point itself, hence ``- 1``). For tests and benchmarks only.
    """
    labels = _as_labels(y)
    arr = prepare(t, jitter=jitter, seed=seed, stream=_STREAM_T, scale=scale, name="T")
    _check_lengths(arr, labels, ("T", "y"))
    k = _check_k(k, len(arr))
    n_c, k_c, keep, groups = _ross_groups(labels, k)
    radius = np.empty(len(arr))
    for idx in groups:
        kk = int(k_c[idx[0]])
        dist, _ = cKDTree(arr[idx]).query(arr[idx], k=kk + 1, p=np.inf)
        radius[idx] = dist[:, kk]
    kept = arr[keep]
    m = cKDTree(kept).query_ball_point(kept, r=radius[keep], p=np.inf, return_length=True) - 1
    return _ross_value(n_c[keep], k_c[keep], np.asarray(m, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------
# KSG (continuous vs continuous)
# ----------------------------------------------------------------------------------------------------
def _ksg_value(k: int, n: int, nx: np.ndarray, ny: np.ndarray, algorithm: int) -> float:
    if algorithm == 1:
        return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))
    return float(digamma(k) - 1.0 / k + digamma(n) - np.mean(digamma(nx) + digamma(ny)))


def _ksg_counts(dx: Any, dy: Any, k: int, algorithm: int) -> tuple[np.ndarray, np.ndarray]:
    """Marginal neighbour counts n_x, n_y of KSG algorithm 1 or 2 from the two distance matrices."""
    is_torch = isinstance(dx, torch.Tensor)
    dz = torch.maximum(dx, dy) if is_torch else np.maximum(dx, dy)  # the joint max-norm
    if algorithm == 1:
        eps = _kth_smallest(dz, k)[:, None]
        nx, ny = (dx < eps).sum(1), (dy < eps).sum(1)  # strict: points inside the joint k-NN ball
    else:
        # The k joint neighbours; ties at the k-th distance go to the lowest index (stable sort), in
        # every implementation alike.
        if is_torch:
            nbrs = torch.sort(dz, dim=1, stable=True).indices[:, :k]
            ex = torch.gather(dx, 1, nbrs).max(1).values[:, None]
            ey = torch.gather(dy, 1, nbrs).max(1).values[:, None]
        else:
            nbrs = np.argsort(dz, axis=1, kind="stable")[:, :k]
            ex = np.take_along_axis(dx, nbrs, 1).max(1)[:, None]
            ey = np.take_along_axis(dy, nbrs, 1).max(1)[:, None]
        nx, ny = (dx <= ex).sum(1), (dy <= ey).sum(1)
    return _to_int_array(nx), _to_int_array(ny)


def _check_algorithm(algorithm: Any) -> int:
    if algorithm not in (1, 2) or isinstance(algorithm, bool):
        raise ValueError(f"algorithm must be 1 or 2 (KSG's two estimators), got {algorithm!r}")
    return int(algorithm)


def mi_continuous(
    t: Any,
    y: Any,
    k: int = 3,
    *,
    algorithm: int = 1,
    jitter: float = 1e-10,
    seed: int = 0,
    scale: bool = True,
    backend: str = "numpy",
    device: Any = None,
    workers: int = 1,
) -> float:
    r"""The KSG k-NN estimate of I(T; Y) for continuous ``T`` and ``Y``, in nats.

    Joint space ``Z = (T, Y)`` with ``||z - z'|| = max(||t - t'||, ||y - y'||)`` (max-norm everywhere).

    Algorithm 1 (default): ``eps_i`` is the distance to the k-th joint neighbour,
    ``n_t(i) = #{j != i : ||t_i - t_j|| < eps_i}`` (strict), ``n_y`` likewise, and

    .. math:: \hat I_1 = \psi(k) + \psi(N) - \langle \psi(n_t + 1) + \psi(n_y + 1) \rangle

    Algorithm 2: ``eps_t(i)``/``eps_y(i)`` are the largest marginal distances to the k joint neighbours,
    ``n_t(i) = #{j != i : ||t_i - t_j|| <= eps_t(i)}``, and

    .. math:: \hat I_2 = \psi(k) - 1/k + \psi(N) - \langle \psi(n_t) + \psi(n_y) \rangle

    Args:
        t, y: ``(n, ...)`` continuous values each (a 1-D array is one feature).
        k: neighbours (default 3).
        algorithm: ``1`` or ``2``.
        jitter, seed, scale: see :func:`prepare` (``t`` and ``y`` get independent noise streams).
        backend, device, workers: see :func:`pairwise_chebyshev`.

    Returns:
        The raw estimate (may be slightly negative). Symmetric: swapping ``t`` and ``y`` gives the same
        value whenever the jitter does not decide a tie.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal(1000)
        >>> y = 0.9 * x + np.sqrt(1 - 0.81) * rng.standard_normal(1000)
        >>> round(mi_continuous(x, y), 1)  # truth -0.5 ln(1 - 0.81) = 0.830
        0.8

    References:
        Kraskov, Stoegbauer & Grassberger, PRE 69, 066138 (2004), equations (8) and (9).
    """
    algorithm = _check_algorithm(algorithm)
    a = prepare(t, jitter=jitter, seed=seed, stream=_STREAM_T, scale=scale, name="T")
    b = prepare(y, jitter=jitter, seed=seed, stream=_STREAM_Y, scale=scale, name="Y")
    _check_lengths(a, b, ("T", "Y"))
    k = _check_k(k, len(a))
    dx = pairwise_chebyshev(a, backend=backend, device=device, workers=workers)
    dy = pairwise_chebyshev(b, backend=backend, device=device, workers=workers)
    nx, ny = _ksg_counts(dx, dy, k, algorithm)
    return _ksg_value(k, len(a), nx, ny, algorithm)


def mi_continuous_reference(t: Any, y: Any, k: int = 3, *, algorithm: int = 1, jitter: float = 1e-10,
                            seed: int = 0, scale: bool = True) -> float:
    """The same estimate as :func:`mi_continuous`, the slow obvious way: SciPy KD-trees.

    A max-norm tree on the joint ``hstack(t, y)`` (its max-norm is ``max(||t||, ||y||)``) for the k
    joint neighbours; marginal trees for the counts, with ``query_ball_point`` (which counts ``<= r``
    and the point itself) at ``nextafter(eps, -inf)`` for algorithm 1's strict inequality.
    For tests and benchmarks only.
    """
    algorithm = _check_algorithm(algorithm)
    a = prepare(t, jitter=jitter, seed=seed, stream=_STREAM_T, scale=scale, name="T")
    b = prepare(y, jitter=jitter, seed=seed, stream=_STREAM_Y, scale=scale, name="Y")
    _check_lengths(a, b, ("T", "Y"))
    k = _check_k(k, len(a))
    n = len(a)
    dist, idx = cKDTree(np.hstack([a, b])).query(np.hstack([a, b]), k=k + 1, p=np.inf)
    tree_a, tree_b = cKDTree(a), cKDTree(b)
    if algorithm == 1:
        # The largest float below eps; at eps == 0 it is negative and the ball is empty, self included.
        eps = np.nextafter(dist[:, k], -np.inf)
        nx = np.where(eps >= 0, tree_a.query_ball_point(a, r=eps, p=np.inf, return_length=True) - 1, 0)
        ny = np.where(eps >= 0, tree_b.query_ball_point(b, r=eps, p=np.inf, return_length=True) - 1, 0)
    else:
        ex, ey = np.empty(n), np.empty(n)
        for i in range(n):
            nbrs = [j for j in idx[i] if j != i][:k]
            ex[i] = max(np.abs(a[i] - a[j]).max() for j in nbrs)
            ey[i] = max(np.abs(b[i] - b[j]).max() for j in nbrs)
        nx = tree_a.query_ball_point(a, r=ex, p=np.inf, return_length=True) - 1
        ny = tree_b.query_ball_point(b, r=ey, p=np.inf, return_length=True) - 1
    return _ksg_value(k, n, np.asarray(nx, np.int64), np.asarray(ny, np.int64), algorithm)


# ----------------------------------------------------------------------------------------------------
# ceilings and ratios
# ----------------------------------------------------------------------------------------------------
def label_entropy(y: Any) -> float:
    r"""Plug-in entropy ``H(Y) = -sum_c p_c ln p_c`` of integer labels, in nats.

    For noise-free classification Y is a function of X, so I(X; Y) = H(Y): the exact DPI ceiling of
    any I(T; Y), and a sanity value beside a k-NN estimate of I(X; Y).

    Example:
        >>> round(label_entropy([0, 1, 2, 3] * 10), 4)  # ln 4
        1.3863
    """
    labels = _as_labels(y)
    if len(labels) == 0:
        raise ValueError("y is empty")
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mi_ratio(ity: float, ixy: float) -> float:
    """``clip(ity / ixy, 0, 1)``: the fraction of the ceiling reached, clamped (k-NN bias lets ITY > IXY).

    A ceiling ``<= 0`` (an estimate of "no information") makes any positive ITY saturate it: 1.
    """
    for name, v in (("ity", ity), ("ixy", ixy)):
        if not (isinstance(v, (int, float, np.floating)) and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if ity <= 0:
        return 0.0
    if ixy <= 0:
        return 1.0
    return float(min(1.0, ity / ixy))

