"""Adjoints: best-response-Jacobian-transpose-vector products ``(dθ*/d deps)^T v``.

One implicit core, :func:`implicit`, solves ``(H + damping·I) x = v`` with a pluggable linear
``solve(matvec, b) -> (x, SolveInfo)`` on Hessian-vector products and returns
``-(∂²L/∂deps∂θ) x``; :func:`cg`, :func:`neumann` and :func:`direct` differ only in the solve.
:func:`finite_difference` and :func:`sama` replace ``H^{-1}`` by the identity (SAMA after the
optimizer's own adaptation); :func:`itd` differentiates through the unrolled loop.

References: S. K. Choe, thesis (CMU 2024), sections 2.3.2 and 3.3 (eqs. 3.2-3.5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxmlo._src.checks import (
    _check_floating,
    _check_int,
    _check_optimizer,
    _check_real,
    _check_same_tree,
    _check_scalar_loss,
)
from jaxmlo._src.tree import (
    _add,
    _all_finite,
    _axpy,
    _cast_like,
    _first,
    _float_dtype,
    _norm,
    _scale,
    _vdot,
)
from jaxmlo._src.unroll import HypergradMethod, Unrolled, _scan_steps


class SolveInfo(NamedTuple):
    """How the adjoint linear solve went; every field is a JAX value (usable under jit).

    Methods without a linear solve (itd, finite_difference, sama) report zeros and
    ``converged=True``.
    """

    residual: jax.Array  # float []: relative residual ‖(H + damping·I) x − v‖ / ‖v‖
    iterations: jax.Array  # int32 []: Hessian-vector products spent in the solve
    converged: jax.Array  # bool []: residual finite and within the solver's tolerance


def _no_solve(v) -> SolveInfo:
    return SolveInfo(
        residual=jnp.zeros((), _float_dtype(v)),
        iterations=jnp.zeros((), jnp.int32),
        converged=jnp.asarray(True),
    )


# --------------------------------------------------------------------------------------------
# Linear solves: solve(matvec, b) -> (x, SolveInfo), matvec symmetric, on pytrees
# --------------------------------------------------------------------------------------------


def _rel(num, den):
    return num / jnp.where(den > 0, den, 1.0)


def cg_solve(matvec: Callable, b, *, tol: float = 1e-6, maxiter: int = 100):
    """Conjugate gradient for a symmetric positive definite ``matvec``, stopping at
    ``‖r‖ ≤ tol·‖b‖`` or after ``maxiter`` products; the residual is CG's recursive one."""
    b_norm = _norm(b)
    stop = (tol * b_norm) ** 2

    def cond(c):
        *_, rs, k = c
        return (k < maxiter) & (rs > stop)

    def body(c):
        x, r, p, rs, k = c
        ap = matvec(p)
        alpha = rs / _vdot(p, ap)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _vdot(r, r)
        p = _axpy(rs_new / rs, p, r)
        return x, r, p, rs_new, k + 1

    x0 = jax.tree.map(jnp.zeros_like, b)
    init = (x0, b, b, _vdot(b, b), jnp.zeros((), jnp.int32))
    x, _, _, rs, k = jax.lax.while_loop(cond, body, init)
    residual = _rel(jnp.sqrt(rs), b_norm)
    return x, SolveInfo(residual, k, jnp.isfinite(residual) & (residual <= tol))


