"""The explicit functional form of jaxmlo's bilevel layer, and the records it passes around.

The top level leads with the composable forms: ``jax.grad`` through
``jaxmlo.unroll(..., adjoint=...)``, the optax transform ``jaxmlo.hypergradient_transform``
and the ready-made loop ``jaxmlo.bilevel``.  All three are built on the two functions here,
which take the method and every piece as arguments:

* :func:`hypergradient` — the hypergradient of a meta loss on a given :class:`Unrolled`,
  without stepping anything, with its diagnostics (:class:`HypergradInfo`);
* :func:`meta_step` — one bilevel iteration on an explicit :class:`BilevelState`, for a step
  you compose and ``jax.jit`` yourself.

The state and info records (:class:`BilevelState`, :class:`HypergradientState` of the optax
transform, :class:`HypergradInfo`, :class:`Unrolled`) live here with them: a user reads their
fields but rarely names their types.  One home, so nothing here is also exported at the top
level.

Losses take their own parameters first, then what they depend on, then the batch:
``base_loss(params, lam, batch)`` and ``meta_loss(lam, params, batch)``.

Example:
  >>> import jax.numpy as jnp, optax, jaxmlo, jaxmlo.functional as F
  >>> base = lambda w, lam, x: jnp.sum((w - x) ** 2) + lam * jnp.sum(w**2)
  >>> meta = lambda lam, w, x: jnp.sum((w - x) ** 2)
  >>> opt, w0 = optax.sgd(0.1), jnp.zeros(3)
  >>> un = jaxmlo.unroll(base, opt, w0, opt.init(w0), 0.5, jnp.ones((100, 3)))
  >>> g, info = F.hypergradient(jaxmlo.cg(), base, meta, opt, un, 0.5, jnp.ones(3), jnp.ones(3))
  >>> print(round(float(g), 4))  # θ* = x/(1+λ): dL/dλ = 2·Σ x²λ/(1+λ)³ = 3·2·0.5/1.5³
  0.8889
"""

from jaxmlo._src.bilevel import (
    BilevelState,
    HypergradientState,
    HypergradInfo,
    hypergradient,
    meta_step,
)
from jaxmlo._src.unroll import Unrolled

__all__ = [
    "BilevelState",
    "HypergradInfo",
    "HypergradientState",
    "Unrolled",
    "hypergradient",
    "meta_step",
]
