"""Attribution baselines, all returning a score matrix ``[n_test, n_train]``.

Every function here maps test and train gradients (or features) to scores where a larger entry
means the training example helps the test example more (lowers its loss). They are small-model
references for LoGra (thesis 4.4.1): gradient dot product and cosine, random-projection
influence, TRAK (margin gradients, ``1 - p`` weights, an ensemble), influence with the exact
damped Fisher, KFAC and EKFAC influence, and representation similarity. The Fisher is
empirical (true labels), sampled (labels drawn from the model) or true (the expectation over
the model's predictive distribution): :func:`fisher_batch`.

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

import math
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
    "projected_influence",
    "margin_grads",
    "trak",
    "fisher_batch",
    "weight_rows",
    "FISHERS",
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
    has_aux: bool = False,
    fisher: str = "empirical",
    logits_fn: Callable[[Any, Any], jax.Array] | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
    labels: str | int = "label",
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
      has_aux: ``loss_fn`` returns ``(loss, aux)``; then ``(grads, aux)`` is returned.
      fisher, logits_fn, key, samples, labels: with ``fisher="sampled"`` or ``"true"``, the
        gradients are those of :func:`fisher_batch`'s rows scaled by its weights, so that
        ``G^T G / n_rows`` is that Fisher (the loss must read its labels from
        ``batch[labels]``); ``"empirical"`` (default) is the batch as given.
    Returns:
      A pytree shaped like ``params`` with a leading ``n`` axis on every leaf (``n_rows``
      for a sampled or true Fisher).
    """
    if fisher != "empirical":
        if has_aux:
            raise ValueError("has_aux is not supported with a sampled or true Fisher")
        rows, w = fisher_batch(
            logits_fn,
            params if model is None else model,
            batch,
            fisher=fisher,
            key=key,
            samples=samples,
            labels=labels,
        )
        g = per_example_grads(loss_fn, params, rows, model=model, chunk_size=chunk_size)
        return weight_rows(g, w)
    if model is None:
        loss = loss_fn
    else:
        from flax import nnx

        graphdef, rest = nnx.graphdef(model), nnx.state(model, nnx.Not(nnx.Param))

        def loss(p, b):
            copy = lambda s: jax.tree.map(lambda v: v, s)  # noqa: E731  Variables of this trace
            return loss_fn(nnx.merge(graphdef, copy(p), copy(rest)), b)

    def one(p, example):
        return jax.grad(loss, has_aux=has_aux)(p, jax.tree.map(lambda v: v[None], example))

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
    return _damped_inverse(fisher_rows, vectors, damping_ratio, damping)[0]


def _damped_inverse(fisher_rows, vectors, damping_ratio, damping):
    """:func:`damped_inverse_apply` and the ``lambda`` it used."""
    g = _as_rows(fisher_rows, "fisher_rows")
    v = _as_rows(vectors, "vectors")
    n, p = g.shape
    if v.shape[1] != p:
        raise ValueError(f"vectors have {v.shape[1]} columns but fisher_rows have {p}")
    lam = damping if damping is not None else relative_damping(damping_ratio, jnp.sum(g * g) / n, p)
    lam = jnp.asarray(lam, g.dtype)
    if p <= n:
        f = g.T @ g / n + lam * jnp.eye(p, dtype=g.dtype)
        return jnp.linalg.solve(f, v.T).T, lam
    k = g @ g.T + n * lam * jnp.eye(n, dtype=g.dtype)
    return (v - (jnp.linalg.solve(k, g @ v.T)).T @ g) / lam, lam


