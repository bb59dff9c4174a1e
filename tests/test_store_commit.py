"""Commit protocol: a crash before any write resumes to every row exactly once; damage is named."""

import json
import os
import subprocess

import numpy as np
import pytest

from jaxinf import LogFormatError, LogLockedError, LogWriter, open_log
from jaxinf._src import writer as writer_mod

PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}
BATCHES = [(0, 5), (5, 9), (9, 14), (14, 15)]  # ragged batches over chunks of 4 rows
N = 15


def _rows(a, b):
    ids = np.arange(a, b)
    return {"a": (1000.0 * ids[:, None] + np.arange(6)).reshape(-1, 2, 3)}, ids


def _write_all(path, **kw):
    with LogWriter(path, PROJ, dtype="float64", writer_id="w", chunk_rows=4, **kw) as w:
        for a, b in BATCHES:
            w.write_async(*_rows(a, b))
            if b == 9:
                w.flush()  # a partial chunk is committed, then rewritten with more rows


class _Crash(Exception):
    pass


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _simulate_kill(w):
    """Leave the writer as a SIGKILL would: its lock names a process that no longer runs."""
    w._release.detach()
    json.dump(
        {**w._lock.owner, "pid": _dead_pid()}, open(os.path.join(w._shard_dir, "lock.json"), "w")
    )


def _check_exactly_once(path):
    log = open_log(path)
    got, ids = log.read()
    assert sorted(ids.tolist()) == list(range(N))
    np.testing.assert_array_equal(got["a"].reshape(-1, 6)[:, 0], 1000.0 * ids)
    rows = got["a"].reshape(-1, 6)
    np.testing.assert_allclose(log.statistics()["a"].covariance, rows.T @ rows / N, rtol=1e-12)


def _steps(tmp_path):
    seen = []
    orig = writer_mod._before_write
    writer_mod._before_write = seen.append
    try:
        _write_all(str(tmp_path / "count"))
    finally:
        writer_mod._before_write = orig
    return seen


def test_the_protocol_has_the_documented_steps(tmp_path):
    steps = _steps(tmp_path)
    assert steps[:4] == ["metadata", "create grads", "create ids", "first commit record"]
    assert {"grow", "grads chunk", "ids chunk", "commit record", "fisher version"} <= set(steps)


def test_a_crash_before_any_write_resumes_with_every_row_exactly_once(tmp_path, monkeypatch):
    # a process crash, not a machine crash, is simulated: skip the commit records' fsync (slow)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    steps = _steps(tmp_path)
    for k, step in enumerate(steps):
        path = str(tmp_path / f"crash{k}")
        calls = []

        def crash(what, k=k, calls=calls):
            calls.append(what)
            if len(calls) == k + 1:
                raise _Crash(what)

        monkeypatch.setattr(writer_mod, "_before_write", crash)
        w = None
        try:
            w = LogWriter(path, PROJ, dtype="float64", writer_id="w", chunk_rows=4)
            for a, b in BATCHES:
                w.write_async(*_rows(a, b))
                if b == 9:
                    w.flush()
            w.close()
        except _Crash:
            pass
        else:
            raise AssertionError(f"step {k} ({step}) was not reached")
        _simulate_kill(w)
        monkeypatch.setattr(writer_mod, "_before_write", lambda what: None)
        if os.path.exists(os.path.join(path, "metadata.json")):
            before = open_log(path).num_rows  # every intermediate state opens
            assert 0 <= before <= N, (k, step)
        with pytest.warns(RuntimeWarning, match="stale lock"):
            w2 = LogWriter(path, PROJ, dtype="float64", writer_id="w", on_duplicate="skip")
        with w2:
            for a, b in BATCHES:
                w2.write_async(*_rows(a, b))
        _check_exactly_once(path)


def test_second_writer_with_the_same_id_is_refused(tmp_path):
    path = str(tmp_path / "log")
    w = LogWriter(path, PROJ, writer_id="w")
    with pytest.raises(LogLockedError, match="being written by process"):
        LogWriter(path, PROJ, writer_id="w")
    w.write(*_rows(0, 3))
    other = LogWriter(path, PROJ, writer_id="v")  # another id is another shard: fine
    other.close()
    w.close()
    LogWriter(path, PROJ, writer_id="w").close()  # released at close
    assert open_log(path).num_rows == 3


def test_default_writer_ids_differ_per_writer(tmp_path):
    path = str(tmp_path / "log")
    with LogWriter(path, PROJ) as w1, LogWriter(path, PROJ) as w2:
        assert w1.writer_id != w2.writer_id
        w1.write(*_rows(0, 2))
        w2.write(*_rows(2, 4))
    assert sorted(open_log(path).ids().tolist()) == [0, 1, 2, 3]


