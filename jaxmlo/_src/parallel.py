"""The compiled program step, data-parallel over a ``'data'`` mesh axis.

Batches are split along the mesh axis (their example axis, after the leading unroll axis);
parameters and optimizer states are replicated and stay identical on every device because every
update is computed from all-reduced quantities. The whole step is one ``jax.jit`` program.

Two ways a problem's update is synchronized (chosen per problem, at trace time):

* **local, then one all-reduce**, under ``jax.shard_map`` (a problem without lower problems, or
  one whose every best-response Jacobian on an eq.-2.2 path uses a method marked ``local``,
  i.e. first-order like SAMA): each device computes the problem's loss, direct gradient
  and hypergradient from its own shard — for SAMA the direct gradient on ``θ*``, the base
  gradient for the optimizer adaptation and the central difference all stay on the device —
  and one ``psum`` of ``(loss, direct gradient, hypergradient, SAMA nudge)`` follows (thesis
  3.3.3, Fig. 3.3): one all-reduce per optimizer update, whatever the method's inner passes.
* **global** (any other method, e.g. CG or Neumann): the engine's update runs on the global
  batch under XLA's SPMD partitioner (batches constrained to be split, state replicated), so
  each derivative the method takes — gradients, Hessian-vector products, mixed second
  derivatives — is the global-batch derivative, with the all-reduces XLA inserts (one per
  Hessian-vector product, i.e. per CG iteration). The result equals the single-device step.
  (Under ``shard_map`` the same would need ``lax.custom_linear_solve``, used by CG, to accept
  device-invariant results with device-varying closures, which JAX's type check rejects.)

Semantics of the local mode: the meta gradient is the *mean over shards of per-shard SAMA
meta gradients* (each with its own ``v``, adaptation and ``ε = α/‖v‖``) — what the thesis's
DDP implementation computes — not SAMA on the global batch; the nudge of the base parameters
is the mean of the per-shard nudges, so replicas stay identical. The base problem's own
updates follow the global-batch gradient. Losses must be means over their batch's examples
(with ``reduction="sum"``, sums), and shards equal-sized.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmlo._src.engine import (
    ProblemUpdate,
    nudge_deltas,
    program_pass,
    scan_update,
    total_gradient,
)
from jaxmlo._src.hypergrad import Unrolled, _add, _first, _norm
from jaxmlo._src.nested import is_nested
from jaxmlo._src.program import Program
from jaxmlo.common import axis_size as _axis_size
from jaxmlo.common import cast_floats as _cast_floats
from jaxmlo.common import count_collectives, data_mesh

__all__ = [
    "data_mesh",
    "shard_batches",
    "replicate",
    "parallel_step",
    "mixed_precision",
    "count_collectives",
]


def shard_batches(batches, mesh: Mesh, *, axis: str = "data", batch_axis: int = 1):
    """Place process-local batches as global arrays split over ``axis`` along ``batch_axis``.

    ``batches`` is this process's share (``{name: [T, b_local, ...]}``; on one host, the whole
    batch). Uses ``jax.make_array_from_process_local_data``, so it works unchanged on many hosts.
    """
    spec = P(*([None] * batch_axis + [axis]))
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batches
    )


def replicate(tree, mesh: Mesh):
    """Put a pytree (e.g. a ``ProgramState``) on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def mixed_precision(
    loss_fn: Callable,
    compute_dtype=jnp.bfloat16,
    *,
    cast_deps: bool = True,
    cast_batch: bool = True,
) -> Callable:
    """Wrap ``loss_fn(params, deps, batch)`` to compute in ``compute_dtype`` from float32 masters.

    Floating parameters (and ``deps`` / floating batch leaves, unless disabled) are cast to
    ``compute_dtype`` inside the loss; the loss comes back as float32. Since the cast is part of
    the differentiated function, gradients arrive in the master parameters' dtype (float32), so
    the optax state stays float32 too: use it per problem, e.g.
    ``Problem("base", mixed_precision(loss), params_f32, optax.adam(1e-3))``.
    """

    def cast(tree):
        return _cast_floats(tree, compute_dtype)

    def wrapped(params, deps, batch):
        out = loss_fn(
            cast(params), cast(deps) if cast_deps else deps, cast(batch) if cast_batch else batch
        )
        return jnp.asarray(out).astype(jnp.promote_types(jnp.result_type(out), jnp.float32))

    wrapped.__wrapped__ = loss_fn
    return wrapped


# ---------------------------------------------------------------------------------------------
# The per-device program pass


def _vma(x) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (its manual axis type)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()))  # older JAX spelling


def _varying(tree, axis) -> bool:
    return any(axis in _vma(x) for x in jax.tree.leaves(tree))


def _pvary(tree, axis):
    def f(x):
        return x if axis in _vma(x) else jax.lax.pcast(x, axis, to="varying")

    return jax.tree.map(f, tree)


def _is_local(program: Program, name: str) -> bool:
    """Whether every best response on ``name``'s paths is local (first-order, per shard)."""
    if program.total_derivative == "exact" and is_nested(program, name):
        return False  # the nested solve takes second derivatives of the global losses
    return all(program.problems[m].method.local for m in program.path_problems(name))


