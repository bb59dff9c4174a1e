"""Best-response-Jacobian-transpose-vector products: ITD, CG, Neumann, finite difference, SAMA.

Contract A (as implemented; signatures are final):

* ``loss_fn(params, deps, batch) -> scalar``. ``deps`` is any pytree of floating arrays (the meta
  parameters λ of a bilevel loop, or ``{problem_name: params}`` in the DAG engine).
* ``unroll(loss_fn, optimizer, params, opt_state, deps, batches) -> Unrolled``: T optax steps by
  ``lax.scan`` over the leading axis of ``batches``.
* ``HypergradMethod(name, best_response_vjp, post_update)`` with

  - ``best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v) -> deps-shaped pytree``:
    ``(dθ*/d deps)^T v`` for *all* of ``deps`` (zeros where ``deps`` does not reach θ*), ``v``
    shaped like ``unrolled.params``.
  - ``post_update(loss_fn, optimizer, unrolled, deps, batch, v) -> params``: the base params to
    continue from after a meta step (same arguments as ``best_response_vjp``).  SAMA returns
    ``θ* - ε·v_adapted`` (the nudge); every other method returns ``unrolled.params``.

* ``batch`` is where the implicit methods (cg, neumann, finite_difference, sama) evaluate second
  derivatives, typically the last unrolled batch; ``itd`` ignores it and replays
  ``unrolled.batches``.

Sign and scale conventions (implicit function theorem at θ* with Hessian H = ∂²L/∂θ²)::

    (dθ*/dλ)^T v = -(∂²L/∂λ∂θ) H^{-1} v                    cg, neumann (exact at convergence)
    finite_difference: H^{-1} ≈ I                           -(∂²L/∂λ∂θ) v
    sama:              H^{-1} ≈ I, then optimizer adaptation -(∂²L/∂λ∂θ) P v,  P = -∂u/∂g

where ``u = optimizer.update(g, opt_state, θ*)[0]`` is the optax update (added to θ), taken at
the unrolled optimizer state and the base gradient ``g = ∂L/∂θ(θ*)``.  **The learning rate is
inside P**: for ``optax.sgd(lr)`` P = lr·I, so ``sama`` equals ``lr × finite_difference`` (up to
the central difference) and is exactly the meta gradient of one more optimizer step taken from a
frozen θ*.  For Adam, P is the diagonal ``γ ∂(m̂/(√v̂+ε))/∂g`` of thesis eq. 3.4, bias
correction included.  Meta optimizers such as Adam are invariant to that scale; with plain SGD
on λ, fold it into the meta learning rate.

References: S. K. Choe, thesis (CMU 2024), sections 2.3.2 and 3.3 (eqs. 3.2-3.5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "Unrolled",
    "HypergradMethod",
    "HypergradInfo",
    "BilevelState",
    "unroll",
    "itd",
    "cg",
    "neumann",
    "finite_difference",
    "sama",
    "sama_adaptation",
    "hypergradient",
    "meta_step",
]


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


class Unrolled(NamedTuple):
    """What unrolling a base problem for T optimizer steps leaves behind."""

    params0: Any  # params before the unroll
    opt_state0: Any  # optimizer state before the unroll
    params: Any  # params after T steps: the approximate optimum θ*
    opt_state: Any  # optimizer state after T steps
    batches: Any  # the T batches used (pytree, leading axis T)


class HypergradMethod(NamedTuple):
    """A best-response-Jacobian method: a value made by a factory (``cg(...)``, ``sama(...)``).

    Attributes:
      name: short name, e.g. ``"cg"``.
      best_response_vjp: ``(loss_fn, optimizer, unrolled, deps, batch, v) -> (dθ*/d deps)^T v``,
        a pytree shaped like ``deps``.
      post_update: ``(loss_fn, optimizer, unrolled, deps, batch, v) -> params`` to continue base
        training from after the meta step (SAMA's nudge; ``unrolled.params`` otherwise).
      local: the method needs only first-order derivatives of the loss at the current batch,
        so data parallelism can take them per shard with one all-reduce per update (SAMA).
      nudges: ``post_update`` moves the base parameters (it is the identity otherwise).
    """

    name: str
    best_response_vjp: Callable[..., Any]
    post_update: Callable[..., Any]
    local: bool = False
    nudges: bool = False


class HypergradInfo(NamedTuple):
    """Diagnostics of one hypergradient; every field is a JAX value (usable under jit)."""

    finite: jax.Array  # bool []: hypergradient and direct gradient ∂L_meta/∂θ* are all finite
    meta_loss: jax.Array  # [] meta loss at θ*
    params: Any  # base params to continue from (post_update applied only when finite)


class BilevelState(NamedTuple):
    """State of a plain bilevel loop driven by :func:`meta_step`."""

    params: Any  # base parameters θ
    opt_state: Any  # base optimizer state
    lam: Any  # meta parameters λ
    meta_opt_state: Any  # meta optimizer state


# --------------------------------------------------------------------------------------------
# Validation (trace time: structures, shapes and dtypes are static)
# --------------------------------------------------------------------------------------------


def _struct(tree):
    return jax.tree.structure(tree), [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)
    ]


def _check_optimizer(optimizer):
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )


def _check_same_tree(name, tree, ref, ref_name):
    t, leaves = _struct(tree)
    rt, rleaves = _struct(ref)
    if t != rt:
        raise ValueError(f"{name} must have the same pytree structure as {ref_name}: {t} vs {rt}.")
    for i, ((s, _), (rs, _)) in enumerate(zip(leaves, rleaves)):
        if s != rs:
            raise ValueError(f"{name} leaf {i} has shape {s} but {ref_name} has shape {rs}.")


def _check_opt_state(optimizer, params, opt_state, name="opt_state"):
    expected = jax.eval_shape(optimizer.init, params)
    if jax.tree.structure(opt_state) != jax.tree.structure(expected):
        raise ValueError(
            f"{name} does not match optimizer.init(params): it was made by another optimizer or "
            f"for other params (structure {jax.tree.structure(opt_state)} vs expected "
            f"{jax.tree.structure(expected)})."
        )
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(expected)):
        if jnp.shape(a) != b.shape:
            raise ValueError(
                f"{name} has a leaf of shape {jnp.shape(a)} where optimizer.init(params) has "
                f"{b.shape}: it was made for other params."
            )


def _check_floating(name, tree):
    for x in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise TypeError(
                f"{name} must hold floating-point arrays only, got dtype {jnp.result_type(x)}."
            )


def _check_scalar_loss(name, fn, *args):
    out = jax.eval_shape(fn, *args)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"{name} must return a scalar, got {shape}.")


def _check_batches(batches):
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches must be a non-empty pytree with a leading axis T (steps).")
    lens = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in lens or len(lens) != 1:
        raise ValueError(
            f"batches leaves must share one leading axis T (the unroll steps), got leading sizes {lens}."
        )


def _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v):
    _check_optimizer(optimizer)
    if not isinstance(unrolled, Unrolled):
        raise TypeError(
            f"unrolled must be an Unrolled (from unroll()), got {type(unrolled).__name__}."
        )
    _check_floating("deps", deps)
    _check_same_tree("v", v, unrolled.params, "unrolled.params")
    _check_scalar_loss("loss_fn", loss_fn, unrolled.params, deps, batch)


# --------------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------------


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _axpy(alpha, x, y):  # alpha * x + y, alpha a traced scalar, dtype of y kept
    return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def _scale(alpha, x):
    return jax.tree.map(lambda xi: (alpha * xi).astype(xi.dtype), x)


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


# --------------------------------------------------------------------------------------------
# Unroll
# --------------------------------------------------------------------------------------------


def _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches, checkpoint=False):
    def step(carry, batch):
        p, s = carry
        g = jax.grad(loss_fn)(p, deps, batch)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    if checkpoint:
        # Rematerialize each step's activations in the backward pass: memory O(1) in T per step
        # body instead of O(T) saved intermediates, at the price of one extra forward per step.
        step = jax.checkpoint(step)
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state


def unroll(loss_fn, optimizer, params, opt_state, deps, batches) -> Unrolled:
    """Run T optax steps on ``loss_fn(·, deps, batch)`` by ``lax.scan`` over ``batches``.

    Args:
      loss_fn: ``loss_fn(params, deps, batch) -> scalar`` base loss.
      optimizer: an ``optax.GradientTransformation``.
      params: base parameters θ_0 (pytree).
      opt_state: ``optimizer.init(params)`` or a later state of the same optimizer.
      deps: pytree the loss depends on (meta parameters λ).
      batches: pytree whose leaves have a leading axis T, one slice per step.

    Returns:
      ``Unrolled(params0, opt_state0, params, opt_state, batches)``.
    """
    _check_optimizer(optimizer)
    _check_batches(batches)
    _check_opt_state(optimizer, params, opt_state)
    _check_floating("params", params)
    first = _first(batches)
    _check_scalar_loss("loss_fn", loss_fn, params, deps, first)
    p, s = _scan_steps(loss_fn, optimizer, params, opt_state, deps, batches)
    return Unrolled(params, opt_state, p, s, batches)


# --------------------------------------------------------------------------------------------
# Shared pieces of the implicit methods
# --------------------------------------------------------------------------------------------


def _mixed_vjp(loss_fn, params, deps, batch, x):
    """``(∂²L/∂deps∂θ) x``: reverse over the map deps -> ∂L/∂θ."""
    _, pullback = jax.vjp(lambda d: jax.grad(loss_fn)(params, d, batch), deps)
    (out,) = pullback(x)
    return out


def _hvp(loss_fn, params, deps, batch, x):
    """``H x`` with H = ∂²L/∂θ², forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, deps, batch), (params,), (x,))[1]


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


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def itd(checkpoint: bool = False) -> HypergradMethod:
    """Iterative differentiation: reverse mode through the unrolled optax updates.

    Replays ``unrolled.batches`` from ``(unrolled.params0, unrolled.opt_state0)`` as a function of
    ``deps`` and pulls ``v`` back through it (``batch`` is unused).  Exact for the unrolled loop,
    optimizer state included; memory grows with T unless ``checkpoint=True``.

    Cost: T forward steps are replayed (``Unrolled`` keeps no residuals) and pulled back, so
    about 3x the unroll; memory O(T) saved steps, O(1) per step with ``checkpoint``.

    Args:
      checkpoint: rematerialize each step in the backward pass (``jax.checkpoint``).
    """

    def best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v):
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
        return _cast_like(pullback(v)[0], deps)

    return HypergradMethod("itd", best_response_vjp, _identity_post_update)


