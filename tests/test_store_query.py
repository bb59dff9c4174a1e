"""Streamed influence queries against an in-memory float64 brute force."""

import os

import numpy as np
import pytest
import tensorstore as ts

import jaxinf
from jaxinf import LogWriter, open_log

PROJ = {
    "layers": {
        "mlp/up": {"k_in": 3, "k_out": 2, "n_in": 8, "n_out": 6},
        "head": {"k_in": 4, "k_out": 1, "n_in": 9, "n_out": 3},
    },
    "init": "random",
    "seed": 0,
    "fingerprint": "abc123",
}
SHARD_ROWS = {"p0": 24, "p1": 16}  # two writers (processes) sharing one log
N = sum(SHARD_ROWS.values())
N_TEST = 3


def _grads(rng, n):
    # "head" has a larger scale so the layers' dampings differ
    return {"mlp/up": rng.normal(size=(n, 2, 3)), "head": 3.0 * rng.normal(size=(n, 1, 4))}


def _write_log(path, dtype, train):
    start = 0
    for wid, rows in SHARD_ROWS.items():
        with LogWriter(path, PROJ, dtype=dtype, writer_id=wid, chunk_rows=8) as w:
            for a in range(start, start + rows, 5):  # batches of 5 straddle the 8-row chunks
                b = min(a + 5, start + rows)
                w.write_async(
                    {k: v[a:b] for k, v in train.items()}, ids=[f"ex{i}" for i in range(a, b)]
                )
        start += rows


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return _grads(rng, N), _grads(rng, N_TEST)


@pytest.fixture(scope="module")
def logs(tmp_path_factory, data):
    train, _ = data
    out = {}
    for dtype in ("float64", "float32", "bfloat16"):
        path = str(tmp_path_factory.mktemp("logs") / dtype)
        _write_log(path, dtype, train)
        out[dtype] = path
    return out


def _rows(grads):
    return np.concatenate([grads[k].reshape(len(grads[k]), -1) for k in ("head", "mlp/up")], 1)


def _brute(train, test, mode, damping_ratio=0.1):
    """float64 reference: per-layer (F + λI)^-1 by a linear solve, λ = ratio × trace(F) / d."""
    s = 0.0
    self_tr, self_te = 0.0, 0.0
    for k in train:
        g = train[k].reshape(N, -1)
        t = test[k].reshape(len(test[k]), -1)
        f = g.T @ g / N
        lam = damping_ratio * np.trace(f) / f.shape[0]  # mean eigenvalue = trace / d
        h = f + lam * np.eye(f.shape[0])
        s = s + t @ np.linalg.solve(h, g.T)
        self_tr = self_tr + np.einsum("nd,dn->n", g, np.linalg.solve(h, g.T))
        self_te = self_te + np.einsum("nd,dn->n", t, np.linalg.solve(h, t.T))
    if mode == "self":
        return self_tr
    if mode == "relatif":
        return s / np.sqrt(self_tr)[None, :]
    if mode == "cosine":
        return s / np.sqrt(self_tr)[None, :] / np.sqrt(self_te)[:, None]
    return s


def _stored(train, dtype):
    """The training gradients as the log holds them (rounded to the storage dtype), in float64."""
    import ml_dtypes

    np_dt = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return {k: v.astype(np_dt).astype(np.float64) for k, v in train.items()}


