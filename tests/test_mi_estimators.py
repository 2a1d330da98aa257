"""k-NN MI estimators against closed forms (research note mi.md, section 6), the cKDTree reference and
their documented behaviour on ties, scale, dtypes and bad input.

Tolerances are about 3x the standard deviation measured over seeds at n = 1000, k = 3 (mi.md).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from lrpilot.estimators import mi
from lrpilot.estimators.mi import (
    label_entropy,
    mi_continuous,
    mi_continuous_discrete,
    mi_continuous_discrete_reference,
    mi_continuous_reference,
    mi_ratio,
    pairwise_chebyshev,
    prepare,
)

N = 1000


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gaussian_pair(rho: float, d: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    x = rng.standard_normal((N, d))
    y = rho * x + np.sqrt(1 - rho**2) * rng.standard_normal((N, d))
    return x, y


@lru_cache(maxsize=None)
def _two_class_truth(delta: float) -> float:
    """I(T; Y) for T ~ N(+-delta/2, 1), balanced: h(mixture) - h(N(0, 1))."""

    def p(t: float) -> float:
        return 0.5 * (norm.pdf(t, -delta / 2) + norm.pdf(t, delta / 2))

    h_mix, _ = quad(lambda t: -p(t) * np.log(p(t)) if p(t) > 0 else 0.0, -delta / 2 - 12, delta / 2 + 12, limit=200)
    return h_mix - 0.5 * np.log(2 * np.pi * np.e)


@lru_cache(maxsize=None)
def _ten_class_truth(delta: float, samples: int = 200_000) -> float:
    """I(T; Y) for 10 balanced classes T ~ N(c * delta, 1): a Monte-Carlo estimate of E[ln p(t|y) / p(t)]."""
    rng = _rng(99)
    y = rng.integers(0, 10, samples)
    t = y * delta + rng.standard_normal(samples)
    dens = norm.pdf(t[:, None], np.arange(10)[None, :] * delta, 1.0)
    return float(np.mean(np.log(dens[np.arange(samples), y] / dens.mean(axis=1))))


# ----------------------------------------------------------------------------------------------------
# KSG: Gaussians (mi.md cases 1-5)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_independent_gaussians_give_zero(algorithm):
    x, y = _gaussian_pair(0.0)
    assert abs(mi_continuous(x, y, algorithm=algorithm)) < 0.08


@pytest.mark.parametrize(("rho", "tol"), [(0.5, 0.10), (0.9, 0.10), (0.99, 0.12)])
@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_correlated_gaussians_match_the_closed_form(rho, tol, algorithm):
    x, y = _gaussian_pair(rho, seed=1)
    truth = -0.5 * np.log(1 - rho**2)
    assert mi_continuous(x, y, algorithm=algorithm) == pytest.approx(truth, abs=tol)


def test_ksg_two_dimensional_gaussians_mean_of_three_seeds():
    truth = -np.log(1 - 0.25)  # two components with rho = 0.5 each
    values = [mi_continuous(*_gaussian_pair(0.5, d=2, seed=s)) for s in range(3)]
    assert np.mean(values) == pytest.approx(truth, abs=0.08)


def test_ksg_independent_ten_dimensional_gaussians_give_zero():
    x, y = _gaussian_pair(0.0, d=10, seed=2)
    assert abs(mi_continuous(x, y)) < 0.08


def test_ksg_documented_bias_in_five_dimensions():
    """R^5 x R^5 with rho = 0.5 per component: truth 0.719, KSG reads low (mi.md section 3)."""
    x, y = _gaussian_pair(0.5, d=5, seed=3)
    assert 0.35 < mi_continuous(x, y) < 0.72


# ----------------------------------------------------------------------------------------------------
# Ross: mixtures and independence (mi.md cases 6-8)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("delta", "tol"), [(1, 0.07), (2, 0.07), (4, 0.04), (8, 0.005)])
def test_ross_two_class_mixture_matches_the_integral(delta, tol):
    rng = _rng(4)
    y = np.arange(N) % 2
    t = rng.normal(delta * (y - 0.5), 1.0)
    assert mi_continuous_discrete(t, y) == pytest.approx(_two_class_truth(delta), abs=tol)


@pytest.mark.parametrize(("delta", "tol"), [(1, 0.10), (3, 0.06), (10, 0.01)])
def test_ross_ten_class_mixture_matches_monte_carlo(delta, tol):
    rng = _rng(5)
    y = np.arange(N) % 10
    t = y * delta + rng.standard_normal(N)
    assert mi_continuous_discrete(t, y) == pytest.approx(_ten_class_truth(delta), abs=tol)


def test_two_class_truths_are_the_ones_in_the_note():
    for delta, truth in [(1, 0.1114), (2, 0.3368), (4, 0.6327), (8, 0.6931)]:
        assert _two_class_truth(delta) == pytest.approx(truth, abs=1e-4)


@pytest.mark.parametrize("d", [1, 10, 100])
def test_ross_random_labels_give_zero(d):
    rng = _rng(6)
    assert abs(mi_continuous_discrete(rng.standard_normal((N, d)), rng.integers(0, 10, N))) < 0.08


@pytest.mark.slow
@pytest.mark.parametrize("d", [784, 3072])
def test_ross_random_labels_give_zero_in_high_dimensions(d):
    rng = _rng(7)
    assert abs(mi_continuous_discrete(rng.standard_normal((N, d)), rng.integers(0, 10, N))) < 0.08


@pytest.mark.slow
def test_ksg_independence_in_high_dimensions():
    rng = _rng(8)
    assert abs(mi_continuous(rng.standard_normal((N, 3072)), rng.standard_normal((N, 10)))) < 0.08


# ----------------------------------------------------------------------------------------------------
# ties, scale, dtype (mi.md cases 9-11, 15)
# ----------------------------------------------------------------------------------------------------
def test_constant_activations_carry_no_information():
    """Without jitter the duplicates break the estimator (-3.68 with Ross's <=); with it, ~0."""
    y = _rng(9).integers(0, 10, N)
    t = np.ones((N, 5))
    assert abs(mi_continuous_discrete(t, y)) < 0.08
    assert mi_continuous_discrete(t, y, jitter=0) < -3.0


def test_one_hot_of_the_labels_reaches_the_label_entropy_term():
    from scipy.special import digamma

    y = _rng(10).integers(0, 10, N)
    counts = np.bincount(y)
    expected = digamma(N) - np.mean(digamma(counts[y]))
    assert mi_continuous_discrete(np.eye(10)[y], y) == pytest.approx(expected, abs=0.01)
    assert expected == pytest.approx(label_entropy(y), abs=0.02)


def test_large_constant_values_are_jittered_relative_to_their_magnitude():
    y = _rng(11).integers(0, 10, N)
    assert abs(mi_continuous_discrete(np.full((N, 1), 1e6), y)) < 0.08


def test_float32_input_is_upcast_before_the_jitter():
    rng = _rng(12)
    y = rng.integers(0, 3, N)
    t32 = (rng.standard_normal((N, 4)) + y[:, None]).astype(np.float32)
    assert mi_continuous_discrete(t32, y) == mi_continuous_discrete(t32.astype(np.float64), y)
    assert mi_continuous_discrete(torch.from_numpy(t32), torch.from_numpy(y)) == mi_continuous_discrete(t32, y)


def test_prepare_is_seeded_scaled_and_float64():
    a = prepare(np.arange(12, dtype=np.float32).reshape(3, 2, 2), seed=3)
    assert a.dtype == np.float64 and a.shape == (3, 4)
    assert np.array_equal(a, prepare(np.arange(12).reshape(3, 4), seed=3))
    assert not np.array_equal(a, prepare(np.arange(12).reshape(3, 4), seed=4))
    assert np.allclose(a, np.arange(12).reshape(3, 4) / np.arange(12).std(), atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# invariances and monotonicity (mi.md cases 13, 14)
# ----------------------------------------------------------------------------------------------------
def test_relabelling_classes_changes_nothing():
    rng = _rng(13)
    y = rng.integers(0, 5, N)
    t = rng.standard_normal((N, 3)) + y[:, None]
    perm = np.array([3, 0, 4, 1, 2])
    assert mi_continuous_discrete(t, perm[y]) == mi_continuous_discrete(t, y)


@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_is_symmetric(algorithm):
    x, y = _gaussian_pair(0.7, d=2, seed=14)
    assert mi_continuous(x, y, algorithm=algorithm) == mi_continuous(y, x, algorithm=algorithm)


def test_rescaling_the_input_changes_nothing():
    rng = _rng(15)
    y = rng.integers(0, 4, N)
    t = rng.standard_normal((N, 3)) + y[:, None]
    assert mi_continuous_discrete(1e3 * t, y) == pytest.approx(mi_continuous_discrete(t, y), abs=1e-9)
    x2 = rng.standard_normal(N)
    assert mi_continuous(1e3 * t, x2) == pytest.approx(mi_continuous(t, x2), abs=1e-9)


def test_ity_of_logits_grows_with_their_signal_up_to_ln_10():
    rng = _rng(16)
    y = rng.integers(0, 10, N)
    noise = rng.standard_normal((N, 10))
    values = [mi_continuous_discrete(a * np.eye(10)[y] + noise, y) for a in (0, 1, 2, 4, 8)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(np.log(10), abs=0.01)


# ----------------------------------------------------------------------------------------------------
# fast path == reference == torch backend (mi.md case 12), exactly
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 10, 40])
def test_ross_fast_equals_the_kdtree_reference_and_the_torch_backend(d):
    rng = _rng(17 + d)
    y = rng.integers(0, 7, 600)
    y[:3] = 99  # a singleton class (dropped) and classes with fewer than k + 1 samples
    y[3:5] = 98
    t = rng.standard_normal((600, d)) + 0.5 * y[:, None] % 3
    fast = mi_continuous_discrete(t, y)
    assert fast == mi_continuous_discrete_reference(t, y)
    assert fast == mi_continuous_discrete(t, y, backend="torch")
    assert fast == mi_continuous_discrete(t, y, workers=3)


@pytest.mark.parametrize("algorithm", [1, 2])
@pytest.mark.parametrize(("dx", "dy"), [(1, 1), (10, 10), (30, 2)])
def test_ksg_fast_equals_the_kdtree_reference_and_the_torch_backend(algorithm, dx, dy):
    rng = _rng(18)
    x = rng.standard_normal((500, dx))
    y = 0.6 * x[:, :dy] + rng.standard_normal((500, dy))
    fast = mi_continuous(x, y, algorithm=algorithm)
    assert fast == mi_continuous_reference(x, y, algorithm=algorithm)
    assert fast == mi_continuous(x, y, algorithm=algorithm, backend="torch")


def test_quantised_data_with_exact_ties_agree_across_implementations():
    """Ties at the k-th distance resolved by the exact inequalities, identically everywhere (no jitter)."""
    rng = _rng(19)
    t = rng.integers(0, 4, (400, 3)).astype(float)
    y = rng.integers(0, 3, 400)
    x = rng.integers(0, 3, (400, 1)).astype(float)
    assert mi_continuous_discrete(t, y, jitter=0) == mi_continuous_discrete_reference(t, y, jitter=0)
    assert mi_continuous_discrete(t, y, jitter=0) == mi_continuous_discrete(t, y, jitter=0, backend="torch")
    assert mi_continuous(t, x, jitter=0) == mi_continuous_reference(t, x, jitter=0)


def test_chebyshev_matrix_is_exact_and_the_same_on_every_path():
    a = prepare(_rng(20).standard_normal((300, 17)))
    dense = np.abs(a[:, None, :] - a[None, :, :]).max(axis=2)
    np.fill_diagonal(dense, np.inf)
    assert np.array_equal(pairwise_chebyshev(a), dense)
    assert np.array_equal(pairwise_chebyshev(a, workers=2), dense)
    assert np.array_equal(pairwise_chebyshev(a, backend="torch").numpy(), dense)


# ----------------------------------------------------------------------------------------------------
# the default CPU path (pruned Ross counts, cached jitter) against the dense matrix
# ----------------------------------------------------------------------------------------------------
def _clustered(n: int, d: int, classes: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Class means plus unit noise: activations-like data on which the pruning does rule pairs out."""
    rng = _rng(seed)
    y = rng.integers(0, classes, n)
    return rng.standard_normal((classes, d))[y] * spread + rng.standard_normal((n, d)), y


def _dense_counts(a: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    n_c, k_c, keep, groups = mi._ross_groups(y, k)
    return mi._ross_counts(pairwise_chebyshev(a), n_c, k_c, keep, groups)


def _pruned_counts(a: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    _, k_c, keep, groups = mi._ross_groups(y, k)
    return mi._ross_counts_pruned(a, k_c, keep, groups)


# Ross estimates computed by the code before the pruned path (commit 8b3696f, dense pdist matrix): the
# default path must still return these floats exactly (the published mi-decay runs depend on them).
_BEFORE = {
    ("clustered", 3, 3): 0.6513460364101573,
    ("clustered", 10, 3): 1.7459882163587246,
    ("clustered", 40, 3): 2.285321589644399,
    ("clustered", 100, 3): 2.299334091199669,
    ("ties", 24, 3): -1.7522177372984498,
    ("clustered-0.3", 300, 5): 0.9734581651558392,
}


@pytest.mark.parametrize(("case", "d", "k"), list(_BEFORE))
def test_default_path_returns_the_estimates_of_the_dense_code_exactly(case, d, k):
    if case == "ties":  # integer data, no jitter: exact ties at the k-th distance everywhere
        rng = _rng(5)
        t, y = rng.integers(0, 4, (600, d)).astype(float), rng.integers(0, 5, 600)
        assert mi_continuous_discrete(t, y, k=k, jitter=0) == _BEFORE[(case, d, k)]
    else:
        t, y = _clustered(1000, d, 10, 7 if d == 300 else d, spread=0.3 if d == 300 else 1.0)
        assert mi_continuous_discrete(t, y, k=k) == _BEFORE[(case, d, k)]


@pytest.mark.parametrize("d", [1, 2, 10, 16, 17, 40, 130])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_pruned_counts_equal_the_dense_counts(d, k):
    t, y = _clustered(500, d, 7, seed=d + k, spread=0.7)
    y[:3] = [90, 91, 92]  # singleton classes: dropped, and not counted as anyone's neighbour
    y[3:5] = 93  # a class of two: k_c = 1
    a = prepare(t, seed=k)
    assert np.array_equal(_pruned_counts(a, y, k), _dense_counts(a, y, k))


@pytest.mark.parametrize("d", [3, 24])
def test_pruned_counts_equal_the_dense_counts_on_exact_ties(d):
    rng = _rng(d)
    a = prepare(rng.integers(0, 3, (400, d)).astype(float), jitter=0)  # many pairs exactly at d_i
    y = rng.integers(0, 4, 400)
    assert np.array_equal(_pruned_counts(a, y, 3), _dense_counts(a, y, 3))


@pytest.mark.parametrize(("first", "dense", "rows"), [(1, 1.0, 7), (4, 1.0, 1000), (16, 0.0, 64), (2, 0.001, 33)])
def test_every_pruning_setting_gives_the_dense_counts(monkeypatch, first, dense, rows):
    """The knobs change only the work: a one-coordinate first pass, blocks that do not divide n, and
    the fallback to the dense matrix (dense=0: always; 0.001: after the first block)."""
    monkeypatch.setattr(mi, "_PRUNE_FIRST", first)
    monkeypatch.setattr(mi, "_PRUNE_DENSE", dense)
    monkeypatch.setattr(mi, "_SWEEP_ROWS", rows)
    t, y = _clustered(700, 60, 10, seed=first, spread=0.5)
    a = prepare(t)
    assert np.array_equal(_pruned_counts(a, y, 3), _dense_counts(a, y, 3))


def test_label_groups_are_cached_by_value_and_read_only():
    y = np.array([0, 1, 1, 2, 2, 2, 7])
    first = mi._ross_groups(y, 3)
    assert mi._ross_groups(y.copy(), 3) is first  # the same labels (a new array): the same groups
    n_c, k_c, keep, groups = first
    assert n_c.tolist() == [1, 2, 2, 3, 3, 3, 1] and k_c.tolist() == [0, 1, 1, 2, 2, 2, 0]
    assert keep.tolist() == [False, True, True, True, True, True, False]
    assert [g.tolist() for g in groups] == [[1, 2], [3, 4, 5]]
    assert not any(a.flags.writeable for a in (n_c, k_c, keep, *groups))
    assert mi._ross_groups(y, 1)[1].tolist() == [0, 1, 1, 1, 1, 1, 0]  # k is part of the key
    y[0] = 1
    assert mi._ross_groups(y, 3)[0].tolist() == [3, 3, 3, 3, 3, 3, 1]  # new labels, new groups


def test_jitter_draw_is_cached_read_only_and_equal_to_a_fresh_one():
    fresh = np.random.default_rng([11, 0]).standard_normal((50, 7))
    first = mi._standard_normal(11, 0, (50, 7))
    assert np.array_equal(first, fresh) and not first.flags.writeable
    assert mi._standard_normal(11, 0, (50, 7)) is first  # the same draw again, not a new one
    assert not np.array_equal(mi._standard_normal(11, 1, (50, 7)), fresh)  # another stream, another draw
    t = _rng(3).standard_normal((50, 7))
    manual = t / t.std()
    manual += 1e-10 * max(1.0, float(np.abs(manual).mean())) * fresh
    assert np.array_equal(prepare(t, seed=11), manual)
    assert np.array_equal(prepare(torch.as_tensor(t), seed=11), manual)  # tensors: one copy, same values


# ----------------------------------------------------------------------------------------------------
# ceilings, ratio, bad input
# ----------------------------------------------------------------------------------------------------
def test_label_entropy_and_ratio():
    assert label_entropy([0, 0, 1, 1]) == pytest.approx(np.log(2))
    assert label_entropy(np.zeros(5, dtype=int)) == 0.0
    assert mi_ratio(1.0, 2.0) == 0.5
    assert mi_ratio(2.5, 2.0) == 1.0  # k-NN bias: ITY above IXY is clamped
    assert mi_ratio(-0.01, 2.0) == 0.0
    assert mi_ratio(0.3, 0.0) == 1.0


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: mi_continuous_discrete(np.zeros((3, 2)), [0, 1, 0]), r"n=3 samples for k=3"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), [0, 1] * 4), r"10 samples but y has 8"),
        (lambda: mi_continuous_discrete(np.full((10, 2), np.nan), [0, 1] * 5), r"NaN or inf"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), np.linspace(0, 1, 10)), r"integer class labels.*mi_continuous"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), np.arange(10)), r"every class label occurs once"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), [0, 1] * 5, k=0), r"k must be a positive integer"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), [0, 1] * 5, backend="jax"), r"backend must be one of"),
        (lambda: mi_continuous_discrete(np.zeros((10, 2)), [0, 1] * 5, jitter=-1), r"jitter must be"),
        (lambda: mi_continuous(np.zeros((10, 2)), np.zeros(10), algorithm=3), r"algorithm must be 1 or 2"),
        (lambda: mi_continuous(np.zeros((10, 2)), np.zeros(9)), r"T has 10 samples but Y has 9"),
        (lambda: mi_continuous(np.array(["a"] * 10), np.zeros(10)), r"T must be numeric"),
        (lambda: mi_ratio(float("nan"), 1.0), r"ity must be a finite number"),
    ],
)
def test_bad_input_raises_an_error_naming_the_problem(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
