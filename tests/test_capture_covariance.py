"""The projected covariance accumulator, direct and blocked, against the float64 brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf._src.statistics import add_outer, mirror_upper


# triangle_block: the default, the full product, and blocks of 100 (three, the last ragged)
@pytest.mark.parametrize(
    "block_rows,triangle_block", [(None, 256), (4, 256), (16, 256), (4, None), (None, 100)]
)
def test_covariance_equals_brute_force(block_rows, triangle_block):
    rng = np.random.default_rng(0)
    # Batches of 3, 5 (> block 4: added directly there), 2 and 3 rows: blocks fill, overflow
    # and end part-full, so finalize adds pending rows.
    sizes = (3, 5, 2, 3)
    # "c" has D = 300 > 256: its upper triangle is two row blocks, the last one ragged.
    batches = [
        {
            "a": rng.normal(size=(n, 3, 2)),
            "b": rng.normal(size=(n, 4)),
            "c": rng.normal(size=(n, 300)),
        }
        for n in sizes
    ]
    acc = jaxinf.projected_covariance(block_rows, triangle_block)
    state = acc.init(batches[0])
    for b in batches:  # one compilation per batch size; the donated state is replaced
        state = jax.jit(acc.update, donate_argnums=0)(state, b)
    cov = acc.finalize(state)
    assert int(state.count) == sum(sizes)
    for layer in ("a", "b", "c"):
        rows = np.concatenate([b[layer].reshape(len(b[layer]), -1) for b in batches])
        # float64 sums of the same 13 unit-scale products in another order: rounding only
        # (the atol covers entries that cancel to near zero)
        expect = rows.T @ rows / len(rows)
        np.testing.assert_allclose(cov[layer], expect, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(cov[layer], cov[layer].T)  # mirrored, not recomputed
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
    with pytest.raises(ValueError, match="triangle_block"):
        jaxinf.projected_covariance(triangle_block=0)


def test_float32_inputs_accumulate_in_float32_at_least():
    acc = jaxinf.projected_covariance(block_rows=8)
    x = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    cov = acc.finalize(acc.update(acc.init({"l": x}), {"l": jnp.asarray(x)}))["l"]
    assert cov.dtype == jnp.float32
    x64 = x.astype(np.float64)
    # float32 products and sums of 6 terms: a few float32 ulps.
    np.testing.assert_allclose(cov, x64.T @ x64 / 6, rtol=1e-5, atol=1e-6)


def test_upper_triangle_update_adds_the_blocks_on_and_above_the_diagonal_only():
    rng = np.random.default_rng(2)
    d, block = 300, 128  # row blocks of 128, 128 and 44
    x = rng.normal(size=(7, 15, 20))
    w = rng.uniform(size=7)
    g = x.reshape(7, d)
    start = rng.normal(size=(d, d))
    start = start + start.T  # a symmetric sum so far, as a resumed writer loads it
    out = np.asarray(
        add_outer(jnp.asarray(start), jnp.asarray(x), jnp.asarray(w), upper=True, block=block)
    )
    expect = start + (g * w[:, None]).T @ g
    # float64 products of 7 terms: rounding only.
    np.testing.assert_allclose(mirror_upper(out), expect, rtol=1e-12, atol=1e-12)
    below = np.arange(d)[:, None] // block > np.arange(d)[None, :] // block
    # below the diagonal blocks nothing was computed: the start values are still there
    np.testing.assert_array_equal(out[below], start[below])
    np.testing.assert_array_equal(mirror_upper(start), start)  # symmetric in, same out
    np.testing.assert_array_equal(mirror_upper(jnp.asarray(out)), mirror_upper(out))
    # D <= block: the plain product
    small = add_outer(jnp.zeros((6, 6)), jnp.asarray(g[:, :6]), upper=True)
    np.testing.assert_allclose(small, g[:, :6].T @ g[:, :6], rtol=1e-12)


def _flops(f, *args):
    ca = jax.jit(f).lower(*args).compile().cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_upper_triangle_update_does_about_half_the_arithmetic():
    d, rows = 1024, 16
    acc = jax.ShapeDtypeStruct((d, d), jnp.float32)
    x = jax.ShapeDtypeStruct((rows, d), jnp.float32)
    full = _flops(add_outer, acc, x)
    upper = _flops(lambda a, g: add_outer(a, g, upper=True), acc, x)
    if full == 0.0:  # a backend without cost analysis: nothing to compare
        pytest.skip("no compiled FLOP count on this backend")
    # four row blocks of 256: (1 + 1/4) / 2 = 0.625 of the product, plus the adds
    assert 0.55 < upper / full < 0.68, (upper, full)