# float64 logs compute in float64: agreement to rounding. float32 logs compute in float32 on the
# device (preconditioner in float64 on the host): relative to the largest score, float32 rounding.
TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk_rows", [8, 5, 64])  # divides both shards / neither / larger
@pytest.mark.parametrize("mode", ["dot", "cosine", "relatif"])
def test_streamed_scores_match_brute_force(logs, data, tmp_path, dtype, chunk_rows, mode):
    train, test = data
    log = open_log(logs[dtype])
    test_in = {k: v.astype(np.float32) for k, v in test.items()} if dtype == "float32" else test
    res = jaxinf.query(
        log,
        test_in,
        PROJ,
        mode=mode,
        top_k=5,
        chunk_rows=chunk_rows,
        out=str(tmp_path / "scores"),
        prefetch=2,
        progress=False,
    )
    dense = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": res.scores_path}}
    ).result()
    dense = dense.read().result()
    ref = _brute(_stored(train, dtype), {k: v.astype(np.float64) for k, v in test_in.items()}, mode)
    assert dense.shape == (N_TEST, N)
    err = np.max(np.abs(dense - ref)) / np.max(np.abs(ref))
    assert err < TOL[dtype], err
    # top-k equals argsort of the dense matrix (random data: no ties)
    order = np.argsort(-ref, axis=1)
    np.testing.assert_array_equal(res.top_rows, order[:, :5])
    np.testing.assert_array_equal(res.bottom_rows, order[:, ::-1][:, :5])
    np.testing.assert_allclose(
        res.top_scores,
        np.take_along_axis(ref, order[:, :5], 1),
        atol=TOL[dtype] * np.max(np.abs(ref)),
    )
    ids = np.asarray([f"ex{i}" for i in range(N)], dtype=object)
    np.testing.assert_array_equal(res.top_ids, ids[order[:, :5]])
    np.testing.assert_array_equal(log.ids(), ids)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_self_influence_matches_brute_force(logs, data, dtype):
    train, _ = data
    si = jaxinf.self_influence(logs[dtype], chunk_rows=7, progress=False)
    ref = _brute(_stored(train, dtype), _stored(train, dtype), "self")
    assert np.max(np.abs(si.scores - ref)) / np.max(ref) < TOL[dtype]
    assert list(si.ids) == [f"ex{i}" for i in range(N)]


