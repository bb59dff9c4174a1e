"""Sublinear top-k: an inner-product index (FAISS) over a log's rows, with exact re-scoring.

An influence score is an inner product between the preconditioned test gradient and a logged
row, ``s(te, tr) = q_te^T g_tr`` with ``q_te = (F + λI)^-1 g_te``, so the training rows are
indexed as they are and the test side is preconditioned at query time (the index does not
depend on the damping). l-RelatIF and cosine rank by ``q_te^T (g_tr / sqrt(s(tr)))``: their
index holds the rows divided by their self-influence's square root (and so depends on the
damping). The index proposes candidates; every returned score is recomputed exactly in float64
from the log's rows, so an approximate index can lower recall but never changes a score.

An index is derived data of the log: a version ``<log>/index/v-<hash>`` stamped with the
shards' committed row counts, written beside and switched in by one rename; rows appended
later make it invisible to queries of the new snapshot. A build writes checkpoints under
``<log>/index/.build-v-<hash>`` and an interrupted build resumes from the last one.

Requires the optional extra ``index`` (``faiss-cpu``).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxinf._src import store_files as _files
from jaxinf._src import store_format as _fmt
from jaxinf._src.query import (
    QueryResult,
    _check_query,
    _default_chunk_rows,
    _inv_sqrt_host,
    _plan,
    _prepare_test,
    _self_params,
    preconditioner,
    self_influence,
    test_rows_checked,
)
from jaxinf._src.reader import Log, open_log

INDEX = "index"  # derived data of a log: <log>/index/v-<hash>
_KINDS = {"dot": "dot", "relatif": "normalized", "cosine": "normalized"}
_INDEX_FILE = "index.faiss"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "build_index / query_index need FAISS: pip install 'jaxmlo[index]' (faiss-cpu)"
        ) from None
    return faiss


def _kind(mode: str) -> str:
    if mode not in _KINDS:
        raise ValueError(f"mode must be 'dot', 'relatif' or 'cosine', got {mode!r}")
    return _KINDS[mode]


def _row_reader(grads):
    """A reader of single rows by byte range, for an uncompressed C-order zarr v2 array.

    Such a chunk file holds the chunk's rows as raw bytes, so one row is one small ranged
    read; a plain tensorstore read of one row would read its whole chunk (thousands of rows).
    Returns None for any other layout.
    """
    meta = grads.spec().to_json().get("metadata", {})
    plain = meta.get("compressor") is None and not meta.get("filters") and meta.get("order") == "C"
    if not plain or meta.get("zarr_format") != 2 or meta["chunks"][1] != meta["shape"][1]:
        return None
    kv, sep = grads.kvstore, meta.get("dimension_separator", ".")
    chunk, width = meta["chunks"][0], meta["shape"][1] * np.dtype(meta["dtype"]).itemsize

    def read(rows: np.ndarray) -> np.ndarray:
        futs = [
            kv.read(f"{r // chunk}{sep}0", byte_range=slice(o := (r % chunk) * width, o + width))
            for r in rows.tolist()
        ]
        raw = b"".join(f.result().value for f in futs)
        return np.frombuffer(raw, np.dtype(meta["dtype"])).reshape(len(rows), -1)

    return read


def _gather(log, rows: np.ndarray) -> np.ndarray:
    """Rows of the given sorted global indices, float64 [len(rows), D]."""
    out = np.empty((len(rows), log.dim), np.float64)
    starts = np.cumsum([0] + [s.rows for s in log.shards])
    which = np.searchsorted(starts, rows, "right") - 1
    for k in np.unique(which):
        sel = np.nonzero(which == k)[0]
        local = rows[sel] - starts[k]
        read = _row_reader(log.shards[k].grads)
        raw = read(local) if read else log.shards[k].grads[local].read().result()
        out[sel] = _fmt.values(raw, log.dtype)
    return out


def _self_host(x: np.ndarray, pre) -> np.ndarray:
    """Self-influence of rows ``x`` [n, D] in float64 (host)."""
    out = np.zeros(len(x), np.float64)
    for l, w in zip(pre.layers, pre.whiten):
        z = x[:, l.offset : l.offset + l.dim] @ w
        out += np.sum(z * z, axis=1)
    return out


def _params(kind: str, factory: str, train_rows: int, seed: int, pre) -> dict:
    p = {"kind": kind, "factory": factory, "train_rows": train_rows, "seed": seed}
    if kind == "normalized":
        p.update(_self_params(pre.damping))
    return p


def _write_index(faiss, index, path: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)  # a checkpoint is the old file or the new one, never half of one


def build_index(
    log,
    *,
    mode: str = "dot",
    factory: str | None = None,
    train_rows: int | None = None,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
    chunk_rows: int | None = None,
    checkpoint_rows: int = 262_144,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Build (or resume building) a FAISS inner-product index over every committed row of a log.

    Args:
      log: a ``Log`` or a path.
      mode: "dot" indexes the rows; "relatif" and "cosine" (one index serves both) index the
        rows divided by ``sqrt`` of their self-influence.
      factory: a FAISS ``index_factory`` string; default ``"IVF{n},SQ8"`` with
        ``n = round(sqrt(rows))`` lists and 8-bit codes (1 byte per dimension in memory; the
        scores returned are re-computed from the log, so the codes only rank candidates).
      train_rows: rows (evenly spaced over the log) that train the coarse quantizer; default
        ``min(rows, max(64 n, 4096))``.
      damping_ratio / damping: the damping of "relatif"/"cosine" (see ``preconditioner``).
      chunk_rows: rows read and added per step.
      checkpoint_rows: rows added between checkpoints of an unfinished build.
      seed: seed of the quantizer's k-means.
      progress: show progress bars.

    Returns:
      The directory of the index version. A version that exists already is returned as is.
    """
    faiss = _faiss()
    if not isinstance(log, Log):  # a path, URL or kvstore spec
        log = open_log(log)
    kind = _kind(mode)
    n = log.num_rows
    if n == 0:
        raise ValueError(f"log {log.path} has no committed rows; nothing to index")
    nlist = max(1, round(math.sqrt(n)))
    factory = factory or f"IVF{nlist},SQ8"
    train_rows = min(n, train_rows or max(64 * nlist, 4096))
    pre = None
    if kind == "normalized":
        pre = preconditioner(
            log.statistics(), log.layers, damping_ratio=damping_ratio, damping=damping
        )
    if not log._root.st.local:
        raise ValueError(
            f"log {log.path} is on a kvstore; a FAISS index is built and memory-mapped from "
            "local files, so copy the log to a local directory to index it"
        )
    final = log.derived_dir(INDEX, _params(kind, factory, train_rows, seed, pre))
    if os.path.isdir(final):
        return final
    parent, name = os.path.split(final)
    work = os.path.join(parent, ".build-" + name)
    _files.makedirs(work)
    scale = None
    if kind == "normalized":
        si = self_influence(log, damping=pre.damping, chunk_rows=chunk_rows, progress=progress)
        scale = _inv_sqrt_host(si.scores)

    part, trained = os.path.join(work, "part.faiss"), os.path.join(work, "trained.faiss")
    if os.path.exists(part):
        index = faiss.read_index(part)  # rows [0, ntotal) are in it, in global row order
    elif os.path.exists(trained):
        index = faiss.read_index(trained)
    else:
        index = faiss.index_factory(log.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample = np.unique(np.linspace(0, n - 1, train_rows).round().astype(np.int64))
            x = _gather(log, sample)
            if scale is not None:
                x *= scale[sample, None]
            try:
                faiss.extract_index_ivf(index).cp.seed = seed
            except RuntimeError:
                pass  # not an IVF index: no k-means to seed
            index.train(np.ascontiguousarray(x, np.float32))
        _write_index(faiss, index, trained)
    done = index.ntotal
    last = done
    chunk_rows = chunk_rows or _default_chunk_rows(log)
    for s, a, b, g in _plan(log, chunk_rows, [s.name for s in log.shards]):
        if g + (b - a) <= done:
            continue
        if g < done:
            a, g = a + (done - g), done
        x = _fmt.values(s.grads[a:b].read().result(), log.dtype).astype(np.float32)
        if scale is not None:
            x *= scale[g : g + (b - a), None].astype(np.float32)
        _add(index, x)
        done = g + (b - a)
        if done - last >= checkpoint_rows and done < n:
            _write_index(faiss, index, part)
            last = done
    if index.ntotal != n:
        raise RuntimeError(f"index of {log.path} holds {index.ntotal} rows, expected {n}")
    tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex}")
    try:
        _files.makedirs(tmp)
        faiss.write_index(index, os.path.join(tmp, _INDEX_FILE))
        record = {
            "rows": log._stamp(),
            "params": _params(kind, factory, train_rows, seed, pre),
            "ntotal": int(index.ntotal),
        }
        _files.atomic_write_json(os.path.join(tmp, "record.json"), record)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # else another builder finished the same version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return final


