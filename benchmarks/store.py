"""Benchmark the gradient log store: write throughput, query throughput vs raw read bandwidth.

    python benchmarks/store.py --rows 200000 --out benchmarks/results/store_cpu.json

Writes a log of ``--rows`` rows x ``--layers * k_out * k_in`` dims (default 16 x 8 x 8 = 1024)
under ``--tmp``, then in the same run measures:

- write: ``LogWriter.write_async`` over pre-generated device batches (distinct ids), including
  the running empirical-Fisher accumulation, until ``close()`` has committed everything;
- raw read: tensorstore reads of the same ``grads`` bytes, one chunk at a time and with
  ``--in-flight`` reads in flight (the bandwidth a query could reach at best);
- query: ``jaxinf.query`` of ``--queries`` test rows against every logged row (dot and relatif,
  top-10), reported as train x test pairs/s and as the bandwidth of the log bytes consumed.

The log was just written, so reads are served from the page cache for both the raw read and
the query alike (the comparison is like for like; disk-cold numbers would be lower for both).
The temporary log is deleted at the end. LogIX is compared only where ``logix`` is importable.

With ``--robustness`` it measures instead (and writes ``--out``, e.g.
``benchmarks/results/store_robustness_cpu.json``):

- the writer's peak RSS per million rows for int and string ids, each in a fresh child process
  (peak RSS after ``2 * --rss-rows`` rows minus the peak after ``--rss-rows``: the
  marginal growth, past the writer's fixed buffers), and the id index's bytes
  per row; with ``--baseline`` the same for the writer of an older ``store.py``;
- the write throughput of this writer (locks, the id index, the non-finite checks) against the
  ``--baseline`` writer, runs interleaved in one process (old, new, old, new, ...), median of
  ``--reps``. The baseline is a copy of the old module, e.g.
  ``git show 9c7af20:jaxinf/_src/store.py > /tmp/store_old.py``.

    python benchmarks/store.py --robustness --baseline /tmp/store_old.py \
        --out benchmarks/results/store_robustness_cpu.json

With ``--scale`` it writes ``--rows`` clustered rows as 4 shards and measures queries per size
in fresh processes and the FAISS index (``--index-only``: the index at ``--rows`` alone):
recall@10 of both ends and the speed-up over exhaustive search at each ``--nprobe`` and
``nprobe_bottom = factor x nprobe`` (``--nprobe-bottom-factors``), timed interleaved.
``--index-study`` measures recall of both ends on LoGra rows of a digits MLP and on clustered
rows, for inner-product IVF indexes and the MIPS-to-L2 reduction. ``--kvstore`` writes and
queries the same log on a local directory, ``file://``, ``memory://`` and a local moto S3
server (skipped when ``moto[server]`` is not installed).

    python benchmarks/store.py --scale --index-only --rows 1000000 --dtype bfloat16 \
        --queries 1,64 --reps 3 --out benchmarks/results/store_index_cpu.json
    python benchmarks/store.py --index-study --out benchmarks/results/store_index_study_cpu.json
    python benchmarks/store.py --kvstore --rows 65536 --reps 5 --queries 64 \
        --out benchmarks/results/store_kvstore_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time

# run from a checkout: import this repository's jaxinf, not an installed copy
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

import jaxinf
from benchmarks._common import loadavg


def _raw_read(path: str, rows: int, chunk_rows: int, in_flight: int) -> float:
    """Seconds to read rows [0, rows) of a zarr array with ``in_flight`` chunk reads outstanding."""
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}}).result()
    t = time.perf_counter()
    pending, total = [], 0
    for a in range(0, rows, chunk_rows):
        pending.append(arr[a : min(a + chunk_rows, rows)].read())
        if len(pending) >= in_flight:
            total += pending.pop(0).result().nbytes
    for p in pending:
        total += p.result().nbytes
    return time.perf_counter() - t


def _gradient_pool(args, layers) -> list:
    """Four device batches of Gaussian rows ``{layer: [batch, k_out, k_in]}`` that the write
    loops reuse with fresh ids: the benchmark measures the store, not the RNG."""
    key = jax.random.PRNGKey(0)
    pool = []
    for j in range(4):
        ks = jax.random.split(jax.random.fold_in(key, j), args.layers)
        pool.append(
            {
                l: jax.random.normal(k, (args.batch, args.k_out, args.k_in), jnp.float32)
                for l, k in zip(layers, ks)
            }
        )
    return pool


def _write_rows(writer, pool, rows, batch):
    """Append ``rows`` rows in batches, cycling through the pre-generated gradient ``pool``."""
    for i, a in enumerate(range(0, rows, batch)):
        b = min(batch, rows - a)
        g = pool[i % len(pool)]
        if b < batch:
            g = {k: v[:b] for k, v in g.items()}
        writer.write_async(g, np.arange(a, a + b))


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=200_000, help="rows written to the log")
    p.add_argument("--layers", type=int, default=16, help="layers per row")
    p.add_argument("--k-out", type=int, default=8, help="k_out of every layer")
    p.add_argument("--k-in", type=int, default=8, help="k_in of every layer")
    p.add_argument("--batch", type=int, default=512, help="rows per write")
    p.add_argument("--queries", default="1,64", help="comma-separated numbers of test rows")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the rows on disk",
    )
    p.add_argument("--in-flight", type=int, default=16, help="reads in flight, raw-read variant")
    p.add_argument("--prefetch", type=int, default=2, help="query reads in flight")
    p.add_argument(
        "--reps", type=int, default=3, help="rounds of raw reads and queries (best kept)"
    )
    p.add_argument(
        "--tmp",
        default="/tmp/jaxinf_store_bench",
        help="directory of the benchmark log (overwritten)",
    )
    p.add_argument(
        "--logix-rows",
        type=int,
        default=5000,
        help="rows of the LogIX side-by-side log (its query is slow: ~20k pairs/s on CPU)",
    )
    p.add_argument("--out", default="benchmarks/results/store_cpu.json", help="JSON results file")
    p.add_argument("--robustness", action="store_true", help="RSS and lock/index cost only")
    p.add_argument(
        "--commit-cost", action="store_true", help="seconds per commit, against --baseline"
    )
    p.add_argument("--baseline", default=None, help="path of an older store.py to compare")
    p.add_argument(
        "--rss-rows", type=int, default=1_000_000, help="rows written for the peak-RSS runs"
    )
    p.add_argument("--write-rows", type=int, default=100_000, help="rows per throughput run")
    p.add_argument("--rss-child", nargs=3, metavar=("IMPL", "KIND", "ROWS"), help=argparse.SUPPRESS)
    p.add_argument("--scale", action="store_true", help="queries at scale, peak RSS, the index")
    p.add_argument(
        "--index-lists",
        type=int,
        default=0,
        help="--scale: IVF lists of the index (0: build_index's default, sqrt(rows))",
    )
    p.add_argument("--nprobe", default="4,16", help="--scale: comma-separated IVF lists probed")
    p.add_argument(
        "--nprobe-bottom-factors",
        default="1,2",
        help="--scale: nprobe_bottom as these multiples of nprobe",
    )
    p.add_argument(
        "--index-only",
        action="store_true",
        help="--scale: only the index at --rows (no per-size query processes)",
    )
    p.add_argument(
        "--index-study",
        action="store_true",
        help="recall of both ends on digits-MLP LoGra rows and on clustered rows",
    )
    p.add_argument("--study-rows", type=int, default=100_000, help="--index-study: clustered rows")
    p.add_argument(
        "--kvstore",
        action="store_true",
        help="write and query throughput on the local filesystem, file://, memory:// and S3",
    )
    p.add_argument("--scale-child", nargs=2, metavar=("LOG", "SHARDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return _rss_child(args, *args.rss_child)
    if args.scale_child:
        return _scale_child(args, *args.scale_child)
    if args.index_study:
        return _index_study(args)
    if args.kvstore:
        return _kvstore(args)
    if args.scale:
        return _scale(args)
    if args.robustness:
        return _robustness(args)
    if args.commit_cost:
        return _commit_cost(args)

    layers = [f"blocks/{i}/mlp" for i in range(args.layers)]
    dim = args.layers * args.k_out * args.k_in
    proj = {
        "layers": {
            l: {"k_in": args.k_in, "k_out": args.k_out, "n_in": 768, "n_out": 2048} for l in layers
        },
        "init": "random",
        "seed": 0,
        "fingerprint": "bench",
    }
    key = jax.random.PRNGKey(0)
    pool = _gradient_pool(args, layers)
    jax.block_until_ready(pool)
    shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(args.tmp)
    log_path = os.path.join(args.tmp, "log")
    result = {
        "benchmark": "store",
        "rows": args.rows,
        "dim": dim,
        "layers": args.layers,
        "k_out": args.k_out,
        "k_in": args.k_in,
        "dtype": args.dtype,
        "batch": args.batch,
        "queries": args.queries,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "command": "python benchmarks/store.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    try:
        # ---- write (after compiling the writer's jitted pack/statistics on a throwaway log)
        with jaxinf.LogWriter(os.path.join(args.tmp, "warmup"), proj, dtype=args.dtype) as w:
            w.write_async(pool[0], np.arange(args.batch))
        t = time.perf_counter()
        with jaxinf.LogWriter(log_path, proj, dtype=args.dtype, writer_id="0") as w:
            _write_rows(w, pool, args.rows, args.batch)
        t_write = time.perf_counter() - t
        log = jaxinf.open_log(log_path)
        assert log.num_rows == args.rows
        nbytes = args.rows * dim * np.dtype(log.meta["storage_dtype"]).itemsize
        result["log_bytes"] = nbytes
        result["log_chunk_rows"] = log.chunk_rows
        result["write"] = {
            "seconds": t_write,
            "rows_per_s": args.rows / t_write,
            "MB_per_s": nbytes / t_write / 1e6,
        }

        # the same rows without the running empirical Fisher (on CPU that matmul is most of the
        # cost), and tensorstore alone writing the same bytes (no ids, no checks, no commits)
        other = os.path.join(args.tmp, "log_nostats")
        t = time.perf_counter()
        with jaxinf.LogWriter(other, proj, dtype=args.dtype, statistics=False) as w:
            _write_rows(w, pool, args.rows, args.batch)
        s = time.perf_counter() - t
        result["write_without_statistics"] = {
            "seconds": s,
            "rows_per_s": args.rows / s,
            "MB_per_s": nbytes / s / 1e6,
        }
        shutil.rmtree(other)
        result["raw_tensorstore_write"] = _raw_write(os.path.join(args.tmp, "raw"), log, args)
        shutil.rmtree(os.path.join(args.tmp, "raw"))

        t = time.perf_counter()
        log.statistics()
        result["fit_statistics_seconds"] = time.perf_counter() - t
        # relatif / cosine read this saved normaliser; "relatif_inline" hides it (renamed
        # aside around each of its runs) to time the per-chunk recomputation it replaces
        t = time.perf_counter()
        jaxinf.self_influence(log, cache=True, progress=False)
        result["self_influence_saved_seconds"] = time.perf_counter() - t
        si_dir = os.path.join(log_path, "self_influence")

        # ---- raw tensorstore read of the same bytes, interleaved with the queries (best of
        # --reps rounds each) so that load from other processes hits both alike
        grads_path = os.path.join(log_path, "shards", "0", "grads")
        _raw_read(grads_path, args.rows, log.chunk_rows, args.in_flight)  # warm the page cache
        raw_cfg = {
            "one_chunk_at_a_time": 1,
            "2_in_flight": 2,
            f"{args.in_flight}_in_flight": args.in_flight,
        }
        queries = [int(q) for q in args.queries.split(",")]
        kt = jax.random.split(jax.random.fold_in(key, 99), args.layers)
        q_cfg = {}
        for nq in queries:
            test = {
                l: np.asarray(jax.random.normal(k, (nq, args.k_out, args.k_in), jnp.float32))
                for l, k in zip(layers, kt)
            }
            modes = ("dot", "relatif", "cosine", "relatif_inline")
            for mode in modes if nq == max(queries) else ("dot",):
                q_cfg[f"{mode}_{nq}q"] = (nq, mode, test)
                with _hidden(si_dir, mode.endswith("_inline")):  # compile
                    jaxinf.query(log, test, proj, mode=_mode(mode), top_k=10, progress=False)
        best = {k: float("inf") for k in list(raw_cfg) + list(q_cfg)}
        in_memory = {}
        for _ in range(args.reps):
            for name, (nq, mode, _) in q_cfg.items():
                r = _score_in_memory(log, nq, mode)
                if (
                    name not in in_memory
                    or r["seconds_per_chunk"] < in_memory[name]["seconds_per_chunk"]
                ):
                    in_memory[name] = r
            for name, inflight in raw_cfg.items():
                best[name] = min(
                    best[name], _raw_read(grads_path, args.rows, log.chunk_rows, inflight)
                )
            for name, (_nq, mode, test) in q_cfg.items():
                with _hidden(si_dir, mode.endswith("_inline")):
                    best[name] = min(
                        best[name],
                        _timed(
                            lambda: jaxinf.query(
                                log,
                                test,
                                proj,
                                mode=_mode(mode),
                                top_k=10,
                                prefetch=args.prefetch,
                                progress=False,
                            )
                        ),
                    )
        result["raw_read"] = {
            k: {"seconds": best[k], "GB_per_s": nbytes / best[k] / 1e9} for k in raw_cfg
        }
        best_raw = max(v["GB_per_s"] for v in result["raw_read"].values())
        result["query"] = {}
        result["score_in_memory"] = {}
        for name, (nq, mode, _) in q_cfg.items():
            s = best[name]
            gbps = nbytes / s / 1e9
            result["query"][name] = {
                "queries": nq,
                "mode": mode,
                "seconds": s,
                "pairs_per_s": args.rows * nq / s,
                "GB_per_s": gbps,
                "fraction_of_raw_read": gbps / best_raw,
            }
            result["score_in_memory"][name] = in_memory[name]
            ceiling = min(best_raw, result["score_in_memory"][name]["GB_per_s"])
            # 1.0 = the query is as fast as the slower of reading and scoring alone
            result["query"][name]["fraction_of_bound"] = gbps / ceiling
        nq = max(queries)
        result["relatif_over_dot_seconds"] = {
            m: best[f"{m}_{nq}q"] / best[f"dot_{nq}q"]
            for m in ("relatif", "cosine", "relatif_inline")
        }
        result["goal"] = (
            "query >= 50% of the raw tensorstore read bandwidth of the same bytes "
            "(best of the raw-read variants); relatif/cosine within 1.5x of dot"
        )
        result["goal_met"] = {
            k: v["fraction_of_raw_read"] >= 0.5 for k, v in result["query"].items()
        }
        try:
            import logix  # noqa: F401
        except ImportError:
            result["logix"] = "skipped: logix (logix-ai) is not importable here"
        else:
            if args.logix_rows > 0:
                nq = max(queries)
                result["logix"] = _logix(args, layers, nq, os.path.join(args.tmp, "logix"))
                ours = result["query"][f"dot_{nq}q"]["pairs_per_s"]
                result["logix"]["ours_over_logix_pairs_per_s"] = (
                    ours / result["logix"]["pairs_per_s"]
                )
            else:
                result["logix"] = "skipped: --logix-rows 0"
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _raw_write(path: str, log, args) -> dict:
    """tensorstore alone writing the log's bytes: whole chunks, ``--in-flight`` writes outstanding."""
    from jaxinf._src.store_files import create_array

    arr = create_array(
        path, (args.rows, log.dim), (log.chunk_rows, log.dim), log.meta["storage_dtype"]
    )
    block = np.asarray(
        np.random.default_rng(0).normal(size=(log.chunk_rows, log.dim)),
        np.dtype(log.meta["storage_dtype"]),
    )
    t = time.perf_counter()
    pending = []
    for a in range(0, args.rows, log.chunk_rows):
        b = min(a + log.chunk_rows, args.rows)
        pending.append(arr[a:b].write(block[: b - a]))
        if len(pending) >= args.in_flight:
            pending.pop(0).result()
    for f in pending:
        f.result()
    s = time.perf_counter() - t
    nbytes = args.rows * log.dim * block.itemsize
    return {"seconds": s, "rows_per_s": args.rows / s, "MB_per_s": nbytes / s / 1e6}


