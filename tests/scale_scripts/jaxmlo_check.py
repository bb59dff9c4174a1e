"""Multi-device checks of jaxmlo's data-parallel program step (run by tests/test_scale.py).

XLA_FLAGS=--xla_force_host_platform_device_count=8 is set by the caller before jax is imported.
float32 (the default dtype): the sharded and reference steps add the same terms in another order.

The program is data reweighting (thesis 3.4.1 in miniature): a linear classifier trained on
examples weighted by a meta network of their loss, the meta network trained on a clean batch.

* CG runs in the global mode: its result must equal ``jaxmlo.step`` on one device with the
  whole batch.
* SAMA runs in the local mode (thesis 3.3.3: its passes stay on the device, one all-reduce):
  the meta gradient is the mean of per-shard SAMA meta gradients, so the reference computes
  exactly that on one device, shard by shard, from the engine's own ``total_gradient`` and the
  method's ``post_update``; the base problem follows the global-batch gradient in both.
"""

import json
import os

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxmlo  # noqa: E402
import jaxmlo.testing  # noqa: E402

assert jax.device_count() == 8
N_DEV, B, D, C, H = 8, 16, 5, 3, 4  # 2 examples per device
out = {}


def rel(a, b):
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def xent(w, x, y):
    logits = x @ w["w"] + w["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def base_loss(w, deps, batch):
    x, y = batch
    losses = xent(w, x, y)
    m = deps["meta"]
    h = jnp.tanh(losses[:, None] * m["a"] + m["c"])
    weight = jax.nn.sigmoid(h @ m["o"])[:, 0]
    return jnp.mean(weight * losses)


def meta_loss(m, deps, batch):
    x, y = batch
    return jnp.mean(xent(deps["base"], x, y))


def program(method, base_unroll=2, base_loss_fn=base_loss):
    k = jax.random.split(jax.random.key(0), 4)
    w = {"w": 0.3 * jax.random.normal(k[0], (D, C)), "b": jnp.zeros(C)}
    m = {
        "a": jax.random.normal(k[1], (1, H)),
        "c": jnp.zeros(H),
        "o": 0.5 * jax.random.normal(k[2], (H, 1)),
    }
    return jaxmlo.Program(
        [
            jaxmlo.Problem(
                "base", base_loss_fn, w, optax.adam(0.05), unroll_steps=base_unroll, method=method
            ),
            jaxmlo.Problem("meta", meta_loss, m, optax.adam(0.02)),
        ],
        u2l={"meta": ["base"]},
        l2u={"base": ["meta"]},
    )


def make_batches(i, base_unroll=2):
    k = jax.random.split(jax.random.key(100 + i), 4)
    xb = jax.random.normal(k[0], (base_unroll, B, D))
    yb = jax.random.randint(k[1], (base_unroll, B), 0, C)
    xm = jax.random.normal(k[2], (1, B, D))
    ym = jax.random.randint(k[3], (1, B), 0, C)
    return {"base": (xb, yb), "meta": (xm, ym)}


mesh = jaxmlo.parallel.data_mesh()
STEPS = 2

# ---- CG: sharded == single device on the global batch
prog = program(jaxmlo.cg(maxiter=5, tol=0.0, damping=0.1))
ref_state = jaxmlo.init(prog)
ref_step = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))
par_state = jaxmlo.parallel.replicate(jaxmlo.init(prog), mesh)
# compile once, run the executable, read its HLO (a second .lower().compile() would recompile)
par_step = (
    jaxmlo.parallel.parallel_step(prog, mesh)
    .lower(par_state, jaxmlo.parallel.shard_batches(make_batches(0), mesh))
    .compile()
)
cg_hlo = par_step.as_text()
for i in range(STEPS):
    b = make_batches(i)
    ref_state, ref_m = ref_step(ref_state, b)
    par_state, par_m = par_step(par_state, jaxmlo.parallel.shard_batches(b, mesh))