def exact_influence(
    test_grads,
    train_grads,
    *,
    fisher_grads=None,
    damping_ratio: float = 0.1,
    damping: float | None = None,
    return_damping: bool = False,
) -> jax.Array:
    """Influence ``g_te^T (F + lambda I)^{-1} g_tr`` with the exact Fisher of full gradients.

    Args:
      test_grads: ``[n_test, P]``.
      train_grads: ``[n_train, P]``.
      fisher_grads: rows defining ``F``; defaults to ``train_grads`` (the empirical Fisher;
        :func:`per_example_grads` with ``fisher="sampled"`` or ``"true"`` gives the others).
      damping_ratio, damping: see :func:`damped_inverse_apply`.
      return_damping: also return the ``lambda`` used.
    Returns:
      ``[n_test, n_train]`` scores (and ``lambda`` with ``return_damping``).
    """
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    fg = tr if fisher_grads is None else _as_rows(fisher_grads, "fisher_grads")
    pre, lam = _damped_inverse(fg, te, damping_ratio, damping)
    return (pre @ tr.T, lam) if return_damping else pre @ tr.T


def block_influence(
    test: dict,
    train: dict,
    *,
    fisher: dict | None = None,
    damping_ratio: float = 0.1,
    return_damping: bool = False,
) -> jax.Array:
    """Block-diagonal influence: :func:`exact_influence` per layer (own damping), summed.

    This is LoGra's influence on projected gradients (``{layer: [n, k_out, k_in]}``, as the capture returns them)
    computed in memory, and TRAK's with a single block.

    Args:
      test, train: ``{layer: [n, ...]}`` with matching keys.
      fisher: ``{layer: [n_f, ...]}`` rows for each layer's Fisher; defaults to ``train``.
      damping_ratio: per-layer ``lambda = ratio * mean eigenvalue``.
      return_damping: also return ``{layer: lambda}``.
    Returns:
      ``[n_test, n_train]`` scores (and ``{layer: lambda}`` with ``return_damping``).
    """
    if set(test) != set(train):
        raise ValueError(f"test and train layers differ: {sorted(set(test) ^ set(train))}")
    total, lams = None, {}
    for layer in sorted(test):
        f = None if fisher is None else fisher[layer]
        s, lams[layer] = exact_influence(
            test[layer],
            train[layer],
            fisher_grads=f,
            damping_ratio=damping_ratio,
            return_damping=True,
        )
        total = s if total is None else total + s
    return (total, lams) if return_damping else total


# ---------------------------------------------------------------------------------------------
# Dense random projection: projected influence and TRAK.


def gaussian_projection(key: jax.Array, n: int, k: int, dtype=jnp.float32) -> jax.Array:
    """Dense Gaussian projection ``[n, k]`` with entries ``N(0, 1/k)`` (so ``E[P P^T] = I``)."""
    return jax.random.normal(key, (n, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))


def projected_influence(
    test_grads,
    train_grads,
    *,
    dim: int | None = None,
    key: jax.Array | None = None,
    projection=None,
    precondition: bool = True,
    damping_ratio: float = 0.1,
    return_damping: bool = False,
) -> jax.Array:
    """Random-projection influence: project full gradients with a dense matrix, then damp.

    ``phi = g P`` with ``P`` Gaussian ``[P, dim]``; the score is
    ``phi_te^T (Phi^T Phi / n + lambda I)^{-1} phi_tr`` or, with ``precondition=False``,
    ``phi_te . phi_tr``. Storage per example is ``dim`` floats, but the projection matrix is
    ``P x dim`` (why LoGra factorizes it). This is influence of loss gradients in a random
    subspace; :func:`trak` is TRAK's estimator (margin gradients, ``1 - p`` weights, ensemble).

    Args:
      test_grads, train_grads: ``[n, P]`` full per-example gradients.
      dim, key: size and key of a fresh Gaussian projection, or
      projection: an explicit ``[P, dim]`` matrix.
      precondition: apply the damped projected Fisher inverse.
      damping_ratio: ``lambda = ratio * mean eigenvalue``.
      return_damping: also return the ``lambda`` used (0 without preconditioning).
    Returns:
      ``[n_test, n_train]`` scores (and ``lambda`` with ``return_damping``).
    """
    te, tr = _as_rows(test_grads, "test_grads"), _as_rows(train_grads, "train_grads")
    projection = _projection(projection, dim, key, te.shape[1], te.dtype, "projected_influence")
    pte, ptr = te @ projection, tr @ projection
    if not precondition:
        s = pte @ ptr.T
        return (s, jnp.zeros((), s.dtype)) if return_damping else s
    return exact_influence(pte, ptr, damping_ratio=damping_ratio, return_damping=return_damping)