def _score_in_memory(log, nq: int, mode: str) -> dict:
    """Scoring speed of one resident query chunk (no I/O): the compute ceiling of a query.

    "relatif"/"cosine" take the rows' saved normaliser as an input; "relatif_inline"
    recomputes it from the chunk."""
    from jaxinf._src import query as q_mod

    c = q_mod._default_chunk_rows(log)
    step = q_mod._step_fn(tuple(log.layers), _mode(mode), 10, False)
    inv = None if mode in ("dot", "relatif_inline") else jnp.ones((c,), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(c, log.dim)).astype(np.float32))
    q = jnp.asarray(np.random.default_rng(1).normal(size=(nq, log.dim)).astype(np.float32))
    w = [jnp.eye(l.dim, dtype=jnp.float32) for l in log.layers]
    ste = jnp.ones((nq,), jnp.float32)
    idx = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    st = q_mod._TopK(
        jnp.full((nq, 10), -jnp.inf),
        jnp.full((nq, 10), -1, idx),
        jnp.full((nq, 10), -jnp.inf),
        jnp.full((nq, 10), -1, idx),
    )
    jax.block_until_ready(step(st, x, 0, c, q, w, ste, inv))
    reps = 10
    t = time.perf_counter()
    for i in range(reps):
        st, _ = step(st, x, i * c, c, q, w, ste, inv)
    jax.block_until_ready(st)
    s = (time.perf_counter() - t) / reps
    return {
        "chunk_rows": c,
        "seconds_per_chunk": s,
        "pairs_per_s": c * nq / s,
        "GB_per_s": c * log.dim * 4 / s / 1e9,
    }


