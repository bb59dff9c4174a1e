"""Test configuration: float64 everywhere (references are exact by construction), and setups
shared by several test modules."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _dense_capture(n, n_in, n_out, k_in, k_out):
    """A float64 ``nn.Dense(n_out)`` classifier on ``n`` random examples, its Linen capture and
    random projections: (params, batch, capture, projections)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jaxinf

    model = nn.Dense(n_out)
    x = jax.random.normal(jax.random.key(0), (n, n_in), jnp.float64)
    batch = {"x": x, "y": jnp.arange(n) % n_out}
    params = jax.tree.map(
        lambda v: v.astype(jnp.float64), model.init(jax.random.key(1), x)["params"]
    )

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["x"])
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1))

    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(2), k_in=k_in, k_out=k_out, dtype=jnp.float64
    )
    return params, batch, cap, projs


@pytest.fixture
def dense_capture():
    """``dense_capture(n, n_in, n_out, k_in, k_out) -> (params, batch, capture, projections)``:
    a float64 Linen ``nn.Dense`` classifier with random LoGra projections."""
    return _dense_capture