def _tree(path):
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_close_writes_nothing_when_nothing_was_added(tmp_path):
    path = str(tmp_path / "log")
    _write_all(path)
    before = _tree(path)
    with LogWriter(path, PROJ, dtype="float64", writer_id="w", on_duplicate="skip") as w:
        for a, b in BATCHES:
            w.write_async(*_rows(a, b))  # all already there: skipped
        assert w.num_rows == N
    assert _tree(path) == before


def test_a_reader_writes_nothing(tmp_path):
    import jaxinf

    path = str(tmp_path / "log")
    _write_all(path, statistics=False)  # no Fisher sums saved: the reader computes them
    before = _tree(path)
    log = open_log(path)
    log.statistics()
    test, _ = _rows(3, 5)
    jaxinf.query(log, test, PROJ, top_k=2, progress=False)
    jaxinf.self_influence(path, progress=False)
    assert _tree(path) == before


def _damaged(tmp_path, name):
    path = str(tmp_path / name)
    _write_all(path)
    return path, os.path.join(path, "shards", "w")


def test_missing_or_bad_commit_record_is_a_named_error(tmp_path):
    path, shard = _damaged(tmp_path, "nocommit")
    os.remove(os.path.join(shard, "committed.json"))
    for fn in (
        lambda: open_log(path),
        lambda: LogWriter(path, PROJ, dtype="float64", writer_id="w"),
    ):
        with pytest.raises(LogFormatError, match=r"no commit record.*write \{\"rows\": n\}"):
            fn()
    path, shard = _damaged(tmp_path, "badcommit")
    open(os.path.join(shard, "committed.json"), "w").write('{"rows": "many"}')
    with pytest.raises(LogFormatError, match="invalid commit record"):
        open_log(path)


def test_missing_array_is_refused_and_never_recreated(tmp_path):
    path, shard = _damaged(tmp_path, "nozarray")
    os.remove(os.path.join(shard, "grads", ".zarray"))
    chunks = sorted(os.listdir(os.path.join(shard, "grads")))
    with pytest.raises(LogFormatError, match="missing zarr array"):
        open_log(path)
    with pytest.raises(LogFormatError, match="never recreates"):
        LogWriter(path, PROJ, dtype="float64", writer_id="w")
    assert sorted(os.listdir(os.path.join(shard, "grads"))) == chunks  # nothing touched


def test_missing_chunk_short_array_and_bad_layer_table_are_named_errors(tmp_path):
    path, shard = _damaged(tmp_path, "nochunk")
    os.remove(os.path.join(shard, "ids", "1"))
    with pytest.raises(LogFormatError, match=r"chunk 1 .*missing"):
        open_log(path)
    path, shard = _damaged(tmp_path, "short")
    zpath = os.path.join(shard, "grads", ".zarray")
    z = json.load(open(zpath))
    z["shape"][0] = 8
    json.dump(z, open(zpath, "w"))
    with pytest.raises(LogFormatError, match="truncated"):
        open_log(path)
    path, _ = _damaged(tmp_path, "layers")
    mpath = os.path.join(path, "metadata.json")
    meta = json.load(open(mpath))
    meta["layers"][0]["offset"] = 1
    json.dump(meta, open(mpath, "w"))
    for fn in (lambda: open_log(path), lambda: LogWriter(path, PROJ, dtype="float64")):
        with pytest.raises(LogFormatError, match="corrupted layer table"):
            fn()
    meta["layers"][0].update(offset=0, dim=5)
    json.dump(meta, open(mpath, "w"))
    with pytest.raises(LogFormatError, match="corrupted layer table"):
        open_log(path)


def test_damaged_derived_data_is_a_named_error(tmp_path):
    path, shard = _damaged(tmp_path, "fisher")
    os.remove(os.path.join(shard, "fisher", f"r{N}", "layer_0", "0.0"))
    with pytest.raises(LogFormatError, match=r"fisher.*delete"):
        open_log(path).statistics()
    path, _ = _damaged(tmp_path, "eig")
    open_log(path).statistics(cache=True)
    (version,) = os.listdir(os.path.join(path, "statistics"))
    os.remove(os.path.join(path, "statistics", version, "layer_0", "eigenvectors", "0.0"))
    with pytest.raises(LogFormatError, match=r"eigenvectors.*missing.*delete"):
        open_log(path).statistics()


def test_a_lock_from_another_host_is_not_broken(tmp_path):
    path = str(tmp_path / "log")
    w = LogWriter(path, PROJ, writer_id="w")
    w._release.detach()
    lock = os.path.join(w._shard_dir, "lock.json")
    json.dump({**w._lock.owner, "host": "elsewhere", "pid": _dead_pid()}, open(lock, "w"))
    with pytest.raises(LogLockedError, match=r"host 'elsewhere'.*cannot be checked.*delete"):
        LogWriter(path, PROJ, writer_id="w")
    os.remove(lock)  # the documented repair once that job is known to be gone
    LogWriter(path, PROJ, writer_id="w").close()