def _logix(args, layers, nq: int, path: str) -> dict:
    """LogIX 0.1.1: ``compute_influence_all`` over its own memory-mapped log of the same row shape.

    The log is written with LogIX's ``MemoryMapHandler`` (its on-disk format) from random rows,
    read back by its ``LogDataset`` + DataLoader (batch 64, as in thesis appendix C.1.2), and
    scored in "dot" mode; queries are passed already preconditioned (``precondition=False``),
    so only the streaming and scoring are timed, as for ours.
    """
    import torch
    from logix.analysis.influence_function import InfluenceFunction
    from logix.logging.log_loader import LogDataset
    from logix.logging.log_loader_utils import collate_nested_dicts
    from logix.logging.mmap import MemoryMapHandler
    from torch.utils.data import DataLoader

    os.makedirs(path)
    rng = np.random.default_rng(0)
    order = [(l, "grad") for l in layers]
    for c, a in enumerate(range(0, args.logix_rows, 8192)):
        n = min(8192, args.logix_rows - a)
        block = rng.standard_normal((n, len(layers), args.k_out, args.k_in), dtype=np.float32)
        buf = [
            (str(a + i), {l: {"grad": block[i, j]} for j, l in enumerate(layers)}) for i in range(n)
        ]
        MemoryMapHandler.write(path, f"log_rank_0_chunk_{c}.mmap", buf, order)
    loader = DataLoader(
        LogDataset(path, flatten=False),
        batch_size=64,
        shuffle=False,
        collate_fn=collate_nested_dicts,
    )
    src = (
        [f"q{i}" for i in range(nq)],
        {l: {"grad": torch.randn(nq, args.k_out, args.k_in)} for l in layers},
    )
    t = time.perf_counter()
    res = InfluenceFunction(state=None).compute_influence_all(
        src, loader, mode="dot", precondition=False
    )
    s = time.perf_counter() - t
    assert tuple(res["influence"].shape) == (nq, args.logix_rows)
    import logix

    return {
        "version": getattr(logix, "__version__", "?"),
        "rows": args.logix_rows,
        "queries": nq,
        "mode": "dot",
        "seconds": s,
        "pairs_per_s": args.logix_rows * nq / s,
        "note": (
            "measured on --logix-rows rows, not --rows: LogIX's per-row Python loading "
            "and its growing torch.cat of results make a 200k-row run take many minutes "
            "here; its rate can only fall with more rows"
        ),
    }