def top_eigenvalue(matvec: Callable, like, iterations: int = 20):
    """Largest eigenvalue of a symmetric ``matvec`` by power iteration (Rayleigh quotient),
    from a fixed pseudo-random start shaped like the pytree ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
    x = jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, jnp.shape(a), jnp.result_type(a)) for k, a in zip(keys, leaves)],
    )

    def body(_, c):
        x, _ = c
        x = _scale(1.0 / _norm(x), x)
        y = matvec(x)
        return y, _vdot(x, y)

    _, lam = jax.lax.fori_loop(0, iterations, body, (x, jnp.zeros((), _float_dtype(like))))
    return lam


def neumann_solve(matvec: Callable, b, *, lr, tol: float = 1e-6, maxiter: int = 20):
    """Neumann series ``x = lr Σ_{k<K} (I − lr A)^k b``, ``K ≤ maxiter`` terms, stopping at
    ``‖r‖ ≤ tol·‖b‖``.  The residual of the partial sum is the next term,
    ``b − A x = (I − lr A)^K b``, so it is known for free."""
    b_norm = _norm(b)

    def cond(c):
        p, _, k = c
        return (k < maxiter) & (_norm(p) > tol * b_norm)

    def body(c):
        p, acc, k = c
        return _axpy(-lr, matvec(p), p), _add(acc, p), k + 1

    init = (b, jax.tree.map(jnp.zeros_like, b), jnp.zeros((), jnp.int32))
    p, acc, k = jax.lax.while_loop(cond, body, init)
    residual = _rel(_norm(p), b_norm)
    return _scale(lr, acc), SolveInfo(residual, k, jnp.isfinite(residual) & (residual <= tol))


def dense_solve(matvec: Callable, b, *, max_size: int = 4096):
    """Build the matrix from ``n`` products (``vmap`` over the identity) and solve it densely;
    converged when the true residual is finite and at most ``sqrt(eps)`` of the dtype."""
    flat_b, unravel = ravel_pytree(b)
    n = flat_b.size
    if n > max_size:
        raise ValueError(
            f"direct() builds the {n}x{n} Hessian, above max_size={max_size}; use cg() or "
            "neumann() for problems this size, or raise max_size."
        )
    eye = jnp.eye(n, dtype=flat_b.dtype)
    a = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(eye).T
    x = jnp.linalg.solve(a, flat_b)
    residual = _rel(jnp.linalg.norm(a @ x - flat_b), jnp.linalg.norm(flat_b))
    tol = float(np.sqrt(np.finfo(flat_b.dtype).eps))
    info = SolveInfo(
        residual, jnp.asarray(n, jnp.int32), jnp.isfinite(residual) & (residual <= tol)
    )
    return unravel(x), info


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v):
    _check_optimizer(optimizer)
    if not isinstance(unrolled, Unrolled):
        raise TypeError(
            f"unrolled must be an Unrolled (from unroll()), got {type(unrolled).__name__}."
        )
    _check_floating("deps", deps)
    _check_same_tree("v", v, unrolled.params, "unrolled.params")
    _check_scalar_loss("loss_fn", loss_fn, unrolled.params, deps, batch)


def _mixed_jvp(loss_fn, params, deps, batch, x):
    """``(∂²L/∂deps∂θ) x`` as the derivative of ``∇_deps L`` along ``x`` (forward over reverse:
    cheaper than reverse over the map deps -> ∂L/∂θ, and no backward pass through the model
    where deps enter the loss after it, as per-example weights do)."""
    grad_deps = jax.grad(loss_fn, argnums=1)
    return jax.jvp(lambda p: grad_deps(p, deps, batch), (params,), (x,))[1]


def _after_solve(x, fn, loss_fn, params, deps, batch):
    """``fn(loss_fn, params, deps, batch, x)`` in a ``lax.cond`` on ``x`` being finite (NaN
    otherwise, which the product would give anyway).

    The primal passes of a product along ``x`` do not depend on ``x``, so XLA is free to run
    them before the solve and keep their activations alive through it (measured: +1.3 of the
    plain step's peak on a transformer; an optimization barrier around ``(params, x)`` does
    not prevent it). Inside a branch chosen by ``x`` they can only run after the solve.
    """

    def product():
        return fn(loss_fn, params, deps, batch, x)

    def nans():
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), jax.eval_shape(product))

    return jax.lax.cond(_all_finite(x), product, nans)


def _hvp(loss_fn, params, deps, batch, x):
    """``H x`` with H = ∂²L/∂θ², forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, deps, batch), (params,), (x,))[1]


_HVP_MODES = ("recompute", "linearize")


def _hvp_map(loss_fn, params, deps, batch, mode):
    """``x -> H x`` for a solver's loop.

    ``"recompute"``: each product differentiates the gradient afresh.  θ passes through an
    optimization barrier with ``x``, so XLA cannot hoist the primal forward and backward passes
    out of the loop (hoisted, their activations stay alive over the whole solve); a product's
    activations live only during that product.  ``"linearize"``: ``jax.linearize`` once, so the
    primal passes run once and their residuals are held through the solve; each product
    applies the linear map.
    """
    if mode == "linearize":
        return jax.linearize(lambda p: jax.grad(loss_fn)(p, deps, batch), params)[1]

    def hvp(x):
        p, x = jax.lax.optimization_barrier((params, x))
        return _hvp(loss_fn, p, deps, batch, x)

    return hvp


