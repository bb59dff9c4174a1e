"""KFAC factors (thesis 4.3.2): batch sums taken inside the backward pass, and their accumulator."""

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
from jaxinf._src.statistics import Accumulator
from jaxinf._src.taps import _kfac_tap


def kfac_batch_sums(
    capture: Capture,
    layers: Mapping[str, Any],
    *,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    dtype=jnp.float32,
) -> Callable:
    """Jitted ``(params, batch) -> {path: (sum_F [n_in,n_in], sum_B [n_out,n_out], tokens)}``.

    ``sum_F = sum_{i,t} m a a^T`` over examples and (unmasked) tokens of the layer inputs (bias
    feature appended), ``sum_B = sum_{i,t} m d d^T`` of the gradients of each example's loss
    w.r.t. the layer output. Accumulated inside the backward pass: per-example factors are never
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
    def fn(params, batch):
        s = {path: zeros(layers[path]) for path in plain}
        ss = {base: zeros(layers[names[0]], (len(names),)) for base, (_, names) in stacks.items()}
        mask = None if mask_fn is None else mask_fn(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        zero = jnp.zeros((n,), dtype)

        def total(s, ss):
            # s, ss are shared by all examples (in_axes=None): their cotangents sum over the batch.
            per = jax.vmap(f, in_axes=(None, (None, None, 0), 0, 0, 0))
            return jnp.sum(per(params, (s, ss, zero), batch, mask, jnp.arange(n)))

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


def kfac_factors(capture, layers, *, mask_fn=None, dtype=jnp.float32) -> Accumulator:
    """KFAC factors per layer, accumulated over batches (token-count normalised under masks).

    ``C_F = sum m_t a_t a_t^T / sum m_t`` and ``C_B = sum m_t d_t d_t^T / sum m_t`` over all
    examples and tokens seen, ``a_t`` a layer's input features (bias feature appended), ``d_t``
    the gradient of the example's own loss w.r.t. the layer output, ``m_t`` the token mask.

    Args:
      capture: from ``jaxinf.linen_capture`` / ``jaxinf.nnx_capture``.
      layers: ``{path: LayerSpec}`` from ``jaxinf.find_layers``.
      mask_fn: ``mask_fn(batch) -> [batch, *tokens]`` of 0/1, or ``None``.
      dtype: accumulation dtype.

    Returns:
      An :class:`Accumulator`: ``init(None)``, ``update(state, (params, batch))`` (jitted inside),
      ``finalize(state) -> {path: KFACFactors}``. Feed the result to ``jaxinf.pca_projections``.
    """
    batch_sums = kfac_batch_sums(capture, layers, mask_fn=mask_fn, dtype=dtype)
    layers = dict(layers)

    def init(_=None):
        return KFACState(
            {
                p: (
                    jnp.zeros((s.n_in, s.n_in), dtype),
                    jnp.zeros((s.n_out, s.n_out), dtype),
                    jnp.zeros((), dtype),
                )
                for p, s in layers.items()
            }
        )

    def update(state, params_and_batch):
        params, batch = params_and_batch
        new = batch_sums(params, batch)
        return KFACState(jax.tree.map(jnp.add, state.sums, new))

    def finalize(state):
        out = {}
        for p, (sf, sb, n) in state.sums.items():
            n1 = jnp.maximum(n, 1)
            out[p] = KFACFactors(sf / n1, sb / n1, n)
        return out

    return Accumulator(init, update, finalize)