out["cg_params_rel_err"] = rel(par_state.params, ref_state.params)
out["cg_opt_rel_err"] = rel(
    [x for x in jax.tree.leaves(par_state.opt_states) if x.dtype != jnp.int32],
    [x for x in jax.tree.leaves(ref_state.opt_states) if x.dtype != jnp.int32],
)
out["cg_metrics_rel_err"] = max(rel(par_m[k], ref_m[k]) for k in ref_m)
out["cg_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(par_state))
out["cg_collectives"] = jaxmlo.testing.count_collectives(cg_hlo)

# ---- SAMA: sharded (local passes, one all-reduce) == per-shard reference on one device
method = jaxmlo.sama(alpha=1.0)
prog = program(method)
par_state = jaxmlo.parallel.replicate(jaxmlo.init(prog), mesh)
par_step = (
    jaxmlo.parallel.parallel_step(prog, mesh)
    .lower(par_state, jaxmlo.parallel.shard_batches(make_batches(0), mesh))
    .compile()
)
sama_hlo = par_step.as_text()


def shard(tree, i):
    n = B // N_DEV
    return jax.tree.map(lambda x: x[:, i * n : (i + 1) * n], tree)


@jax.jit
def sama_reference(state, batches):
    """One program step with the data-parallel SAMA semantics, computed on one device."""
    base, meta = prog.problems["base"], prog.problems["meta"]
    p, s, lam, ms = (
        state.params["base"],
        state.opt_states["base"],
        state.params["meta"],
        state.opt_states["meta"],
    )
    # base: global-batch gradients (mean of shard means == mean over the batch)
    un = jaxmlo.unroll(base.loss, base.optimizer, p, s, {"meta": lam}, batches["base"])
    # meta: every shard's SAMA meta gradient and nudge, then their mean
    gs, deltas = [], []
    for i in range(N_DEV):
        bi, mi = shard(batches["base"], i), shard(batches["meta"], i)
        un_i = un._replace(batches=bi)
        mb = jax.tree.map(lambda x: x[0], mi)
        _, g, _, v = jaxmlo.testing.total_gradient(
            prog, "meta", lam, {"base": un.params}, mb, {"base": un_i}, {"base": {"meta": lam}}
        )
        gs.append(g)
        new = method.post_update(
            base.loss,
            base.optimizer,
            un_i,
            {"meta": lam},
            jax.tree.map(lambda x: x[-1], bi),
            v["base"],
        )
        deltas.append(jax.tree.map(jnp.subtract, new, un.params))
    mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
    u, ms = meta.optimizer.update(mean(gs), ms, lam)
    lam = optax.apply_updates(lam, u)
    p = jax.tree.map(jnp.add, un.params, mean(deltas))
    return state._replace(
        params={"base": p, "meta": lam}, opt_states={"base": un.opt_state, "meta": ms}
    )


ref_state = jaxmlo.init(prog)
for i in range(STEPS):
    b = make_batches(i)
    ref_state = sama_reference(ref_state, b)
    par_state, _ = par_step(par_state, jaxmlo.parallel.shard_batches(b, mesh))
out["sama_params_rel_err"] = rel(par_state.params, ref_state.params)

# the engine's run() driver with the data-parallel step (host batches are split inside the jit)
res = jaxmlo.run(
    prog,
    {
        "base": lambda i: jax.tree.map(lambda x: x[i % 2], make_batches(i // 2)["base"]),
        "meta": lambda i: jax.tree.map(lambda x: x[0], make_batches(i)["meta"]),
    },
    STEPS,
    step_fn=jaxmlo.parallel.parallel_step(prog, mesh),
    progress=False,
)
out["run_driver_rel_err"] = rel(res.state.params, par_state.params)
out["sama_meta_rel_err"] = rel(par_state.params["meta"], ref_state.params["meta"])
out["sama_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(par_state))
# the data-parallel SAMA is not SAMA on the global batch (documented): show the gap is real
glob = jaxmlo.init(prog)
glob_step = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))
for i in range(STEPS):
    glob, _ = glob_step(glob, make_batches(i))
out["sama_vs_global_batch_rel_diff"] = rel(par_state.params["meta"], glob.params["meta"])
# local=False: SAMA's passes run on the global batch (SPMD) and equal the one-device step
gstep = jaxmlo.parallel.parallel_step(prog, mesh, local=False)
gstate = jaxmlo.parallel.replicate(jaxmlo.init(prog), mesh)
for i in range(STEPS):
    gstate, _ = gstep(gstate, jaxmlo.parallel.shard_batches(make_batches(i), mesh))
out["sama_global_mode_rel_err"] = rel(gstate.params, glob.params)

out["sama_collectives"] = jaxmlo.testing.count_collectives(sama_hlo)
# the base problem alone (its 2 unrolled steps are one scan: one all-reduce in the loop body)
base_only = jaxmlo.Program(
    [prog.problems["base"]._replace(loss=lambda w, d, b: jnp.mean(xent(w, *b)), method=None)]
)
bo_step = jaxmlo.parallel.parallel_step(base_only, mesh)
bo_state = jaxmlo.parallel.replicate(jaxmlo.init(base_only), mesh)
bo_hlo = (
    bo_step.lower(bo_state, jaxmlo.parallel.shard_batches({"base": make_batches(0)["base"]}, mesh))
    .compile()
    .as_text()
)
out["base_only_collectives"] = jaxmlo.testing.count_collectives(bo_hlo)

# ---- mixed precision: bf16 compute, f32 master params and optimizer state (per problem)
prog_mp = program(method, base_loss_fn=jaxmlo.parallel.mixed_precision(base_loss))
mp_state = jaxmlo.parallel.replicate(jaxmlo.init(prog_mp), mesh)
mp_step = (
    jaxmlo.parallel.parallel_step(prog_mp, mesh)
    .lower(mp_state, jaxmlo.parallel.shard_batches(make_batches(0), mesh))
    .compile()
)
mp_hlo = mp_step.as_text()
for i in range(STEPS):
    mp_state, mp_m = mp_step(mp_state, jaxmlo.parallel.shard_batches(make_batches(i), mesh))
out["mp_param_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(mp_state.params)})
out["mp_opt_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(mp_state.opt_states)})
out["mp_base_rel_err"] = rel(mp_state.params["base"], par_state.params["base"])
out["mp_finite"] = bool(all(np.isfinite(np.asarray(v)).all() for v in mp_m.values()))
out["mp_has_bf16_compute"] = "bf16[" in mp_hlo

print(json.dumps(out))