def cg(maxiter: int = 100, tol: float = 1e-6, damping: float = 0.0) -> HypergradMethod:
    """Implicit differentiation with conjugate gradient: ``-(∂²L/∂λ∂θ) (H + damping·I)^{-1} v``.

    Args:
      maxiter: maximum CG iterations (Hessian-vector products).
      tol: relative residual tolerance ``‖r‖ ≤ tol·‖v‖``.
      damping: added to the Hessian's diagonal (needed where H is not positive definite).
    """
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}.")
    if tol < 0 or damping < 0:
        raise ValueError(f"tol and damping must be >= 0, got tol={tol}, damping={damping}.")

    def best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        theta = unrolled.params

        def matvec(x):
            hx = _hvp(loss_fn, theta, deps, batch, x)
            return _axpy(damping, x, hx) if damping else hx

        x, _ = jax.scipy.sparse.linalg.cg(matvec, v, tol=tol, maxiter=maxiter)
        return _cast_like(_scale(-1.0, _mixed_vjp(loss_fn, theta, deps, batch, x)), deps)

    return HypergradMethod("cg", best_response_vjp, _identity_post_update)


def neumann(steps: int = 20, lr: float = 0.01) -> HypergradMethod:
    """Implicit differentiation with a Neumann series: ``H^{-1} ≈ lr Σ_{k=0}^{steps} (I - lr H)^k``.

    Converges when ``0 < lr < 2 / λ_max(H)``.

    Args:
      steps: number of Hessian-vector products (terms after the first).
      lr: series step size.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}.")

    def best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        theta = unrolled.params

        def body(_, carry):
            p, acc = carry
            p = _axpy(-lr, _hvp(loss_fn, theta, deps, batch, p), p)
            return p, _add(acc, p)

        _, acc = jax.lax.fori_loop(0, steps, body, (v, v))
        x = _scale(lr, acc)
        return _cast_like(_scale(-1.0, _mixed_vjp(loss_fn, theta, deps, batch, x)), deps)

    return HypergradMethod("neumann", best_response_vjp, _identity_post_update)


def finite_difference(eps: float = 0.01) -> HypergradMethod:
    """DARTS / T1-T2: identity inverse Hessian, central difference of ∂L/∂λ at θ* ± ε v.

    Returns ``-(∇_λ L(θ*+εv) - ∇_λ L(θ*-εv)) / 2ε ≈ -(∂²L/∂λ∂θ) v`` with ``ε = eps / ‖v‖``.
    No second derivative is taken.

    Args:
      eps: perturbation norm (``ε‖v‖``); DARTS uses 0.01.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}.")

    def best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        out, _ = _central_difference(loss_fn, unrolled.params, deps, batch, v, eps)
        return _cast_like(out, deps)

    return HypergradMethod("finite_difference", best_response_vjp, _identity_post_update)


