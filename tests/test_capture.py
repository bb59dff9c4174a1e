"""jaxinf capture + LoGra projection, checked in float64 against vmap(grad) references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf

# Both sides are float64 computations of the same sums in a different order: agreement to
# rounding; 1e-6 relative leaves ample margin while catching any wrong term.
RTOL = 1e-6


def f64(tree):
    return jax.tree.map(
        lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree
    )


def init_params(model, *args, seed=0):
    """float64 N(0, 0.5^2) parameters of the model's shapes (cheaper than tracing model.init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape)), shapes)


def per_example_grads(loss_fn, params, batch):
    """Full per-example parameter gradients by vmap(grad) over batches of one example."""
    fn = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))  # jit: eager op-by-op is slow
    return fn(params, jax.tree.map(lambda v: v[:, None], batch))


def assert_matches_full(got, projs, full_grads_by_layer):
    for path, (kernel, bias) in full_grads_by_layer.items():
        if bias is None:
            g = jax.vmap(lambda k: k.reshape(-1, projs[path].p_out.shape[1]))(kernel)
        else:
            g = jax.vmap(jaxinf.gradient_matrix)(kernel, bias)
        ref = jax.jit(jaxinf.project_gradient)(projs[path], g)
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
    params = init_params(model, x)

    def loss_fn(p, b):
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    return model, params, batch, loss_fn


def test_mlp_projected_gradients_match_full_per_example_gradients(mlp):
    _, params, batch, loss_fn = mlp
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    assert list(layers) == ["Dense_0", "head"]
    assert (layers["Dense_0"].n_in, layers["Dense_0"].n_out, layers["Dense_0"].bias) == (7, 5, True)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(0), k_in=3, k_out=2, dtype=jnp.float64
    )
    got = jaxinf.projected_gradients(cap, projs)(params, batch)
    full = per_example_grads(loss_fn, params, batch)
    assert_matches_full(got, projs, {p: (full[p]["kernel"], full[p]["bias"]) for p in layers})
    # The one-call entry point builds the same thing from an integer seed.
    lg = jaxinf.logra(loss_fn, params, batch, seed=0, k_in=3, k_out=2, dtype=jnp.float64)
    assert lg.metadata == jaxinf.projection_metadata(projs, init="random", seed=0)
    np.testing.assert_array_equal(lg.fn(params, batch)["head"], got["head"])


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
    only_head = jaxinf.random_projections(
        {"head": layers["head"]}, key=jax.random.key(0), k_in=3, k_out=2
    )
    np.testing.assert_array_equal(only_head["head"].p_in, p0["head"].p_in)


# --------------------------------------------------------------------------------------------
# CNN (Linen): convolutions as patches, with and without bias, strides and dilation


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.tanh(
            nn.Conv(
                3,
                (2, 2),
                strides=2,
                kernel_dilation=(1, 2),
                padding="VALID",
                use_bias=False,
                name="conv2",
            )(x)
        )
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def cnn():
    """The Linen CNN, its data and one compiled extraction (shared with the NNX parity test)."""
    model = CNN()
    x = jax.random.normal(jax.random.key(2), (3, 6, 6, 2), jnp.float64)
    batch = {"x": x, "y": jnp.array([0, 2, 1])}
    params = init_params(model, x)

    def loss_fn(p, b):
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(3), k_in=3, k_out=2, dtype=jnp.float64
    )
    return (
        params,
        batch,
        loss_fn,
        cap,
        layers,
        projs,
        jaxinf.projected_gradients(cap, projs)(params, batch),
    )


def test_cnn_projected_gradients_match_full_per_example_gradients(cnn):
    params, batch, loss_fn, cap, layers, projs, got = cnn
    convs = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("conv",)))
    assert list(convs) == ["conv1", "conv2"]
    assert (convs["conv1"].n_in, convs["conv1"].tokens) == (3 * 3 * 2 + 1, 36)
    assert (convs["conv2"].n_in, convs["conv2"].bias) == (2 * 2 * 4, False)
    full = per_example_grads(loss_fn, params, batch)
    assert_matches_full(
        got,
        projs,
        {
            "conv1": (full["conv1"]["kernel"], full["conv1"]["bias"]),
            "conv2": (full["conv2"]["kernel"], None),
            "head": (full["head"]["kernel"], full["head"]["bias"]),
        },
    )


