import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf._src import baselines as bl


def _direct(test, train, fisher, ratio=0.1):
    f = fisher.T @ fisher / len(fisher)
    lam = ratio * np.trace(f) / f.shape[0]
    return test @ np.linalg.solve(f + lam * np.eye(f.shape[0]), train.T)


@pytest.mark.parametrize("n,p", [(30, 8), (6, 20)])  # direct branch and Woodbury branch
def test_exact_influence_matches_direct_damped_solve(n, p):
    rng = np.random.default_rng(0)
    tr, te = rng.normal(size=(n, p)), rng.normal(size=(4, p))
    # Well-conditioned (damped) float64 solves: agreement to ~1e-10.
    np.testing.assert_allclose(
        bl.exact_influence(te, tr), _direct(te, tr, tr), rtol=1e-9, atol=1e-10
    )
    blocks = bl.block_influence({"a": te}, {"a": tr})
    np.testing.assert_allclose(blocks, _direct(te, tr, tr), rtol=1e-9, atol=1e-10)


def test_dot_cosine_and_trak_reductions():
    rng = np.random.default_rng(1)
    tr, te = rng.normal(size=(15, 6)), rng.normal(size=(3, 6))
    np.testing.assert_allclose(bl.grad_dot(te, tr), te @ tr.T, rtol=1e-12)
    cos = (te / np.linalg.norm(te, axis=1, keepdims=True)) @ (
        tr / np.linalg.norm(tr, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(bl.grad_cosine(te, tr), cos, rtol=1e-10)
    # Identity projection, no preconditioning: exactly the gradient dot product.
    np.testing.assert_allclose(
        bl.trak(te, tr, projection=np.eye(6), precondition=False), te @ tr.T, rtol=1e-12
    )
    # An orthogonal projection keeps the Fisher spectrum, so preconditioned TRAK = exact influence.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(
        bl.trak(te, tr, projection=q), _direct(te, tr, tr), rtol=1e-9, atol=1e-10
    )
    # A wide Gaussian projection approximately preserves dot products (E[P P^T] = I).
    s = bl.trak(te, tr, dim=4000, key=jax.random.PRNGKey(0), precondition=False)
    assert np.corrcoef(np.ravel(s), np.ravel(te @ tr.T))[0, 1] > 0.95


def test_kfac_and_ekfac_equal_exact_influence_when_fisher_is_kronecker():
    # Examples are all pairs (a_i, d_j): then E[a a^T (x) d d^T] = E[a a^T] (x) E[d d^T] exactly.
    rng = np.random.default_rng(2)
    a_set, d_set = rng.normal(size=(5, 3)), rng.normal(size=(4, 2))
    a = np.repeat(a_set, 4, axis=0)[:, None, :]
    d = np.tile(d_set, (5, 1))[:, None, :]
    train = {"layer": (jnp.asarray(a), jnp.asarray(d))}
    test = {
        "layer": (jnp.asarray(rng.normal(size=(3, 1, 3))), jnp.asarray(rng.normal(size=(3, 1, 2))))
    }
    g_tr = np.einsum("nti,nto->nio", a, d).reshape(20, -1)
    g_te = np.asarray(bl.layer_grads_from_activations(test)["layer"]).reshape(3, -1)
    ref = _direct(g_te, g_tr, g_tr)
    # Eigendecompositions of 2x2 / 3x3 factors in float64: agreement to ~1e-10.
    np.testing.assert_allclose(bl.kfac_influence(test, train), ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        bl.kfac_influence(test, train, ekfac=True), ref, rtol=1e-8, atol=1e-10
    )


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [T, 3] (a sequence) -> scalar-ish logits
        h = nn.tanh(nn.Dense(4)(x))
        h = nn.Dense(2, use_bias=False, name="head")(h)
        return h.sum(0)


def _data():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 2, 3)))
    y = jnp.asarray(rng.integers(0, 2, size=5))
    params = jax.tree.map(
        lambda v: v.astype(jnp.float64), _Net().init(jax.random.PRNGKey(0), x[0])["params"]
    )
    return params, (x, y)


