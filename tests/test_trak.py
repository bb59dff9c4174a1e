"""TRAK against a brute-force float64 implementation of its formula on a softmax model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf._src import baselines as bl

D, C, N_TR, N_TE, M, K = 4, 3, 12, 3, 3, 5


def _logits(params, batch):
    return batch["x"] @ params["w"] + params["b"]


def _data(seed, n):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, D)), "label": rng.integers(0, C, size=n)}


def _params(seed):
    rng = np.random.default_rng(100 + seed)
    return {"w": jnp.asarray(rng.normal(size=(D, C))), "b": jnp.asarray(rng.normal(size=C))}


def _brute_margin(params, batch):
    """Closed form: f = z_y - logsumexp_{c != y} z_c, df/dz = e_y - softmax_{c != y}(z)."""
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    grads, probs = [], []
    for x, y in zip(batch["x"], batch["label"]):
        z = x @ w + b
        q = np.exp(z - z.max())
        q[y] = 0.0
        q /= q.sum()
        dz = -q
        dz[y] += 1.0
        grads.append(np.concatenate([dz, np.outer(x, dz).ravel()]))  # leaves: b, then w
        probs.append(np.exp(z[y]) / np.exp(z).sum())
    return np.array(grads), np.array(probs)


V, T = 5, 4  # vocabulary (classes) and target tokens of the sequence model


def _lm_logits(params, batch):
    """A causal toy LM: token t's logits read the running mean of the embeddings up to t."""
    h = params["emb"][batch["x"]]  # [n, T, D]
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, T + 1)[None, :, None]
    return jnp.tanh(h) @ params["w"] + params["b"]


def _lm_data(seed, n):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=n)
    lengths[0] = T  # at least one unpadded row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    x, y = rng.integers(0, V, size=(n, T)), rng.integers(0, V, size=(n, T))
    return {"x": x * mask, "y": y * mask, "mask": mask}  # padding: token 0, mask 0


def _lm_params(seed):
    rng = np.random.default_rng(200 + seed)
    return {
        "emb": jnp.asarray(rng.normal(size=(V, D))),
        "w": jnp.asarray(rng.normal(size=(D, V))),
        "b": jnp.asarray(rng.normal(size=V)),
    }


@functools.partial(jax.jit, static_argnums=3)
def _brute_one_sequence(params, x, y, length):
    """jax.grad of one sequence's margin, written out over its first ``length`` (real) tokens.

    Each token's margin is ``z_y - log(sum_c exp z_c - exp z_y)`` (the others' sum by
    subtraction, another formula than the implementation's), and padding never enters.
    """

    q = jax.nn.softmax(_lm_logits(params, {"x": x[None]})[0][:length], axis=-1)
    p_true = q[jnp.arange(length), y[:length]]

    def f(p, weights):
        z = _lm_logits(p, {"x": x[None]})[0]
        total = 0.0
        for t in range(length):
            zy = z[t, y[t]]
            total = total + weights[t] * (zy - jnp.log(jnp.sum(jnp.exp(z[t])) - jnp.exp(zy)))
        return total

    plain = jax.grad(f)(params, jnp.ones(length))
    return plain, jnp.mean(p_true), jax.grad(f)(params, 1.0 - p_true)  # weights held constant


def _brute_sequence_margin(params, batch):
    flat = lambda g: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)])  # noqa: E731
    grads, probs, weighted = [], [], []
    for x, y, m in zip(batch["x"], batch["y"], batch["mask"]):
        g, p, gw = _brute_one_sequence(params, x, y, int(m.sum()))  # right padding
        grads.append(flat(g))
        probs.append(float(p))
        weighted.append(flat(gw))
    return np.array(grads), np.array(probs), np.array(weighted)


