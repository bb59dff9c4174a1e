"""Benchmark: LoGra projected-gradient extraction vs a plain forward+backward step.

Measures, for a digits MLP and a small Flax (Linen) transformer LM with random init, in one run:
examples/s and tokens/s of ``jaxinf.projected_gradients`` and of a plain ``jit(grad(loss))``
step on the same model and batch, their ratio, and the compiled memory of both
(``jax.jit(f).lower(...).compile().memory_analysis()``). LogIX is compared only if ``logix``
is importable (it is not a dependency). Writes JSON (``--out``).

    python benchmarks/logra_logging.py --size small --out benchmarks/results/logging_cpu.json
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_here))  # the repo root

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinf  # noqa: E402
from benchmarks._common import loadavg, write_json  # noqa: E402
from jaxinf._src.statistics import TRIANGLE_BLOCK, add_outer  # noqa: E402
from jaxmlo import common  # noqa: E402

SIZES = {
    # name: (mlp_batch, mlp_width, lm_layers, lm_width, lm_heads, lm_seq, lm_batch, vocab, rank)
    "small": dict(
        mlp_batch=128,
        mlp_width=128,
        layers=2,
        width=64,
        heads=4,
        seq=32,
        lm_batch=8,
        vocab=256,
        rank=16,
    ),
    "full": dict(
        mlp_batch=256,
        mlp_width=256,
        layers=4,
        width=256,
        heads=4,
        seq=128,
        lm_batch=8,
        vocab=1024,
        rank=64,
    ),
}


def xent(logits, y, w=None):
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
    return -jnp.sum(lp if w is None else lp * w)


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        attn_mask = nn.combine_masks(
            nn.make_attention_mask(mask > 0, mask > 0), nn.make_causal_mask(mask)
        )
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=attn_mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))


class LM(nn.Module):
    vocab: int
    width: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(self.vocab, self.width)(ids)
        x = x + nn.Embed(ids.shape[1], self.width)(jnp.arange(ids.shape[1]))
        for _ in range(self.layers):
            x = Block(self.width, self.heads)(x, mask)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class ScanBlock(nn.Module):
    """``Block`` as a scan body: ``(carry, mask) -> (carry, None)``."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        return Block(self.width, self.heads, name="block")(x, mask), None


class ScannedLM(nn.Module):
    """The LM with its blocks under ``nn.scan`` over stacked parameters (MaxText-style)."""

    vocab: int
    width: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(self.vocab, self.width)(ids)
        x = x + nn.Embed(ids.shape[1], self.width)(jnp.arange(ids.shape[1]))
        blocks = nn.scan(
            ScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.layers,
        )(self.width, self.heads, name="blocks")
        x, _ = blocks(x, mask)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def scanned_rows(cfg, ranks, repeats, block_rows, cov_repeats):
    """Tokens/s of LoGra logging (with and without the projected covariance) over a plain
    jitted ``value_and_grad`` step, on the scanned LM, one row per rank."""
    lm = ScannedLM(cfg["vocab"], cfg["width"], cfg["heads"], cfg["layers"])
    b, t = cfg["lm_batch"], cfg["seq"]
    rng = np.random.default_rng(0)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    batch = {"ids": jnp.asarray(rng.integers(0, cfg["vocab"], size=(b, t)) * mask)}
    batch["mask"] = jnp.asarray(mask)
    params = lm.init(jax.random.key(1), batch["ids"], batch["mask"])["params"]

    def loss(p, bt):
        logits = lm.apply({"params": p}, bt["ids"], bt["mask"])
        w = bt["mask"][:, 1:] * bt["mask"][:, :-1]
        return xent(logits[:, :-1], bt["ids"][:, 1:], w) / jnp.maximum(jnp.sum(w), 1)

    plain = jax.jit(jax.value_and_grad(loss))
    cap = jaxinf.linen_capture(loss)
    layers = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("dense",)))
    tokens = int(mask.sum())
    rows = []
    for rank in ranks:
        projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=rank, k_out=rank)
        extract = jaxinf.projected_gradients(
            cap, projs, layers=layers, mask_fn=lambda bt: bt["mask"]
        )
        t_plain, t_log = time_pair(
            lambda: jax.block_until_ready(plain(params, batch)),
            lambda: jax.block_until_ready(extract(params, batch)),
            repeats,
        )
        t_plain2, t_cov = time_with_covariance(
            plain, extract, params, batch, projs, block_rows, cov_repeats
        )[:2]
        row = {
            "model": f"scanned_lm_{cfg['layers']}x{cfg['width']}_seq{t}",
            "layers_logged": len(layers),
            "stacked_layers_logged": sum(s.stack is not None for s in layers.values()),
            "rank": rank,
            "batch": b,
            "tokens_per_batch": tokens,
            "plain_step_s": t_plain,
            "logging_step_s": t_log,
            "plain_step_s_cov_run": t_plain2,
            "logging_with_covariance_step_s": t_cov,
            "plain_tokens_per_s": tokens / t_plain,
            "logging_tokens_per_s": tokens / t_log,
            "logging_with_covariance_tokens_per_s": tokens / t_cov,
            "time_ratio_logging_over_plain": t_log / t_plain,
            "time_ratio_logging_with_covariance_over_plain": t_cov / t_plain2,
        }
        row["plain_step_flops"] = compiled_flops(plain.lower(params, batch).compile())
        row["plain_step_matmul_flops"] = matmul_flops(jax.value_and_grad(loss), params, batch)
        row.update(covariance_floor(projs, b, row["plain_step_matmul_flops"]))
        print(json.dumps(row, indent=1))
        rows.append(row)
    return rows


