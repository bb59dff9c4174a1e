"""Gradient log store: layout, durability, resume, multi-writer, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorstore as ts

from jaxinf import LogWriter, open_log

PROJ = {
    "layers": {"a": {"k_in": 3, "k_out": 2, "n_in": 5, "n_out": 4}},
    "init": "random",
    "seed": 7,
    "fingerprint": "f00",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(i, b=4):
    """Deterministic batch i: rows identify themselves (value 1000 * id + column)."""
    ids = np.arange(i * b, (i + 1) * b)
    g = (1000.0 * ids[:, None] + np.arange(6)[None, :]).reshape(b, 2, 3).astype(np.float32)
    return {"a": g}, ids


def test_roundtrip_and_plain_zarr_layout(tmp_path):
    path = str(tmp_path / "log")
    rng = np.random.default_rng(0)
    g = {
        "x/y": rng.normal(size=(11, 2, 3)).astype(np.float32),
        "z": rng.normal(size=(11, 1, 2)).astype(np.float32),
    }
    ids = [f"doc-{i}-é" for i in range(11)]
    proj = {"layers": {}, "init": "pca", "seed": 1, "fingerprint": "abc"}
    with LogWriter(path, proj, chunk_rows=4, writer_id="0") as w:
        w.write_async({k: v[:6] for k, v in g.items()}, ids[:6])
        h = w.write_async({k: v[6:] for k, v in g.items()}, ids[6:])
        h.result()
        assert w.committed_rows == 11 and h.done()
    log = open_log(path)
    assert log.num_rows == 11 and log.metadata["projection"] == proj
    got, got_ids = log.read()
    for k in g:
        np.testing.assert_array_equal(got[k], g[k])
    assert list(got_ids) == ids
    part, part_ids = log.read(shard="0", start=3, stop=7)
    np.testing.assert_array_equal(part["z"], g["z"][3:7])
    assert list(part_ids) == ids[3:7]
    # without our code: metadata.json + a zarr v2 array with raw (uncompressed) chunks
    meta = json.load(open(os.path.join(path, "metadata.json")))
    zarray = json.load(open(os.path.join(path, "shards/0/grads/.zarray")))
    assert zarray["compressor"] is None and zarray["dtype"] == "<f4"
    chunk = np.fromfile(os.path.join(path, "shards/0/grads/1.0"), "<f4").reshape(4, meta["dim"])
    lay = {l["path"]: l for l in meta["layers"]}["x/y"]
    np.testing.assert_array_equal(
        chunk[:, lay["offset"] : lay["offset"] + lay["dim"]], g["x/y"][4:8].reshape(4, -1)
    )
    plain = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{path}/shards/0/grads"}}
    ).result()
    assert plain.shape[0] >= 11
    # reopening resumes after a partial last chunk (11 rows, chunks of 4) and appends in place
    more = {k: rng.normal(size=(5,) + v.shape[1:]).astype(np.float32) for k, v in g.items()}
    with LogWriter(path, proj, writer_id="0") as w:
        assert w.committed_rows == 11
        w.write(more, [f"more-{i}" for i in range(5)])
    got, got_ids = open_log(path).read()
    np.testing.assert_array_equal(got["z"], np.concatenate([g["z"], more["z"]]))
    assert list(got_ids) == ids + [f"more-{i}" for i in range(5)]
    raw_ids = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{path}/shards/0/ids"}}
    ).result()
    assert bytes(raw_ids[10].read().result()).rstrip(b"\0").decode() == ids[10]


def test_bfloat16_is_stored_as_uint16_bits(tmp_path):
    import ml_dtypes

    path = str(tmp_path / "log")
    g, ids = _batch(0)
    g = {"a": g["a"] / 1000.0}
    with LogWriter(path, PROJ, dtype="bfloat16", writer_id="0") as w:
        w.write(g, ids)
    raw = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{path}/shards/0/grads"}}
    ).result()
    bits = raw[:4].read().result()
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(
        bits.view(ml_dtypes.bfloat16).astype(np.float32),
        g["a"].reshape(4, -1).astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    got, _ = open_log(path).read()
    assert got["a"].dtype == ml_dtypes.bfloat16


def test_async_writes_are_bounded_and_commit_in_order(tmp_path):
    path = str(tmp_path / "log")
    w = LogWriter(path, PROJ, chunk_rows=4, max_in_flight=2, writer_id="0")
    for i in range(10):
        g, ids = _batch(i)
        w.write_async(g, ids)
        assert len(w._pending) <= 2
        committed = json.load(open(os.path.join(path, "shards/0/committed.json")))["rows"]
        assert committed == w.committed_rows <= w.num_rows == 4 * (i + 1)
        assert committed % 4 == 0
    w.close()
    assert open_log(path).num_rows == 40


def test_write_error_surfaces_in_the_caller(tmp_path):
    path = str(tmp_path / "log")
    w = LogWriter(path, PROJ, chunk_rows=4, max_in_flight=8, writer_id="0")
    w.write(*_batch(0))
    # a directory where chunk 1 should go makes tensorstore's background write fail
    os.makedirs(os.path.join(path, "shards/0/grads/1.0/blocker"))
    with pytest.raises(Exception):  # noqa: B017 - tensorstore surfaces the failure by several types
        w.write_async(*_batch(1))
        w.flush()
    with pytest.raises(RuntimeError, match="failed earlier"):
        w.write_async(*_batch(2))
    assert open_log(path).num_rows == 4  # the committed prefix is intact


_CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from jaxinf import LogWriter
proj = {proj!r}
w = LogWriter({path!r}, proj, chunk_rows=4, max_in_flight=3, writer_id="0")
for i in range(400):
    ids = np.arange(i * 4, (i + 1) * 4)
    g = (1000.0 * ids[:, None] + np.arange(6)[None, :]).reshape(4, 2, 3).astype(np.float32)
    w.write_async({{"a": g}}, ids)
    print(i, w.committed_rows, flush=True)
    time.sleep(0.01)
"""


