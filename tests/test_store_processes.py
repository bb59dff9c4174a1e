"""Several processes on one log: locks, jobs with overlapping data ids, queries racing refreshes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinf import LogLockedError, LogWriter, open_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = {"layers": {"a": {"k_in": 3, "k_out": 2}}, "init": "random", "seed": 7, "fingerprint": "f"}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}

_COMMON = r"""
import json, sys
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jaxinf
from jaxinf import LogWriter, open_log
PROJ = {proj!r}
path = {path!r}

def rows(a, b):
    ids = np.arange(a, b)
    g = np.random.default_rng(0).normal(size=(100, 6))[ids] + ids[:, None] / 100.0
    return {{"a": g.reshape(-1, 2, 3)}}, ids
"""


def _spawn(code, *args, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _rows(a, b):
    ids = np.arange(a, b)
    g = np.random.default_rng(0).normal(size=(100, 6))[ids] + ids[:, None] / 100.0
    return {"a": g.reshape(-1, 2, 3)}, ids


_HOLDER = r"""
with LogWriter(path, PROJ, dtype="float64", writer_id="w", chunk_rows=4) as w:
    w.write(*rows(0, 8))
    print("ready", flush=True)
    sys.stdin.readline()
    w.write(*rows(8, 16))
print("done", flush=True)
"""


def test_a_second_writer_with_the_same_id_is_refused_and_nothing_is_lost(tmp_path):
    path = str(tmp_path / "log")
    child = _spawn(_COMMON.format(proj=PROJ, path=path) + _HOLDER)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with pytest.raises(LogLockedError, match=rf"process {child.pid}"):
            LogWriter(path, PROJ, dtype="float64", writer_id="w")
        out, err = child.communicate("go\n", timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0 and out.strip() == "done", err
    log = open_log(path)
    assert log.ids().tolist() == list(range(16))
    got, ids = log.read()
    np.testing.assert_array_equal(got["a"], _rows(0, 16)[0]["a"])


_JOB = r"""
start = int(sys.argv[1])
try:
    with LogWriter(path, PROJ, dtype="float64") as w:  # on_duplicate="error"
        w.write(*rows(start, start + 20))
except ValueError as e:
    print("refused:", e)
    with LogWriter(path, PROJ, dtype="float64", on_duplicate="skip") as w:
        w.write(*rows(start, start + 20))
print(w.writer_id)
"""


def test_jobs_with_default_ids_and_overlapping_data_ids_keep_each_row_once(tmp_path):
    path = str(tmp_path / "log")
    code = _COMMON.format(proj=PROJ, path=path) + _JOB
    outs = []
    for start in (0, 10, 25):  # one job after another, each with its default writer id
        p = _spawn(code, start)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines())
    assert len(outs[0]) == 1  # nothing to refuse in the first job
    for out in outs[1:]:
        assert out[0].startswith("refused:") and "already in the log" in out[0]
    names = [out[-1] for out in outs]
    log = open_log(path)
    assert len(set(names)) == 3 and [s.name for s in log.shards] == names  # in job order
    got, ids = log.read()
    assert sorted(ids.tolist()) == list(range(45))
    ref, _ = _rows(0, 45)
    np.testing.assert_array_equal(got["a"], ref["a"][ids])


_APPENDER = r"""
for i in range(8):
    with LogWriter(path, PROJ, dtype="float64", writer_id="b", chunk_rows=4) as w:
        w.write(*rows(40 + 4 * i, 44 + 4 * i))
    open_log(path).statistics(cache=True)  # a refresh: a new version for the new row counts
print("done")
"""

_QUERIER = r"""
test = {"a": np.random.default_rng(1).normal(size=(3, 2, 3))}
errs, seen = [], []
for _ in range(6):
    log = open_log(path)
    stats = log.statistics(cache=True)  # the first query of every process at once
    res = jaxinf.query(log, test, PROJ, top_k=log.num_rows, progress=False)
    got, _ = log.read()
    g = got["a"].reshape(-1, 6)
    f = g.T @ g / len(g)
    h = f + 0.1 * np.trace(f) / 6 * np.eye(6)
    ref = test["a"].reshape(3, 6) @ np.linalg.solve(h, g.T)
    mine = np.take_along_axis(res.top_scores, np.argsort(res.top_rows, 1), 1)
    errs.append(float(np.max(np.abs(mine - ref)) / np.max(np.abs(ref))))
    seen.append(log.num_rows)
print(json.dumps({"errs": errs, "seen": seen}))
"""


def test_queries_racing_a_statistics_refresh_equal_brute_force(tmp_path):
    path = str(tmp_path / "log")
    with LogWriter(path, PROJ, dtype="float64", writer_id="a", chunk_rows=4) as w:
        w.write(*_rows(0, 40))
    common = _COMMON.format(proj=PROJ, path=path)
    procs = [_spawn(common + _APPENDER)] + [_spawn(common + _QUERIER) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out)
    for out in outs[1:]:
        r = json.loads(out)
        assert max(r["errs"]) < 1e-10, r
    log = open_log(path)
    assert log.num_rows == 72
    versions = os.listdir(os.path.join(path, "statistics"))
    assert not [v for v in versions if v.startswith(".tmp")]  # no half-written version left