def llama_section(
    config,
    batch_size,
    rank,
    repeats,
    bf16,
    compile_only,
    write_batches,
    tmp,
    full_seqs,
    save,
    overrides=None,
    block_rows=None,
    cov_repeats=0,
):
    """LoGra logging of the Llama-style NNX LM (``nnx.scan`` blocks) vs its plain step.

    Plain = ``jit(value_and_grad(loss))`` of the same model and batch (f32 parameters, compute in
    bf16 when ``bf16``). Logging = ``projected_gradients`` on every ``nnx.Linear`` (rank ``rank``
    per side). With ``compile_only`` nothing runs: both programs are lowered from abstract
    parameters and compiled, and their compiled memory is reported (the CPU-side estimate).
    Sequences are right-padded to random lengths in [seq/2, seq] unless ``full_seqs``.
    ``save(row)`` is called after each phase, so a later failure keeps what was measured.
    ``overrides`` replace config fields (e.g. ``{"width": 512}``); with ``cov_repeats`` the
    logging step with the projected covariance (``block_rows``) is also timed.
    """
    from flax import nnx

    from jaxinf.examples import Llama, llama_config, llama_loss, token_mask

    cfg = llama_config(config, dtype="bfloat16" if bf16 else "float32", **(overrides or {}))
    t = cfg.seq
    rng = np.random.default_rng(0)
    lengths = np.full(batch_size, t) if full_seqs else rng.integers(t // 2, t + 1, size=batch_size)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    batch = {"ids": jnp.asarray(rng.integers(1, cfg.vocab, size=(batch_size, t)) * mask)}
    batch["mask"] = jnp.asarray(mask)
    tokens = int(mask.sum())
    make = lambda: Llama(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(make) if compile_only else make()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = nnx.state(model)

    def loss(p, b):
        return llama_loss(nnx.merge(graphdef, p, rest), b)

    plain = jax.jit(jax.value_and_grad(loss))
    cap = jaxinf.nnx_capture(llama_loss, model)
    layers = jaxinf.find_layers(cap, state, batch, select=jaxinf.Select(types=(nnx.Linear,)))
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=rank, k_out=rank)
    extract = jaxinf.projected_gradients(cap, projs, layers=layers, mask_fn=token_mask)
    row = {
        "model": f"llama_{config}",
        "config": cfg._asdict(),
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "layers_logged": len(layers),
        "rank": rank,
        "logged_dims_per_example": sum(p.p_in.shape[0] * p.p_out.shape[0] for p in projs.values()),
        "batch": batch_size,
        "seq": t,
        "tokens_per_batch": tokens,
        "compute_dtype": cfg.dtype,
    }
    t0 = time.perf_counter()
    c_plain = plain.lower(params, batch).compile()
    row["compile_plain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c_log = extract.jitted.lower(state, batch, projs).compile()
    row["compile_logging_s"] = time.perf_counter() - t0
    row["plain_step_flops"] = compiled_flops(c_plain)  # XLA counts the scan body once
    row["plain_step_matmul_flops"] = matmul_flops(jax.value_and_grad(loss), params, batch)
    row.update(covariance_floor(projs, batch_size, row["plain_step_matmul_flops"]))
    row["memory_plain"] = compiled_memory(c_plain)
    row["memory_logging"] = compiled_memory(c_log)
    if row["memory_plain"] and row["memory_logging"]:
        row["compiled_peak_ratio_logging_over_plain"] = (
            row["memory_logging"]["peak_bytes"] / row["memory_plain"]["peak_bytes"]
        )
    save(row)
    if compile_only:
        return row
    tf, tg = time_samples(
        (
            lambda: jax.block_until_ready(c_plain(params, batch)),
            lambda: jax.block_until_ready(c_log(state, batch, projs)),
        ),
        repeats,
    )
    t_plain, t_log = float(np.median(tf)), float(np.median(tg))
    row.update(
        plain_step_s=t_plain,
        logging_step_s=t_log,
        plain_tokens_per_s=tokens / t_plain,
        logging_tokens_per_s=tokens / t_log,
        time_ratio_logging_over_plain=t_log / t_plain,
        plain_step_min_s=float(tf.min()),
        logging_step_min_s=float(tg.min()),
        time_ratio_logging_over_plain_min=float(tg.min() / tf.min()),
        device_peak_bytes_after_both=device_peak(),
    )
    save(row)
    if cov_repeats:
        t_plain2, t_cov, t_full, m_plain2, m_cov, m_full = time_with_covariance(
            plain, extract, state, batch, projs, block_rows, cov_repeats, full_product=True
        )
        row.update(
            covariance_block_rows=block_rows,
            plain_step_s_cov_run=t_plain2,
            logging_with_covariance_step_s=t_cov,
            logging_with_covariance_tokens_per_s=tokens / t_cov,
            time_ratio_logging_with_covariance_over_plain=t_cov / t_plain2,
            plain_step_min_s_cov_run=m_plain2,
            logging_with_covariance_step_min_s=m_cov,
            time_ratio_logging_with_covariance_over_plain_min=m_cov / m_plain2,
            logging_with_full_product_covariance_step_s=t_full,
            time_ratio_logging_with_full_product_covariance_over_plain=t_full / t_plain2,
            time_ratio_logging_with_full_product_covariance_over_plain_min=m_full / m_plain2,
        )
        save(row)
    if write_batches:
        # End to end: capture + rows written to a tensorstore log (async, Fisher sums on).
        import shutil

        path = os.path.join(tmp, f"llama_{config}_log")
        shutil.rmtree(path, ignore_errors=True)
        meta = jaxinf.projection_metadata(projs, init="random", seed=0)
        with jaxinf.LogWriter(path, meta) as w:
            w.write_async(c_log(state, batch, projs), ids=range(batch_size))
            w.flush()  # the log's arrays exist and the Fisher update is compiled
            t0 = time.perf_counter()
            for i in range(1, write_batches + 1):
                ids = range(i * batch_size, (i + 1) * batch_size)
                w.write_async(c_log(state, batch, projs), ids=ids)
        dt = time.perf_counter() - t0  # includes close(): every row committed
        row["logging_and_write_tokens_per_s"] = tokens * write_batches / dt
        row["logging_and_write_batches"] = write_batches
        shutil.rmtree(path, ignore_errors=True)
    return row


def time_with_covariance(
    plain, extract, params, batch, projs, block_rows, repeats, full_product=False
):
    """Seconds per call of ``plain`` and of logging + the projected covariance update (and,
    with ``full_product``, + the covariance as the full product, ``triangle_block=None``): the
    mean over samples of each, then the fastest sample of each.

    The covariance step is one jitted call (extraction and ``projected_covariance`` update)
    with the state donated. With ``block_rows`` the sums take a block product every
    ``block_rows / batch`` calls, so each timed sample is that many consecutive calls (of both
    functions alike), and the per-call mean over samples is reported, not a median of calls.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    period = max(1, (block_rows or n) // n)

    def logged(cov):
        step = jax.jit(
            lambda p, bt, s: cov.update(s, extract.jitted(p, bt, projs)), donate_argnums=2
        )
        box = [cov.init(extract(params, batch))]

        def calls():
            for _ in range(period):
                box[0] = step(params, batch, box[0])
            jax.block_until_ready(box[0])

        return calls

    def plain_calls():
        for _ in range(period):
            out = plain(params, batch)
        jax.block_until_ready(out)

    fns = [plain_calls, logged(jaxinf.projected_covariance(block_rows))]
    if full_product:
        fns.append(logged(jaxinf.projected_covariance(block_rows, triangle_block=None)))
    times = time_samples(fns, repeats)
    return tuple(float(t.mean()) / period for t in times) + tuple(
        float(t.min()) / period for t in times
    )


def compiled_flops(compiled):
    """XLA's FLOP count of a compiled program (``cost_analysis``), or None."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])
    except Exception:  # not every backend reports costs
        return None


def upper_outer_flops(d, rows, block=TRIANGLE_BLOCK):
    """Multiply-add FLOPs of ``add_outer(..., upper=True)``: ``2 rows B (D - a)`` per row block."""
    if d <= block:
        return 2 * rows * d * d
    return sum(2 * rows * (min(d, a + block) - a) * (d - a) for a in range(0, d, block))


def matmul_flops(fn, *args):
    """FLOPs of the matrix products (``dot_general``) of ``fn(*args)``, counted from its jaxpr.

    XLA's ``cost_analysis`` counts the body of a loop once, so for a model whose blocks run
    under ``scan`` it reports about one block's work; here a ``scan`` body counts ``length``
    times and a ``cond`` counts its costliest branch. ``args`` may be abstract
    (``jax.ShapeDtypeStruct``).
    """

    def of_jaxpr(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                # 2 x (every lhs element) x (the rhs dims neither contracted nor batched)
                (_, rc), (_, rb) = eqn.params["dimension_numbers"]
                lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                free = [n for i, n in enumerate(rhs) if i not in rc and i not in rb]
                total += 2 * int(np.prod(lhs)) * int(np.prod(free))
                continue
            subs = [of_jaxpr(j) for j in sub_jaxprs(eqn.params)]
            if name == "cond":
                total += max(subs, default=0)
            else:
                total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
        return total

    def sub_jaxprs(params):
        for v in params.values():
            for j in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    yield j.jaxpr
                elif isinstance(j, jax.extend.core.Jaxpr):
                    yield j

    return of_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)


def covariance_floor(projs, batch, plain_flops=None):
    """FLOPs of the covariance update per batch, per layer ``D = k_out k_in``: the upper
    triangle of blocks that ``projected_covariance`` computes, and the full ``2 b D^2``;
    over ``plain_flops`` (the plain step's matrix-product FLOPs) when given."""
    dims = [p.p_in.shape[0] * p.p_out.shape[0] for p in projs.values()]
    row = {
        "covariance_dims": sum(dims),
        "covariance_flops_per_batch": int(sum(upper_outer_flops(d, batch) for d in dims)),
        "covariance_flops_per_batch_full_product": int(sum(2 * batch * d * d for d in dims)),
        "covariance_state_bytes_f32": int(sum(4 * d * d for d in dims)),
    }
    if plain_flops:
        row["covariance_flops_over_plain_step_flops"] = (
            row["covariance_flops_per_batch"] / plain_flops
        )
    return row


def run_info() -> dict:
    """The command line and the machine, recorded with every result of this script."""
    return {
        "command": "python benchmarks/logra_logging.py " + " ".join(sys.argv[1:]),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(),
    }


def compiled_memory(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "peak_bytes": int(
            m.temp_size_in_bytes
            + m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
        ),
    }


def device_peak():
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # CPU devices have no memory stats
        return None


def time_samples(fns, repeats):
    """Seconds of ``repeats`` calls of each function after a warm-up, one array per function;
    calls interleaved so that load changes hit all alike."""
    for fn in fns:  # compile / warm up
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [np.asarray(ts) for ts in times]


def time_pair(f, g, repeats, stat=np.median):
    """Median (or ``stat``) seconds of f() and of g() (see ``time_samples``)."""
    tf, tg = time_samples((f, g), repeats)
    return float(stat(tf)), float(stat(tg))


def triangle_rows(dims, row_counts, blocks, repeats):
    """The covariance update alone: ``add_outer`` as the full product and as its upper
    triangle of ``block``-sized blocks, per ``[D, D]`` float32 sum and ``R`` rows added.

    Compiled FLOPs from XLA's cost analysis; seconds per update with the sum donated, min and
    median of ``repeats`` calls of every variant interleaved (so load changes hit all alike).
    """
    out = []
    for d in dims:
        for r in row_counts:
            g = jnp.asarray(np.random.default_rng(0).normal(size=(r, d)), jnp.float32)
            variants = {"full": lambda a, x: add_outer(a, x)}
            for b in blocks:
                if b < d:
                    variants[f"upper_{b}"] = lambda a, x, b=b: add_outer(a, x, upper=True, block=b)
            acc = jax.ShapeDtypeStruct((d, d), jnp.float32)
            fns, flops, sums = {}, {}, {}
            for name, f in variants.items():
                fns[name] = jax.jit(f, donate_argnums=0)
                flops[name] = compiled_flops(fns[name].lower(acc, g).compile())
                sums[name] = jax.block_until_ready(fns[name](jnp.zeros((d, d), jnp.float32), g))
            times = {name: [] for name in fns}
            for _ in range(repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    sums[name] = jax.block_until_ready(f(sums[name], g))
                    times[name].append(time.perf_counter() - t0)
            base = float(np.median(times["full"]))
            for name in fns:
                row = {
                    "dim": d,
                    "rows": r,
                    "variant": name,
                    "compiled_flops": flops[name],
                    "flops_ratio_to_full": flops[name] / flops["full"] if flops["full"] else None,
                    "min_s": float(np.min(times[name])),
                    "median_s": float(np.median(times[name])),
                    "median_ratio_to_full": float(np.median(times[name])) / base,
                    "min_ratio_to_full": float(np.min(times[name])) / float(np.min(times["full"])),
                }
                print(json.dumps(row))
                out.append(row)
    return out


def memory(jitted, *args):
    return compiled_memory(jitted.lower(*args).compile())


def compare(
    name, loss_fn, params, batch, n_examples, n_tokens, select, rank, repeats, mask_fn=None
):
    """Time and size a plain grad step and LoGra extraction on the same model and batch."""
    plain = jax.jit(jax.grad(loss_fn))
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch, select=select)
    # Rank per layer, clipped for small layers (a projection larger than its layer is an error).
    layers = {
        p: s._replace(k_in=min(rank, s.n_in), k_out=min(rank, s.n_out)) for p, s in layers.items()
    }
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=rank, k_out=rank)
    extract = jaxinf.projected_gradients(cap, projs, mask_fn=mask_fn)
    t_plain, t_log = time_pair(
        lambda: jax.block_until_ready(plain(params, batch)),
        lambda: jax.block_until_ready(extract(params, batch)),
        repeats,
    )
    mem_plain = memory(plain, params, batch)
    mem_log = memory(extract.jitted, params, batch, projs)
    row = {
        "model": name,
        "layers_logged": len(layers),
        "rank": rank,
        "logged_dims_per_example": sum(p.p_in.shape[0] * p.p_out.shape[0] for p in projs.values()),
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "batch": n_examples,
        "tokens_per_batch": n_tokens,
        "plain_step_s": t_plain,
        "logging_step_s": t_log,
        "plain_examples_per_s": n_examples / t_plain,
        "logging_examples_per_s": n_examples / t_log,
        "plain_tokens_per_s": n_tokens / t_plain,
        "logging_tokens_per_s": n_tokens / t_log,
        "time_ratio_logging_over_plain": t_log / t_plain,
        "memory_plain": mem_plain,
        "memory_logging": mem_log,
        "peak_memory_ratio": (mem_log["peak_bytes"] / mem_plain["peak_bytes"])
        if mem_plain and mem_log
        else None,
    }
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("memory")}, indent=1))
    return row


