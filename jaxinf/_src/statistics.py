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