def _add(index, x: np.ndarray) -> None:
    index.add(np.ascontiguousarray(x))


def _find_index(log, kind: str, factory: str | None, pre) -> str:
    """The one index version covering this snapshot's rows (and damping, for "normalized")."""
    parent = os.path.join(log.path, INDEX)
    names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    found = []
    for name in names:
        if not name.startswith("v-"):
            continue
        d = os.path.join(parent, name)
        rec = _files.read_json(os.path.join(d, "record.json"), "index", _fmt.LogFormatError)
        p = rec.get("params", {})
        if rec.get("rows") != log._stamp() or p.get("kind") != kind:
            continue
        if factory is not None and p.get("factory") != factory:
            continue
        if kind == "normalized" and p.get("damping") != _self_params(pre.damping)["damping"]:
            continue
        found.append((d, p.get("factory")))
    if not found:
        raise ValueError(
            f"no {kind!r} index of {log.path} covers its committed rows {log._stamp()}"
            + ("" if factory is None else f" with factory {factory!r}")
            + (" and this damping" if kind == "normalized" else "")
            + "; build one with jaxinf.build_index(log, mode=...) (an index of fewer rows "
            "is never used)"
        )
    if len(found) > 1:
        raise ValueError(
            f"several indexes of {log.path} match: factories {[f for _, f in found]}; pass "
            "factory= to choose one"
        )
    return found[0][0]


