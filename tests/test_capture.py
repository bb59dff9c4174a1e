"""jaxinf capture + LoGra projection, checked in float64 against vmap(grad) references."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from flax import nnx

import jaxinf

# Both sides are float64 computations of the same sums in a different order: agreement to
# rounding; 1e-6 relative leaves ample margin while catching any wrong term.
RTOL = 1e-6


def f64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)


def per_example_grads(loss_fn, params, batch):
    """Full per-example parameter gradients by vmap(grad) over batches of one example."""
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(
        params, jax.tree.map(lambda v: v[:, None], batch)
    )


def assert_matches_full(got, projs, full_grads_by_layer):
    for path, (kernel, bias) in full_grads_by_layer.items():
        if bias is None:
            g = jax.vmap(lambda k: k.reshape(-1, projs[path].p_out.shape[1]))(kernel)
        else:
            g = jax.vmap(jaxinf.gradient_matrix)(kernel, bias)
        ref = jaxinf.project_gradient(projs[path], g)
        assert got[path].shape == ref.shape, path
        scale = np.abs(ref).max()
        assert scale > 0, path
        np.testing.assert_allclose(got[path], ref, rtol=0, atol=RTOL * scale, err_msg=path)


def xent(logits, y):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))


# --------------------------------------------------------------------------------------------
# MLP (Linen)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(5)(x))
        return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    batch = {"x": x, "y": jnp.array([0, 1, 2, 1])}
    params = f64(model.init(jax.random.key(0), x)["params"])

    def loss_fn(p, b):
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    return model, params, batch, loss_fn


def test_mlp_projected_gradients_match_full_per_example_gradients(mlp):
    _, params, batch, loss_fn = mlp
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    assert list(layers) == ["Dense_0", "head"]
    assert (layers["Dense_0"].n_in, layers["Dense_0"].n_out, layers["Dense_0"].bias) == (7, 5, True)
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=3, k_out=2, dtype=jnp.float64)
    got = jaxinf.projected_gradients(cap, projs)(params, batch)
    full = per_example_grads(loss_fn, params, batch)
    assert_matches_full(got, projs, {p: (full[p]["kernel"], full[p]["bias"]) for p in layers})


def test_mlp_kfac_factors_match_manual_covariances(mlp):
    _, params, batch, loss_fn = mlp
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    acc = jaxinf.kfac_factors(cap, layers, dtype=jnp.float64)
    state = acc.init()
    halves = [jax.tree.map(lambda v: v[:2], batch), jax.tree.map(lambda v: v[2:], batch)]
    for b in halves:  # two updates: the accumulation over batches is part of the contract
        state = acc.update(state, (params, b))
    fac = acc.finalize(state)

    # Manual reference: the MLP written out, d = gradient of each example's loss w.r.t. outputs.
    w0, b0 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    w1, b1 = params["head"]["kernel"], params["head"]["bias"]
    x, y = np.asarray(batch["x"]), batch["y"]
    z0 = x @ w0 + b0
    h = np.tanh(z0)
    z1 = h @ w1 + b1
    d1 = jax.vmap(jax.grad(lambda z, t: xent(z[None], t[None])))(z1, y)
    d0 = (d1 @ w1.T) * (1 - h**2)
    one = np.ones((4, 1))
    for path, a, d in (("Dense_0", np.hstack([x, one]), d0), ("head", np.hstack([h, one]), d1)):
        np.testing.assert_allclose(fac[path].forward, a.T @ a / 4, rtol=1e-10)
        np.testing.assert_allclose(fac[path].backward, d.T @ d / 4, rtol=1e-10)
        assert fac[path].tokens == 4


def test_projection_metadata_is_json_and_fingerprints_projections(mlp):
    import json

    _, params, batch, loss_fn = mlp
    layers = jaxinf.find_layers(jaxinf.linen_capture(loss_fn), params, batch)
    p0 = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=3, k_out=2)
    p1 = jaxinf.random_projections(layers, key=jax.random.key(1), k_in=3, k_out=2)
    m0 = jaxinf.projection_metadata(p0, init="random", seed=0)
    assert json.loads(json.dumps(m0)) == m0
    assert m0["layers"]["head"] == {"k_in": 3, "k_out": 2, "n_in": 6, "n_out": 3}
    assert m0 == jaxinf.projection_metadata(p0, init="random", seed=0)
    assert m0["fingerprint"] != jaxinf.projection_metadata(p1, init="random", seed=1)["fingerprint"]
    # A layer's projection depends only on the key and its own path.
    only_head = jaxinf.random_projections({"head": layers["head"]}, key=jax.random.key(0), k_in=3, k_out=2)
    np.testing.assert_array_equal(only_head["head"].p_in, p0["head"].p_in)
