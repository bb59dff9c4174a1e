"""One compiled iteration of a whole multi-level program.

Execution (thesis section 2.3.3): problems run lowest level first. Each problem takes its
``unroll_steps`` optimizer steps as one ``lax.scan``; a problem with lower problems uses
its total gradient (thesis eq. 2.2)

  dC_k/dtheta_k = dC_k/dtheta_k (direct)
                  + sum_{l in L_k} sum_{q in Q_{k,l}} (dtheta*_q(1)/dtheta_k)
                                                      prod_i (dtheta*_q(i+1)/dtheta*_q(i))
                                                      dC_k/dtheta*_l,

evaluated right to left with best-response-Jacobian-vector products (vectors only).
Instead of walking each path separately, the vectors are accumulated per lower problem in
reverse topological order -- reverse-mode accumulation over the graph -- which equals the
sum over all paths by linearity, while each lower problem's vjp runs once per upper
problem even when paths share a suffix (thesis Figure 2.2's two paths
theta_4 -> theta_3* and theta_4 -> theta_1* -> theta_3*).

Eq. 2.2 is the total derivative unless a problem below k is itself the upper problem of
another one (a nested sub-program); there, with ``Program(total_derivative="exact")`` (the
default), the hypergradient is implicit differentiation of the nested stationarity
conditions instead (``jaxmlo._src.nested``).

One program step is one pass over the graph: with unroll lengths (T_1, ..., T_n) problem
k takes T_k steps, using the lower problems' solutions from this pass. (Betty instead
nests the counts -- an upper problem steps after every T steps of its lower problems, so a
middle level with T_2 > 1 sees T_1 * T_2 lowest-level steps per top-level step; with the
usual T = 1 above the lowest level the two schedules coincide.) The whole step is a pure
function of ``(state, batches)`` and ``jax.jit`` compiles it as one XLA program.

Details:
  * Each lower problem's best-response vjp is taken at its unrolled solution with the deps
    it was unrolled with, and ``batch`` = its last unrolled batch.
  * A method's ``post_update`` (SAMA's nudge of the lower parameters along the adapted
    upper gradient) is applied once after each upper problem's unroll, as a delta, so
    several upper problems may each nudge the same lower problem.
  * ``itd`` through a *middle* problem (one that itself has lower problems) replays that
    problem's unroll with its direct gradient only: the partial derivative eq. 2.2 asks
    for, not the total-gradient trajectory the problem actually took.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmlo._src.hypergrad import Unrolled, _add, _last, _norm
from jaxmlo._src.nested import below, is_nested, nested_total_gradient
from jaxmlo._src.program import Program

__all__ = [
    "ProgramState",
    "ProblemGradient",
    "init",
    "step",
    "make_step",
    "problem_gradient",
    "gradients",
    "total_gradient",
]


class ProgramState(NamedTuple):
    """The whole state of a program, one pytree.

    Attributes:
      params: ``{name: params}`` of every problem.
      opt_states: ``{name: optax state}`` of every problem.
      step: int32 scalar, program steps taken.
      updates: ``{name: int32 scalar}`` optimizer updates taken by each problem.
    """

    params: dict
    opt_states: dict
    step: jax.Array
    updates: dict


def init(program: Program) -> ProgramState:
    """Initial state from each problem's ``params`` and ``optimizer.init``."""
    params = {n: jax.tree.map(jnp.asarray, p.params) for n, p in program.problems.items()}
    return ProgramState(
        params=params,
        opt_states={n: program.problems[n].optimizer.init(params[n]) for n in program.order},
        step=jnp.zeros((), jnp.int32),
        updates={n: jnp.zeros((), jnp.int32) for n in program.order},
    )


def _call_loss(program, name, params, deps, batch):
    try:
        return program.problems[name].loss(params, deps, batch)
    except KeyError as e:
        raise ValueError(
            f"problem {name!r}: its loss asks for dependency {e.args[0]!r} but the graph gives "
            f"it only {list(program.deps(name))}"
        ) from None