def _writer_class(impl: str, baseline: str | None):
    """``LogWriter`` of this checkout ("new") or of the ``--baseline`` module ("old")."""
    if impl == "new":
        return jaxinf.LogWriter
    import importlib.util

    spec = importlib.util.spec_from_file_location("_store_baseline", baseline)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LogWriter


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_child(args, impl: str, kind: str, rows: str) -> None:
    """One child run: write ``rows`` rows of 16 float32 columns with int or string ids."""
    rows = int(rows)
    writer_cls = _writer_class(impl, args.baseline)
    proj = {"layers": {"l": {"k_in": 4, "k_out": 4}}, "init": "random", "seed": 0}
    batch = 4096
    g = {"l": np.random.default_rng(0).normal(size=(batch, 4, 4)).astype(np.float32)}
    path = os.path.join(args.tmp, f"rss_{impl}_{kind}_{rows}")
    w = writer_cls(path, proj, writer_id="0", statistics=False)
    for a in range(0, rows, batch):
        b = min(batch, rows - a)
        ids = np.arange(a, a + b)
        if kind == "str":
            ids = [f"example-{i:012d}" for i in ids]
        w.write_async(g if b == batch else {"l": g["l"][:b]}, ids)
    w.close()
    index = getattr(w, "_index", None)
    print(
        json.dumps(
            {
                "peak_rss_bytes": _peak_rss_bytes(),
                "index_bytes": None if index is None else index.nbytes,
            }
        )
    )