# --------------------------------------------------------------------------------------------
# A small transformer LM with a padding mask, in Linen and in NNX with the same weights

V, D, H, T = 11, 8, 2, 5


def attention(q, k, v, mask):
    """Causal attention with key padding; q, k, v: [b, T, H, Dh], mask: [b, T]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
    w = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(V, D, name="tok")(ids) + nn.Embed(T, D, name="pos")(jnp.arange(ids.shape[1]))
        q, k, v = (nn.DenseGeneral((H, D // H), name=n)(x) for n in ("query", "key", "value"))
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(attention(q, k, v, mask))
        x = x + nn.Dense(D, name="mlp")(nn.tanh(x))
        return nn.Dense(V, name="head")(x)


class NNXLM(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(V, D, param_dtype=jnp.float64, rngs=rngs)
        self.pos = nnx.Embed(T, D, param_dtype=jnp.float64, rngs=rngs)
        self.query, self.key, self.value = (
            nnx.LinearGeneral(D, (H, D // H), param_dtype=jnp.float64, rngs=rngs) for _ in range(3)
        )
        self.out = nnx.LinearGeneral(
            (H, D // H), D, axis=(-2, -1), param_dtype=jnp.float64, rngs=rngs
        )
        self.mlp = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(D, V, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, ids, mask):
        x = self.tok(ids) + self.pos(jnp.arange(ids.shape[1]))
        q, k, v = self.query(x), self.key(x), self.value(x)
        x = x + self.out(attention(q, k, v, mask))
        x = x + self.mlp(jnp.tanh(x))
        return self.head(x)


def lm_loss(logits, b):
    """Next-token cross-entropy summed over real (unpadded) positions."""
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), b["ids"][:, 1:, None], -1)[..., 0]
    return -jnp.sum(lp * b["mask"][:, 1:])


@pytest.fixture(scope="module")
def lm():
    ids = jax.random.randint(jax.random.key(4), (3, T), 0, V)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float64)
    batch = {"ids": ids, "mask": mask}
    model = LinenLM()
    params = init_params(model, ids, mask, seed=5)

    def loss_fn(p, b):
        return lm_loss(model.apply({"params": p}, b["ids"], b["mask"]), b)

    return params, batch, loss_fn


@pytest.fixture(scope="module")
def lm_logra(lm):
    """One compiled Linen extraction (with losses) shared by the LM tests."""
    params, batch, loss_fn = lm
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(6), k_in=4, k_out=3, dtype=jnp.float64
    )
    fn = jaxinf.projected_gradients(cap, projs, mask_fn=lambda b: b["mask"], with_loss=True)
    losses, got = fn(params, batch)
    return cap, layers, projs, losses, got


def test_transformer_with_padding_mask_matches_full_per_example_gradients(lm, lm_logra):
    params, batch, loss_fn = lm
    cap, layers, projs, _, got = lm_logra
    assert list(layers) == ["tok", "pos", "query", "key", "value", "out", "mlp", "head"]
    assert (layers["tok"].n_in, layers["tok"].n_out, layers["tok"].bias) == (V, D, False)
    assert (layers["out"].n_in, layers["out"].n_out) == (D + 1, D)
    assert (layers["query"].n_out, layers["query"].tokens) == (D, T)
    full = per_example_grads(loss_fn, params, batch)
    assert_matches_full(
        got,
        projs,
        {
            p: (full[p]["embedding"], None)
            if p in ("tok", "pos")
            else (full[p]["kernel"], full[p]["bias"])
            for p in layers
        },
    )


def copy_linen_to_nnx(params, model):
    for name, leaves in params.items():
        layer = getattr(model, name)
        for leaf, value in leaves.items():
            getattr(layer, leaf)[...] = value


def test_linen_and_nnx_give_the_same_projected_gradients(lm, lm_logra):
    params, batch, loss_fn = lm
    _, layers_l, projs, _, got_l = lm_logra
    model = NNXLM(nnx.Rngs(0))
    copy_linen_to_nnx(params, model)
    state = nnx.state(model)

    def nnx_loss(m, b):
        return lm_loss(m(b["ids"], b["mask"]), b)

    cap_n = jaxinf.nnx_capture(nnx_loss, model)
    layers_n = jaxinf.find_layers(cap_n, state, batch)
    assert list(layers_n) == list(layers_l)
    for p in layers_l:
        assert (layers_l[p].n_in, layers_l[p].n_out, layers_l[p].kind) == (
            layers_n[p].n_in,
            layers_n[p].n_out,
            layers_n[p].kind,
        ), p
    got_n = jaxinf.projected_gradients(cap_n, projs, mask_fn=lambda b: b["mask"])(state, batch)
    for p in layers_l:
        # Same float64 operations in both frameworks up to op order.
        np.testing.assert_allclose(
            got_n[p], got_l[p], rtol=0, atol=1e-10 * np.abs(got_l[p]).max(), err_msg=p
        )
    # The user's NNX model is left untouched (no wrappers leaked into it).
    assert type(model.query) is nnx.LinearGeneral


def test_kfac_factors_are_token_normalised_under_masks(lm):
    params, batch, loss_fn = lm
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(pattern="mlp|tok|pos"))
    acc = jaxinf.kfac_factors(cap, layers, mask_fn=lambda b: b["mask"], dtype=jnp.float64)
    fac = acc.finalize(acc.update(acc.init(), (params, batch)))
    m = np.asarray(batch["mask"]).astype(bool)
    n_real = m.sum()
    for p in layers:
        assert fac[p].tokens == n_real, p
    # Embedding inputs are one-hots: C_F is the diagonal of (masked) token-id frequencies.
    ids = np.asarray(batch["ids"])[m]
    np.testing.assert_allclose(np.diag(fac["tok"].forward), np.bincount(ids, minlength=V) / n_real)
    pos = np.nonzero(m)[1]
    np.testing.assert_allclose(np.diag(fac["pos"].forward), np.bincount(pos, minlength=T) / n_real)

    # Backward factor of `mlp`: d_t = dloss/d(mlp output) = dloss/d(residual stream), the same as
    # the gradient w.r.t. the head input; get it from a vjp with a zero perturbation there.
    def d_of(example):
        def f(eps):
            def icpt(next_fun, args, kwargs, ctx):
                y = next_fun(*args, **kwargs)
                return y + eps if ctx.module.path == ("mlp",) else y

            with nn.intercept_methods(icpt):
                return loss_fn(params, jax.tree.map(lambda v: v[None], example))

        return jax.grad(f)(jnp.zeros((1, T, D)))[0]

    d = jax.jit(jax.vmap(d_of))(batch)[m]  # [real tokens, D]
    np.testing.assert_allclose(fac["mlp"].backward, d.T @ d / n_real, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# PCA initialisation


def test_pca_projections_are_top_eigenvectors_of_kfac_factors(mlp):
    model, params, _, loss_fn = mlp
    x = jax.random.normal(jax.random.key(8), (16, 6), jnp.float64)
    batch = {"x": x, "y": jnp.arange(16) % 3}
    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    acc = jaxinf.kfac_factors(cap, layers, dtype=jnp.float64)
    fac = acc.finalize(acc.update(acc.init(), (params, batch)))
    projs = jaxinf.pca_projections(fac, k_in=3, k_out=2, dtype=jnp.float64)
    for p in layers:
        for got, cov, k in (
            (projs[p].p_in, fac[p].forward, 3),
            (projs[p].p_out, fac[p].backward, 2),
        ):
            w, v = np.linalg.eigh(np.asarray(cov))
            ref = v[:, ::-1][:, :k].T
            assert np.all(
                np.diff(w[::-1][: k + 1]) < -1e-8
            )  # distinct eigenvalues: unique up to sign
            # Up to sign: |<got_i, ref_i>| = 1 for unit vectors.
            np.testing.assert_allclose(np.abs(np.sum(got * ref, axis=1)), 1.0, rtol=1e-8)
            np.testing.assert_allclose(got @ got.T, np.eye(k), atol=1e-10)
    meta = jaxinf.projection_metadata(projs, init="pca")
    assert meta["init"] == "pca" and meta["seed"] is None


# --------------------------------------------------------------------------------------------
# Capture is transparent and compiles once


def test_capture_does_not_change_loss_or_parameter_gradients(lm, lm_logra):
    from jaxinf._src.layers import _config, _project_inputs
    from jaxinf._src.taps import _logra_tap

    params, batch, loss_fn = lm
    cap, _, projs, losses, _ = lm_logra

    def tapped_loss(p):
        def tap(path, module, x, y, stacked=None, stack=None):
            cfg = _config(path, module, x, y)
            pa = _project_inputs(cfg, x, projs[path].p_in)
            b = jnp.zeros((projs[path].p_out.shape[0], pa.shape[1]))
            return _logra_tap(y, pa, b, projs[path].p_out)

        return cap.run(p, batch, tap)

    both = jax.jit(
        lambda p: (jax.value_and_grad(loss_fn)(p, batch), jax.value_and_grad(tapped_loss)(p))
    )
    (l0, g0), (l1, g1) = both(params)
    assert l1 == l0  # exactly: the tap is the identity on the forward pass
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), g1, g0)
    # The per-example losses returned beside the projected gradients are the plain ones.
    per_ex = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))(
        params, jax.tree.map(lambda v: v[:, None], batch)
    )
    np.testing.assert_allclose(losses, per_ex, rtol=1e-12)


def test_no_retracing_across_batches_of_the_same_shape(mlp):
    model, params, batch, _ = mlp
    traces = []

    def loss_fn(p, b):
        traces.append(1)  # Python side effect: runs once per trace, never per call
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    cap = jaxinf.linen_capture(loss_fn)
    layers = jaxinf.find_layers(cap, params, batch)
    traces.clear()
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(0), k_in=2, k_out=2, dtype=jnp.float64
    )
    fn = jaxinf.projected_gradients(cap, projs)
    out0 = fn(params, batch)
    n = len(traces)
    batch2 = {"x": batch["x"] + 1.0, "y": batch["y"][::-1]}
    out1 = fn(params, batch2)
    fn(f64(jax.tree.map(lambda v: v * 2, params)), batch2)
    assert len(traces) == n
    assert not np.allclose(out0["head"], out1["head"])


# --------------------------------------------------------------------------------------------
# Errors name the layer or rule


def test_errors_name_the_layer_or_rule(mlp):
    _, params, batch, loss_fn = mlp
    cap = jaxinf.linen_capture(loss_fn)
    with pytest.raises(ValueError, match="'head' is selected twice"):
        jaxinf.find_layers(
            cap,
            params,
            batch,
            select=[jaxinf.Select(types=(nn.Dense,)), jaxinf.Select(pattern="he.*")],
        )
    with pytest.raises(ValueError, match="matches no layer"):
        jaxinf.find_layers(
            cap,
            params,
            batch,
            select=[jaxinf.Select(pattern="Dense_0"), jaxinf.Select(pattern="nope")],
        )
    with pytest.raises(ValueError, match="matches no layer"):
        jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=(nn.Conv,)))
    layers = jaxinf.find_layers(cap, params, batch)
    # Sizes larger than a layer are clipped to it by default; clip_k=False keeps the error.
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=8, k_out=4)
    assert projs["Dense_0"].p_in.shape == (7, 7) and projs["Dense_0"].p_out.shape == (4, 5)
    assert projs["head"].p_in.shape == (6, 6) and projs["head"].p_out.shape == (3, 3)
    with pytest.raises(
        ValueError, match="'Dense_0'.*k_in=8 is larger than the layer's input size 7"
    ):
        jaxinf.random_projections(layers, key=jax.random.key(0), k_in=8, k_out=2, clip_k=False)
    with pytest.raises(
        ValueError, match="'head'.*k_out=4 is larger than the layer's output size 3"
    ):
        jaxinf.random_projections(layers, key=jax.random.key(0), k_in=2, k_out=4, clip_k=False)
    factors = {
        "head": jaxinf.KFACFactors(jnp.eye(6), jnp.eye(3), jnp.asarray(1.0)),
    }
    assert jaxinf.pca_projections(factors, k_in=9, k_out=9)["head"].p_out.shape == (3, 3)
    with pytest.raises(ValueError, match="'head'.*k_in=9 is larger"):
        jaxinf.pca_projections(factors, k_in=9, k_out=9, clip_k=False)
    # Per-rule sizes override the defaults, and are checked the same way.
    sel = [jaxinf.Select(pattern="Dense_0", k_in=7, k_out=5), jaxinf.Select(pattern="head")]
    layers = jaxinf.find_layers(cap, params, batch, select=sel)
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=2, k_out=2)
    assert projs["Dense_0"].p_in.shape == (7, 7) and projs["head"].p_in.shape == (2, 6)
    bad = dict(projs, ghost=projs["head"])
    with pytest.raises(ValueError, match="never called by the loss: \\['ghost'\\]"):
        jaxinf.projected_gradients(cap, bad)(params, batch)
    wrong = {"head": projs["Dense_0"]}
    with pytest.raises(ValueError, match="'head'"):
        jaxinf.projected_gradients(cap, wrong)(params, batch)


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        f = dict(param_dtype=jnp.float64, rngs=rngs)
        self.conv1 = nnx.Conv(2, 4, (3, 3), padding="SAME", **f)
        self.conv2 = nnx.Conv(
            4, 3, (2, 2), strides=2, kernel_dilation=(1, 2), padding="VALID", use_bias=False, **f
        )
        self.head = nnx.Linear(3, 3, **f)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jnp.tanh(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


def test_nnx_cnn_matches_linen_cnn(cnn):
    params, batch, _, _, layers_l, projs, got_l = cnn
    model = NNXCNN(nnx.Rngs(0))
    copy_linen_to_nnx(params, model)
    cap_n = jaxinf.nnx_capture(lambda m, b: xent(m(b["x"]), b["y"]), model)
    layers = jaxinf.find_layers(cap_n, nnx.state(model), batch)
    assert [(p, s.kind, s.n_in) for p, s in layers.items()] == [
        ("conv1", "conv", 19),
        ("conv2", "conv", 16),
        ("head", "dense", 4),
    ]
    got_n = jaxinf.projected_gradients(cap_n, projs)(nnx.state(model), batch)
    for p in layers:
        # Same float64 operations in both frameworks up to op order.
        np.testing.assert_allclose(
            got_n[p], got_l[p], rtol=0, atol=1e-10 * np.abs(got_l[p]).max(), err_msg=p
        )


class RematMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(MLP)(name="inner")(x)  # a lifted transform around tapped layers
        shared = nn.Dense(3, name="shared")  # called twice: its gradient is the sum of both calls
        return nn.Dense(2, name="top")(shared(jnp.tanh(shared(x))))


def test_layers_inside_nn_remat_and_shared_layers_are_captured():
    model = RematMLP()
    x = jax.random.normal(jax.random.key(11), (3, 6), jnp.float64)
    batch = {"x": x, "y": jnp.array([0, 1, 1])}
    params = init_params(model, x, seed=11)

    def loss_fn(p, b):
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    lg = jaxinf.logra(loss_fn, params, batch, seed=1, k_in=2, k_out=2, dtype=jnp.float64)
    assert list(lg.layers) == ["inner/Dense_0", "inner/head", "shared", "top"]
    full = per_example_grads(loss_fn, params, batch)
    leaves = {
        "inner/Dense_0": full["inner"]["Dense_0"],
        "inner/head": full["inner"]["head"],
        "shared": full["shared"],
        "top": full["top"],
    }
    assert_matches_full(
        lg.fn(params, batch),
        lg.projections,
        {p: (g["kernel"], g["bias"]) for p, g in leaves.items()},
    )


# --------------------------------------------------------------------------------------------
# Einsum layers of dense-projection form (Linen and NNX); other equations are never silent

ED, EH, EK, EO, ET = 4, 2, 3, 3, 3


class LinenEinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [b, ET, ED]
        h = jnp.tanh(nn.Einsum((ED, EH, EK), "btd,dhk->bthk", name="qkv")(x))  # bias [EH, EK]
        # Per-head kernel axis h is an input, kernel and output axis: not a dense projection.
        h = jnp.tanh(
            h + nn.Einsum((EH, EK, EK), "bthk,hkj->bthj", use_bias=False, name="per_head")(h)
        )
        z = nn.Einsum((EH, EK, ED), use_bias=False, name="merge")(
            h, "...hk,hkd->...d"
        )  # at call time
        z = jnp.tanh(z + x)
        # Kernel [o, d] (contracted axis last) and feature axis between token axes in the output.
        return nn.Einsum((EO, ED), "btd,od->bot", name="head")(z).mean(-1)


class NNXEinsumNet(nnx.Module):
    def __init__(self, rngs):
        f = dict(param_dtype=jnp.float64, rngs=rngs)
        self.qkv = nnx.Einsum("btd,dhk->bthk", (ED, EH, EK), (EH, EK), **f)
        self.per_head = nnx.Einsum("bthk,hkj->bthj", (EH, EK, EK), **f)
        self.merge = nnx.Einsum("bthk,hkd->btd", (EH, EK, ED), **f)
        self.head = nnx.Einsum("btd,od->bot", (EO, ED), (EO,), **f)

    def __call__(self, x):
        h = jnp.tanh(self.qkv(x))
        h = jnp.tanh(h + self.per_head(h))
        z = jnp.tanh(self.merge(h, "...hk,hkd->...d") + x)
        return self.head(z).mean(-1)


@pytest.fixture(scope="module")
def einsum_net():
    model = LinenEinsumNet()
    x = jax.random.normal(jax.random.key(12), (3, ET, ED), jnp.float64)
    batch = {"x": x, "y": jnp.array([0, 2, 1])}
    params = init_params(model, x, seed=12)

    def loss_fn(p, b):
        return xent(model.apply({"params": p}, b["x"]), b["y"])

    return params, batch, loss_fn


def test_einsum_layers_match_full_per_example_gradients(einsum_net):
    params, batch, loss_fn = einsum_net
    cap = jaxinf.linen_capture(loss_fn)
    # Default selection: the per-head einsum is skipped, with a warning naming it.
    with pytest.warns(jaxinf.UncapturedLayerWarning, match="'per_head'.*per-group"):
        layers = jaxinf.find_layers(cap, params, batch)
    assert list(layers) == ["qkv", "merge", "head"]
    assert [(s.kind, s.n_in, s.n_out, s.bias, s.tokens) for s in layers.values()] == [
        ("dense", ED + 1, EH * EK, True, ET),
        ("dense", EH * EK, ED, False, ET),
        ("dense", ED + 1, EO, True, ET),
    ]
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(13), k_in=3, k_out=2, dtype=jnp.float64
    )
    got = jaxinf.projected_gradients(cap, projs)(params, batch)
    full = per_example_grads(loss_fn, params, batch)
    # G = kernel gradient with (contracted axes in kernel order, feature axes in output order).
    assert_matches_full(
        got,
        projs,
        {
            "qkv": (full["qkv"]["kernel"], full["qkv"]["bias"]),
            "merge": (full["merge"]["kernel"], None),
            "head": (jnp.swapaxes(full["head"]["kernel"], 1, 2), full["head"]["bias"]),
        },
    )
    # KFAC statistics go through the same (transposed) output layout.
    acc = jaxinf.kfac_factors(cap, layers, dtype=jnp.float64)
    fac = acc.finalize(acc.update(acc.init(), (params, batch)))
    assert fac["head"].backward.shape == (EO, EO) and fac["head"].tokens == 3 * ET
    # An explicit rule that matches the unsupported einsum raises, naming it.
    with pytest.raises(ValueError, match="'per_head'.*per-group"):
        jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=(nn.Einsum,)))


def test_nnx_einsum_matches_linen_einsum(einsum_net):
    params, batch, loss_fn = einsum_net
    cap_l = jaxinf.linen_capture(loss_fn)
    sel = jaxinf.Select(pattern="qkv|merge|head")
    layers = jaxinf.find_layers(cap_l, params, batch, select=sel)
    projs = jaxinf.random_projections(
        layers, key=jax.random.key(14), k_in=3, k_out=2, dtype=jnp.float64
    )
    got_l = jaxinf.projected_gradients(cap_l, projs)(params, batch)
    model = NNXEinsumNet(nnx.Rngs(0))
    copy_linen_to_nnx(params, model)
    cap_n = jaxinf.nnx_capture(lambda m, b: xent(m(b["x"]), b["y"]), model)
    with pytest.warns(jaxinf.UncapturedLayerWarning, match="'per_head'"):
        layers_n = jaxinf.find_layers(cap_n, nnx.state(model), batch)
    assert [(p, s.n_in, s.n_out) for p, s in layers_n.items()] == [
        (p, s.n_in, s.n_out) for p, s in layers.items()
    ]
    got_n = jaxinf.projected_gradients(cap_n, projs)(nnx.state(model), batch)
    for p in layers:
        np.testing.assert_allclose(
            got_n[p], got_l[p], rtol=0, atol=1e-10 * np.abs(got_l[p]).max(), err_msg=p
        )


class LinenTied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(V, D, name="tok")
        return emb.attend(nn.Dense(D, name="mlp")(emb(ids)))


class NNXTied(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(V, D, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        return self.tok.attend(self.mlp(self.tok(ids)))


def test_embed_attend_is_its_own_layer_without_warning():
    # Exactness of the read-out's projected gradient: tests/test_capture_attend.py.
    import warnings

    ids = jnp.zeros((2, T), jnp.int32)
    batch = {"ids": ids, "mask": jnp.ones((2, T))}
    model = LinenTied()
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    cap = jaxinf.linen_capture(lambda p, b: lm_loss(model.apply({"params": p}, b["ids"]), b))
    nmodel = NNXTied(nnx.Rngs(0))
    cap_n = jaxinf.nnx_capture(lambda m, b: lm_loss(m(b["ids"]), b), nmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(jaxinf.find_layers(cap, params, batch)) == ["tok", "mlp", "tok.attend"]
        layers_n = jaxinf.find_layers(cap_n, nnx.state(nmodel), batch)
        assert list(layers_n) == ["tok", "mlp", "tok.attend"]
    assert (layers_n["tok.attend"].n_in, layers_n["tok.attend"].n_out) == (D, V)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(6, 5, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(5, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.l0(x)))


def test_nnx_no_retracing_across_batches_of_the_same_shape(mlp):
    _, _, batch, _ = mlp
    model = NNXMLP(nnx.Rngs(0))
    traces = []

    def loss_fn(m, b):
        traces.append(1)  # Python side effect: runs once per trace, never per call
        return xent(m(b["x"]), b["y"])

    state = nnx.state(model)
    lg = jaxinf.logra(
        loss_fn, state, batch, model=model, seed=0, k_in=2, k_out=2, dtype=jnp.float64
    )
    out0 = lg.fn(state, batch)
    n = len(traces)
    batch2 = {"x": batch["x"] + 1.0, "y": batch["y"][::-1]}
    out1 = lg.fn(state, batch2)
    state2 = jax.tree.map(lambda v: v * 2, state)  # new parameter values, same shapes
    out2 = lg.fn(state2, batch2)
    assert len(traces) == n
    assert not np.allclose(out0["head"], out1["head"])
    assert not np.allclose(out1["head"], out2["head"])


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(6, name="dense")(c)), None


class ScannedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)


def test_layers_inside_nn_scan_are_listed_per_layer(mlp):
    # Numerical checks of stacked layers: tests/test_capture_scan.py.
    _, _, batch, _ = mlp
    model = ScannedMLP()
    params = jax.eval_shape(model.init, jax.random.key(0), batch["x"])["params"]
    cap = jaxinf.linen_capture(lambda p, b: xent(model.apply({"params": p}, b["x"]), b["y"]))
    assert list(jaxinf.find_layers(cap, params, batch)) == [
        "blocks/dense[0]",
        "blocks/dense[1]",
        "head",
    ]
    # A bare layer applied as the model is still captured.
    dense = nn.Dense(3)
    cap = jaxinf.linen_capture(lambda p, b: xent(dense.apply({"params": p}, b["x"]), b["y"]))
    p = jax.eval_shape(dense.init, jax.random.key(0), batch["x"])["params"]
    assert list(jaxinf.find_layers(cap, p, batch)) == [""]


def test_unsupported_configurations_warn_by_default_and_raise_when_selected():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3,), feature_group_count=2, name="grouped")(x)
            return nn.Dense(3, name="head")(x.mean(1))

    model = Grouped()
    x = jnp.zeros((2, 5, 4))
    batch = {"x": x, "y": jnp.array([0, 1])}
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    cap = jaxinf.linen_capture(lambda p, b: xent(model.apply({"params": p}, b["x"]), b["y"]))
    with pytest.warns(
        jaxinf.UncapturedLayerWarning, match="'grouped' \\(Conv\\).*feature_group_count"
    ):
        assert list(jaxinf.find_layers(cap, params, batch)) == ["head"]
    with pytest.raises(ValueError, match="'grouped'.*feature_group_count"):
        jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("conv",)))
