"""Influence queries: score test gradients against every logged row, streamed from the log.

In the projected space, with per-layer empirical Fisher ``F_l = V_l diag(e_l) V_l^T`` and
damping ``λ_l`` (default ``0.1 × mean(e_l)``, thesis appendix C.2), the whitening
``W_l = V_l diag((e_l + λ_l)^-1/2)`` satisfies ``W_l W_l^T = (F_l + λ_l I)^-1``. Then

- ``dot``:     ``s(te, tr) = Σ_l g_te,l^T (F_l + λ_l I)^-1 g_tr,l``          (influence, eq. 4.3)
- ``self``:    ``s(tr) = s(tr, tr) = Σ_l ||W_l^T g_tr,l||²``
- ``relatif``: ``s(te, tr) / sqrt(s(tr))``                                    (l-RelatIF)
- ``cosine``:  ``s(te, tr) / (sqrt(s(te)) sqrt(s(tr)))``                      (cosine in that metric)

Training rows are read chunk by chunk with up to ``prefetch`` tensorstore reads in flight
while the device scores the current chunk; the running top-k (most positive and most
negative) per query lives on the device and is merged chunk by chunk inside one jitted step,
so the host never waits on a score except at the end.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from jaxinf._src import store_files as _files
from jaxinf._src import store_format as _fmt
from jaxinf._src.reader import LayerStatistics, Log, open_log
from jaxinf._src.statistics import fisher_eigh, projected_covariance, relative_damping

MODES = ("dot", "cosine", "relatif", "self")
SELF_INFLUENCE = "self_influence"  # derived data of a log: <log>/self_influence/v-<hash>
# ~8 MiB reads: larger fresh buffers are mmap-ed (and page-faulted) by malloc on every read,
# which measured 2-4x slower than reusing heap buffers of this size on the CPU benchmark
_TARGET_QUERY_CHUNK_BYTES = 8 << 20


class Preconditioner(NamedTuple):
    """Per-layer whitening ``W_l`` with ``W_l W_l^T = (F_l + λ_l I)^-1`` (float64, host)."""

    layers: list  # [LayerInfo]
    whiten: list  # [np.ndarray [d_l, d_l]]
    damping: dict  # {layer_path: λ_l}


def preconditioner(
    statistics: Mapping[str, Any],
    layers: Sequence,
    *,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
) -> Preconditioner:
    """Build the damped inverse-Fisher whitening from per-layer statistics.

    Args:
      statistics: ``{layer: LayerStatistics}`` (``Log.statistics()``) or ``{layer: F [d, d]}``.
      layers: the log's layer table.
      damping_ratio: ``λ_l = damping_ratio × mean eigenvalue of F_l`` (used when ``damping`` is None).
      damping: absolute ``λ`` for every layer (float) or per layer (dict); overrides the ratio.
    """
    whiten, lams = [], {}
    for l in layers:
        if l.path not in statistics:
            raise ValueError(f"statistics have no entry for layer {l.path!r}")
        st = statistics[l.path]
        if isinstance(st, LayerStatistics):
            evals, evecs = st.eigenvalues, st.eigenvectors
        else:
            cov = np.asarray(st, np.float64)
            if cov.shape != (l.dim, l.dim):
                raise ValueError(
                    f"covariance of layer {l.path!r} has shape {cov.shape}, "
                    f"expected {(l.dim, l.dim)}"
                )
            evals, evecs = fisher_eigh(cov)
        evals = np.maximum(np.asarray(evals, np.float64), 0.0)  # round-off can leave tiny negatives
        if damping is None:
            lam = float(relative_damping(damping_ratio, evals.sum(), evals.size))
        elif isinstance(damping, Mapping):
            if l.path not in damping:
                raise ValueError(f"damping has no entry for layer {l.path!r}")
            lam = float(damping[l.path])
        else:
            lam = float(damping)
        if not lam > 0:
            raise ValueError(
                f"damping of layer {l.path!r} is {lam}; it must be > 0 "
                "(all-zero gradients with a ratio damping give 0)"
            )
        lams[l.path] = lam
        whiten.append(np.asarray(evecs, np.float64) / np.sqrt(evals + lam)[None, :])
    return Preconditioner(list(layers), whiten, lams)


def _compute_dtype(log_dtype: str):
    return jnp.float64 if (log_dtype == "float64" and jax.config.jax_enable_x64) else jnp.float32


def _prepare_test(test_rows: np.ndarray, pre: Preconditioner):
    """Host float64: q = H^-1 g_te [n, D] and the test self-influence [n]."""
    q = np.empty_like(test_rows, dtype=np.float64)
    self_te = np.zeros(test_rows.shape[0], np.float64)
    for l, w in zip(pre.layers, pre.whiten):
        u = test_rows[:, l.offset : l.offset + l.dim] @ w
        q[:, l.offset : l.offset + l.dim] = u @ w.T
        self_te += np.sum(u * u, axis=1)
    return q, self_te


def _self_train(x, whiten, layers):
    """Self-influence of rows ``x`` [C, D] (traced)."""
    out = 0.0
    for l, w in zip(layers, whiten):
        z = x[:, l.offset : l.offset + l.dim] @ w
        out = out + jnp.sum(z * z, axis=1)
    return out


def _inv_sqrt(s):
    # a zero-norm row scores 0 rather than nan
    return jnp.where(s > 0, jax.lax.rsqrt(jnp.where(s > 0, s, 1.0)), 0.0)


def _inv_sqrt_host(s: np.ndarray) -> np.ndarray:
    """``_inv_sqrt`` in float64 on the host, for saved self-influence scores."""
    return np.where(s > 0, 1.0 / np.sqrt(np.where(s > 0, s, 1.0)), 0.0)


def _scores(x, q, whiten, self_te, layers, mode, inv_tr=None):
    """Scores [n_test, C] of rows ``x`` [C, D] (traced).

    ``inv_tr`` [C]: ``1 / sqrt(s(tr))`` of the rows, read from a saved self-influence version;
    None computes it from ``x`` (one more pass over the chunk per layer).
    """
    s = q @ x.T
    if mode == "dot":
        return s
    if inv_tr is None:
        inv_tr = _inv_sqrt(_self_train(x, whiten, layers))
    s = s * inv_tr[None, :]
    if mode == "cosine":
        s = s * _inv_sqrt(self_te)[:, None]
    return s


class _TopK(NamedTuple):
    top_v: jax.Array  # [n_test, k]
    top_i: jax.Array  # [n_test, k] global row index, -1 = empty
    bot_v: jax.Array  # [n_test, k] negated scores
    bot_i: jax.Array


@functools.lru_cache(maxsize=32)
def _step_fn(layers: tuple, mode: str, k: int, want_scores: bool):
    def merge(v, i, s, cols, k):
        vals = jnp.concatenate([v, s], axis=1)
        idx = jnp.concatenate([i, jnp.broadcast_to(cols[None, :], s.shape)], axis=1)
        nv, pos = jax.lax.top_k(vals, k)
        return nv, jnp.take_along_axis(idx, pos, axis=1)

    def step(state, chunk, start, n_valid, q, whiten, self_te, inv_tr=None):
        x = chunk.astype(q.dtype)
        s = _scores(x, q, whiten, self_te, layers, mode, inv_tr)
        c = x.shape[0]
        valid = jnp.arange(c) < n_valid
        cols = (start + jnp.arange(c)).astype(state.top_i.dtype)
        neg_inf = jnp.asarray(-jnp.inf, s.dtype)
        tv, ti = merge(state.top_v, state.top_i, jnp.where(valid[None, :], s, neg_inf), cols, k)
        bv, bi = merge(state.bot_v, state.bot_i, jnp.where(valid[None, :], -s, neg_inf), cols, k)
        return _TopK(tv, ti, bv, bi), (s if want_scores else None)

    return jax.jit(step)


@functools.lru_cache(maxsize=32)
def _self_fn(layers: tuple, dtype_name: str):
    dtype = jnp.dtype(dtype_name)
    return jax.jit(lambda chunk, whiten: _self_train(chunk.astype(dtype), whiten, layers))


class QueryResult(NamedTuple):
    """Top-k training rows per query (``[n_test, k]`` each, best first)."""

    top_scores: np.ndarray  # most positive scores
    top_ids: np.ndarray  # their data ids
    top_rows: np.ndarray  # their global row index (shard order)
    bottom_scores: np.ndarray  # most negative scores (most negative first)
    bottom_ids: np.ndarray
    bottom_rows: np.ndarray
    scores_path: str | None  # zarr array [n_test, n_rows] of all scores, when ``out`` was given
    damping: dict | None = None  # {layer_path: λ_l} the scores were damped with
    scores: np.ndarray | None = None  # top_k=None: all scores [n_test, n_rows], columns in id order
    ids: np.ndarray | None = None  # top_k=None: the ids of those columns, sorted


def _check_query(log, test_grads, projection) -> int:
    diffs = _fmt.diff_metadata(log.projection, _fmt.json_roundtrip(projection, "projection"))
    if diffs:
        raise ValueError(
            f"query projection differs from the log at {log.path}: " + "; ".join(diffs)
        )
    return _fmt.check_grads(test_grads, log.layers, "test_grads")


def test_rows_checked(test_grads, layers) -> np.ndarray:
    """Packed float64 test rows [n, D]; a NaN or Inf is refused, naming the row and layer."""
    rows = np.asarray(_fmt.pack_rows(test_grads, layers), np.float64)
    _fmt.check_finite_rows(rows, layers, list(range(len(rows))), "test_grads")
    return rows


_SCORES_ATTRS = {"jaxinf": "query scores"}


def _is_scores(path: str) -> bool:
    """True only for a directory holding nothing but a score matrix written by ``query``."""
    try:
        names = os.listdir(path)
        with open(os.path.join(path, ".zattrs")) as f:
            attrs = json.load(f)
    except (OSError, ValueError):
        return False
    extra = [n for n in names if n not in (".zarray", ".zattrs") and not n.isdigit()]
    extra = [n for n in extra if not all(p.isdigit() for p in n.split("."))]
    return attrs == _SCORES_ATTRS and not extra


def _create_scores(out: str, log, shape, chunks, dtype: str, overwrite: bool):
    out = os.path.abspath(out)
    if out == log.path or out.startswith(log.path + os.sep) or log.path.startswith(out + os.sep):
        raise ValueError(f"out={out} overlaps the log {log.path}; a query never writes to a log")
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(
                f"out={out} exists; pass overwrite=True to replace a score matrix that an "
                "earlier query wrote there"
            )
        if not _is_scores(out):
            raise FileExistsError(
                f"out={out} exists and is not a score matrix written by jaxinf.query; "
                "it is left untouched (choose a new path)"
            )
        shutil.rmtree(out)
    return _files.create_array(out, shape, chunks, dtype, attrs=_SCORES_ATTRS)


def _select_shards(log, shards) -> list[str]:
    names = [s.name for s in log.shards]
    if shards is None:
        return names
    shards = [shards] if isinstance(shards, str) else list(shards)
    unknown = sorted(set(shards) - set(names))
    if unknown:
        raise ValueError(f"unknown shards {unknown} in {log.path} (shards: {names})")
    return shards


def _plan(log, chunk_rows: int, shards: Sequence[str]):
    """(shard, start, stop, global_start) for every chunk of the chosen shards.

    ``global_start`` is the row's position in the whole log's order (``Log.ids()``), so results
    of queries over different shards can be merged.
    """
    plan, base = [], 0
    for s in log.shards:
        if s.name in shards:
            for a in range(0, s.rows, chunk_rows):
                plan.append((s, a, min(a + chunk_rows, s.rows), base + a))
        base += s.rows
    return plan


def _default_chunk_rows(log) -> int:
    itemsize = np.dtype(log.meta["storage_dtype"]).itemsize
    # a multiple of the log's chunk so reads never straddle a zarr chunk needlessly
    per = max(1, _TARGET_QUERY_CHUNK_BYTES // (log.dim * itemsize * log.chunk_rows))
    return per * log.chunk_rows


class _Reader:
    """Streams the log's rows in fixed-size chunks through a ring of reused host buffers.

    Up to ``prefetch`` tensorstore reads are in flight, each straight into its ring buffer (no
    fresh allocation per chunk; on CPU the device array aliases the buffer, so no copy either).
    The consumer calls ``release(slot, value)`` with a device value computed from the chunk;
    the buffer is reused only after that value is ready.
    """

    def __init__(
        self, log, chunk_rows: int, prefetch: int, progress: bool, desc: str, shards: Sequence[str]
    ):
        self.log, self.chunk_rows, self.shards = log, chunk_rows, shards
        self.prefetch = max(1, prefetch)
        storage = np.dtype(log.meta["storage_dtype"])
        self.buffers = [
            _files.aligned_empty((chunk_rows, log.dim), storage) for _ in range(self.prefetch + 2)
        ]
        self.busy = [None] * len(self.buffers)
        total = sum(s.rows for s in log.shards if s.name in shards)
        self.bar = tqdm(total=total, desc=desc, unit="row", disable=not progress)

    def release(self, slot: int, value) -> None:
        self.busy[slot] = value

    def __iter__(self):
        plan = iter(_plan(self.log, self.chunk_rows, self.shards))
        pending = collections.deque()
        count = 0

        def issue():
            nonlocal count
            p = next(plan, None)
            if p is None:
                return
            s, a, b, g = p
            slot = count % len(self.buffers)
            count += 1
            if self.busy[slot] is not None:
                jax.block_until_ready(self.busy[slot])  # still read by an earlier step
                self.busy[slot] = None
            buf = self.buffers[slot]
            fut = ts.array(buf[: b - a]).write(s.grads[a:b])
            pending.append((fut, slot, b - a, g))

        try:
            for _ in range(self.prefetch):
                issue()
            while pending:
                fut, slot, n, g = pending.popleft()
                issue()
                fut.result()
                # rows past n hold an earlier chunk's data: callers mask or slice them off
                x = jax.device_put(_fmt.values(self.buffers[slot], self.log.dtype))
                yield slot, x, n, g
                self.bar.update(n)
        finally:
            self.bar.close()


def query(
    log,
    test_grads: Mapping[str, Any],
    projection: Mapping,
    *,
    mode: str = "dot",
    top_k: int | None = 10,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
    chunk_rows: int | None = None,
    prefetch: int = 2,
    out: str | None = None,
    overwrite: bool = False,
    shards: Sequence[str] | None = None,
    progress: bool = True,
    statistics: Mapping[str, Any] | None = None,
) -> QueryResult:
    """Score test gradients against every committed row of a log.

    Args:
      log: a ``Log`` (``open_log(path)``) or a path.
      test_grads: ``{layer: [n_test, k_out, k_in]}`` captured with the log's projection.
      projection: the projection metadata of the test capture; must equal the log's exactly.
      mode: "dot", "cosine" or "relatif" (see the module docstring; "self" is ``self_influence``).
      top_k: rows kept per query and direction (clipped to the number of rows); ``None``
        keeps every row: the result's ``scores`` is the full ``[n_test, n_rows]`` matrix with
        columns sorted by data id (``ids``), and its top/bottom fields rank all rows.
      damping_ratio / damping: see ``preconditioner``.
      chunk_rows: rows scored per step (default: a multiple of the log's chunk, ~8 MiB).
      prefetch: tensorstore reads kept in flight ahead of the chunk being scored.
      out: if given, a new directory where the full score matrix ``[n_test, n_rows]`` is written
        as a zarr array (columns in the global row order of ``Log.ids()``); outside the log.
      overwrite: replace an existing ``out`` -- only a score matrix an earlier query wrote; any
        other existing path is refused and left untouched.
      shards: score only these shards (e.g. one per process); row indices stay global, so
        ``merge_results`` of the per-process results equals a query over the whole log.
      progress: show a tqdm progress bar.
      statistics: the Fisher per layer, ``{layer: F [d, d]}`` (e.g. ``projected_fisher`` of a
        sampled or true Fisher) or ``{layer: LayerStatistics}``; default: the log's own
        empirical Fisher (``Log.statistics()``).

    Returns:
      ``QueryResult`` with the top-k most positive and most negative rows per query and the
      damping ``λ_l`` of every layer.

    "relatif" and "cosine" divide by the training rows' self-influence. Where a version saved
    by ``self_influence(log, cache=True)`` covers this snapshot's rows with the same damping,
    it is read instead of recomputed per chunk, and the query runs at the speed of "dot".
    """
    if not isinstance(log, Log):  # a path, URL or kvstore spec
        log = open_log(log)
    if mode not in ("dot", "cosine", "relatif"):
        raise ValueError(
            f"mode must be 'dot', 'cosine' or 'relatif' (use self_influence() for "
            f"'self'), got {mode!r}"
        )
    n_test = _check_query(log, test_grads, projection)
    if log.num_rows == 0:
        raise ValueError(f"log {log.path} has no committed rows")
    full = top_k is None
    if not full and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    chunk_rows = chunk_rows or _default_chunk_rows(log)
    shards = _select_shards(log, shards)
    if out is not None and len(shards) != len(log.shards):
        raise ValueError(
            "out= (the full score matrix) needs a query over all shards; got shards=" + repr(shards)
        )
    n_rows = sum(s.rows for s in log.shards if s.name in shards)
    if n_rows == 0:
        raise ValueError(f"shards {shards} of {log.path} have no committed rows")
    k = 1 if full else min(top_k, n_rows)
    stats = log.statistics() if statistics is None else statistics
    pre = preconditioner(stats, log.layers, damping_ratio=damping_ratio, damping=damping)
    test_rows = test_rows_checked(test_grads, log.layers)
    q, self_te = _prepare_test(test_rows, pre)
    dt = _compute_dtype(log.dtype)
    q_d = jnp.asarray(q, dt)
    whiten_d = [jnp.asarray(w, dt) for w in pre.whiten]
    self_te_d = jnp.asarray(self_te, dt)
    idx_dt = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    state = _TopK(
        jnp.full((n_test, k), -jnp.inf, dt),
        jnp.full((n_test, k), -1, idx_dt),
        jnp.full((n_test, k), -jnp.inf, dt),
        jnp.full((n_test, k), -1, idx_dt),
    )
    inv_tr = None
    if mode != "dot" and statistics is None:  # a saved version is of the log's own Fisher
        saved = log.load_derived(SELF_INFLUENCE, _self_params(pre.damping))
        if saved is not None:
            inv_tr = np.asarray(_inv_sqrt_host(saved["scores"]), np.dtype(dt))
    step = _step_fn(tuple(log.layers), mode, k, out is not None or full)
    columns = []  # top_k=None: (global rows, scores) per chunk
    writes = collections.deque()
    scores_arr = None
    if out is not None:
        scores_arr = _create_scores(
            out, log, (n_test, log.num_rows), (n_test, chunk_rows), np.dtype(dt).str, overwrite
        )
    reader = _Reader(log, chunk_rows, prefetch, progress, f"query ({mode})", shards)
    for slot, chunk, n, g in reader:
        inv = None
        if inv_tr is not None:  # padded to the chunk's fixed shape (one compiled step)
            inv = np.zeros(chunk.shape[0], inv_tr.dtype)
            inv[:n] = inv_tr[g : g + n]
        state, s = step(state, chunk, g, n, q_d, whiten_d, self_te_d, inv)
        reader.release(slot, state)
        if full:
            columns.append((np.arange(g, g + n), np.asarray(s)[:, :n]))
        if scores_arr is not None:
            writes.append(scores_arr[:, g : g + n].write(np.asarray(s)[:, :n]))
            while len(writes) > prefetch:
                writes.popleft().result()
    for w in writes:
        w.result()
    if full:
        return _full_result(log, columns, out, pre.damping)
    top_i, bot_i = np.asarray(state.top_i), np.asarray(state.bot_i)
    return QueryResult(
        np.asarray(state.top_v),
        log.ids_at(top_i),
        top_i,
        -np.asarray(state.bot_v),
        log.ids_at(bot_i),
        bot_i,
        out,
        dict(pre.damping),
    )


def _full_result(log, columns, out, damping) -> QueryResult:
    """Every row ranked (ties: lower row first) and the score matrix in id order."""
    rows = np.concatenate([r for r, _ in columns])
    scores = np.concatenate([s for _, s in columns], axis=1)
    ids = log.ids_at(rows)
    by_id = np.argsort(ids, kind="stable")
    top = np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)
    bot = np.lexsort((np.broadcast_to(rows, scores.shape), scores), axis=1)
    top_rows, bot_rows = rows[top], rows[bot]
    return QueryResult(
        np.take_along_axis(scores, top, 1),
        log.ids_at(top_rows),
        top_rows,
        np.take_along_axis(scores, bot, 1),
        log.ids_at(bot_rows),
        bot_rows,
        out,
        dict(damping),
        scores[:, by_id],
        ids[by_id],
    )


def merge_results(results: Sequence[QueryResult], top_k: int | None = None) -> QueryResult:
    """Merge top-k results of queries over disjoint shards (e.g. one per process) into one.

    Args:
      results: ``QueryResult`` s of the same test rows over disjoint shards of one log.
      top_k: rows kept (default: the largest k among ``results``).
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    k = top_k or max(r.top_scores.shape[1] for r in results)

    def pick(scores, ids, rows, sign):
        scores, ids, rows = (np.concatenate(x, axis=1) for x in (scores, ids, rows))
        # stable sort on (-score, row) so ties resolve like a single query (lower row first)
        order = np.lexsort((rows, -sign * scores), axis=1)[:, :k]
        return tuple(np.take_along_axis(x, order, 1) for x in (scores, ids, rows))

    top = pick(
        [r.top_scores for r in results],
        [r.top_ids for r in results],
        [r.top_rows for r in results],
        1.0,
    )
    bot = pick(
        [r.bottom_scores for r in results],
        [r.bottom_ids for r in results],
        [r.bottom_rows for r in results],
        -1.0,
    )
    return QueryResult(*top, *bot, None, results[0].damping)


class SelfInfluence(NamedTuple):
    scores: np.ndarray  # [n_rows]: g^T (F + λI)^-1 g per logged row, global row order
    ids: np.ndarray  # [n_rows]
    damping: dict | None = None  # {layer_path: λ_l}


def _self_params(damping: Mapping[str, float]) -> dict:
    # keyed by the exact λ_l (float.hex), so a ratio and an absolute damping that give the
    # same λ share one version
    return {"damping": {p: float(v).hex() for p, v in sorted(damping.items())}}


def self_influence(
    log,
    *,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
    chunk_rows: int | None = None,
    prefetch: int = 2,
    progress: bool = True,
    refresh: bool = False,
    cache: bool = False,
    statistics: Mapping[str, Any] | None = None,
) -> SelfInfluence:
    """Self-influence ``g^T (F + λI)^-1 g`` of every logged row, streamed.

    A version saved for this snapshot's rows and damping is read instead of recomputed.

    Args:
      log: a ``Log`` or a path.
      damping_ratio / damping: see ``preconditioner``.
      chunk_rows / prefetch / progress: see ``query``.
      refresh: ignore a saved version and recompute.
      cache: save the result as a version ``<log>/self_influence/v-<hash>`` (stamped with the
        shards' row counts and the damping; written beside, switched in by one rename). Later
        "relatif" and "cosine" queries of the same rows and damping read it. A failure to
        write is a warning. Without ``cache`` nothing is written.
      statistics: ``{layer: F}`` replacing the log's empirical Fisher, as in ``query``
        (then no saved version is read or written).

    Example:
      >>> import tempfile, numpy as np, jaxinf
      >>> proj = {"layers": {"l": {"k_in": 2, "k_out": 2}}, "seed": 0}
      >>> path = tempfile.mkdtemp() + "/log"
      >>> g = {"l": np.random.default_rng(0).normal(size=(6, 2, 2)).astype(np.float32)}
      >>> with jaxinf.LogWriter(path, proj) as w:
      ...     _ = w.write(g, ids=np.arange(6))
      >>> si = jaxinf.self_influence(path, cache=True, progress=False)
      >>> si.scores.shape
      (6,)
    """
    if not isinstance(log, Log):  # a path, URL or kvstore spec
        log = open_log(log)
    if log.num_rows == 0:
        raise ValueError(f"log {log.path} has no committed rows")
    chunk_rows = chunk_rows or _default_chunk_rows(log)
    if statistics is not None and cache:
        raise ValueError("cache=True saves the log's own self-influence; not with statistics=")
    stats = log.statistics() if statistics is None else statistics
    pre = preconditioner(stats, log.layers, damping_ratio=damping_ratio, damping=damping)
    params = _self_params(pre.damping)
    saved = (
        None if (refresh or statistics is not None) else log.load_derived(SELF_INFLUENCE, params)
    )
    if saved is not None:
        return SelfInfluence(saved["scores"], log.ids(), dict(pre.damping))
    dt = _compute_dtype(log.dtype)
    whiten_d = [jnp.asarray(w, dt) for w in pre.whiten]
    fn = _self_fn(tuple(log.layers), jnp.dtype(dt).name)
    parts = []
    reader = _Reader(
        log, chunk_rows, prefetch, progress, "self-influence", _select_shards(log, None)
    )
    for slot, chunk, n, _g in reader:
        out = fn(chunk, whiten_d)
        reader.release(slot, out)
        parts.append((out, n))
    scores = np.concatenate([np.asarray(p)[:n] for p, n in parts]).astype(np.float64)
    if cache:
        log.save_derived(SELF_INFLUENCE, params, {"scores": scores})
    return SelfInfluence(scores, log.ids(), dict(pre.damping))


def influence_scores(
    train_grads: Mapping[str, Any],
    test_grads: Mapping[str, Any] | None = None,
    *,
    mode: str = "dot",
    covariance: Mapping[str, Any] | None = None,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
    return_damping: bool = False,
) -> jax.Array:
    """In-memory influence scores (no log): the dense counterpart of ``query``.

    Args:
      train_grads: ``{layer: [n_train, k_out, k_in]}``.
      test_grads: ``{layer: [n_test, k_out, k_in]}`` (ignored for mode "self").
      mode: "dot", "cosine", "relatif" or "self".
      covariance: ``{layer: F [d, d]}``; default: the empirical Fisher of ``train_grads``.
      return_damping: also return ``{layer: λ_l}``.

    Returns:
      ``[n_test, n_train]`` scores, or ``[n_train]`` self-influences for mode "self" (and
      ``{layer: λ_l}`` with ``return_damping``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = _fmt.layers_from_grads(train_grads)
    _fmt.check_grads(train_grads, layers, "train_grads")
    if covariance is None:
        acc = projected_covariance()
        covariance = acc.finalize(acc.update(acc.init(train_grads), train_grads))
    pre = preconditioner(covariance, layers, damping_ratio=damping_ratio, damping=damping)
    dt = jnp.result_type(*[jnp.asarray(g).dtype for g in train_grads.values()], jnp.float32)
    x = _fmt.pack_rows(train_grads, layers, dt)
    whiten = [jnp.asarray(w, dt) for w in pre.whiten]
    if mode == "self":
        s = _self_train(x, whiten, layers)
    else:
        if test_grads is None:
            raise ValueError(f"mode {mode!r} needs test_grads")
        _fmt.check_grads(test_grads, layers, "test_grads")
        q, self_te = _prepare_test(test_rows_checked(test_grads, layers), pre)
        s = _scores(x, jnp.asarray(q, dt), whiten, jnp.asarray(self_te, dt), layers, mode)
    return (s, dict(pre.damping)) if return_damping else s
