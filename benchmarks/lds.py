"""Linear datamodeling score (LDS) of LoGra and baselines on small offline tasks.

For each task (digits MLP, digits CNN, byte-level LM on pydoc_data.topics) this script

1. retrains ``M`` models on random half subsets with ``S`` seeds each (``jaxinf.retrain``,
   vmapped) and records the measured output of every test example (margin, or minus the loss);
2. trains one model (or ``--models K``) on the full training set and computes, for every method,
   the ``[n_test, n_train]`` score matrix from each model;
3. reports LDS with a 95% bootstrap interval, bytes stored per training example and wall time.

Run (CPU, about 10 minutes on 2 cores)::

    python benchmarks/lds.py --out benchmarks/results/lds_cpu.json

``--small`` runs a much smaller version (smoke test). ``--models K`` (default 1) trains ``K``
full models from different seeds, scores every method on each and reports LDS as mean ± std over
the models (thesis 4.4.1, appendix C.2), e.g.::

    python benchmarks/lds.py --tasks mlp --models 3 --out benchmarks/results/lds_mlp_models3_cpu.json

``--methods`` (method families, e.g. ``grad_dot,ekfac,logra,trak``) and ``--sizes`` (LoGra ``k``)
restrict what is run.

``metagrad`` (:func:`jaxinf.metagradient_scores`) differentiates the attribution model's own
training run (same initial parameters, optimizer and minibatches, replayed from its key) with
respect to per-example loss weights. Its entry adds the cost in multiples of one training run
(compiled, timed after compilation), the compiled memory of both, and the replay check. Flags:
``--metagrad-segments`` / ``--metagrad-test-block`` (memory trade-offs), ``--metagrad-float64``
(the metagradient computed in float64: a long AdamW run in float32, the byte LM's, gives NaN
scores), ``--same-batches`` (a
second ground truth: retraining on each subset with the *same* minibatches and the dropped
examples' weights set to 0, the counterfactual the metagradient linearises; every method gets
``lds_same_batches``), ``--memory-steps 50,100,200`` (compiled bytes of the metagradient
against the number of steps T, checkpointed and plain) and ``--lrs 0.01,0.05,0.2`` (the digits
MLP retrained and scored at each learning rate), e.g.::

    python benchmarks/lds.py --tasks mlp,lm --methods metagrad,exact_influence,ekfac,logra,trak \\
        --sizes 16 --same-batches --memory-steps 50,200,800 \\
        --out benchmarks/results/lds_metagrad_cpu.json
    python benchmarks/lds.py --tasks "" --lrs 0.01,0.05,0.2 --methods metagrad,exact_influence \\
        --same-batches --out benchmarks/results/lds_metagrad_lr_cpu.json
    python benchmarks/lds.py --tasks lm --methods metagrad --sizes 16 --same-batches \\
        --metagrad-float64 --out benchmarks/results/lds_metagrad_lm_float64_cpu.json

Four more families run only when named (labels drawn from or averaged over the model's
softmax; the byte LM draws one label per token):

- ``fisher``: exact influence, KFAC, EKFAC and LoGra-PCA (PCA basis and projected covariance)
  under each Fisher: empirical, sampled (one label per example or token), sampled8 (eight),
  true (digits only: the LM's true Fisher has 256^T label sequences);
- ``damping_sweep``: exact influence, KFAC, EKFAC and LoGra-PCA at 0.01x to 100x the
  mean-eigenvalue rule (ratio 0.1), empirical Fisher;
- ``trak_ensemble``: TRAK's estimator (margin gradients, ``1 - p`` weights) over
  ``--trak-models`` models (ensembles of 1 and of all) at ridges ``TRAK_DAMPING`` x the mean
  eigenvalue of ``Phi^T Phi``, two ablations (loss gradients; no ``1 - p``), beside the
  random-projection influence of the same size and a LoGra ensemble. On the byte LM the
  margin is the sum of the tokens' margins (:func:`jaxinf.margin_grads`); ``_tokenw``
  entries weight each token by its own ``1 - p_t`` (train rows ``sum_t (1 - p_t) grad f_t``,
  the negated summed loss gradient, ``jaxinf.trak(..., train_weighted_grads=)``: the
  recipe jaxinf documents), the others one weight per sequence, the mean of its ``1 - p_t``;
- ``head``: LoGra random and PCA with and without the read-out (last dense) layer.

::

    python benchmarks/lds.py --tasks mlp --small --models 2 \
        --methods fisher,damping_sweep,trak_ensemble,head --sizes 8 \
        --out benchmarks/results/lds_fisher_mlp_models2_cpu.json
    python benchmarks/lds.py --tasks lm --small --methods fisher,damping_sweep --sizes 4 \
        --out benchmarks/results/lds_fisher_lm_small_cpu.json
    python benchmarks/lds.py --tasks lm --small --models 2 --methods trak_ensemble,head \
        --sizes 4 --out benchmarks/results/lds_trak_lm_models2_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxinf  # noqa: E402
from benchmarks._common import loadavg  # noqa: E402
from jaxinf import examples  # noqa: E402


def _block(x):
    return jax.tree.map(
        lambda v: v.block_until_ready() if hasattr(v, "block_until_ready") else v, x
    )


def batch_loss(task):
    """The task's loss in the one signature of capture and baselines: ``(params, (x, y))``."""
    return lambda p, b: jnp.mean(jax.vmap(lambda x, y: task.example_loss(p, (x, y)))(*b))


