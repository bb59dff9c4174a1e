"""Small pytree helpers shared by the hypergradient modules and the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _axpy(alpha, x, y):  # alpha * x + y, alpha a traced scalar, dtype of y kept
    return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def _scale(alpha, x):
    return jax.tree.map(lambda xi: (alpha * xi).astype(xi.dtype), x)


def _vdot(a, b):
    leaves = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return sum(leaves) if leaves else jnp.zeros(())


def _norm(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _first(batches):  # the first of a stacked sequence of batches
    return jax.tree.map(lambda x: x[0], batches)


def _last(batches):  # the last of a stacked sequence of batches
    return jax.tree.map(lambda x: x[-1], batches)


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _cast_like(tree, ref):
    return jax.tree.map(lambda x, r: x.astype(jnp.result_type(r)), tree, ref)


def _float_dtype(tree):
    """The dtype of the first floating leaf of ``tree`` (float32 when there is none)."""
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.result_type(x)
    return jnp.dtype(jnp.float32)
