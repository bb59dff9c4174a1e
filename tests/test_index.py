"""FAISS index of a log: exact re-scored top-k, resumable versioned builds (needs faiss-cpu)."""

import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

import jaxinf  # noqa: E402
from jaxinf import LogWriter  # noqa: E402
from jaxinf._src import index as index_mod  # noqa: E402

PROJ = {"layers": {"a": {"k_in": 4, "k_out": 2}, "b": {"k_in": 2, "k_out": 2}}, "seed": 0}
N, N_TEST, K = 300, 4, 5


def _grads(rng, n, centers=None):
    # clustered rows (as gradients of similar examples are): an IVF index has structure to use
    lab = rng.integers(0, len(centers), n)
    x = centers[lab] + 0.3 * rng.normal(size=(n, 12))
    return {"a": x[:, :8].reshape(n, 2, 4), "b": 2.0 * x[:, 8:].reshape(n, 2, 2)}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 12))
    return _grads(rng, N, centers), _grads(rng, N_TEST, centers)


def _write(path, train, start, stop, writer_id):
    with LogWriter(path, PROJ, dtype="float64", writer_id=writer_id, chunk_rows=16) as w:
        w.write({k: v[start:stop] for k, v in train.items()}, ids=np.arange(start, stop))


@pytest.fixture()
def log_path(tmp_path, data):
    train, _ = data
    path = str(tmp_path / "log")
    _write(path, train, 0, 170, "0")
    _write(path, train, 170, N, "1")
    return path


def _exhaustive(path, test, mode):
    return jaxinf.query(path, test, PROJ, mode=mode, top_k=K, chunk_rows=32, progress=False)


@pytest.mark.parametrize("mode", ["dot", "relatif", "cosine"])
def test_flat_index_equals_exhaustive(log_path, data, mode):
    """A flat index proposes every row: the result is exhaustive search, scores and rows."""
    _, test = data
    jaxinf.build_index(log_path, mode=mode, factory="Flat", chunk_rows=32, progress=False)
    got = jaxinf.query_index(log_path, test, PROJ, mode=mode, top_k=K, candidates=N)
    ref = _exhaustive(log_path, test, mode)
    np.testing.assert_array_equal(got.top_rows, ref.top_rows)
    np.testing.assert_array_equal(got.bottom_rows, ref.bottom_rows)
    np.testing.assert_array_equal(got.top_ids, ref.top_ids)
    # float64 re-scoring on the host against the float64 streamed query
    np.testing.assert_allclose(got.top_scores, ref.top_scores, rtol=1e-10)
    np.testing.assert_allclose(got.bottom_scores, ref.bottom_scores, rtol=1e-10)


def test_ivf_scores_are_exact_and_recall_is_measured(log_path, data):
    _, test = data
    jaxinf.build_index(log_path, factory="IVF8,Flat", progress=False)
    ref = _exhaustive(log_path, test, "dot")
    full = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=8)  # every list
    np.testing.assert_array_equal(full.top_rows, ref.top_rows)
    few = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=1, candidates=K)
    # whatever it found, each score is the exact score of that row
    dense = jaxinf.query(log_path, test, PROJ, top_k=None, progress=False)
    exact = np.take_along_axis(dense.scores, few.top_rows, axis=1)  # ids == rows here
    np.testing.assert_allclose(few.top_scores, exact, rtol=1e-10)
    r = index_mod.recall_at_k(few.top_rows, ref.top_rows)
    assert 0.0 < r <= 1.0
    assert index_mod.recall_at_k(full.top_rows, ref.top_rows) == 1.0


def test_bottom_search_visits_its_own_number_of_lists(log_path, data):
    """``nprobe_bottom`` alone decides how many lists the search for the most negative rows visits."""
    _, test = data
    jaxinf.build_index(log_path, factory="IVF8,Flat", progress=False)
    ref = _exhaustive(log_path, test, "dot")
    every = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=1, nprobe_bottom=8)
    np.testing.assert_array_equal(every.bottom_rows, ref.bottom_rows)
    one = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=1, nprobe_bottom=1)
    np.testing.assert_array_equal(one.top_rows, every.top_rows)  # the top search is unchanged
    assert index_mod.recall_at_k(one.bottom_rows, ref.bottom_rows) < 1.0  # one list is too few
    default = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=4)  # bottom: 8 lists
    np.testing.assert_array_equal(default.bottom_rows, ref.bottom_rows)
    with pytest.raises(ValueError, match="nprobe_bottom must be >= 1"):
        jaxinf.query_index(log_path, test, PROJ, nprobe_bottom=0)


