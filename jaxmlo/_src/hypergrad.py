"""Hypergradients: how to differentiate through an unrolled optax loop.

The pieces live in their own modules: ``unroll`` (the loop and its ``adjoint=``), ``adjoints``
(the implicit core, linear solves and methods), ``bilevel`` (hypergradients of a meta loss, the
optax transform, the common loop) and ``checks`` (trace-time argument checks).

Conventions:

* A loss takes its own parameters first, then what it depends on, then the batch:
  ``loss_fn(params, deps, batch) -> scalar``, and a meta loss ``meta_loss(lam, params, batch)``.
  ``deps`` is any pytree of floating arrays (the meta parameters λ of a bilevel loop, or
  ``{problem_name: params}`` in the DAG engine).
* ``HypergradMethod.best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v)``:
  ``(dθ*/d deps)^T v`` for *all* of ``deps`` (zeros where ``deps`` does not reach θ*), ``v``
  shaped like ``unrolled.params``; ``post_update`` (same arguments) gives the base params to
  continue from (SAMA's nudge ``θ* - ε·v_adapted``; ``unrolled.params`` otherwise).
* ``batch`` is where the implicit methods evaluate second derivatives, the last unrolled batch
  under ``unroll(..., adjoint=...)``; ``itd`` ignores it and replays ``unrolled.batches``.

Sign and scale (implicit function theorem at θ* with Hessian H = ∂²L/∂θ²)::

    (dθ*/dλ)^T v = -(∂²L/∂λ∂θ) H^{-1} v                    cg, neumann, direct
    finite_difference: H^{-1} ≈ I                           -(∂²L/∂λ∂θ) v
    sama:              H^{-1} ≈ I, then optimizer adaptation -(∂²L/∂λ∂θ) P v,  P = -∂u/∂g

where ``u = optimizer.update(g, opt_state, θ*)[0]`` is the optax update.  The learning rate is
inside P (``P = lr·I`` for ``optax.sgd(lr)``) unless ``sama(unit_scale=True)``.

References: S. K. Choe, thesis (CMU 2024), sections 2.3.2 and 3.3 (eqs. 3.2-3.5).
"""

from jaxmlo._src.adjoints import (
    SolveInfo,
    cg,
    cg_solve,
    dense_solve,
    direct,
    finite_difference,
    implicit,
    itd,
    neumann,
    neumann_solve,
    sama,
    sama_adaptation,
    top_eigenvalue,
)
from jaxmlo._src.bilevel import (
    BilevelState,
    HypergradientState,
    HypergradInfo,
    bilevel,
    hypergradient,
    hypergradient_transform,
    meta_step,
)

# The engine shares these tree helpers through this module.
from jaxmlo._src.tree import _add, _first, _last, _norm  # noqa: F401
from jaxmlo._src.unroll import HypergradMethod, Unrolled, unroll

__all__ = [
    "BilevelState",
    "HypergradientState",
    "HypergradInfo",
    "HypergradMethod",
    "SolveInfo",
    "Unrolled",
    "bilevel",
    "cg",
    "cg_solve",
    "dense_solve",
    "direct",
    "finite_difference",
    "hypergradient",
    "hypergradient_transform",
    "implicit",
    "itd",
    "meta_step",
    "neumann",
    "neumann_solve",
    "sama",
    "sama_adaptation",
    "top_eigenvalue",
    "unroll",
]
