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
    # {layer: [D, D]}: sum of g g^T over the examples added so far, in its upper triangle
    # (below it, stale values: read it through finalize or mirror_upper)
    sum_outer: Any
    count: jax.Array  # []: number of examples seen (pending ones included)
    pending: Any = None  # {layer: [block_rows, D]}: rows not yet in sum_outer (blocked only)
    fill: jax.Array | None = None  # []: how many rows of pending hold examples


def relative_damping(damping_ratio, trace, dim):
    """Damping ``λ = damping_ratio × mean eigenvalue = damping_ratio × trace / dim`` (thesis C.2).

    The one definition of relative damping for every influence in jaxinf (``preconditioner``,
    ``damped_inverse_apply``, ``kfac_influence``); works on host floats and on traced arrays.
    """
    return damping_ratio * (trace / dim)


def _flat_rows(x: jax.Array) -> jax.Array:
    """[batch, ...] -> [batch, D]."""
    return x.reshape(x.shape[0], -1)


# The empirical Fisher of projected gradients has one home: these functions. The writer's
# running sums, the sharded logging pass, the reader's fit and ``influence_scores`` all use them.

# Side of the square blocks of the upper-triangle update. Smaller blocks leave less work below
# the diagonal (``(1 + B / D) / 2`` of the full product) but make more, smaller products; on
# CPU, 256 was the fastest of 128 / 256 / 512 / 1024 at D = 1024 to 4096 (logra_logging.py
# --triangle). Sums of D <= 256 take the plain product.
TRIANGLE_BLOCK = 256


def add_outer(
    acc: jax.Array,
    x: jax.Array,
    weights: jax.Array | None = None,
    *,
    upper: bool = False,
    block: int = TRIANGLE_BLOCK,
) -> jax.Array:
    """``acc + sum_i w_i g_i g_i^T`` for a batch ``x`` [batch, ...] (``acc`` [D, D] sets the dtype).

    Products contract the example axis in the accumulator's dtype. ``weights`` [batch]
    (default 1) scales one side only, e.g. 0/1 to leave unused rows out.

    With ``upper=True`` only the blocks on and above the block diagonal are added: for each
    row block ``i`` of ``block`` rows, one product ``h[:, i]^T g[:, i:]``, about half the
    arithmetic of the full product once ``D`` is several blocks. The entries below the
    diagonal blocks keep whatever they held, so a sum built this way is read through
    ``mirror_upper``, which copies the upper triangle down (a full symmetric matrix as start
    value is fine: its upper triangle is the sum so far).

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.arange(6.0).reshape(2, 3)  # 2 examples, D = 3, blocks of 1
      >>> s = add_outer(jnp.zeros((3, 3)), g, upper=True, block=1)
      >>> s[1, 0].item(), mirror_upper(s)[1, 0].item(), (g.T @ g)[1, 0].item()
      (0.0, 12.0, 12.0)
    """
    g = _flat_rows(x).astype(acc.dtype)
    h = g if weights is None else g * weights.astype(acc.dtype)[:, None]
    dims = (((0,), (0,)), ((), ()))
    d = acc.shape[0]
    if not upper or d <= block:
        return acc + jax.lax.dot_general(h, g, dims, preferred_element_type=acc.dtype)
    for a in range(0, d, block):
        b = min(d, a + block)
        part = jax.lax.dot_general(h[:, a:b], g[:, a:], dims, preferred_element_type=acc.dtype)
        acc = acc.at[a:b, a:].add(part)  # in place when the caller donates acc
    return acc


def mirror_upper(acc):
    """The symmetric matrix [D, D] with ``acc``'s upper triangle (diagonal included).

    Reads a sum accumulated by ``add_outer(..., upper=True)``; a symmetric ``acc`` comes back
    unchanged. Works on jax and numpy arrays.
    """
    if isinstance(acc, np.ndarray):
        i = np.arange(acc.shape[0])
        return np.where(i[:, None] <= i[None, :], acc, acc.T)
    # behind a barrier the [D, D] mask is not a compile-time constant: XLA would otherwise fold
    # it element by element while compiling (about 40 s at D = 512, far longer at D = 4096)
    i = jax.lax.optimization_barrier(jnp.arange(acc.shape[0]))
    return jnp.where(i[:, None] <= i[None, :], acc, acc.T)


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


