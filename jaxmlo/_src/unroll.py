"""The unrolled base problem: T optax steps by ``lax.scan``, differentiated as the adjoint says.

``unroll(..., adjoint=None | itd())`` is plain reverse mode through the loop (optionally with
``jax.checkpoint`` per step).  An implicit adjoint (``cg``, ``neumann``, ``direct``,
``finite_difference``, ``sama``) treats the result as the solution θ*(deps) of the base problem:
the loop is wrapped in ``jax.custom_vjp`` whose backward pass is the adjoint's
best-response-Jacobian-transpose-vector product, so ``jax.grad`` of any function of
``unroll(...).params`` *is* the hypergradient with respect to ``deps``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmlo._src.checks import (
    _check_batches,
    _check_floating,
    _check_opt_state,
    _check_optimizer,
    _check_scalar_loss,
)
from jaxmlo._src.tree import _first, _last

try:  # forward-mode tracers, to refuse jvp through an implicit adjoint with a clear message
    from jax.interpreters.ad import JVPTracer as _JVPTracer
except ImportError:  # pragma: no cover - a JAX without it still refuses jvp, less clearly
    _JVPTracer = ()


class Unrolled(NamedTuple):
    """What unrolling a base problem for T optimizer steps leaves behind."""

    params0: Any  # params before the unroll
    opt_state0: Any  # optimizer state before the unroll
    params: Any  # params after T steps: the approximate optimum θ*
    opt_state: Any  # optimizer state after T steps
    batches: Any  # the T batches used (pytree, leading axis T)
    # ∂L/∂θ of the last step, at θ_{T-1} with its batch (what the optimizer last saw); None
    # where the Unrolled was built by hand.  SAMA's adaptation reads it instead of a new pass.
    grad: Any = None


class HypergradMethod(NamedTuple):
    """How to differentiate through an unrolled base problem: the value ``adjoint=`` takes.

    Made by a factory (``itd()``, ``cg()``, ``neumann()``, ``direct()``,
    ``finite_difference()``, ``sama()``, ``implicit(solve)``), never by hand.

    Attributes:
      name: short name, e.g. ``"cg"``.
      best_response_vjp: ``(loss_fn, optimizer, unrolled, deps, batch, v) -> (dθ*/d deps)^T v``,
        a pytree shaped like ``deps``.
      post_update: ``(loss_fn, optimizer, unrolled, deps, batch, v) -> params`` to continue base
        training from after the meta step (SAMA's nudge; ``unrolled.params`` otherwise).
      local: the method needs only first-order derivatives of the loss at the current batch,
        so data parallelism can take them per shard with one all-reduce per update (SAMA).
      nudges: ``post_update`` moves the base parameters (it is the identity otherwise).
      implicit: :func:`unroll` treats its result as a solution and differentiates it with
        ``best_response_vjp`` (``jax.custom_vjp``) instead of through the loop.
      checkpoint: (reverse mode through the loop) ``jax.checkpoint`` each step.
      best_response_vjp_with_info: like ``best_response_vjp`` but returns
        ``(vjp, SolveInfo)``, the adjoint solve's residual and iteration count.
    """

    name: str
    best_response_vjp: Callable[..., Any]
    post_update: Callable[..., Any]
    local: bool = False
    nudges: bool = False
    implicit: bool = False
    checkpoint: bool = False
    best_response_vjp_with_info: Callable[..., Any] | None = None


def _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches, checkpoint=False):
    """T optax steps; returns ``(params, opt_state, grad)``, ``grad`` the last step's gradient.

    The gradient rides in the carry under ``stop_gradient``: keeping it costs one buffer the
    step computes anyway, and reverse mode through the loop never differentiates it.
    """

    def step(carry, batch):
        p, s, _ = carry
        g = jax.grad(loss_fn)(p, deps, batch)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s, jax.lax.stop_gradient(g)), None

    if checkpoint:
        # Rematerialize each step's activations in the backward pass: memory O(1) in T per step
        # body instead of O(T) saved intermediates, at the price of one extra forward per step.
        step = jax.checkpoint(step)
    g0 = jax.tree.map(jnp.zeros_like, params)
    (params, opt_state, grad), _ = jax.lax.scan(step, (params, opt_state, g0), batches)
    return params, opt_state, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _solution(loss_fn, optimizer, adjoint, params, opt_state, deps, batches):
    return _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches)


def _solution_fwd(loss_fn, optimizer, adjoint, params, opt_state, deps, batches):
    p, s, g = _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches)
    return (p, s, g), Unrolled(params, opt_state, p, s, (deps, batches), g)


def _solution_bwd(loss_fn, optimizer, adjoint, res, cotangents):
    deps, batches = res.batches
    unrolled = res._replace(batches=batches)
    v, _, _ = cotangents  # the implicit view differentiates θ* only, not state or gradient
    g = adjoint.best_response_vjp(loss_fn, optimizer, unrolled, deps, _last(batches), v)
    # θ* of a converged problem depends on deps only: no cotangent for the starting point,
    # the optimizer state or the data.
    return None, None, g, None


_solution.defvjp(_solution_fwd, _solution_bwd)


def _refuse_forward_mode(adjoint, trees):
    if any(isinstance(x, _JVPTracer) for x in jax.tree.leaves(trees)):
        raise TypeError(
            f"unroll(adjoint={adjoint.name}(...)) gives reverse-mode derivatives only "
            "(jax.grad, jax.vjp, jax.jacrev): an implicit adjoint is a custom_vjp and has no "
            "forward mode (jax.jvp, jax.jacfwd, jax.hessian). Use adjoint=itd() to "
            "differentiate through the loop in either mode."
        )


def unroll(loss_fn, optimizer, params, opt_state, deps, batches, *, adjoint=None) -> Unrolled:
    """Run T optax steps on ``loss_fn(·, deps, batch)`` by ``lax.scan`` over ``batches``.

    Args:
      loss_fn: ``loss_fn(params, deps, batch) -> scalar`` base loss.
      optimizer: an ``optax.GradientTransformation``.
      params: base parameters θ_0 (pytree).
      opt_state: ``optimizer.init(params)`` or a later state of the same optimizer.
      deps: pytree the loss depends on (meta parameters λ).
      batches: pytree whose leaves have a leading axis T, one slice per step.
      adjoint: how ``jax.grad``/``jax.vjp`` differentiate ``Unrolled.params`` with respect to
        ``deps``: ``None`` or ``itd()`` differentiate through the loop (``itd(checkpoint=True)``
        rematerializes each step); an implicit adjoint (``cg()``, ``neumann()``, ``direct()``,
        ``finite_difference()``, ``sama()``) differentiates the solution θ*(deps) by its
        best-response Jacobian at the last batch, reverse mode only.  Under an implicit adjoint
        the derivative with respect to ``params``, ``opt_state`` and ``batches`` is zero, and
        only ``Unrolled.params`` carries the derivative (``opt_state`` is not differentiated).
        SAMA's nudge is not part of the derivative; :func:`hypergradient_transform` and
        :func:`bilevel` apply it.

    Returns:
      ``Unrolled(params0, opt_state0, params, opt_state, batches, grad)``, ``grad`` the
      gradient of the last step (not differentiated).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxmlo
      >>> loss = lambda w, lam, x: 0.5 * jnp.sum((w - lam * x) ** 2)
      >>> opt = optax.sgd(0.5)
      >>> def val(lam):
      ...     w0 = jnp.zeros(2)
      ...     un = jaxmlo.unroll(loss, opt, w0, opt.init(w0), lam, jnp.ones((50, 2)),
      ...                        adjoint=jaxmlo.cg(tol=1e-10))
      ...     return jnp.sum(un.params)
      >>> print(round(float(jax.grad(val)(1.0)), 6))  # θ* = λ·x, d(Σθ*)/dλ = Σx = 2
      2.0
    """
    _check_optimizer(optimizer)
    _check_batches(batches)
    _check_opt_state(optimizer, params, opt_state)
    _check_floating("params", params)
    _check_scalar_loss("loss_fn", loss_fn, params, deps, _first(batches))
    if adjoint is not None and not isinstance(adjoint, HypergradMethod):
        raise TypeError(
            "adjoint must be None or a HypergradMethod (itd(), cg(), neumann(), direct(), "
            f"finite_difference(), sama()), got {type(adjoint).__name__}."
        )
    if adjoint is None or not adjoint.implicit:
        checkpoint = adjoint is not None and adjoint.checkpoint
        p, s, g = _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches, checkpoint)
    else:
        _check_floating("deps", deps)
        _refuse_forward_mode(adjoint, (params, opt_state, deps, batches))
        p, s, g = _solution(loss_fn, optimizer, adjoint, params, opt_state, deps, batches)
    return Unrolled(params, opt_state, p, s, batches, g)
