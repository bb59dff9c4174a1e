"""Data-parallel LoGra logging and influence queries over a ``'data'`` mesh axis.

Logging (thesis 4.3.3, "Communication Optimization"). Each device computes the projected
per-example gradients of *its* examples under ``jax.shard_map`` (parameters and projections
replicated, the batch split along the mesh axis). Dataset statistics (the covariance of the
projected gradients, KFAC factors) are accumulated per device with no communication during the
pass and reduced with a single ``psum`` in :func:`ShardedLogging.finalize` at the end. Rows go to
the store from each device's addressable shard (:func:`write_sharded`): every device's rows are
copied to the host separately, never gathered onto one device, and each process writes its own
log shard.

Queries. The log's chunks are dealt round-robin to the devices of the mesh (across processes,
each process reads only the chunks of its own devices); every device scores its chunk against
the replicated test gradients and keeps its own running top-k. The only communication is one
``all_gather`` of the ``n_devices x k`` candidates per query at the end, followed by a top-k merge.

Mixed precision. ``compute_dtype=jnp.bfloat16`` runs the model's forward and backward in bfloat16
(floating parameters and inputs cast); the LoGra projections and all accumulations stay in float32.
Store bfloat16 rows with ``LogWriter(..., dtype="bfloat16")``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxinf._src import query as _query
from jaxinf._src import reader as _reader
from jaxinf._src import store_format as _fmt
from jaxinf._src import writer as _writer
from jaxinf._src.capture import projected_gradients
from jaxinf._src.kfac import KFACFactors, kfac_batch_sums
from jaxinf._src.statistics import add_outer, covariance_from_sums, mirror_upper

# The mesh-axis check and float cast both libraries use.
from jaxmlo.common import axis_size as _axis_size
from jaxmlo.common import cast_floats as _cast_floats

# ---------------------------------------------------------------------------------------------
# Sharded logging


class LoggingState(NamedTuple):
    """Per-device partial sums; every leaf has a leading ``[n_devices]`` axis sharded on ``axis``."""

    covariance: Any  # {layer: [n_dev, D, D]}: local sum of g g^T (D = k_out * k_in)
    kfac: Any  # {layer: ([n_dev, n_in, n_in], [n_dev, n_out, n_out], [n_dev])} local KFAC sums
    count: jax.Array  # [n_dev]: examples seen by each device


class LoggingStatistics(NamedTuple):
    """Dataset statistics of a logging pass, reduced over all devices."""

    covariance: Any  # {layer: [D, D]}: F = mean_i g_i g_i^T, or {} when not accumulated
    kfac: Any  # {layer: KFACFactors}, or {} when not accumulated
    count: jax.Array  # []: examples seen


class ShardedLogging(NamedTuple):
    """A data-parallel logging pass: ``init`` / ``step`` / ``finalize`` (see :func:`sharded_logging`).

    ``step(state, params, batch) -> (state, grads)`` runs without any communication; ``grads`` is
    ``{layer: [batch, k_out, k_in]}`` sharded over the mesh axis (``None`` without projections).
    ``finalize(state)`` performs the single reduction of the pass.
    """

    init: Callable[[], LoggingState]
    step: Callable[[LoggingState, Any, Any], tuple]
    finalize: Callable[[LoggingState], LoggingStatistics]
    mesh: Mesh
    axis: str


def sharded_logging(
    capture,
    projections: Mapping[str, Any] | None = None,
    *,
    mesh: Mesh,
    axis: str = "data",
    kfac_layers: Mapping[str, Any] | None = None,
    covariance: bool = True,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    compute_dtype=None,
    stats_dtype=jnp.float32,
) -> ShardedLogging:
    """Build a data-parallel LoGra logging pass over the ``axis`` of ``mesh``.

    Args:
      capture: from ``jaxinf.linen_capture`` / ``jaxinf.nnx_capture``.
      projections: ``{path: Projection}``; ``None`` for a statistics-only pass (e.g. KFAC
        factors for ``pca_projections`` before the logging pass).
      mesh: a mesh with axis ``axis`` (see ``jaxmlo.parallel.data_mesh``); batches must have a leading
        dimension divisible by its size.
      kfac_layers: ``{path: LayerSpec}`` whose KFAC factors are accumulated, or ``None``.
      covariance: accumulate the covariance (empirical Fisher) of the projected gradients.
      mask_fn: ``mask_fn(batch) -> [batch, *tokens]`` token mask (see ``projected_gradients``).
      compute_dtype: e.g. ``jnp.bfloat16``: the model's forward/backward runs in that dtype
        (floating parameters and batch leaves are cast); projections stay as given.
      stats_dtype: accumulation dtype of the statistics.

    Returns:
      A :class:`ShardedLogging`.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxinf import find_layers, linen_capture, random_projections
      >>> model = nn.Sequential([nn.Dense(3)])
      >>> params = model.init(jax.random.key(0), jnp.ones(4))["params"]
      >>> capture = linen_capture(lambda p, batch: jnp.sum(model.apply({"params": p}, batch) ** 2))
      >>> batch = jnp.ones((8, 4))
      >>> layers = find_layers(capture, params, batch)
      >>> projs = random_projections(layers, key=jax.random.key(0), k_in=2, k_out=2)
      >>> mesh = jax.sharding.Mesh(jax.devices(), ("data",))  # or jaxmlo.parallel.data_mesh()
      >>> logging = sharded_logging(capture, projs, mesh=mesh)
      >>> state = logging.init()
      >>> for _ in range(2):  # write_sharded(writer, grads, ids) would log each batch's rows
      ...     state, grads = logging.step(state, params, batch)
      >>> stats = logging.finalize(state)  # the only cross-device reduction
      >>> grads["layers_0"].shape, int(stats.count)
      ((8, 2, 2), 16)
    """
    n_dev = _axis_size(mesh, axis)
    projections = None if projections is None else dict(projections)
    kfac_layers = None if kfac_layers is None else dict(kfac_layers)
    if projections is None and kfac_layers is None:
        raise ValueError("sharded_logging: pass projections, kfac_layers, or both")
    if projections is None and covariance:
        covariance = False  # nothing projected, nothing to take the covariance of
    proj_fn = (
        None if projections is None else projected_gradients(capture, projections, mask_fn=mask_fn)
    )
    kfac_fn = (
        None
        if kfac_layers is None
        else kfac_batch_sums(capture, kfac_layers, mask_fn=mask_fn, dtype=stats_dtype)
    )
    dev_sharding = NamedSharding(mesh, P(axis))

    def _zeros(shape):
        return jnp.zeros((n_dev,) + shape, stats_dtype)

    def init() -> LoggingState:
        cov = {}
        if covariance:
            for path, p in projections.items():
                d = p.p_out.shape[0] * p.p_in.shape[0]
                cov[path] = _zeros((d, d))
        kf = {}
        for path, s in (kfac_layers or {}).items():
            kf[path] = (_zeros((s.n_in, s.n_in)), _zeros((s.n_out, s.n_out)), _zeros(()))
        state = LoggingState(cov, kf, jnp.zeros((n_dev,), jnp.int32))
        return jax.device_put(state, dev_sharding)

    def local_step(state, params, batch, projs):
        # Runs on one device with its slice of the batch: no collective anywhere in here.
        params = _cast_floats(params, compute_dtype)
        batch = _cast_floats(batch, compute_dtype)
        n = jax.tree.leaves(batch)[0].shape[0]
        grads = None
        cov = state.covariance
        if proj_fn is not None:
            grads = proj_fn.jitted(params, batch, projs)
            if covariance:
                cov = {p: add_outer(cov[p][0], grads[p], upper=True)[None] for p in cov}
        kf = state.kfac
        if kfac_fn is not None:
            sums = kfac_fn(params, batch)
            kf = jax.tree.map(lambda acc, s: acc + s[None].astype(acc.dtype), kf, sums)
        return LoggingState(cov, kf, state.count + n), grads

    @jax.jit
    def _step(state, params, batch, projs):
        f = jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(axis), P(), P(axis), P()),
            out_specs=(P(axis), P(axis)),
            # capture's custom-VJP taps build their zero bottlenecks inside the per-device
            # function, which the varying-manual-axes checker cannot type; nothing here
            # relies on it (the only collective is the explicit psum in finalize).
            check_vma=False,
        )
        return f(state, params, batch, projs)

    def step(state, params, batch):
        n = jax.tree.leaves(batch)[0].shape[0]
        if n % n_dev:
            raise ValueError(
                f"batch size {n} is not divisible by the {n_dev} devices of mesh axis {axis!r}"
            )
        return _step(state, params, batch, projections)

    def local_reduce(state):
        # The one reduction of the pass (thesis 4.3.3): all partial sums in a single psum.
        # The count travels as a float so that all operands share one dtype: XLA then emits a
        # single (tuple) all-reduce for the whole pytree.
        local = jax.tree.map(lambda v: v[0], state)
        local = local._replace(count=local.count.astype(stats_dtype))
        s = jax.lax.psum(local, axis)
        return s._replace(count=jnp.round(s.count).astype(jnp.int32))

    @jax.jit
    def _finalize(state):
        return jax.shard_map(
            local_reduce, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False
        )(state)

    def finalize(state) -> LoggingStatistics:
        s = _finalize(state)
        n = jnp.maximum(s.count, 1).astype(stats_dtype)
        cov = {p: covariance_from_sums(mirror_upper(v), n) for p, v in s.covariance.items()}
        kf = {}
        for p, (sf, sb, tok) in s.kfac.items():
            t = jnp.maximum(tok, 1)
            kf[p] = KFACFactors(sf / t, sb / t, tok)
        return LoggingStatistics(cov, kf, s.count)

    step.lower = lambda state, params, batch: _step.lower(state, params, batch, projections)
    finalize.lower = _finalize.lower
    return ShardedLogging(init, step, finalize, mesh, axis)


def write_sharded(writer, grads: Mapping[str, jax.Array], ids: Sequence) -> int:
    """Write the rows of a sharded ``grads`` batch that live on this process, device by device.

    Each addressable shard (one device's slice of the batch) is handed to ``writer.write_async``
    on its own, together with the matching slice of ``ids``; nothing is gathered onto one device.
    With ``LogWriter(..., statistics=False)`` (statistics come from the logging pass instead) the
    writer packs and casts each shard's rows on its own device before the host copy. With several
    processes, each process passes its own writer
    (``writer_id`` = its process index) and the global ``ids`` of the batch.

    Returns:
      The number of rows handed to the writer.
    """
    ids = list(np.asarray(ids).tolist()) if not isinstance(ids, (list, tuple)) else list(ids)
    first = jax.tree.leaves(grads)[0]
    if len(ids) != first.shape[0]:
        raise ValueError(f"ids has {len(ids)} entries but grads have {first.shape[0]} rows")
    # the same device order for every layer: sort each layer's shards by their first row
    by_layer = {}
    for path, g in grads.items():
        shards = {}
        for s in g.addressable_shards:
            start = s.index[0].start or 0
            if start not in shards:  # replicated copies on other axes: write once
                shards[start] = s
        by_layer[path] = shards
    starts = sorted(by_layer[next(iter(by_layer))])
    # Without writer statistics, hand the writer each device's own arrays: it packs the rows
    # (and casts them to the storage dtype) on that device, then copies them to the host. With
    # statistics, the writer accumulates on its default device, so it gets host arrays.
    on_device = getattr(writer, "_statistics", True) is False
    for shards in by_layer.values():
        for sh in shards.values():
            sh.data.copy_to_host_async()  # all devices' transfers start before the first wait
    written = 0
    for start in starts:
        part = {
            path: (
                by_layer[path][start].data if on_device else np.asarray(by_layer[path][start].data)
            )
            for path in grads
        }
        n = next(iter(part.values())).shape[0]
        writer.write_async(part, ids[start : start + n])
        written += n
    return written


def save_shard_statistics(writer, state: LoggingState) -> bool:
    """Record this process's covariance sums as the writer's shard Fisher cache (no communication).

    Sums the local partial sums of this process's devices on the host, so ``Log.statistics()``
    need not re-read the rows. Call after ``writer.flush()``. Returns False (nothing saved) when
    the counts do not match the writer's committed rows (e.g. rows skipped as duplicates).
    """
    if not state.covariance:
        return False
    if {l.path for l in writer.layers} != set(state.covariance):
        return False

    def local_sum(a):
        return sum(np.asarray(s.data, np.float64).sum(axis=0) for s in _unique_shards(a))

    count = int(local_sum(state.count))
    if count != writer.committed_rows:
        return False
    sums = [local_sum(state.covariance[l.path]) for l in writer.layers]
    _writer.save_fisher(writer._shard_dir, sums, count)
    return True


def _unique_shards(a):
    seen, out = set(), []
    for s in a.addressable_shards:
        key = s.index[0].start or 0
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def log_sharded(
    logging: ShardedLogging,
    params,
    batches: Iterable,
    writer=None,
    *,
    ids_fn: Callable[[Any], Sequence] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> LoggingStatistics:
    """Run a whole logging pass: step every batch, write its rows, reduce the statistics once.

    Args:
      logging: from :func:`sharded_logging`.
      params: the model parameters (replicated).
      batches: an iterable of global batches.
      writer: a ``LogWriter`` for this process, or ``None`` to only accumulate statistics.
      ids_fn: ``ids_fn(batch) -> data ids`` of the batch (required with a writer).
      progress: show a tqdm progress bar.
      total: number of batches, for the progress bar.

    Returns:
      The reduced :class:`LoggingStatistics`. The writer is flushed (not closed), and its shard's
      Fisher cache is set from this pass's local sums when they cover exactly its rows.
    """
    if writer is not None and ids_fn is None:
        raise ValueError("log_sharded: a writer needs ids_fn(batch) -> data ids")
    state = logging.init()
    # replicated over the whole mesh (needed when the mesh spans several processes)
    params = jax.device_put(params, NamedSharding(logging.mesh, P()))
    for batch in tqdm(batches, total=total, desc="logging", disable=not progress):
        state, grads = logging.step(state, params, batch)
        if writer is not None:
            write_sharded(writer, grads, ids_fn(batch))
    if writer is not None:
        writer.flush()
        if writer._statistics is False:
            save_shard_statistics(writer, state)
    return logging.finalize(state)


# ---------------------------------------------------------------------------------------------
# Sharded queries


@functools.lru_cache(maxsize=16)
def _sharded_fns(mesh: Mesh, axis: str, layers: tuple, mode: str, k: int):
    def merge(v, i, s, cols):
        vals = jnp.concatenate([v, s], axis=1)
        idx = jnp.concatenate([i, jnp.broadcast_to(cols[None, :], s.shape)], axis=1)
        nv, pos = jax.lax.top_k(vals, k)
        return nv, jnp.take_along_axis(idx, pos, axis=1)

    def local(state, chunk, start, n_valid, q, whiten, self_te):
        # one device: its chunk [C, D] against all queries; its own running top-k; no collective
        st = jax.tree.map(lambda v: v[0], state)
        x = chunk.astype(q.dtype)
        s = _query._scores(x, q, whiten, self_te, layers, mode)
        c = x.shape[0]
        valid = jnp.arange(c) < n_valid[0]
        cols = (start[0] + jnp.arange(c)).astype(st.top_i.dtype)
        ninf = jnp.asarray(-jnp.inf, s.dtype)
        tv, ti = merge(st.top_v, st.top_i, jnp.where(valid[None, :], s, ninf), cols)
        bv, bi = merge(st.bot_v, st.bot_i, jnp.where(valid[None, :], -s, ninf), cols)
        return jax.tree.map(lambda v: v[None], _query._TopK(tv, ti, bv, bi))

    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(axis), P(axis), P(axis), P(axis), P(), P(), P()),
            out_specs=P(axis),
            check_vma=False,
        )
    )

    def local_merge(state):
        # the one collective of a query: gather every device's k candidates, keep the best k
        st = jax.tree.map(lambda v: v[0], state)
        g = jax.lax.all_gather(st, axis, axis=1, tiled=True)  # [n_test, n_dev * k]
        tv, pos = jax.lax.top_k(g.top_v, k)
        bv, pos_b = jax.lax.top_k(g.bot_v, k)
        return _query._TopK(
            tv, jnp.take_along_axis(g.top_i, pos, 1), bv, jnp.take_along_axis(g.bot_i, pos_b, 1)
        )

    finish = jax.jit(
        jax.shard_map(local_merge, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False)
    )
    return step, finish


def sharded_query(
    log,
    test_grads: Mapping[str, Any],
    projection: Mapping,
    *,
    mesh: Mesh,
    axis: str = "data",
    mode: str = "dot",
    top_k: int = 10,
    damping_ratio: float = 0.1,
    damping: float | Mapping[str, float] | None = None,
    chunk_rows: int | None = None,
    prefetch: int = 2,
    progress: bool = True,
) -> _query.QueryResult:
    """Like ``jaxinf.query`` (top-k only), with the log's rows scored on all devices of ``mesh``.

    Chunk ``j`` of the log (global row order) is scored by device ``j mod n_devices``; each
    process reads only its devices' chunks, with up to ``prefetch`` rounds of reads in flight.
    Each device keeps a running top-k; one ``all_gather`` + top-k at the end gives the global
    result, identical to ``query``'s up to float rounding and the order of tied scores.

    Args: as ``jaxinf.query``, plus ``mesh`` / ``axis`` (see ``jaxmlo.parallel.data_mesh``).

    Returns:
      ``QueryResult`` (``scores_path`` is None: the full score matrix is not written).
    """
    if not isinstance(log, _reader.Log):  # a path, URL or kvstore spec
        log = _reader.open_log(log)
    if mode not in ("dot", "cosine", "relatif"):
        raise ValueError(f"mode must be 'dot', 'cosine' or 'relatif', got {mode!r}")
    n_test = _query._check_query(log, test_grads, projection)
    if log.num_rows == 0:
        raise ValueError(f"log {log.path} has no committed rows")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n_dev = _axis_size(mesh, axis)
    chunk_rows = chunk_rows or _query._default_chunk_rows(log)
    k = min(top_k, log.num_rows)
    pre = _query.preconditioner(
        log.statistics(), log.layers, damping_ratio=damping_ratio, damping=damping
    )
    q, self_te = _query._prepare_test(_query.test_rows_checked(test_grads, log.layers), pre)
    dt = _query._compute_dtype(log.dtype)
    idx_dt = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    rep = NamedSharding(mesh, P())
    dev = NamedSharding(mesh, P(axis))
    q_d = jax.device_put(jnp.asarray(q, dt), rep)
    whiten_d = jax.device_put([jnp.asarray(w, dt) for w in pre.whiten], rep)
    self_te_d = jax.device_put(jnp.asarray(self_te, dt), rep)
    state = jax.device_put(
        _query._TopK(
            jnp.full((n_dev, n_test, k), -jnp.inf, dt),
            jnp.full((n_dev, n_test, k), -1, idx_dt),
            jnp.full((n_dev, n_test, k), -jnp.inf, dt),
            jnp.full((n_dev, n_test, k), -1, idx_dt),
        ),
        dev,
    )
    step, finish = _sharded_fns(mesh, axis, tuple(log.layers), mode, k)

    plan = _query._plan(log, chunk_rows, [s.name for s in log.shards])
    rounds = [plan[r : r + n_dev] for r in range(0, len(plan), n_dev)]
    devices = list(mesh.devices.reshape(-1))  # position i on the axis <-> device i
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    storage = np.dtype(log.meta["storage_dtype"])

    def issue(rnd):
        reads = {}
        for i in mine:
            if i < len(rnd):
                s, a, b, g = rnd[i]
                reads[i] = (s.grads[a:b].read(), b - a, g)
        return reads

    pending = collections.deque()
    it = iter(rounds)
    for _ in range(max(1, prefetch)):
        r = next(it, None)
        if r is not None:
            pending.append(issue(r))
    with tqdm(
        total=log.num_rows, desc=f"sharded query ({mode})", unit="row", disable=not progress
    ) as bar:
        while pending:
            reads = pending.popleft()
            r = next(it, None)
            if r is not None:
                pending.append(issue(r))
            chunks, starts, valids = [], [], []
            for i in mine:
                full = np.zeros((chunk_rows, log.dim), storage)
                n, g = 0, 0
                if i in reads:
                    fut, n, g = reads[i]
                    full[:n] = fut.result()
                    bar.update(n)
                chunks.append(jax.device_put(_fmt.values(full, log.dtype), devices[i]))
                starts.append(jax.device_put(np.asarray([g], idx_dt), devices[i]))
                valids.append(jax.device_put(np.asarray([n], np.int32), devices[i]))
            shape_chunk = (n_dev * chunk_rows, log.dim)
            chunk = jax.make_array_from_single_device_arrays(shape_chunk, dev, chunks)
            start = jax.make_array_from_single_device_arrays((n_dev,), dev, starts)
            valid = jax.make_array_from_single_device_arrays((n_dev,), dev, valids)
            state = step(state, chunk, start, valid, q_d, whiten_d, self_te_d)
    out = finish(state)
    top_i, bot_i = np.asarray(out.top_i), np.asarray(out.bot_i)
    return _query.QueryResult(
        np.asarray(out.top_v),
        log.ids_at(top_i),
        top_i,
        -np.asarray(out.bot_v),
        log.ids_at(bot_i),
        bot_i,
        None,
    )
