import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxinf._src import evaluate as ev


def test_rankdata_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    np.testing.assert_array_equal(ev.rankdata(x), scipy.stats.rankdata(x))
    a = rng.integers(0, 6, size=(30, 7)).astype(float)
    b = a + rng.normal(size=(30, 7))
    ref = np.array([scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(7)])
    # Same formula (Pearson of mean ranks) in float64: agreement to rounding.
    np.testing.assert_allclose(ev.spearman(a, b, axis=0), ref, rtol=1e-12)
    np.testing.assert_allclose(ev.spearman(a.T, b.T, axis=1), ref, rtol=1e-12)
    assert ev.spearman(a[:, 0], b[:, 0]) == pytest.approx(ref[0], rel=1e-12)
    assert np.isnan(ev.spearman(np.ones(5), np.arange(5.0)))


def test_random_subsets_are_exact_halves_and_seeded():
    m = ev.random_subsets(11, 6, seed=3)
    assert m.shape == (6, 11) and (m.sum(1) == 6).all()
    np.testing.assert_array_equal(m, ev.random_subsets(11, 6, seed=3))
    with pytest.raises(ValueError, match="fraction"):
        ev.random_subsets(10, 2, fraction=1.0)


def test_lds_of_perfect_linear_datamodel_is_one_and_of_random_scores_is_near_zero():
    rng = np.random.default_rng(1)
    n_train, n_test, m = 40, 30, 200
    scores = rng.normal(size=(n_test, n_train))
    masks = ev.random_subsets(n_train, m, seed=0)
    outputs = masks @ scores.T + 3.0  # exactly additive (offset does not change ranks)
    res = ev.lds(scores, masks, outputs)
    assert res.score == pytest.approx(1.0, abs=1e-12)
    assert res.ci_low == pytest.approx(1.0, abs=1e-12)
    # Seed axis is averaged: a [M, S, n_test] input with identical seeds gives the same.
    assert ev.lds(scores, masks, np.stack([outputs, outputs], 1)).score == pytest.approx(
        1.0, abs=1e-12
    )
    rand = ev.lds(rng.normal(size=(n_test, n_train)), masks, outputs)
    # Per-test rho of independent rankings has sd ~ 1/sqrt(M) = 0.07; the mean of 30 ~ 0.013.
    assert abs(rand.score) < 0.06
    assert rand.ci_low < 0 < rand.ci_high


def test_lds_models_gives_per_model_lds_mean_and_std_of_additive_models():
    rng = np.random.default_rng(4)
    n_train, n_test, m = 30, 12, 80
    true = rng.normal(size=(n_test, n_train))
    masks = ev.random_subsets(n_train, m, seed=1)
    outputs = masks @ true.T  # exactly additive ground truth, float64
    # Known per-model LDS: the true scores (+1), their negation (-1), a positive rescaling (+1).
    stack = np.stack([true, -true, 2.5 * true])
    res = ev.lds_models(stack, masks, outputs)
    np.testing.assert_allclose(res.per_model, [1.0, -1.0, 1.0], atol=1e-12)
    assert res.mean == pytest.approx(1.0 / 3.0, abs=1e-12)
    assert res.std == pytest.approx(np.sqrt(4.0 / 3.0), abs=1e-12)  # sample std (ddof=1)
    assert ev.lds_models(stack, masks, outputs, ddof=0).std == pytest.approx(
        np.sqrt(8.0 / 9.0), abs=1e-12
    )
    # Noisy models: each per-model LDS equals lds() on that model and a SciPy reference.
    noisy = [true + s * rng.normal(size=true.shape) for s in (0.5, 1.0, 2.0, 4.0)]
    res = ev.lds_models(noisy, masks, np.stack([outputs, outputs + 1.0], 1))
    ref = [
        np.mean(
            [scipy.stats.spearmanr(masks @ s[i], outputs[:, i]).statistic for i in range(n_test)]
        )
        for s in noisy
    ]
    np.testing.assert_allclose(res.per_model, ref, rtol=1e-12)
    for r, s in zip(res.results, noisy):
        assert r.score == ev.lds(s, masks, outputs).score
    assert res.per_model[0] > res.per_model[-1]  # more noise, lower LDS
    assert res.mean == pytest.approx(np.mean(ref), rel=1e-12)
    assert res.std == pytest.approx(np.std(ref, ddof=1), rel=1e-12)
    # One model: std is undefined with ddof=1.
    one = ev.lds_models(true[None], masks, outputs)
    assert one.mean == pytest.approx(1.0, abs=1e-12) and np.isnan(one.std)
    with pytest.raises(ValueError, match="lds_models"):
        ev.lds(stack, masks, outputs)
    with pytest.raises(ValueError, match="n_models"):
        ev.lds_models(true, masks, outputs)  # a single 2-D matrix is not a stack


