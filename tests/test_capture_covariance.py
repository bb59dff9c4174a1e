"""The projected covariance accumulator, direct and blocked, against the float64 brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf


@pytest.mark.parametrize("block_rows", [None, 4, 16])
def test_covariance_equals_brute_force(block_rows):
    rng = np.random.default_rng(0)
    # Batches of 3, 5 (> block 4: added directly there), 2 and 3 rows: blocks fill, overflow
    # and end part-full, so finalize adds pending rows.
    sizes = (3, 5, 2, 3)
    batches = [{"a": rng.normal(size=(n, 3, 2)), "b": rng.normal(size=(n, 4))} for n in sizes]
    acc = jaxinf.projected_covariance(block_rows)
    state = acc.init(batches[0])
    for b in batches:  # one compilation per batch size; the donated state is replaced
        state = jax.jit(acc.update, donate_argnums=0)(state, b)
    cov = acc.finalize(state)
    assert int(state.count) == sum(sizes)
    for layer in ("a", "b"):
        rows = np.concatenate([b[layer].reshape(len(b[layer]), -1) for b in batches])
        # float64 sums of the same products in another order: agreement to rounding.
        np.testing.assert_allclose(cov[layer], rows.T @ rows / len(rows), rtol=1e-12)
    assert cov["a"].shape == (6, 6) and cov["a"].dtype == jnp.float64


def test_blocked_state_defers_the_sums():
    acc = jaxinf.projected_covariance(block_rows=4)
    g = {"l": jnp.ones((3, 2))}
    state = acc.update(acc.init(g), g)
    assert float(jnp.abs(state.sum_outer["l"]).max()) == 0.0 and int(state.fill) == 3
    state = acc.update(state, g)  # 3 + 3 > 4: the 3 pending rows are added first
    assert float(state.sum_outer["l"][0, 0]) == 3.0 and int(state.fill) == 3
    np.testing.assert_allclose(acc.finalize(state)["l"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="block_rows"):
        jaxinf.projected_covariance(block_rows=0)


def test_float32_inputs_accumulate_in_float32_at_least():
    acc = jaxinf.projected_covariance(block_rows=8)
    x = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    cov = acc.finalize(acc.update(acc.init({"l": x}), {"l": jnp.asarray(x)}))["l"]
    assert cov.dtype == jnp.float32
    x64 = x.astype(np.float64)
    # float32 products and sums of 6 terms: a few float32 ulps.
    np.testing.assert_allclose(cov, x64.T @ x64 / 6, rtol=1e-5, atol=1e-6)
