"""Fisher choices (empirical / sampled / true) against brute-force expectations over labels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf

D, C, N = 3, 4, 6
MODEL = nn.Dense(C)


def _logits(params, batch):
    return MODEL.apply(params, batch["x"])


def _loss(params, batch):
    logp = jax.nn.log_softmax(_logits(params, batch))
    return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))


def _setup():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(N, D))), "label": jnp.asarray(rng.integers(0, C, N))}
    params = MODEL.init(jax.random.PRNGKey(0), batch["x"])
    params = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape)), params)
    return params, batch


def _brute(params, batch):
    """Closed-form per-(example, label) gradients of the cross-entropy: a (x) (p - e_c)."""
    w, b = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    x = np.asarray(batch["x"])
    p = np.exp(x @ w + b)
    p /= p.sum(1, keepdims=True)
    a = np.concatenate([x, np.ones((N, 1))], axis=1)  # input features with the bias feature
    d = p[:, None, :] - np.eye(C)[None]  # [n, c (label), C (output)]
    # Full gradient, flattened as jax.tree orders {bias, kernel}: [bias (C), kernel (D*C)].
    g = np.concatenate([d, np.einsum("ni,nco->ncio", x, d).reshape(N, C, -1)], axis=2)
    return p, a, d, g


def test_true_fisher_equals_the_expectation_over_labels():
    params, batch = _setup()
    p, a, d, g = _brute(params, batch)
    f_true = np.einsum("nc,ncp,ncq->pq", p, g, g) / N
    rows = jaxinf.flatten_per_example(
        jaxinf.per_example_grads(_loss, params, batch, fisher="true", logits_fn=_logits)
    )
    assert rows.shape == (N * C, g.shape[2])
    # float64, one weighted outer-product sum: agreement to rounding.
    np.testing.assert_allclose(rows.T @ rows / rows.shape[0], f_true, rtol=1e-10, atol=1e-12)
    # KFAC/EKFAC of the true Fisher: S = 1/n sum_i sum_c p_ic d d^T, A unchanged.
    acts = jaxinf.dense_activations(_loss, params, batch, fisher="true", logits_fn=_logits)
    ((la, ld),) = acts.values()
    s_true = np.einsum("nc,nco,ncq->oq", p, d, d) / N
    np.testing.assert_allclose(
        np.einsum("nto,ntq->oq", ld, ld) / ld.shape[0], s_true, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        np.einsum("nti,ntj->ij", la, la) / la.shape[0], a.T @ a / N, rtol=1e-10
    )
    eb = jaxinf.kfac_eigenbasis(acts, ekfac=True)
    ((qa,), (qs,), (ev,)) = eb.q_in.values(), eb.q_out.values(), eb.eigenvalues.values()
    r = np.einsum("ij,ni,nco,ok->ncjk", np.asarray(qa), a, d, np.asarray(qs))
    np.testing.assert_allclose(ev, np.einsum("nc,ncjk->jk", p, r * r) / N, rtol=1e-9, atol=1e-12)
    # Empirical is unchanged: the batch as given, true labels.
    emp = jaxinf.flatten_per_example(jaxinf.per_example_grads(_loss, params, batch))
    y = np.asarray(batch["label"])
    np.testing.assert_allclose(emp, g[np.arange(N), y], rtol=1e-10, atol=1e-12)


def test_kfac_influence_with_true_fisher_equals_kronecker_brute_force():
    params, batch = _setup()
    p, a, d, _ = _brute(params, batch)
    fisher_acts = jaxinf.dense_activations(_loss, params, batch, fisher="true", logits_fn=_logits)
    acts = jaxinf.dense_activations(_loss, params, batch)
    scores = jaxinf.kfac_influence(acts, acts, eigenbasis=jaxinf.kfac_eigenbasis(fisher_acts))
    fa, fs = a.T @ a / N, np.einsum("nc,nco,ncq->oq", p, d, d) / N
    f = np.kron(fa, fs)  # layout of G[i, o] flattened i-major
    lam = 0.1 * np.trace(f) / f.shape[0]
    y = np.asarray(batch["label"])
    gv = np.einsum("ni,no->nio", a, d[np.arange(N), y]).reshape(N, -1)
    ref = gv @ np.linalg.solve(f + lam * np.eye(f.shape[0]), gv.T)
    np.testing.assert_allclose(scores, ref, rtol=1e-8, atol=1e-12)


def test_sampled_fisher_is_reproducible_by_key_and_converges_to_true():
    params, batch = _setup()
    p, _, _, g = _brute(params, batch)
    f_true = np.einsum("nc,ncp,ncq->pq", p, g, g) / N
    # E||F_S - F||_F^2 = 1/(n^2 S) sum_i (E_c ||g g^T||^2 - ||F_i||^2), exact from p.
    outer = np.einsum("ncp,ncq->ncpq", g, g)
    f_i = np.einsum("nc,ncpq->npq", p, outer)
    var = (np.einsum("nc,ncpq->n", p, outer**2) - np.sum(f_i**2, axis=(1, 2))).sum() / N**2
    # A tuple batch (x, y) with the labels at index 1 works the same way.
    tup = (batch["x"], batch["label"])

    def loss_t(prm, b):
        return _loss(prm, {"x": b[0], "label": b[1]})

    def logits_t(prm, b):
        return _logits(prm, {"x": b[0]})

    def sampled(key, samples):
        rows = jaxinf.per_example_grads(
            loss_t, params, tup, fisher="sampled", logits_fn=logits_t, key=key,
            samples=samples, labels=1,
        )  # fmt: skip
        rows = np.asarray(jaxinf.flatten_per_example(rows))
        return rows.T @ rows / rows.shape[0]

    k = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(sampled(k, 8), sampled(k, 8))
    assert not np.allclose(sampled(k, 8), sampled(jax.random.PRNGKey(4), 8))
    errs = {}
    for s in (16, 1024):
        errs[s] = float(np.sum((sampled(k, s) - f_true) ** 2))
        # Markov: P(err^2 > 20 E[err^2]) <= 5%; fixed keys make the check deterministic.
        assert errs[s] <= 20 * var / s, (s, errs[s], var / s)
    assert errs[1024] < errs[16] / 4


def test_fisher_batch_rows_and_errors():
    params, batch = _setup()
    rows, w = jaxinf.fisher_batch(_logits, params, batch, fisher="true")
    p = np.asarray(jax.nn.softmax(_logits(params, batch)))
    np.testing.assert_array_equal(rows["label"], np.tile(np.arange(C), N))
    np.testing.assert_array_equal(rows["x"], np.repeat(batch["x"], C, axis=0))
    np.testing.assert_allclose(np.asarray(w) ** 2, C * p.reshape(-1), rtol=1e-12)
    rows, w = jaxinf.fisher_batch(None, params, batch)
    assert rows is batch and np.all(np.asarray(w) == 1)
    with pytest.raises(ValueError, match="fisher must be one of"):
        jaxinf.fisher_batch(_logits, params, batch, fisher="exact")
    with pytest.raises(ValueError, match="explicit `key`"):
        jaxinf.fisher_batch(_logits, params, batch, fisher="sampled")
    with pytest.raises(ValueError, match="needs `logits_fn`"):
        jaxinf.fisher_batch(None, params, batch, fisher="true")
    with pytest.raises(ValueError, match="labels must be"):
        jaxinf.fisher_batch(_logits, params, batch, fisher="true", labels="y")


def test_kfac_factors_from_activations_match_the_streaming_factors():
    params, batch = _setup()
    cap = jaxinf.linen_capture(_loss)
    layers = jaxinf.find_layers(cap, params, batch)
    rows, w = jaxinf.fisher_batch(
        _logits, params, batch, fisher="sampled", key=jax.random.PRNGKey(1), samples=3
    )
    acc = jaxinf.kfac_factors(cap, layers, dtype=jnp.float64)
    stream = acc.finalize(acc.update(acc.init(None), (params, rows)))
    acts = jaxinf.dense_activations(
        _loss, params, batch, fisher="sampled", logits_fn=_logits, key=jax.random.PRNGKey(1),
        samples=3,
    )  # fmt: skip
    dense = jaxinf.kfac_factors_from_activations(acts)
    for path in layers:
        np.testing.assert_allclose(dense[path].forward, stream[path].forward, rtol=1e-10)
        np.testing.assert_allclose(dense[path].backward, stream[path].backward, rtol=1e-10)