def query_index(
    log,
    test_grads: Mapping[str, Any],
    projection: Mapping,
    *,
    mode: str = "dot",
    top_k: int = 10,
    nprobe: int = 16,
    nprobe_bottom: int | None = None,
    candidates: int | None = None,
    factory: str | None = None,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
) -> QueryResult:
    """Top-k rows per test gradient from an index built by ``build_index``, scores exact.

    The index proposes ``candidates`` rows per query and direction (most positive, and most
    negative by searching ``-q``); their scores are recomputed in float64 from the log's rows
    and the top-k of the union is returned. Scores equal ``query``'s; only recall can drop.

    The most negative rows are harder to find than the most positive ones: a test gradient
    lies near the training rows it resembles (its own lists), while ``-q`` usually lies near
    no rows at all, and the rows pointing most against ``q`` are spread over more lists.
    Hence the bottom search visits ``nprobe_bottom`` lists, twice ``nprobe`` by default (on
    LoGra rows of a digits MLP, bottom recall at twice the lists matched top recall).

    Args:
      log: a ``Log`` or a path.
      test_grads / projection: as for ``query``.
      mode: "dot", "relatif" or "cosine".
      top_k: rows kept per query and direction.
      nprobe: inverted lists visited per query (IVF indexes): recall against speed.
      nprobe_bottom: lists visited by the search for the most negative rows (default
        ``2 nprobe``).
      candidates: rows proposed per query and direction (default ``max(4 top_k, 32)``).
      factory: choose among several indexes of the log by their factory string.
      damping_ratio / damping: see ``preconditioner``.

    Returns:
      ``QueryResult`` (``scores_path`` None) like ``query``'s.
    """
    faiss = _faiss()
    if not isinstance(log, Log):  # a path, URL or kvstore spec
        log = open_log(log)
    kind = _kind(mode)
    n_test = _check_query(log, test_grads, projection)
    n = log.num_rows
    if n == 0:
        raise ValueError(f"log {log.path} has no committed rows")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    nprobe_bottom = 2 * nprobe if nprobe_bottom is None else nprobe_bottom
    if min(nprobe, nprobe_bottom) < 1:
        raise ValueError(f"nprobe and nprobe_bottom must be >= 1, got {nprobe}, {nprobe_bottom}")
    k = min(top_k, n)
    c = min(n, candidates or max(4 * k, 32))
    if c < k:
        raise ValueError(f"candidates={c} is below top_k={k}")
    pre = preconditioner(log.statistics(), log.layers, damping_ratio=damping_ratio, damping=damping)
    d = _find_index(log, kind, factory, pre)
    # memory-mapped: opening costs nothing and a search pages in only the lists it probes
    index = faiss.read_index(os.path.join(d, _INDEX_FILE), faiss.IO_FLAG_MMAP)
    if index.ntotal != n:
        raise _fmt.LogFormatError(
            f"{d} holds {index.ntotal} rows, the log {n}; delete {d} and build it again"
        )
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None  # a flat index searches every row
    q, self_te = _prepare_test(test_rows_checked(test_grads, log.layers), pre)
    q32 = np.ascontiguousarray(q, np.float32)
    if ivf is not None:
        ivf.nprobe = nprobe
    _, top_c = index.search(q32, c)
    if ivf is not None:
        ivf.nprobe = nprobe_bottom
    _, bot_c = index.search(-q32, c)
    cand = np.concatenate([top_c, bot_c], axis=1)  # [n_test, 2c], -1 where lists ran short
    rows = np.unique(cand[cand >= 0])
    x = _gather(log, rows)
    exact = q @ x.T  # [n_test, len(rows)]
    if kind == "normalized":
        exact *= _inv_sqrt_host(_self_host(x, pre))[None, :]
    if mode == "cosine":
        exact *= _inv_sqrt_host(self_te)[:, None]
    out = {f: np.empty((n_test, k), t) for f, t in (("tv", np.float64), ("tr", np.int64))}
    out.update({f: np.empty((n_test, k), t) for f, t in (("bv", np.float64), ("br", np.int64))})
    for i in range(n_test):
        mine = np.unique(cand[i][cand[i] >= 0])
        if len(mine) < k:
            raise ValueError(
                f"the index proposed {len(mine)} rows for test row {i}, fewer than top_k={k}; "
                "raise nprobe or candidates"
            )
        s = exact[i, np.searchsorted(rows, mine)]
        top = np.lexsort((mine, -s))[:k]  # ties: lower row first, like query
        bot = np.lexsort((mine, s))[:k]
        out["tv"][i], out["tr"][i] = s[top], mine[top]
        out["bv"][i], out["br"][i] = s[bot], mine[bot]
    return QueryResult(
        out["tv"],
        log.ids_at(out["tr"]),
        out["tr"],
        out["bv"],
        log.ids_at(out["br"]),
        out["br"],
        None,
        dict(pre.damping),
    )


def recall_at_k(approx_rows: Sequence, exact_rows: Sequence) -> float:
    """Mean fraction of each query's exact top-k rows that the approximate top-k found."""
    approx_rows, exact_rows = np.asarray(approx_rows), np.asarray(exact_rows)
    hits = [len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits))