def _robustness(args) -> None:
    import statistics as pystats
    import subprocess

    shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(args.tmp)
    impls = ["new"] + (["old"] if args.baseline else [])
    result = {
        "benchmark": "store_robustness",
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "command": "python benchmarks/store.py --robustness"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + f" --rss-rows {args.rss_rows} --write-rows {args.write_rows} --reps {args.reps}",
        "baseline": args.baseline,
    }
    try:
        rss = {}
        for impl in impls:
            for kind in ("int", "str"):
                peaks = {}
                # whole batches only: a ragged last batch would compile a new shape, whose
                # compiler memory is not the writer's
                n_rows = -(-args.rss_rows // 4096) * 4096
                for rows in (n_rows, 2 * n_rows):
                    cmd = [sys.executable, __file__, "--tmp", args.tmp]
                    if args.baseline:
                        cmd += ["--baseline", args.baseline]
                    cmd += ["--rss-child", impl, kind, str(rows)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    peaks[rows] = json.loads(out.stdout.strip().splitlines()[-1])
                one, two = peaks[n_rows], peaks[2 * n_rows]
                per_row = (two["peak_rss_bytes"] - one["peak_rss_bytes"]) / n_rows
                rss[f"{impl}_{kind}_ids"] = {
                    "rows": [n_rows, 2 * n_rows],
                    "peak_rss_bytes": [one["peak_rss_bytes"], two["peak_rss_bytes"]],
                    "peak_rss_growth_MB_per_million_rows": per_row,
                    "peak_rss_growth_bytes_per_row": per_row,
                    "id_index_bytes_per_row": (
                        None if two["index_bytes"] is None else two["index_bytes"] / (2 * n_rows)
                    ),
                }
                shutil.rmtree(args.tmp)
                os.makedirs(args.tmp)
        result["writer_memory"] = rss
        if args.baseline:
            layers = [f"blocks/{i}/mlp" for i in range(args.layers)]
            proj = {
                "layers": {l: {"k_in": args.k_in, "k_out": args.k_out} for l in layers},
                "init": "random",
                "seed": 0,
            }
            pool = _gradient_pool(args, layers)
            classes = {impl: _writer_class(impl, args.baseline) for impl in impls}
            times = {impl: [] for impl in impls}
            for rep in range(args.reps + 1):  # the first round compiles and is dropped
                for impl in impls:
                    path = os.path.join(args.tmp, f"w_{impl}_{rep}")
                    t = time.perf_counter()
                    with classes[impl](path, proj, writer_id="0") as w:
                        _write_rows(w, pool, args.write_rows, args.batch)
                    if rep:
                        times[impl].append(time.perf_counter() - t)
                    shutil.rmtree(path)
            med = {impl: pystats.median(v) for impl, v in times.items()}
            result["write_throughput"] = {
                "rows": args.write_rows,
                "dim": args.layers * args.k_out * args.k_in,
                "batch": args.batch,
                "how": "old and new runs interleaved in one process; median of --reps",
                "seconds": times,
                "rows_per_s_median": {k: args.write_rows / v for k, v in med.items()},
                "new_over_old_seconds": med["new"] / med["old"],
                "target": "new_over_old_seconds <= 1.05",
            }
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _commit_cost(args) -> None:
    """Seconds per commit (step 4 of the protocol) of this writer and of the --baseline one, on
    a log with a second shard (so the commit lock and the other shard's record are read)."""
    proj = {"layers": {"l": {"k_in": 32, "k_out": 32}}, "seed": 0}
    g = {"l": np.ones((256, 32, 32), np.float32)}
    classes = {"old": _writer_class("old", args.baseline), "new": jaxinf.LogWriter}
    times = {"old": [], "new": []}
    n = 300
    for _ in range(args.reps):
        for impl, cls in classes.items():
            path = os.path.join(args.tmp, f"commit_{impl}")
            shutil.rmtree(path, ignore_errors=True)
            with jaxinf.LogWriter(path, proj, writer_id="other", chunk_rows=256) as o:
                o.write(g, ids=np.arange(10**6, 10**6 + 256))
            w = cls(path, proj, writer_id="0", chunk_rows=256)
            w.write(g, ids=np.arange(256))
            times[impl].append(_timed(lambda: [w._commit() for _ in range(n)]) / n)
            w.close()
            shutil.rmtree(path)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "benchmark": "store_commit_cost",
        "command": f"python benchmarks/store.py --commit-cost --baseline {args.baseline} "
        f"--reps {args.reps}",
        "seconds_per_commit": times,
        "best_seconds_per_commit": best,
        "added_seconds_per_commit": best["new"] - best["old"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


_SCALE_SHARDS = 4  # --scale writes --rows as 4 equal shards: queries over 1, 2, 4 of them


def _scale_proj(args) -> tuple[list, dict]:
    layers = [f"blocks/{i}/mlp" for i in range(args.layers)]
    proj = {
        "layers": {l: {"k_in": args.k_in, "k_out": args.k_out} for l in layers},
        "init": "random",
        "seed": 0,
        "fingerprint": "bench-scale",
    }
    return layers, proj


def _clustered(args, layers):
    """A jitted ``batch(i, n) -> {layer: [n, k_out, k_in]}`` of distinct clustered rows.

    Rows are ``center + 0.5 noise`` around 1,000 random centers: gradients of similar examples
    point alike, which is the structure an IVF index uses (i.i.d. Gaussian rows have none and
    are the worst case of any approximate search). Test rows come from the same mixture.
    """
    dim = args.layers * args.k_out * args.k_in
    centers = jax.random.normal(jax.random.PRNGKey(7), (1000, dim), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def batch(i, n):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(11), i))
        lab = jax.random.randint(k1, (n,), 0, centers.shape[0])
        x = centers[lab] + 0.5 * jax.random.normal(k2, (n, dim), jnp.float32)
        x = x.reshape(n, len(layers), args.k_out, args.k_in)
        return {l: x[:, j] for j, l in enumerate(layers)}

    return batch


def _scale_child(args, log_path: str, shards: str) -> None:
    """One child: raw reads and dot/relatif queries over ``shards``; prints JSON with peak RSS."""
    layers, proj = _scale_proj(args)
    log = jaxinf.open_log(log_path)
    names = shards.split(",")
    sel = [s for s in log.shards if s.name in names]
    rows = sum(s.rows for s in sel)
    nbytes = rows * log.dim * np.dtype(log.meta["storage_dtype"]).itemsize
    nq = max(int(q) for q in args.queries.split(","))
    test = {k: np.asarray(v) for k, v in _clustered(args, layers)(10**6, nq).items()}
    cfg = {"dot": "dot", "relatif": "relatif", "raw_read": None}
    best = {k: float("inf") for k in cfg}
    query_rss = None
    for _ in range(args.reps):  # the first round also compiles; best of the rounds is kept
        for name, mode in cfg.items():
            if mode is None and query_rss is None:
                query_rss = _peak_rss_bytes()  # the queries' peak, before any raw read
            if mode is None:
                t = 0.0
                for s in sel:
                    g = os.path.join(log_path, "shards", s.name, "grads")
                    t += _raw_read(g, s.rows, log.chunk_rows, args.in_flight)
            else:
                t = _timed(
                    lambda: jaxinf.query(
                        log,
                        test,
                        proj,
                        mode=mode,
                        top_k=10,
                        prefetch=args.prefetch,
                        shards=names,
                        progress=False,
                    )
                )
            best[name] = min(best[name], t)
    out = {
        "rows": rows,
        "shards": names,
        "queries": nq,
        "log_bytes": nbytes,
        "raw_read_GB_per_s": nbytes / best["raw_read"] / 1e9,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_bytes_queries_only": query_rss,
    }
    for m in ("dot", "relatif"):
        out[m] = {
            "seconds": best[m],
            "pairs_per_s": rows * nq / best[m],
            "GB_per_s": nbytes / best[m] / 1e9,
            "fraction_of_raw_read": best["raw_read"] / best[m],
        }
    print(json.dumps(out))


def _scale_index(args, log, layers, proj) -> dict:
    """Build the IVF index of the log's snapshot; recall@10 and speed against exhaustive.

    Timings are interleaved: each round times the exhaustive query, then every (nprobe,
    nprobe_bottom) setting once; min and median over ``--reps`` rounds are kept.
    """
    import statistics as pystats

    from jaxinf._src.index import recall_at_k

    factory = f"IVF{args.index_lists},SQ8" if args.index_lists else None  # None: the default
    t = time.perf_counter()
    d = jaxinf.build_index(log, factory=factory, progress=False)
    with open(os.path.join(d, "record.json")) as f:
        params = json.load(f)["params"]
    out = {
        "factory": params["factory"],
        "train_rows": params["train_rows"],
        "build_seconds": time.perf_counter() - t,
        "by_queries": {},
    }
    nq_max = max(int(q) for q in args.queries.split(","))
    test_all = {k: np.asarray(v) for k, v in _clustered(args, layers)(10**6, nq_max).items()}
    settings = [
        (p, m * p)
        for p in (int(v) for v in args.nprobe.split(","))
        for m in (int(v) for v in args.nprobe_bottom_factors.split(","))
    ]
    for nq in sorted({1, nq_max}):
        test = {k: v[:nq] for k, v in test_all.items()}
        exhaustive = lambda: jaxinf.query(log, test, proj, top_k=10, progress=False)  # noqa: E731
        ref = exhaustive()

        def indexed(p, pb):
            return jaxinf.query_index(log, test, proj, top_k=10, nprobe=p, nprobe_bottom=pb)

        got = {sp: indexed(*sp) for sp in settings}  # also pages the index in
        times = {"exhaustive": []} | {sp: [] for sp in settings}
        for _ in range(args.reps):
            times["exhaustive"].append(_timed(exhaustive))
            for sp in settings:
                times[sp].append(_timed(lambda sp=sp: indexed(*sp)))
        ex_min = min(times["exhaustive"])
        ex_med = pystats.median(times["exhaustive"])
        row = {"exhaustive_seconds": ex_min, "exhaustive_seconds_median": ex_med, "settings": []}
        for sp in settings:
            g = got[sp]
            row["settings"].append(
                {
                    "nprobe": sp[0],
                    "nprobe_bottom": sp[1],
                    "seconds": min(times[sp]),
                    "seconds_median": pystats.median(times[sp]),
                    "speedup": ex_min / min(times[sp]),
                    "speedup_median": ex_med / pystats.median(times[sp]),
                    "recall_at_10_top": recall_at_k(g.top_rows, ref.top_rows),
                    "recall_at_10_bottom": recall_at_k(g.bottom_rows, ref.bottom_rows),
                    "max_rel_score_error_vs_exhaustive_on_common_rows": _common_error(g, ref),
                }
            )
        out["by_queries"][str(nq)] = row
    return out


def _digits_rows(shifts: int = 1) -> tuple[dict, dict, dict]:
    """LoGra rows (random projections, k = 16) of a trained digits MLP: train and test, by layer.

    The 1,500 training images are also logged shifted by up to ``shifts`` pixels in each
    direction ((2 shifts + 1)^2 copies), for more rows of the same kind.
    """
    from jaxinf import examples

    task = examples.digits_task("mlp", n_train=1500, n_test=297, steps=300)
    params = task.train_fn(
        task.init_fn(jax.random.PRNGKey(0)), jnp.ones(1500), jax.random.PRNGKey(1)
    )
    img = np.asarray(task.x_train).reshape(-1, 8, 8)
    moves = range(-shifts, shifts + 1)
    x = np.concatenate([np.roll(img, (dy, dx), (1, 2)) for dy in moves for dx in moves])
    y = np.tile(np.asarray(task.y_train), len(moves) ** 2)

    def loss(p, b):
        return jnp.mean(jax.vmap(lambda u, v: task.example_loss(p, (u, v)))(*b))

    cap = jaxinf.linen_capture(loss)
    batch = (jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(y))
    layers = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("dense",)))
    layers = {
        k: v._replace(k_in=min(16, v.n_in), k_out=min(16, v.n_out)) for k, v in layers.items()
    }
    fn = jax.jit(
        jaxinf.projected_gradients(
            cap, jaxinf.random_projections(layers, key=jax.random.PRNGKey(0))
        )
    )

    def rows(bx, by):
        parts = [fn(params, (bx[a : a + 500], by[a : a + 500])) for a in range(0, len(bx), 500)]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    proj = {
        "layers": {k: {"k_in": v.k_in, "k_out": v.k_out} for k, v in layers.items()},
        "seed": 0,
    }
    return rows(*batch), rows(task.x_test, task.y_test), proj


