"""Logs on tensorstore kvstores: the in-memory store always, S3 (a local moto server) if installed.

The fault-injection and concurrent-writer tests of ``test_store_commit.py`` and
``test_store_concurrent.py`` run on the local filesystem and the in-memory kvstore there; here
the same test functions run on S3, beside what only a kvstore has (conditional writes).
"""

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings

import numpy as np
import pytest

import jaxinf
from jaxinf import LogLockedError, LogWriter, open_log
from jaxinf._src import store_files as files
from jaxinf._src.query import _self_params

HERE = os.path.dirname(os.path.abspath(__file__))
PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}


def _sibling(name):
    """Load a sibling test module by its file (its tests are reused with another storage)."""
    spec = importlib.util.spec_from_file_location(f"_kv_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(ids):
    ids = np.asarray(ids)
    g = np.random.default_rng(0).normal(size=(64, 6))[ids] + ids[:, None] / 100.0
    return {"a": g.reshape(-1, 2, 3)}, ids


def _memory(name="log"):
    return f"memory://{uuid.uuid4().hex}/{name}/"


# ----------------------------------------------------------------------------- in-memory


def test_a_log_on_the_memory_kvstore_reads_back_and_answers_queries_exactly():
    url = _memory()
    with LogWriter(url, PROJ, dtype="float64", writer_id="a", chunk_rows=4) as w:
        w.write_async(*_rows(range(0, 7)))
        w.write_async(*_rows(range(7, 10)))
    spec = {"driver": "memory", "path": url.removeprefix("memory://")}
    with LogWriter(spec, PROJ, dtype="float64", writer_id="b", chunk_rows=4) as w:
        w.write(*_rows(range(10, 13)))  # a spec dict names the same log as its URL
    log = open_log(url)
    assert log.path == url.rstrip("/") and [s.name for s in log.shards] == ["a", "b"]
    got, ids = log.read()
    assert ids.tolist() == list(range(13))
    want = _rows(range(13))[0]["a"]
    np.testing.assert_array_equal(got["a"], want)
    g = want.reshape(13, -1)
    stats = log.statistics(cache=True)["a"]
    np.testing.assert_allclose(stats.covariance, g.T @ g / 13, rtol=1e-12)
    # the saved version is what the next reader uses
    root = files.location(url)
    (version,) = root.st.list("statistics")
    assert files.exists(root / "statistics" / version.rstrip("/") / "statistics.json")
    again = open_log(spec).statistics()["a"]
    np.testing.assert_array_equal(again.eigenvectors, stats.eigenvectors)
    test = _rows([3, 50])[0]
    res = jaxinf.query(url, test, PROJ, top_k=13, progress=False)
    by_spec = jaxinf.query(spec, test, PROJ, top_k=13, progress=False)
    np.testing.assert_array_equal(by_spec.top_rows, res.top_rows)
    ref = np.asarray(jaxinf.influence_scores({"a": want}, test))
    got = np.take_along_axis(res.top_scores, np.argsort(res.top_rows, 1), 1)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_self_influence_is_saved_on_the_kvstore_and_read_back():
    url = _memory()
    with LogWriter(url, PROJ, dtype="float64", writer_id="a", chunk_rows=4) as w:
        w.write(*_rows(range(9)))
    si = jaxinf.self_influence(url, cache=True, progress=False)
    log = open_log(url)
    root = files.location(url)
    (version,) = root.st.list("self_influence")
    assert files.exists(root / "self_influence" / version.rstrip("/") / "record.json")
    saved = log.load_derived("self_influence", _self_params(si.damping))
    np.testing.assert_array_equal(saved["scores"], si.scores)
    again = jaxinf.self_influence(url, progress=False)
    np.testing.assert_array_equal(again.scores, si.scores)


def _files_of(d):
    out = {}
    for base, _, names in os.walk(d):
        for n in names:
            p = os.path.join(base, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_the_file_kvstore_and_a_path_write_the_same_bytes(tmp_path):
    """The kvstore code path writes exactly the files the local one does; each opens the other."""
    for where in (str(tmp_path / "local"), f"file://{tmp_path}/kv/"):
        with LogWriter(where, PROJ, dtype="float64", writer_id="w", chunk_rows=4) as w:
            w.write_async(*_rows(range(9)))
        open_log(where).statistics(cache=True)
    local, kv = _files_of(tmp_path / "local"), _files_of(tmp_path / "kv")
    assert sorted(local) == sorted(kv) and local == kv
    a = open_log(str(tmp_path / "kv")).read()  # a kvstore-written log read as a directory
    b = open_log(f"file://{tmp_path}/local").read()  # and the other way round
    np.testing.assert_array_equal(a[0]["a"], b[0]["a"])


def _race(fn, n=8):
    """Run ``fn(i)`` in threads ``i < n`` released together; their results (or exceptions)."""
    start, out = threading.Barrier(n), [None] * n

    def run(i):
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _exclusive_create_has_one_winner(root):
    for k in range(3):
        key = root / f"race{k}.json"
        got = _race(lambda i: files.create_json_exclusive(key, {"who": i}))
        assert sorted(got) == [False] * 7 + [True], got


def _stale_lock_goes_to_exactly_one_taker(root, dead_pid):
    shard = root / "shards" / "w"
    owner = {"host": socket.gethostname(), "pid": dead_pid, "pid_start": "0", "token": "old"}
    for _ in range(3):
        files.atomic_write_json(shard / "lock.json", owner)
        locks = [files.ShardLock(shard) for _ in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "stale lock ... taken over"
            got = _race(lambda i: locks[i].acquire(), n=4)
        held = [l for l in locks if l.held]
        assert len(held) == 1, got
        assert all(isinstance(e, LogLockedError) for e in got if e is not None), got
        assert files.read_json(shard / "lock.json", "lock")["token"] == held[0].owner["token"]
        held[0].release()
        assert not files.exists(shard / "lock.json")


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("kvstore", ["memory", "file"])
def test_racing_creates_and_lock_takeovers_have_exactly_one_winner(tmp_path, kvstore):
    root = files.location(_memory() if kvstore == "memory" else f"file://{tmp_path}/log/")
    _exclusive_create_has_one_winner(root)
    _stale_lock_goes_to_exactly_one_taker(root, _dead_pid())


def test_a_writer_whose_lock_was_removed_stops_at_its_next_commit():
    url = _memory()
    a = LogWriter(url, PROJ, dtype="float64", writer_id="w", chunk_rows=4)
    a.write(*_rows(range(12)))  # the arrays have room for 16 rows: no resize below
    root = files.location(url)
    root.st.write("shards/w/lock.json", None)  # the lock deleted while its writer still runs
    with LogWriter(url, PROJ, dtype="float64", writer_id="w") as b:
        b.write(*_rows(range(12, 16)))
    with pytest.raises(LogLockedError, match="changed by another writer.*stops"):
        a.write(*_rows(range(20, 24)))
    with pytest.raises(RuntimeError, match="failed earlier"):
        a.write(*_rows(range(24, 28)))
    a.close()
    assert files.read_json(root / "shards/w/committed.json", "commit") == {"rows": 16}


def test_locations_that_are_not_logs_are_refused():
    with pytest.raises(TypeError, match="path, a kvstore URL or a kvstore spec"):
        LogWriter(42, PROJ)
    with pytest.raises(TypeError, match="with a 'driver'"):
        open_log({"path": "x/"})
    with pytest.raises(ValueError, match="not a jaxinf log: missing metadata.json"):
        open_log(_memory())
    url = _memory()
    files.location(url).st.write("notes.txt", b"keep")
    with pytest.raises(ValueError, match="not empty and is not a jaxinf log"):
        LogWriter(url, PROJ)
    assert files.location(url).st.list("") == ["notes.txt"]


# ----------------------------------------------------------------------------- S3 (moto)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3-compatible server (moto); yields ``name -> kvstore spec`` of a fresh prefix."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip('moto server not installed (pip install "moto[server]")')
    port = _free_port()
    d = tmp_path_factory.mktemp("aws")
    (d / "credentials").write_text(
        "[default]\naws_access_key_id = test\naws_secret_access_key = t\n"
    )
    (d / "config").write_text("[default]\nregion = us-east-1\n")
    env = {
        "AWS_SHARED_CREDENTIALS_FILE": str(d / "credentials"),
        "AWS_CONFIG_FILE": str(d / "config"),
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/logs", method="PUT"))
                break
            except OSError:
                if server.poll() is not None:
                    pytest.skip("moto server did not start")
                time.sleep(0.05)
        else:
            pytest.skip("moto server did not answer")

        def where(name="log"):
            return {
                "driver": "s3",
                "bucket": "logs",
                "endpoint": endpoint,
                "aws_region": "us-east-1",
                "path": f"{uuid.uuid4().hex}/{name}/",
            }

        yield where
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_commit_protocol_on_s3(s3, tmp_path, monkeypatch):
    commit = _sibling("test_store_commit")
    # the writes that differ on a kvstore (conditional creates and records, versions without a
    # rename); all 24 crash points run on the in-memory kvstore in test_store_commit.py
    records = ("metadata", "first commit record", "commit record", "fisher version")
    commit.test_a_crash_before_any_write_resumes_with_every_row_exactly_once(
        tmp_path, monkeypatch, s3, only=records
    )
    commit.test_second_writer_with_the_same_id_is_refused(tmp_path, s3)
    commit.test_close_writes_nothing_when_nothing_was_added(tmp_path, s3)
    commit.test_missing_or_bad_commit_record_is_a_named_error(tmp_path, s3)
    commit.test_missing_chunk_short_array_and_bad_layer_table_are_named_errors(tmp_path, s3)
    commit.test_a_lock_from_another_host_is_not_broken(tmp_path, s3)


def test_concurrent_writers_and_conditional_writes_on_s3(s3, tmp_path):
    concurrent = _sibling("test_store_concurrent")
    concurrent.test_rows_a_concurrent_writer_committed_first_are_dropped_with_skip(
        tmp_path, "str", s3
    )
    concurrent.test_a_concurrent_duplicate_raises_naming_the_id_and_keeps_the_rows_before_it(
        tmp_path, "int", s3
    )
    root = files.location(s3())
    _exclusive_create_has_one_winner(root)
    _stale_lock_goes_to_exactly_one_taker(root, _dead_pid())
    # writers with distinct ids at once (threads, one process): disjoint shards, every row once
    where = s3()

    def job(j):
        with LogWriter(where, PROJ, dtype="float64", writer_id=f"t{j}", chunk_rows=4) as w:
            for a in range(8 * j, 8 * j + 8, 3):
                w.write_async(*_rows(range(a, min(a + 3, 8 * j + 8))))

    with LogWriter(where, PROJ, dtype="float64", writer_id="first", chunk_rows=4) as w:
        w.write(*_rows([60]))
    got = _race(job, n=4)
    assert got == [None] * 4, got
    log = open_log(where)
    assert sorted(log.ids().tolist()) == list(range(32)) + [60]
    assert [s.rows for s in log.shards] == [1, 8, 8, 8, 8]
    np.testing.assert_array_equal(log.read()[0]["a"], _rows(log.ids())[0]["a"])