def total_gradient(
    program: Program, name: str, params, deps: dict, batch, unrolled: dict, unrolled_deps: dict
):
    """Loss, total gradient and hypergradient of problem ``name``.

    Eq. 2.2 (below) unless ``program.total_derivative == "exact"`` and ``name``'s sub-program
    is nested (:func:`jaxmlo._src.nested.is_nested`); then the exact total derivative by
    implicit differentiation of the nested sub-program.

    Args:
      program: the program.
      name: the problem whose gradient is wanted.
      params: its parameters.
      deps: its ``deps`` dict (uppers' params, lowers' solutions).
      batch: one batch of ``name``'s data.
      unrolled: ``{lower: Unrolled}`` for every lower problem on a path into ``name``
        (every problem below ``name`` for a nested sub-program).
      unrolled_deps: ``{lower: deps}`` the deps each lower problem was unrolled with.

    Returns:
      ``(loss, grad, hypergrad, v)``: ``grad`` = direct + hypergrad, both shaped like
      ``params`` (``hypergrad`` is zeros when ``name`` has no lower problems); ``v`` is
      ``{lower: dC/dtheta_lower*}``, the direct gradients on the lower solutions.
    """
    if program.total_derivative == "exact" and is_nested(program, name):
        values, lin_batches = {}, {}
        for q in below(program, name):
            values[q] = deps[q] if q in deps else unrolled[q].params
            lin_batches[q] = _last(unrolled[q].batches)
            for d, x in unrolled_deps[q].items():
                if d != name and d not in values:
                    values.setdefault(d, x)
        for d, x in deps.items():
            values.setdefault(d, x)
        return nested_total_gradient(program, name, params, batch, values, lin_batches)
    return _paths_gradient(program, name, params, deps, batch, unrolled, unrolled_deps)


def _paths_gradient(program, name, params, deps, batch, unrolled, unrolled_deps):
    """Thesis eq. 2.2, right to left, accumulated per lower problem (module docstring)."""
    loss, (g, gdeps) = jax.value_and_grad(
        lambda p, d: _call_loss(program, name, p, d, batch), argnums=(0, 1)
    )(params, deps)
    hyper = jax.tree.map(jnp.zeros_like, params)
    relevant = program.path_problems(name)
    u2l, l2u = set(program.u2l), set(program.l2u)
    v = {l: gdeps[l] for l in program.lowers(name)}
    # Right to left: start from dC_k/dtheta_l* and push vectors down the l2u edges; a
    # problem is visited only after every problem above it on a path has added its share.
    acc = {l: v[l] for l in program.lowers(name) if l in relevant}
    for m in reversed(program.order):
        if m not in acc:
            continue
        lp = program.problems[m]
        r = lp.method.best_response_vjp(
            lp.loss,
            lp.optimizer,
            unrolled[m],
            unrolled_deps[m],
            _last(unrolled[m].batches),
            acc.pop(m),
        )
        for d in program.deps(m):
            if d == name and (name, m) in u2l:
                hyper = _add(hyper, r[d])
            elif d in relevant and (d, m) in l2u:
                acc[d] = r[d] if d not in acc else _add(acc[d], r[d])
    return loss, _add(g, hyper), hyper, v


class ProblemUpdate(NamedTuple):
    """One problem's share of a program pass (what an update rule returns).

    Attributes:
      params: parameters after its ``unroll_steps`` updates.
      opt_state: optimizer state after them.
      deltas: ``{lower: params delta}`` from nudging methods (SAMA), applied by the pass.
      losses: ``[unroll_steps]`` losses.
      grad: the last total gradient.
      hypergrad_norm: norm of the last hypergradient.
    """

    params: Any
    opt_state: Any
    deltas: dict
    losses: jax.Array
    grad: Any
    hypergrad_norm: jax.Array


def nudge_deltas(program, name, nudged, unrolled, unrolled_deps, v):
    """``{lower: post_update - params}`` for the nudging methods among ``nudged``."""
    deltas = {}
    for l in nudged:
        lp, un = program.problems[l], unrolled[l]
        if lp.method.nudges:
            new = lp.method.post_update(
                lp.loss, lp.optimizer, un, unrolled_deps[l], _last(un.batches), v[l]
            )
            deltas[l] = jax.tree.map(jnp.subtract, new, un.params)
    return deltas


