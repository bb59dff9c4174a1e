"""Exact total derivatives of nested programs by implicit differentiation.

Eq. 2.2 of the thesis multiplies best-response Jacobians along paths, each taken from one
problem's loss with the other problems' values held fixed. When a problem ``m`` on a path of
``k`` is itself the upper problem of lower problems that respond to ``theta_m`` (a middle level
of a deeper program), ``m``'s optimum is a stationary point of its *total* objective

  F_m(theta; x) = C_m(theta, uppers' values x, lowers' responses R_l(theta, x)),

and its best-response Jacobian is ``-(d^2F_m/dtheta^2)^{-1} d^2F_m/dtheta dx``: the Hessian
includes the curvature of the lowers' responses. Eq. 2.2 uses ``C_m``'s Hessian instead, so it
is not the total derivative there.

Here every problem below ``k`` is a response function ``R_q(x)`` whose value is the engine's
current parameters of ``q`` and whose derivative is given by the implicit function theorem on
``grad_theta F_q = 0`` (a ``jax.custom_jvp``). ``F_q`` calls the responses of ``q``'s lowers,
so the rule applies recursively and ``jax.grad`` of ``k``'s loss through the responses is the
exact total derivative at any depth (JAX differentiates the rule itself for the second
derivatives of the responses that the Hessian of an outer ``F`` needs). The linear systems are
solved densely (LU of the Hessian built from Hessian-vector products), which is exact and
transposable; it fits problems of up to a few thousand parameters.

Semantics: problems not below ``k`` (siblings sharing a lower problem, problems above ``k``)
keep their current values; an upper problem's value as seen by its lower is the upper's own
response when the upper is below ``k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

__all__ = ["below", "is_nested", "nested_total_gradient", "MAX_DENSE_SIZE"]

# Largest parameter count of a problem inside a nested sub-program: its Hessian is built
# densely (that many Hessian-vector products) and LU-factored.
MAX_DENSE_SIZE = 4096


def below(program, name: str) -> frozenset:
    """Problems under ``name`` in the program's ordering (its lowers, theirs, ...)."""
    down = {}
    for u, l in program.u2l:
        down.setdefault(u, set()).add(l)
    for l, u in program.l2u:
        down.setdefault(u, set()).add(l)
    seen, stack = set(), [name]
    while stack:
        for m in down.get(stack.pop(), ()):
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return frozenset(seen)


def is_nested(program, name: str) -> bool:
    """Whether eq. 2.2 may differ from the total derivative of ``name``'s loss.

    True when ``name`` has a hypergradient path and some problem below ``name`` is the upper
    problem (a u2l edge) of another problem: then that problem's optimum depends on its
    lowers' best responses, which eq. 2.2 holds fixed.
    """
    if not program.path_problems(name):
        return False
    under = below(program, name)
    return any(u in under for u, _ in program.u2l)


def _dense_solve(hvp, theta, rhs, name):
    flat, unravel = ravel_pytree(theta)
    n = flat.size
    if n > MAX_DENSE_SIZE:
        raise ValueError(
            f"problem {name!r} has {n} parameters inside a nested sub-program; the exact total "
            f"derivative builds its Hessian densely (at most {MAX_DENSE_SIZE}). Use "
            f"Program(..., total_derivative='paths') for eq. 2.2 instead"
        )
    rows = jax.vmap(lambda e: ravel_pytree(hvp(unravel(e)))[0])(jnp.eye(n, dtype=flat.dtype))
    # rows[i] = H e_i; H is symmetric, so rows is H itself.
    x = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(rows), ravel_pytree(rhs)[0])
    return unravel(x)


def nested_total_gradient(program, name: str, params, batch, values: dict, batches: dict):
    """Loss, exact total gradient and hypergradient of problem ``name``.

    Args:
      program: the program.
      name: the problem whose gradient is wanted.
      params: its parameters.
      batch: one batch of ``name``'s data.
      values: ``{problem: params}`` current parameters of every problem below ``name``
        (taken as their approximate optima) and of every other problem their losses or
        ``name``'s loss read.
      batches: ``{problem: batch}`` where each problem below ``name`` is linearised (its last
        unrolled batch).

    Returns:
      ``(loss, grad, hypergrad, v)`` as :func:`jaxmlo.testing.total_gradient`.
    """
    under = below(program, name)
    # Only the values the sub-program reads are needed; the others never enter it.
    fixed = {n: x for n, x in values.items() if n != name and n not in under}
    problems = program.problems
    uppers = {n: set(program.uppers(n)) for n in program.order}

    def value(q, env):
        if q in env:
            return env[q]
        if q in fixed:
            return fixed[q]
        return response(q, env)

    def objective(q, theta, env, b):
        inner = dict(env, **{q: theta})
        deps = {d: value(d, env if d in uppers[q] else inner) for d in program.deps(q)}
        return problems[q].loss(theta, deps, b)

    def response(q, env):
        theta = values[q]

        @jax.custom_jvp
        def r(env):
            del env
            return theta

        @r.defjvp
        def r_jvp(primals, tangents):
            (e,), (de,) = primals, tangents

            def g(th, e):
                return jax.grad(objective, argnums=1)(q, th, e, batches[q])

            # Linearise at r(e), not the constant: an outer derivative then sees the point
            # move with e (third derivatives of non-quadratic losses).
            th0 = r(e)
            _, rhs = jax.jvp(lambda e: g(th0, e), (e,), (de,))
            x = _dense_solve(lambda t: jax.jvp(lambda th: g(th, e), (th0,), (t,))[1], th0, rhs, q)
            return th0, jax.tree.map(jnp.negative, x)

        return r(dict(env))

    def total(theta):
        return objective(name, theta, {}, batch)

    deps = {d: values[d] for d in program.deps(name)}
    loss, (direct, gdeps) = jax.value_and_grad(problems[name].loss, argnums=(0, 1))(
        params, deps, batch
    )
    grad = jax.grad(total)(params)
    hyper = jax.tree.map(jnp.subtract, grad, direct)
    return loss, grad, hyper, {l: gdeps[l] for l in program.lowers(name)}