def logra_grads(task, params, k, init, *, seed=0, chunk=256):
    """LoGra projected grads of train and test sets with per-layer k (clipped to the layer size)."""
    cap = jaxinf.linen_capture(batch_loss(task))
    batch = (task.x_train, task.y_train)
    layers = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("dense",)))
    layers = {p: s._replace(k_in=min(k, s.n_in), k_out=min(k, s.n_out)) for p, s in layers.items()}
    if init == "random":
        projs = jaxinf.random_projections(layers, key=jax.random.PRNGKey(seed))
    else:
        acc = jaxinf.kfac_factors(cap, layers)
        st = acc.init(None)
        for s in range(0, batch[0].shape[0], chunk):
            st = acc.update(st, (params, (batch[0][s : s + chunk], batch[1][s : s + chunk])))
        projs = jaxinf.pca_projections(acc.finalize(st), layers=layers)
    fn = jaxinf.projected_gradients(cap, projs)

    def run(x, y):
        parts = [
            fn(params, (x[s : s + chunk], y[s : s + chunk])) for s in range(0, x.shape[0], chunk)
        ]
        return {l: jnp.concatenate([p[l] for p in parts]) for l in parts[0]}

    tr, te = run(*batch), run(task.x_test, task.y_test)
    nbytes = sum(int(np.prod(v.shape[1:])) for v in tr.values()) * 4
    return tr, te, nbytes


METHOD_FAMILIES = (
    "grad_dot",
    "grad_cosine",
    "exact_influence",
    "kfac",
    "ekfac",
    "representation_sim",
    "logra",
    "trak",
    "metagrad",
)
# Run only when named in --methods (they retrain models or repeat methods many times).
EXTRA_FAMILIES = ("fisher", "trak_ensemble", "damping_sweep", "head")
DAMPING_MULTIPLIERS = (0.01, 0.1, 1.0, 10.0, 100.0)  # x the mean-eigenvalue rule (ratio 0.1)


def model_seed(seed, k):
    """Seed of attribution model ``k``: model 0 uses ``seed`` itself (today's single-model run)."""
    return seed if k == 0 else seed + 1000 * k


def train_keys(seed, k):
    """Initial-parameter and minibatch keys of attribution model ``k``."""
    ms = model_seed(seed, k)
    return jax.random.PRNGKey(10_000 + ms), jax.random.PRNGKey(20_000 + ms)


class Recipe(NamedTuple):
    """What the metagradient needs beyond the task: the task's own optimizer and test function."""

    optimizer: optax.GradientTransformation
    test_fn: Callable  # (params, test example) -> scalar, the task's output_fn for one example
    test_data: Any
    segments: int | None = None
    test_block: int = 64
    float64: bool = False  # the metagradient (its forward and reverse pass) in float64


def task_recipe(name, task, lr, **kw):
    """The optimizer ``examples`` builds for the task (same hyperparameters) and its output."""
    if name == "lm":
        # eps_root > 0: Adam's sqrt(nu) has an infinite derivative at nu = 0 (embedding rows of
        # bytes never seen), which makes reverse mode NaN; the replay check measures how much
        # 1e-16 changes the run.
        opt = optax.adamw(lr, weight_decay=1e-2, eps_root=1e-16)
        return Recipe(opt, lambda p, s: -task.example_loss(p, (s,)), task.x_test, **kw)
    opt = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=0.9))

    def margin(p, ex):  # the digits tasks' output: correct logit minus logsumexp of the others
        logits, y = task.model.apply({"params": p}, ex[0]), ex[1]
        other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
        return logits[y] - jax.nn.logsumexp(other)

    return Recipe(opt, margin, (task.x_test, task.y_test), **kw)


def replay_batches(task, key):
    """The ``[T, B]`` minibatch indices ``task.train_fn`` draws with all weights 1 from ``key``."""
    n, steps, b = task.x_train.shape[0], task.info["steps"], task.info["batch_size"]

    def draw(key):
        p = jnp.ones(n, jnp.float32)
        p = p / jnp.sum(p)
        return jax.vmap(lambda k: jax.random.choice(k, n, (b,), p=p))(jax.random.split(key, steps))

    return jax.jit(draw)(key)