def projected_covariance(
    block_rows: int | None = None, triangle_block: int | None = TRIANGLE_BLOCK
) -> Accumulator:
    """Uncentered covariance (empirical Fisher) of projected per-example gradients, per layer.

    Input trees map a layer path to ``[batch, k_out, k_in]`` (or any ``[batch, ...]``) arrays;
    the result maps each layer to ``F = mean_i g_i g_i^T`` of shape ``[D, D]``,
    ``D = k_out * k_in``, accumulated in at least float32.

    Cost. Each update reads and writes every ``[D, D]`` sum (64 MiB per layer in float32 at
    k = 64), however few examples it adds; with ``block_rows=R`` the rows are first copied into
    an ``[R, D]`` buffer held in the state, and the sums take one ``[R, D]^T [R, D]`` product
    per ``R`` rows (when the next batch would not fit, and in ``finalize``), so the sums are
    touched ``R / batch`` times less often and the product runs at matrix-multiply speed. The
    sum is symmetric, so only its upper triangle of ``triangle_block``-sized blocks is
    accumulated (``(1 + triangle_block / D) / 2`` of the arithmetic and memory traffic), and
    ``finalize`` mirrors it once. The result is the same sum in another order. Jit the update
    with the state donated (``jax.jit(f, donate_argnums=...)``), so the sums are updated in
    place rather than copied.

    Args:
      block_rows: rows buffered per layer before they are added to the sums (``None``: add
        every batch at once). Batches of ``block_rows`` examples or more are added directly.
      triangle_block: side of the square blocks of the upper triangle that is accumulated
        (``None``: the full product, twice the arithmetic; for comparison).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> acc = projected_covariance(block_rows=4)
      >>> g = {"layer": jnp.arange(12.0).reshape(3, 2, 2)}
      >>> update = jax.jit(acc.update, donate_argnums=0)
      >>> state = update(update(acc.init(g), g), g)  # 6 rows: one block added, 2 rows pending
      >>> cov = acc.finalize(state)["layer"]
      >>> x = g["layer"].reshape(3, 4)
      >>> bool(jnp.allclose(cov, x.T @ x / 3)), cov.shape
      (True, (4, 4))
    """
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be a positive number of rows, got {block_rows}")
    if triangle_block is not None and triangle_block < 1:
        raise ValueError(f"triangle_block must be a positive block side, got {triangle_block}")
    upper = triangle_block is not None

    def add(acc, x, weights=None):
        return add_outer(acc, x, weights, upper=upper, block=triangle_block or TRIANGLE_BLOCK)

    def init(tree):
        def zeros(x):
            d = 1
            for s in x.shape[1:]:
                d *= s
            dtype = jnp.promote_types(x.dtype, jnp.float32)
            return jnp.zeros((d, d), dtype)

        sums = jax.tree.map(zeros, tree)
        if block_rows is None:
            return CovarianceState(sums, jnp.zeros((), jnp.int32))
        pending = jax.tree.map(lambda s: jnp.zeros((block_rows, s.shape[0]), s.dtype), sums)
        return CovarianceState(sums, jnp.zeros((), jnp.int32), pending, jnp.zeros((), jnp.int32))

    def flush(state):
        valid = (jnp.arange(block_rows) < state.fill).astype(jnp.int32)
        sums = jax.tree.map(lambda a, r: add(a, r, valid), state.sum_outer, state.pending)
        return state._replace(sum_outer=sums, fill=jnp.zeros_like(state.fill))

    def update(state, tree):
        n = jax.tree.leaves(tree)[0].shape[0]
        if state.pending is None or n >= block_rows:
            sums = jax.tree.map(add, state.sum_outer, tree)
            return state._replace(sum_outer=sums, count=state.count + n)
        state = jax.lax.cond(state.fill + n > block_rows, flush, lambda s: s, state)

        def put(buf, x):
            rows = _flat_rows(x).astype(buf.dtype)
            return jax.lax.dynamic_update_slice(buf, rows, (state.fill, jnp.zeros_like(state.fill)))

        pending = jax.tree.map(put, state.pending, tree)
        return state._replace(pending=pending, fill=state.fill + n, count=state.count + n)

    def finalize(state):
        if state.pending is not None:
            state = flush(state)
        count = jnp.maximum(state.count, 1)
        return jax.tree.map(lambda s: mirror_upper(s) / count.astype(s.dtype), state.sum_outer)

    return Accumulator(init, update, finalize)
