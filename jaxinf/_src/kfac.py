"""Streamed curvature: KFAC factors (thesis 4.3.2) and projected Fisher covariances, per Fisher.

Batch sums are taken inside the backward pass (per-example factors are never materialised) and
accumulated over batches. Both accumulators take ``fisher="empirical" | "sampled" | "true"``:
the gradients are those of the rows of :func:`jaxinf.fisher_batch` (labels substituted in the
batch, drawn from or averaged over the model's softmax), weighted by its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf._src.adapters import Capture, _example_fn
from jaxinf._src.layers import (
    _check_layer,
    _config,
    _input_features,
    _on_output,
    _token_mask,
    group_stacks,
    stacked_error,
)
from jaxinf._src.statistics import Accumulator, add_outer, mirror_upper
from jaxinf._src.taps import _kfac_tap


def kfac_batch_sums(
    capture: Capture,
    layers: Mapping[str, Any],
    *,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    dtype=jnp.float32,
) -> Callable:
    """Jitted ``(params, batch, weights=None) -> {path: (sum_F [n_in,n_in], sum_B [n_out,n_out], tokens)}``.

    ``sum_F = sum_{i,t} m a a^T`` over examples and (unmasked) tokens of the layer inputs (bias
    feature appended), ``sum_B = sum_{i,t} w_i^2 m d d^T`` of the gradients of each example's
    loss w.r.t. the layer output (``weights`` ``[batch]`` scale each example's loss, hence its
    output gradients; ``None`` is all ones). Accumulated inside the backward pass: per-example factors are never
    materialised. Layers of a stack (``"path[i]"``) get their own sums, one per slice. Used by
    :func:`kfac_factors`.
    """
    layers = dict(layers)
    plain, stacks = group_stacks(layers, layers)

    def tap_factory(state, mask):
        s, stacked_s, z = state

        def tap(path, module, x, y, stacked=None, stack=None, **call):
            if stack is not None:
                sums, spec = stack, layers[stacks[path][1][0]]
            elif path in s:
                if stacked is not None:
                    raise stacked_error(path, stacked)
                sums, spec = s[path], layers[path]
            else:
                return y
            cfg = _config(path, module, x, y, **call)
            _check_layer(path, cfg, spec.n_in, spec.n_out, "its LayerSpec")
            a = _input_features(cfg, jax.lax.stop_gradient(x)).astype(dtype)
            m = _token_mask(cfg, mask)
            if m is None:
                m = jnp.ones((a.shape[0],), dtype)
            # Adding the example's zero `z` makes the tapped output batched even when it does not
            # depend on the example (a positional Embed of arange(T)); newer JAX refuses a
            # custom_vjp whose unbatched output receives a batched cotangent.
            return _on_output(
                cfg, y, lambda y: _kfac_tap(y + z.astype(y.dtype), a, m.astype(dtype), sums)
            )

        return tap

    def inject_fn(state):
        return {base: (axis, state[1][base]) for base, (axis, _) in stacks.items()}

    f = _example_fn(capture, tap_factory, inject_fn)

    def zeros(spec, lead=()):
        return (
            jnp.zeros(lead + (spec.n_in, spec.n_in), dtype),
            jnp.zeros(lead + (spec.n_out, spec.n_out), dtype),
            jnp.zeros(lead, dtype),
        )

    @jax.jit
    def fn(params, batch, weights=None):
        s = {path: zeros(layers[path]) for path in plain}
        ss = {base: zeros(layers[names[0]], (len(names),)) for base, (_, names) in stacks.items()}
        mask = None if mask_fn is None else mask_fn(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        zero = jnp.zeros((n,), dtype)
        w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights, dtype)

        def total(s, ss):
            # s, ss are shared by all examples (in_axes=None): their cotangents sum over the batch.
            # A weight on an example's loss scales its output gradients (the cotangent the tap
            # sees) but not the inputs the tap reads: sum_B gets w^2, sum_F and tokens do not.
            per = jax.vmap(f, in_axes=(None, (None, None, 0), 0, 0, 0))
            losses = per(params, (s, ss, zero), batch, mask, jnp.arange(n))
            return jnp.sum(w * losses.astype(dtype))

        gs, gss = jax.grad(total, argnums=(0, 1))(s, ss)
        for base, (_, names) in stacks.items():
            gs.update(
                {name: jax.tree.map(lambda v, j=j: v[j], gss[base]) for j, name in enumerate(names)}
            )
        return {p: gs[p] for p in layers}

    return fn


class KFACFactors(NamedTuple):
    """KFAC factors of one layer (thesis 4.3.2): ``H_layer ≈ forward ⊗ backward``."""

    forward: jax.Array  # [n_in, n_in]: C_F = E_t[a_t a_t^T] (bias feature last, if any)
    backward: jax.Array  # [n_out, n_out]: C_B = E_t[d_t d_t^T]
    tokens: jax.Array  # []: number of (unmasked) tokens averaged over


class KFACState(NamedTuple):
    sums: Any  # {layer: (sum_F [n_in, n_in], sum_B [n_out, n_out], tokens [])}
    batches: Any = 0  # []: batches seen (folded into the key of a sampled Fisher)


def _fisher_rows(fisher, logits_fn, key, samples, labels):
    """``(params, batch, batch_number) -> (rows, weights)`` of the chosen Fisher (traceable)."""
    from jaxinf._src.baselines import FISHERS, fisher_batch

    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher != "empirical" and logits_fn is None:
        raise ValueError(f'fisher="{fisher}" needs `logits_fn` (the predictive distribution)')
    if fisher == "sampled" and key is None:
        raise ValueError('fisher="sampled" needs an explicit `key`')

    def rows(params, batch, number):
        k = None if key is None else jax.random.fold_in(key, number)
        return fisher_batch(
            logits_fn, params, batch, fisher=fisher, key=k, samples=samples, labels=labels
        )

    return rows


def kfac_factors(
    capture,
    layers,
    *,
    mask_fn=None,
    dtype=jnp.float32,
    fisher: str = "empirical",
    logits_fn: Callable | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
    labels: str | int = "label",
) -> Accumulator:
    """KFAC factors per layer, accumulated over batches (token-count normalised under masks).

    ``C_F = sum m_t a_t a_t^T / sum m_t`` and ``C_B = sum m_t d_t d_t^T / sum m_t`` over all
    examples and tokens seen, ``a_t`` a layer's input features (bias feature appended), ``d_t``
    the gradient of the example's own loss w.r.t. the layer output, ``m_t`` the token mask.
    With ``fisher="sampled"`` or ``"true"`` the sums run over the rows of
    :func:`jaxinf.fisher_batch` (labels drawn from, or averaged over, the model's softmax) and
    ``d_t`` is scaled by the row's weight, so ``C_B`` is that Fisher's output-gradient factor.

    Args:
      capture: from ``jaxinf.linen_capture`` / ``jaxinf.nnx_capture``.
      layers: ``{path: LayerSpec}`` from ``jaxinf.find_layers``.
      mask_fn: ``mask_fn(batch) -> [batch, *tokens]`` of 0/1, or ``None``.
      dtype: accumulation dtype.
      fisher: ``"empirical"`` (true labels), ``"sampled"`` or ``"true"``.
      logits_fn: ``logits_fn(params, batch) -> [n, C]`` (or ``[n, *tokens, C]`` for token
        labels, ``"sampled"`` only), called with the ``params`` given to ``update``; the loss
        must read its labels from ``batch[labels]``.
      key: for ``"sampled"``: batch ``j`` draws with ``fold_in(key, j)``, so a run is
        reproducible by key and batches never share draws.
      samples: labels drawn per example (``"sampled"``).
      labels: where the labels are: a dict key, or an index into a tuple batch like ``(x, y)``.

    Returns:
      An :class:`Accumulator`: ``init(None)``, ``update(state, (params, batch))`` (jitted inside),
      ``finalize(state) -> {path: KFACFactors}``. Feed the result to ``jaxinf.pca_projections``.
    """
    batch_sums = kfac_batch_sums(capture, layers, mask_fn=mask_fn, dtype=dtype)
    layers = dict(layers)
    fisher_rows = _fisher_rows(fisher, logits_fn, key, samples, labels)

    def init(_=None):
        return KFACState(
            {
                p: (
                    jnp.zeros((s.n_in, s.n_in), dtype),
                    jnp.zeros((s.n_out, s.n_out), dtype),
                    jnp.zeros((), dtype),
                )
                for p, s in layers.items()
            },
            jnp.zeros((), jnp.int32),
        )

    @jax.jit
    def _update(state, params, batch):
        if fisher == "empirical":
            new = batch_sums(params, batch)
        else:
            rows, w = fisher_rows(params, batch, state.batches)
            new = batch_sums(params, rows, w)
        return KFACState(jax.tree.map(jnp.add, state.sums, new), state.batches + 1)

    def update(state, params_and_batch):
        params, batch = params_and_batch
        return _update(state, params, batch)

    def finalize(state):
        out = {}
        for p, (sf, sb, n) in state.sums.items():
            n1 = jnp.maximum(n, 1)
            out[p] = KFACFactors(sf / n1, sb / n1, n)
        return out

    return Accumulator(init, update, finalize)


class FisherCovarianceState(NamedTuple):
    sum_outer: Any  # {layer: [D, D]}: sum over rows of w^2 g g^T (g projected, flattened)
    rows: jax.Array  # []: Fisher rows seen (examples x samples, or x classes for "true")
    batches: jax.Array  # []: batches seen (folded into the key of a sampled Fisher)


def projected_fisher(
    capture,
    projections: Mapping[str, Any],
    *,
    layers: Mapping[str, Any] | None = None,
    mask_fn=None,
    fisher: str = "empirical",
    logits_fn: Callable | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
    labels: str | int = "label",
    dtype=jnp.float32,
) -> Accumulator:
    """The Fisher of LoGra-projected gradients per layer, streamed over batches.

    ``F_l = mean_rows w^2 g_l g_l^T`` with ``g_l`` the row's projected gradient of layer ``l``
    (``[k_out, k_in]`` flattened) and ``(rows, w)`` those of :func:`jaxinf.fisher_batch`: for
    ``"empirical"`` this is what a :class:`jaxinf.LogWriter` accumulates from its rows; for
    ``"sampled"`` and ``"true"`` it is the projected Fisher of labels drawn from, or averaged
    over, the model's softmax. Pass the result where a Fisher is taken:
    ``jaxinf.query(..., statistics=F)``, ``jaxinf.self_influence(..., statistics=F)``,
    ``jaxinf.influence_scores(..., covariance=F)`` (log with ``LogWriter(statistics=False)`` to
    skip the empirical sums).

    Args:
      capture: from ``jaxinf.linen_capture`` / ``jaxinf.nnx_capture``.
      projections: ``{path: Projection}``, those of the log.
      layers, mask_fn: as for :func:`jaxinf.projected_gradients`.
      fisher, logits_fn, key, samples, labels: as for :func:`kfac_factors`.
      dtype: accumulation dtype.

    Returns:
      An :class:`Accumulator`: ``init(None)``, ``update(state, (params, batch))``,
      ``finalize(state) -> {path: F [D, D]}``.
    """
    from jaxinf._src.capture import projected_gradients

    projections = dict(projections)
    grads_fn = projected_gradients(capture, projections, layers=layers, mask_fn=mask_fn)
    fisher_rows = _fisher_rows(fisher, logits_fn, key, samples, labels)

    def init(_=None):
        def zeros(p):
            d = p.p_in.shape[0] * p.p_out.shape[0]
            return jnp.zeros((d, d), dtype)

        sums = {path: zeros(p) for path, p in projections.items()}
        return FisherCovarianceState(sums, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    @jax.jit
    def _update(state, params, batch):
        if fisher == "empirical":
            rows = batch
            w = jnp.ones((jax.tree.leaves(batch)[0].shape[0],), dtype)
        else:
            rows, w = fisher_rows(params, batch, state.batches)
        g = grads_fn.jitted(params, rows, projections)
        n = w.shape[0]
        sums = {}
        for path, acc in state.sum_outer.items():
            x = g[path].reshape(n, -1).astype(dtype) * w.astype(dtype)[:, None]
            sums[path] = add_outer(acc, x, upper=True)  # read through mirror_upper
        return FisherCovarianceState(sums, state.rows + n, state.batches + 1)

    def update(state, params_and_batch):
        params, batch = params_and_batch
        return _update(state, params, batch)

    def finalize(state):
        count = jnp.maximum(state.rows, 1)
        return {p: mirror_upper(s) / count.astype(s.dtype) for p, s in state.sum_outer.items()}

    return Accumulator(init, update, finalize)


def kfac_factors_from_activations(acts: Mapping[str, Any]) -> dict:
    """``{path: KFACFactors}`` from per-example activations (``jaxinf.dense_activations``).

    ``C_F = sum a a^T / tokens`` and ``C_B = sum d d^T / tokens`` over rows and positions, the
    normalisation of :func:`kfac_factors`. With ``dense_activations(..., fisher="sampled" |
    "true")`` these are the factors of that Fisher, ready for ``pca_projections``.
    """
    out = {}
    for path, (a, d) in acts.items():
        tokens = jnp.asarray(a.shape[0] * a.shape[1], a.dtype)
        out[path] = KFACFactors(
            jnp.einsum("nti,ntj->ij", a, a) / tokens,
            jnp.einsum("nti,ntj->ij", d, d) / tokens,
            tokens,
        )
    return out