def _memory(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def _scores_fn(task, recipe, segments):
    def fn(p0, batches):
        train = (task.x_train, task.y_train)
        if recipe.float64:
            p0, train = jax.tree.map(_to_f64, (p0, train))
        return jaxinf.metagradient_scores(
            task.example_loss,
            recipe.optimizer,
            p0,
            train,
            batches,
            recipe.test_fn,
            recipe.test_data,
            segments=segments,
            test_block=recipe.test_block,
        )

    return jax.jit(fn)


def _to_f64(a):
    return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a


def metagrad_scores(task, params, recipe, p0, train_key):
    """Metagradient scores of the run that trained ``params``, with its cost against that run."""
    n = task.x_train.shape[0]
    batches = replay_batches(task, train_key)
    replay = jaxinf.weighted_train(
        task.example_loss, recipe.optimizer, p0, (task.x_train, task.y_train), batches
    )
    replay_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(replay), jax.tree.leaves(params))
    )
    out_diff = float(
        jnp.max(
            jnp.abs(
                jax.vmap(recipe.test_fn, (None, 0))(params, recipe.test_data)
                - task.output_fn(params)
            )
        )
    )
    if out_diff > 1e-4:
        raise RuntimeError(f"metagrad test_fn differs from the task's output_fn by {out_diff}")
    ones = jnp.ones(n, jnp.float32)
    train = jax.jit(task.train_fn).lower(p0, ones, train_key).compile()
    _block(train(p0, ones, train_key))
    t0 = time.perf_counter()
    _block(train(p0, ones, train_key))
    train_s = time.perf_counter() - t0
    with jax.enable_x64(recipe.float64):
        t0 = time.perf_counter()
        compiled = _scores_fn(task, recipe, recipe.segments).lower(p0, batches).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = _block(compiled(p0, batches))
        run_s = time.perf_counter() - t0
    rows_bad = np.flatnonzero(~np.isfinite(np.asarray(s)).all(axis=1)).tolist()
    s = jnp.asarray(s, jnp.float32)
    finite = float(jnp.mean(jnp.isfinite(s)))
    if finite < 1.0:
        # Reported, then ranked as the sign says (LDS uses ranks): NaN as 0, ±inf as ±max.
        print(f"  metagrad: {100 * (1 - finite):.1f}% of the scores are not finite", flush=True)
        s = jnp.nan_to_num(s, nan=0.0)
    extra = {
        "finite_fraction": finite,
        "nonfinite_test_rows": rows_bad,
        "float64": recipe.float64,
        "max_abs_finite_score": float(jnp.max(jnp.where(jnp.isfinite(s), jnp.abs(s), 0.0))),
        "replay_max_abs_param_diff": replay_diff,
        "compile_s": round(compile_s, 3),
        "run_s": round(run_s, 3),
        "train_run_s": round(train_s, 4),
        "cost_x_training": round(run_s / train_s, 1),
        "memory": _memory(compiled),
        "train_memory": _memory(train),
        "segments": recipe.segments,
        "test_block": recipe.test_block,
        "note": "no per-example store; new test functions need a new run",
    }
    return s, compile_s + run_s, extra


def memory_vs_steps(task, recipe, steps_list, p0):
    """Compiled bytes of the metagradient for each number of steps T, checkpointed and plain."""
    b = task.info["batch_size"]
    rows = []
    for t in steps_list:
        batches = jax.ShapeDtypeStruct((t, b), jnp.int32)
        row = {"steps": t}
        for label, seg in (("sqrt_segments", None), ("plain", 1)):
            row[label] = _memory(_scores_fn(task, recipe, seg).lower(p0, batches).compile())
        rows.append(row)
        print(
            f"  memory T={t:5d}: checkpointed {row['sqrt_segments']['temp_bytes'] / 2**20:8.2f} MiB, "
            f"plain {row['plain']['temp_bytes'] / 2**20:8.2f} MiB",
            flush=True,
        )
    return rows


def same_batch_outputs(task, recipe, p0, batches, masks, chunk=16):
    """``[M, n_test]`` outputs of the replayed run with each mask as the example weights."""
    data = (task.x_train, task.y_train)

    @jax.jit
    def outs(ws):
        return jax.vmap(
            lambda w: task.output_fn(
                jaxinf.weighted_train(task.example_loss, recipe.optimizer, p0, data, batches, w)
            )
        )(ws)

    ws = jnp.asarray(masks, jnp.float32)
    return np.concatenate([np.asarray(outs(ws[i : i + chunk])) for i in range(0, len(ws), chunk)])