def test_build_is_versioned_and_appended_rows_invalidate_it(tmp_path, data):
    train, test = data
    path = str(tmp_path / "log")
    _write(path, train, 0, 170, "0")
    d = jaxinf.build_index(path, factory="Flat", progress=False)
    assert os.path.basename(d).startswith("v-")
    assert jaxinf.build_index(path, factory="Flat", progress=False) == d  # found, not rebuilt
    _write(path, train, 170, N, "1")
    with pytest.raises(ValueError, match="no 'dot' index .* covers its committed rows"):
        jaxinf.query_index(path, test, PROJ, top_k=K)
    d2 = jaxinf.build_index(path, factory="Flat", progress=False)
    assert d2 != d
    got = jaxinf.query_index(path, test, PROJ, top_k=K, candidates=N)
    np.testing.assert_array_equal(got.top_rows, _exhaustive(path, test, "dot").top_rows)


def test_interrupted_build_resumes_without_lost_or_repeated_rows(log_path, data, monkeypatch):
    _, test = data
    calls = {"n": 0}
    real_add = index_mod._add

    def failing_add(index, x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("interrupted")
        real_add(index, x)

    monkeypatch.setattr(index_mod, "_add", failing_add)
    kw = dict(factory="IVF4,Flat", chunk_rows=40, checkpoint_rows=80, progress=False)
    with pytest.raises(KeyboardInterrupt):
        jaxinf.build_index(log_path, **kw)
    (build,) = [n for n in os.listdir(os.path.join(log_path, "index")) if n.startswith(".build")]
    part = faiss.read_index(os.path.join(log_path, "index", build, "part.faiss"))
    assert 0 < part.ntotal < N  # a checkpoint was written before the interruption
    monkeypatch.setattr(index_mod, "_add", real_add)
    d = jaxinf.build_index(log_path, **kw)
    assert faiss.read_index(os.path.join(d, "index.faiss")).ntotal == N
    assert not [n for n in os.listdir(os.path.join(log_path, "index")) if n.startswith(".")]
    # every list probed and every row a candidate: exhaustive, so no row lost or doubled
    got = jaxinf.query_index(log_path, test, PROJ, top_k=K, nprobe=4, candidates=N)
    ref = _exhaustive(log_path, test, "dot")
    np.testing.assert_array_equal(got.top_rows, ref.top_rows)
    np.testing.assert_array_equal(got.bottom_rows, ref.bottom_rows)


def test_errors_name_the_problem(log_path, data):
    _, test = data
    with pytest.raises(ValueError, match="mode must be"):
        jaxinf.build_index(log_path, mode="self", progress=False)
    with pytest.raises(ValueError, match="build one with jaxinf.build_index"):
        jaxinf.query_index(log_path, test, PROJ, mode="relatif")
    jaxinf.build_index(log_path, factory="Flat", progress=False)
    jaxinf.build_index(log_path, factory="IVF4,Flat", progress=False)
    with pytest.raises(ValueError, match="pass factory="):
        jaxinf.query_index(log_path, test, PROJ)
    got = jaxinf.query_index(log_path, test, PROJ, factory="Flat", top_k=K)
    assert got.top_rows.shape == (N_TEST, K)
    bad = dict(PROJ, seed=1)
    with pytest.raises(ValueError, match="projection differs"):
        jaxinf.query_index(log_path, test, bad, factory="Flat")


@pytest.mark.parametrize("ranged", [True, False])
def test_candidate_rows_read_back_exactly(log_path, monkeypatch, ranged):
    if not ranged:  # the plain tensorstore read, used for any other array layout
        monkeypatch.setattr(index_mod, "_row_reader", lambda grads: None)
    log = jaxinf.open_log(log_path)
    rows = np.array([0, 15, 16, 169, 170, 171, N - 1])  # chunk edges and both shards
    whole, _ = log.read(as_layers=False)
    np.testing.assert_array_equal(index_mod._gather(log, rows), whole[rows])