def sama_adaptation(loss_fn, optimizer, unrolled, deps, batch, v):
    """SAMA's algorithmic adaptation ``P v = -(∂u/∂g) v`` at the unrolled optimizer state.

    ``u(g) = optimizer.update(g, unrolled.opt_state, unrolled.params)[0]`` is the optax update
    (added to θ), so ``P = lr·I`` for ``optax.sgd(lr)``; one ``jax.jvp`` of ``u`` at the base
    gradient ``g = ∂L/∂θ(θ*, deps, batch)`` gives ``P v`` for any optax optimizer.  For
    element-wise optimizers (sgd, momentum, adam, adamw, rmsprop, ...) P is diagonal, hence
    symmetric, and ``P v`` is also the transposed product the chain rule asks for.  Entries
    whose gradient is exactly zero and whose derivative is not finite (Adam with an all-zero
    history: ``0·∞``) are adapted by 0.
    """
    theta = unrolled.params
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


def sama(alpha: float = 1.0, nudge: bool = True) -> HypergradMethod:
    """SAMA (thesis eq. 3.5): identity base Jacobian, optimizer adaptation, central difference.

    ``(dθ*/dλ)^T v ≈ -(∇_λ L(θ*+εPv) - ∇_λ L(θ*-εPv)) / 2ε`` with ``P v`` from
    :func:`sama_adaptation` (learning rate inside; see the module docstring) and
    ``ε = alpha / ‖P v‖``.  ``post_update`` nudges the base parameters along the adapted direct
    gradient, ``θ ← θ* - ε P v`` (a step of norm ``alpha``), when ``nudge`` is true.

    Args:
      alpha: perturbation norm of the central difference and of the nudge (1.0 in the thesis).
      nudge: apply the base-parameter update after each meta step.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")

    def best_response_vjp(loss_fn, optimizer, unrolled, deps, batch, v):
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        pv = sama_adaptation(loss_fn, optimizer, unrolled, deps, batch, v)
        out, _ = _central_difference(loss_fn, unrolled.params, deps, batch, pv, alpha)
        return _cast_like(out, deps)

    def post_update(loss_fn, optimizer, unrolled, deps, batch, v):
        if not nudge:
            return unrolled.params
        _check_vjp_inputs(loss_fn, optimizer, unrolled, deps, batch, v)
        pv = sama_adaptation(loss_fn, optimizer, unrolled, deps, batch, v)
        norm = _norm(pv)
        eps = alpha / jnp.where(norm > 0, norm, 1.0)
        return _axpy(-eps, pv, unrolled.params)

    return HypergradMethod("sama", best_response_vjp, post_update, local=True, nudges=nudge)


# --------------------------------------------------------------------------------------------
# User-level convenience
# --------------------------------------------------------------------------------------------


def _raise_nonfinite(finite, name):
    if not bool(finite):
        raise FloatingPointError(
            f"non-finite hypergradient from method {name!r}: check the losses, the learning "
            "rates, and (cg) the damping"
        )


def hypergradient(
    method: HypergradMethod,
    base_loss,
    meta_loss,
    optimizer,
    unrolled: Unrolled,
    lam,
    base_batch,
    meta_batch,
    *,
    raise_nonfinite: bool = False,
):
    """Total derivative of ``meta_loss(θ*(λ), λ, meta_batch)`` with respect to λ.

    ``dL_meta/dλ = ∂L_meta/∂λ + (dθ*/dλ)^T ∂L_meta/∂θ*``, the second term from
    ``method.best_response_vjp``.  Pure and jit-able.

    Args:
      method: a :class:`HypergradMethod` (``itd()``, ``cg()``, ``neumann()``,
        ``finite_difference()``, ``sama()``).
      base_loss: ``base_loss(params, lam, batch) -> scalar``.
      meta_loss: ``meta_loss(params, lam, batch) -> scalar`` (may ignore ``lam``).
      optimizer: the base problem's optax optimizer (the one used by :func:`unroll`).
      unrolled: result of :func:`unroll`.
      lam: meta parameters λ.
      base_batch: batch for the second derivatives (typically the last unrolled batch).
      meta_batch: batch for the meta loss.
      raise_nonfinite: raise ``FloatingPointError`` (a ``JaxRuntimeError`` under jit) when the
        hypergradient is not finite.  Otherwise it is only reported in ``info.finite``.

    Returns:
      ``(grad, info)``: ``grad`` shaped like ``lam``; :class:`HypergradInfo` with ``finite``,
      ``meta_loss`` and ``params`` (the base params to continue from: ``method.post_update``
      when finite, ``unrolled.params`` otherwise).

    Example:
      Weight decay ``lam`` on ``w``: training drives ``w`` to ``w* = 1 / (1 + lam)``, so the
      validation loss ``3 (w* - 1)^2`` has derivative ``6 (1 - w*) / (1 + lam)^2 = 0.889``
      at ``lam = 0.5``:

      >>> import jax.numpy as jnp, optax
      >>> base_loss = lambda w, lam, batch: jnp.sum((w - batch) ** 2) + lam * jnp.sum(w**2)
      >>> val_loss = lambda w, lam, batch: jnp.sum((w - batch) ** 2)
      >>> opt, w, lam = optax.sgd(0.1), jnp.ones(3), jnp.asarray(0.5)
      >>> batches = jnp.ones((30, 3))  # 30 base steps
      >>> un = unroll(base_loss, opt, w, opt.init(w), lam, batches)
      >>> g, info = hypergradient(cg(), base_loss, val_loss, opt, un, lam, batches[-1], batches[0])
      >>> bool(info.finite), round(float(g), 3)
      (True, 0.889)
    """
    if not isinstance(method, HypergradMethod):
        raise TypeError(
            f"method must be a HypergradMethod (e.g. cg()), got {type(method).__name__}."
        )
    _check_scalar_loss("meta_loss", meta_loss, unrolled.params, lam, meta_batch)
    value, (v, direct) = jax.value_and_grad(meta_loss, argnums=(0, 1))(
        unrolled.params, lam, meta_batch
    )
    indirect = method.best_response_vjp(base_loss, optimizer, unrolled, lam, base_batch, v)
    grad = _add(direct, indirect)
    # v is checked too: post_update (SAMA's nudge) moves θ along it.
    finite = jnp.logical_and(_all_finite(grad), _all_finite(v))
    if raise_nonfinite:
        jax.debug.callback(_raise_nonfinite, finite, method.name)
    nudged = method.post_update(base_loss, optimizer, unrolled, lam, base_batch, v)
    params = jax.tree.map(lambda a, b: jnp.where(finite, a, b), nudged, unrolled.params)
    return grad, HypergradInfo(finite=finite, meta_loss=value, params=params)


def meta_step(
    method: HypergradMethod,
    base_loss,
    meta_loss,
    optimizer,
    meta_optimizer,
    state: BilevelState,
    batches,
    meta_batch,
    *,
    raise_nonfinite: bool = False,
):
    """One bilevel iteration: unroll the base problem on ``batches``, then one meta update.

    The meta update is skipped (λ and the meta optimizer state are kept) when the
    hypergradient is not finite; ``info.finite`` says so.  Pure and jit-able.

    Args:
      method, base_loss, meta_loss, optimizer, meta_batch, raise_nonfinite: as in
        :func:`hypergradient`.
      meta_optimizer: optax optimizer for λ.
      state: :class:`BilevelState`.
      batches: base batches with a leading axis T; the last one is used for second derivatives.

    Returns:
      ``(new_state, info)``.

    Example:
      The weight decay of :func:`hypergradient`'s example, learned:

      >>> import jax, jax.numpy as jnp, optax
      >>> base_loss = lambda w, lam, batch: jnp.sum((w - batch) ** 2) + lam * jnp.sum(w**2)
      >>> val_loss = lambda w, lam, batch: jnp.sum((w - batch) ** 2)
      >>> opt, meta_opt, w = optax.sgd(0.1), optax.adam(0.1), jnp.ones(3)
      >>> state = BilevelState(w, opt.init(w), jnp.asarray(0.5), meta_opt.init(jnp.asarray(0.5)))
      >>> step = jax.jit(lambda s, b, mb: meta_step(sama(0.01), base_loss, val_loss, opt,
      ...                                           meta_opt, s, b, mb))
      >>> for _ in range(20):
      ...     state, info = step(state, jnp.ones((5, 3)), jnp.ones(3))
      >>> bool(state.lam < 0.5)  # less decay: the validation data want w = 1
      True
    """
    _check_optimizer(meta_optimizer)
    _check_opt_state(meta_optimizer, state.lam, state.meta_opt_state, "state.meta_opt_state")
    un = unroll(base_loss, optimizer, state.params, state.opt_state, state.lam, batches)
    last = _last(batches)
    grad, info = hypergradient(
        method,
        base_loss,
        meta_loss,
        optimizer,
        un,
        state.lam,
        last,
        meta_batch,
        raise_nonfinite=raise_nonfinite,
    )
    safe_grad = jax.tree.map(lambda g: jnp.where(info.finite, g, jnp.zeros_like(g)), grad)
    updates, new_meta_state = meta_optimizer.update(safe_grad, state.meta_opt_state, state.lam)
    new_lam = optax.apply_updates(state.lam, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(info.finite, a, b), new, old)
    return (
        BilevelState(
            params=info.params,
            opt_state=un.opt_state,
            lam=keep(new_lam, state.lam),
            meta_opt_state=keep(new_meta_state, state.meta_opt_state),
        ),
        info,
    )