def run_logix(cfg, rank, repeats, mlp_batch, lm_batch):
    """LogIX 0.1.1 LoGra logging (random init, in-memory log, no save) vs a plain torch step.

    Torch twins of the two models (same shapes; attention written with nn.Linear q/k/v/o so that
    LogIX sees the same 13 linear layers in the LM); times are medians like the JAX side.
    """
    import tempfile

    import logix
    import torch
    from logix.config import LoRAConfig

    torch.manual_seed(0)
    # One intra-op thread: on a small shared CPU, torch's thread pool otherwise fights XLA's.
    torch.set_num_threads(1)

    class TMLP(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.l0, self.l1, self.l2 = (
                torch.nn.Linear(64, width),
                torch.nn.Linear(width, width),
                torch.nn.Linear(width, 10),
            )

        def forward(self, x):
            return self.l2(torch.relu(self.l1(torch.relu(self.l0(x)))))

    class TBlock(torch.nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

        def forward(self, x, mask):
            b, t, d = x.shape
            h = self.ln1(x)
            q, k, v = (
                f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
            )
            allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask[:, None, None, :].bool()
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class TLM(torch.nn.Module):
        def __init__(self, vocab, d, heads, layers, seq):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(seq, d)
            self.blocks = torch.nn.ModuleList([TBlock(d, heads) for _ in range(layers)])
            self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab)

        def forward(self, ids, mask):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]
            for blk in self.blocks:
                x = blk(x, mask)
            return self.head(self.ln(x))

    def one(name, make_model, inputs, loss_of, n_examples, n_tokens, mask):
        plain_model, model = make_model(), make_model()

        def plain():
            plain_model.zero_grad(set_to_none=True)
            loss_of(plain_model(*inputs)).backward()

        with tempfile.TemporaryDirectory() as tmp:
            conf = os.path.join(tmp, "config.yaml")
            with open(conf, "w") as f:
                f.write(f"root_dir: {tmp}\n")
            run = logix.LogIX(name, config=conf)
            run.watch(model)
            run.add_lora(lora_config=LoRAConfig(init="random", rank=rank))
            run.setup({"grad": ["log"]})
            run.eval()
            ids = list(range(n_examples))

            def logged():
                with run(data_id=ids, mask=mask):
                    model.zero_grad(set_to_none=True)
                    loss_of(model(*inputs)).backward()
                return run.get_log()[1]

            t_plain, t_log = time_pair(plain, logged, repeats)
            n_layers = len(logged())
        return {
            "model": name,
            "layers_logged": n_layers,
            "rank": rank,
            "batch": n_examples,
            "tokens_per_batch": n_tokens,
            "plain_step_s": t_plain,
            "logging_step_s": t_log,
            "plain_examples_per_s": n_examples / t_plain,
            "logging_examples_per_s": n_examples / t_log,
            "plain_tokens_per_s": n_tokens / t_plain,
            "logging_tokens_per_s": n_tokens / t_log,
            "time_ratio_logging_over_plain": t_log / t_plain,
        }

    x = torch.tensor(np.asarray(mlp_batch["x"]))
    y = torch.tensor(np.asarray(mlp_batch["y"])).long()
    n = x.shape[0]
    rows = [
        one(
            "digits_mlp",
            lambda: TMLP(cfg["mlp_width"]),
            (x,),
            lambda out: torch.nn.functional.cross_entropy(out, y, reduction="sum"),
            n,
            n,
            None,
        )
    ]
    ids = torch.tensor(np.asarray(lm_batch["ids"])).long()
    mask = torch.tensor(np.asarray(lm_batch["mask"]))
    w = (mask[:, 1:] * mask[:, :-1]).float()

    def lm_loss(logits):
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return -(lp * w).sum()

    rows.append(
        one(
            f"transformer_lm_{cfg['layers']}x{cfg['width']}_seq{cfg['seq']}",
            lambda: TLM(cfg["vocab"], cfg["width"], cfg["heads"], cfg["layers"], cfg["seq"]),
            (ids, mask),
            lm_loss,
            ids.shape[0],
            int(mask.sum()),
            mask,
        )
    )
    for r in rows:
        print("logix", json.dumps(r))
    return {
        "version": logix.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "notes": "LogIX LoGra (add_lora, random init) with setup({'grad': ['log']}), log kept "
        "in memory (no save); per-example loss summed; plain = torch fwd+bwd",
        "results": rows,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="model and batch sizes (small: CPU minutes; full: larger models)",
    )
    ap.add_argument(
        "--repeats", type=int, default=20, help="timed calls per measurement (median kept)"
    )
    ap.add_argument("--rank", type=int, default=None, help="k_in = k_out per layer")
    ap.add_argument(
        "--out",
        default=os.path.join(_here, "results", "logging_cpu.json"),
        help="JSON results file",
    )
    ap.add_argument(
        "--scanned",
        action="store_true",
        help="only the nn.scan'ed LM at k = 16 and 64 (with and without the covariance)",
    )
    ap.add_argument(
        "--model",
        choices=("default", "llama"),
        default="default",
        help="llama: only the Llama-style NNX LM (nnx.scan blocks) of --config",
    )
    ap.add_argument("--config", default="small", help="Llama config name: tiny, small, 134m")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="Llama: replace an integer config field, e.g. --set width=512 --set mlp=1024",
    )
    ap.add_argument(
        "--block-rows",
        type=int,
        default=128,
        help="rows buffered by projected_covariance before each block product (0: none)",
    )
    ap.add_argument(
        "--cov-repeats",
        type=int,
        default=5,
        help="timed samples of the logging step with the covariance (Llama: 0 skips it)",
    )
    ap.add_argument(
        "--triangle",
        action="store_true",
        help="only the covariance update: full product vs upper triangle of blocks",
    )
    ap.add_argument("--batch", type=int, default=8, help="Llama: sequences per batch")
    ap.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="Llama: bf16 compute"
    )
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="Llama: lower and compile from abstract shapes, report compiled memory, run nothing",
    )
    ap.add_argument(
        "--write-batches", type=int, default=0, help="Llama: batches also written to a log"
    )
    ap.add_argument("--tmp", default="/tmp/jaxinf_logging_bench", help="Llama: log directory")
    ap.add_argument(
        "--full-seqs",
        action="store_true",
        help="Llama: every sequence seq tokens long (no padding)",
    )
    args = ap.parse_args()
    cfg = SIZES[args.size]
    if args.triangle:
        result = {
            "benchmark": "logra_covariance_triangle",
            **run_info(),
            "notes": "add_outer on a donated [D, D] float32 sum: the full product vs the upper "
            "triangle of block x block blocks (upper=True); compiled_flops from XLA's cost "
            "analysis; times per update, every variant interleaved, --repeats calls each",
            "results": triangle_rows(
                (256, 1024, 4096), (8, 128), (128, 256, 512, 1024), args.repeats
            ),
        }
        result["loadavg_end"] = loadavg()
        write_json(args.out, result)
        return
    if args.model == "llama":
        result = {
            "benchmark": "logra_logging_llama",
            **run_info(),
            "notes": "Flax NNX Llama-style LM, blocks under nnx.scan; LoGra (random projections) "
            "on every nnx.Linear, one logged layer per slice of the stack, padding masked; "
            "plain = jit(value_and_grad(loss)) on the same batch; median of --repeats calls "
            "after a warm-up, plain and logging interleaved; peak_bytes = temp + arguments + "
            "outputs - aliased from XLA's compiled memory analysis; with_covariance = logging "
            "plus the projected_covariance(block_rows) update in one jitted call with the state "
            "donated, mean per call over --cov-repeats samples of block_rows/batch calls; "
            "*_min: the fastest call (sample) of each, ratios of those minima; "
            "full_product_covariance: the same with projected_covariance(triangle_block=None), "
            "timed interleaved with the others"
            "; covariance_flops_per_batch = the upper triangle of 256-blocks that "
            "projected_covariance computes (_full_product: 2 b D^2), summed over layers; "
            "plain_step_flops = XLA's cost analysis (counts a scan body once), "
            "plain_step_matmul_flops = matrix-product FLOPs from the jaxpr (scan bodies times "
            "their length), the denominator of covariance_flops_over_plain_step_flops",
        }
        os.makedirs(args.tmp, exist_ok=True)

        def save(row):
            result["results"] = [row]
            result["loadavg_end"] = loadavg()
            write_json(args.out, result)

        result["results"] = [
            llama_section(
                args.config,
                args.batch,
                args.rank or 64,
                args.repeats,
                args.bf16,
                args.compile_only,
                args.write_batches,
                args.tmp,
                args.full_seqs,
                save,
                overrides={k: int(v) for k, v in (kv.split("=") for kv in args.set)},
                block_rows=args.block_rows or None,
                cov_repeats=args.cov_repeats,
            )
        ]
        print(json.dumps(result["results"][0], indent=1))
        write_json(args.out, result)
        return
    rank = args.rank or cfg["rank"]
    rows = []
    if args.scanned:
        cfg = dict(cfg, layers=4)
        ranks = [args.rank] if args.rank else [16, 64]
        result = {
            "benchmark": "logra_logging_scanned",
            **run_info(),
            "size": args.size,
            "config": dict(cfg, ranks=ranks),
            "notes": "Linen LM with nn.scan over 4 stacked blocks; LoGra on every Dense and "
            "DenseGeneral (one logged layer per slice of the stack), padding masked; median of "
            "--repeats calls after a warm-up, plain and logging calls interleaved; plain = "
            "jit(value_and_grad(loss)) on the same batch; with_covariance = logging plus the "
            "projected_covariance(block_rows) update in one jitted call with the state donated, "
            "timed as the mean over --cov-repeats samples of block_rows/batch consecutive calls "
            "(plain likewise)"
            "; covariance_flops_per_batch = the upper triangle of 256-blocks that "
            "projected_covariance computes (_full_product: 2 b D^2), summed over layers; "
            "plain_step_flops = XLA's cost analysis (counts a scan body once), "
            "plain_step_matmul_flops = matrix-product FLOPs from the jaxpr (scan bodies times "
            "their length), the denominator of covariance_flops_over_plain_step_flops",
            "results": scanned_rows(
                cfg, ranks, args.repeats, args.block_rows or None, args.cov_repeats
            ),
        }
        result["loadavg_end"] = loadavg()
        write_json(args.out, result)
        return

    # Digits MLP (scikit-learn's 8x8 digits, 64 features).
    X, y = common.load_digits()
    n = cfg["mlp_batch"]
    batch = {"x": jnp.asarray(X[:n]), "y": jnp.asarray(y[:n])}
    mlp = MLP(cfg["mlp_width"])
    params = mlp.init(jax.random.key(0), batch["x"])["params"]

    def mlp_loss(p, b):
        return xent(mlp.apply({"params": p}, b["x"]), b["y"]) / b["y"].shape[0]

    rows.append(compare("digits_mlp", mlp_loss, params, batch, n, n, None, rank, args.repeats))

    # Small transformer LM, random init, right-padded sequences.
    lm = LM(cfg["vocab"], cfg["width"], cfg["heads"], cfg["layers"])
    b, t = cfg["lm_batch"], cfg["seq"]
    rng = np.random.default_rng(0)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = jnp.asarray(rng.integers(0, cfg["vocab"], size=(b, t)) * mask)
    lm_batch = {"ids": ids, "mask": jnp.asarray(mask)}
    lm_params = lm.init(jax.random.key(1), ids, lm_batch["mask"])["params"]

    def lm_loss(p, bt):
        logits = lm.apply({"params": p}, bt["ids"], bt["mask"])
        w = bt["mask"][:, 1:] * bt["mask"][:, :-1]
        return xent(logits[:, :-1], bt["ids"][:, 1:], w) / jnp.maximum(jnp.sum(w), 1)

    rows.append(
        compare(
            f"transformer_lm_{cfg['layers']}x{cfg['width']}_seq{t}",
            lm_loss,
            lm_params,
            lm_batch,
            b,
            int(mask.sum()),
            jaxinf.Select(types=("dense",)),
            rank,
            args.repeats,
            mask_fn=lambda bt: bt["mask"],
        )
    )

    try:
        import logix  # noqa: F401

        logix_result = run_logix(cfg, rank, args.repeats, batch, lm_batch)
    except ImportError as e:
        logix_result = f"skipped: logix (logix-ai) / torch not importable ({e})"

    result = {
        "benchmark": "logra_logging",
        **run_info(),
        "size": args.size,
        "config": dict(cfg, rank=rank),
        "notes": "median of --repeats calls after one warm-up call, plain and logging calls interleaved; "
        "tokens = real (unpadded) tokens "
        "for the LM; LoGra layers: all Dense (MLP) / all Dense+DenseGeneral (LM, no "
        "embeddings); peak_bytes = temp + arguments + outputs - aliased from XLA's "
        "compiled memory analysis",
        "logix": logix_result,
        "results": rows,
    }
    write_json(args.out, result)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
