"""Tied read-outs (``Embed.attend``) captured as linear layers, checked in float64.

The reference is exact by construction: the same network written by hand with the read-out's
matrix as a separate argument, so ``vmap(grad)`` with respect to it is the embedding's gradient
through the read-out alone (and with respect to the lookup's copy, through the lookup alone).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf

# Both sides are float64 sums of the same terms in a different order: agreement to rounding.
RTOL = 1e-6
V, D, T, K = 7, 5, 4, 3


class LinenTied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(V, D, name="tok")
        return emb.attend(jnp.tanh(nn.Dense(D, name="mlp")(emb(ids))))


class NNXTied(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(V, D, param_dtype=jnp.float64, rngs=rngs)
        self.mlp = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, ids):
        return self.tok.attend(jnp.tanh(self.mlp(self.tok(ids))))


def masked_xent(logits, b):
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][..., None], -1)[..., 0]
    return -jnp.sum(lp * b["mask"])


def by_hand(params, e_lookup, e_readout, ids):
    """The network with the two uses of the embedding as separate matrices."""
    h = jnp.tanh(e_lookup[ids] @ params["mlp"]["kernel"] + params["mlp"]["bias"])
    return h @ e_readout.T


@pytest.fixture(scope="module")
def tied():
    rng = np.random.default_rng(0)
    model = LinenTied()
    ids = jnp.asarray(rng.integers(0, V, size=(3, T)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape)), shapes)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], jnp.float64)
    batch = {"ids": ids, "y": jnp.asarray(rng.integers(0, V, size=(3, T))), "mask": mask}

    def loss_fn(p, b):
        return masked_xent(model.apply({"params": p}, b["ids"]), b)

    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(1), k_in=K, k_out=K, dtype=jnp.float64
    )
    fn = jaxinf.projected_gradients(cap, projs, layers=layers, mask_fn=lambda b: b["mask"])
    return model, params, batch, loss_fn, layers, projs, fn(params, batch)


def reference(params, batch):
    """Per-example gradients of the lookup's and the read-out's copy of the embedding."""
    e = params["tok"]["embedding"]

    def loss(e_lookup, e_readout, ex):
        ex = jax.tree.map(lambda v: v[None], ex)
        return masked_xent(by_hand(params, e_lookup, e_readout, ex["ids"]), ex)

    grad = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0))
    return jax.jit(grad)(e, e, batch)


def test_readout_is_a_dense_layer_of_its_own(tied):
    _, _, _, _, layers, projs, _ = tied
    assert list(layers) == ["tok", "mlp", "tok.attend"]
    spec = layers["tok.attend"]
    assert (spec.kind, spec.type_name, spec.n_in, spec.n_out, spec.bias, spec.tokens) == (
        "dense",
        "Embed.attend",
        D,
        V,
        False,
        T,
    )
    assert (layers["tok"].kind, layers["tok"].n_in, layers["tok"].n_out) == ("embed", V, D)
    assert projs["tok.attend"].p_in.shape == (K, D) and projs["tok.attend"].p_out.shape == (K, V)


def test_readout_matches_projected_brute_force_gradient(tied):
    model, params, batch, _, _, projs, got = tied
    e = params["tok"]["embedding"]
    # The hand-written network is the model: same logits.
    np.testing.assert_allclose(
        by_hand(params, e, e, batch["ids"]),
        model.apply({"params": params}, batch["ids"]),
        rtol=1e-12,
    )
    g_lookup, g_readout = reference(params, batch)
    # Read-out as a linear layer with kernel E^T [D, V]: its G [n_in, n_out] is dL/dE^T.
    ref = jaxinf.project_gradient(projs["tok.attend"], jnp.swapaxes(g_readout, 1, 2))
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(got["tok.attend"], ref, rtol=0, atol=RTOL * scale)
    # The lookup entry is the lookup's part only; with the read-out's it is the whole gradient.
    ref = jaxinf.project_gradient(projs["tok"], g_lookup)
    np.testing.assert_allclose(got["tok"], ref, rtol=0, atol=RTOL * np.abs(ref).max())


def test_two_entries_sum_to_the_tied_gradient(tied):
    _, params, batch, loss_fn, _, _, _ = tied
    g_lookup, g_readout = reference(params, batch)
    full = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(
        params, jax.tree.map(lambda v: v[:, None], batch)
    )["tok"]["embedding"]
    np.testing.assert_allclose(g_lookup + g_readout, full, rtol=1e-10, atol=1e-12)
    assert np.abs(g_readout).max() > 0.1 * np.abs(full).max()  # the read-out part matters


def test_readout_masked_tokens_contribute_nothing(tied):
    _, params, batch, loss_fn, _, projs, got = tied
    # Changing a padded position's target changes nothing in the read-out's projected gradient.
    cap = jaxinf.linen_capture(loss_fn)
    fn = jaxinf.projected_gradients(cap, projs, mask_fn=lambda b: b["mask"])
    other = dict(batch, y=batch["y"].at[2, 3].set((batch["y"][2, 3] + 1) % V))
    np.testing.assert_array_equal(fn(params, other)["tok.attend"], got["tok.attend"])


def test_nnx_tied_readout_equals_linen(tied):
    _, params, batch, _, layers, projs, got = tied
    model = NNXTied(nnx.Rngs(0))
    model.tok.embedding[...] = params["tok"]["embedding"]
    model.mlp.kernel[...] = params["mlp"]["kernel"]
    model.mlp.bias[...] = params["mlp"]["bias"]
    cap = jaxinf.nnx_capture(lambda m, b: masked_xent(m(b["ids"]), b), model)
    layers_n = jaxinf.find_layers(cap, nnx.state(model), batch)
    shape = lambda s: (s.kind, s.n_in, s.n_out, s.bias, s.tokens)  # noqa: E731
    assert {p: shape(s) for p, s in layers_n.items()} == {p: shape(s) for p, s in layers.items()}
    assert layers_n["tok.attend"].type_name == "Embed.attend"
    fn = jaxinf.projected_gradients(cap, projs, layers=layers_n, mask_fn=lambda b: b["mask"])
    got_n = fn(nnx.state(model), batch)
    for p in got:
        scale = np.abs(got[p]).max()
        np.testing.assert_allclose(got_n[p], got[p], rtol=0, atol=1e-10 * scale, err_msg=p)


def test_selecting_the_readout(tied):
    _, params, batch, loss_fn, _, _, _ = tied
    cap = jaxinf.linen_capture(loss_fn)
    pick = lambda *rules: list(jaxinf.find_layers(cap, params, batch, select=list(rules)))  # noqa: E731
    assert pick(jaxinf.Select(types=(nn.Embed,))) == ["tok", "tok.attend"]  # both uses
    assert pick(jaxinf.Select(types=("embed",))) == ["tok"]  # the lookup only
    assert pick(jaxinf.Select(types=("dense",))) == ["mlp", "tok.attend"]  # read-out is dense
    assert pick(jaxinf.Select(pattern=r".*\.attend")) == ["tok.attend"]