def _central_difference(loss_fn, params, deps, batch, x, eps_scale):
    """``-(∇_deps L(θ+εx) - ∇_deps L(θ-εx)) / 2ε`` with ε = eps_scale/‖x‖ (≈ -(∂²L/∂deps∂θ) x)."""
    norm = _norm(x)
    # ‖x‖ = 0 gives g+ = g- and a zero result; avoid 0/0 in ε.
    eps = eps_scale / jnp.where(norm > 0, norm, 1.0)
    grad_deps = jax.grad(loss_fn, argnums=1)
    g_plus = grad_deps(_axpy(eps, x, params), deps, batch)
    g_minus = grad_deps(_axpy(-eps, x, params), deps, batch)
    return jax.tree.map(lambda a, b: ((b - a) / (2 * eps)).astype(a.dtype), g_plus, g_minus), eps


def _identity_post_update(loss_fn, optimizer, unrolled, deps, batch, v):
    del loss_fn, optimizer, deps, batch, v
    return unrolled.params


def _raise_failed(ok, residual, iterations, name):
    if not np.all(ok):
        raise FloatingPointError(
            f"adjoint {name!r}: the linear solve did not converge or gave non-finite values "
            f"(relative residual {np.max(residual):.3g} after {np.max(iterations)} Hessian-vector "
            "products); raise maxiter, add damping, or (neumann) lower lr"
        )


def _method(name, with_info, post_update=_identity_post_update, **attrs) -> HypergradMethod:
    return HypergradMethod(
        name,
        lambda *args: with_info(*args)[0],
        post_update,
        best_response_vjp_with_info=with_info,
        **attrs,
    )


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def itd(checkpoint: bool = False) -> HypergradMethod:
    """Iterative differentiation: reverse mode through the unrolled optax updates.

    As ``unroll(..., adjoint=itd())`` this is plain ``jax.grad`` through the ``lax.scan``.
    ``best_response_vjp`` replays ``unrolled.batches`` from ``(unrolled.params0,
    unrolled.opt_state0)`` as a function of ``deps`` and pulls ``v`` back through it (``batch``
    is unused).  Exact for the unrolled loop, optimizer state included.

    Cost: T forward steps are replayed (``Unrolled`` keeps no residuals) and pulled back, so
    about 3x the unroll; memory O(T) saved steps, O(1) per step with ``checkpoint``.

    Args:
      checkpoint: rematerialize each step in the backward pass (``jax.checkpoint``).
    """
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {checkpoint!r}.")

    def with_info(loss_fn, optimizer, unrolled, deps, batch, v):
        del batch  # ITD replays unrolled.batches
        first = _first(unrolled.batches)
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, first, v)

        def run(d):
            return _scan_steps(
                loss_fn,
                optimizer,
                unrolled.params0,
                unrolled.opt_state0,
                d,
                unrolled.batches,
                checkpoint,
            )[0]

        _, pullback = jax.vjp(run, deps)
        return _cast_like(pullback(v)[0], deps), _no_solve(v)

    return _method("itd", with_info, checkpoint=checkpoint)


