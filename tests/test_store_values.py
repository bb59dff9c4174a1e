"""Bad values refused with the row named; query output paths; read-only logs; the id index."""

import os

import numpy as np
import pytest

import jaxinf
from jaxinf import LogWriter, open_log
from jaxinf._src import store_files, store_index

PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}


def _rows(a, b, seed=0):
    g = np.random.default_rng(seed + a).normal(size=(b - a, 2, 3))
    return {"a": g}, np.arange(a, b)


def _log(tmp_path, name="log", n=12, **kw):
    path = str(tmp_path / name)
    with LogWriter(path, PROJ, dtype="float64", writer_id="w", chunk_rows=4, **kw) as w:
        w.write(*_rows(0, n))
    return path


def test_nonfinite_rows_are_refused_naming_the_row_id_and_layer(tmp_path):
    path = str(tmp_path / "log")
    g, ids = _rows(0, 4)
    g["a"][2, 1, 0] = np.nan
    with LogWriter(path, PROJ, dtype="float64", writer_id="w") as w:
        with pytest.raises(ValueError, match=r"row 2 \(id 2\) has a NaN or Inf in layer 'a'"):
            w.write(g, ids)
        w.write(*_rows(10, 12))  # the writer stays usable; nothing of the bad batch was written
    assert open_log(path).ids().tolist() == [10, 11]
    with LogWriter(path, PROJ, dtype="float64", writer_id="w", on_nonfinite="skip") as w:
        g["a"][3] = np.inf
        w.write(g, ids)
    assert open_log(path).ids().tolist() == [10, 11, 0, 1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_cast_that_overflows_is_an_error(tmp_path, dtype):
    g, ids = _rows(0, 3)
    g["a"][1, 0, 0] = 1e39 if dtype == "bfloat16" else 7e4  # finite, beyond the dtype's range
    with LogWriter(str(tmp_path / dtype), PROJ, dtype=dtype) as w:
        with pytest.raises(ValueError, match=rf"row 1 \(id 1\) of layer 'a' overflows {dtype}"):
            w.write(g, ids)


def test_nonfinite_test_gradients_are_refused(tmp_path):
    path = _log(tmp_path)
    test, _ = _rows(0, 3, seed=5)
    test["a"][1, 0, 2] = -np.inf
    with pytest.raises(ValueError, match=r"test_grads: row 1 .* layer 'a'"):
        jaxinf.query(path, test, PROJ, progress=False)
    with pytest.raises(ValueError, match="test_grads: row 1"):
        jaxinf.influence_scores(_rows(0, 5)[0], test)


def test_query_out_refuses_existing_paths_and_deletes_only_its_own(tmp_path):
    path = _log(tmp_path)
    test, _ = _rows(0, 2, seed=5)
    mine = str(tmp_path / "mine")
    os.makedirs(mine)
    open(os.path.join(mine, "notes.txt"), "w").write("keep")
    for out in (mine, path, os.path.join(path, "scores")):
        with pytest.raises((FileExistsError, ValueError)):
            jaxinf.query(path, test, PROJ, out=out, overwrite=True, progress=False)
    assert open(os.path.join(mine, "notes.txt")).read() == "keep"
    assert open_log(path).num_rows == 12
    scores = str(tmp_path / "scores")
    jaxinf.query(path, test, PROJ, out=scores, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxinf.query(path, test, PROJ, out=scores, progress=False)
    res = jaxinf.query(path, test, PROJ, out=scores, overwrite=True, progress=False)
    assert res.scores_path == scores


def test_a_read_only_log_answers_queries(tmp_path, monkeypatch):
    path = _log(tmp_path, statistics=False)
    test, _ = _rows(0, 2, seed=5)
    ref = np.asarray(jaxinf.influence_scores(_rows(0, 12)[0], test))

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    # every write the store can make goes through these helpers (and renames)
    for name in ("atomic_write_json", "create_json_exclusive", "create_array", "write_array"):
        monkeypatch.setattr(store_files, name, refuse)
    monkeypatch.setattr(store_files, "makedirs", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    res = jaxinf.query(path, test, PROJ, top_k=12, progress=False)
    got = np.take_along_axis(res.top_scores, np.argsort(res.top_rows, 1), 1)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    with pytest.warns(RuntimeWarning, match="not cached"):
        open_log(path).statistics(cache=True)
    assert not os.path.exists(os.path.join(path, "statistics"))


def test_duplicates_across_shards_string_ids_and_hash_collisions(tmp_path, monkeypatch):
    path = str(tmp_path / "log")
    g, _ = _rows(0, 6)
    names = [f"doc-{i}" for i in range(6)]
    with LogWriter(path, PROJ, writer_id="a") as w:
        w.write({"a": g["a"][:4]}, names[:4])
    with LogWriter(path, PROJ, writer_id="b") as w:
        with pytest.raises(ValueError, match=r"already in the log.*doc-3"):
            w.write({"a": g["a"][3:]}, names[3:])
    with LogWriter(path, PROJ, writer_id="b", on_duplicate="skip") as w:
        w.write({"a": g["a"][3:]}, names[3:])
        assert "doc-1" in w and "doc-5" in w and "doc-9" not in w
    assert sorted(open_log(path).ids().tolist()) == names
    # every string hashes alike: matches are confirmed against the stored ids, so distinct ids
    # are still all written and true duplicates still found
    real = store_index.id_keys
    monkeypatch.setattr(
        "jaxinf._src.writer.id_keys",
        lambda stored, kind: real(stored, kind) * 0 if kind == "str" else real(stored, kind),
    )
    with LogWriter(path, PROJ, writer_id="c", on_duplicate="skip") as w:
        w.write({"a": g["a"]}, [f"new-{i}" for i in range(3)] + names[:3])
        w.write({"a": g["a"][:2]}, ["new-0", "new-9"])
    ids = open_log(path).ids().tolist()
    assert sorted(ids) == sorted(names + ["new-0", "new-1", "new-2", "new-9"])


def test_id_index_is_compact_and_exact():
    rng = np.random.default_rng(0)
    for kind in ("int", "str"):
        idx = store_index.IdIndex(kind)
        n = 200_000
        if kind == "int":
            stored = rng.permutation(10 * n)[:n].astype(np.int64)
        else:
            stored = np.asarray([f"id{i}".encode() for i in range(n)], "S16")
            stored = stored.view(np.uint8).reshape(n, 16)
        keys = store_index.id_keys(stored, kind)
        for a in range(0, n, 5000):
            idx.add(keys[a : a + 5000], 0, np.arange(a, min(a + 5000, n)))
        assert len(idx) == n
        assert idx.nbytes / n == (8 if kind == "int" else 16)  # bytes per row
        if kind == "int":
            assert idx.member(keys).all()
            assert not idx.member(store_index.id_keys(np.asarray([-1, 10 * n]), "int")).any()
        else:
            cand = idx.candidates(keys[[5, 123_456]])
            assert [(i, r) for i, _, r in cand] == [(0, 5), (1, 123_456)]