def test_retrain_vmaps_over_masks_and_seeds_reproducibly():
    rng = np.random.default_rng(2)
    n, d = 12, 3
    x = jnp.asarray(rng.normal(size=(n, d)))
    y = jnp.asarray(rng.normal(size=n))
    x_test = jnp.asarray(rng.normal(size=(4, d)))

    def init_fn(key):
        return jax.random.normal(key, (d,)) * 0.0

    def train_fn(w0, weights, key):
        # Weighted ridge regression in closed form, plus a key-dependent shift so seeds differ.
        a = x.T @ (weights[:, None] * x) + 0.1 * jnp.eye(d)
        return w0 + jnp.linalg.solve(a, x.T @ (weights * y)) + 1e-3 * jax.random.normal(key, (d,))

    def output_fn(w):
        return x_test @ w

    masks = ev.random_subsets(n, 5, seed=0)
    out = ev.retrain(init_fn, train_fn, output_fn, masks, num_seeds=2, seed=7, progress=False)
    assert out.shape == (5, 2, 4)
    again = ev.retrain(
        init_fn, train_fn, output_fn, masks, num_seeds=2, seed=7, chunk_size=2, progress=False
    )
    # Keys depend only on (seed, mask index, seed index), not on chunking.
    np.testing.assert_allclose(out, again, rtol=1e-10, atol=1e-12)
    for mi in range(5):
        w = masks[mi].astype(float)
        a = np.asarray(x).T @ (w[:, None] * np.asarray(x)) + 0.1 * np.eye(d)
        ref = np.asarray(x_test) @ np.linalg.solve(a, np.asarray(x).T @ (w * np.asarray(y)))
        # The 1e-3-scale seeded noise is the only difference from the direct solve.
        np.testing.assert_allclose(out[mi].mean(0), ref, atol=1e-2)
    assert not np.allclose(out[:, 0], out[:, 1])


def test_brittleness_counts_flips_of_an_additive_model():
    rng = np.random.default_rng(3)
    n_train, n_test = 20, 6
    contrib = rng.uniform(0.0, 1.0, size=(n_test, n_train))
    thresh = (
        contrib.sum(1) - 2.5
    )  # output = sum of kept contributions - thresh: flips once > 2.5 removed
    c, t = jnp.asarray(contrib), jnp.asarray(thresh)

    def init_fn(key):
        return jnp.zeros(n_train)

    def train_fn(p, weights, key):
        return p + weights

    def output_fn(p):
        return c @ p - t

    res = ev.brittleness(
        contrib,
        [0, 2, 5],
        [0, 3, 10],
        init_fn=init_fn,
        train_fn=train_fn,
        output_fn=output_fn,
        num_seeds=2,
        progress=False,
    )
    top = -np.sort(-contrib[[0, 2, 5]], axis=1)
    expect = np.stack([2.5 - top[:, :k].sum(1) for k in (0, 3, 10)])
    np.testing.assert_allclose(res.outputs[..., 0], expect, rtol=1e-12)
    np.testing.assert_allclose(res.flip_fraction, (expect < 0).mean(1))
    assert res.flip_fraction[0] == 0 and res.flip_fraction[-1] == 1
