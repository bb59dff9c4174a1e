"""Statistics as pure accumulators: ``init`` / ``update`` over batches / ``finalize``.

Like an optax transform, an accumulator is a NamedTuple of pure functions over a state pytree,
so it runs inside ``jax.jit`` and composes with any loop over batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Accumulator(NamedTuple):
    """A pure streaming statistic.

    Attributes:
      init: ``init(example_tree) -> state``; ``example_tree`` fixes shapes and dtypes.
      update: ``update(state, tree) -> state`` for one batch (leading axis = examples).
      finalize: ``finalize(state) -> statistic``.
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any], Any]
    finalize: Callable[[Any], Any]


class CovarianceState(NamedTuple):
    sum_outer: Any  # {layer: [D, D]}: sum over examples of g g^T
    count: jax.Array  # []: number of examples seen


def relative_damping(damping_ratio, trace, dim):
    """Damping ``λ = damping_ratio × mean eigenvalue = damping_ratio × trace / dim`` (thesis C.2).

    The one definition of relative damping for every influence in jaxinf (``preconditioner``,
    ``damped_inverse_apply``, ``kfac_influence``); works on host floats and on traced arrays.
    """
    return damping_ratio * (trace / dim)


def _flat_rows(x: jax.Array) -> jax.Array:
    """[batch, ...] -> [batch, D]."""
    return x.reshape(x.shape[0], -1)


# The empirical Fisher of projected gradients has one home: these three functions. The writer's
# running sums, the sharded logging pass, the reader's fit and ``influence_scores`` all use them.


def add_outer(acc: jax.Array, x: jax.Array) -> jax.Array:
    """``acc + sum_i g_i g_i^T`` for a batch ``x`` [batch, ...] (``acc`` [D, D] sets the dtype)."""
    g = _flat_rows(x).astype(acc.dtype)
    return acc + g.T @ g


def covariance_from_sums(sum_outer, count):
    """``F = sum g g^T / count`` (count clipped to >= 1); works on arrays and on numpy."""
    return sum_outer / max(count, 1) if isinstance(count, int) else sum_outer / count


def fisher_eigh(cov) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a Fisher ``F`` [d, d] in float64 on the host: (ascending values, vectors).

    ``F`` is symmetrized first and round-off negatives of the values are clipped to 0.
    """
    cov = np.asarray(cov, np.float64)
    evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
    return np.maximum(evals, 0.0), evecs


def projected_covariance() -> Accumulator:
    """Uncentered covariance (empirical Fisher) of projected per-example gradients, per layer.

    Input trees map a layer path to ``[batch, k_out, k_in]`` (or any ``[batch, ...]``) arrays;
    the result maps each layer to ``F = mean_i g_i g_i^T`` of shape ``[D, D]``,
    ``D = k_out * k_in``, accumulated in at least float32.
    """

    def init(tree):
        def zeros(x):
            d = 1
            for s in x.shape[1:]:
                d *= s
            dtype = jnp.promote_types(x.dtype, jnp.float32)
            return jnp.zeros((d, d), dtype)

        return CovarianceState(jax.tree.map(zeros, tree), jnp.zeros((), jnp.int32))

    def update(state, tree):
        n = jax.tree.leaves(tree)[0].shape[0]
        return CovarianceState(jax.tree.map(add_outer, state.sum_outer, tree), state.count + n)

    def finalize(state):
        count = jnp.maximum(state.count, 1)
        return jax.tree.map(lambda s: s / count.astype(s.dtype), state.sum_outer)

    return Accumulator(init, update, finalize)


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
    from jaxinf._src.capture import kfac_batch_sums  # capture depends on flax; import late

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
