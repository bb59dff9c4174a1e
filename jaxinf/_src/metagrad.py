"""Exact data attribution by metagradients: differentiate a whole training run w.r.t. example weights.

Influence functions approximate a counterfactual: how would a test output change had training
example ``i`` weighed a little more? For a fixed training recipe the question has an exact
answer, the derivative of the test output through the entire training run. Give every training
example a weight ``w_i`` and let each step minimise the weighted minibatch loss

    L_t(θ, w) = (1/B) Σ_{j=1..B} w_{b_tj} ℓ(θ, z_{b_tj})      reduction="mean" (the default)
    L_t(θ, w) =       Σ_{j=1..B} w_{b_tj} ℓ(θ, z_{b_tj})      reduction="sum"

where ``b_t`` is the ``t``-th row of the ``[T, B]`` batch indices and ``B`` the batch size. The
mean divides by ``B``, not by the batch's total weight, so ``w = 1`` is ordinary mean-loss
training and ``w_i = 0`` drops example ``i``'s terms without re-normalising the others; an index
that occurs twice in a batch counts twice. The optimizer (any optax transformation, schedules
included) turns ``∇_θ L_t`` into the update of step ``t``; after ``T`` steps ``θ_T(w)``. The
score of training example ``i`` for test function ``f`` is ``∂ f(θ_T(w)) / ∂ w_i`` at ``w = 1``:
positive means up-weighting the example raises ``f`` (a margin, a logit, minus a loss).

**How it is computed.** Reverse mode over the unrolled run: one forward pass of training
keeps a checkpoint of ``(θ, optimizer state)`` every ``ceil(T / segments)`` steps
(:func:`jaxmlo.checkpointed_scan`), then every backward pass recomputes one segment at a time.
Memory is ``segments`` training states plus one segment's per-step residuals, ``O(sqrt(T))`` by
default, never ``O(T)``. The backward pass is one vector-Jacobian product of ``w -> θ_T(w)``
applied to ``∇_θ f(θ_T)``: ``vmap`` over a block of ``test_block`` test gradients shares the
recomputed forward values among the block, and blocks run one after another under
``lax.map``, so memory grows with ``test_block``, not with ``n_test`` or ``T × n_test``. Reverse
mode rather than forward mode over the weights because ``n_train`` is the larger side in
attribution (forward mode would need one pass per training example). One call is one compiled
program; its cost is about one training run forward plus, per block, one recomputation and one
backward pass of second order through every step.

References: A. Ilyas, L. Engstrom, "MAGIC: Near-optimal data attribution for deep learning"
(2025); L. Engstrom et al., "Optimizing ML training with metagradient descent" (2025);
D. Maclaurin et al., "Gradient-based hyperparameter optimization through reversible learning"
(2015).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmlo import checkpointed_scan

__all__ = ["metagradient_scores", "weighted_train"]

_REDUCTIONS = ("mean", "sum")
_NONFINITE_MODES = ("warn", "raise")
_NON_FINITE_CAUSES = (
    "Common causes: Adam's sqrt(nu) at nu = 0 (a parameter whose gradient has been exactly zero "
    "so far, e.g. an embedding row never used) has an infinite derivative, so pass eps_root > 0 "
    "(optax.adam(lr, eps_root=1e-16)); with eps_root tiny, the reverse pass multiplies factors "
    "as large as 1/sqrt(eps_root) and can leave the float32 range: compute in float64 "
    "(jax_enable_x64 and float64 params) or take a larger eps_root; otherwise the run diverges "
    "or is too non-smooth (lower the learning rate)."
)


def _report_nonfinite(s, mode):
    """Warn (or raise) naming the test rows whose scores are not finite."""
    finite = np.isfinite(s)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.all(axis=1))
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    msg = (
        f"metagradient_scores: {int(np.isnan(s).sum())} NaN and {int(np.isinf(s).sum())} infinite "
        f"scores, in {len(rows)} of {s.shape[0]} test rows (rows {shown}). {_NON_FINITE_CAUSES}"
    )
    if mode == "raise":
        raise FloatingPointError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _leading(name, tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no arrays")
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{name}: every leaf needs the same leading (example) axis, got shapes "
            f"{[jnp.shape(x) for x in leaves]}"
        )
    return sizes.pop()


def _float_dtype(params):
    leaves = jax.tree.leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        raise TypeError("params must be a non-empty pytree of floating arrays")
    return jnp.result_type(*leaves)


def _check(loss_fn, optimizer, params, train_data, batches, reduction, segments):
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if segments is not None and (not isinstance(segments, int) or segments < 1):
        raise ValueError(f"segments must be None or an int >= 1, got {segments!r}")
    dtype = _float_dtype(params)
    n_train = _leading("train_data", train_data)
    shape = jnp.shape(batches)
    if len(shape) != 2 or not jnp.issubdtype(jnp.result_type(batches), jnp.integer):
        raise ValueError(
            f"batches must be an int array [T, batch] of indices into train_data, got "
            f"{jnp.result_type(batches)}{list(shape)}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"batches must have at least one step and one index, got {list(shape)}")
    try:
        b = np.asarray(batches)
    except jax.errors.TracerArrayConversionError:  # traced: the values are checked nowhere
        b = None
    if b is not None:
        bad = np.argwhere((b < 0) | (b >= n_train))
        if bad.size:
            t, j = bad[0]
            raise ValueError(
                f"batches[{t}, {j}] = {b[t, j]} is outside train_data (n_train = {n_train})"
            )
    one = jax.tree.map(lambda x: x[0], train_data)
    out = jax.eval_shape(loss_fn, params, one)
    if jnp.shape(out) != ():
        raise ValueError(
            f"loss_fn(params, example) must return a scalar (one example's loss), got shape "
            f"{jnp.shape(out)}"
        )
    return dtype, n_train


def _train(loss_fn, optimizer, params, train_data, batches, weights, reduction, segments):
    scale = 1.0 / batches.shape[1] if reduction == "mean" else 1.0
    per_example = jax.vmap(loss_fn, in_axes=(None, 0))

    def batch_loss(p, idx):
        ex = jax.tree.map(lambda a: a[idx], train_data)
        return scale * jnp.sum(weights[idx] * per_example(p, ex))

    def step(carry, idx):
        p, s = carry
        g = jax.grad(batch_loss)(p, idx)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = checkpointed_scan(
        step, (params, optimizer.init(params)), batches, segments=segments
    )
    return p


def weighted_train(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    params: Any,
    train_data: Any,
    batches: jax.Array,
    weights: jax.Array | None = None,
    *,
    reduction: str = "mean",
    segments: int | None = None,
) -> Any:
    """The training run that :func:`metagradient_scores` differentiates: ``θ_T(w)``.

    ``T`` optax steps from ``params`` and a fresh ``optimizer.init(params)``; step ``t``
    takes the gradient of the weighted loss of minibatch ``batches[t]`` (the module docstring
    gives the formula for both reductions).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one training example
        (``example`` is one row of every leaf of ``train_data``).
      optimizer: an ``optax.GradientTransformation`` (schedules included).
      params: initial parameters (pytree of floating arrays).
      train_data: pytree whose leaves have the leading axis ``n_train``.
      batches: int ``[T, B]``: row ``t`` holds the indices of step ``t``'s minibatch.
      weights: ``[n_train]`` per-example weights; ``None`` means all ones.
      reduction: ``"mean"`` (``1/B`` times the weighted sum) or ``"sum"``.
      segments: checkpointed segments of the unrolled loop (see
        :func:`jaxmlo.checkpointed_scan`); only memory in reverse mode depends on it.

    Returns:
      The parameters after ``T`` steps.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxinf import weighted_train
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([1.0, 2.0])
      >>> loss = lambda p, ex: 0.5 * (ex[0] @ p - ex[1]) ** 2
      >>> p = weighted_train(loss, optax.sgd(0.1), jnp.zeros(1), (x, y), jnp.array([[0, 1]]))
      >>> p.round(3).tolist()  # one step: -0.1 * mean of (-1*1, -2*2)
      [0.25]
    """
    dtype, n_train = _check(loss_fn, optimizer, params, train_data, batches, reduction, segments)
    if weights is None:
        weights = jnp.ones(n_train, dtype)
    if jnp.shape(weights) != (n_train,):
        raise ValueError(f"weights must be [n_train] = [{n_train}], got {list(jnp.shape(weights))}")
    run = functools.partial(_train, loss_fn, optimizer, reduction=reduction, segments=segments)
    return jax.jit(run)(params, train_data, jnp.asarray(batches), jnp.asarray(weights, dtype))


def metagradient_scores(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    params: Any,
    train_data: Any,
    batches: jax.Array,
    test_fn: Callable[[Any, Any], jax.Array],
    test_data: Any,
    *,
    reduction: str = "mean",
    segments: int | None = None,
    test_block: int = 64,
    nonfinite: str = "warn",
) -> jax.Array:
    """Exact attribution scores ``∂ f_k(θ_T(w)) / ∂ w_i`` at ``w = 1``, through the whole run.

    Training is :func:`weighted_train` with the same arguments: the same optimizer, the same
    initial parameters and the same minibatches in the same order, so the scores are exact for
    that run (not for a retraining with other batches or another seed).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, one training example's loss.
      optimizer: an ``optax.GradientTransformation`` (schedules included).
      params: initial parameters (pytree of floating arrays).
      train_data: pytree whose leaves have the leading axis ``n_train``.
      batches: int ``[T, B]`` minibatch indices, one row per step.
      test_fn: ``test_fn(params, test_example) -> scalar``: what to attribute (a margin, a
        logit, minus a loss); ``test_example`` is one row of every leaf of ``test_data``.
      test_data: pytree whose leaves have the leading axis ``n_test``.
      reduction: ``"mean"`` (a batch's loss is ``1/B`` times its weighted sum) or ``"sum"``.
      segments: memory/compute trade-off of the reverse pass: ``None`` keeps
        ``ceil(sqrt(T))`` checkpoints (memory ``O(sqrt(T))``); ``1`` keeps every step
        (memory ``O(T)``, no recomputation); see :func:`jaxmlo.checkpointed_scan`.
      test_block: test functions per backward pass; memory grows with it, the number of
        passes (each recomputing the forward once) shrinks with it.
      nonfinite: what to do when some scores are NaN or infinite: ``"warn"`` (a
        ``RuntimeWarning`` naming the test rows) or ``"raise"`` (``FloatingPointError``, same
        message). Called under ``jit`` the values cannot be checked and nothing is said.

    Returns:
      ``[n_test, n_train]`` scores in the dtype of ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxinf import metagradient_scores
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([1.0, 2.0])
      >>> loss = lambda p, ex: 0.5 * (ex[0] @ p - ex[1]) ** 2
      >>> pred = lambda p, ex: ex @ p
      >>> s = metagradient_scores(loss, optax.sgd(0.1), jnp.zeros(1), (x, y),
      ...                         jnp.array([[0, 1], [1, 0]]), pred, jnp.array([[1.0]]))
      >>> s.shape, bool((s > 0).all())  # both examples pull the prediction up
      ((1, 2), True)
    """
    dtype, n_train = _check(loss_fn, optimizer, params, train_data, batches, reduction, segments)
    n_test = _leading("test_data", test_data)
    if not isinstance(test_block, int) or test_block < 1:
        raise ValueError(f"test_block must be an int >= 1, got {test_block!r}")
    if nonfinite not in _NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
    out = jax.eval_shape(test_fn, params, jax.tree.map(lambda x: x[0], test_data))
    if jnp.shape(out) != ():
        raise ValueError(
            f"test_fn(params, test_example) must return a scalar, got shape {jnp.shape(out)}"
        )
    # Equal blocks: pad by fewer rows than there are blocks.
    n_blocks = -(-n_test // test_block)
    block = -(-n_test // n_blocks)
    pad = n_blocks * block - n_test

    def scores(params, train_data, batches, test_data):
        ones = jnp.ones(n_train, dtype)
        run = functools.partial(
            _train, loss_fn, optimizer, params, train_data, batches,
            reduction=reduction, segments=segments,
        )  # fmt: skip
        final, pullback = jax.vjp(run, ones)
        test_grads = jax.vmap(jax.grad(test_fn), in_axes=(None, 0))

        def one_block(examples):
            (s,) = jax.vmap(pullback)(test_grads(final, examples))
            return s

        padded = jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]).reshape(
                (n_blocks, block) + x.shape[1:]
            ),
            test_data,
        )
        s = jax.lax.map(one_block, padded).reshape(n_blocks * block, n_train)
        return s[:n_test]

    s = jax.jit(scores)(params, train_data, jnp.asarray(batches), test_data)
    if not isinstance(s, jax.core.Tracer):
        _report_nonfinite(np.asarray(s), nonfinite)
    return s
