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

    def f(p):
        z = _lm_logits(p, {"x": x[None]})[0]
        total = 0.0
        for t in range(length):
            zy = z[t, y[t]]
            total = total + zy - jnp.log(jnp.sum(jnp.exp(z[t])) - jnp.exp(zy))
        return total

    q = jax.nn.softmax(_lm_logits(params, {"x": x[None]})[0][:length], axis=-1)
    return jax.grad(f)(params), jnp.mean(q[jnp.arange(length), y[:length]])


def _brute_sequence_margin(params, batch):
    grads, probs = [], []
    for x, y, m in zip(batch["x"], batch["y"], batch["mask"]):
        g, p = _brute_one_sequence(params, x, y, int(m.sum()))  # right padding
        grads.append(np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)]))
        probs.append(float(p))
    return np.array(grads), np.array(probs)


def test_sequence_margin_grads_match_brute_force_with_padding():
    params, batch = _lm_params(0), _lm_data(0, 5)
    assert batch["mask"].sum(1).min() < T  # some rows are padded
    g, p = jaxinf.margin_grads(_lm_logits, params, batch, labels="y", mask="mask", chunk_size=4)
    g_ref, p_ref = _brute_sequence_margin(params, batch)
    # float64, the same sums in another order: agreement to rounding.
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(p, p_ref, rtol=1e-10)
    # Without a mask every token counts: the brute force over all T tokens.
    full = {**batch, "mask": np.ones_like(batch["mask"])}
    g_all, p_all = jaxinf.margin_grads(_lm_logits, params, full, labels="y")
    g_all_ref, p_all_ref = _brute_sequence_margin(params, full)
    np.testing.assert_allclose(g_all, g_all_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(p_all, p_all_ref, rtol=1e-10)
    assert not np.allclose(g_all, g)  # the mask changed something


def test_token_weighted_margin_grads_are_the_negated_loss_gradient():
    # Per token, (1 - p_t) grad f_t = grad log p_t: weighting each token by its own 1 - p_t
    # turns the summed margin gradient into minus the gradient of the summed token loss.
    params, batch = _lm_params(1), _lm_data(1, 3)
    batch["mask"] = np.ones_like(batch["mask"])
    # Row (t, i) is sequence i with only token t in its mask: its margin f_t and p_t alone.
    rows = {k: np.tile(v, (T, 1)) for k, v in batch.items()}
    rows["mask"] = np.repeat(np.eye(T, dtype=np.int32), 3, axis=0)
    g_t, p_t = jaxinf.margin_grads(_lm_logits, params, rows, labels="y", mask="mask")
    weighted = ((1.0 - p_t)[:, None] * g_t).reshape(T, 3, -1).sum(0)

    def summed_loss(p, b):
        logp = jax.nn.log_softmax(_lm_logits(p, b))
        return -jnp.sum(jnp.take_along_axis(logp, b["y"][..., None], axis=-1))

    g_loss = jaxinf.flatten_per_example(jaxinf.per_example_grads(summed_loss, params, batch))
    np.testing.assert_allclose(weighted, -g_loss, rtol=1e-10, atol=1e-10)  # float64 identity


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