def method_scores(
    name,
    task,
    params,
    *,
    sizes,
    exact,
    seed,
    methods=METHOD_FAMILIES,
    recipe=None,
    init_params=None,
    train_key=None,
):
    """Yields ``(method, scores [n_test, n_train], seconds, bytes_per_example, extra)`` for one model.

    ``metagrad`` needs ``recipe`` (:func:`task_recipe`), and the ``init_params`` and
    ``train_key`` that trained ``params``.
    """
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    want = set(methods)

    # Full per-example gradients (shared by the full-gradient baselines; their time includes it).
    g_tr = g_te = None
    t_grads = 0.0
    if want & {"grad_dot", "grad_cosine", "exact_influence", "trak"}:
        t0 = time.perf_counter()
        g_tr = jaxinf.flatten_per_example(
            jaxinf.per_example_grads(batch_loss(task), params, (task.x_train, task.y_train))
        )
        g_te = jaxinf.flatten_per_example(
            jaxinf.per_example_grads(batch_loss(task), params, (task.x_test, task.y_test))
        )
        _block(g_tr)
        t_grads = time.perf_counter() - t0
    full_bytes = n_params * 4

    for method, fn in [("grad_dot", jaxinf.grad_dot), ("grad_cosine", jaxinf.grad_cosine)]:
        if method in want:
            t0 = time.perf_counter()
            s = _block(fn(g_te, g_tr))
            yield method, s, t_grads + time.perf_counter() - t0, full_bytes, {}
    if exact and "exact_influence" in want:
        t0 = time.perf_counter()
        s = _block(jaxinf.exact_influence(g_te, g_tr))
        yield "exact_influence", s, t_grads + time.perf_counter() - t0, full_bytes, {}

    if want & {"kfac", "ekfac"}:
        t0 = time.perf_counter()
        dense = jaxinf.Select(types=("dense",))
        acts_tr = jaxinf.dense_activations(
            batch_loss(task), params, (task.x_train, task.y_train), select=dense
        )
        acts_te = jaxinf.dense_activations(
            batch_loss(task), params, (task.x_test, task.y_test), select=dense
        )
        t_acts = time.perf_counter() - t0
        dense_params = sum(a.shape[-1] * d.shape[-1] for a, d in acts_tr.values())
        for method, ek in [("kfac", False), ("ekfac", True)]:
            if method in want:
                t0 = time.perf_counter()
                s = _block(jaxinf.kfac_influence(acts_te, acts_tr, ekfac=ek))
                yield (
                    method,
                    s,
                    t_acts + time.perf_counter() - t0,
                    dense_params * 4,
                    {"note": "dense layers only"},
                )

    if "representation_sim" in want:
        t0 = time.perf_counter()
        f_tr, f_te = task.features_fn(params, task.x_train), task.features_fn(params, task.x_test)
        s = _block(jaxinf.representation_similarity(f_te, f_tr))
        yield "representation_sim", s, time.perf_counter() - t0, f_tr.shape[1] * 4, {}

    for k in sizes:
        nbytes = None
        for init in ("random", "pca"):
            if "logra" in want or (init == "random" and "trak" in want):
                t0 = time.perf_counter()
                tr, te, nbytes = logra_grads(task, params, k, init, seed=seed)
                if "logra" in want:
                    s = _block(jaxinf.influence_scores(tr, te, mode="dot"))
                    yield f"logra_{init}_{k}x{k}", s, time.perf_counter() - t0, nbytes, {"k": k}
        # Random-projection influence ("trak" family, the name of its results) at LoGra's bytes.
        if "trak" in want:
            dim = nbytes // 4
            if dim <= 4 * n_params:
                t0 = time.perf_counter()
                s = _block(
                    jaxinf.projected_influence(
                        g_te, g_tr, dim=dim, key=jax.random.PRNGKey(seed + 7)
                    )
                )
                yield (
                    f"trak_{dim}",
                    s,
                    t_grads + time.perf_counter() - t0,
                    dim * 4,
                    {"matches": f"logra {k}x{k}"},
                )

    if "metagrad" in want and recipe is not None:
        s, seconds, extra = metagrad_scores(task, params, recipe, init_params, train_key)
        yield "metagrad", s, seconds, 0, extra


def _fisher_setup(task):
    """Loss, logits, train/test batches ``(inputs, labels)`` and Fisher variants for a task.

    Digits: ``(x, y)`` with one label per example. The byte LM: ``(bytes[:-1], bytes[1:])``
    with one label per token (logits ``[n, T, 256]``); its true Fisher is not enumerable
    (256^T label sequences), so a sampled Fisher with 8 draws per sequence stands next to it.
    Variants are ``(name, fisher, samples)``.
    """
    if task.info["arch"] == "bytelm":

        def logits(p, b):
            return jax.vmap(lambda x: task.model.apply({"params": p}, x))(b[0])

        def loss(p, b):
            logp = jax.nn.log_softmax(logits(p, b))
            return -jnp.mean(jnp.take_along_axis(logp, b[1][..., None], axis=-1))

        def split(x):
            return (x[:, :-1], x[:, 1:])

        variants = (("empirical", "empirical", 1), ("sampled", "sampled", 1))
        variants += (("sampled8", "sampled", 8),)
        return loss, logits, split(task.x_train), split(task.x_test), variants

    def logits(p, b):
        return jax.vmap(lambda x: task.model.apply({"params": p}, x))(b[0])

    variants = (("empirical", "empirical", 1), ("sampled", "sampled", 1))
    variants += (("sampled8", "sampled", 8), ("true", "true", 1))
    train, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    return batch_loss(task), logits, train, test, variants


def _chunks(fn, params, b, chunk=256):
    n = b[0].shape[0]
    parts = [fn(params, tuple(v[s : s + chunk] for v in b)) for s in range(0, n, chunk)]
    return {l: jnp.concatenate([p[l] for p in parts]) for l in parts[0]}


def _logra_pca(loss, params, train, test, k, fisher_acts, rows, w, *, damping_ratio=0.1, head=True):
    """LoGra-PCA whose basis and projected covariance come from the given Fisher rows."""
    cap = jaxinf.linen_capture(loss)
    spec = jaxinf.find_layers(cap, params, train, select=jaxinf.Select(types=("dense",)))
    if not head:
        spec = dict(list(spec.items())[:-1])
    layers = {p: s._replace(k_in=min(k, s.n_in), k_out=min(k, s.n_out)) for p, s in spec.items()}
    factors = jaxinf.kfac_factors_from_activations({p: fisher_acts[p] for p in layers})
    projs = jaxinf.pca_projections(factors, layers=layers)
    fn = jaxinf.projected_gradients(cap, projs)
    tr, te = _chunks(fn, params, train), _chunks(fn, params, test)
    fr = jaxinf.weight_rows(_chunks(fn, params, rows), w)
    acc = jaxinf.projected_covariance()
    cov = acc.finalize(acc.update(acc.init(fr), fr))
    return jaxinf.influence_scores(tr, te, covariance=cov, damping_ratio=damping_ratio)


