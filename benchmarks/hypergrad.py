"""Benchmark: one meta step of every hypergradient method against a plain training step.

Problem: data reweighting (the thesis's SAMA setting).  The base model is trained on a noisy
batch with per-example weights ``sigmoid(λ[idx])``; the meta loss is the unweighted loss on a
clean batch.  Two base models: an MLP (>= 100k parameters) and a small pre-LN transformer
block classifier.  The base optimizer is Adam (so SAMA's adaptation is exercised), the meta
optimizer Adam.

Reported per model and method: median wall time of one jitted meta step (``meta_step`` with
``--unroll`` base steps) and XLA's compiled memory analysis, each also as a ratio to one
jitted plain training step of the same model and batch measured in the same run.  Absolute
times on a shared CPU are noise; the ratios are the result.

Also per method: ``jax.grad`` of the meta loss through ``unroll(..., adjoint=method)`` timed
against ``hypergradient(method, ...)`` on a fresh unroll (the same quantity; same cost expected,
except ITD, whose ``hypergradient`` replays the unroll), the ratio in the JSON; and the adjoint
solve's relative residual and iteration count, for the configured methods and for ``cg()`` and
``neumann()`` at their defaults.

Betty (PyTorch, ``betty-ml==0.2.1``) runs the MLP problem side by side (sama / darts / cg against
a plain PyTorch Adam step) where ``betty`` is importable; the JSON says so when it is not.

Usage::

    python benchmarks/hypergrad.py --out benchmarks/results/hypergrad_cpu.json
    python benchmarks/hypergrad.py --small   # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxmlo as J  # noqa: E402
import jaxmlo.testing  # noqa: E402, F401
from benchmarks._common import loadavg, write_json  # noqa: E402


class MLP(nn.Module):
    hidden: int = 256
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


class TransformerBlock(nn.Module):
    """Pre-LN block (attention + MLP) over a sequence, mean-pooled into a classifier."""

    width: int = 64
    heads: int = 4
    mlp: int = 256
    classes: int = 10

    @nn.compact
    def __call__(self, x):  # x: [batch, seq, features]
        h = nn.Dense(self.width)(x)
        a = nn.LayerNorm()(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(a, a)
        m = nn.LayerNorm()(h)
        h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(m)))
        return nn.Dense(self.classes)(nn.LayerNorm()(h).mean(axis=1))


def _n_params(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _memory(compiled):
    m = compiled.memory_analysis()
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
    )
    out = {f: int(getattr(m, f)) for f in fields}
    out["xla_peak_memory_in_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    # XLA:CPU's peak_memory_in_bytes leaves out temporaries; arguments + outputs + temporaries
    # - aliased bytes is the compiled program's footprint on every backend.
    out["peak_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def _time_pair(plain, plain_args, meta, meta_args, repeats):
    """Interleaved timing of the plain step and a meta step, so both see the same machine load.

    Returns ``{"plain": (median, min), "meta": (median, min)}`` in seconds; on a shared CPU the
    min is the less noisy statistic.
    """
    jax.block_until_ready(plain(*plain_args))  # compile + one warm run each
    jax.block_until_ready(meta(*meta_args))
    times = {"plain": [], "meta": []}
    for _ in range(repeats):
        for key, fn, args in (("plain", plain, plain_args), ("meta", meta, meta_args)):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def build(model_name, batch, small):
    rng = np.random.default_rng(0)
    if model_name == "mlp":
        model, shape = MLP(), (batch, 128)
    else:
        model = TransformerBlock(width=32, mlp=64) if small else TransformerBlock()
        shape = (batch, 16 if small else 32, 32)
    n_train = 64 * batch  # λ: one weight per training example
    params = model.init(jax.random.key(0), jnp.zeros(shape))

    def ce(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def base_loss(p, lam, b):
        x, y, idx = b
        return jnp.mean(jax.nn.sigmoid(lam[idx]) * ce(p, x, y))

    def meta_loss(lam, p, b):
        x, y = b
        return jnp.mean(ce(p, x, y))

    def batch_of(i):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, size=batch))
        return x, y, jnp.arange(i * batch, (i + 1) * batch) % n_train

    lam = jnp.zeros(n_train, jnp.float32)
    return model, params, base_loss, meta_loss, batch_of, lam


def _grad_paths(method, base_loss, meta_loss, opt, params, lam, batches, meta_batch):
    """Jitted ``(grad_through_unroll, via_hypergradient)``, both ``(params, opt_state, lam) -> g``."""
    last = jax.tree.map(lambda x: x[-1], batches)

    @jax.jit
    def through_unroll(p, s, lam):
        def total(lam):
            un = J.unroll(base_loss, opt, p, s, lam, batches, adjoint=method)
            return meta_loss(lam, un.params, meta_batch)

        return jax.grad(total)(lam)

    @jax.jit
    def via_hypergradient(p, s, lam):
        un = J.unroll(base_loss, opt, p, s, lam, batches)
        g, info = J.functional.hypergradient(
            method, base_loss, meta_loss, opt, un, lam, last, meta_batch
        )
        return g, info.solve

    return through_unroll, via_hypergradient


# (method, its variant) pairs timed against each other when both are run
PAIRS = (
    ("sama", "sama_solution"),
    ("cg", "cg_linearize"),
    ("neumann", "neumann_linearize"),
)


def run_model(model_name, methods, batch, unroll, repeats, small, defaults):
    model, params, base_loss, meta_loss, batch_of, lam = build(model_name, batch, small)
    # eps_root > 0: ITD differentiates Adam's sqrt(nu), whose derivative is infinite at nu = 0
    # (dead ReLU units, attention key biases: gradient entries exactly 0), which made it NaN.
    opt, meta_opt = optax.adam(1e-3, eps_root=1e-16), optax.adam(1e-2)
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *[batch_of(i) for i in range(unroll)])
    mx, my, _ = batch_of(unroll)
    meta_batch = (mx, my)

    def plain_step(p, s, b):
        g = jax.grad(base_loss)(p, lam, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    first = jax.tree.map(lambda x: x[0], batches)
    plain = jax.jit(plain_step)
    args = (params, opt.init(params), first)
    plain_compiled = plain.lower(*args).compile()
    plain_mem = _memory(plain_compiled)
    # Model passes, counted by marker products: the logits [batch, classes] only a forward
    # computes, the output layer's weight gradient only a backward computes.
    head = params["params"][max(k for k in params["params"] if k.startswith("Dense_"))]["kernel"]
    markers = dict(forward=(batch, 10), backward=head.shape)
    result = {
        "params": _n_params(params),
        "batch": batch,
        "unroll": unroll,
        "plain": plain_mem,
        "plain_passes": J.testing.count_passes(plain_compiled.as_text(), **markers),
        "methods": {},
    }
    state = J.functional.BilevelState(params, opt.init(params), lam, meta_opt.init(lam))

    def meta_step(s, b, mb, method):
        s, info = J.functional.meta_step(method, base_loss, meta_loss, opt, meta_opt, s, b, mb)
        # info.params is s.params again: returning it would count a second copy of the
        # parameters as output memory that a training loop does not keep.
        return s, info._replace(params=None)

    for name, method in methods.items():
        step = jax.jit(functools.partial(meta_step, method=method))
        compiled = step.lower(state, batches, meta_batch).compile()
        mem = _memory(compiled)
        passes = J.testing.count_passes(compiled.as_text(), **markers)
        t = _time_pair(plain, args, step, (state, batches, meta_batch), repeats)
        _, info = step(state, batches, meta_batch)
        (med, mn), (pmed, pmn) = t["meta"], t["plain"]
        through, via = _grad_paths(
            method, base_loss, meta_loss, opt, params, lam, batches, meta_batch
        )
        gargs = (params, opt.init(params), lam)
        tg = _time_pair(via, gargs, through, gargs, repeats)
        g_through = through(*gargs)
        g_via, _ = via(*gargs)
        (vmed, vmn), (gmed, gmn) = tg["plain"], tg["meta"]
        result["methods"][name] = {
            "time_ms": 1e3 * med,
            "min_time_ms": 1e3 * mn,
            "plain_time_ms": 1e3 * pmed,
            "plain_min_time_ms": 1e3 * pmn,
            "time_ratio_to_plain": med / pmed,
            "min_time_ratio_to_plain": mn / pmn,
            "peak_ratio_to_plain": mem["peak_bytes"] / plain_mem["peak_bytes"],
            "passes": passes,
            "finite": bool(info.finite),
            "solve_residual": float(info.solve.residual),
            "solve_iterations": int(info.solve.iterations),
            "solve_converged": bool(info.solve.converged),
            "grad_through_unroll_ms": 1e3 * gmed,
            "grad_through_unroll_min_ms": 1e3 * gmn,
            "hypergradient_ms": 1e3 * vmed,
            "hypergradient_min_ms": 1e3 * vmn,
            "grad_through_unroll_ratio_to_hypergradient": gmed / vmed,
            "grad_through_unroll_min_ratio_to_hypergradient": gmn / vmn,
            "grad_paths_max_abs_difference": float(jnp.max(jnp.abs(g_through - g_via))),
            **mem,
        }
        print(
            f"{model_name:12s} {name:18s} {1e3 * mn:8.2f} ms (plain {1e3 * pmn:6.2f} ms)  "
            f"time x{mn / pmn:5.2f} (median x{med / pmed:5.2f})  "
            f"memory x{mem['peak_bytes'] / plain_mem['peak_bytes']:5.2f}  "
            f"passes {passes['forward']} fwd {passes['backward']} bwd  "
            f"grad-through-unroll / hypergradient x{gmn / vmn:5.2f}  "
            f"residual {float(info.solve.residual):.2e} ({int(info.solve.iterations)} it)",
            flush=True,
        )
    # Variants of one method timed against each other, interleaved: their ratio does not
    # depend on how the plain step happened to run beside each.
    for a, b in PAIRS:
        if a not in methods or b not in methods:
            continue
        steps = [jax.jit(functools.partial(meta_step, method=methods[k])) for k in (a, b)]
        margs = (state, batches, meta_batch)
        t = _time_pair(steps[1], margs, steps[0], margs, repeats)
        result[f"{a}_over_{b}"] = {
            "time_ratio": t["meta"][0] / t["plain"][0],
            "min_time_ratio": t["meta"][1] / t["plain"][1],
        }
        print(
            f"{model_name:12s} {a} / {b}  time x{t['meta'][1] / t['plain'][1]:5.2f} "
            f"(median x{t['meta'][0] / t['plain'][0]:5.2f})",
            flush=True,
        )
    result["solver_defaults"] = {}
    for name, method in defaults.items():
        _, via = _grad_paths(method, base_loss, meta_loss, opt, params, lam, batches, meta_batch)
        _, solve = via(params, opt.init(params), lam)
        result["solver_defaults"][name] = {
            "residual": float(solve.residual),
            "iterations": int(solve.iterations),
            "converged": bool(solve.converged),
        }
        print(
            f"{model_name:12s} {name:18s} residual {float(solve.residual):.2e} after "
            f"{int(solve.iterations)} Hessian-vector products, converged {bool(solve.converged)}",
            flush=True,
        )
    print(
        f"{model_name:12s} {result['params']} params, plain step peak {plain_mem['peak_bytes']} bytes",
        flush=True,
    )
    return result


def betty_side_by_side(batch, iters, warmup=5, cg_iterations=10):
    """Betty 0.2.1 (PyTorch) on the same MLP data-reweighting problem: plain / sama / darts / cg.

    Same architecture, batch, per-example weights, Adam(1e-3) base and Adam(1e-2) meta, one
    unrolled step per meta step.  Time per iteration of ``Engine.run`` (each iteration is one base
    step plus one meta step), from the difference of a ``warmup`` run and a ``warmup + iters``
    run; the plain step is a PyTorch Adam step.  ``torch.set_num_threads(1)``: on the shared
    2-core machine the default thread count made a plain step ~200x slower (spinning threads).
    PyTorch reports no peak memory on CPU, so only time is compared.
    """
    import torch
    import torch.nn.functional as F
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_train = 64 * batch

    def make(i):
        x = torch.tensor(rng.normal(size=(batch, 128)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, 10, size=batch))
        return x, y, torch.arange(i * batch, (i + 1) * batch) % n_train

    train, meta = [make(i) for i in range(4)], [make(4)[:2]]

    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(128, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lam = torch.nn.Parameter(torch.zeros(n_train))

        def forward(self):
            return self.lam

    class Meta(ImplicitProblem):
        def training_step(self, b):
            x, y = b
            return F.cross_entropy(self.base(x), y)

        def configure_train_data_loader(self):
            return meta

        def configure_module(self):
            return Weights()

        def configure_optimizer(self):
            return torch.optim.Adam(self.module.parameters(), lr=1e-2)

    class Base(ImplicitProblem):
        def training_step(self, b):
            x, y, idx = b
            w = torch.sigmoid(self.meta()[idx])
            return (w * F.cross_entropy(self.module(x), y, reduction="none")).mean()

        def configure_train_data_loader(self):
            return train

        def configure_module(self):
            return mlp()

        def configure_optimizer(self):
            return torch.optim.Adam(self.module.parameters(), lr=1e-3)

    model, lam = mlp(), torch.zeros(n_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain(b):
        x, y, idx = b
        loss = (torch.sigmoid(lam[idx]) * F.cross_entropy(model(x), y, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(warmup):
        plain(train[i % 4])
    t = time.perf_counter()
    for i in range(iters):
        plain(train[i % 4])
    plain_s = (time.perf_counter() - t) / iters
    out = {"plain_time_ms": 1e3 * plain_s, "methods": {}}
    for kind in ("sama", "darts", "cg"):
        cfg = {"type": kind, "unroll_steps": 1}
        if kind == "cg":
            cfg.update(cg_iterations=cg_iterations, cg_alpha=1e-3)
        runs = []
        for n in (warmup, warmup + iters):
            m, base = Meta(name="meta", config=Config()), Base(name="base", config=Config(**cfg))
            engine = Engine(
                config=EngineConfig(train_iters=n, valid_step=10**9),
                problems=[m, base],
                dependencies={"u2l": {m: [base]}, "l2u": {base: [m]}},
            )
            t = time.perf_counter()
            engine.run()
            runs.append(time.perf_counter() - t)
        s = (runs[1] - runs[0]) / iters
        out["methods"][kind] = {"time_ms": 1e3 * s, "time_ratio_to_plain": s / plain_s}
        print(
            f"betty mlp    {kind:18s} {1e3 * s:8.2f} ms (plain {1e3 * plain_s:6.2f} ms)  time x{s / plain_s:5.2f}",
            flush=True,
        )
    return out


def betty_result(batch, iters):
    if importlib.util.find_spec("betty") is None:
        return {
            "available": False,
            "reason": "betty is not importable in this environment; install it with "
            "`pip install --ignore-requires-python --no-deps betty-ml==0.2.1` beside a CPU torch "
            "to run the side-by-side comparison",
        }
    import betty

    return {
        "available": True,
        "version": getattr(betty, "__version__", "unknown"),
        "model": "mlp",
        "config": "sama (sama_adam_alpha=1.0), darts (darts_alpha=0.01), cg (cg_iterations=10)",
        **betty_side_by_side(batch, iters),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default="benchmarks/results/hypergrad_cpu.json", help="JSON results file"
    )
    ap.add_argument("--batch", type=int, default=32, help="training examples per step")
    ap.add_argument("--unroll", type=int, default=1, help="base steps per meta step")
    ap.add_argument(
        "--repeats", type=int, default=10, help="timed runs per method (minimum and median kept)"
    )
    ap.add_argument(
        "--models", default="mlp,transformer", help="comma-separated base models: mlp, transformer"
    )
    ap.add_argument("--methods", default=None, help="comma-separated subset, e.g. sama")
    ap.add_argument("--no-betty", action="store_true", help="skip the Betty side-by-side run")
    ap.add_argument(
        "--small", action="store_true", help="tiny transformer, few repeats (smoke run)"
    )
    args = ap.parse_args(argv)
    if args.small:
        args.repeats = min(args.repeats, 3)
    methods = {
        "itd": J.itd(),
        "itd_checkpoint": J.itd(checkpoint=True),
        "cg": J.cg(maxiter=10),
        "neumann": J.neumann(steps=10, lr=1e-3),
        "finite_difference": J.finite_difference(),
        "sama": J.sama(),
        # The adaptation at a new gradient at θ* (one more forward + backward): the previous
        # default, measured beside the new one.
        "sama_solution": J.sama(adaptation="solution"),
        # The primal passes once before the solve, residuals held (faster, more memory).
        "cg_linearize": J.cg(maxiter=10, hvp="linearize"),
        "neumann_linearize": J.neumann(steps=10, lr=1e-3, hvp="linearize"),
    }
    defaults = {"cg()": J.cg(), "neumann()": J.neumann()}
    if args.methods:
        keep = args.methods.split(",")
        methods = {k: v for k, v in methods.items() if k in keep}
        defaults = {k: v for k, v in defaults.items() if k[:-2] in keep}
    out = {
        "benchmark": "hypergrad",
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "setup": "data reweighting: base = mean(sigmoid(lam[idx]) * CE) with Adam(1e-3, eps_root=1e-16); "
        "meta = mean CE on a clean batch with Adam(1e-2); one meta step = meta_step(...) "
        "(unroll + hypergradient + meta update) vs one plain Adam step; grad paths: jax.grad "
        "through unroll(adjoint=method) vs unroll + hypergradient(method), both jitted",
        "methods_config": {k: v.name for k, v in methods.items()}
        | {
            "cg": "cg(maxiter=10)",
            "neumann": "neumann(steps=10, lr=1e-3)",
            "sama": "sama(alpha=1.0, nudge=True)",
            "sama_solution": 'sama(alpha=1.0, nudge=True, adaptation="solution")',
            "cg_linearize": 'cg(maxiter=10, hvp="linearize")',
            "neumann_linearize": 'neumann(steps=10, lr=1e-3, hvp="linearize")',
        },
        "loadavg_start": loadavg(),
        "models": {},
    }
    for model_name in args.models.split(","):
        out["models"][model_name] = run_model(
            model_name, methods, args.batch, args.unroll, args.repeats, args.small, defaults
        )
    out["betty"] = (
        betty_result(args.batch, args.repeats)
        if not args.no_betty
        else {"available": None, "reason": "--no-betty"}
    )
    out["loadavg_end"] = loadavg()
    write_json(args.out, out, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