def test_explicit_damping_and_top_k_larger_than_log(logs, data):
    train, test = data
    log = open_log(logs["float64"])
    res = jaxinf.query(
        log, test, PROJ, top_k=1000, damping={"mlp/up": 0.5, "head": 2.0}, progress=False
    )
    ref = 0.0
    for k, lam in (("mlp/up", 0.5), ("head", 2.0)):
        g, t = train[k].reshape(N, -1), test[k].reshape(N_TEST, -1)
        ref = ref + t @ np.linalg.solve(g.T @ g / N + lam * np.eye(g.shape[1]), g.T)
    assert res.top_scores.shape == (N_TEST, N)  # k clipped to the number of rows
    np.testing.assert_allclose(res.top_scores, -np.sort(-ref, axis=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["dot", "cosine", "relatif", "self"])
def test_in_memory_scores_match_brute_force(data, mode):
    train, test = data
    got = np.asarray(jaxinf.influence_scores(train, test, mode=mode))
    np.testing.assert_allclose(got, _brute(train, test, mode), rtol=1e-10, atol=1e-12)


def test_statistics_are_saved_only_when_asked_as_a_stamped_version(logs, data, tmp_path):
    import shutil

    from jaxinf._src.reader import statistics_version

    train, _ = data
    path = str(tmp_path / "copy")
    shutil.copytree(logs["float64"], path)
    log = open_log(path)
    stats = log.statistics()
    assert not os.path.exists(os.path.join(path, "statistics"))  # a reader writes nothing
    g = train["mlp/up"].reshape(N, -1)
    np.testing.assert_allclose(stats["mlp/up"].covariance, g.T @ g / N, rtol=1e-12)
    evals = np.linalg.eigvalsh(g.T @ g / N)
    np.testing.assert_allclose(stats["mlp/up"].eigenvalues, evals, rtol=1e-10)
    open_log(path).statistics(cache=True)
    version = statistics_version({s.name: s.rows for s in log.shards})
    assert os.listdir(os.path.join(path, "statistics")) == [version]
    # saved as zarr arrays next to the rows, readable without our code
    cov = ts.open(
        {
            "driver": "zarr",
            "kvstore": {
                "driver": "file",
                "path": f"{path}/statistics/{version}/layer_1/covariance",
            },
        }
    ).result()
    np.testing.assert_array_equal(cov.read().result(), stats["mlp/up"].covariance)
    again = open_log(path).statistics()  # read from the version
    np.testing.assert_array_equal(again["mlp/up"].eigenvectors, stats["mlp/up"].eigenvectors)


def test_bfloat16_log_scores_close_to_float32(logs, data):
    _, test = data
    t32 = {k: v.astype(np.float32) for k, v in test.items()}
    for mode in ("dot", "relatif"):
        a = jaxinf.query(logs["float32"], t32, PROJ, mode=mode, top_k=N, progress=False)
        b = jaxinf.query(logs["bfloat16"], t32, PROJ, mode=mode, top_k=N, progress=False)
        sa = np.take_along_axis(a.top_scores, np.argsort(a.top_rows, 1), 1)
        sb = np.take_along_axis(b.top_scores, np.argsort(b.top_rows, 1), 1)
        # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per entry): measured
        # 0.16-0.19% of the largest score here; the stated tolerance is 1%.
        assert np.max(np.abs(sa - sb)) / np.max(np.abs(sa)) < 1e-2
        # and the ranking of the most influential rows is essentially kept
        assert a.top_rows[:, 0].tolist() == b.top_rows[:, 0].tolist()


def test_query_refuses_mismatched_projection(logs, data):
    _, test = data
    log = open_log(logs["float64"])
    other = {**PROJ, "seed": 1, "fingerprint": "zzz"}
    with pytest.raises(ValueError, match=r"seed \(0 in the log vs 1\).*|fingerprint"):
        jaxinf.query(log, test, other, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        jaxinf.query(log, test, other, progress=False)
    bad_shape = {**test, "head": np.zeros((N_TEST, 2, 2))}
    with pytest.raises(ValueError, match=r"test_grads\['head'\] has shape"):
        jaxinf.query(log, bad_shape, PROJ, progress=False)
    with pytest.raises(ValueError, match="missing \\['head'\\]"):
        jaxinf.query(log, {"mlp/up": test["mlp/up"]}, PROJ, progress=False)
    with pytest.raises(ValueError, match="mode"):
        jaxinf.query(log, test, PROJ, mode="self", progress=False)


def test_one_compilation_per_query_shape(logs, data):
    from jaxinf._src import query as q_mod

    _, test = data
    log = open_log(logs["float64"])
    # a fresh (mode, k) so the cache entry is this test's; chunks of 7 leave ragged tails
    jaxinf.query(log, test, PROJ, mode="cosine", top_k=3, chunk_rows=7, progress=False)
    step = q_mod._step_fn(tuple(log.layers), "cosine", 3, False)
    assert step._cache_size() == 1  # the ragged last chunks are padded, not retraced


def test_per_shard_queries_merge_to_the_whole_log_query(logs, data):
    _, test = data
    log = open_log(logs["float64"])
    whole = jaxinf.query(log, test, PROJ, mode="relatif", top_k=6, chunk_rows=5, progress=False)
    # as two processes would: each scores its own shard, then the top-k lists are merged
    parts = [
        jaxinf.query(
            log, test, PROJ, mode="relatif", top_k=6, chunk_rows=5, shards=[s], progress=False
        )
        for s in SHARD_ROWS
    ]
    assert parts[1].top_rows.min() >= SHARD_ROWS["p0"]  # row indices stay global
    merged = jaxinf.merge_results(parts)
    for name in ("top_rows", "top_ids", "bottom_rows", "bottom_ids"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    for name in ("top_scores", "bottom_scores"):  # same rows, possibly other chunk boundaries
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown shards"):
        jaxinf.query(log, test, PROJ, shards=["p7"], progress=False)
