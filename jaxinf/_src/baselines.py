"""Attribution baselines, all returning a score matrix ``[n_test, n_train]``.

Every function here maps test and train gradients (or features) to scores where a larger entry
means the training example helps the test example more (lowers its loss). They are small-model
references for LoGra (thesis 4.4.1): gradient dot product and cosine, TRAK-style dense Gaussian
projection of the full gradient, influence with the exact damped empirical Fisher, KFAC and EKFAC
influence, and representation similarity.

Influence with curvature ``F`` (empirical Fisher) and damping ``lambda`` is
``g_te^T (F + lambda I)^{-1} g_tr``, with ``lambda = damping_ratio * mean eigenvalue(F)``
(0.1 by default, thesis C.2).

One loss signature serves capture and baselines: ``loss_fn(params, batch) -> scalar`` (Linen;
``loss_fn(model, batch)`` for NNX with ``model=``), the batch with a leading example axis, and
on a one-example batch that example's loss. Full per-example gradients come from
``jax.vmap(jax.grad(...))`` over one-example batches (:func:`per_example_grads`); KFAC needs
each layer's inputs and output gradients, which :func:`dense_activations` takes with the
capture taps (Linen and NNX, stacked layers included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf._src.statistics import relative_damping

__all__ = [
    "per_example_grads",
    "flatten_per_example",
    "grad_dot",
    "grad_cosine",
    "damped_inverse_apply",
    "exact_influence",
    "block_influence",
    "gaussian_projection",
    "trak",
    "representation_similarity",
    "dense_activations",
    "layer_grads_from_activations",
    "KFACEigenbasis",
    "kfac_eigenbasis",
    "kfac_influence",
]


# ---------------------------------------------------------------------------------------------
# Per-example gradients.


def per_example_grads(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    model=None,
    chunk_size: int = 256,
) -> Any:
    """Per-example gradients: ``vmap(grad(loss_fn))`` over one-example batches, in chunks.

    Args:
      loss_fn: the capture loss: ``loss_fn(params, batch) -> scalar`` (Linen), or
        ``loss_fn(model, batch)`` with ``model`` given (NNX); on a one-example batch (leading
        axis of size 1) it must return that example's loss.
      params: model parameters (NNX: ``nnx.state(model, nnx.Param)``; the model's other
        state is taken from ``model``).
      batch: pytree of arrays with a leading example axis ``n``.
      model: the NNX model, or ``None`` for Linen.
      chunk_size: examples per compiled call.
    Returns:
      A pytree shaped like ``params`` with a leading ``n`` axis on every leaf.
    """
    if model is None:
        loss = loss_fn
    else:
        from flax import nnx

        graphdef, rest = nnx.graphdef(model), nnx.state(model, nnx.Not(nnx.Param))

        def loss(p, b):
            copy = lambda s: jax.tree.map(lambda v: v, s)  # noqa: E731  Variables of this trace
            return loss_fn(nnx.merge(graphdef, copy(p), copy(rest)), b)

    def one(p, example):
        return jax.grad(loss)(p, jax.tree.map(lambda v: v[None], example))

    return _chunked(jax.jit(jax.vmap(one, in_axes=(None, 0))), params, batch, chunk_size)


def _chunked(fn, params, data, chunk_size: int):
    """``fn(params, chunk)`` over chunks of ``data``'s leading axis, outputs concatenated."""
    n = jax.tree.leaves(data)[0].shape[0]
    parts = [
        fn(params, jax.tree.map(lambda x: x[s : s + chunk_size], data))
        for s in range(0, n, chunk_size)
    ]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def flatten_per_example(tree: Any) -> jax.Array:
    """``[n, ...]`` leaves -> one ``[n, P]`` matrix (leaves in ``jax.tree`` order)."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    return jnp.concatenate([x.reshape(n, -1) for x in leaves], axis=1)


def _as_rows(x, name) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [n, ...] rows, got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Dot, cosine.


def grad_dot(test_grads, train_grads) -> jax.Array:
    """Gradient dot product ``g_te . g_tr`` (Pruthi et al. 2020, TracIn at one checkpoint)."""
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    return te @ tr.T


def grad_cosine(test_grads, train_grads, *, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of gradients."""
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    te = te / (jnp.linalg.norm(te, axis=1, keepdims=True) + eps)
    tr = tr / (jnp.linalg.norm(tr, axis=1, keepdims=True) + eps)
    return te @ tr.T