def test_sequence_margin_grads_match_brute_force_with_padding():
    params, batch = _lm_params(0), _lm_data(0, 5)
    assert batch["mask"].sum(1).min() < T  # some rows are padded
    g, p, gw = jaxinf.margin_grads(
        _lm_logits, params, batch, labels="y", mask="mask", weighted=True, chunk_size=4
    )
    g_ref, p_ref, gw_ref = _brute_sequence_margin(params, batch)
    # float64, the same sums in another order: agreement to rounding.
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(p, p_ref, rtol=1e-10)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-10, atol=1e-10)
    # Without a mask every token counts: the brute force over all T tokens.
    full = {**batch, "mask": np.ones_like(batch["mask"])}
    g_all, p_all = jaxinf.margin_grads(_lm_logits, params, full, labels="y")
    g_all_ref, p_all_ref, _ = _brute_sequence_margin(params, full)
    np.testing.assert_allclose(g_all, g_all_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(p_all, p_all_ref, rtol=1e-10)
    assert not np.allclose(g_all, g)  # the mask changed something


def test_token_weighted_margin_grads_are_the_negated_loss_gradient():
    # Per token, (1 - p_t) grad f_t = grad log p_t: weighting each token by its own 1 - p_t
    # turns the summed margin gradient into minus the gradient of the summed token loss.
    params, batch = _lm_params(1), _lm_data(1, 4)
    _, _, gw = jaxinf.margin_grads(
        _lm_logits, params, batch, labels="y", mask="mask", weighted=True
    )

    def summed_loss(p, b):
        logp = jax.nn.log_softmax(_lm_logits(p, b))
        nll = -jnp.take_along_axis(logp, b["y"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * b["mask"])

    g_loss = jaxinf.flatten_per_example(jaxinf.per_example_grads(summed_loss, params, batch))
    np.testing.assert_allclose(gw, -g_loss, rtol=1e-10, atol=1e-10)  # float64 identity
    # One label per example: the weighted rows are the paper's (1 - p) grad f.
    params_c, data = _params(0), _data(0, N_TR)
    g, p, gw_c = jaxinf.margin_grads(_logits, params_c, data, weighted=True)
    np.testing.assert_allclose(gw_c, (1.0 - p)[:, None] * g, rtol=1e-12, atol=1e-12)


def _brute_trak_weighted(te, tr, tr_weighted, projections):
    tau = 0.0
    for m in range(len(projections)):
        phi_te, phi_tr = te[m] @ projections[m], tr[m] @ projections[m]
        psi = tr_weighted[m] @ projections[m]
        tau = tau + phi_te @ np.linalg.inv(phi_tr.T @ phi_tr) @ psi.T / len(projections)
    return tau


def test_trak_with_token_weights_matches_brute_force_formula():
    train, test = _lm_data(2, 12), _lm_data(3, 3)
    te, tr, trw = [], [], []
    for m in range(2):
        opts = dict(labels="y", mask="mask")
        te.append(jaxinf.margin_grads(_lm_logits, _lm_params(m), test, **opts)[0])
        g, _, gw = jaxinf.margin_grads(_lm_logits, _lm_params(m), train, weighted=True, **opts)
        tr.append(g)
        trw.append(gw)
    te, tr, trw = np.stack(te), np.stack(tr), np.stack(trw)
    projections = np.random.default_rng(8).normal(size=(2, te.shape[2], K))
    got = jaxinf.trak(te, tr, train_weighted_grads=trw, projections=projections)
    # 5x5 Gram of 12 rows, float64: agreement to ~1e-9.
    np.testing.assert_allclose(
        got, _brute_trak_weighted(te, tr, trw, projections), rtol=1e-8, atol=1e-10
    )
    # One model with (1 - p) g as the weighted rows: the paper's estimator with train_probs.
    params, data = _params(0), _data(1, N_TR)
    g, p, gw = jaxinf.margin_grads(_logits, params, data, weighted=True)
    proj = projections[0, : g.shape[1]]
    np.testing.assert_allclose(
        jaxinf.trak(g[:3], g, train_weighted_grads=gw, projections=proj),
        jaxinf.trak(g[:3], g, p, projections=proj),
        rtol=1e-9,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="exactly one"):
        jaxinf.trak(g[:3], g, p, train_weighted_grads=gw, projections=proj)
    with pytest.raises(ValueError, match="exactly one"):
        jaxinf.trak(g[:3], g, projections=proj)
    with pytest.raises(ValueError, match="disagree"):
        jaxinf.trak(g[:3], g, train_weighted_grads=gw[:, :4], projections=proj)


def test_sequence_margin_grads_errors_name_the_problem():
    params, batch = _lm_params(0), _lm_data(0, 3)
    with pytest.raises(ValueError, match=r"mask batch\['mask'\] has shape \(3, 3\)"):
        jaxinf.margin_grads(
            _lm_logits, params, {**batch, "mask": batch["mask"][:, :3]}, labels="y", mask="mask"
        )
    with pytest.raises(ValueError, match="labels.shape \\+ \\(C,\\)"):
        jaxinf.margin_grads(_lm_logits, params, {**batch, "y": batch["y"][:, :3]}, labels="y")
    with pytest.raises(ValueError, match="labels must be batch"):
        jaxinf.margin_grads(_lm_logits, params, batch, labels="missing")


def _brute_trak(te, tr, pr, projections):
    n_te, n_tr = te.shape[1], tr.shape[1]
    tau = np.zeros((n_te, n_tr))
    for m in range(len(projections)):
        phi_te, phi_tr = te[m] @ projections[m], tr[m] @ projections[m]
        inv = np.linalg.inv(phi_tr.T @ phi_tr)
        for i in range(n_te):
            for j in range(n_tr):
                tau[i, j] += phi_te[i] @ inv @ phi_tr[j] / len(projections)
    return tau * np.mean(1.0 - pr, axis=0)[None, :]


def test_margin_grads_match_closed_form_and_sigmoid_of_margin_is_p():
    params, batch = _params(0), _data(0, N_TR)
    g, p = jaxinf.margin_grads(_logits, params, batch)
    g_ref, p_ref = _brute_margin(params, batch)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)  # float64, exact formula
    np.testing.assert_allclose(p, p_ref, rtol=1e-12)


def test_trak_ensemble_matches_brute_force_formula():
    train, test = _data(1, N_TR), _data(2, N_TE)
    feats = [
        (
            jaxinf.margin_grads(_logits, _params(m), test),
            jaxinf.margin_grads(_logits, _params(m), train),
        )
        for m in range(M)
    ]
    te = np.stack([np.asarray(f[0][0]) for f in feats])
    tr = np.stack([np.asarray(f[1][0]) for f in feats])
    pr = np.stack([np.asarray(f[1][1]) for f in feats])
    rng = np.random.default_rng(3)
    projections = rng.normal(size=(M, te.shape[2], K))
    ref = _brute_trak(te, tr, pr, projections)
    # Inverse of a 5x5 Gram of 12 rows: well conditioned, float64 agreement to ~1e-9.
    got = jaxinf.trak(te, tr, pr, projections=projections)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    # One model: 2-D inputs mean M = 1.
    np.testing.assert_allclose(
        jaxinf.trak(te[0], tr[0], pr[0], projections=projections[0]),
        _brute_trak(te[:1], tr[:1], pr[:1], projections[:1]),
        rtol=1e-8,
        atol=1e-10,
    )
    # Fresh projections by key are reproducible and jit-able.
    key = jax.random.PRNGKey(4)
    a = jaxinf.trak(te, tr, pr, dim=K, key=key)
    b = jax.jit(lambda *x: jaxinf.trak(*x, dim=K, key=key))(te, tr, pr)
    np.testing.assert_allclose(a, b, rtol=1e-10)
    assert a.shape == (N_TE, N_TR) and not np.allclose(a, ref)


def test_trak_damping_and_shape_errors():
    rng = np.random.default_rng(5)
    te, tr, pr = rng.normal(size=(2, 6)), rng.normal(size=(8, 6)), rng.uniform(size=8)
    p = rng.normal(size=(6, 4))
    phi_te, phi_tr = te @ p, tr @ p
    gram = phi_tr.T @ phi_tr
    lam = 0.3 * np.trace(gram) / 4
    ref = phi_te @ np.linalg.solve(gram + lam * np.eye(4), phi_tr.T) * (1 - pr)[None]
    got = jaxinf.trak(te, tr, pr, projections=p, damping_ratio=0.3)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="projections"):
        jaxinf.trak(te, tr, pr)
    with pytest.raises(ValueError, match="disagree"):
        jaxinf.trak(te, tr, pr[:5], projections=p)


def test_projected_influence_is_the_renamed_random_projection_influence():
    rng = np.random.default_rng(6)
    te, tr = rng.normal(size=(3, 6)), rng.normal(size=(15, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    # An orthogonal projection keeps the spectrum: projected influence = exact influence.
    np.testing.assert_allclose(
        bl.projected_influence(te, tr, projection=q), bl.exact_influence(te, tr), rtol=1e-9
    )


def test_ensemble_scores_sum_and_mean():
    rng = np.random.default_rng(7)
    mats = [rng.normal(size=(2, 5)) for _ in range(3)]
    np.testing.assert_allclose(jaxinf.ensemble_scores(mats), np.mean(mats, axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        jaxinf.ensemble_scores(mats, reduce="sum"), np.sum(mats, axis=0), rtol=1e-12
    )
    with pytest.raises(ValueError, match="one shape"):
        jaxinf.ensemble_scores([mats[0], mats[1][:, :3]])
    with pytest.raises(ValueError, match="reduce"):
        jaxinf.ensemble_scores(mats, reduce="max")
