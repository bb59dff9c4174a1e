"""A ``lax.scan`` whose reverse-mode memory grows like O(sqrt(T)), not O(T).

Reverse mode through a plain ``lax.scan`` of ``T`` steps keeps every step's residuals (the
values its backward pass needs) until the backward pass reaches that step: memory ``O(T)``.
:func:`checkpointed_scan` runs the same loop as ``S`` segments: an outer ``lax.scan`` over the
segments whose body is an inner ``lax.scan`` of ``L = ceil(T / S)`` steps under
``jax.checkpoint``. The forward pass keeps only the carry at the start of each segment; the
backward pass recomputes one segment at a time and keeps that segment's residuals while it
runs backward through it. What stays alive is ``S`` carries plus ``L`` steps' residuals, so
``S ≈ sqrt(T)`` gives ``O(sqrt(T))``, at the price of one extra forward pass.

The forward values are those of ``lax.scan`` bit for bit (the same step function in the same
order); derivatives agree with those of ``lax.scan`` to rounding.

References: A. Griewank, "Achieving logarithmic growth of temporal and spatial complexity in
reverse automatic differentiation" (1992); T. Chen et al., "Training deep nets with sublinear
memory cost" (2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["checkpointed_scan"]


def _default_segments(length: int) -> int:
    """``ceil(sqrt(length))``: balances the stored carries against one segment's residuals."""
    return 1 if length <= 1 else math.isqrt(length - 1) + 1


def _split(xs, start, stop, shape):
    return jax.tree.map(lambda x: x[start:stop].reshape(shape + x.shape[1:]), xs)


def checkpointed_scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    *,
    segments: int | None = None,
) -> tuple[Any, Any]:
    """``lax.scan(f, init, xs, length)`` with O(sqrt(T)) memory in reverse mode.

    The ``T`` steps run as ``segments`` checkpointed segments of ``ceil(T / segments)`` steps
    (the last one shorter when ``segments`` does not divide ``T``), all in one program. Reverse
    mode (``jax.grad``, ``jax.vjp``) then keeps about ``segments`` carries plus one segment's
    per-step residuals, and recomputes each segment's forward pass once.

    Args:
      f: the step ``(carry, x) -> (carry, y)``, as for ``lax.scan``.
      init: the initial carry (pytree).
      xs: per-step inputs with leading axis ``T`` (pytree), or ``None`` with ``length``.
      length: ``T``; needed when ``xs`` is ``None``, checked against ``xs`` otherwise.
      segments: how many segments (at most; ``ceil(T / ceil(T / segments))`` in fact).
        ``None`` picks ``ceil(sqrt(T))``; ``1`` is a plain ``lax.scan`` (every step's
        residuals kept: checkpointing one segment of ``T`` steps would save nothing); ``T``
        keeps every step's carry and recomputes each step alone. Fewer segments hold fewer
        carries and longer segments' residuals.

    Returns:
      ``(final_carry, ys)`` exactly as ``lax.scan``: ``ys`` stacked over the ``T`` steps.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmlo import checkpointed_scan
      >>> step = lambda c, x: (jnp.sin(c) * x, c)
      >>> loss = lambda c0: checkpointed_scan(step, c0, jnp.linspace(1.0, 2.0, 10), segments=3)[0]
      >>> ref = lambda c0: jax.lax.scan(step, c0, jnp.linspace(1.0, 2.0, 10))[0]
      >>> bool(jnp.allclose(jax.grad(loss)(0.5), jax.grad(ref)(0.5)))
      True
    """
    leaves = jax.tree.leaves(xs)
    if leaves:
        n = {int(x.shape[0]) if jnp.ndim(x) else None for x in leaves}
        if None in n or len(n) != 1:
            raise ValueError(
                "checkpointed_scan: every leaf of xs needs the same leading axis T, got shapes "
                f"{[jnp.shape(x) for x in leaves]}"
            )
        t = n.pop()
        if length is not None and length != t:
            raise ValueError(f"checkpointed_scan: length={length} but xs has leading axis {t}")
    elif length is None:
        raise ValueError("checkpointed_scan: give xs or length")
    else:
        t = int(length)
    if segments is None:
        segments = _default_segments(t)
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"checkpointed_scan: segments must be an int >= 1, got {segments!r}")
    segments = min(segments, max(t, 1))
    if segments == 1 or t <= 1:
        return jax.lax.scan(f, init, xs, length=t)

    seg_len = -(-t // segments)  # ceil
    full, rest = divmod(t, seg_len)

    def segment(carry, seg_xs, n):
        return jax.lax.scan(f, carry, seg_xs, length=n)

    # Inside the outer scan the recomputation cannot be merged with the forward pass by XLA,
    # so common-subexpression protection is not needed there (jax.checkpoint docs).
    inner = jax.checkpoint(lambda c, x: segment(c, x, seg_len), prevent_cse=False)
    xs_main = None if xs is None else _split(xs, 0, full * seg_len, (full, seg_len))
    carry, ys = jax.lax.scan(inner, init, xs_main, length=full)
    ys = jax.tree.map(lambda y: y.reshape((full * seg_len,) + y.shape[2:]), ys)
    if rest:
        xs_rest = None if xs is None else _split(xs, full * seg_len, t, (rest,))
        tail = jax.checkpoint(lambda c, x: segment(c, x, rest))
        carry, ys_rest = tail(carry, xs_rest)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rest)
    return carry, ys
