"""Train-mode layers under capture: batch-coupled layers refuse, NNX state updates are discarded,
dropout draws its own mask per example."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf


def xent(logits, y):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, name="inp")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(3, name="head")(jnp.tanh(x))


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (4, 5), jnp.float64)
    return {"x": x, "y": jnp.array([0, 1, 2, 1])}


def test_linen_batchnorm_in_train_mode_raises_and_eval_mode_is_exact(data):
    model = BNNet()
    variables = model.init(jax.random.key(1), data["x"], train=False)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64) + 0.3, variables)

    def train_loss(v, b):
        out, _ = model.apply(v, b["x"], train=True, mutable=["batch_stats"])
        return xent(out, b["y"])

    with pytest.raises(ValueError, match="'bn'.*train mode.*use_running_average=True"):
        jaxinf.logra(train_loss, variables, data, seed=0, k_in=2, k_out=2)

    def eval_loss(v, b):
        return xent(model.apply(v, b["x"], train=False), b["y"])

    lg = jaxinf.logra(eval_loss, variables, data, seed=0, k_in=2, k_out=2, dtype=jnp.float64)
    got = lg.fn(variables, data)
    full = jax.vmap(jax.grad(eval_loss), in_axes=(None, 0))(
        variables, jax.tree.map(lambda v: v[:, None], data)
    )["params"]["inp"]
    ref = jaxinf.project_gradient(
        lg.projections["inp"], jax.vmap(jaxinf.gradient_matrix)(full["kernel"], full["bias"])
    )
    assert np.abs(ref).max() > 0  # never zeros: the running statistics are used
    np.testing.assert_allclose(got["inp"], ref, rtol=0, atol=1e-6 * np.abs(ref).max())


class NNet(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        f = dict(param_dtype=jnp.float64, rngs=rngs)
        self.inp = nnx.Linear(5, 4, **f)
        self.bn = nnx.BatchNorm(4, **f)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(4, 3, **f)

    def __call__(self, x):
        return self.head(self.drop(jnp.tanh(self.bn(self.inp(x)))))


def nnx_loss(m, b):
    return xent(m(b["x"]), b["y"])


def test_nnx_batchnorm_in_train_mode_raises(data):
    model = NNet(nnx.Rngs(0))
    model.train()
    with pytest.raises(ValueError, match="'bn'.*train mode.*model.eval\\(\\)"):
        jaxinf.logra(nnx_loss, nnx.state(model), data, seed=0, k_in=2, k_out=2, model=model)
    model.eval()
    lg = jaxinf.logra(nnx_loss, nnx.state(model), data, seed=0, k_in=2, k_out=2, model=model)
    assert np.abs(lg.fn(nnx.state(model), data)["inp"]).max() > 0


def test_nnx_dropout_masks_differ_per_example_and_state_updates_are_discarded(data):
    model = NNet(nnx.Rngs(0, dropout=1), dropout=0.5)
    model.eval()  # BatchNorm on running statistics ...
    model.drop.deterministic = False  # ... dropout active
    same = {"x": jnp.repeat(data["x"][:1], 4, 0), "y": jnp.repeat(data["y"][:1], 4, 0)}

    def snapshot():
        keys = jax.random.key_data
        return jax.tree.map(
            lambda v: np.asarray(keys(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v),
            nnx.state(model),
        )

    before = snapshot()
    lg = jaxinf.logra(nnx_loss, nnx.state(model), same, seed=0, k_in=3, k_out=3, model=model)
    g = np.asarray(lg.fn(nnx.state(model), same)["head"])
    # Four copies of one example: equal gradients would mean one mask shared by the batch.
    assert all(not np.allclose(g[0], g[i]) for i in range(1, 4))
    # The same examples draw the same masks on every call (the keys are not advanced).
    np.testing.assert_array_equal(lg.fn(nnx.state(model), same)["head"], g)
    after = snapshot()
    jax.tree.map(np.testing.assert_array_equal, after, before)  # RNG counts, stats unchanged
    # With dropout off, the four copies agree (static flags are read when the capture is built).
    model.drop.deterministic = True
    lg = jaxinf.logra(nnx_loss, nnx.state(model), same, seed=0, k_in=3, k_out=3, model=model)
    g = np.asarray(lg.fn(nnx.state(model), same)["head"])
    np.testing.assert_allclose(g[1:], np.broadcast_to(g[0], g[1:].shape), rtol=1e-12)