def implicit(
    solve: Callable,
    *,
    damping: float = 0.0,
    name: str = "implicit",
    throw: bool = False,
    hvp: str = "recompute",
) -> HypergradMethod:
    """Implicit differentiation at θ* with a pluggable linear solve.

    ``(dθ*/d deps)^T v = -(∂²L/∂deps∂θ) x`` with ``(H + damping·I) x = v``, H = ∂²L/∂θ² at
    ``(unrolled.params, deps, batch)``.  The system is handed to
    ``solve(matvec, b) -> (x, SolveInfo)`` through ``jax.lax.custom_linear_solve``, so the
    result is differentiable even when ``solve`` is a ``while_loop``.

    Args:
      solve: ``solve(matvec, b) -> (x, SolveInfo)``; ``matvec`` maps a params-shaped pytree to
        ``(H + damping·I)`` times it (symmetric).
      damping: added to the Hessian's diagonal (needed where H is not positive definite).
      name: the method's name in messages and metrics.
      throw: raise ``FloatingPointError`` (a ``JaxRuntimeError`` under jit) when the solve did
        not converge or the result is not finite; otherwise only ``SolveInfo`` reports it.
      hvp: how ``matvec`` gets its Hessian-vector products.  ``"recompute"`` (default): each
        product runs the model's forward and backward passes afresh, so the solve holds one
        product's activations at a time (measured in docs/hypergradients.md).
        ``"linearize"``: the primal passes run once before the solve and their residuals stay
        alive through it; each product then costs the tangent passes only (faster per
        product, more memory).

    Example:
      >>> import jax.numpy as jnp, jaxmlo
      >>> def jacobi(matvec, b):  # exact for a diagonal H
      ...     d = matvec(jnp.ones_like(b))
      ...     x = b / d
      ...     res = jnp.linalg.norm(matvec(x) - b) / jnp.linalg.norm(b)
      ...     return x, jaxmlo.SolveInfo(res, jnp.int32(1), res < 1e-6)
      >>> method = jaxmlo.implicit(jacobi, name="jacobi")
    """
    if not callable(solve):
        raise TypeError(
            f"solve must be callable solve(matvec, b) -> (x, SolveInfo), got {solve!r}."
        )
    damping = _check_real("damping", damping)
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be a bool, got {throw!r}.")
    if hvp not in _HVP_MODES:
        raise ValueError(f"hvp must be one of {_HVP_MODES}, got {hvp!r}.")

    def with_info(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        theta = unrolled.params
        h = _hvp_map(loss_fn, theta, deps, batch, hvp)

        def matvec(x):
            hx = h(x)
            return _axpy(damping, x, hx) if damping else hx

        x, info = jax.lax.custom_linear_solve(
            matvec, v, lambda mv, b: solve(mv, b), symmetric=True, has_aux=True
        )
        out = _cast_like(
            _scale(-1.0, _after_solve(x, _mixed_jvp, loss_fn, theta, deps, batch)), deps
        )
        if throw:
            ok = info.converged & _all_finite(out)
            jax.debug.callback(_raise_failed, ok, info.residual, info.iterations, name)
        return out, info

    return _method(name, with_info, implicit=True)


def cg(
    maxiter: int = 100,
    tol: float = 1e-6,
    damping: float = 0.0,
    *,
    throw: bool = False,
    hvp: str = "recompute",
) -> HypergradMethod:
    """Implicit differentiation with conjugate gradient: ``-(∂²L/∂λ∂θ) (H + damping·I)^{-1} v``.

    Args:
      maxiter: maximum CG iterations (Hessian-vector products).
      tol: relative residual tolerance ``‖r‖ ≤ tol·‖v‖``.
      damping: added to the Hessian's diagonal (needed where H is not positive definite).
      throw: raise under jit when CG did not reach ``tol`` (see :func:`implicit`).
      hvp: ``"recompute"`` or ``"linearize"`` (memory against time, see :func:`implicit`).
    """
    maxiter = _check_int("maxiter", maxiter, 1)
    tol = _check_real("tol", tol)
    solve = functools.partial(cg_solve, tol=tol, maxiter=maxiter)
    return implicit(solve, damping=damping, name="cg", throw=throw, hvp=hvp)


def neumann(
    steps: int = 20,
    lr: float | None = None,
    *,
    tol: float = 1e-6,
    damping: float = 0.0,
    power_iterations: int = 20,
    throw: bool = False,
    hvp: str = "recompute",
) -> HypergradMethod:
    """Implicit differentiation with a Neumann series: ``H^{-1} ≈ lr Σ_{k<K} (I - lr H)^k``.

    The series converges when ``0 < lr < 2 / λ_max(H)``.  By default ``lr = 1/λ_max`` with
    ``λ_max`` estimated by ``power_iterations`` Hessian-vector products (power iteration), so
    the default converges on a positive definite H at the rate ``1 - λ_min/λ_max`` per term.

    Args:
      steps: maximum number of terms K (one Hessian-vector product each).
      lr: series step size; ``None`` estimates it from the top eigenvalue.
      tol: stop early at relative residual ``‖r‖ ≤ tol·‖v‖`` (also the convergence test).
      damping: added to the Hessian's diagonal.
      power_iterations: Hessian-vector products of the power iteration (``lr=None`` only).
      throw: raise under jit when the series did not reach ``tol`` (see :func:`implicit`).
      hvp: ``"recompute"`` or ``"linearize"`` (memory against time, see :func:`implicit`).
    """
    steps = _check_int("steps", steps, 1)
    if lr is not None:
        lr = _check_real("lr", lr, positive=True)
    tol = _check_real("tol", tol)
    power_iterations = _check_int("power_iterations", power_iterations, 1)

    def solve(matvec, b):
        step = 1.0 / top_eigenvalue(matvec, b, power_iterations) if lr is None else lr
        return neumann_solve(matvec, b, lr=step, tol=tol, maxiter=steps)

    return implicit(solve, damping=damping, name="neumann", throw=throw, hvp=hvp)


def direct(damping: float = 0.0, *, max_size: int = 4096, throw: bool = False) -> HypergradMethod:
    """Implicit differentiation with a dense solve: H built from n Hessian-vector products.

    Exact up to rounding for small problems (n = number of base parameters ≤ ``max_size``);
    a reference for the iterative solvers.

    Args:
      damping: added to the Hessian's diagonal.
      max_size: largest n accepted (the n×n Hessian is materialized).
      throw: raise under jit when the solve is not finite or its residual exceeds
        ``sqrt(eps)`` (see :func:`implicit`).
    """
    max_size = _check_int("max_size", max_size, 1)
    solve = functools.partial(dense_solve, max_size=max_size)
    return implicit(solve, damping=damping, name="direct", throw=throw)


def finite_difference(eps: float = 0.01) -> HypergradMethod:
    """DARTS / T1-T2: identity inverse Hessian, central difference of ∂L/∂λ at θ* ± ε v.

    Returns ``-(∇_λ L(θ*+εv) - ∇_λ L(θ*-εv)) / 2ε ≈ -(∂²L/∂λ∂θ) v`` with ``ε = eps / ‖v‖``.
    No second derivative is taken.

    Args:
      eps: perturbation norm (``ε‖v‖``); DARTS uses 0.01.
    """
    eps = _check_real("eps", eps, positive=True)

    def with_info(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        out, _ = _central_difference(loss_fn, unrolled.params, deps, batch, v, eps)
        return _cast_like(out, deps), _no_solve(v)

    return _method("finite_difference", with_info, implicit=True)


_ADAPT_AT = ("last_step", "solution")


def sama_adaptation(loss_fn, optimizer, unrolled, deps, batch, v, *, at: str = "last_step"):
    """SAMA's algorithmic adaptation ``P v = -(∂u/∂g) v`` at the unrolled optimizer state.

    ``u(g) = optimizer.update(g, unrolled.opt_state, unrolled.params)[0]`` is the optax update
    (added to θ), so ``P = lr·I`` for ``optax.sgd(lr)``; one ``jax.jvp`` of ``u`` at a base
    gradient ``g`` gives ``P v`` for any optax optimizer.  For element-wise optimizers (sgd,
    momentum, adam, adamw, rmsprop, ...) P is diagonal, hence symmetric, and ``P v`` is also
    the transposed product the chain rule asks for.  Entries whose gradient is exactly zero and
    whose derivative is not finite (Adam with an all-zero history: ``0·∞``) are adapted by 0.

    Args:
      loss_fn, optimizer, unrolled, deps, batch, v: as in ``best_response_vjp``.
      at: where ``g`` is taken.  ``"last_step"``: ``unrolled.grad``, the gradient of the
        unroll's last step (at θ_{T-1}, the one the optimizer last saw, as Betty does), at no
        cost; where ``unrolled.grad`` is None (an ``Unrolled`` built by hand) it falls back to
        ``"solution"``.  ``"solution"``: ``∂L/∂θ(θ*, deps, batch)`` at the unroll's result,
        one more forward and backward pass through the model.
    """
    if at not in _ADAPT_AT:
        raise ValueError(f"at must be one of {_ADAPT_AT}, got {at!r}.")
    theta = unrolled.params
    if at == "last_step" and unrolled.grad is not None:
        _check_same_tree("unrolled.grad", unrolled.grad, theta, "unrolled.params")
        g = unrolled.grad
    else:
        g = jax.grad(loss_fn)(theta, deps, batch)
    _, du = jax.jvp(lambda gg: optimizer.update(gg, unrolled.opt_state, theta)[0], (g,), (v,))
    # Adam-like updates m/(sqrt(s)+eps) differentiate to 0 * inf = NaN where the gradient and its
    # whole second-moment history are exactly zero (dead ReLU units, embedding rows not in the
    # batch).  Such entries carry no gradient signal: adapt them by 0 (Betty's formula gives 0
    # there too).  Non-finite values anywhere else are kept and reported.
    du = jax.tree.map(
        lambda d, gg: jnp.where(jnp.isfinite(d) | (gg != 0), d, jnp.zeros_like(d)), du, g
    )
    return jax.tree.map(lambda d, p: (-d).astype(jnp.result_type(p)), du, theta)


def _unit(pv, v):
    """``P v`` rescaled to the norm of ``v`` (``v`` itself where the adaptation vanishes)."""
    npv, nv = _norm(pv), _norm(v)
    scaled = _scale(nv / jnp.where(npv > 0, npv, 1.0), pv)
    return jax.tree.map(lambda a, b: jnp.where(npv > 0, a, b), scaled, v)


def sama(
    alpha: float = 1.0,
    nudge: bool = True,
    *,
    unit_scale: bool = False,
    adaptation: str = "last_step",
) -> HypergradMethod:
    """SAMA (thesis eq. 3.5): identity base Jacobian, optimizer adaptation, central difference.

    ``(dθ*/dλ)^T v ≈ -(∇_λ L(θ*+εPv) - ∇_λ L(θ*-εPv)) / 2ε`` with ``P v`` from
    :func:`sama_adaptation` and ``ε = alpha / ‖P v‖``.  ``post_update`` nudges the base
    parameters along the adapted direct gradient, ``θ ← θ* - ε P v`` (a step of norm
    ``alpha``), when ``nudge`` is true.

    **Scale.**  P carries the base learning rate: with ``optax.sgd(lr)``, ``P = lr·I`` and
    ``sama`` returns ``lr × finite_difference``; on a multi-level path each SAMA hop multiplies
    by its lr, so the terms are weighted ``lr^hops``, a zero learning rate gives a zero
    hypergradient and a decaying schedule decays it.  ``unit_scale=True`` rescales ``P v`` to
    the norm of ``v`` (keeping the optimizer's direction), so SAMA with SGD equals
    ``finite_difference(eps=alpha)`` at any lr, and with Adam the result is free of the lr.

    **The nudge trains the base model on the meta objective.**  ``θ ← θ* - εPv`` is a step of
    norm ``alpha`` down the meta loss's gradient on the base parameters.  On data reweighting
    (``python -m benchmarks.mwn_digits``, long-tailed digits, balanced test accuracy at
    imbalance 10 / 50) most of the gain is the nudge's: plain 88.2/76.7 %, sama 90.7/87.7 %,
    sama without nudge 87.9/75.3 %, finite_difference 88.0/76.2 %, and plain training on the
    training and meta data together does better still, 93.2/92.1 %.  Compare against that
    control before crediting the reweighting.

    Args:
      alpha: perturbation norm of the central difference and of the nudge (1.0 in the thesis).
      nudge: apply the base-parameter update after each meta step.
      unit_scale: rescale ``P v`` to ``‖v‖`` (see above).
      adaptation: the gradient ``P`` is taken at (``at`` of :func:`sama_adaptation`).
        ``"last_step"`` (default) reuses the unroll's last gradient: a meta step is then one
        base forward+backward, one meta forward+backward and the central difference's two
        evaluations.  ``"solution"`` takes a new gradient at θ*: one more forward and backward.
    """
    alpha = _check_real("alpha", alpha, positive=True)
    if not isinstance(nudge, bool) or not isinstance(unit_scale, bool):
        raise TypeError(f"nudge and unit_scale must be bools, got {nudge!r}, {unit_scale!r}.")
    if adaptation not in _ADAPT_AT:
        raise ValueError(f"adaptation must be one of {_ADAPT_AT}, got {adaptation!r}.")

    def adapted(loss_fn, optimizer, unrolled, deps, batch, v):
        pv = sama_adaptation(loss_fn, optimizer, unrolled, deps, batch, v, at=adaptation)
        return _unit(pv, v) if unit_scale else pv

    def with_info(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        pv = adapted(loss_fn, optimizer, unrolled, deps, batch, v)
        out, _ = _central_difference(loss_fn, unrolled.params, deps, batch, pv, alpha)
        return _cast_like(out, deps), _no_solve(v)

    def post_update(loss_fn, optimizer, unrolled, deps, batch, v):
        if not nudge:
            return unrolled.params
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        pv = adapted(loss_fn, optimizer, unrolled, deps, batch, v)
        norm = _norm(pv)
        eps = alpha / jnp.where(norm > 0, norm, 1.0)
        return _axpy(-eps, pv, unrolled.params)

    return _method("sama", with_info, post_update, local=True, nudges=nudge, implicit=True)
