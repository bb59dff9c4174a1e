"""Commit protocol: a crash before any write resumes to every row exactly once; damage is named.

The tests that take ``storage`` run on the local filesystem and on tensorstore's in-memory
kvstore (``tests/test_store_kvstore.py`` runs them on S3 too, when moto is installed).
"""

import json
import os
import subprocess
import uuid

import numpy as np
import pytest

from jaxinf import LogFormatError, LogLockedError, LogWriter, open_log
from jaxinf._src import store_files as files
from jaxinf._src import writer as writer_mod

PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}
BATCHES = [(0, 5), (5, 9), (9, 14), (14, 15)]  # ragged batches over chunks of 4 rows
N = 15


def _rows(a, b):
    ids = np.arange(a, b)
    return {"a": (1000.0 * ids[:, None] + np.arange(6)).reshape(-1, 2, 3)}, ids


@pytest.fixture(params=["local", "memory"])
def storage(request):
    return request.param


def where(tmp_path, storage, name):
    """A log location: a directory, a fresh key prefix of the in-memory kvstore, or (for a
    callable ``storage``, see ``tests/test_store_kvstore.py``) what it returns for ``name``."""
    if callable(storage):
        return storage(name)
    if storage == "local":
        return str(tmp_path / name)
    return f"memory://{uuid.uuid4().hex}/{name}/"


def _loc(path, key):
    return files.location(path) / key


def _delete(path, key):
    loc = _loc(path, key)
    if loc.st.local:
        os.remove(loc.path)
    else:
        assert loc.st.write(loc.key, None) is not None


def _put(path, key, data: bytes):
    loc = _loc(path, key)
    if loc.st.local:
        open(loc.path, "wb").write(data)
    else:
        loc.st.write(loc.key, data)


def _get_json(path, key):
    return files.read_json(_loc(path, key), key)


def _names(path, key):
    loc = _loc(path, key)
    return sorted(loc.st.list(loc.key))


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
    lock = w._shard_dir / "lock.json"
    _put(lock.st, lock.key, json.dumps({**w._lock.owner, "pid": _dead_pid()}).encode())


def _check_exactly_once(path):
    log = open_log(path)
    got, ids = log.read()
    assert sorted(ids.tolist()) == list(range(N))
    np.testing.assert_array_equal(got["a"].reshape(-1, 6)[:, 0], 1000.0 * ids)
    rows = got["a"].reshape(-1, 6)
    np.testing.assert_allclose(log.statistics()["a"].covariance, rows.T @ rows / N, rtol=1e-12)


def _steps(tmp_path, storage="local"):
    seen = []
    orig = writer_mod._before_write
    writer_mod._before_write = seen.append
    try:
        _write_all(where(tmp_path, storage, "count"))
    finally:
        writer_mod._before_write = orig
    return seen


def test_the_protocol_has_the_documented_steps(tmp_path):
    steps = _steps(tmp_path)
    assert steps[:4] == ["metadata", "create grads", "create ids", "first commit record"]
    assert {"grow", "grads chunk", "ids chunk", "commit record", "fisher version"} <= set(steps)


def test_a_crash_before_any_write_resumes_with_every_row_exactly_once(
    tmp_path, monkeypatch, storage, only=None
):
    # a process crash, not a machine crash, is simulated: skip the commit records' fsync (slow)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    steps = _steps(tmp_path, storage)
    crashed = set()
    for k, step in enumerate(steps):
        if only is not None and (step not in only or step in steps[:k]):
            continue  # a slow storage: the first write of each kind named in ``only``
        path = where(tmp_path, storage, f"crash{k}")
        calls = []
        nth = steps[:k].count(step)  # crash before the nth+1 write of this kind

        def crash(what, step=step, nth=nth, calls=calls):
            if what == step and calls.count(what) == nth:
                raise _Crash(what)
            calls.append(what)

        monkeypatch.setattr(writer_mod, "_before_write", crash)
        w = None
        try:
            w = LogWriter(path, PROJ, dtype="float64", writer_id="w", chunk_rows=4)
            for a, b in BATCHES:
                w.write_async(*_rows(a, b))
                if b == 9:
                    w.flush()
            w.close()
        except _Crash as e:
            crashed.add(str(e))
        else:
            # commits follow completed chunk writes, so under load a run can coalesce two
            # commit records into one and make fewer writes of a kind; it must be complete
            assert calls.count(step) <= nth, (k, step, calls)
            _check_exactly_once(path)
            continue
        _simulate_kill(w)
        monkeypatch.setattr(writer_mod, "_before_write", lambda what: None)
        if files.exists(_loc(path, "metadata.json")):
            before = open_log(path).num_rows  # every intermediate state opens
            assert 0 <= before <= N, (k, step)
        with pytest.warns(RuntimeWarning, match="stale lock"):
            w2 = LogWriter(path, PROJ, dtype="float64", writer_id="w", on_duplicate="skip")
        with w2:
            for a, b in BATCHES:
                w2.write_async(*_rows(a, b))
        _check_exactly_once(path)
    assert crashed == set(steps if only is None else only), "every kind of write was crashed"