def _local_pass(
    prog: Program,
    name: str,
    axis: str,
    reduction: str,
    params,
    opt_state,
    deps,
    bs,
    unrolled,
    unrolled_deps,
    *,
    nudged,
):
    """T updates of problem ``name``, each from local derivatives and one psum."""
    prob = prog.problems[name]
    red = jax.lax.pmean if reduction == "mean" else jax.lax.psum
    un_l, und_l = _pvary(unrolled, axis), _pvary(unrolled_deps, axis)

    def body(carry, batch):
        p, s, _, _ = carry
        loss, g, hyper, v = total_gradient(
            prog, name, _pvary(p, axis), _pvary(deps, axis), batch, un_l, und_l
        )
        deltas = nudge_deltas(prog, name, nudged, un_l, und_l, v)
        direct = jax.tree.map(jnp.subtract, g, hyper)
        # The one all-reduce of this update: loss, direct gradient, hypergradient and SAMA's
        # nudge travel together (XLA emits a single tuple all-reduce).
        loss, direct, hyper, deltas = red((loss, direct, hyper, deltas), axis)
        g = _add(direct, hyper)
        u, s = prob.optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s, g, deltas), (loss, _norm(hyper))

    g0 = jax.tree.map(jnp.zeros_like, params)
    d0 = jax.eval_shape(lambda: body((params, opt_state, g0, None), _first(bs))[0][3])
    d0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), d0)
    (p1, s1, g_last, deltas), (losses, hnorms) = jax.lax.scan(body, (params, opt_state, g0, d0), bs)
    return ProblemUpdate(p1, s1, deltas, losses, g_last, hnorms[-1])


def _sharded_update(mesh, axis, reduction, local):
    """The per-problem rule of the data-parallel pass (see the module docstring)."""

    def update(prog, name, params, opt_state, deps, bs, unrolled, unrolled_deps, nudged):
        if not (local and _is_local(prog, name)):
            # Global: XLA's SPMD partitioner inserts the all-reduces of every derivative.
            return scan_update(
                prog, name, params, opt_state, deps, bs, unrolled, unrolled_deps, nudged
            )
        batch_spec = P(None, axis)
        un_spec = {l: Unrolled(P(), P(), P(), P(), batch_spec, P()) for l in unrolled}
        fn = jax.shard_map(
            functools.partial(_local_pass, prog, name, axis, reduction, nudged=nudged),
            mesh=mesh,
            in_specs=(P(), P(), P(), batch_spec, un_spec, P()),
            out_specs=P(),
        )
        return fn(params, opt_state, deps, bs, unrolled, unrolled_deps)

    return update


def parallel_step(
    program: Program,
    mesh: Mesh,
    *,
    axis: str = "data",
    local: bool = True,
    reduction: str = "mean",
    jit: bool = True,
    donate: bool = False,
) -> Callable:
    """The program step, data-parallel over ``axis`` of ``mesh``: ``step(state, batches)``.

    Args:
      program: a :class:`jaxmlo.Program` whose losses are means (or, with ``reduction="sum"``,
        sums) over their batch's examples.
      mesh: e.g. :func:`data_mesh`; the example axis of every batch is split over ``axis``.
      axis: the mesh axis name.
      local: run a problem whose every best response on its paths uses a method with
        ``method.local`` (SAMA) per shard with one all-reduce per update (see the module
        docstring); with ``False`` every problem runs globally, so the step equals the
        single-device step on the global batch (problems without lower problems are
        first-order: one all-reduce either way).
      reduction: ``"mean"`` or ``"sum"``: how the losses combine over the shards.
      jit: compile the whole step as one XLA program.
      donate: donate the input state's buffers.

    Returns:
      ``step(state, batches) -> (state, metrics)`` with ``state`` replicated and ``batches``
      ``{name: [unroll_steps, batch, ...]}`` (batch divisible by the axis size; place them with
      :func:`shard_batches`). ``step.lower(state, batches)`` gives the compiled HLO for
      :func:`count_collectives`.
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a jaxmlo.Program, got {type(program).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n = _axis_size(mesh, axis)
    batch_sharding = NamedSharding(mesh, P(None, axis))
    replicated = NamedSharding(mesh, P())

    def check(batches):
        missing = [k for k in program.order if k not in batches]
        if missing:
            raise ValueError(f"parallel_step: no batches for problem(s) {missing}")
        for name in program.order:
            t = program.problems[name].unroll_steps
            for x in jax.tree.leaves(batches[name]):
                if x.ndim < 2 or x.shape[0] != t:
                    raise ValueError(
                        f"parallel_step: batches[{name!r}] leaves must be "
                        f"[unroll_steps={t}, batch, ...], got shape {x.shape}"
                    )
                if x.shape[1] % n:
                    raise ValueError(
                        f"parallel_step: batches[{name!r}] has batch size "
                        f"{x.shape[1]}, not divisible by the {n} devices of mesh "
                        f"axis {axis!r}"
                    )

    def step(state, batches):
        check(batches)
        # Global problems run under XLA's SPMD partitioner: these constraints pin the data
        # layout (batch split, state replicated) so it partitions the batch reductions.
        batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
        state = jax.lax.with_sharding_constraint(state, replicated)
        new, metrics, _ = program_pass(
            program, state, batches, _sharded_update(mesh, axis, reduction, local)
        )
        return (
            jax.lax.with_sharding_constraint(new, replicated),
            jax.lax.with_sharding_constraint(metrics, replicated),
        )

    if jit:
        step = jax.jit(step, donate_argnums=(0,) if donate else ())
    return step
