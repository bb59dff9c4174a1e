"""Capture through scanned and vmapped layer stacks (Linen nn.scan/nn.vmap, NNX nnx.scan/nnx.vmap).

References are exact by construction, in float64: vmap(grad) of the stacked kernels projected per
slice, and KFAC sums of activations from a hand-written forward pass of the same network.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf

# Both sides are float64 sums of the same terms in a different order.
RTOL = 1e-6
DIN, D, C, L, T, E = 3, 4, 3, 3, 2, 2
TRACES = {"linen": 0, "nnx": 0}


def xent(logits, y):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        TRACES["linen"] += 1  # trace-time count of the scan body
        return jnp.tanh(nn.Dense(D, name="dense")(x)), None


class ScanNet(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):  # x [b, T, DIN]
        x = nn.Dense(D, name="inp")(x)
        block = nn.remat(Block) if self.remat else Block
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(
            name="blocks"
        )(x, None)
        # An ensemble of E heads under nn.vmap: a stack whose layer is the Dense itself.
        heads = nn.vmap(
            nn.Dense,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=E,
        )(C, name="heads")
        return heads(x.mean(-2)).mean(0)


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        TRACES["nnx"] += 1
        return jnp.tanh(self.dense(x))


class NScanNet(nnx.Module):
    def __init__(self, rngs, remat=False):
        self.inp = nnx.Linear(DIN, D, param_dtype=jnp.float64, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(r):
            return NBlock(r)

        @nnx.split_rngs(splits=E)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def heads(r):
            return nnx.Linear(D, C, param_dtype=jnp.float64, rngs=r)

        self.blocks = blocks(rngs)
        self.heads = heads(rngs)
        self.remat = remat

    def __call__(self, x):
        x = self.inp(x)

        def body(x, block):
            return block(x)

        if self.remat:
            body = nnx.remat(body)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        out = nnx.vmap(lambda h, z: h(z), in_axes=(0, None), out_axes=0)(self.heads, x.mean(-2))
        return out.mean(0)


STACKS = {"blocks/dense": L, "heads": E}
NNX_NAMES = {"inp": "inp", "blocks/dense": "blocks/dense", "heads": "heads"}


def names():
    out = ["inp"]
    for base, n in STACKS.items():
        out += [f"{base}[{j}]" for j in range(n)]
    return out


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(1), (4, T, DIN), jnp.float64)
    batch = {"x": x, "y": jnp.array([0, 1, 2, 1])}
    shapes = jax.eval_shape(ScanNet().init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.6 * rng.normal(size=s.shape)), shapes)
    return params, batch


def linen_loss(remat=False):
    model = ScanNet(remat=remat)
    return lambda p, b: xent(model.apply({"params": p}, b["x"]), b["y"])


def nnx_model(params, remat=False):
    m = NScanNet(nnx.Rngs(0), remat=remat)
    for name in ("inp", "heads"):
        getattr(m, name).kernel[...] = params[name]["kernel"]
        getattr(m, name).bias[...] = params[name]["bias"]
    m.blocks.dense.kernel[...] = params["blocks"]["dense"]["kernel"]
    m.blocks.dense.bias[...] = params["blocks"]["dense"]["bias"]
    return m


def nnx_loss(m, b):
    return xent(m(b["x"]), b["y"])


def reference_grads(params, batch, projs):
    """{name: [b, k_out, k_in]} from vmap(grad) of the stacked kernels, slice by slice."""
    loss = linen_loss()
    full = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(
        params, jax.tree.map(lambda v: v[:, None], batch)
    )
    leaves = {"inp": full["inp"], "blocks/dense": full["blocks"]["dense"], "heads": full["heads"]}
    out = {
        "inp": jaxinf.project_gradient(
            projs["inp"],
            jax.vmap(jaxinf.gradient_matrix)(leaves["inp"]["kernel"], leaves["inp"]["bias"]),
        )
    }
    for base, n in STACKS.items():
        for j in range(n):
            g = jax.vmap(jaxinf.gradient_matrix)(
                leaves[base]["kernel"][:, j], leaves[base]["bias"][:, j]
            )
            out[f"{base}[{j}]"] = jaxinf.project_gradient(projs[f"{base}[{j}]"], g)
    return out


def assert_close(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        scale = np.abs(ref[k]).max()
        assert scale > 0, k
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=RTOL * scale, err_msg=k)


@pytest.fixture(scope="module")
def linen_logra(net):
    params, batch = net
    lg = jaxinf.logra(linen_loss(), params, batch, seed=3, k_in=2, k_out=2, dtype=jnp.float64)
    return lg, reference_grads(params, batch, lg.projections)


def test_each_layer_of_a_linen_stack_is_its_own_layer(linen_logra):
    lg, ref = linen_logra
    assert list(lg.layers) == names()
    spec = lg.layers["blocks/dense[2]"]
    assert spec.stack == ("blocks/dense", 2, L, 0) and (spec.n_in, spec.n_out) == (D + 1, D)
    # Own projection per slice, from the key and the indexed path.
    p0, p1 = lg.projections["blocks/dense[0]"], lg.projections["blocks/dense[1]"]
    assert not np.allclose(p0.p_in, p1.p_in)


def test_linen_scan_and_vmap_match_vmap_grad_of_stacked_kernels(net, linen_logra):
    params, batch = net
    lg, ref = linen_logra
    assert_close(lg.fn(params, batch), ref)


def test_linen_scan_under_remat_matches(net, linen_logra):
    params, batch = net
    lg, ref = linen_logra
    cap = jaxinf.linen_capture(linen_loss(remat=True))
    layers = jaxinf.find_layers(cap, params, batch)
    assert list(layers) == names()
    fn = jaxinf.projected_gradients(cap, lg.projections, layers=layers)
    assert_close(fn(params, batch), ref)


@pytest.mark.parametrize("remat", [False, True])
def test_nnx_scan_and_vmap_match_linen(net, linen_logra, remat):
    params, batch = net
    lg, ref = linen_logra
    model = nnx_model(params, remat=remat)
    cap = jaxinf.nnx_capture(nnx_loss, model)
    state = nnx.state(model)
    layers = jaxinf.find_layers(cap, state, batch)
    assert list(layers) == names()
    assert layers["heads[1]"].stack == ("heads", 1, E, 0)
    fn = jaxinf.projected_gradients(cap, lg.projections, layers=layers)
    assert_close(fn(state, batch), ref)


def test_scan_body_is_traced_as_often_as_without_capture(net, linen_logra):
    params, batch = net
    lg, _ = linen_logra
    fresh = jaxinf.projected_gradients(lg.capture, lg.projections, layers=lg.layers)
    TRACES["linen"] = 0
    jax.jit(jax.vmap(jax.grad(linen_loss()), in_axes=(None, 0))).lower(
        params, jax.tree.map(lambda v: v[:, None], batch)
    )
    plain = TRACES["linen"]
    TRACES["linen"] = 0
    fresh.lower(params, batch)
    assert 0 < TRACES["linen"] == plain < L  # once per trace, not once per layer
    model = nnx_model(params)
    cap = jaxinf.nnx_capture(nnx_loss, model)
    fn = jaxinf.projected_gradients(cap, lg.projections, layers=lg.layers)
    TRACES["nnx"] = 0
    fn.lower(nnx.state(model), batch)
    assert 0 < TRACES["nnx"] < L


def manual_acts(params, batch):
    """{name: (a [b, T', n_in] with bias 1, d [b, T', n_out])} by a hand-written forward pass."""

    def fwd(pert, x, y):
        a = {}
        h = x @ params["inp"]["kernel"] + params["inp"]["bias"] + pert["inp"]
        a["inp"] = x
        for j in range(L):
            a[f"blocks/dense[{j}]"] = h
            k, b = params["blocks"]["dense"]["kernel"][j], params["blocks"]["dense"]["bias"][j]
            h = jnp.tanh(h @ k + b + pert[f"blocks/dense[{j}]"])
        z = h.mean(0)
        outs = []
        for j in range(E):
            a[f"heads[{j}]"] = z[None]
            k, b = params["heads"]["kernel"][j], params["heads"]["bias"][j]
            outs.append(z @ k + b + pert[f"heads[{j}]"][0])
        return xent(jnp.mean(jnp.stack(outs), 0)[None], y[None]), a

    pert = {"inp": jnp.zeros((T, D))}
    pert.update({f"blocks/dense[{j}]": jnp.zeros((T, D)) for j in range(L)})
    pert.update({f"heads[{j}]": jnp.zeros((1, C)) for j in range(E)})
    d, a = jax.vmap(jax.grad(fwd, has_aux=True), in_axes=(None, 0, 0))(pert, batch["x"], batch["y"])
    ones = lambda v: jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,))], -1)  # noqa: E731
    return {k: (ones(a[k]), d[k]) for k in a}


def test_kfac_factors_and_pca_projections_of_stacked_layers(net, linen_logra):
    params, batch = net
    lg, _ = linen_logra
    acts = manual_acts(params, batch)
    model = nnx_model(params)
    ncap = jaxinf.nnx_capture(nnx_loss, model)
    for cap, p in ((lg.capture, params), (ncap, nnx.state(model))):
        acc = jaxinf.kfac_factors(cap, lg.layers, dtype=jnp.float64)
        factors = acc.finalize(acc.update(acc.init(), (p, batch)))
        assert sorted(factors) == sorted(names())
        for k, (a, d) in acts.items():
            n = a.shape[0] * a.shape[1]
            np.testing.assert_allclose(
                factors[k].forward, jnp.einsum("bti,btj->ij", a, a) / n, rtol=RTOL, err_msg=k
            )
            np.testing.assert_allclose(
                factors[k].backward, jnp.einsum("bti,btj->ij", d, d) / n, rtol=RTOL, err_msg=k
            )
    # The KFAC baselines' activations of stacked layers are the same per-slice a and d.
    got = jaxinf.dense_activations(nnx_loss, nnx.state(model), batch, model=model)
    assert sorted(got) == sorted(acts)
    for k, (a, d) in acts.items():
        np.testing.assert_allclose(got[k][0], a.reshape(got[k][0].shape), rtol=RTOL, err_msg=k)
        np.testing.assert_allclose(got[k][1], d.reshape(got[k][1].shape), rtol=RTOL, err_msg=k)
    pca = jaxinf.pca_projections(factors, k_in=2, k_out=2, dtype=jnp.float64)
    fn = jaxinf.projected_gradients(lg.capture, pca, layers=lg.layers)
    assert_close(fn(params, batch), reference_grads(params, batch, pca))


def test_stacked_layers_need_per_layer_entries(net, linen_logra):
    params, batch = net
    lg, _ = linen_logra
    cap = lg.capture
    projs = dict(lg.projections)
    shared = projs.pop("blocks/dense[0]")
    with pytest.raises(ValueError, match="'blocks/dense'.*indices \\[1, 2\\].*3 layers"):
        jaxinf.projected_gradients(cap, projs, layers=None)
    projs = {k: v for k, v in projs.items() if not k.startswith("blocks/dense[")}
    projs["blocks/dense"] = shared  # one projection for the whole stack: refused
    with pytest.raises(
        ValueError, match="'blocks/dense' is a stack of 3 layers.*'blocks/dense\\[0\\]'"
    ):
        jaxinf.projected_gradients(cap, projs)(params, batch)
    with pytest.raises(ValueError, match="'blocks/dense' is a stack of 3 layers and the selection"):
        jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(pattern=r"blocks/dense\[0\]"))
    sel = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(pattern=r"blocks/.*"))
    assert list(sel) == [f"blocks/dense[{j}]" for j in range(L)]