def scan_update(program, name, params, opt_state, deps, bs, unrolled, unrolled_deps, nudged):
    """The engine's update rule: ``unroll_steps`` optax steps on the total gradient (a scan)."""
    prob = program.problems[name]

    def body(carry, batch):
        p, s, _, _ = carry
        loss, g, hyper, v = total_gradient(program, name, p, deps, batch, unrolled, unrolled_deps)
        u, s = prob.optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s, g, v), (loss, _norm(hyper))

    v0 = {l: jax.tree.map(jnp.zeros_like, deps[l]) for l in program.lowers(name)}
    g0 = jax.tree.map(jnp.zeros_like, params)
    (p1, s1, g_last, v_last), (losses, hnorms) = jax.lax.scan(body, (params, opt_state, g0, v0), bs)
    # Base-parameter update after a meta step (SAMA's nudge along the adapted v).
    deltas = nudge_deltas(program, name, nudged, unrolled, unrolled_deps, v_last)
    return ProblemUpdate(p1, s1, deltas, losses, g_last, hnorms[-1])


def program_pass(program: Program, state: ProgramState, batches: dict, update=scan_update):
    """One pass over the program, lowest problem first.

    ``update(program, name, params, opt_state, deps, batches, unrolled, unrolled_deps,
    nudged) -> ProblemUpdate`` is the per-problem rule (:func:`scan_update` here; data
    parallelism supplies a sharded one). Returns ``(state, metrics, grads)``.
    """
    missing = [n for n in program.order if n not in batches]
    if missing:
        raise ValueError(f"step: no batches for problem(s) {missing}")
    params, opt_states, updates = dict(state.params), dict(state.opt_states), dict(state.updates)
    unrolled, unrolled_deps, metrics, grads = {}, {}, {}, {}
    for name in program.order:
        prob = program.problems[name]
        bs = batches[name]
        lead = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(bs)}
        if lead != {prob.unroll_steps}:
            raise ValueError(
                f"step: batches[{name!r}] must have leading axis unroll_steps="
                f"{prob.unroll_steps} on every leaf, got leading sizes "
                f"{sorted(lead, key=str)}"
            )
        deps = {d: params[d] for d in program.deps(name)}
        lowers = program.lowers(name)
        nudged = sorted(program.path_problems(name) & set(lowers))
        out = update(
            program, name, params[name], opt_states[name], deps, bs, unrolled, unrolled_deps, nudged
        )
        unrolled[name] = Unrolled(
            params0=params[name],
            opt_state0=opt_states[name],
            params=out.params,
            opt_state=out.opt_state,
            batches=bs,
            grad=out.grad,  # the last step's gradient: SAMA adapts at it without a new pass
        )
        unrolled_deps[name] = deps
        params[name], opt_states[name] = out.params, out.opt_state
        updates[name] = updates[name] + prob.unroll_steps
        grads[name] = out.grad
        metrics[f"{name}/loss"] = jnp.mean(out.losses)
        metrics[f"{name}/grad_norm"] = _norm(out.grad)
        if lowers:
            metrics[f"{name}/hypergrad_norm"] = out.hypergrad_norm
        # Applied as deltas so that several upper problems can each nudge the same lower one.
        for l, d in out.deltas.items():
            params[l] = _add(params[l], d)
    new_state = ProgramState(
        params=params, opt_states=opt_states, step=state.step + 1, updates=updates
    )
    return new_state, metrics, grads


def step(program: Program, state: ProgramState, batches: dict):
    """One iteration of the whole program; pure, ``jax.jit``-able.

    Problems run lowest first; each takes ``unroll_steps`` optimizer steps (one
    ``lax.scan``) on its total gradient, with the lower problems' solutions from this pass.

    Args:
      program: the program.
      state: a :class:`ProgramState`.
      batches: ``{name: batch}`` with a leading axis of length ``unroll_steps`` on every
        leaf of problem ``name``'s batch.

    Returns:
      ``(state, metrics)``; metrics is a flat dict ``{"<name>/loss": mean loss over the
      unroll, "<name>/grad_norm": norm of the last total gradient,
      "<name>/hypergrad_norm": norm of its hypergradient part (problems with lower problems
      only)}``.
    """
    new_state, metrics, _ = program_pass(program, state, batches)
    return new_state, metrics


