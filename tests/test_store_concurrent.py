"""Writers running at the same time with overlapping data ids: each id is committed once.

On the local filesystem and on tensorstore kvstores: in-memory for the writers of one process,
the ``file`` kvstore driver for writer processes (its records are conditional writes, not
renames), and S3 in ``tests/test_store_kvstore.py`` when moto is installed.
"""

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from jaxinf import LogWriter, open_log
from jaxinf._src import store_files as files
from jaxinf._src.writer import load_fisher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _rows(ids, kind="int"):
    ids = np.asarray(ids)
    g = np.random.default_rng(0).normal(size=(200, 6))[ids] + ids[:, None] / 100.0
    out = ids if kind == "int" else [f"doc-{i}" for i in ids]
    return {"a": g.reshape(-1, 2, 3)}, out


def where(tmp_path, storage, name="log"):
    if callable(storage):  # see tests/test_store_kvstore.py
        return storage(name)
    if storage == "local":
        return str(tmp_path / name)
    if storage == "file-kvstore":  # shared between processes, written through the kvstore API
        return f"file://{tmp_path}/{name}/"
    return f"memory://{uuid.uuid4().hex}/{name}/"


def _writer(path, wid, **kw):
    return LogWriter(path, PROJ, dtype="float64", writer_id=wid, chunk_rows=4, **kw)


def _check_log(path, kind="int"):
    """Every id once; rows equal what was written for that id; each shard's Fisher sums exact."""
    log = open_log(path)
    got, ids = log.read()
    nums = [int(str(i).removeprefix("doc-")) for i in ids.tolist()]
    assert len(set(nums)) == len(nums), sorted(nums)
    np.testing.assert_array_equal(got["a"], _rows(nums)[0]["a"])
    for s in log.shards:
        sums = load_fisher(files.location(path) / "shards" / s.name, s.rows, 1) if s.rows else None
        if sums is not None:
            _, sids = log.read(s.name)
            g = _rows([int(str(i).removeprefix("doc-")) for i in sids.tolist()])[0]["a"]
            g = g.reshape(len(g), -1)
            np.testing.assert_allclose(sums[0], g.T @ g, rtol=1e-12, atol=1e-12)
    return sorted(nums)


@pytest.mark.parametrize("storage", ["local", "memory"])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_rows_a_concurrent_writer_committed_first_are_dropped_with_skip(tmp_path, kind, storage):
    path = where(tmp_path, storage)
    a = _writer(path, "a", on_duplicate="skip")
    a.write(*_rows([100], kind))  # creates the log, so that b indexes the log as of now
    b = _writer(path, "b", on_duplicate="skip")
    a.write(*_rows(range(8), kind))  # committed after b indexed the log: b does not know them
    h = b.write_async(*_rows([20, 21, 4, 5, 6, 22, 7, 23, 24, 0], kind))
    b.close()  # 4, 5, 6, 7, 0 are found at b's commits and dropped
    assert h.done()
    assert b.committed_rows == 5
    a.close()
    assert _check_log(path, kind) == [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 100]


@pytest.mark.parametrize("storage", ["local", "memory"])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_a_concurrent_duplicate_raises_naming_the_id_and_keeps_the_rows_before_it(
    tmp_path, kind, storage
):
    path = where(tmp_path, storage)
    a = _writer(path, "a")
    a.write(*_rows([100], kind))
    b = _writer(path, "b")
    a.write(*_rows(range(8), kind))
    want = 6 if kind == "int" else "doc-6"
    with pytest.raises(ValueError, match=f"data id {want!r} .*another writer running at the same"):
        b.write(*_rows([20, 21, 22, 23, 24, 6, 25], kind))
    with pytest.raises(RuntimeError, match="failed earlier"):
        b.write(*_rows([30], kind))
    b.close()
    a.close()
    assert _check_log(path, kind) == [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 100]


_JOB = r"""
import sys
import jax
import numpy as np
jax.config.update("jax_enable_x64", True)
from jaxinf import LogWriter
path, wid, mode, seed, go = sys.argv[1:]
ids = np.random.default_rng(int(seed)).permutation(48)  # every job writes ids 0..47
g = np.random.default_rng(0).normal(size=(200, 6))[ids] + ids[:, None] / 100.0
w = LogWriter(path, {proj!r}, dtype="float64", writer_id=wid, chunk_rows=4, on_duplicate=mode)
print("ready", flush=True)
while not __import__("os").path.exists(go):  # start together
    __import__("time").sleep(0.001)
try:
    for a in range(0, 48, 3):
        w.write_async({{"a": g[a : a + 3].reshape(-1, 2, 3)}}, ids=ids[a : a + 3])
    w.close()
    print("ok")
except ValueError as e:
    print("error:", e)
    try:
        w.close()  # commits what is in flight, up to the next duplicate
    except ValueError:
        pass
"""


@pytest.mark.parametrize("storage", ["local", "file-kvstore"])
def test_writer_processes_at_once_with_overlapping_ids_commit_each_id_once(tmp_path, storage):
    path, go = where(tmp_path, storage), str(tmp_path / "go")
    with _writer(path, "0") as w:
        w.write(*_rows([100]))  # the log exists before the jobs start
    code = _JOB.format(proj=PROJ)
    modes = ["skip", "skip", "error"]  # every job writes every id, in its own order
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, path, f"w{j}", mode, str(j), go],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for j, mode in enumerate(modes)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        open(go, "w").close()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(out.strip())
    finally:
        for p in procs:
            p.kill()
    assert _check_log(path) == list(range(48)) + [100]
    assert outs[:2] == ["ok", "ok"]
    # the "error" job stops at the first id that another job committed first, naming it, or
    # finishes because it committed every id first
    if outs[2] == "ok":
        assert open_log(path).read("w2")[1].size == 48
    else:
        assert outs[2].startswith("error: data id"), outs[2]
        assert "already in the log" in outs[2] or "same time" in outs[2], outs[2]