def _projection(projection, dim, key, p, dtype, name):
    if projection is None:
        if dim is None or key is None:
            raise ValueError(f"{name}: give either `projection` or both `dim` and `key`")
        projection = gaussian_projection(key, p, dim, dtype)
    projection = jnp.asarray(projection, dtype)
    if projection.ndim != 2 or projection.shape[0] != p:
        raise ValueError(
            f"{name}: projection has shape {projection.shape}, gradients have {p} columns"
        )
    return projection


def margin_grads(
    logits_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    labels: str | int = "label",
    mask: str | int | None = None,
    weighted: bool = False,
    model=None,
    chunk_size: int = 256,
) -> tuple[jax.Array, ...]:
    """TRAK's per-example margin gradients and correct-class probabilities.

    The margin of a prediction with label ``y`` is
    ``f = log(p_y / (1 - p_y)) = z_y - logsumexp_{c != y} z_c`` for logits ``z``. A classifier
    has one label per example (logits ``[C]``, label ``[]``). A language model has one label
    per token (logits ``[T, C]``, labels ``[T]``): the sequence's output is the sum of its
    tokens' margins, ``f = sum_t m_t f_t`` with ``m_t`` the token mask (1 for a target token,
    0 for padding, as the LM loss weighs its tokens), and the returned probability is the
    masked mean ``p = sum_t m_t p_t / sum_t m_t``.

    TRAK weighs each train example by ``1 - p``. A sequence has no single ``p``; the weighted
    train rows (``weighted=True``) give each token its own weight,
    ``sum_t m_t (1 - p_t) grad f_t``, which is minus the gradient of the summed token loss
    (per token ``(1 - p_t) grad f_t = grad log p_t``) and, for one label, exactly the
    paper's ``(1 - p) grad f``. Pass them to :func:`trak` as ``train_weighted_grads``: on the
    byte LM they score within 0.03 of, or better than, one weight per sequence (the mean of
    ``1 - p_t``, i.e. ``1 - p`` as ``train_probs``; docs/evaluation.md).

    Args:
      logits_fn: ``logits_fn(params, batch) -> [n, C]`` or ``[n, T, C]`` (NNX:
        ``logits_fn(model, batch)`` with ``model`` given).
      params: model parameters (NNX: ``nnx.state(model, nnx.Param)``).
      batch: a pytree with a leading example axis; ``batch[labels]`` holds integer labels
        ``[n]`` or ``[n, T]``.
      labels: where the labels are: a dict key, or an index into a tuple batch like ``(x, y)``.
      mask: where the token mask is (``[n, T]`` of 0/1, the shape of the labels), or ``None``
        (every label counts).
      weighted: also return the ``1 - p`` weighted margin gradients (one weight per token).
      model: the NNX model, or ``None`` for Linen.
      chunk_size: examples per compiled call.
    Returns:
      ``(grads [n, P], p [n])``: flattened margin gradients (leaves in ``jax.tree`` order) and
      the probability of the correct class (for token labels, its masked mean over tokens);
      with ``weighted``, ``(grads, p, weighted_grads [n, P])``.

    Example:
      >>> import jax.numpy as jnp
      >>> logits_fn = lambda w, b: b["x"] @ w  # [n, T, D] @ [D, C]: one label per token
      >>> b = {"x": jnp.ones((2, 3, 4)), "y": jnp.zeros((2, 3), int),
      ...      "m": jnp.array([[1, 1, 1], [1, 1, 0]])}
      >>> g, p = margin_grads(logits_fn, jnp.zeros((4, 5)), b, labels="y", mask="m")
      >>> g.shape, [round(v, 3) for v in p.tolist()]
      ((2, 20), [0.2, 0.2])
    """
    y = _get_labels(batch, labels)
    if mask is not None:
        m = _get_labels(batch, mask)
        if m.shape != y.shape:
            raise ValueError(
                f"margin_grads: the mask batch[{mask!r}] has shape {tuple(m.shape)}, the labels "
                f"batch[{labels!r}] have {tuple(y.shape)}; give one 0/1 entry per label"
            )

    def token_margins(model_or_params, example):  # one example: mask, margins, p per label
        y = example[labels][0]
        z = logits_fn(model_or_params, example)
        lead = z.shape[: z.ndim - 1 - y.ndim]
        if (
            z.ndim < y.ndim + 1
            or z.shape[len(lead) : -1] != y.shape
            or math.prod(lead) != 1
            or z.shape[-1] < 2
        ):
            raise ValueError(
                f"margin_grads: logits_fn returned logits of shape {tuple(z.shape)} for labels "
                f"of shape {(1,) + tuple(y.shape)}; expected labels.shape + (C,) with C >= 2"
            )
        z = z.reshape(y.shape + (-1,))
        true = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
        margins = jnp.sum(jnp.where(true, z, 0.0), -1) - jax.nn.logsumexp(
            jnp.where(true, -jnp.inf, z), axis=-1
        )
        p = jnp.sum(jnp.where(true, jax.nn.softmax(z, axis=-1), 0.0), -1)
        w = jnp.ones_like(margins) if mask is None else example[mask][0].astype(margins.dtype)
        return w, margins, p

    def margin(model_or_params, example):
        w, margins, p = token_margins(model_or_params, example)
        return jnp.sum(w * margins), jnp.sum(w * p) / jnp.maximum(jnp.sum(w), 1.0)

    def weighted_margin(model_or_params, example):
        w, margins, p = token_margins(model_or_params, example)
        return jnp.sum(w * jax.lax.stop_gradient(1.0 - p) * margins)

    opts = dict(model=model, chunk_size=chunk_size)
    grads, p = per_example_grads(margin, params, batch, has_aux=True, **opts)
    if not weighted:
        return flatten_per_example(grads), p
    weighted_grads = per_example_grads(weighted_margin, params, batch, **opts)
    return flatten_per_example(grads), p, flatten_per_example(weighted_grads)


