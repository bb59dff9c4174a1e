"""Two processes x 4 CPU devices (jax.distributed over gloo): the sharded paths across processes.

Run by tests/test_scale.py as ``python multiprocess_check.py <process_id> <port> <tmpdir>`` for
process ids 0 and 1 at once. Each process logs its half of every batch into its own shard of one
log (statistics: one psum across both processes), both score the log with ``sharded_query``
(each reads only its own devices' chunks), and both run the jaxmlo CG step data-parallel. Each
compares against a single-device computation of its own; process 0 prints the JSON line.
"""

import json
import os
import sys

pid, port, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jaxinf  # noqa: E402
import jaxmlo  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4 and jax.process_count() == 2
out = {}


def rel(a, b):
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


mesh = jaxmlo.parallel.data_mesh()
B = 16  # global batch: 8 rows per process, 2 per device
half = slice(pid * B // 2, (pid + 1) * B // 2)


# ---- jaxinf: logging over both processes into one log, then a cross-process query
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.tanh(nn.Dense(8)(x)))


model = MLP()
xs = jax.random.normal(jax.random.key(1), (2, B, 6))
ys = jax.random.randint(jax.random.key(2), (2, B), 0, 3)
params = model.init(jax.random.key(0), xs[0])["params"]


def loss_fn(p, b):
    logits = model.apply({"params": p}, b["x"])
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][..., None], -1))


cap = jaxinf.linen_capture(loss_fn)
layers = jaxinf.find_layers(cap, params, {"x": xs[0], "y": ys[0]})
projs = jaxinf.random_projections(layers, key=jax.random.key(3), k_in=4, k_out=2)
meta = jaxinf.projection_metadata(projs, init="random", seed=3)
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
batches = [
    jax.make_array_from_process_local_data(
        sharding, {"x": np.asarray(xs[i][half]), "y": np.asarray(ys[i][half])}
    )
    for i in range(2)
]
ids = [list(range(i * B, (i + 1) * B)) for i in range(2)]
logging = jaxinf.sharded_logging(cap, projs, mesh=mesh)
path = os.path.join(tmp, "log")
counter = [0]


def ids_fn(b):
    i, counter[0] = counter[0], counter[0] + 1
    return ids[i]


with jaxinf.LogWriter(path, meta, writer_id=f"p{pid}", chunk_rows=4, statistics=False) as w:
    stats = jaxinf.log_sharded(logging, params, batches, w, ids_fn=ids_fn, progress=False)
    out["rows_written_here"] = w.committed_rows

# single-device reference of everything, on a local device
pg = jaxinf.projected_gradients(cap, projs)
ref = [pg(params, {"x": xs[i], "y": ys[i]}) for i in range(2)]
acc = jaxinf.projected_covariance()
cs = acc.init(ref[0])
for g in ref:
    cs = acc.update(cs, g)
ref_cov = acc.finalize(cs)
out["cov_rel_err"] = max(rel(stats.covariance[p], ref_cov[p]) for p in ref_cov)
out["count"] = int(stats.count)

multihost_utils.sync_global_devices("logged")
if pid == 0:
    jaxinf.open_log(path).statistics()  # fitted once, cached for the other process
multihost_utils.sync_global_devices("statistics")
log = jaxinf.open_log(path)
out["log_rows"] = log.num_rows
out["shards"] = [s.name for s in log.shards]
out["log_cov_rel_err"] = max(rel(log.statistics()[p].covariance, ref_cov[p]) for p in ref_cov)
test = {p: v[:3] for p, v in ref[1].items()}
r1 = jaxinf.query(log, test, meta, top_k=5, chunk_rows=4, progress=False)
r2 = jaxinf.sharded_query(log, test, meta, mesh=mesh, top_k=5, chunk_rows=4, progress=False)
out["query_same_top_rows"] = bool(
    np.array_equal(r1.top_rows, r2.top_rows) and np.array_equal(r1.bottom_rows, r2.bottom_rows)
)
out["query_rel_err"] = rel(r2.top_scores, r1.top_scores)

# ---- jaxmlo: the CG program step across both processes == one device on the global batch
D, C = 5, 3


def xent(w, x, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(x @ w["w"] + w["b"]), y[:, None], 1)[:, 0]


def base_loss(w, deps, b):
    return jnp.mean(jax.nn.sigmoid(deps["meta"]["s"] * xent(w, *b)) * xent(w, *b))


def meta_loss(m, deps, b):
    return jnp.mean(xent(deps["base"], *b))


prog = jaxmlo.Program(
    [
        jaxmlo.Problem(
            "base",
            base_loss,
            {"w": 0.3 * jax.random.normal(jax.random.key(5), (D, C)), "b": jnp.zeros(C)},
            optax.adam(0.05),
            method=jaxmlo.cg(maxiter=5, tol=0.0, damping=0.1),
        ),
        jaxmlo.Problem("meta", meta_loss, {"s": jnp.ones(())}, optax.adam(0.02)),
    ],
    u2l={"meta": ["base"]},
    l2u={"base": ["meta"]},
)
k = jax.random.split(jax.random.key(7), 4)
glob = {
    "base": (jax.random.normal(k[0], (1, B, D)), jax.random.randint(k[1], (1, B), 0, C)),
    "meta": (jax.random.normal(k[2], (1, B, D)), jax.random.randint(k[3], (1, B), 0, C)),
}
local = jax.tree.map(lambda x: np.asarray(x)[:, half], glob)
step = jaxmlo.parallel.parallel_step(prog, mesh)
state = jaxmlo.parallel.replicate(jaxmlo.init(prog), mesh)
state, _ = step(state, jaxmlo.parallel.shard_batches(local, mesh))
ref_state, _ = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))(jaxmlo.init(prog), glob)
out["cg_params_rel_err"] = rel(state.params, ref_state.params)

if pid == 0:
    print(json.dumps(out), flush=True)
multihost_utils.sync_global_devices("done")
