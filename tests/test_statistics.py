"""Statistics accumulators, and the log writer's Fisher sums, against float64 brute force."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import LogWriter, open_log
from jaxinf._src.statistics import projected_covariance
from jaxinf._src.writer import load_fisher


def test_projected_covariance_matches_dense_mean_of_outer_products():
    rng = np.random.default_rng(0)
    batches = [{"a": rng.normal(size=(5, 3, 2)), "b": rng.normal(size=(5, 4))} for _ in range(3)]
    acc = projected_covariance()
    update = jax.jit(acc.update)
    state = acc.init(batches[0])
    for b in batches:
        state = update(state, b)
    cov = acc.finalize(state)
    for layer in ("a", "b"):
        rows = np.concatenate([b[layer].reshape(5, -1) for b in batches])
        # float64 accumulation of the same sum: agreement to rounding.
        np.testing.assert_allclose(cov[layer], rows.T @ rows / len(rows), rtol=1e-12)
    assert cov["a"].shape == (6, 6) and cov["a"].dtype == jnp.float64


def test_writer_fisher_sums_stay_exact_when_the_upper_triangle_meets_a_resume(tmp_path):
    # Layer "big" has D = 20 * 15 = 300 > 256, so the writer's sums keep only their upper
    # triangle of blocks current; each close() saves them mirrored, each reopen starts from
    # the saved whole matrix (or from the rows, when the sums are gone) and adds upper blocks.
    proj = {
        "layers": {
            "big": {"k_in": 15, "k_out": 20, "n_in": 30, "n_out": 40},
            "small": {"k_in": 3, "k_out": 2, "n_in": 5, "n_out": 4},
        },
        "init": "random",
        "seed": 0,
        "fingerprint": "f",
    }
    rng = np.random.default_rng(3)
    batches = [
        (
            {"big": rng.normal(size=(5, 20, 15)), "small": rng.normal(size=(5, 2, 3))},
            range(5 * i, 5 * i + 5),
        )
        for i in range(6)
    ]
    path = str(tmp_path / "log")
    shard = tmp_path / "log" / "shards" / "w"

    def write(part):
        with LogWriter(path, proj, dtype="float64", writer_id="w", chunk_rows=8) as w:
            for grads, ids in part:
                w.write_async(grads, ids=ids)
        return w.committed_rows

    def check(rows_written):
        n = rows_written
        saved = load_fisher(str(shard), n, 2)
        for i, layer in enumerate(("big", "small")):
            g = np.concatenate([b[0][layer].reshape(5, -1) for b in batches])[:n]
            # float64 sums of n unit-scale products in another order: rounding only
            np.testing.assert_allclose(saved[i], g.T @ g, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(saved[i], saved[i].T)
        return saved

    assert write(batches[:2]) == 10
    check(10)
    assert write(batches[2:4]) == 20  # resumed from fisher/r10
    check(20)
    shutil.rmtree(shard / "fisher")  # as if killed before the sums were saved
    assert write(batches[4:]) == 30  # resumed from sums recomputed from the 20 rows
    saved = check(30)
    np.testing.assert_allclose(open_log(path).statistics()["big"].covariance, saved[0] / 30)
    shutil.rmtree(shard / "fisher")  # the reader recomputes the sums from the rows
    cov = open_log(path).statistics()["big"].covariance
    np.testing.assert_allclose(cov, saved[0] / 30, rtol=1e-12, atol=1e-13)


def test_mirroring_a_k64_sum_compiles_without_folding_its_mask():
    # A [4096, 4096] triangle mask built from iota was folded by XLA at compile time: closing a
    # k = 64 writer hung for many minutes. Compiled in a fresh process (no cache), it must
    # finish well inside the limit (it takes under a second) and mirror exactly.
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jaxinf._src.statistics import mirror_upper\n"
        "from jaxinf._src.writer import _full_sums\n"
        "a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)\n"
        "ref = np.triu(a) + np.triu(a, 1).T\n"
        "assert np.array_equal(np.asarray(jax.jit(mirror_upper)(a)), ref)\n"
        "assert np.array_equal(np.asarray(_full_sums({'l': jnp.asarray(a)})['l']), ref)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    assert out.stdout.strip() == "ok"