def trak(
    test_grads,
    train_grads,
    train_probs=None,
    *,
    train_weighted_grads=None,
    dim: int | None = None,
    key: jax.Array | None = None,
    projections=None,
    damping_ratio: float = 0.0,
    return_damping: bool = False,
) -> jax.Array:
    """TRAK (Park et al. 2023): projected margin gradients, ``1 - p`` weights, an ensemble.

    For models (or checkpoints) ``m = 1..M`` with margin gradients ``g`` (:func:`margin_grads`)
    and random projections ``P_m``, ``phi = g P_m`` and ``Phi_m`` the train features; the score is

    ``tau = [1/M sum_m phi_te,m^T (Phi_m^T Phi_m + lambda_m I)^{-1} Phi_m^T] diag(1/M sum_m (1 - p_m))``

    with ``p_m`` the train examples' correct-class probabilities under model ``m`` (no soft
    thresholding). ``lambda_m = damping_ratio * mean eigenvalue(Phi_m^T Phi_m)``, 0 by default
    as in the paper (then ``dim`` must not exceed the number of train examples).

    With ``train_weighted_grads`` ``Psi`` (rows ``(1 - p) g``, or for a sequence
    ``sum_t (1 - p_t) grad f_t``: :func:`margin_grads` with ``weighted=True``) in place of
    ``train_probs``, each model's weights stay inside its term:
    ``tau = 1/M sum_m phi_te,m^T (Phi_m^T Phi_m + lambda_m I)^{-1} (Psi_m P_m)^T`` (the same
    as above for one model; the form for language models, whose tokens have a ``p`` each).

    Args:
      test_grads: ``[M, n_test, P]`` margin gradients of the test examples under each model
        (``[n_test, P]`` for one model).
      train_grads: ``[M, n_train, P]`` (or ``[n_train, P]``).
      train_probs: ``[M, n_train]`` (or ``[n_train]``) correct-class probabilities, or
      train_weighted_grads: ``[M, n_train, P]`` (or ``[n_train, P]``) weighted margin
        gradients; give exactly one of the two.
      dim, key: size of a fresh Gaussian projection per model (keys split from ``key``), or
      projections: explicit ``[M, P, dim]`` (or ``[P, dim]``) matrices.
      damping_ratio: relative ridge on ``Phi^T Phi``.
      return_damping: also return ``[M]`` ridges ``lambda_m``.
    Returns:
      ``[n_test, n_train]`` scores (and ``lambda [M]`` with ``return_damping``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g_te, g_tr = jnp.ones((2, 5)), jax.random.normal(jax.random.PRNGKey(0), (8, 5))
      >>> trak(g_te, g_tr, jnp.full((8,), 0.5), dim=3, key=jax.random.PRNGKey(1)).shape
      (2, 8)
    """
    if (train_probs is None) == (train_weighted_grads is None):
        raise ValueError("trak: give exactly one of `train_probs` and `train_weighted_grads`")
    te, tr = jnp.asarray(test_grads), jnp.asarray(train_grads)
    weighted = train_weighted_grads is not None
    w = jnp.asarray(train_weighted_grads if weighted else train_probs)
    if te.ndim == 2:
        te, tr, w = te[None], tr[None], w[None]
        projections = None if projections is None else jnp.asarray(projections)[None]
    w_name, w_ndim = ("train_weighted_grads", 3) if weighted else ("train_probs", 2)
    if te.ndim != 3 or tr.ndim != 3 or w.ndim != w_ndim:
        raise ValueError(
            "trak: test_grads, train_grads must be [M, n, P], train_probs [M, n_train] and "
            f"train_weighted_grads [M, n_train, P], got {te.shape}, {tr.shape}, {w_name} "
            f"{w.shape}"
        )
    m = te.shape[0]
    if tr.shape[0] != m or w.shape[:2] != tr.shape[:2] or te.shape[2] != tr.shape[2]:
        raise ValueError(
            f"trak: shapes disagree: test {te.shape}, train {tr.shape}, {w_name} {w.shape}"
        )
    if weighted and w.shape != tr.shape:
        raise ValueError(f"trak: shapes disagree: train {tr.shape}, {w_name} {w.shape}")
    if projections is None:
        if dim is None or key is None:
            raise ValueError("trak: give either `projections` or both `dim` and `key`")
        keys = jax.random.split(key, m)
        projections = [gaussian_projection(k, te.shape[2], dim, te.dtype) for k in keys]
    projections = jnp.asarray(projections, te.dtype)
    if projections.ndim != 3 or projections.shape[:2] != (m, te.shape[2]):
        raise ValueError(
            f"trak: projections have shape {projections.shape}, expected [{m}, {te.shape[2]}, dim]"
        )
    total, lams = 0.0, []
    for j in range(m):
        pte, ptr = te[j] @ projections[j], tr[j] @ projections[j]
        gram = ptr.T @ ptr
        lams.append(relative_damping(damping_ratio, jnp.trace(gram), gram.shape[0]))
        gram = gram + lams[-1] * jnp.eye(gram.shape[0], dtype=gram.dtype)
        right = w[j] @ projections[j] if weighted else ptr
        total = total + jnp.linalg.solve(gram, pte.T).T @ right.T
    scores = total / m
    if not weighted:
        scores = scores * jnp.mean(1.0 - w, axis=0)[None, :]
    return (scores, jnp.stack(lams)) if return_damping else scores


