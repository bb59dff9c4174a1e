"""The bilevel layer: hypergradients of a meta loss, an optax transform that produces them, and
a ready-made ``(init, step)`` for the common loop.

Losses follow one rule, the same as a :class:`jaxmlo.Problem`'s: a loss takes its *own*
parameters first, then what it depends on, then the batch.  So ``base_loss(params, lam,
batch)`` (θ first, λ second) and ``meta_loss(lam, params, batch)`` (λ first, θ second); the
meta problem of the same bilevel :class:`jaxmlo.Program` is
``Problem("meta", lambda lam, deps, b: meta_loss(lam, deps["base"], b), ...)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmlo._src.adjoints import SolveInfo, _no_solve, itd
from jaxmlo._src.checks import _check_opt_state, _check_optimizer, _check_scalar_loss
from jaxmlo._src.tree import _add, _all_finite, _float_dtype, _last
from jaxmlo._src.unroll import HypergradMethod, Unrolled, unroll


class HypergradInfo(NamedTuple):
    """Diagnostics of one hypergradient; every field is a JAX value (usable under jit)."""

    finite: jax.Array  # bool []: hypergradient and direct gradient ∂L_meta/∂θ* are all finite
    meta_loss: jax.Array  # [] meta loss at θ*
    params: Any  # base params to continue from (post_update applied only when finite)
    solve: SolveInfo | None = None  # the adjoint solve: residual, iterations, converged


class BilevelState(NamedTuple):
    """State of a plain bilevel loop (:func:`bilevel`, :func:`meta_step`)."""

    params: Any  # base parameters θ
    opt_state: Any  # base optimizer state
    lam: Any  # meta parameters λ
    meta_opt_state: Any  # meta optimizer state


class HypergradientState(NamedTuple):
    """State of :func:`hypergradient_transform`: the base problem it trains, and diagnostics
    of its last update."""

    params: Any  # base parameters θ to continue from (SAMA's nudge applied)
    opt_state: Any  # base optimizer state
    meta_loss: jax.Array  # [] meta loss at θ* of the last update (dtype of θ)
    finite: jax.Array  # bool []: the last hypergradient was finite
    solve: SolveInfo  # the last adjoint solve


def _raise_nonfinite(finite, name):
    if not bool(jnp.all(finite)):
        raise FloatingPointError(
            f"non-finite hypergradient from method {name!r}: check the losses, the learning "
            "rates, and (cg) the damping. Through Adam (itd) a gradient entry that is exactly "
            "zero (a dead ReLU unit, an attention key bias) gives NaN, since d sqrt(nu)/d nu is "
            "infinite at nu = 0: pass eps_root > 0, e.g. optax.adam(lr, eps_root=1e-16)."
        )


def _check_method(method):
    if not isinstance(method, HypergradMethod):
        raise TypeError(
            f"method must be a HypergradMethod (e.g. cg()), got {type(method).__name__}."
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
    """Total derivative of ``meta_loss(λ, θ*(λ), meta_batch)`` with respect to λ.

    ``dL_meta/dλ = ∂L_meta/∂λ + (dθ*/dλ)^T ∂L_meta/∂θ*``, the second term from
    ``method.best_response_vjp``.  Equal to ``jax.grad`` of the meta loss through
    ``unroll(..., adjoint=method)`` (with ``base_batch`` its last batch).  Pure and jit-able.

    Args:
      method: a :class:`HypergradMethod` (``itd()``, ``cg()``, ``neumann()``, ``direct()``,
        ``finite_difference()``, ``sama()``).
      base_loss: ``base_loss(params, lam, batch) -> scalar``.
      meta_loss: ``meta_loss(lam, params, batch) -> scalar``, its own parameters λ first (it
        may ignore them).
      optimizer: the base problem's optax optimizer (the one used by :func:`unroll`).
      unrolled: result of :func:`unroll`.
      lam: meta parameters λ.
      base_batch: batch for the second derivatives (typically the last unrolled batch).
      meta_batch: batch for the meta loss.
      raise_nonfinite: raise ``FloatingPointError`` (a ``JaxRuntimeError`` under jit) when the
        hypergradient is not finite.  Otherwise it is only reported in ``info.finite``.

    Returns:
      ``(grad, info)``: ``grad`` shaped like ``lam``; :class:`HypergradInfo` with ``finite``,
      ``meta_loss``, ``params`` (the base params to continue from: ``method.post_update``
      when finite, ``unrolled.params`` otherwise) and ``solve`` (the adjoint solve's
      :class:`SolveInfo`).
    """
    _check_method(method)
    _check_scalar_loss("meta_loss", meta_loss, lam, unrolled.params, meta_batch)
    value, (direct, v) = jax.value_and_grad(meta_loss, argnums=(0, 1))(
        lam, unrolled.params, meta_batch
    )
    if method.best_response_vjp_with_info is None:
        indirect = method.best_response_vjp(base_loss, optimizer, unrolled, lam, base_batch, v)
        solve = _no_solve(v)
    else:
        indirect, solve = method.best_response_vjp_with_info(
            base_loss, optimizer, unrolled, lam, base_batch, v
        )
    grad = _add(direct, indirect)
    # v is checked too: post_update (SAMA's nudge) moves θ along it.
    finite = jnp.logical_and(_all_finite(grad), _all_finite(v))
    if raise_nonfinite:
        jax.debug.callback(_raise_nonfinite, finite, method.name)
    nudged = method.post_update(base_loss, optimizer, unrolled, lam, base_batch, v)
    params = jax.tree.map(lambda a, b: jnp.where(finite, a, b), nudged, unrolled.params)
    return grad, HypergradInfo(finite=finite, meta_loss=value, params=params, solve=solve)


def _unroll_and_hypergradient(
    method, base_loss, meta_loss, optimizer, params, opt_state, lam, batches, meta_batch, throw
):
    un = unroll(base_loss, optimizer, params, opt_state, lam, batches)
    grad, info = hypergradient(
        method,
        base_loss,
        meta_loss,
        optimizer,
        un,
        lam,
        _last(batches),
        meta_batch,
        raise_nonfinite=throw,
    )
    return grad, un, info


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

    :func:`bilevel` returns this step bound to its losses and optimizers, and jitted.  The
    meta update is skipped (λ and the meta optimizer state are kept) when the hypergradient
    is not finite; ``info.finite`` says so.  Pure and jit-able.

    Args:
      method, base_loss, meta_loss, optimizer, meta_batch, raise_nonfinite: as in
        :func:`hypergradient`.
      meta_optimizer: optax optimizer for λ.
      state: :class:`BilevelState`.
      batches: base batches with a leading axis T; the last one is used for second derivatives.

    Returns:
      ``(new_state, info)``.
    """
    _check_method(method)
    _check_optimizer(meta_optimizer, "meta_optimizer")
    _check_opt_state(meta_optimizer, state.lam, state.meta_opt_state, "state.meta_opt_state")
    grad, un, info = _unroll_and_hypergradient(
        method,
        base_loss,
        meta_loss,
        optimizer,
        state.params,
        state.opt_state,
        state.lam,
        batches,
        meta_batch,
        raise_nonfinite,
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


def bilevel(
    base_loss,
    meta_loss,
    optimizer,
    meta_optimizer,
    *,
    adjoint: HypergradMethod | None = None,
    jit: bool = True,
    raise_nonfinite: bool = False,
):
    """The common bilevel loop as ``(init, step)``.

    ``init(params, lam) -> BilevelState``; ``step(state, batches, meta_batch) -> (state,
    info)`` unrolls the base problem on ``batches`` (leading axis T), takes the hypergradient
    with ``adjoint`` and one ``meta_optimizer`` update of λ, and continues the base problem
    from its nudged parameters (SAMA).  Non-finite meta updates are skipped.

    Args:
      base_loss: ``base_loss(params, lam, batch) -> scalar``.
      meta_loss: ``meta_loss(lam, params, batch) -> scalar``, λ first.
      optimizer: optax optimizer of the base parameters.
      meta_optimizer: optax optimizer of λ.
      adjoint: the hypergradient method (default ``itd()``).
      jit: compile ``step`` with ``jax.jit``.
      raise_nonfinite: raise under jit on a non-finite hypergradient.

    Returns:
      ``(init, step)``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxmlo
      >>> base = lambda w, lam, x: jnp.sum((w - x) ** 2) + jnp.exp(lam) * jnp.sum(w**2)
      >>> meta = lambda lam, w, x: jnp.sum((w - x) ** 2)
      >>> init, step = jaxmlo.bilevel(base, meta, optax.sgd(0.1), optax.adam(0.1),
      ...                             adjoint=jaxmlo.cg())
      >>> state = init(jnp.zeros(3), jnp.asarray(0.0))
      >>> for _ in range(50):
      ...     state, info = step(state, jnp.ones((10, 3)), jnp.ones(3))
      >>> bool(state.lam < -2.0), bool(info.finite)  # the decay is tuned down
      (True, True)
    """
    method = itd() if adjoint is None else adjoint
    _check_method(method)
    _check_optimizer(optimizer)
    _check_optimizer(meta_optimizer, "meta_optimizer")

    def init(params, lam) -> BilevelState:
        return BilevelState(params, optimizer.init(params), lam, meta_optimizer.init(lam))

    def step(state: BilevelState, batches, meta_batch):
        return meta_step(
            method,
            base_loss,
            meta_loss,
            optimizer,
            meta_optimizer,
            state,
            batches,
            meta_batch,
            raise_nonfinite=raise_nonfinite,
        )

    return init, (jax.jit(step) if jit else step)


def hypergradient_transform(
    base_loss,
    meta_loss,
    optimizer,
    params,
    *,
    adjoint: HypergradMethod | None = None,
    throw: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """An optax transform that turns base and meta batches into hypergradients for λ.

    Its state holds the base problem (:class:`HypergradientState`: parameters θ, the base
    optimizer state, and diagnostics of the last update).  Each
    ``update(updates, state, lam, *, batches, meta_batch)`` unrolls θ for T steps on
    ``batches`` (leading axis T), returns ``dL_meta/dλ`` (plus ``updates`` when given, e.g. the
    gradient of a prior on λ) as the update, and keeps the continued θ (SAMA's nudge
    applied) in the new state, the way ``optax.contrib.sam`` and ``optax.lookahead`` keep
    theirs.  Chain it with any optax optimizer of λ; wrap the chain in
    ``optax.apply_if_finite`` to drop a step (base step included) whose hypergradient is not
    finite.

    Args:
      base_loss: ``base_loss(params, lam, batch) -> scalar``.
      meta_loss: ``meta_loss(lam, params, batch) -> scalar``, λ first.
      optimizer: optax optimizer of the base parameters.
      params: initial base parameters θ_0.
      adjoint: the hypergradient method (default ``itd()``).
      throw: raise under jit on a non-finite hypergradient.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` (λ) and the
      extra arguments ``batches`` and ``meta_batch``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxmlo
      >>> base = lambda w, lam, x: jnp.sum((w - x) ** 2) + jnp.exp(lam) * jnp.sum(w**2)
      >>> meta = lambda lam, w, x: jnp.sum((w - x) ** 2)
      >>> tx = optax.chain(
      ...     jaxmlo.hypergradient_transform(base, meta, optax.sgd(0.1), jnp.zeros(3),
      ...                                    adjoint=jaxmlo.cg()),
      ...     optax.clip_by_global_norm(1.0),
      ...     optax.adam(0.1),
      ... )
      >>> @jax.jit
      ... def step(lam, state, batches, meta_batch):
      ...     updates, state = tx.update(None, state, lam, batches=batches, meta_batch=meta_batch)
      ...     return optax.apply_updates(lam, updates), state
      >>> lam = jnp.asarray(0.0)
      >>> state = tx.init(lam)
      >>> for _ in range(50):
      ...     lam, state = step(lam, state, jnp.ones((10, 3)), jnp.ones(3))
      >>> bool(lam < -2.0), state[0].params.shape  # λ tuned down; θ lives in the state
      (True, (3,))
    """
    method = itd() if adjoint is None else adjoint
    _check_method(method)
    _check_optimizer(optimizer)
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be a bool, got {throw!r}.")
    dtype = _float_dtype(params)

    def init_fn(lam):
        del lam
        p = jax.tree.map(jnp.asarray, params)
        return HypergradientState(
            params=p,
            opt_state=optimizer.init(p),
            meta_loss=jnp.zeros((), dtype),
            finite=jnp.asarray(True),
            solve=_no_solve(p),
        )

    def update_fn(updates, state, params=None, *, batches=None, meta_batch=None, **extra):
        del extra  # other transforms' extra arguments
        if params is None:
            raise ValueError(
                "hypergradient_transform: update needs params=λ, the meta parameters the "
                "hypergradient is taken with respect to."
            )
        if batches is None:
            raise ValueError(
                "hypergradient_transform: update needs batches=... (base batches, leading "
                "axis T) and meta_batch=... as keyword arguments."
            )
        lam = params
        grad, un, info = _unroll_and_hypergradient(
            method,
            base_loss,
            meta_loss,
            optimizer,
            state.params,
            state.opt_state,
            lam,
            batches,
            meta_batch,
            throw,
        )
        if updates is not None:
            grad = _add(grad, updates)
        new_state = HypergradientState(
            params=info.params,
            opt_state=un.opt_state,
            meta_loss=info.meta_loss.astype(dtype),
            finite=info.finite,
            solve=info.solve,
        )
        return grad, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