def _lists_needed(ivf, rows: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> float:
    """Median over queries of the lists an IVF search must visit (in its own order) to see
    every one of the query's exact top-k rows."""
    nlist = ivf.nlist
    _, home = ivf.quantizer.search(np.ascontiguousarray(rows, np.float32), 1)
    _, order = ivf.quantizer.search(np.ascontiguousarray(queries, np.float32), nlist)
    need = []
    for i in range(len(queries)):
        rank = np.empty(nlist, np.int64)
        rank[order[i]] = np.arange(nlist)
        need.append(int(rank[home[exact[i], 0]].max()) + 1)
    return float(np.median(need))


def _index_study_one(name, train, test, proj, path, nlists, nprobes, factors) -> dict:
    """Recall@10 of both ends on one log, for IVF indexes by inner product and by the
    MIPS-to-L2 reduction, with the diagnostics that explain the difference."""
    import faiss

    from jaxinf._src.index import recall_at_k
    from jaxinf._src.query import _prepare_test, preconditioner, test_rows_checked

    shutil.rmtree(path, ignore_errors=True)
    n = len(next(iter(train.values())))
    with jaxinf.LogWriter(path, proj, dtype="float32", writer_id="0") as w:
        w.write(train, ids=np.arange(n))
    log = jaxinf.open_log(path)
    x, _ = log.read(as_layers=False)
    x = np.asarray(x, np.float32)
    pre = preconditioner(log.statistics(), log.layers)
    q, _ = _prepare_test(test_rows_checked(test, log.layers), pre)
    q = q.astype(np.float32)
    ref = jaxinf.query(log, test, proj, top_k=10, progress=False)
    norm = np.linalg.norm(x, axis=1)
    qn = np.linalg.norm(q, axis=1)
    ends = {"top": ref.top_rows, "bottom": ref.bottom_rows}
    out = {
        "rows": n,
        "dim": log.dim,
        "test_rows": len(q),
        "row_norm_cv": float(norm.std() / norm.mean()),
        "norm_of_exact_top10_over_mean": float(norm[ref.top_rows].mean() / norm.mean()),
        "norm_of_exact_bottom10_over_mean": float(norm[ref.bottom_rows].mean() / norm.mean()),
        "median_cosine_of_exact_top10": float(
            np.median(ref.top_scores / (qn[:, None] * norm[ref.top_rows]))
        ),
        "median_cosine_of_exact_bottom10": float(
            np.median(ref.bottom_scores / (qn[:, None] * norm[ref.bottom_rows]))
        ),
        "by_nlist": {},
    }
    # the MIPS-to-L2 reduction: [x, sqrt(M^2 - |x|^2)] against [q, 0]; L2 order = inner product
    xa = np.hstack([x, np.sqrt(np.maximum(norm.max() ** 2 - norm**2, 0.0))[:, None]])
    qa = np.hstack([q, np.zeros((len(q), 1), np.float32)])
    for nlist in nlists:
        train_rows = min(n, 64 * nlist)
        jaxinf.build_index(log, factory=f"IVF{nlist},Flat", train_rows=train_rows, progress=False)
        res = {"inner_product": {}, "mips_to_l2": {}}
        l2 = faiss.index_factory(xa.shape[1], f"IVF{nlist},Flat", faiss.METRIC_L2)
        sample = np.unique(np.linspace(0, n - 1, train_rows).round().astype(np.int64))
        l2.train(np.ascontiguousarray(xa[sample], np.float32))
        l2.add(np.ascontiguousarray(xa, np.float32))
        for p in nprobes:
            for m in factors:
                g = jaxinf.query_index(
                    log,
                    test,
                    proj,
                    top_k=10,
                    nprobe=p,
                    nprobe_bottom=m * p,
                    factory=f"IVF{nlist},Flat",
                )
                res["inner_product"][f"nprobe {p}, bottom {m * p}"] = {
                    "top": recall_at_k(g.top_rows, ref.top_rows),
                    "bottom": recall_at_k(g.bottom_rows, ref.bottom_rows),
                }
            faiss.extract_index_ivf(l2).nprobe = p
            c = max(4 * 10, 32)  # query_index's default candidates, re-scored exactly below
            found = {}
            for end, sign in (("top", 1.0), ("bottom", -1.0)):
                _, cand = l2.search(np.ascontiguousarray(sign * qa, np.float32), c)
                exact = np.take_along_axis(q @ x.T, cand, axis=1)
                found[end] = np.take_along_axis(cand, np.argsort(-sign * exact, axis=1)[:, :10], 1)
            res["mips_to_l2"][f"nprobe {p}"] = {
                e: recall_at_k(found[e], ends[e]) for e in ("top", "bottom")
            }
        # the lists a search visits, in its order: a quantizer trained as build_index trains it
        ip = faiss.index_factory(log.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(ip)
        ivf.cp.seed = 0  # build_index's default seed
        ivf.train(np.ascontiguousarray(x[sample]))
        res["lists_needed_for_recall_1_median"] = {
            "top": _lists_needed(ivf, x, q, ref.top_rows),
            "bottom": _lists_needed(ivf, x, -q, ref.bottom_rows),
        }
        out["by_nlist"][str(nlist)] = res
        shutil.rmtree(os.path.join(log.path, "index"))
    print(name, json.dumps(out), flush=True)
    return out


def _index_study(args) -> None:
    """Why the most negative rows are hard to find: real LoGra rows against the clustered ones."""
    shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(args.tmp)
    t0 = time.perf_counter()
    result = {
        "benchmark": "store_index_study",
        "command": f"python benchmarks/store.py --index-study --study-rows {args.study_rows}",
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "loadavg_start": loadavg(),
    }
    try:
        train, test, proj = _digits_rows()
        test = {k: v[:64] for k, v in test.items()}
        n = len(next(iter(train.values())))
        root = round(n**0.5)
        result["digits_mlp_logra"] = _index_study_one(
            "digits",
            train,
            test,
            proj,
            os.path.join(args.tmp, "digits"),
            (root, 4 * root),
            (1, 2, 4),
            (1, 2, 4),
        )
        args.layers, args.k_out, args.k_in = 16, 8, 8
        layers, proj = _scale_proj(args)
        batch = _clustered(args, layers)
        train = {k: np.asarray(v) for k, v in batch(0, args.study_rows).items()}
        test = {k: np.asarray(v) for k, v in batch(10**6, 64).items()}
        root = round(args.study_rows**0.5)
        result["clustered"] = _index_study_one(
            "clustered",
            train,
            test,
            proj,
            os.path.join(args.tmp, "clustered"),
            (args.study_rows // 4000, root, 1000),
            (4, 16),
            (1, 2, 4),
        )
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


class _MotoS3:
    """A local S3-compatible server (moto) for the duration of a ``with`` block; None if absent."""

    def __init__(self, tmp: str):
        self.tmp, self.server, self.saved = tmp, None, {}

    def __enter__(self):
        import importlib.util
        import socket
        import subprocess
        import urllib.request

        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            return None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        os.makedirs(self.tmp, exist_ok=True)
        creds, config = os.path.join(self.tmp, "credentials"), os.path.join(self.tmp, "config")
        with open(creds, "w") as f:
            f.write("[default]\naws_access_key_id = test\naws_secret_access_key = t\n")
        with open(config, "w") as f:
            f.write("[default]\nregion = us-east-1\n")
        env = {
            "AWS_SHARED_CREDENTIALS_FILE": creds,
            "AWS_CONFIG_FILE": config,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                req = urllib.request.Request(f"{self.endpoint}/logs", method="PUT")
                urllib.request.urlopen(req)
                return self
            except OSError:
                if self.server.poll() is not None:
                    break
                time.sleep(0.05)
        return None

    def spec(self, name: str) -> dict:
        return {
            "driver": "s3",
            "bucket": "logs",
            "endpoint": self.endpoint,
            "aws_region": "us-east-1",
            "path": f"{name}/",
        }

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.terminate()
            self.server.wait()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def _kvstore(args) -> None:
    """Write throughput and dot-query pairs/s of the same log on each kvstore."""
    import statistics as pystats

    layers, proj = _scale_proj(args)
    dim = args.layers * args.k_out * args.k_in
    key = jax.random.PRNGKey(0)
    pool = _gradient_pool(args, layers)
    kt = jax.random.split(jax.random.fold_in(key, 99), args.layers)
    nq = max(int(q) for q in args.queries.split(","))
    test = {
        l: np.asarray(jax.random.normal(k, (nq, args.k_out, args.k_in), jnp.float32))
        for l, k in zip(layers, kt)
    }
    shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(args.tmp)
    nbytes = args.rows * dim * np.dtype(args.dtype).itemsize
    result = {
        "benchmark": "store_kvstore",
        "rows": args.rows,
        "dim": dim,
        "dtype": args.dtype,
        "batch": args.batch,
        "queries": nq,
        "log_bytes": nbytes,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "tensorstore": importlib.metadata.version("tensorstore"),
        "command": f"python benchmarks/store.py --kvstore --rows {args.rows} --dtype {args.dtype} "
        f"--queries {nq} --reps {args.reps}",
        "how": "each round writes a fresh log on every store in turn, then queries it (dot, "
        "top-10); min and median over --reps rounds",
        "loadavg_start": loadavg(),
    }
    t0 = time.perf_counter()
    try:
        with _MotoS3(os.path.join(args.tmp, "aws")) as s3:
            stores = {
                "local path": lambda r: os.path.join(args.tmp, f"path_{r}"),
                "file:// URL": lambda r: "file://" + os.path.join(args.tmp, f"url_{r}") + "/",
                "memory://": lambda r: f"memory://bench_{r}/log/",
            }
            if s3 is not None:
                stores["s3 (local moto server)"] = lambda r: s3.spec(f"log_{r}")
            else:
                result["s3"] = 'skipped: moto server not installed (pip install "moto[server]")'
            # compile the writer's jitted pack/statistics and the query once, on a throwaway log
            warm = os.path.join(args.tmp, "warm")
            with jaxinf.LogWriter(warm, proj, dtype=args.dtype, writer_id="0") as w:
                w.write_async(pool[0], np.arange(args.batch))
            jaxinf.query(warm, test, proj, top_k=10, progress=False)
            times = {name: {"write": [], "query": []} for name in stores}
            for r in range(args.reps):
                for name, where in stores.items():
                    loc = where(r)
                    t = time.perf_counter()
                    with jaxinf.LogWriter(loc, proj, dtype=args.dtype, writer_id="0") as w:
                        _write_rows(w, pool, args.rows, args.batch)
                    times[name]["write"].append(time.perf_counter() - t)
                    log = jaxinf.open_log(loc)
                    assert log.num_rows == args.rows
                    times[name]["query"].append(
                        _timed(lambda: jaxinf.query(log, test, proj, top_k=10, progress=False))
                    )
                    if isinstance(loc, str) and not loc.startswith("memory://"):
                        shutil.rmtree(loc.removeprefix("file://"), ignore_errors=True)
            result["stores"] = {}
            for name, tt in times.items():
                w, q = tt["write"], tt["query"]
                result["stores"][name] = {
                    "write_seconds": w,
                    "query_seconds": q,
                    "write_rows_per_s": args.rows / min(w),
                    "write_MB_per_s": nbytes / min(w) / 1e6,
                    "write_rows_per_s_median": args.rows / pystats.median(w),
                    "query_pairs_per_s": args.rows * nq / min(q),
                    "query_pairs_per_s_median": args.rows * nq / pystats.median(q),
                    "query_GB_per_s": nbytes / min(q) / 1e9,
                }
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _common_error(got, ref) -> float:
    """Largest |score difference| over rows both results returned (re-scoring is exact)."""
    err = 0.0
    pairs = list(zip(got.top_scores, got.top_rows, ref.top_scores, ref.top_rows))
    pairs += zip(got.bottom_scores, got.bottom_rows, ref.bottom_scores, ref.bottom_rows)
    for gs, gr, rs, rr in pairs:
        common, gi, ri = np.intersect1d(gr, rr, return_indices=True)
        if len(common):
            err = max(err, float(np.max(np.abs(gs[gi] - rs[ri]) / np.abs(rs[ri]))))
    return err


def _scale(args) -> None:
    """Queries over --rows rows (4 shards): pairs/s vs raw reads, peak RSS per size, the index."""
    import subprocess

    layers, proj = _scale_proj(args)
    batch_fn = _clustered(args, layers)
    per = args.rows // _SCALE_SHARDS
    shutil.rmtree(args.tmp, ignore_errors=True)
    os.makedirs(args.tmp)
    log_path = os.path.join(args.tmp, "log")
    result = {
        "benchmark": "store_scale",
        "rows": per * _SCALE_SHARDS,
        "dim": args.layers * args.k_out * args.k_in,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "command": f"python benchmarks/store.py --scale --rows {args.rows} --dtype {args.dtype} "
        f"--queries {args.queries} --reps {args.reps} --index-lists {args.index_lists} "
        f"--nprobe {args.nprobe} --nprobe-bottom-factors {args.nprobe_bottom_factors}"
        + (" --index-only" if args.index_only else ""),
        "data": "clustered rows: 1,000 random centers + 0.5 x Gaussian noise, distinct rows",
        "loadavg_start": loadavg(),
        "sizes": {},
        "index": {},
    }
    t0 = time.perf_counter()
    try:
        for half in (0, 1):  # two shards, measure; two more, measure again
            for j in (2 * half, 2 * half + 1):
                t = time.perf_counter()
                with jaxinf.LogWriter(log_path, proj, dtype=args.dtype, writer_id=str(j)) as w:
                    for i, a in enumerate(range(0, per, args.batch)):
                        n = args.batch if a + args.batch <= per else per - a
                        w.write_async(
                            batch_fn(j * 10**5 + i, n), np.arange(j * per + a, j * per + a + n)
                        )
                result.setdefault("write_seconds", []).append(time.perf_counter() - t)
            if args.index_only and half == 0:
                continue  # only the full log is indexed
            log = jaxinf.open_log(log_path)
            t = time.perf_counter()
            jaxinf.self_influence(log, cache=True, progress=False)
            result.setdefault("self_influence_saved_seconds", {})[str(log.num_rows)] = (
                time.perf_counter() - t
            )
            for n_shards in () if args.index_only else (1, 2) if half == 0 else (4,):
                shards = ",".join(str(j) for j in range(n_shards))
                cmd = [sys.executable, __file__, "--scale-child", log_path, shards]
                cmd += ["--layers", str(args.layers), "--k-out", str(args.k_out)]
                cmd += ["--k-in", str(args.k_in), "--queries", args.queries]
                cmd += ["--reps", str(args.reps), "--in-flight", str(args.in_flight)]
                cmd += ["--prefetch", str(args.prefetch)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                result["sizes"][str(r["rows"])] = r
                print(json.dumps(r), flush=True)
            result["index"][str(log.num_rows)] = _scale_index(args, log, layers, proj)
            print(json.dumps(result["index"][str(log.num_rows)]), flush=True)
    finally:
        result["loadavg_end"] = loadavg()
        result["total_seconds"] = time.perf_counter() - t0
        shutil.rmtree(args.tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _mode(name: str) -> str:
    return name.removesuffix("_inline")


class _hidden:
    """Rename a directory aside for the duration of a ``with`` block (when ``on``)."""

    def __init__(self, path: str, on: bool):
        self.path, self.on = path, on and os.path.isdir(path)

    def __enter__(self):
        if self.on:
            os.rename(self.path, self.path + ".aside")

    def __exit__(self, *exc):
        if self.on:
            os.rename(self.path + ".aside", self.path)
        return False


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