def _logra_random(loss, params, train, test, k, *, seed, head=True):
    cap = jaxinf.linen_capture(loss)
    spec = jaxinf.find_layers(cap, params, train, select=jaxinf.Select(types=("dense",)))
    if not head:
        spec = dict(list(spec.items())[:-1])
    layers = {p: s._replace(k_in=min(k, s.n_in), k_out=min(k, s.n_out)) for p, s in spec.items()}
    fn = jaxinf.projected_gradients(
        cap, jaxinf.random_projections(layers, key=jax.random.PRNGKey(seed))
    )
    return jaxinf.influence_scores(_chunks(fn, params, train), _chunks(fn, params, test))


TRAK_DAMPING = (0.0, 1e-3, 1e-2, 0.1, 1.0)  # TRAK's ridge, x the mean eigenvalue of Phi^T Phi


def extra_scores(task, params, *, sizes, seed, methods, trak_models=4):
    """Yields ``(method, scores, seconds, bytes_per_example, extra)`` of the EXTRA_FAMILIES."""
    want = set(methods)
    loss, logits, train, test, variants = _fisher_setup(task)
    dense = jaxinf.Select(types=("dense",))
    k = max(sizes)
    key = jax.random.PRNGKey(seed + 31)
    if "fisher" not in want:
        variants = variants[:1]
    g_tr = jaxinf.flatten_per_example(jaxinf.per_example_grads(loss, params, train))
    g_te = jaxinf.flatten_per_example(jaxinf.per_example_grads(loss, params, test))
    acts_tr = jaxinf.dense_activations(loss, params, train, select=dense)
    acts_te = jaxinf.dense_activations(loss, params, test, select=dense)
    for vname, fisher, samples in variants if want & {"fisher", "damping_sweep"} else ():
        t0 = time.perf_counter()
        opts = dict(fisher=fisher, logits_fn=logits, key=key, labels=1, samples=samples)
        g_f = jaxinf.flatten_per_example(jaxinf.per_example_grads(loss, params, train, **opts))
        rows, w = jaxinf.fisher_batch(
            logits, params, train, fisher=fisher, key=key, labels=1, samples=samples
        )
        acts_f = jaxinf.weight_rows(jaxinf.dense_activations(loss, params, rows, select=dense), w)
        t_f = time.perf_counter() - t0
        info = {"fisher": fisher, "samples": samples}
        ratios = [(0.1, "")]
        if "damping_sweep" in want and fisher == "empirical":
            ratios += [(0.1 * m, f"_damp{m:g}x") for m in DAMPING_MULTIPLIERS if m != 1.0]
        for ratio, tag in ratios:
            x = {**info, "damping_ratio": ratio}
            if "fisher" in want or tag:
                t0 = time.perf_counter()
                s = _block(
                    jaxinf.exact_influence(g_te, g_tr, fisher_grads=g_f, damping_ratio=ratio)
                )
                yield f"exact_influence_{vname}{tag}", s, t_f + time.perf_counter() - t0, 0, x
                for name, ek in (("kfac", False), ("ekfac", True)):
                    t0 = time.perf_counter()
                    eb = jaxinf.kfac_eigenbasis(acts_f, ekfac=ek)
                    s = _block(
                        jaxinf.kfac_influence(acts_te, acts_tr, eigenbasis=eb, damping_ratio=ratio)
                    )
                    yield f"{name}_{vname}{tag}", s, t_f + time.perf_counter() - t0, 0, x
                t0 = time.perf_counter()
                s = _block(
                    _logra_pca(loss, params, train, test, k, acts_f, rows, w, damping_ratio=ratio)
                )
                yield (
                    f"logra_pca_{k}x{k}_{vname}{tag}",
                    s,
                    t_f + time.perf_counter() - t0,
                    0,
                    {**x, "k": k},
                )
    if "head" in want:
        # LoGra with and without the read-out layer (the last dense layer), empirical Fisher.
        ones = jnp.ones((train[0].shape[0],))
        for head in (True, False):
            tag = "with_head" if head else "no_head"
            t0 = time.perf_counter()
            s = _block(_logra_random(loss, params, train, test, k, seed=seed, head=head))
            yield f"logra_random_{k}x{k}_{tag}", s, time.perf_counter() - t0, 0, {"k": k}
            t0 = time.perf_counter()
            s = _block(_logra_pca(loss, params, train, test, k, acts_tr, train, ones, head=head))
            yield f"logra_pca_{k}x{k}_{tag}", s, time.perf_counter() - t0, 0, {"k": k}
    if "trak_ensemble" in want:
        n_tr = train[0].shape[0]
        lm = task.info["arch"] == "bytelm"
        members = []
        for j in range(trak_models):
            p = params
            if j:
                ms = seed + 97 * j
                p = jax.jit(task.train_fn)(
                    task.init_fn(jax.random.PRNGKey(30_000 + ms)),
                    jnp.ones(n_tr, jnp.float32),
                    jax.random.PRNGKey(40_000 + ms),
                )
            members.append(p)
        n_params = g_tr.shape[1]
        both = tuple(jnp.concatenate([a, b]) for a, b in zip(train, test))
        for kk in sizes:
            dim = min(2 * kk * kk, n_params, n_tr)  # a LoGra kxk log per layer, two layers
            t0 = time.perf_counter()
            te, tr, pr, tr_tok = [], [], [], []
            for p in members:  # train and test rows in one compiled call per model
                g, prob = jaxinf.margin_grads(logits, p, both, labels=1)
                tr.append(g[:n_tr])
                te.append(g[n_tr:])
                pr.append(prob[:n_tr])
                if lm:
                    # Per-token weights: sum_t (1 - p_t) grad f_t = -T grad(mean token loss),
                    # margin_grads(..., weighted=True)'s rows (tests/test_trak.py checks it).
                    gl = jaxinf.flatten_per_example(jaxinf.per_example_grads(loss, p, train))
                    tr_tok.append(-train[1].shape[1] * gl)
            te, tr, pr = jnp.stack(te), jnp.stack(tr), jnp.stack(pr)
            t_feat = time.perf_counter() - t0
            for m in sorted({1, trak_models}):
                for ratio in TRAK_DAMPING:
                    t0 = time.perf_counter()
                    s = _block(
                        jaxinf.trak(
                            te[:m], tr[:m], pr[:m], dim=dim, key=jax.random.PRNGKey(seed),
                            damping_ratio=ratio,
                        )
                    )  # fmt: skip
                    x = {"models": m, "dim": dim, "damping_ratio": ratio}
                    if lm:
                        x["weights"] = "sequence: mean over tokens of 1 - p_t"
                    tag = "" if ratio == 0 else f"_damp{ratio:g}"
                    yield (
                        f"trak_real_{dim}_m{m}{tag}",
                        s,
                        t_feat + time.perf_counter() - t0,
                        dim * 4,
                        x,
                    )
                    if lm:
                        t0 = time.perf_counter()
                        s = _block(
                            jaxinf.trak(
                                te[:m], tr[:m], train_weighted_grads=jnp.stack(tr_tok[:m]),
                                dim=dim, key=jax.random.PRNGKey(seed), damping_ratio=ratio,
                            )
                        )  # fmt: skip
                        x = {**x, "weights": "token: 1 - p_t per token"}
                        yield (
                            f"trak_real_{dim}_m{m}_tokenw{tag}",
                            s,
                            t_feat + time.perf_counter() - t0,
                            dim * 4,
                            x,
                        )
            # Ablations of TRAK's ingredients, one model, at the ridge 0.1 x mean eigenvalue:
            # loss gradients instead of margin gradients, and without the (1 - p) weights.
            t0 = time.perf_counter()
            s = _block(
                jaxinf.trak(
                    g_te, g_tr, jnp.zeros(n_tr), dim=dim, key=jax.random.PRNGKey(seed),
                    damping_ratio=0.1,
                )
            )  # fmt: skip
            x = {"models": 1, "dim": dim, "damping_ratio": 0.1, "gradients": "loss"}
            yield f"trak_lossgrad_{dim}_damp0.1", s, time.perf_counter() - t0, dim * 4, x
            t0 = time.perf_counter()
            s = _block(
                jaxinf.trak(
                    te[:1], tr[:1], jnp.zeros_like(pr[:1]), dim=dim,
                    key=jax.random.PRNGKey(seed), damping_ratio=0.1,
                )
            )  # fmt: skip
            x = {"models": 1, "dim": dim, "damping_ratio": 0.1, "weights": "none"}
            yield f"trak_real_{dim}_m1_damp0.1_no1mp", s, time.perf_counter() - t0, dim * 4, x
            t0 = time.perf_counter()
            s = _block(
                jaxinf.projected_influence(g_te, g_tr, dim=dim, key=jax.random.PRNGKey(seed + 7))
            )
            yield f"projected_influence_{dim}", s, time.perf_counter() - t0, dim * 4, {"dim": dim}
            # Ensembling LoGra scores over the same models (averaged).
            t0 = time.perf_counter()
            ens = []
            for p in members:
                tr_l, te_l, _ = logra_grads(task, p, kk, "random", seed=seed)
                ens.append(np.asarray(jaxinf.influence_scores(tr_l, te_l)))
            s = jaxinf.ensemble_scores(ens)
            yield (
                f"logra_random_{kk}x{kk}_m{trak_models}",
                s,
                time.perf_counter() - t0,
                0,
                {"models": trak_models, "k": kk},
            )


