"""Exact total derivatives on nested programs vs jax.grad through exact nested solutions.

A middle problem that is itself the upper problem of a lower one has an optimum that depends
on that lower problem's best response; eq. 2.2 ("paths") holds the response fixed, the
default ("exact") differentiates the nested stationarity conditions. Quadratic losses give
every nested optimum in closed form, so ``jax.grad`` through those solutions is exact.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxmlo
import jaxmlo.testing
from jaxmlo import Problem, Program

D = 2  # parameter size of every problem


def _spd(key, scale=1.0):
    m = jax.random.normal(key, (D, D))
    return scale * (m @ m.T + D * jnp.eye(D))


def _quadratic(key, deps):
    """C(t, x) = 1/2 t'At + t'(c + sum_d B_d x_d) + sum_d (1/2 x_d'E_d x_d + e_d'x_d)."""
    keys = jax.random.split(key, 2 + 3 * len(deps))
    a, c = _spd(keys[0]), jax.random.normal(keys[1], (D,))
    coup = {
        d: (
            1.5 * jax.random.normal(keys[2 + 3 * i], (D, D)),
            _spd(keys[3 + 3 * i], 0.5),
            jax.random.normal(keys[4 + 3 * i], (D,)),
        )
        for i, d in enumerate(deps)
    }

    def loss(t, x, batch):
        lin = c + sum(coup[d][0] @ x[d] for d in deps)
        out = 0.5 * t @ a @ t + t @ lin
        out += sum(0.5 * x[d] @ coup[d][1] @ x[d] + coup[d][2] @ x[d] for d in deps)
        return out + 0.0 * jnp.sum(batch)

    return loss


def _argmin(f):
    """Exact minimiser of a quadratic ``f`` on R^D, differentiable in what ``f`` closes over."""
    z = jnp.zeros(D)
    return -jnp.linalg.solve(jax.hessian(f)(z), jax.grad(f)(z))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _program(problems, u2l, l2u, values, total_derivative="exact"):
    # lr 0: the state stays at the exact solutions the test puts it in.
    probs = [
        Problem(n, f, values[n], optax.sgd(0.0), method=jaxmlo.cg(tol=1e-14)) for n, f in problems
    ]
    return Program(probs, u2l=u2l, l2u=l2u, total_derivative=total_derivative)


def _batches(prog):
    return {n: jnp.zeros((1, 1)) for n in prog.order}


# Measured relative error of eq. 2.2 on the two programs below (printed by the tests with -s).
PATHS_ERROR = {}


def test_three_level_chain_whose_middle_is_an_upper_problem():
    # top -> mid -> bot by u2l; bot* enters mid's loss and mid* enters top's loss.
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    c_bot, c_mid, c_top = (
        _quadratic(ks[0], ["mid"]),
        _quadratic(ks[1], ["top", "bot"]),
        _quadratic(ks[2], ["mid"]),
    )
    top = jax.random.normal(ks[3], (D,))

    def bot_star(mid):
        return _argmin(lambda b: c_bot(b, {"mid": mid}, 0.0))

    def mid_star(t):  # mid's optimum anticipates bot's best response
        return _argmin(lambda m: c_mid(m, {"top": t, "bot": bot_star(m)}, 0.0))

    def f_top(t):
        return c_top(t, {"mid": mid_star(t)}, 0.0)

    mid = mid_star(top)
    values = {"top": top, "mid": mid, "bot": bot_star(mid)}
    edges = dict(u2l={"top": ["mid"], "mid": ["bot"]}, l2u={"bot": ["mid"], "mid": ["top"]})
    problems = [("bot", c_bot), ("mid", c_mid), ("top", c_top)]
    ref = jax.grad(f_top)(top)

    prog = _program(problems, **edges, values=values)
    grads = jax.jit(lambda s, b: jaxmlo.testing.gradients(prog, s, b))(
        jaxmlo.init(prog), _batches(prog)
    )
    # float64 and dense solves of 2x2 systems: only round-off separates the two.
    assert _rel(grads["top"], ref) < 1e-6
    # mid sits at the optimum of its total objective: its total gradient vanishes.
    assert float(jnp.linalg.norm(grads["mid"])) < 1e-9

    paths = _program(problems, **edges, values=values, total_derivative="paths")
    g_paths = jaxmlo.testing.gradients(paths, jaxmlo.init(paths), _batches(paths))["top"]
    PATHS_ERROR["chain"] = _rel(g_paths, ref)
    print(f"eq. 2.2 relative error, 3-level nested chain: {PATHS_ERROR['chain']:.3f}")
    assert PATHS_ERROR["chain"] > 0.1  # the test has teeth: eq. 2.2 is not the answer here


def test_four_problem_dag_whose_middle_upper_has_its_own_lower_problem():
    # p4 on top; p3 below it is the upper problem of p1; p2 is a second upper of p1; p4 also
    # reaches p1 directly (u2l p4 -> p1), so p4's hypergradient has paths through p1 and p3.
    ks = jax.random.split(jax.random.PRNGKey(4), 6)
    c1 = _quadratic(ks[0], ["p2", "p3", "p4"])
    c2 = _quadratic(ks[1], ["p1"])
    c3 = _quadratic(ks[2], ["p1", "p4"])
    c4 = _quadratic(ks[3], ["p3"])
    th2, th4 = jax.random.normal(ks[4], (D,)), jax.random.normal(ks[5], (D,))

    def s1(t2, t3, t4):
        return _argmin(lambda x: c1(x, {"p2": t2, "p3": t3, "p4": t4}, 0.0))

    def s3(t2, t4):  # p3's optimum anticipates p1's best response to p3
        return _argmin(lambda x: c3(x, {"p4": t4, "p1": s1(t2, x, t4)}, 0.0))

    th3 = s3(th2, th4)
    values = {"p1": s1(th2, th3, th4), "p2": th2, "p3": th3, "p4": th4}
    edges = dict(
        u2l={"p4": ["p1", "p3"], "p3": ["p1"], "p2": ["p1"]},
        l2u={"p1": ["p2", "p3"], "p3": ["p4"]},
    )
    problems = [("p1", c1), ("p2", c2), ("p3", c3), ("p4", c4)]
    ref4 = jax.grad(lambda t4: c4(t4, {"p3": s3(th2, t4)}, 0.0))(th4)
    # p2 is not nested (p1 has no lower problem): p3 stays at its current value.
    ref2 = jax.grad(lambda t2: c2(t2, {"p1": s1(t2, th3, th4)}, 0.0))(th2)

    prog = _program(problems, **edges, values=values)
    state = jaxmlo.init(prog)
    one = {n: jnp.zeros(1) for n in prog.order}
    g4 = jax.jit(lambda s, b: jaxmlo.problem_gradient(prog, s, "p4", b))(state, one)
    assert _rel(g4.total, ref4) < 1e-6
    assert _rel(g4.direct + g4.hypergrad, ref4) < 1e-6
    g2 = jaxmlo.problem_gradient(prog, state, "p2", one)
    assert _rel(g2.total, ref2) < 1e-6
    # The compiled step agrees with problem_gradient.
    grads = jax.jit(lambda s, b: jaxmlo.testing.gradients(prog, s, b))(state, _batches(prog))
    assert _rel(grads["p4"], ref4) < 1e-6 and float(jnp.linalg.norm(grads["p3"])) < 1e-9

    paths = _program(problems, **edges, values=values, total_derivative="paths")
    g_paths = jaxmlo.problem_gradient(paths, jaxmlo.init(paths), "p4", one).total
    PATHS_ERROR["dag"] = _rel(g_paths, ref4)
    print(f"eq. 2.2 relative error, 4-problem nested DAG: {PATHS_ERROR['dag']:.3f}")
    assert PATHS_ERROR["dag"] > 0.1
    # Where eq. 2.2 is exact (p2's sub-program is not nested) both modes agree.
    assert _rel(jaxmlo.problem_gradient(paths, state, "p2", one).total, ref2) < 1e-6


def test_nested_program_steps_under_jit_and_bad_option_is_refused():
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    probs = [
        Problem(
            "bot", _quadratic(ks[0], ["mid"]), jnp.zeros(D), optax.sgd(0.1), 2, method=jaxmlo.cg()
        ),
        Problem(
            "mid",
            _quadratic(ks[1], ["top", "bot"]),
            jnp.zeros(D),
            optax.sgd(0.1),
            method=jaxmlo.cg(),
        ),
        Problem("top", _quadratic(ks[2], ["mid"]), jnp.ones(D), optax.sgd(0.1)),
        # Reads bot's solution but is not part of top's nested sub-program.
        Problem("other", _quadratic(ks[3], ["bot"]), jnp.ones(D), optax.sgd(0.1)),
    ]
    edges = dict(
        u2l={"top": ["mid"], "mid": ["bot"]}, l2u={"bot": ["mid", "other"], "mid": ["top"]}
    )
    prog = Program(probs, **edges)
    assert prog.total_derivative == "exact"
    batches = {n: jnp.zeros((1, 1)) for n in ("mid", "top", "other")}
    batches["bot"] = jnp.zeros((2, 1))
    fn = jaxmlo.make_step(prog)
    state = jaxmlo.init(prog)
    for _ in range(3):
        state, metrics = fn(state, batches)
    assert int(state.step) == 3
    assert all(bool(jnp.isfinite(v)) for v in metrics.values()), metrics
    with pytest.raises(ValueError, match=r"total_derivative must be 'exact' or 'paths'"):
        Program(probs, **edges, total_derivative="betty")


def _newton(f, x0, steps):
    def body(_, x):
        return x - jnp.linalg.solve(jax.hessian(f)(x), jax.grad(f)(x))

    return jax.lax.fori_loop(0, steps, body, x0)


def test_non_quadratic_chain_matches_central_differences_of_nested_solves():
    # Non-quadratic losses: the responses' linearisation points move with their inputs, so
    # third derivatives enter the middle level's total Hessian.
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    a = [_spd(k) for k in ks[:3]]
    w = [jax.random.normal(k, (D, D)) for k in ks[3:6]]

    def c_bot(b, x, _):
        return 0.5 * b @ a[2] @ b + b @ (w[0] @ x["mid"]) + 0.3 * jnp.sum(jnp.cosh(b))

    def c_mid(m, x, _):
        bot = x["bot"]
        return 0.5 * m @ a[1] @ m + m @ (w[1] @ x["top"]) + jnp.sum(jnp.sin(m * bot) + bot**2 / 2)

    def c_top(t, x, _):
        return 0.5 * t @ a[0] @ t + t @ (w[2] @ x["mid"]) + 0.2 * jnp.sum(x["mid"] ** 4)

    def bot_star(m):
        return _newton(lambda b: c_bot(b, {"mid": m}, 0.0), jnp.zeros(D), 40)

    def mid_star(t):
        return _newton(lambda m: c_mid(m, {"top": t, "bot": bot_star(m)}, 0.0), jnp.zeros(D), 30)

    f_top = jax.jit(lambda t: c_top(t, {"mid": mid_star(t)}, 0.0))
    top = jax.random.normal(ks[7], (D,))
    h = 1e-5  # float64 central differences of Newton-converged solutions: error ~h^2
    ref = jnp.stack([(f_top(top + h * e) - f_top(top - h * e)) / (2 * h) for e in jnp.eye(D)])
    mid = jax.jit(mid_star)(top)
    values = {"top": top, "mid": mid, "bot": jax.jit(bot_star)(mid)}
    prog = _program(
        [("bot", c_bot), ("mid", c_mid), ("top", c_top)],
        u2l={"top": ["mid"], "mid": ["bot"]},
        l2u={"bot": ["mid"], "mid": ["top"]},
        values=values,
    )
    one = {n: jnp.zeros(1) for n in prog.order}
    g = jax.jit(lambda s: jaxmlo.problem_gradient(prog, s, "top", one))(jaxmlo.init(prog))
    assert _rel(g.total, ref) < 1e-6
