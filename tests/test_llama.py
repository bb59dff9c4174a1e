"""The Llama-style LM example (NNX, blocks under nnx.scan): exact capture, log + query, 134M trace.

The capture reference is exact by construction, in float64: ``vmap(grad)`` of the loss, the
stacked kernels sliced per layer of the stack and projected by ``(P_out ⊗ P_in)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinf
from jaxinf.examples import (
    Llama,
    generate_bytes,
    llama_config,
    llama_loss,
    pydoc_byte_batch,
    token_mask,
    train_llama,
)

# Both sides are float64 sums of the same terms in a different order.
RTOL = 1e-6


def leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree[...] if isinstance(tree, nnx.Variable) else tree


def test_capture_of_the_scanned_lm_equals_projected_vmap_grad():
    cfg = llama_config("tiny", dtype="float64", param_dtype="float64")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    mask = jnp.asarray((np.arange(cfg.seq)[None] < np.array([[6], [4], [5]])).astype(np.int32))
    batch = {"ids": jnp.asarray(rng.integers(0, cfg.vocab, (3, cfg.seq))) * mask, "mask": mask}
    select = jaxinf.Select(types=(nnx.Linear,))  # the 7 linears per block and the head
    lg = jaxinf.logra(
        llama_loss,
        nnx.state(model),
        batch,
        model=model,
        seed=0,
        k_in=3,
        k_out=2,
        select=select,
        mask_fn=token_mask,
        dtype=jnp.float64,
    )
    names = [f"blocks/{m}[{j}]" for m in ("attn/q", "attn/k", "attn/v", "attn/o") for j in (0, 1)]
    names += [f"blocks/mlp/{m}[{j}]" for m in ("gate", "up", "down") for j in (0, 1)]
    assert sorted(lg.layers) == sorted(names + ["head"])
    got = lg.fn(nnx.state(model), batch)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def example_loss(p, ex):
        return llama_loss(nnx.merge(graphdef, p, rest), jax.tree.map(lambda v: v[None], ex))

    full = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))(params, batch)
    for name, g in got.items():
        base, j = (name[:-3], int(name[-2])) if name.endswith("]") else (name, None)
        kernel = leaf(full, base + "/kernel")
        kernel = kernel if j is None else kernel[:, j]
        ref = jaxinf.project_gradient(
            lg.projections[name], jax.vmap(jaxinf.gradient_matrix)(kernel)
        )
        scale = float(jnp.abs(ref).max())
        assert scale > 0, name
        np.testing.assert_allclose(g, ref, rtol=0, atol=RTOL * scale, err_msg=name)


def test_log_and_query_the_top_paragraphs_behind_a_continuation(tmp_path):
    cfg = llama_config("small", width=32, mlp=64, seq=48)
    data, texts = pydoc_byte_batch(cfg.seq, limit=96)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    losses = train_llama(model, data, steps=15, batch_size=16)
    assert losses[-1] < losses[0]
    prompt = texts[3][:20].encode()
    cont = generate_bytes(model, prompt, 8)
    assert cont.startswith(prompt) and len(cont) == 28

    state = nnx.state(model)
    cap = jaxinf.nnx_capture(llama_loss, model)
    layers = jaxinf.find_layers(cap, state, data, select=jaxinf.Select(types=(nnx.Linear,)))
    kfac = jaxinf.kfac_factors(cap, layers, mask_fn=token_mask)
    ks = kfac.init()
    for s in range(0, 96, 32):
        ks = kfac.update(ks, (state, jax.tree.map(lambda v: v[s : s + 32], data)))
    pca = jaxinf.pca_projections(kfac.finalize(ks), k_in=4, k_out=4)
    rand = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=4, k_out=4)
    ids = np.zeros((1, cfg.seq), np.int32)
    ids[0, : len(cont)] = np.frombuffer(cont, np.uint8)
    test = {"ids": jnp.asarray(ids), "mask": jnp.asarray((ids > 0).astype(np.int32))}
    test["mask"] = test["mask"].at[0, : len(cont)].set(1)
    for init, projs in (("pca", pca), ("random", rand)):
        fn = jaxinf.projected_gradients(cap, projs, layers=layers, mask_fn=token_mask)
        meta = jaxinf.projection_metadata(projs, init=init, seed=0)
        path = str(tmp_path / init)
        with jaxinf.LogWriter(path, meta) as w:
            for s in range(0, 96, 32):
                w.write_async(
                    fn(state, jax.tree.map(lambda v: v[s : s + 32], data)), ids=range(s, s + 32)
                )
        res = jaxinf.query(path, fn(state, test), meta, mode="relatif", top_k=5, progress=False)
        top = np.asarray(res.top_ids[0]).astype(int)
        assert top.shape == (5,) and len(set(top.tolist())) == 5
        assert ((0 <= top) & (top < 96)).all(), top
        assert np.isfinite(np.asarray(res.top_scores)).all()


def test_134m_config_traces_and_compiles_with_abstract_shapes():
    cfg = llama_config("134m", dtype="bfloat16")
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert 133e6 < n_params < 135e6, n_params
    batch = {"ids": jnp.zeros((8, cfg.seq), jnp.int32), "mask": jnp.ones((8, cfg.seq), jnp.int32)}
    cap = jaxinf.nnx_capture(llama_loss, model)
    layers = jaxinf.find_layers(cap, state, batch, select=jaxinf.Select(types=(nnx.Linear,)))
    assert len(layers) == 85  # 12 x (q, k, v, o, gate, up, down) + head
    projs = jaxinf.random_projections(layers, key=jax.random.key(0), k_in=64, k_out=64)
    fn = jaxinf.projected_gradients(cap, projs, layers=layers, mask_fn=token_mask)
    out = jax.eval_shape(fn.jitted, state, batch, projs)
    assert out["blocks/attn/q[11]"].shape == (8, 64, 64) and out["head"].shape == (8, 64, 64)
    compiled = fn.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    assert mem is None or mem.argument_size_in_bytes > 4 * 133e6 * 0.99
