"""Data parallelism (issue 7): sharded results equal single-device results, on 8 forced CPU devices.

Each check runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before jax is imported (the flag must never reach this pytest process, whose jax is already
initialised with one device). The scripts under ``tests/scale_scripts/`` compute both sides and
print one JSON line of measured errors and collective counts; the assertions live here.
"""
import json
import os
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


def run_script(name: str, timeout: int = 300) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)  # float32, the dtype the tolerance is about
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def jaxinf_results():
    return run_script("jaxinf_check.py")


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
    import jaxinf

    hlo = """
  %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}, to_apply=%add
  %ars = (f32[2]{0}, f32[3]{0}) all-reduce-start(f32[2]{0} %a, f32[3]{0} %b), to_apply=%add
  %ard = (f32[2]{0}, f32[3]{0}) all-reduce-done((f32[2]{0}, f32[3]{0}) %ars)
  %ag = f32[8]{0} all-gather(f32[1]{0} %c), dimensions={0}
  %x = f32[4]{0} add(f32[4]{0} %all-reduce.1, f32[4]{0} %all-reduce.1)
"""
    c = jaxinf.count_collectives(hlo)
    assert c["all-reduce"] == 2 and c["all-gather"] == 1 and c["reduce-scatter"] == 0
