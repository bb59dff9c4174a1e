"""Scale-out benchmark: data-parallel LoGra logging, SAMA reweighting, sharded queries.

Every part compares against a baseline measured in the same run, on all devices of the machine
(a ``'data'`` mesh over ``jax.devices()``):

* ``logging``: a Flax (Linen) transformer LM. tokens/s and compiled memory of a plain training
  step (forward + backward + AdamW) vs ``jaxinf.sharded_logging`` (LoGra on every linear layer +
  projected covariance), and end to end with rows written to a tensorstore log.
* ``reweighting``: data reweighting (thesis 3.4.1) of a transformer classifier with an MWN meta
  network, as a ``jaxmlo`` program under ``jaxmlo.parallel.parallel_step``: samples/s and compiled
  memory of plain finetuning vs SAMA, CG and Neumann.
* ``query``: a log of random rows; raw tensorstore read bandwidth vs ``jaxinf.query`` and
  ``jaxinf.sharded_query`` (pairs/s and the bytes/s they stream).

``--size small`` runs in about a minute on a 2-core CPU; ``--size large`` is for a GPU:
a ~115M-parameter LM (12 layers, width 768, 12 heads, MLP 2048, vocabulary 32000) at sequence 512,
a ~110M-parameter BERT-base-shaped classifier (sequence 128, batch 32), bf16 compute, and a
query over 1M logged rows of 4096 values.

    python -m benchmarks.scale --size small --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxinf
import jaxmlo
import jaxmlo.testing
from benchmarks._common import loadavg, write_json

SIZES = {
    "small": dict(
        lm=dict(
            vocab=256, width=64, heads=4, mlp=128, layers=2, seq=64, batch=4, rank=4, log_batches=4
        ),
        clf=dict(vocab=256, width=32, heads=2, mlp=64, layers=1, seq=16, batch=16, classes=4),
        query=dict(rows=65_536, layers=8, k=8, n_test=64, chunk_rows=4096),
        iters=5,
    ),
    "large": dict(
        lm=dict(
            vocab=32000,
            width=768,
            heads=12,
            mlp=2048,
            layers=12,
            seq=512,
            batch=8,
            rank=8,
            log_batches=20,
        ),
        clf=dict(
            vocab=30522, width=768, heads=12, mlp=3072, layers=12, seq=128, batch=32, classes=4
        ),
        query=dict(rows=1_048_576, layers=16, k=16, n_test=64, chunk_rows=8192),
        iters=20,
    ),
}


# ------------------------------------------------------------------------------------- models


class Block(nn.Module):
    width: int
    heads: int
    mlp: int
    causal: bool

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(h)))


class Transformer(nn.Module):
    vocab: int
    width: int
    heads: int
    mlp: int
    layers: int
    out: int  # vocabulary (LM) or classes (classifier, mean-pooled)
    causal: bool

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width)(ids)
        x = x + nn.Embed(ids.shape[-1], self.width)(jnp.arange(ids.shape[-1]))
        for _ in range(self.layers):
            x = Block(self.width, self.heads, self.mlp, self.causal)(x)
        x = nn.LayerNorm()(x)
        if not self.causal:
            x = x.mean(axis=-2)
        return nn.Dense(self.out, name="head")(x)


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), y[..., None], -1)[
        ..., 0
    ]


def cast(tree, dtype):
    return jax.tree.map(
        lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree
    )


def timed(fn, args_fn, iters):
    """Median seconds per call of ``fn(*args_fn(i))`` after two warm-up calls."""
    out = None
    for i in range(2):
        out = fn(*args_fn(i))
    jax.block_until_ready(out)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        out = fn(*args_fn(i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "peak_estimate_bytes": int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        ),
    }


def device_peak() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # CPU devices have no memory stats
        return None


# ------------------------------------------------------------------------------------- logging


def bench_logging(cfg, iters, mesh, compute_dtype, tmp):
    c = cfg["lm"]
    n_dev = mesh.shape["data"]
    model = Transformer(c["vocab"], c["width"], c["heads"], c["mlp"], c["layers"], c["vocab"], True)
    B = c["batch"] * n_dev
    key = jax.random.key(0)
    ids = jax.random.randint(key, (B, c["seq"] + 1), 0, c["vocab"])
    params = jax.jit(model.init)(key, ids[:1, :-1])["params"]
    batches = [
        {"ids": jax.random.randint(jax.random.key(i), (B, c["seq"] + 1), 0, c["vocab"])}
        for i in range(4)
    ]
    tokens = B * c["seq"]

    def loss_fn(p, b):  # per-example sum over tokens; capture runs it on one example
        logits = model.apply({"params": p}, b["ids"][:, :-1])
        return jnp.sum(xent(logits, b["ids"][:, 1:]))

    # plain training step, data-parallel by XLA's partitioner over the same mesh
    opt = optax.adamw(1e-4)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, rep)
    batches = [jax.device_put(b, dat) for b in batches]
    opt_state = jax.device_put(opt.init(params), rep)

    @jax.jit
    def plain(p, s, b):
        loss, g = jax.value_and_grad(
            lambda q: loss_fn(cast(q, compute_dtype) if compute_dtype else q, b) / B
        )(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    plain_c = plain.lower(params, opt_state, batches[0]).compile()
    t_plain, _ = timed(plain_c, lambda i: (params, opt_state, batches[i % 4]), iters)

    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batches[0], select=jaxinf.Select(types=("dense",)))
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(1), k_in=c["rank"], k_out=c["rank"]
    )
    meta = jaxinf.projection_metadata(projs, init="random", seed=1, model="benchmark-lm")
    logging = jaxinf.sharded_logging(cap, projs, mesh=mesh, compute_dtype=compute_dtype)
    state = logging.init()
    log_c = logging.step.lower(state, params, batches[0]).compile()
    t_log, _ = timed(
        lambda s, b: logging.step(s, params, b), lambda i: (state, batches[i % 4]), iters
    )

    # end to end: capture + covariance + rows written (bf16 storage) + the final reduction
    path = os.path.join(tmp, "lm_log")
    n_log = c["log_batches"]
    with jaxinf.LogWriter(path, meta, dtype="bfloat16", statistics=False) as w:
        jaxinf.log_sharded(
            logging, params, batches[:1], w, progress=False, ids_fn=lambda b: list(range(-B, 0))
        )  # warm-up (ids < 0)
        t0 = time.perf_counter()
        counter = [0]

        def ids_fn(b):
            i, counter[0] = counter[0], counter[0] + 1
            return list(range(i * B, (i + 1) * B))

        jaxinf.log_sharded(
            logging,
            params,
            (batches[i % 4] for i in range(n_log)),
            w,
            ids_fn=ids_fn,
            progress=False,
        )
        t_e2e = time.perf_counter() - t0
    return {
        "params": n_params(params),
        "layers_logged": len(layers),
        "rank": c["rank"],
        "row_dim": sum(p.p_in.shape[0] * p.p_out.shape[0] for p in projs.values()),
        "devices": n_dev,
        "global_batch": B,
        "seq": c["seq"],
        "compute_dtype": str(jnp.dtype(compute_dtype)) if compute_dtype else "float32",
        "plain_tokens_per_s": tokens / t_plain,
        "logging_tokens_per_s": tokens / t_log,
        "logging_over_plain_time": t_log / t_plain,
        "logging_write_tokens_per_s": n_log * tokens / t_e2e,
        "plain_memory": memory(plain_c),
        "logging_memory": memory(log_c),
        "device_peak_bytes": device_peak(),
    }


# ------------------------------------------------------------------------------------- reweighting


def bench_reweighting(cfg, iters, mesh, compute_dtype, variants=None, progress=None):
    """Plain finetuning vs the reweighting program per method; ``progress(partial)`` after
    each variant gets the rows so far (a time-limited run keeps what finished)."""
    c = cfg["clf"]
    n_dev = mesh.shape["data"]
    B = max(c["batch"] // n_dev, 1) * n_dev  # global batch, split over the mesh
    model = Transformer(
        c["vocab"], c["width"], c["heads"], c["mlp"], c["layers"], c["classes"], False
    )
    key = jax.random.key(0)
    ids = jax.random.randint(key, (B, c["seq"]), 0, c["vocab"])
    params = jax.jit(model.init)(key, ids[:1])["params"]
    k = jax.random.split(key, 3)
    meta = {
        "a": jax.random.normal(k[0], (1, 64)),
        "c": jnp.zeros(64),
        "o": 0.1 * jax.random.normal(k[1], (64, 1)),
    }

    def losses(p, b):
        return xent(model.apply({"params": p}, b[0]), b[1])

    def base_loss(p, deps, b):
        l = losses(p, b)
        m = deps["meta"]
        w = jax.nn.sigmoid(jnp.tanh(jax.lax.stop_gradient(l)[:, None] * m["a"] + m["c"]) @ m["o"])
        return jnp.mean(w[:, 0] * l)

    def meta_loss(m, deps, b):
        return jnp.mean(losses(deps["base"], b))

    def plain_loss(p, deps, b):
        return jnp.mean(losses(p, b))

    mp = (
        (lambda f: jaxmlo.parallel.mixed_precision(f, compute_dtype))
        if compute_dtype
        else (lambda f: f)
    )
    opt = optax.adamw(1e-5)

    def batches(i):
        kk = jax.random.split(jax.random.key(100 + i), 4)
        return {
            "base": (
                jax.random.randint(kk[0], (1, B, c["seq"]), 0, c["vocab"]),
                jax.random.randint(kk[1], (1, B), 0, c["classes"]),
            ),
            "meta": (
                jax.random.randint(kk[2], (1, B, c["seq"]), 0, c["vocab"]),
                jax.random.randint(kk[3], (1, B), 0, c["classes"]),
            ),
        }

    data = [jaxmlo.parallel.shard_batches(batches(i), mesh) for i in range(3)]
    rows = {}
    methods = {
        "plain": None,
        "sama": jaxmlo.sama(),
        "sama_solution": jaxmlo.sama(adaptation="solution"),  # adapts at a new gradient at θ*
        "cg": jaxmlo.cg(maxiter=5, damping=0.1),
        "neumann": jaxmlo.neumann(steps=5, lr=0.01),
        # the primal passes once, residuals held through the solve (faster, more memory)
        "cg_linearize": jaxmlo.cg(maxiter=5, damping=0.1, hvp="linearize"),
        "neumann_linearize": jaxmlo.neumann(steps=5, lr=0.01, hvp="linearize"),
    }
    unknown = sorted(set(variants or ()) - set(methods))
    if unknown:
        raise ValueError(f"unknown reweighting variants {unknown}; choose from {sorted(methods)}")
    # plain is always compiled: every ratio is against it
    chosen = ["plain", *(v for v in (variants or methods) if v != "plain")]
    for name in chosen:
        method = methods[name]
        if method is None:
            prog = jaxmlo.Program([jaxmlo.Problem("base", mp(plain_loss), params, opt)])
            data_v = [{"base": d["base"]} for d in data]
        else:
            prog = jaxmlo.Program(
                [
                    jaxmlo.Problem("base", mp(base_loss), params, opt, method=method),
                    jaxmlo.Problem("meta", mp(meta_loss), meta, optax.adam(1e-3)),
                ],
                u2l={"meta": ["base"]},
                l2u={"base": ["meta"]},
            )
            data_v = data
        state = jaxmlo.parallel.replicate(jaxmlo.init(prog), mesh)
        step = jaxmlo.parallel.parallel_step(prog, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, data_v[0]).compile()
        rows[name] = {
            "compile_s": time.perf_counter() - t0,
            "memory": memory(compiled),
            "passes": jaxmlo.testing.count_matmuls(compiled.as_text()),
            "all_reduce": jaxmlo.testing.count_collectives(compiled.as_text())["all-reduce"],
        }
        if iters:  # iters=0 (--memory-only): compiled memory analysis, no run
            t, _ = timed(compiled, lambda i, state=state: (state, data_v[i % 3]), iters)
            rows[name].update(samples_per_s=B / t, step_s=t)
        del state, compiled
        if name != "plain":
            if iters:
                rows[name]["time_over_plain"] = rows[name]["step_s"] / rows["plain"]["step_s"]
            pm = rows["plain"]["memory"].get("peak_estimate_bytes")
            if pm:
                rows[name]["memory_over_plain"] = rows[name]["memory"]["peak_estimate_bytes"] / pm
        if progress is not None:
            progress({"variants": rows, "partial": True})
    return {
        "params": n_params(params),
        "layers": c["layers"],
        "width": c["width"],
        "devices": n_dev,
        "global_batch": B,
        "seq": c["seq"],
        "compute_dtype": str(jnp.dtype(compute_dtype)) if compute_dtype else "float32",
        "variants": rows,
        "device_peak_bytes": device_peak(),
    }


# ------------------------------------------------------------------------------------- query


def bench_query(cfg, mesh, tmp):
    c = cfg["query"]
    k = c["k"]
    grads_spec = {f"layer_{i:02d}": (k, k) for i in range(c["layers"])}
    projs = {p: jaxinf.Projection(jnp.zeros((k, k)), jnp.zeros((k, k))) for p in grads_spec}
    meta = jaxinf.projection_metadata(projs, init="random", seed=0, model="benchmark-query")
    path = os.path.join(tmp, "query_log")
    dim = c["layers"] * k * k
    wb = 8192

    @jax.jit
    def rows(i):
        g = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (wb, c["layers"], k, k))
        return {p: g[:, j] for j, p in enumerate(grads_spec)}

    jax.block_until_ready(rows(0))  # compiled before the write is timed
    t0 = time.perf_counter()
    with jaxinf.LogWriter(path, meta, chunk_rows=c["chunk_rows"], max_in_flight=8) as w:
        for i in range(c["rows"] // wb):
            w.write_async(rows(i), ids=np.arange(i * wb, (i + 1) * wb))
    t_write = time.perf_counter() - t0
    log = jaxinf.open_log(path)
    n = log.num_rows
    nbytes = n * dim * 4
    log.statistics()  # fitted once (and cached) before the timed queries

    # raw read bandwidth: every chunk, 16 reads in flight
    import collections

    s = log.shards[0]
    t0 = time.perf_counter()
    pending = collections.deque()
    for a in range(0, s.rows, c["chunk_rows"]):
        pending.append(s.grads[a : a + c["chunk_rows"]].read())
        if len(pending) >= 16:
            pending.popleft().result()
    for f in pending:
        f.result()
    t_raw = time.perf_counter() - t0

    test = {p: v[: c["n_test"]] for p, v in rows(10_000).items()}
    jaxinf.query(log, test, meta, top_k=10, progress=False)  # compile
    t0 = time.perf_counter()
    jaxinf.query(log, test, meta, top_k=10, progress=False)
    t_q = time.perf_counter() - t0
    jaxinf.sharded_query(log, test, meta, mesh=mesh, top_k=10, progress=False)  # compile
    t0 = time.perf_counter()
    jaxinf.sharded_query(log, test, meta, mesh=mesh, top_k=10, progress=False)
    t_sq = time.perf_counter() - t0
    pairs = n * c["n_test"]
    return {
        "rows": n,
        "dim": dim,
        "n_test": c["n_test"],
        "log_bytes": nbytes,
        "write_GB_per_s": nbytes / t_write / 1e9,
        "raw_read_GB_per_s": nbytes / t_raw / 1e9,
        "query_pairs_per_s": pairs / t_q,
        "query_GB_per_s": nbytes / t_q / 1e9,
        "query_fraction_of_raw_read": t_raw / t_q,
        "sharded_query_pairs_per_s": pairs / t_sq,
        "sharded_query_GB_per_s": nbytes / t_sq / 1e9,
        "devices": mesh.shape["data"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="small: CPU sizes; large: GPU sizes"
    )
    ap.add_argument(
        "--parts",
        default="logging,reweighting,query",
        help="comma-separated parts to run: logging, reweighting, query",
    )
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 compute (default: on for --size large)",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="reweighting: compiled memory and matmul counts only, no timed runs",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks of the LM and the classifier (default: the size's; fewer "
        "keep the width, sequence and batch but compile faster)",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="reweighting: comma-separated subset of plain, sama, sama_solution, cg, neumann, "
        "cg_linearize, neumann_linearize (default: all; plain is always included)",
    )
    ap.add_argument("--tmp", default=None, help="directory for the logs (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/scale_cpu.json", help="JSON results file")
    args = ap.parse_args()
    cfg = SIZES[args.size]
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {args.layers}")
        cfg = {**cfg, **{m: {**cfg[m], "layers": args.layers} for m in ("lm", "clf")}}
    variants = args.variants.split(",") if args.variants else None
    bf16 = args.bf16 if args.bf16 is not None else args.size == "large"
    dtype = jnp.bfloat16 if bf16 else None
    mesh = jaxmlo.parallel.data_mesh()
    tmp = args.tmp or tempfile.mkdtemp(prefix="jaxmlo_scale_bench_")
    os.makedirs(tmp, exist_ok=True)
    result = {
        "benchmark": "scale",
        "size": args.size,
        "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "loadavg_start": loadavg(),
    }
    try:
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            if part == "logging":
                result[part] = bench_logging(cfg, cfg["iters"], mesh, dtype, tmp)
            elif part == "reweighting":
                iters = 0 if args.memory_only else cfg["iters"]
                result[part] = bench_reweighting(
                    cfg,
                    iters,
                    mesh,
                    dtype,
                    variants,
                    progress=lambda rows, part=part: write_json(args.out, {**result, part: rows}),
                )
            elif part == "query":
                result[part] = bench_query(cfg, mesh, tmp)
            else:
                raise ValueError(f"unknown part {part!r}")
            result[part]["wall_s"] = time.perf_counter() - t0
            print(part, json.dumps(result[part], indent=1), flush=True)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_end"] = loadavg()
    write_json(args.out, result)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
