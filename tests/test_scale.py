"""Data parallelism: sharded results equal single-device results, on 8 forced CPU devices.

Each check runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before jax is imported (the flag must never reach this pytest process, whose jax is already
initialised with one device). The scripts under ``tests/scale_scripts/`` compute both sides and
print one JSON line of measured errors and collective counts; the assertions live here.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scale_scripts")

# Sharded and single-device runs add the same float32 terms in a different order (per-device
# partial sums, then one psum): they agree to float32 rounding, ~1e-7 relative; 1e-5 leaves
# room for longer sums while catching any missing or doubled example (>= 1/48 here).
F32_RTOL = 1e-5
# bfloat16 has an 8-bit mantissa (relative spacing 2^-8 ~ 0.4%); a forward+backward pass in bf16
# accumulates a few of those.
BF16_RTOL = 5e-2


def start_script(name: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)  # float32, the dtype the tolerances are about
    return subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, name), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_script(name: str, proc: subprocess.Popen, timeout: int = 400) -> str:
    """Wait for a check script; fail the test on a timeout or non-zero exit. Returns stdout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{name} timed out after {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}\n{err[-6000:]}"
    return out


def finish_script(name: str, proc: subprocess.Popen, timeout: int = 400) -> dict:
    """Wait for a check script and return the JSON it printed last."""
    return json.loads(wait_script(name, proc, timeout).strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    # All scripts start at once: most of their time is XLA compilation, which overlaps.
    ps = {n: start_script(n) for n in ("jaxinf_check.py", "jaxmlo_check.py")}
    port, tmp = str(free_port()), str(tmp_path_factory.mktemp("multiprocess"))
    for pid in ("0", "1"):  # two processes of one jax.distributed job, 4 CPU devices each
        ps[f"multiprocess_{pid}"] = start_script("multiprocess_check.py", pid, port, tmp)
    yield ps
    for p in ps.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def jaxinf_results(procs):
    return finish_script("jaxinf_check.py", procs["jaxinf_check.py"])


@pytest.fixture(scope="module")
def jaxmlo_results(procs):
    return finish_script("jaxmlo_check.py", procs["jaxmlo_check.py"])


@pytest.fixture(scope="module")
def multiprocess_results(procs):
    wait_script("multiprocess_check.py (process 1)", procs["multiprocess_1"])
    return finish_script("multiprocess_check.py (process 0)", procs["multiprocess_0"])


@pytest.mark.multidevice
def test_sharded_logging_equals_single_device(jaxinf_results):
    r = jaxinf_results
    assert r["grads_rel_err"] < F32_RTOL
    assert r["count"] == 48
    assert r["cov_rel_err"] < F32_RTOL
    assert r["kfac_rel_err"] < F32_RTOL
    assert r["kfac_tokens"] == [48, 48]


@pytest.mark.multidevice
def test_sharded_logging_communicates_once(jaxinf_results):
    r = jaxinf_results
    # the per-batch step is local to each device; the pass's statistics are one all-reduce
    assert r["step_collectives"] == 0
    assert r["finalize_collectives"]["all-reduce"] == 1
    assert sum(r["finalize_collectives"].values()) == 1


@pytest.mark.multidevice
def test_sharded_rows_and_store_statistics(jaxinf_results):
    r = jaxinf_results
    assert r["log_rows"] == 48 and r["log_ids_in_order"]
    assert r["log_rows_rel_err"] < F32_RTOL
    assert r["fisher_cache_used"]
    assert r["log_cov_rel_err"] < F32_RTOL
    assert r["stats2_cov_rel_err"] < F32_RTOL


@pytest.mark.multidevice
def test_sharded_query_equals_single_device(jaxinf_results):
    r = jaxinf_results
    for mode in ("dot", "relatif"):
        assert r[f"query_{mode}_same_top_rows"], mode
        assert r[f"query_{mode}_rel_err"] < F32_RTOL, mode
    assert r["query_many_rounds_same_top_rows"]


@pytest.mark.multidevice
def test_bfloat16_capture_and_storage(jaxinf_results):
    r = jaxinf_results
    assert r["bf16_grads_rel_err"] < BF16_RTOL
    assert r["bf16_log_dtype"] == "bfloat16"
    assert r["bf16_log_rel_err"] < BF16_RTOL


def test_count_collectives_parses_hlo():
    import jaxmlo.testing

    hlo = """
  %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}, to_apply=%add
  %ars = (f32[2]{0}, f32[3]{0}) all-reduce-start(f32[2]{0} %a, f32[3]{0} %b), to_apply=%add
  %ard = (f32[2]{0}, f32[3]{0}) all-reduce-done((f32[2]{0}, f32[3]{0}) %ars)
  %ag = f32[8]{0} all-gather(f32[1]{0} %c), dimensions={0}
  %x = f32[4]{0} add(f32[4]{0} %all-reduce.1, f32[4]{0} %all-reduce.1)
"""
    c = jaxmlo.testing.count_collectives(hlo)
    assert c["all-reduce"] == 2 and c["all-gather"] == 1 and c["reduce-scatter"] == 0


# ---------------------------------------------------------------------------------------------
# jaxmlo


@pytest.mark.multidevice
def test_parallel_cg_equals_single_device_step(jaxmlo_results):
    r = jaxmlo_results
    assert r["cg_params_rel_err"] < F32_RTOL
    assert r["cg_opt_rel_err"] < F32_RTOL
    assert r["cg_metrics_rel_err"] < F32_RTOL
    assert r["cg_replicated"]


@pytest.mark.multidevice
def test_parallel_sama_equals_per_shard_reference(jaxmlo_results):
    r = jaxmlo_results
    # Data-parallel SAMA averages per-shard meta gradients (thesis 3.3.3): the reference
    # computes exactly that on one device, shard by shard.
    assert r["sama_params_rel_err"] < F32_RTOL
    assert r["sama_replicated"]
    # jaxmlo.run(..., step_fn=parallel_step(...)) drives the same computation
    assert r["run_driver_rel_err"] < F32_RTOL
    # ... which is not global-batch SAMA: the two differ by far more than rounding.
    assert r["sama_vs_global_batch_rel_diff"] > 100 * F32_RTOL
    # with local=False SAMA runs on the global batch and equals the one-device step
    assert r["sama_global_mode_rel_err"] < F32_RTOL


@pytest.mark.multidevice
def test_sama_all_reduces_once_per_meta_step(jaxmlo_results):
    r = jaxmlo_results
    base = r["base_only_collectives"]["all-reduce"]
    sama = r["sama_collectives"]["all-reduce"]
    cg = r["cg_collectives"]["all-reduce"]
    # The base unroll is one scan whose body holds one all-reduce (loss + gradient together).
    assert base == 1
    # SAMA adds exactly one all-reduce for the whole meta step: its direct-gradient,
    # adaptation and finite-difference passes stay local.
    assert sama == base + 1
    # CG's derivatives are global: an all-reduce for the direct gradients, one in the CG loop
    # body (run every iteration) and one for the mixed second derivative.
    assert cg > sama
    for r_ in (r["sama_collectives"], r["cg_collectives"], r["base_only_collectives"]):
        assert r_["all-gather"] == 0 and r_["all-to-all"] == 0


@pytest.mark.multidevice
def test_mixed_precision_keeps_float32_masters(jaxmlo_results):
    r = jaxmlo_results
    assert r["mp_param_dtypes"] == ["float32"]
    assert r["mp_opt_dtypes"] == ["float32", "int32"]  # adam moments f32, step count int32
    assert r["mp_has_bf16_compute"]
    assert r["mp_finite"]
    assert r["mp_base_rel_err"] < BF16_RTOL


def test_mixed_precision_wrapper_single_device():
    import jax
    import jax.numpy as jnp

    import jaxmlo

    def loss(p, deps, batch):
        assert p["w"].dtype == jnp.bfloat16 and deps["lam"].dtype == jnp.bfloat16
        return jnp.mean((batch @ p["w"]) ** 2) * deps["lam"]

    wrapped = jaxmlo.parallel.mixed_precision(loss)
    p = {"w": jnp.ones(3, jnp.float32)}
    deps = {"lam": jnp.asarray(0.5, jnp.float32)}
    x = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
    value, g = jax.value_and_grad(wrapped)(p, deps, x)
    assert value.dtype == jnp.float32 and g["w"].dtype == jnp.float32
    ref = jax.grad(lambda p: jnp.mean((x @ p["w"]) ** 2) * 0.5)(p)
    # bf16 inputs and products: about 3 significant digits
    assert jnp.allclose(g["w"], ref["w"], rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed, gloo collectives on CPU), 4 devices each


@pytest.mark.multidevice
def test_multiprocess_logging_query_and_step(multiprocess_results):
    r = multiprocess_results
    # each process wrote its own shard of one log; statistics reduced across processes
    assert r["shards"] == ["p0", "p1"] and r["rows_written_here"] == 16
    assert r["count"] == 32 and r["log_rows"] == 32
    assert r["cov_rel_err"] < F32_RTOL and r["log_cov_rel_err"] < F32_RTOL
    # each process read only its devices' chunks; the merged top-k equals a full query
    assert r["query_same_top_rows"] and r["query_rel_err"] < F32_RTOL
    # the CG program step across both processes equals one device on the global batch
    assert r["cg_params_rel_err"] < F32_RTOL


# ---------------------------------------------------------------------------------------------
# One device, in this process (float64): the parallel code paths reduce to the plain ones


def test_one_device_mesh_matches_plain_paths_float64(tmp_path, dense_capture):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxinf
    import jaxmlo

    mesh = jaxmlo.parallel.data_mesh(jax.devices()[:1])
    params, batch, cap, projs = dense_capture(6, 4, 3, k_in=3, k_out=2)
    meta = jaxinf.projection_metadata(projs, init="random", seed=2)
    ref = jaxinf.projected_gradients(cap, projs)(params, batch)
    logging = jaxinf.sharded_logging(cap, projs, mesh=mesh, stats_dtype=jnp.float64)
    with jaxinf.LogWriter(str(tmp_path / "log"), meta, dtype="float64", statistics=False) as w:
        stats = jaxinf.log_sharded(
            logging, params, [batch], w, ids_fn=lambda b: list(range(6)), progress=False
        )
    acc = jaxinf.projected_covariance()
    cov = acc.finalize(acc.update(acc.init(ref), ref))
    # same float64 sums, same order: equal to rounding
    (name,) = ref  # the one captured layer
    np.testing.assert_allclose(stats.covariance[name], cov[name], rtol=1e-12)
    log = jaxinf.open_log(str(tmp_path / "log"))
    rows, _ = log.read()
    np.testing.assert_allclose(rows[name], ref[name], rtol=1e-12)
    r1 = jaxinf.query(log, ref, meta, top_k=3, progress=False)
    r2 = jaxinf.sharded_query(log, ref, meta, mesh=mesh, top_k=3, progress=False)
    np.testing.assert_array_equal(r1.top_rows, r2.top_rows)
    np.testing.assert_allclose(r1.top_scores, r2.top_scores, rtol=1e-12)

    # jaxmlo: with one shard, data-parallel SAMA is SAMA; CG is CG
    def base_loss(w, deps, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2) + deps["meta"] * jnp.sum(w**2)

    def meta_loss(lam, deps, b):
        return jnp.mean((b[0] @ deps["base"] - b[1]) ** 2)

    xb = jax.random.normal(jax.random.key(3), (1, 6, 4), jnp.float64)
    yb = jax.random.normal(jax.random.key(4), (1, 6), jnp.float64)
    batches = {"base": (xb, yb), "meta": (xb[:, ::-1], yb)}
    for method in (jaxmlo.sama(), jaxmlo.cg(maxiter=10, tol=0.0)):
        prog = jaxmlo.Program(
            [
                jaxmlo.Problem(
                    "base", base_loss, jnp.ones(4, jnp.float64), optax.adam(0.1), method=method
                ),
                jaxmlo.Problem("meta", meta_loss, jnp.asarray(0.1, jnp.float64), optax.adam(0.1)),
            ],
            u2l={"meta": ["base"]},
            l2u={"base": ["meta"]},
        )
        s1, m1 = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))(jaxmlo.init(prog), batches)
        s2, m2 = jaxmlo.parallel.parallel_step(prog, mesh)(jaxmlo.init(prog), batches)
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
            np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=method.name)  # float64 rounding


def test_one_device_sharded_covariance_upper_triangle_float64(dense_capture):
    # D = 17 * 16 = 272 spans two 256-row blocks: the triangle-and-mirror path, not the plain product
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxinf
    import jaxmlo

    mesh = jaxmlo.parallel.data_mesh(jax.devices()[:1])
    params, batch, cap, projs = dense_capture(5, 20, 20, k_in=17, k_out=16)
    ref = jaxinf.projected_gradients(cap, projs)(params, batch)
    logging = jaxinf.sharded_logging(cap, projs, mesh=mesh, stats_dtype=jnp.float64)
    state = logging.init()
    for half in (slice(0, 2), slice(2, 5)):
        state, _ = logging.step(state, params, jax.tree.map(lambda a: a[half], batch))
    stats = logging.finalize(state)
    (name,) = ref
    g = np.asarray(ref[name], np.float64).reshape(5, -1)
    assert g.shape[1] == 272
    np.testing.assert_allclose(stats.covariance[name], g.T @ g / 5, rtol=1e-12, atol=1e-15)