def _per_example(out):
    return jax.vmap(lambda o, t: -jax.nn.log_softmax(o)[t])


def _linen_loss(p, b):  # the capture loss: one-example batch -> that example's loss
    out = jax.vmap(lambda xi: _Net().apply({"params": p}, xi))(b[0])
    return jnp.sum(_per_example(out)(out, b[1]))


def test_dense_activations_reproduce_per_example_gradients():
    params, batch = _data()
    acts = bl.dense_activations(_linen_loss, params, batch, chunk_size=2)
    assert set(acts) == {"Dense_0", "head"}
    grads = bl.per_example_grads(_linen_loss, params, batch, chunk_size=3)
    g = bl.layer_grads_from_activations(acts)
    # Same derivatives by a different route (outer products vs autodiff): float64 rounding.
    np.testing.assert_allclose(
        g["Dense_0"][:, :-1], grads["Dense_0"]["kernel"], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        g["Dense_0"][:, -1], grads["Dense_0"]["bias"], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(g["head"], grads["head"]["kernel"], rtol=1e-10, atol=1e-12)
    flat = bl.flatten_per_example(grads)
    assert flat.shape == (5, 3 * 4 + 4 + 4 * 2)


class _NNet(nnx.Module):
    def __init__(self, params):
        f = dict(param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        self.Dense_0 = nnx.Linear(3, 4, **f)
        self.head = nnx.Linear(4, 2, use_bias=False, **f)
        self.Dense_0.kernel[...] = params["Dense_0"]["kernel"]
        self.Dense_0.bias[...] = params["Dense_0"]["bias"]
        self.head.kernel[...] = params["head"]["kernel"]

    def __call__(self, x):
        return self.head(jnp.tanh(self.Dense_0(x))).sum(0)


def _nnx_loss(m, b):
    out = jax.vmap(m)(b[0])
    return jnp.sum(_per_example(out)(out, b[1]))


def test_nnx_baselines_match_linen():
    params, batch = _data()
    model = _NNet(params)
    acts = bl.dense_activations(_linen_loss, params, batch)
    nacts = bl.dense_activations(_nnx_loss, nnx.state(model), batch, model=model)
    assert set(nacts) == set(acts)
    for k in acts:
        for u, v in zip(nacts[k], acts[k]):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14, err_msg=k)
    grads = bl.per_example_grads(_linen_loss, params, batch)
    ngrads = bl.per_example_grads(_nnx_loss, nnx.state(model, nnx.Param), batch, model=model)
    np.testing.assert_allclose(ngrads["head"]["kernel"][...], grads["head"]["kernel"], rtol=1e-12)
    for ek in (False, True):
        np.testing.assert_allclose(
            bl.kfac_influence(nacts, nacts, ekfac=ek),
            bl.kfac_influence(acts, acts, ekfac=ek),
            rtol=1e-9,
        )


@pytest.mark.parametrize(
    "name", ["grad_dot", "grad_cosine", "exact_influence", "trak", "representation_similarity"]
)
def test_every_flat_baseline_is_jittable_shaped_and_finite(name):
    rng = np.random.default_rng(4)
    te, tr = jnp.asarray(rng.normal(size=(3, 7))), jnp.asarray(rng.normal(size=(9, 7)))
    fns = {
        "grad_dot": bl.grad_dot,
        "grad_cosine": bl.grad_cosine,
        "exact_influence": bl.exact_influence,
        "trak": lambda a, b: bl.trak(a, b, projection=jnp.eye(7)[:, :5]),
        "representation_similarity": bl.representation_similarity,
    }
    s = jax.jit(fns[name])(te, tr)
    assert s.shape == (3, 9) and s.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(s)))


def test_baselines_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="columns"):
        bl.exact_influence(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="projection"):
        bl.trak(np.ones((2, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="layers differ"):
        bl.block_influence({"a": np.ones((2, 3))}, {"b": np.ones((4, 3))})