def test_second_writer_with_the_same_id_is_refused(tmp_path, storage):
    path = where(tmp_path, storage, "log")
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
    """Every file (key) of a log with its size and mtime (kvstore: its storage generation)."""
    st = files.open_storage(path)
    if not st.local:
        return {k: st.kv.read(k).result().stamp.generation for k in st.kv.list().result()}
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_close_writes_nothing_when_nothing_was_added(tmp_path, storage):
    path = where(tmp_path, storage, "log")
    _write_all(path)
    before = _tree(path)
    with LogWriter(path, PROJ, dtype="float64", writer_id="w", on_duplicate="skip") as w:
        for a, b in BATCHES:
            w.write_async(*_rows(a, b))  # all already there: skipped
        assert w.num_rows == N
    assert _tree(path) == before


def test_a_reader_writes_nothing(tmp_path, storage):
    import jaxinf

    path = where(tmp_path, storage, "log")
    _write_all(path, statistics=False)  # no Fisher sums saved: the reader computes them
    before = _tree(path)
    log = open_log(path)
    log.statistics()
    test, _ = _rows(3, 5)
    jaxinf.query(log, test, PROJ, top_k=2, progress=False)
    jaxinf.self_influence(path if isinstance(path, str) else log, progress=False)
    assert _tree(path) == before


def _damaged(tmp_path, storage, name):
    path = where(tmp_path, storage, name)
    _write_all(path)
    return path, "shards/w"


def test_missing_or_bad_commit_record_is_a_named_error(tmp_path, storage):
    path, shard = _damaged(tmp_path, storage, "nocommit")
    _delete(path, f"{shard}/committed.json")
    for fn in (
        lambda: open_log(path),
        lambda: LogWriter(path, PROJ, dtype="float64", writer_id="w"),
    ):
        with pytest.raises(LogFormatError, match=r"no commit record.*write \{\"rows\": n\}"):
            fn()
    path, shard = _damaged(tmp_path, storage, "badcommit")
    _put(path, f"{shard}/committed.json", b'{"rows": "many"}')
    with pytest.raises(LogFormatError, match="invalid commit record"):
        open_log(path)


def test_missing_array_is_refused_and_never_recreated(tmp_path, storage):
    path, shard = _damaged(tmp_path, storage, "nozarray")
    _delete(path, f"{shard}/grads/.zarray")
    chunks = _names(path, f"{shard}/grads")
    with pytest.raises(LogFormatError, match="missing zarr array"):
        open_log(path)
    with pytest.raises(LogFormatError, match="never recreates"):
        LogWriter(path, PROJ, dtype="float64", writer_id="w")
    assert _names(path, f"{shard}/grads") == chunks  # nothing touched


def test_missing_chunk_short_array_and_bad_layer_table_are_named_errors(tmp_path, storage):
    path, shard = _damaged(tmp_path, storage, "nochunk")
    _delete(path, f"{shard}/ids/1")
    with pytest.raises(LogFormatError, match=r"chunk 1 .*missing"):
        open_log(path)
    path, shard = _damaged(tmp_path, storage, "short")
    z = _get_json(path, f"{shard}/grads/.zarray")
    z["shape"][0] = 8
    _put(path, f"{shard}/grads/.zarray", json.dumps(z).encode())
    with pytest.raises(LogFormatError, match="truncated"):
        open_log(path)
    path, _ = _damaged(tmp_path, storage, "layers")
    meta = _get_json(path, "metadata.json")
    meta["layers"][0]["offset"] = 1
    _put(path, "metadata.json", json.dumps(meta).encode())
    for fn in (lambda: open_log(path), lambda: LogWriter(path, PROJ, dtype="float64")):
        with pytest.raises(LogFormatError, match="corrupted layer table"):
            fn()
    meta["layers"][0].update(offset=0, dim=5)
    _put(path, "metadata.json", json.dumps(meta).encode())
    with pytest.raises(LogFormatError, match="corrupted layer table"):
        open_log(path)


def test_damaged_derived_data_is_a_named_error(tmp_path, storage):
    path, shard = _damaged(tmp_path, storage, "fisher")
    _delete(path, f"{shard}/fisher/r{N}/layer_0/0.0")
    with pytest.raises(LogFormatError, match=r"fisher.*delete"):
        open_log(path).statistics()
    path, _ = _damaged(tmp_path, storage, "eig")
    open_log(path).statistics(cache=True)
    (version,) = _names(path, "statistics")
    _delete(path, f"statistics/{version.rstrip('/')}/layer_0/eigenvectors/0.0")
    with pytest.raises(LogFormatError, match=r"eigenvectors.*missing.*delete"):
        open_log(path).statistics()


def test_a_lock_from_another_host_is_not_broken(tmp_path, storage):
    path = where(tmp_path, storage, "log")
    w = LogWriter(path, PROJ, writer_id="w")
    w._release.detach()
    owner = {**w._lock.owner, "host": "elsewhere", "pid": _dead_pid()}
    _put(path, "shards/w/lock.json", json.dumps(owner).encode())
    with pytest.raises(LogLockedError, match=r"host 'elsewhere'.*cannot be checked.*delete"):
        LogWriter(path, PROJ, writer_id="w")
    _delete(path, "shards/w/lock.json")  # the documented repair once that job is known gone
    LogWriter(path, PROJ, writer_id="w").close()