def gradients(program: Program, state: ProgramState, batches: dict) -> dict:
    """``{name: total gradient}`` each problem used at the last step of its unroll in one
    :func:`step` from ``state`` (direct gradient plus eq. 2.2 hypergradient)."""
    return program_pass(program, state, batches)[2]


class ProblemGradient(NamedTuple):
    """What :func:`problem_gradient` returns; arrays shaped like the problem's parameters.

    Attributes:
      loss: [] the problem's loss on its batch.
      direct: the partial gradient of the loss, lower solutions held fixed.
      hypergrad: the part that flows through the lower problems' best responses.
      total: ``direct + hypergrad``, the gradient a program step would apply.
    """

    loss: jax.Array
    direct: Any
    hypergrad: Any
    total: Any


def problem_gradient(program: Program, state: ProgramState, name: str, batches: dict):
    """The hypergradient of problem ``name`` at ``state``, without stepping any problem.

    The lower problems' current parameters in ``state`` are taken as their solutions; their
    best responses are linearised there, on their batch in ``batches``. (``itd`` replays one
    optimizer step of the lower problem from ``state`` on that batch: its Jacobian is that
    step's.) Pure and ``jax.jit``-able.

    Args:
      program: the program.
      state: a :class:`ProgramState`, e.g. from :func:`init` or a run.
      name: the problem whose gradient is wanted.
      batches: ``{problem: batch}``, one batch without the unroll axis for ``name`` and for
        every problem below it.

    Returns:
      A :class:`ProblemGradient` ``(loss, direct, hypergrad, total)``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxmlo
      >>> inner_loss = lambda w, deps, batch: jnp.sum((w - deps["outer"]) ** 2)
      >>> outer_loss = lambda t, deps, batch: jnp.sum((deps["inner"] - batch) ** 2)
      >>> program = jaxmlo.Program(
      ...     [jaxmlo.Problem("inner", inner_loss, jnp.zeros(2), optax.sgd(0.1), method=jaxmlo.cg()),
      ...      jaxmlo.Problem("outer", outer_loss, jnp.zeros(2), optax.adam(0.1))],
      ...     u2l={"outer": ["inner"]}, l2u={"inner": ["outer"]})
      >>> state = jaxmlo.init(program)
      >>> g = jaxmlo.problem_gradient(program, state, "outer", {"outer": jnp.ones(2), "inner": None})
      >>> g.hypergrad.shape  # shaped like state.params["outer"]
      (2,)
    """
    if name not in program.problems:
        raise ValueError(f"problem_gradient: unknown problem {name!r}; known: {program.order}")
    need = [name] + [q for q in program.order if q in below(program, name)]
    missing = [q for q in need if q not in batches]
    if missing:
        raise ValueError(f"problem_gradient: no batch for problem(s) {missing}")
    p = state.params
    unrolled, unrolled_deps = {}, {}
    for q in need[1:]:
        one = jax.tree.map(lambda x: jnp.asarray(x)[None], batches[q])
        s = state.opt_states[q]
        unrolled[q] = Unrolled(params0=p[q], opt_state0=s, params=p[q], opt_state=s, batches=one)
        unrolled_deps[q] = {d: p[d] for d in program.deps(q)}
    deps = {d: p[d] for d in program.deps(name)}
    loss, total, hyper, _ = total_gradient(
        program, name, p[name], deps, batches[name], unrolled, unrolled_deps
    )
    direct = jax.tree.map(jnp.subtract, total, hyper)
    return ProblemGradient(loss=loss, direct=direct, hypergrad=hyper, total=total)


def make_step(program: Program, *, jit: bool = True, donate: bool = False) -> Callable:
    """``step`` bound to ``program``: ``step_fn(state, batches) -> (state, metrics)``.

    Args:
      program: the program.
      jit: compile the whole iteration as one XLA program.
      donate: donate the input state's buffers (saves memory; the old state is consumed).
    """
    fn = functools.partial(step, program)
    if jit:
        fn = jax.jit(fn, donate_argnums=(0,) if donate else ())
    return fn
