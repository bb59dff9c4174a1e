"""A node of a multi-level program: one named optimization problem.

References:
  S. K. Choe, *Understanding Training Data in Large-Scale Machine Learning*, CMU 2024,
  section 2.4 ("Problem").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

__all__ = ["Problem"]


class Problem(NamedTuple):
    """One optimization problem ``theta* = argmin_theta loss(theta, deps, batch)``.

    A problem is immutable data; the engine (:func:`jaxmlo.step`) owns its
    optimizer state and updates.

    Attributes:
      name: unique name; other problems see this problem's parameters under it in their
        ``deps``.
      loss: ``loss(params, deps, batch) -> scalar``. ``deps`` is a dict ``{name: params}``
        holding the current (non-optimal) parameters of the upper problems with an
        upper-to-lower edge into this one, and the (approximately) optimal parameters of the
        lower problems with a lower-to-upper edge into this one.
      params: initial parameters (any pytree of arrays).
      optimizer: an ``optax.GradientTransformation``. Clipping, schedules and gradient
        accumulation come from composing optax (``optax.chain(optax.clip_by_global_norm(1.),
        ...)``, ``optax.MultiSteps``).
      unroll_steps: optimizer steps this problem takes per program step (the unroll length
        ``T``; the engine runs them as one ``lax.scan``).
      method: the :class:`jaxmlo.HypergradMethod` used to differentiate *through* this
        problem's solution (its best-response Jacobian). Required when an upper problem
        depends on this problem's solution; ignored otherwise.
      example_batch: optional example batch (arrays or ``jax.ShapeDtypeStruct``, no leading
        unroll axis). When given, :class:`jaxmlo.Program` traces ``loss`` with it at
        construction, so a loss asking for a dependency the graph does not give fails at once.
    """

    name: str
    loss: Callable[[Any, dict, Any], Any]
    params: Any
    optimizer: optax.GradientTransformation
    unroll_steps: int = 1
    method: Any | None = None
    example_batch: Any = None