def representation_similarity(test_features, train_features, *, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of representations (e.g. penultimate activations; Hanawa et al. 2021)."""
    return grad_cosine(test_features, train_features, eps=eps)


# ---------------------------------------------------------------------------------------------
# Exact damped empirical-Fisher influence.


def damped_inverse_apply(
    fisher_rows, vectors, *, damping_ratio: float = 0.1, damping: float | None = None
) -> jax.Array:
    """``(F + lambda I)^{-1} v`` for every row ``v`` of ``vectors``, ``F = G^T G / n``.

    Solves directly in ``P`` dimensions when ``P <= n`` and by the Woodbury identity
    ``(F + lambda I)^{-1} = (I - G^T (n lambda I + G G^T)^{-1} G) / lambda`` otherwise, so the
    cost is ``O(min(n, P)^3)``.

    Args:
      fisher_rows: ``[n, P]`` per-example gradients ``G`` defining the empirical Fisher.
      vectors: ``[m, P]`` rows to precondition.
      damping_ratio: ``lambda = damping_ratio * trace(F) / P`` (mean eigenvalue) ...
      damping: ... unless an absolute ``lambda`` is given.
    Returns:
      ``[m, P]``.
    """
    g = _as_rows(fisher_rows, "fisher_rows")
    v = _as_rows(vectors, "vectors")
    n, p = g.shape
    if v.shape[1] != p:
        raise ValueError(f"vectors have {v.shape[1]} columns but fisher_rows have {p}")
    lam = damping if damping is not None else relative_damping(damping_ratio, jnp.sum(g * g) / n, p)
    lam = jnp.asarray(lam, g.dtype)
    if p <= n:
        f = g.T @ g / n + lam * jnp.eye(p, dtype=g.dtype)
        return jnp.linalg.solve(f, v.T).T
    k = g @ g.T + n * lam * jnp.eye(n, dtype=g.dtype)
    return (v - (jnp.linalg.solve(k, g @ v.T)).T @ g) / lam


def exact_influence(
    test_grads,
    train_grads,
    *,
    fisher_grads=None,
    damping_ratio: float = 0.1,
    damping: float | None = None,
) -> jax.Array:
    """Influence ``g_te^T (F + lambda I)^{-1} g_tr`` with the exact empirical Fisher of full gradients.

    Args:
      test_grads: ``[n_test, P]``.
      train_grads: ``[n_train, P]``.
      fisher_grads: rows defining ``F``; defaults to ``train_grads``.
      damping_ratio, damping: see :func:`damped_inverse_apply`.
    Returns:
      ``[n_test, n_train]`` scores.
    """
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    fg = tr if fisher_grads is None else _as_rows(fisher_grads, "fisher_grads")
    return damped_inverse_apply(fg, te, damping_ratio=damping_ratio, damping=damping) @ tr.T


def block_influence(
    test: dict, train: dict, *, fisher: dict | None = None, damping_ratio: float = 0.1
) -> jax.Array:
    """Block-diagonal influence: :func:`exact_influence` per layer (own damping), summed.

    This is LoGra's influence on projected gradients (``{layer: [n, k_out, k_in]}``, Contract B)
    computed in memory, and TRAK's with a single block.

    Args:
      test, train: ``{layer: [n, ...]}`` with matching keys.
      fisher: ``{layer: [n_f, ...]}`` rows for each layer's Fisher; defaults to ``train``.
      damping_ratio: per-layer ``lambda = ratio * mean eigenvalue``.
    Returns:
      ``[n_test, n_train]`` scores.
    """
    if set(test) != set(train):
        raise ValueError(f"test and train layers differ: {sorted(set(test) ^ set(train))}")
    total = None
    for layer in sorted(test):
        f = None if fisher is None else fisher[layer]
        s = exact_influence(test[layer], train[layer], fisher_grads=f, damping_ratio=damping_ratio)
        total = s if total is None else total + s
    return total


# ---------------------------------------------------------------------------------------------
# TRAK-style dense random projection.


def gaussian_projection(key: jax.Array, n: int, k: int, dtype=jnp.float32) -> jax.Array:
    """Dense Gaussian projection ``[n, k]`` with entries ``N(0, 1/k)`` (so ``E[P P^T] = I``)."""
    return jax.random.normal(key, (n, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))


def trak(
    test_grads,
    train_grads,
    *,
    dim: int | None = None,
    key: jax.Array | None = None,
    projection=None,
    precondition: bool = True,
    damping_ratio: float = 0.1,
) -> jax.Array:
    """TRAK-style scores: project full gradients with a dense matrix, then damped influence.

    ``phi = g P`` with ``P`` Gaussian ``[P, dim]`` (Park et al. 2023, one checkpoint, no
    ensembling); the score is ``phi_te^T (Phi^T Phi / n + lambda I)^{-1} phi_tr`` or, with
    ``precondition=False``, ``phi_te . phi_tr``. Storage per example is ``dim`` floats, but the
    projection matrix is ``P x dim`` (why LoGra factorizes it).

    Args:
      test_grads, train_grads: ``[n, P]`` full per-example gradients.
      dim, key: size and key of a fresh Gaussian projection, or
      projection: an explicit ``[P, dim]`` matrix.
      precondition: apply the damped projected Fisher inverse.
      damping_ratio: ``lambda = ratio * mean eigenvalue``.
    Returns:
      ``[n_test, n_train]`` scores.
    """
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    if projection is None:
        if dim is None or key is None:
            raise ValueError("trak: give either `projection` or both `dim` and `key`")
        projection = gaussian_projection(key, te.shape[1], dim, te.dtype)
    projection = jnp.asarray(projection, te.dtype)
    if projection.shape[0] != te.shape[1]:
        raise ValueError(
            f"trak: projection has {projection.shape[0]} rows, gradients have {te.shape[1]} columns"
        )
    pte, ptr = te @ projection, tr @ projection
    if not precondition:
        return pte @ ptr.T
    return exact_influence(pte, ptr, damping_ratio=damping_ratio)


# ---------------------------------------------------------------------------------------------
# KFAC / EKFAC.


def dense_activations(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    model=None,
    select=None,
    chunk_size: int = 256,
) -> dict:
    """Per-example inputs and output gradients of the captured layers (for KFAC/EKFAC baselines).

    Args:
      loss_fn: the capture loss: Linen ``loss_fn(params, batch)``, NNX (``model`` given)
        ``loss_fn(model, batch)``; on a one-example batch, that example's loss.
      params: Linen parameters, or ``nnx.state(model)``.
      batch: pytree with a leading example axis ``n``.
      model: the NNX model, or ``None`` for Linen.
      select: :class:`jaxinf.Select` rule(s), as for :func:`jaxinf.find_layers` (default: all).
      chunk_size: examples per compiled call.
    Returns:
      ``{layer_path: (a [n, T, n_in], d [n, T, n_out])}``: ``T`` flattens the token axes
      (sequence, patches; 1 if none), ``a`` ends with the constant-1 bias feature when the layer
      has a bias, ``d`` is the gradient of the example's loss w.r.t. the layer output. Layers of
      a stack are entries ``"path[i]"``. A layer called more than once raises.
    """
    from jaxinf._src.adapters import _example_fn, linen_capture, nnx_capture
    from jaxinf._src.discovery import find_layers
    from jaxinf._src.layers import (
        _check_layer,
        _config,
        _input_features,
        _on_output,
        group_stacks,
    )
    from jaxinf._src.taps import _acts_tap

    capture = linen_capture(loss_fn) if model is None else nnx_capture(loss_fn, model)
    layers = find_layers(capture, params, batch, select=select)
    plain, stacks = group_stacks(layers, layers)
    tokens = {p: s.tokens for p, s in layers.items()}

    def zeros(spec, lead=()):
        t = tokens[spec.path]
        return jnp.zeros(lead + (t, spec.n_in)), jnp.zeros(lead + (t, spec.n_out))

    def tap_factory(state, mask):
        z, zs, calls = state

        def tap(path, module, x, y, stacked=None, stack=None, **call):
            if stack is not None:
                pair, spec = stack, layers[stacks[path][1][0]]
            elif path in z and stacked is None:
                pair, spec = z[path], layers[path]
            else:
                return y
            if path in calls:
                raise ValueError(f"dense_activations: layer {path!r} is called more than once")
            calls.add(path)
            cfg = _config(path, module, x, y, **call)
            _check_layer(path, cfg, spec.n_in, spec.n_out, "its LayerSpec")
            a = _input_features(cfg, jax.lax.stop_gradient(x)).astype(pair[0].dtype)
            return _on_output(cfg, y, lambda y: _acts_tap(y, a, *pair))

        return tap

    f = _example_fn(
        capture, tap_factory, lambda st: {b: (ax, st[1][b]) for b, (ax, _) in stacks.items()}
    )

    def one(p, example, index):
        z = {path: zeros(layers[path]) for path in plain}
        zs = {b: zeros(layers[ns[0]], (len(ns),)) for b, (_, ns) in stacks.items()}
        calls = set()  # trace-time bookkeeping only
        ga, gs = jax.grad(lambda z, zs: f(p, (z, zs, calls), example, None, index), (0, 1))(z, zs)
        for b, (_, ns) in stacks.items():
            ga.update({n: (gs[b][0][j], gs[b][1][j]) for j, n in enumerate(ns)})
        return ga

    n = jax.tree.leaves(batch)[0].shape[0]
    fn = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    out = _chunked(lambda p, b: fn(p, *b), params, (batch, jnp.arange(n)), chunk_size)
    return {p: out[p] for p in layers}


def layer_grads_from_activations(acts: dict) -> dict:
    """Per-example weight gradients ``G = sum_t a_t d_t^T``, ``{layer: [n, n_in(+1), n_out]}``.

    For a biased layer the last row of ``G`` is the bias gradient (Flax ``kernel`` is
    ``[n_in, n_out]``, so ``G[:, :-1]`` is the kernel gradient).
    """
    return {k: jnp.einsum("nti,nto->nio", a, d) for k, (a, d) in acts.items()}


class KFACEigenbasis(NamedTuple):
    """Kronecker factors and eigenbases of each dense layer's Fisher block ``A (x) S``.

    Attributes:
      q_in: ``{layer: [n_in', n_in']}`` eigenvectors of ``A = E[sum_t a a^T]``.
      q_out: ``{layer: [n_out, n_out]}`` eigenvectors of ``S = E[sum_t d d^T]``.
      eigenvalues: ``{layer: [n_in', n_out]}`` KFAC ``lambda_A lambda_S^T`` or, for EKFAC, the
        corrected ``E[(Q_A^T G Q_S)^2]`` (George et al. 2018).
    """

    q_in: dict
    q_out: dict
    eigenvalues: dict


def kfac_eigenbasis(acts: dict, *, ekfac: bool = False) -> KFACEigenbasis:
    """KFAC (or EKFAC) factors from training-set activations (:func:`dense_activations`).

    With ``T`` positions per example, ``A = E_n[sum_t a_t a_t^T] / T`` and
    ``S = E_n[sum_t d_t d_t^T]`` (the usual weight-sharing "expand" choice; a global scale
    does not change rankings because damping is relative).
    """
    q_in, q_out, eig = {}, {}, {}
    for layer, (a, d) in acts.items():
        n, t = a.shape[0], a.shape[1]
        fa = jnp.einsum("nti,ntj->ij", a, a) / (n * t)
        fs = jnp.einsum("nti,ntj->ij", d, d) / n
        la, qa = jnp.linalg.eigh(fa)
        ls, qs = jnp.linalg.eigh(fs)
        q_in[layer], q_out[layer] = qa, qs
        if ekfac:
            g = jnp.einsum("nti,nto->nio", a, d)
            rot = jnp.einsum("ij,nio,ok->njk", qa, g, qs)
            eig[layer] = jnp.mean(rot * rot, axis=0)
        else:
            eig[layer] = jnp.clip(la, 0)[:, None] * jnp.clip(ls, 0)[None, :]
    return KFACEigenbasis(q_in, q_out, eig)


def kfac_influence(
    test_acts: dict,
    train_acts: dict,
    *,
    eigenbasis: KFACEigenbasis | None = None,
    ekfac: bool = False,
    damping_ratio: float = 0.1,
) -> jax.Array:
    """KFAC / EKFAC influence ``sum_layers <(F_l + lambda_l I)^{-1} G_te, G_tr>``.

    In the Kronecker eigenbasis ``R = Q_A^T G Q_S`` the damped inverse is elementwise
    ``R / (Lambda + lambda_l)``, with ``lambda_l = damping_ratio * mean(Lambda)`` per layer.

    Args:
      test_acts, train_acts: :func:`dense_activations` outputs (same layers).
      eigenbasis: precomputed :func:`kfac_eigenbasis`; by default from ``train_acts``.
      ekfac: use corrected eigenvalues.
      damping_ratio: per-layer relative damping.
    Returns:
      ``[n_test, n_train]`` scores.
    """
    if set(test_acts) != set(train_acts):
        raise ValueError(
            f"test and train layers differ: {sorted(set(test_acts) ^ set(train_acts))}"
        )
    if eigenbasis is None:
        eigenbasis = kfac_eigenbasis(train_acts, ekfac=ekfac)
    total = None
    for layer in sorted(test_acts):
        qa, qs, lam = eigenbasis.q_in[layer], eigenbasis.q_out[layer], eigenbasis.eigenvalues[layer]
        damp = relative_damping(damping_ratio, jnp.sum(lam), lam.size)
        rte = jnp.einsum(
            "ij,nio,ok->njk", qa, layer_grads_from_activations({layer: test_acts[layer]})[layer], qs
        )
        rtr = jnp.einsum(
            "ij,nio,ok->njk",
            qa,
            layer_grads_from_activations({layer: train_acts[layer]})[layer],
            qs,
        )
        s = jnp.einsum("mjk,njk->mn", rte / (lam + damp), rtr)
        total = s if total is None else total + s
    return total
