"""TRAK against a brute-force float64 implementation of its formula on a softmax model."""

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
