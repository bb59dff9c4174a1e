"""The damping of every layer reported with scores, and the full score matrix of a query."""

import numpy as np
import pytest

import jaxinf
from jaxinf import LogWriter

PROJ = {
    "layers": {
        "a": {"k_in": 3, "k_out": 2, "n_in": 8, "n_out": 6},
        "b": {"k_in": 2, "k_out": 1, "n_in": 9, "n_out": 3},
    },
    "init": "random",
    "seed": 0,
    "fingerprint": "f",
}
N, N_TEST = 13, 3


def _grads(rng, n):
    return {"a": rng.normal(size=(n, 2, 3)), "b": 3.0 * rng.normal(size=(n, 1, 2))}


def _brute(train, test, ratio=0.1):
    """Per layer ``lambda = ratio * mean eigenvalue(F)``, ``F = G^T G / n``; scores summed."""
    total, lams = 0.0, {}
    for layer in train:
        g, t = train[layer].reshape(N, -1), test[layer].reshape(len(test[layer]), -1)
        f = g.T @ g / N
        lams[layer] = ratio * np.trace(f) / f.shape[0]
        total = total + t @ np.linalg.solve(f + lams[layer] * np.eye(f.shape[0]), g.T)
    return total, lams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    train, test = _grads(rng, N), _grads(rng, N_TEST)
    path = str(tmp_path_factory.mktemp("log") / "log")
    # Ids written out of order, so "id order" differs from row order.
    ids = [int(i) for i in rng.permutation(100)[:N]]
    with LogWriter(path, PROJ, dtype="float64", chunk_rows=4) as w:
        for s in range(0, N, 5):
            w.write_async({k: v[s : s + 5] for k, v in train.items()}, ids=ids[s : s + 5])
    return path, train, test, np.asarray(ids)


def test_query_top_k_none_returns_every_score_in_id_order_and_the_damping(setup):
    path, train, test, ids = setup
    ref, lams = _brute(train, test)
    r = jaxinf.query(path, test, PROJ, top_k=None, chunk_rows=4, progress=False)
    order = np.argsort(ids)
    np.testing.assert_array_equal(r.ids, ids[order])
    # float64 log, damped solves: agreement to ~1e-9.
    np.testing.assert_allclose(r.scores, ref[:, order], rtol=1e-9, atol=1e-10)
    assert r.scores.shape == (N_TEST, N) and r.top_scores.shape == (N_TEST, N)
    np.testing.assert_allclose(r.top_scores, -np.sort(-ref, axis=1), rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(r.top_ids, ids[np.argsort(-ref, axis=1)])
    np.testing.assert_allclose(r.bottom_scores, np.sort(ref, axis=1), rtol=1e-9, atol=1e-10)
    assert set(r.damping) == set(lams)
    for layer, lam in lams.items():
        np.testing.assert_allclose(r.damping[layer], lam, rtol=1e-10)
    # A top-k query reports the same damping and agrees with the full ranking.
    k = jaxinf.query(path, test, PROJ, top_k=4, chunk_rows=4, progress=False)
    np.testing.assert_allclose(k.top_scores, r.top_scores[:, :4], rtol=1e-12)
    assert k.damping == r.damping and k.scores is None
    assert jaxinf.self_influence(path, progress=False).damping == r.damping
    with pytest.raises(ValueError, match="top_k"):
        jaxinf.query(path, test, PROJ, top_k=0, progress=False)


def test_in_memory_scores_and_baselines_return_their_damping(setup):
    _, train, test, _ = setup
    ref, lams = _brute(train, test)
    s, lam = jaxinf.influence_scores(train, test, return_damping=True)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-10)
    assert {k: float(v) for k, v in lam.items()} == pytest.approx(lams, rel=1e-10)
    s, lam = jaxinf.block_influence(test, train, return_damping=True)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-10)
    assert {k: float(v) for k, v in lam.items()} == pytest.approx(lams, rel=1e-10)
    flat_te, flat_tr = test["a"].reshape(N_TEST, -1), train["a"].reshape(N, -1)
    s, lam = jaxinf.exact_influence(flat_te, flat_tr, return_damping=True)
    assert float(lam) == pytest.approx(lams["a"], rel=1e-10)
    s, lam = jaxinf.projected_influence(flat_te, flat_tr, projection=np.eye(6), return_damping=True)
    assert float(lam) == pytest.approx(lams["a"], rel=1e-10)
    acts = {"l": (train["a"][:, :1, :], train["a"][:, 1:, :])}
    s, lam = jaxinf.kfac_influence(acts, acts, return_damping=True)
    eig = jaxinf.kfac_eigenbasis(acts).eigenvalues["l"]
    assert float(lam["l"]) == pytest.approx(0.1 * float(np.mean(eig)), rel=1e-10)
