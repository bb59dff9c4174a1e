"""Saved self-influence versions: relatif / cosine queries that read them, exact in float64."""

import os

import numpy as np
import pytest

import jaxinf
from jaxinf import LogFormatError, LogWriter, open_log

PROJ = {
    "layers": {
        "a": {"k_in": 3, "k_out": 2},
        "b": {"k_in": 2, "k_out": 2},
    },
    "seed": 0,
}
N, N_TEST = 21, 3


def _grads(rng, n):
    return {"a": rng.normal(size=(n, 2, 3)), "b": 2.0 * rng.normal(size=(n, 2, 2))}


def _write(path, train, start, stop, writer_id="0"):
    with LogWriter(path, PROJ, dtype="float64", writer_id=writer_id, chunk_rows=4) as w:
        w.write({k: v[start:stop] for k, v in train.items()}, ids=np.arange(start, stop))


def _brute(train, test, mode, damping_ratio=0.1):
    """float64 reference by linear solves with (F + λI), F the mean outer product."""
    s, self_tr, self_te = 0.0, 0.0, 0.0
    for k in train:
        g = train[k].reshape(len(train[k]), -1)
        t = g if test is None else test[k].reshape(len(test[k]), -1)
        f = g.T @ g / len(g)
        h = f + damping_ratio * np.trace(f) / f.shape[0] * np.eye(f.shape[0])
        s = s + t @ np.linalg.solve(h, g.T)
        self_tr = self_tr + np.einsum("nd,dn->n", g, np.linalg.solve(h, g.T))
        self_te = self_te + np.einsum("nd,dn->n", t, np.linalg.solve(h, t.T))
    if mode == "self":
        return self_tr
    s = s / np.sqrt(self_tr)[None, :]
    return s / np.sqrt(self_te)[:, None] if mode == "cosine" else s


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return _grads(rng, N), _grads(rng, N_TEST)


@pytest.fixture()
def log_path(tmp_path, data):
    train, _ = data
    path = str(tmp_path / "log")
    _write(path, train, 0, 13, "0")
    _write(path, train, 13, N, "1")  # two shards
    return path


def _full(path, test, mode, **kw):
    r = jaxinf.query(path, test, PROJ, mode=mode, top_k=None, chunk_rows=5, progress=False, **kw)
    return r.scores  # columns in id order = row order here


def test_reader_writes_nothing_without_cache(log_path):
    before = sorted(os.listdir(log_path))
    jaxinf.self_influence(log_path, progress=False)
    assert sorted(os.listdir(log_path)) == before


def test_cached_self_influence_is_exact_and_read_back(log_path, data):
    train, _ = data
    si = jaxinf.self_influence(log_path, chunk_rows=5, cache=True, progress=False)
    np.testing.assert_allclose(si.scores, _brute(train, None, "self"), rtol=1e-12)
    (version,) = os.listdir(os.path.join(log_path, "self_influence"))
    assert version.startswith("v-")
    again = jaxinf.self_influence(log_path, progress=False)
    np.testing.assert_array_equal(again.scores, si.scores)


@pytest.mark.parametrize("mode", ["relatif", "cosine"])
def test_query_with_saved_self_influence_equals_brute_force(log_path, data, mode):
    train, test = data
    inline = _full(log_path, test, mode)
    jaxinf.self_influence(log_path, cache=True, progress=False)
    saved = _full(log_path, test, mode)
    ref = _brute(train, test, mode)
    # float64 log, float64 compute: agreement to rounding
    np.testing.assert_allclose(saved, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(saved, inline, rtol=1e-10, atol=1e-12)
    top = jaxinf.query(log_path, test, PROJ, mode=mode, top_k=4, chunk_rows=5, progress=False)
    np.testing.assert_allclose(top.top_scores, -np.sort(-ref, axis=1)[:, :4], rtol=1e-10)
    np.testing.assert_array_equal(top.top_rows, np.argsort(-ref, axis=1, kind="stable")[:, :4])


def test_query_reads_the_saved_vector(log_path, data):
    """A planted version (self-influence x 4) halves every relatif score: it is what is read."""
    _, test = data
    inline = _full(log_path, test, "relatif")
    log = open_log(log_path)
    si = jaxinf.self_influence(log, progress=False)
    from jaxinf._src.query import SELF_INFLUENCE, _self_params

    assert log.save_derived(SELF_INFLUENCE, _self_params(si.damping), {"scores": 4 * si.scores})
    np.testing.assert_allclose(_full(log_path, test, "relatif"), inline / 2, rtol=1e-12)
    # another damping has no saved version: computed inline, still exact
    other = _full(log_path, test, "relatif", damping=0.5)
    assert not np.allclose(other, inline / 2)


def test_appended_rows_invalidate_the_version(tmp_path, data):
    train, test = data
    path = str(tmp_path / "log")
    _write(path, train, 0, 13, "0")
    jaxinf.self_influence(path, cache=True, progress=False)
    _write(path, train, 13, N, "1")  # new rows: new Fisher, new damping, new stamp
    sub = {k: v[:N] for k, v in train.items()}
    np.testing.assert_allclose(_full(path, test, "relatif"), _brute(sub, test, "relatif"), 1e-10)
    si = jaxinf.self_influence(path, progress=False)
    assert si.scores.shape == (N,)
    np.testing.assert_allclose(si.scores, _brute(sub, None, "self"), rtol=1e-12)


def test_saved_version_with_sharded_queries_merges_to_whole(log_path, data):
    _, test = data
    jaxinf.self_influence(log_path, cache=True, progress=False)
    kw = dict(mode="relatif", top_k=5, chunk_rows=3, progress=False)
    whole = jaxinf.query(log_path, test, PROJ, **kw)
    parts = [jaxinf.query(log_path, test, PROJ, shards=[s], **kw) for s in ("0", "1")]
    merged = jaxinf.merge_results(parts)
    np.testing.assert_array_equal(merged.top_rows, whole.top_rows)
    np.testing.assert_allclose(merged.top_scores, whole.top_scores, rtol=1e-12)


def test_damaged_version_is_a_named_error(log_path, data):
    _, test = data
    jaxinf.self_influence(log_path, cache=True, progress=False)
    d = os.path.join(log_path, "self_influence")
    (version,) = os.listdir(d)
    os.remove(os.path.join(d, version, "record.json"))
    with pytest.raises(LogFormatError, match="record.json"):
        jaxinf.query(log_path, test, PROJ, mode="relatif", progress=False)