# ---------------------------------------------------------------------------------------------
# Fisher choices: which labels the curvature's gradients are taken at.

FISHERS = ("empirical", "sampled", "true")


def _get_labels(batch, labels):
    """``batch[labels]``: a dict key, or an index into a tuple batch such as ``(x, y)``."""
    ok = (isinstance(batch, dict) and labels in batch) or (
        isinstance(batch, (tuple, list))
        and isinstance(labels, int)
        and -len(batch) <= labels < len(batch)
    )
    if not ok:
        raise ValueError(
            f"the labels must be batch[{labels!r}] (a dict key or a tuple index); the batch is a "
            f"{type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        )
    return jnp.asarray(batch[labels])


def _set_labels(batch, labels, new):
    if isinstance(batch, dict):
        return {**batch, labels: new}
    out = list(batch)
    out[labels] = new
    return type(batch)(out)


def fisher_batch(
    logits_fn: Callable[[Any, Any], jax.Array] | None,
    params: Any,
    batch: Any,
    *,
    fisher: str = "empirical",
    key: jax.Array | None = None,
    samples: int = 1,
    labels: str | int = "label",
) -> tuple[Any, jax.Array]:
    """Rows and weights whose weighted gradients define the chosen Fisher.

    The loss reads its labels from ``batch[labels]``; this returns a batch of rows with labels
    substituted and weights ``w`` such that the Fisher is ``mean_rows w^2 g g^T`` for ``g`` the
    row's loss gradient (so ``w`` scales the output gradients, and KFAC's ``S`` and EKFAC's
    eigenvalues, by ``w^2``):

    - ``"empirical"``: the batch itself, ``w = 1`` (true labels).
    - ``"sampled"``: each example repeated ``samples`` times (example-major) with labels drawn
      from the model's predictive distribution ``softmax(logits_fn(params, batch))`` by ``key``;
      ``w = 1``. Converges to ``"true"`` as ``samples`` grows. With token labels (logits
      ``[n, T, C]``, labels ``[n, T]``, a language model) every token draws its own label,
      independently given the input: the usual Fisher of an autoregressive model.
    - ``"true"``: each example repeated once per class ``c`` (example-major) with label ``c`` and
      ``w = sqrt(C p_c)``, so ``mean_rows w^2 g g^T = 1/n sum_i sum_c p_ic g_ic g_ic^T`` exactly.
      Only for one label per example: with ``T`` token labels the expectation has ``C^T`` label
      sequences (per token it is ``T * C`` backward passes), so this raises; use ``"sampled"``
      with ``samples`` draws there.

    Args:
      logits_fn: ``logits_fn(params, batch) -> [n, C]`` or ``[n, *tokens, C]`` (NNX: pass the
        model as ``params``); unused for ``"empirical"``.
      params: what ``logits_fn`` takes first.
      batch: a pytree with a leading example axis and integer labels at ``batch[labels]``
        (``[n]``, or ``[n, *tokens]`` matching the logits).
      fisher: one of :data:`FISHERS`.
      key: PRNG key, required for ``"sampled"``.
      samples: labels drawn per example for ``"sampled"``.
      labels: where the labels are: a dict key, or an index into a tuple batch like ``(x, y)``.
    Returns:
      ``(rows, w [n_rows])``.

    Example:
      >>> import jax.numpy as jnp
      >>> logits_fn = lambda w, b: b["x"] @ w
      >>> b = {"x": jnp.eye(2), "label": jnp.array([0, 1])}
      >>> rows, w = fisher_batch(logits_fn, jnp.zeros((2, 3)), b, fisher="true")
      >>> rows["label"].tolist(), w.shape
      ([0, 1, 2, 0, 1, 2], (6,))
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    y = _get_labels(batch, labels)
    if fisher == "empirical":
        return batch, jnp.ones(y.shape[:1])
    if logits_fn is None:
        raise ValueError(f'fisher="{fisher}" needs `logits_fn` (the predictive distribution)')
    logits = jnp.asarray(logits_fn(params, batch))
    n = y.shape[0]
    if logits.ndim < 2 or logits.shape[:-1] != y.shape:
        raise ValueError(
            f"logits_fn must return logits of shape labels.shape + (C,) = {tuple(y.shape)} + (C,) "
            f"([n, C], or [n, *tokens, C] for token labels), got {tuple(logits.shape)}"
        )
    c = logits.shape[-1]
    if fisher == "sampled":
        if key is None:
            raise ValueError('fisher="sampled" needs an explicit `key`')
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        drawn = jax.random.categorical(
            key, logits[:, None], axis=-1, shape=(n, samples) + y.shape[1:]
        )
        reps, new = samples, drawn.reshape((n * samples,) + y.shape[1:])
        w = jnp.ones((n * samples,), logits.dtype)
    else:
        if y.ndim > 1:
            raise ValueError(
                f'fisher="true" needs one label per example; these labels have shape '
                f"{tuple(y.shape)} (token labels: C^T label sequences per example). Use "
                'fisher="sampled" with samples=S (an unbiased estimate of the true Fisher)'
            )
        p = jax.nn.softmax(logits, axis=-1)
        reps, new = c, jnp.tile(jnp.arange(c), n)
        w = jnp.sqrt(c * p).reshape(-1)
    rows = jax.tree.map(lambda v: jnp.repeat(jnp.asarray(v), reps, axis=0), batch)
    return _set_labels(rows, labels, new.astype(y.dtype)), w


def weight_rows(tree: Any, w: jax.Array) -> Any:
    """Scale per-example gradients (or :func:`dense_activations` output gradients) by ``w``."""
    if isinstance(tree, dict) and all(isinstance(v, tuple) for v in tree.values()):
        return {k: (a, d * w.reshape((-1,) + (1,) * (d.ndim - 1))) for k, (a, d) in tree.items()}
    return jax.tree.map(lambda g: g * w.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), tree)


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
    fisher: str = "empirical",
    logits_fn: Callable[[Any, Any], jax.Array] | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
    labels: str | int = "label",
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
      fisher, logits_fn, key, samples, labels: which Fisher the activations define (as in
        :func:`per_example_grads`): for ``"sampled"`` and ``"true"`` the rows of
        :func:`fisher_batch` with ``d`` scaled by its weights, so :func:`kfac_eigenbasis` of
        the result is KFAC/EKFAC of that Fisher.
    Returns:
      ``{layer_path: (a [n, T, n_in], d [n, T, n_out])}``: ``T`` flattens the token axes
      (sequence, patches; 1 if none), ``a`` ends with the constant-1 bias feature when the layer
      has a bias, ``d`` is the gradient of the example's loss w.r.t. the layer output. Layers of
      a stack are entries ``"path[i]"``. A layer called more than once raises.
    """
    if fisher != "empirical":
        rows, w = fisher_batch(
            logits_fn,
            params if model is None else model,
            batch,
            fisher=fisher,
            key=key,
            samples=samples,
            labels=labels,
        )
        acts = dense_activations(
            loss_fn, params, rows, model=model, select=select, chunk_size=chunk_size
        )
        return weight_rows(acts, w)
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
    return_damping: bool = False,
) -> jax.Array:
    """KFAC / EKFAC influence ``sum_layers <(F_l + lambda_l I)^{-1} G_te, G_tr>``.

    In the Kronecker eigenbasis ``R = Q_A^T G Q_S`` the damped inverse is elementwise
    ``R / (Lambda + lambda_l)``, with ``lambda_l = damping_ratio * mean(Lambda)`` per layer.

    Args:
      test_acts, train_acts: :func:`dense_activations` outputs (same layers).
      eigenbasis: precomputed :func:`kfac_eigenbasis`; by default from ``train_acts``.
      ekfac: use corrected eigenvalues.
      damping_ratio: per-layer relative damping.
      return_damping: also return ``{layer: lambda_l}``.
    Returns:
      ``[n_test, n_train]`` scores (and ``{layer: lambda_l}`` with ``return_damping``).
    """
    if set(test_acts) != set(train_acts):
        raise ValueError(
            f"test and train layers differ: {sorted(set(test_acts) ^ set(train_acts))}"
        )
    if eigenbasis is None:
        eigenbasis = kfac_eigenbasis(train_acts, ekfac=ekfac)
    total, lams = None, {}
    for layer in sorted(test_acts):
        qa, qs, lam = eigenbasis.q_in[layer], eigenbasis.q_out[layer], eigenbasis.eigenvalues[layer]
        damp = lams[layer] = relative_damping(damping_ratio, jnp.sum(lam), lam.size)
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
    return (total, lams) if return_damping else total
