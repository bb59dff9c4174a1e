"""Linen dropout under capture: each example draws its own mask from the loss's key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxinf

KEY = jax.random.PRNGKey(7)


class DropNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(3)(h)


MODEL = DropNet()


def _loss_with(key):
    def loss(params, batch):
        out = MODEL.apply({"params": params}, batch, rngs={"dropout": key})
        return jnp.mean(jnp.sum(out**2, axis=-1))

    return loss


def test_linen_dropout_masks_differ_per_example_and_match_folded_keys():
    x = jnp.tile(jnp.asarray(np.random.default_rng(0).normal(size=(1, 4))), (3, 1))
    params = MODEL.init({"params": jax.random.PRNGKey(0), "dropout": KEY}, x[:1])["params"]
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    lg = jaxinf.logra(_loss_with(KEY), params, x, seed=0, k_in=3, k_out=2, dtype=jnp.float64)
    got = lg.fn(params, x)
    for path, g in got.items():
        # Three copies of one input: only the dropout masks can tell them apart.
        assert not np.allclose(g[0], g[1]) and not np.allclose(g[1], g[2]), path
    # Example i is the plain model with key fold_in(KEY, i): full gradient, projected.
    for i in range(3):
        grads = jax.grad(_loss_with(jax.random.fold_in(KEY, i)))(params, x[i : i + 1])
        for path, proj in lg.projections.items():
            g = grads[path]
            full = jaxinf.gradient_matrix(g["kernel"], g["bias"])
            np.testing.assert_allclose(
                got[path][i], jaxinf.project_gradient(proj, full), rtol=1e-10, atol=1e-12
            )