def run_task(
    name,
    task,
    *,
    num_subsets,
    num_seeds,
    sizes,
    exact,
    seed=0,
    progress=True,
    models=1,
    methods=METHOD_FAMILIES,
    recipe=None,
    same_batches=False,
    trak_models=4,
):
    """Ground truth from retraining on random subsets, then every method's LDS.

    With ``models=1`` one model is trained on the full training set and each method's entry holds
    ``lds`` and a bootstrap ``ci`` over test examples. With ``models=K > 1``, ``K`` full models are
    trained (model ``k`` from seed :func:`model_seed`), every method scores each of them, and the
    entry holds ``lds`` = mean over models, ``lds_std`` (sample std), ``lds_per_model`` and
    ``ci_per_model`` (:func:`jaxinf.lds_models`); ``time_s`` is the mean per model.

    ``recipe`` (:func:`task_recipe`) enables ``metagrad``. With ``same_batches``, each model's
    own minibatches are also replayed on every subset (:func:`jaxinf.weighted_train` with the
    mask as weights) and every method gets ``lds_same_batches`` against those outputs (mean
    over models).
    """
    n_train = task.x_train.shape[0]
    res = {
        "task": name,
        "n_train": int(n_train),
        "n_test": int(task.x_test.shape[0]),
        "num_subsets": num_subsets,
        "num_seeds": num_seeds,
        "train_steps": task.info["steps"],
        "methods": {},
    }
    if models > 1:
        res["models"] = models
        res["model_seeds"] = [model_seed(seed, k) for k in range(models)]
    masks = jaxinf.random_subsets(n_train, num_subsets, seed=seed)
    t0 = time.perf_counter()
    outputs = jaxinf.retrain(
        task.init_fn,
        task.train_fn,
        task.output_fn,
        masks,
        num_seeds=num_seeds,
        seed=seed + 1,
        chunk_size=max(1, 64 // num_seeds),
        progress=progress,
    )
    res["retrain_s"] = time.perf_counter() - t0
    # Noise ceiling: how well one seed's outputs predict another's (Spearman over subsets).
    if num_seeds >= 2:
        res["seed_to_seed_spearman"] = float(
            np.nanmean(jaxinf.spearman(outputs[:, 0], outputs[:, 1], axis=0))
        )

    collected = {}  # method -> {"scores": [...], "time_s": [...], "nbytes": int, "extra": dict}
    train_s, mean_out = [], []
    for k in range(models):
        init_key, train_key = train_keys(seed, k)
        p0 = task.init_fn(init_key)
        t0 = time.perf_counter()
        params = jax.jit(task.train_fn)(p0, jnp.ones(n_train, jnp.float32), train_key)
        _block(params)
        train_s.append(time.perf_counter() - t0)
        mean_out.append(float(np.mean(np.asarray(task.output_fn(params)))))
        res["n_params"] = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
        same = None
        if same_batches:
            t0 = time.perf_counter()
            same = same_batch_outputs(task, recipe, p0, replay_batches(task, train_key), masks)
            res.setdefault("same_batches_retrain_s", []).append(time.perf_counter() - t0)
        scored = method_scores(
            name,
            task,
            params,
            sizes=sizes,
            exact=exact,
            seed=model_seed(seed, k),
            methods=tuple(m for m in methods if m not in EXTRA_FAMILIES),
            recipe=recipe,
            init_params=p0,
            train_key=train_key,
        )
        if set(methods) & set(EXTRA_FAMILIES):  # additional families, after the base ones
            more = extra_scores(
                task,
                params,
                sizes=sizes,
                seed=model_seed(seed, k),
                methods=methods,
                trak_models=trak_models,
            )
            scored = itertools.chain(scored, more)
        for method, scores, seconds, nbytes, extra in scored:
            r = jaxinf.lds(np.asarray(scores, np.float64), masks, outputs, seed=seed)
            tag = f"model {k} " if models > 1 else ""
            r_same = (
                None if same is None else jaxinf.lds(np.asarray(scores, np.float64), masks, same)
            )
            print(
                f"  {name:5s} {tag}{method:22s} LDS {r.score:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  "
                f"{nbytes:8d} B/ex  {seconds:6.2f} s"
                + ("" if r_same is None else f"  same-batch LDS {r_same.score:+.3f}"),
                flush=True,
            )
            c = collected.setdefault(
                method,
                {"scores": [], "time_s": [], "nbytes": int(nbytes), "extra": extra, "same": []},
            )
            c["scores"].append(np.asarray(scores, np.float64))
            c["time_s"].append(seconds)
            if r_same is not None:
                c["same"].append(r_same.score)

    if models == 1:
        res["train_full_s"] = train_s[0]
        res["full_model_mean_output"] = mean_out[0]
    else:
        res["train_full_s"] = train_s
        res["full_model_mean_output"] = mean_out
    for method, c in collected.items():
        if c["same"]:
            c["extra"] = {
                **c["extra"],
                "lds_same_batches": float(np.mean(c["same"])),
                "lds_same_batches_per_model": c["same"],
            }
        if models == 1:
            r = jaxinf.lds(c["scores"][0], masks, outputs, seed=seed)
            res["methods"][method] = {
                "lds": r.score,
                "ci": [r.ci_low, r.ci_high],
                "bytes_per_example": c["nbytes"],
                "time_s": round(c["time_s"][0], 3),
                **c["extra"],
            }
            continue
        if len(c["scores"]) != models:  # e.g. TRAK skipped for one model only: never expected
            raise RuntimeError(f"{method}: scored {len(c['scores'])} of {models} models")
        r = jaxinf.lds_models(c["scores"], masks, outputs, seed=seed)
        res["methods"][method] = {
            "lds": r.mean,
            "lds_std": r.std,
            "lds_per_model": r.per_model.tolist(),
            "ci_per_model": [[x.ci_low, x.ci_high] for x in r.results],
            "bytes_per_example": c["nbytes"],
            "time_s": round(float(np.mean(c["time_s"])), 3),
            **c["extra"],
        }
        print(
            f"  {name:5s} {method:22s} LDS over {models} models {r.mean:+.3f} ± {r.std:.3f}  "
            f"({', '.join(f'{x:+.3f}' for x in r.per_model)})",
            flush=True,
        )
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="benchmarks/results/lds_cpu.json", help="JSON results file")
    ap.add_argument(
        "--tasks",
        default="mlp,cnn,lm",
        help="comma-separated tasks: mlp, cnn (digits), lm (byte LM on pydoc text)",
    )
    ap.add_argument("--small", action="store_true", help="tiny smoke-test sizes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tasks, subsets and retraining")
    ap.add_argument(
        "--models",
        type=int,
        default=1,
        help="attribution models trained from different seeds; K > 1 reports LDS mean ± std over them",
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHOD_FAMILIES),
        help="comma list of method families: " + ",".join(METHOD_FAMILIES + EXTRA_FAMILIES),
    )
    ap.add_argument("--trak-models", type=int, default=4, help="models in the trak_ensemble family")
    ap.add_argument("--sizes", default=None, help="comma list of LoGra k (default: the task's)")
    ap.add_argument(
        "--metagrad-segments",
        type=int,
        default=None,
        help="checkpointed segments of the metagradient's reverse pass (default ceil(sqrt(T)); 1 = plain)",
    )
    ap.add_argument(
        "--metagrad-test-block", type=int, default=64, help="test functions per backward pass"
    )
    ap.add_argument(
        "--metagrad-float64",
        action="store_true",
        help="compute the metagradient (its pass through training and back) in float64",
    )
    ap.add_argument(
        "--same-batches",
        action="store_true",
        help="also retrain every subset on the model's own minibatches (lds_same_batches)",
    )
    ap.add_argument(
        "--memory-steps",
        default=None,
        help="comma list of T: compiled metagradient bytes against T (first task), checkpointed and plain",
    )
    ap.add_argument(
        "--lrs",
        default=None,
        help="comma list of learning rates: the digits MLP retrained and scored at each",
    )
    args = ap.parse_args(argv)
    if args.models < 1:
        ap.error("--models must be >= 1")
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHOD_FAMILIES + EXTRA_FAMILIES)
    if unknown:
        ap.error(
            f"unknown methods {sorted(unknown)}; choose from "
            + ",".join(METHOD_FAMILIES + EXTRA_FAMILIES)
        )

    small = args.small
    cfg = {
        "mlp": dict(
            make=lambda lr=0.05: examples.digits_task(
                "mlp",
                n_train=200 if small else 1000,
                n_test=50 if small else 100,
                steps=100 if small else 200,
                lr=lr,
            ),
            lr=0.05,
            num_subsets=16 if small else 48,
            num_seeds=2,
            sizes=(4, 8) if small else (4, 8, 16, 32),
            exact=True,
        ),
        "cnn": dict(
            make=lambda lr=0.05: examples.digits_task(
                "cnn",
                n_train=200 if small else 1000,
                n_test=50 if small else 100,
                steps=100 if small else 200,
                lr=lr,
            ),
            lr=0.05,
            num_subsets=16 if small else 32,
            num_seeds=2,
            sizes=(4, 8) if small else (4, 8, 16, 32),
            exact=True,
        ),
        "lm": dict(
            make=lambda lr=3e-3: examples.lm_task(
                n_train=64 if small else 128,
                n_test=16 if small else 32,
                steps=50 if small else 100,
                lr=lr,
            ),
            lr=3e-3,
            num_subsets=8 if small else 24,
            num_seeds=2,
            sizes=(4,) if small else (4, 8, 16),
            exact=True,
        ),
    }
    results = {
        "command": "python benchmarks/lds.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "loadavg_start": loadavg(),
        "tasks": {},
    }

    def recipe(name, task, lr):
        if "metagrad" not in methods and not args.same_batches:
            return None
        return task_recipe(
            name,
            task,
            lr,
            segments=args.metagrad_segments,
            test_block=args.metagrad_test_block,
            float64=args.metagrad_float64,
        )

    def one_task(name, c, task, lr):
        sizes = tuple(int(k) for k in args.sizes.split(",")) if args.sizes else c["sizes"]
        return run_task(
            name,
            task,
            num_subsets=c["num_subsets"],
            num_seeds=c["num_seeds"],
            sizes=sizes,
            exact=c["exact"],
            seed=args.seed,
            models=args.models,
            methods=methods,
            recipe=recipe(name, task, lr),
            same_batches=args.same_batches,
            trak_models=args.trak_models,
        )

    t_all = time.perf_counter()
    for name in [t for t in args.tasks.split(",") if t]:
        c = cfg[name]
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        task = c["make"]()
        r = one_task(name, c, task, c["lr"])
        if args.memory_steps and not results.get("metagrad_memory_vs_steps"):
            rec = task_recipe(name, task, c["lr"], test_block=args.metagrad_test_block)
            results["metagrad_memory_vs_steps"] = {
                "task": name,
                "batch_size": task.info["batch_size"],
                "rows": memory_vs_steps(
                    task,
                    rec,
                    [int(t) for t in args.memory_steps.split(",")],
                    task.init_fn(train_keys(args.seed, 0)[0]),
                ),
            }
        r["total_s"] = time.perf_counter() - t0
        print(
            f"  retrain {r['retrain_s']:.1f} s, "
            f"seed-to-seed Spearman {r.get('seed_to_seed_spearman', float('nan')):.3f}, "
            f"task total {r['total_s']:.1f} s",
            flush=True,
        )
        results["tasks"][name] = r
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for lr in [float(v) for v in args.lrs.split(",")] if args.lrs else []:
        print(f"[mlp lr={lr}]", flush=True)
        t0 = time.perf_counter()
        r = one_task("mlp", cfg["mlp"], cfg["mlp"]["make"](lr), lr)
        r["lr"], r["total_s"] = lr, time.perf_counter() - t0
        results.setdefault("lr_sweep", []).append(r)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    results["total_s"] = time.perf_counter() - t_all
    results["loadavg_end"] = loadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out} ({results['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
