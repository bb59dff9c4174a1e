"""jaxmlo.checkpointed_scan: lax.scan's values and derivatives, with O(sqrt(T)) stored memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmlo


def step(c, x):
    h = jnp.tanh(c["a"] * x["u"]) + c["b"]
    return {"a": c["a"] + 0.1 * jnp.sin(h), "b": 0.9 * c["b"] + x["v"]}, (h.sum(), x["v"] * c["b"])


T = 10
XS = {"u": jnp.linspace(0.5, 1.5, T)[:, None] * jnp.ones(3), "v": jnp.linspace(-1.0, 1.0, T)}
C0 = {"a": jnp.array([0.1, -0.2, 0.3]), "b": jnp.array(0.5)}


def _objective(scan):
    def f(c0):
        c, (h, g) = scan(step, c0, XS)
        return jnp.sum(c["a"] ** 2) + c["b"] + jnp.sum(jnp.cos(h)) + jnp.sum(g * jnp.arange(T))

    return f


@pytest.mark.parametrize("segments", [None, 1, 2, 3, 4, 7, T, 50])
def test_values_and_gradients_match_lax_scan(segments):
    # 3, 4 and 7 do not divide T: a shorter last segment; 50 > T is clipped to T.
    def scan(f, c, xs):
        return jaxmlo.checkpointed_scan(f, c, xs, segments=segments)

    got, want = scan(step, C0, XS), jax.lax.scan(step, C0, XS)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b), got, want
    )  # same ops, same order
    g, r = jax.grad(_objective(scan))(C0), jax.grad(_objective(jax.lax.scan))(C0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), g, r)


def test_length_without_xs():
    def f(c, _):
        return c * 1.5 + 1.0, c

    c, ys = jaxmlo.checkpointed_scan(f, jnp.array(1.0), length=5, segments=2)
    c_ref, ys_ref = jax.lax.scan(f, jnp.array(1.0), length=5)
    assert float(c) == float(c_ref)
    np.testing.assert_array_equal(ys, ys_ref)
    d = jax.grad(lambda x: jaxmlo.checkpointed_scan(f, x, length=5, segments=2)[0])(1.0)
    assert float(d) == pytest.approx(1.5**5, rel=1e-12)


def _temp_bytes(t, segments):
    xs = jnp.ones(t)

    def loss(c):
        return jaxmlo.checkpointed_scan(
            lambda c, x: (c + 0.01 * jnp.sin(jnp.tanh(c * x)), None), c, xs, segments=segments
        )[0].sum()

    m = jax.jit(jax.grad(loss)).lower(jnp.ones(2048)).compile().memory_analysis()
    if m is None:
        pytest.skip("this backend gives no compiled memory analysis")
    return m.temp_size_in_bytes


def test_memory_grows_like_sqrt_t():
    # Compile-time buffer sizes (deterministic, not timings). Plain scan stores every step: 16x
    # the steps, ~16x the bytes; sqrt(T) segments: ~4x.
    plain = [_temp_bytes(t, 1) for t in (16, 256)]
    ckpt = [_temp_bytes(t, None) for t in (16, 256)]
    assert plain[1] / plain[0] > 10
    assert ckpt[1] / ckpt[0] < 6
    assert ckpt[1] < plain[1] / 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(xs=None), "give xs or length"),
        (dict(xs=jnp.ones(4), length=5), "length=5 but xs has leading axis 4"),
        (dict(xs={"a": jnp.ones(4), "b": jnp.ones(3)}), "same leading axis"),
        (dict(xs=jnp.ones(4), segments=0), "segments must be an int >= 1"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxmlo.checkpointed_scan(lambda c, x: (c, None), jnp.array(0.0), **kwargs)
