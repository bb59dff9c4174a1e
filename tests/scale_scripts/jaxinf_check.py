"""Multi-device checks of jaxinf's sharded logging and queries (run by tests/test_scale.py).

Runs in its own process: XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before
jax is imported, which the main pytest process must never do. float32 throughout (the devices'
default): sharded and single-device runs compute the same sums in a different order, so they
agree to float32 rounding. Prints one JSON line of measured errors; exits non-zero on failure.
"""

import json
import os
import tempfile

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), (
    "run me with XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinf  # noqa: E402
import jaxmlo  # noqa: E402
import jaxmlo.testing  # noqa: E402

assert jax.device_count() == 8, jax.devices()
out = {}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(8)(x))
        return nn.Dense(3, name="head")(x)


model = MLP()
key = jax.random.key(0)
n_batches, bsz = 3, 16  # 2 examples per device
xs = jax.random.normal(jax.random.key(1), (n_batches, bsz, 6))
ys = jax.random.randint(jax.random.key(2), (n_batches, bsz), 0, 3)
params = model.init(key, xs[0])["params"]


def loss_fn(p, b):
    logits = model.apply({"params": p}, b["x"])
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][..., None], -1))


batches = [{"x": xs[i], "y": ys[i]} for i in range(n_batches)]
ids = [list(range(i * bsz, (i + 1) * bsz)) for i in range(n_batches)]
cap = jaxinf.linen_capture(loss_fn)
layers = jaxinf.find_layers(cap, params, batches[0])
projs = jaxinf.random_projections(layers, key=jax.random.key(3), k_in=4, k_out=2)
meta = jaxinf.projection_metadata(projs, init="random", seed=3)

# ---- single-device reference
pg = jaxinf.projected_gradients(cap, projs)
ref_grads = [pg(params, b) for b in batches]
cov_acc = jaxinf.projected_covariance()
cs = cov_acc.init(ref_grads[0])
kf_acc = jaxinf.kfac_factors(cap, layers)
ks = kf_acc.init()
for b, g in zip(batches, ref_grads):
    cs = cov_acc.update(cs, g)
    ks = kf_acc.update(ks, (params, b))
ref_cov, ref_kfac = cov_acc.finalize(cs), kf_acc.finalize(ks)

# ---- sharded logging pass
mesh = jaxmlo.parallel.data_mesh()
logging = jaxinf.sharded_logging(cap, projs, mesh=mesh, kfac_layers=layers)
state = logging.init()
errs = []
for b, g in zip(batches, ref_grads):
    state, grads = logging.step(state, params, b)
    assert len(grads["head"].sharding.device_set) == 8, "grads must stay sharded over 8 devices"
    errs += [rel(grads[p], g[p]) for p in g]
out["grads_rel_err"] = max(errs)
stats = logging.finalize(state)
out["count"] = int(stats.count)
out["cov_rel_err"] = max(rel(stats.covariance[p], ref_cov[p]) for p in ref_cov)
out["kfac_rel_err"] = max(
    max(
        rel(stats.kfac[p].forward, ref_kfac[p].forward),
        rel(stats.kfac[p].backward, ref_kfac[p].backward),
    )
    for p in ref_kfac
)
out["kfac_tokens"] = [int(stats.kfac[p].tokens) for p in sorted(stats.kfac)]

# communication: no collective in the per-batch step, one psum (all-reduce) at the end
step_hlo = logging.step.lower(state, params, batches[0]).compile().as_text()
fin_hlo = logging.finalize.lower(state).compile().as_text()
out["step_all_reduce"] = jaxmlo.testing.count_collectives(step_hlo)["all-reduce"]
out["step_collectives"] = sum(jaxmlo.testing.count_collectives(step_hlo).values())
out["finalize_collectives"] = jaxmlo.testing.count_collectives(fin_hlo)

# ---- rows written from each device's shard; store statistics from the pass's local sums
tmp = tempfile.mkdtemp()
path = os.path.join(tmp, "log")
with jaxinf.LogWriter(path, meta, chunk_rows=8, statistics=False) as w:
    stats2 = jaxinf.log_sharded(
        logging,
        params,
        batches,
        w,
        ids_fn=lambda b: ids[[id(x) for x in batches].index(id(b))],
        progress=False,
    )
log = jaxinf.open_log(path)
rows, got_ids = log.read(as_layers=True)
out["log_rows"] = int(log.num_rows)
out["log_ids_in_order"] = bool(np.array_equal(got_ids, np.arange(n_batches * bsz)))
out["log_rows_rel_err"] = max(
    rel(rows[p], np.concatenate([np.asarray(g[p]) for g in ref_grads])) for p in layers
)
fisher = os.path.join(path, "shards", w.writer_id, "fisher", f"r{log.num_rows}")
out["fisher_cache_used"] = os.path.exists(os.path.join(fisher, "fisher.json"))
lst = log.statistics()
out["log_cov_rel_err"] = max(rel(lst[p].covariance, ref_cov[p]) for p in ref_cov)
out["stats2_cov_rel_err"] = max(rel(stats2.covariance[p], ref_cov[p]) for p in ref_cov)

# ---- query: sharded top-k == single-device top-k
test = {p: v[:5] for p, v in pg(params, {"x": xs[0][:5] * 0.5, "y": ys[0][:5]}).items()}
for mode in ("dot", "relatif"):
    r1 = jaxinf.query(log, test, meta, mode=mode, top_k=7, chunk_rows=8, progress=False)
    # chunk_rows=8: 6 chunks over 8 devices, so some devices score only padding
    r2 = jaxinf.sharded_query(
        log, test, meta, mesh=mesh, mode=mode, top_k=7, chunk_rows=8, progress=False
    )
    out[f"query_{mode}_same_top_rows"] = bool(
        np.array_equal(r1.top_rows, r2.top_rows) and np.array_equal(r1.bottom_rows, r2.bottom_rows)
    )
    out[f"query_{mode}_rel_err"] = max(
        rel(r2.top_scores, r1.top_scores), rel(r2.bottom_scores, r1.bottom_scores)
    )
r3 = jaxinf.sharded_query(log, test, meta, mesh=mesh, top_k=7, chunk_rows=2, progress=False)
r1 = jaxinf.query(log, test, meta, top_k=7, chunk_rows=8, progress=False)
out["query_many_rounds_same_top_rows"] = bool(np.array_equal(r1.top_rows, r3.top_rows))

# ---- bfloat16 capture and storage
lbf = jaxinf.sharded_logging(cap, projs, mesh=mesh, compute_dtype=jnp.bfloat16)
sbf = lbf.init()
errs = []
for b, g in zip(batches, ref_grads):
    sbf, gbf = lbf.step(sbf, params, b)
    errs += [rel(gbf[p], g[p]) for p in g]
out["bf16_grads_rel_err"] = max(errs)
pbf = os.path.join(tmp, "log_bf16")
with jaxinf.LogWriter(pbf, meta, dtype="bfloat16", chunk_rows=8) as w:
    jaxinf.log_sharded(
        lbf,
        params,
        batches,
        w,
        ids_fn=lambda b: ids[[id(x) for x in batches].index(id(b))],
        progress=False,
    )
lb = jaxinf.open_log(pbf)
rb, _ = lb.read(as_layers=True)
out["bf16_log_dtype"] = str(rb["head"].dtype)
out["bf16_log_rel_err"] = max(
    rel(rb[p], np.concatenate([np.asarray(g[p]) for g in ref_grads])) for p in layers
)

print(json.dumps(out))