def test_killed_writer_resumes_with_every_row_exactly_once(tmp_path):
    path = str(tmp_path / "log")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(root=ROOT, proj=PROJ, path=path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if int(line.split()[0]) >= 15:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    log = open_log(path)  # opens, and says how much is committed
    done = log.num_rows
    assert 0 < done < 1600 and done % 4 == 0
    # resume: rerun the whole loop; committed ids are skipped, the rest appended once
    with pytest.warns(RuntimeWarning, match="stale lock"):
        w = LogWriter(path, PROJ, on_duplicate="skip", writer_id="0")
    with w:
        assert w.committed_rows == done
        for i in range(50):
            w.write_async(*_batch(i))
    log = open_log(path)
    got, ids = log.read()
    expect = max(done, 200)
    assert log.num_rows == expect
    np.testing.assert_array_equal(np.sort(ids), np.arange(expect))
    assert len(set(ids.tolist())) == len(ids)
    np.testing.assert_array_equal(got["a"].reshape(-1, 6)[:, 0], 1000.0 * ids)
    # statistics cover every row once (the killed writer never saved its Fisher sums)
    rows = got["a"].reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(
        log.statistics()["a"].covariance, rows.T @ rows / len(rows), rtol=1e-6
    )


def test_duplicate_ids_are_errors(tmp_path):
    path = str(tmp_path / "log")
    with LogWriter(path, PROJ, writer_id="0") as w:
        w.write(*_batch(0))
        with pytest.raises(ValueError, match=r"already in the log.*\[0, 1, 2, 3\]"):
            w.write(*_batch(0))
        g, _ = _batch(1)
        with pytest.raises(ValueError, match="within one batch"):
            w.write(g, [9, 9, 10, 11])
    # another writer (shard) of the same log sees the committed ids
    with LogWriter(path, PROJ, writer_id="1") as w1:
        with pytest.raises(ValueError, match="already in the log"):
            w1.write(*_batch(0))
        w1.write(*_batch(1))
    log = open_log(path)
    assert log.num_rows == 8 and [s.name for s in log.shards] == ["0", "1"]
    np.testing.assert_array_equal(log.ids(), np.arange(8))


def test_mismatched_projection_and_dtype_are_errors(tmp_path):
    path = str(tmp_path / "log")
    with LogWriter(path, PROJ) as w:
        w.write(*_batch(0))
    with pytest.raises(ValueError, match=r"seed \(7 in the log vs 8\)"):
        LogWriter(path, {**PROJ, "seed": 8})
    with pytest.raises(ValueError, match=r"layers.a.k_in"):
        LogWriter(path, {**PROJ, "layers": {"a": {**PROJ["layers"]["a"], "k_in": 4}}})
    with pytest.raises(ValueError, match="dtype mismatch.*float32.*bfloat16"):
        LogWriter(path, PROJ, dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        LogWriter(str(tmp_path / "other"), PROJ, dtype="int8")
    fresh = str(tmp_path / "fresh")
    with pytest.raises(TypeError, match="must be floating point"):
        LogWriter(fresh, PROJ).write({"a": np.zeros((2, 2, 3), np.int32)}, [0, 1])
    assert not os.path.exists(os.path.join(fresh, "metadata.json"))  # nothing half-created
    with LogWriter(path, PROJ, writer_id="2") as w:
        with pytest.raises(TypeError, match="must be floating point"):
            w.write({"a": np.zeros((2, 2, 3), np.int32)}, [100, 101])
        with pytest.raises(ValueError, match=r"grads\['a'\] has shape"):
            w.write({"a": np.zeros((2, 3, 3), np.float32)}, [100, 101])
        with pytest.raises(TypeError, match="ids are strs but this log stores int ids"):
            w.write({"a": np.zeros((2, 2, 3), np.float32)}, ["p", "q"])
        with pytest.raises(ValueError, match="ids has 1 entries"):
            w.write({"a": np.zeros((2, 2, 3), np.float32)}, [100])


def test_truncated_or_foreign_directories_are_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        open_log(str(tmp_path / "nope"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="missing metadata.json"):
        open_log(str(foreign))
    with pytest.raises(ValueError, match="not empty and is not a jaxinf log"):
        LogWriter(str(foreign), PROJ)
    (foreign / "metadata.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not jaxinf log metadata"):
        open_log(str(foreign))

    path = str(tmp_path / "log")
    with LogWriter(path, PROJ, chunk_rows=4, writer_id="0") as w:
        for i in range(3):
            w.write_async(*_batch(i))
    meta_text = open(os.path.join(path, "metadata.json")).read()
    open(os.path.join(path, "metadata.json"), "w").write(meta_text[: len(meta_text) // 2])
    with pytest.raises(ValueError, match="metadata.*not valid JSON"):
        open_log(path)
    open(os.path.join(path, "metadata.json"), "w").write(meta_text)
    os.remove(os.path.join(path, "shards/0/grads/1.0"))
    with pytest.raises(ValueError, match=r"chunk 1.0 .*missing.*truncated"):
        open_log(path)
    with pytest.raises(ValueError, match="truncated"):
        LogWriter(path, PROJ, writer_id="0")
    os.remove(os.path.join(path, "shards/0/grads/.zarray"))
    with pytest.raises(ValueError, match="missing zarr array"):
        open_log(path)


_PROC = r"""
import sys
sys.path.insert(0, {root!r})
import numpy as np
from jaxinf import LogWriter
wid = int(sys.argv[1])
with LogWriter({path!r}, {proj!r}, writer_id=f"proc{{wid}}", chunk_rows=4) as w:
    for i in range(wid, 20, 2):  # process 0 writes even batches, process 1 odd ones
        ids = np.arange(i * 4, (i + 1) * 4)
        g = (1000.0 * ids[:, None] + np.arange(6)[None, :]).reshape(4, 2, 3).astype(np.float32)
        w.write_async({{"a": g}}, ids)
"""


def test_two_processes_write_disjoint_shards_of_one_log(tmp_path):
    path = str(tmp_path / "log")  # does not exist yet: both processes race to create it
    code = _PROC.format(root=ROOT, path=path, proj=PROJ)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)], env=env, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    log = open_log(path)
    assert [s.name for s in log.shards] == ["proc0", "proc1"]
    got, ids = log.read()
    np.testing.assert_array_equal(np.sort(ids), np.arange(80))
    np.testing.assert_array_equal(got["a"].reshape(-1, 6)[:, 0], 1000.0 * ids)
    rows = got["a"].reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(log.statistics()["a"].covariance, rows.T @ rows / 80, rtol=1e-6)


def test_grads_must_match_the_projection_metadata_shapes(tmp_path):
    with pytest.raises(
        ValueError, match=r"grads\['a'\]: k_in is 2 but the projection metadata says 3"
    ):
        LogWriter(str(tmp_path / "l1"), PROJ).write({"a": np.zeros((2, 2, 2), np.float32)}, [0, 1])
    with pytest.raises(ValueError, match="layer 'b' is not in the projection metadata"):
        LogWriter(str(tmp_path / "l2"), PROJ).write(
            {"a": np.zeros((2, 2, 3), np.float32), "b": np.zeros((2, 1, 1), np.float32)}, [0, 1]
        )
