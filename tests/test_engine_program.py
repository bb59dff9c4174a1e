"""Engine: eq. 2.2 hypergradients on quadratic programs, graph validation, compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo
import jaxmlo.testing
from jaxmlo import Problem, Program

D = 3  # parameter size of every problem


def _spd(key, d=D):
    m = jax.random.normal(key, (d, d))
    return m @ m.T + d * jnp.eye(d)


def _quadratic(key, deps):
    """C(theta, deps) = 1/2 t'At + t'(c + sum_d B_d x_d) + sum_d (1/2 x_d'E_d x_d + e_d'x_d).

    Returns (loss, exact_argmin) with the argmin over theta in closed form.
    """
    keys = jax.random.split(key, 2 + 3 * len(deps))
    a, c = _spd(keys[0]), jax.random.normal(keys[1], (D,))
    coup = {
        d: (
            jax.random.normal(keys[2 + 3 * i], (D, D)),
            _spd(keys[3 + 3 * i]) * 0.1,
            jax.random.normal(keys[4 + 3 * i], (D,)),
        )
        for i, d in enumerate(deps)
    }

    def loss(theta, dep, batch):
        lin = c + sum(coup[d][0] @ dep[d] for d in deps)
        out = 0.5 * theta @ a @ theta + theta @ lin
        out += sum(0.5 * dep[d] @ coup[d][1] @ dep[d] + coup[d][2] @ dep[d] for d in deps)
        return out + 0.0 * jnp.sum(batch)

    def argmin(dep):
        return -jnp.linalg.solve(a, c + sum(coup[d][0] @ dep[d] for d in deps))

    return loss, argmin


def _problem(name, loss, params, method=None):
    # lr 0: the state stays where the test puts it (at the exact solutions), so the engine's
    # gradients are evaluated exactly there.
    return Problem(name, loss, params, optax.sgd(0.0), method=method)


def _batches(names):
    return {n: jnp.zeros((1, 1)) for n in names}


CG = jaxmlo.cg(maxiter=50, tol=1e-12)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_figure_2_2_four_problems_match_grad_through_exact_solutions():
    # Thesis Figure 2.2 shape: theta_4 reaches theta_3* directly and through theta_1*.
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    c1, s1 = _quadratic(ks[0], ["p2", "p4"])
    c2, _ = _quadratic(ks[1], ["p1"])
    c3, s3 = _quadratic(ks[2], ["p1", "p4"])
    c4, _ = _quadratic(ks[3], ["p3"])
    th2, th4 = jax.random.normal(ks[4], (D,)), jax.random.normal(ks[5], (D,))

    def exact(t2, t4):
        t1 = s1({"p2": t2, "p4": t4})
        return t1, s3({"p1": t1, "p4": t4})

    def f4(t4):
        return c4(t4, {"p3": exact(th2, t4)[1]}, 0.0)

    def f2(t2):
        return c2(t2, {"p1": exact(t2, th4)[0]}, 0.0)

    t1, t3 = exact(th2, th4)
    prog = Program(
        [
            _problem("p1", c1, t1, CG),
            _problem("p2", c2, th2),
            _problem("p3", c3, t3, CG),
            _problem("p4", c4, th4),
        ],
        u2l={"p4": ["p1", "p3"], "p2": ["p1"]},
        l2u={"p1": ["p2", "p3"], "p3": ["p4"]},
    )
    assert prog.paths("p4", "p3") == (("p1", "p3"), ("p3",))  # the two paths of Fig. 2.2
    assert prog.paths("p2", "p1") == (("p1",),)
    assert prog.order.index("p1") < prog.order.index("p3") < prog.order.index("p4")

    grads = jax.jit(lambda s, b: jaxmlo.testing.gradients(prog, s, b))(
        jaxmlo.init(prog), _batches(prog.order)
    )
    # float64 and converged CG on a 3x3 SPD system: only round-off separates the two.
    assert _rel(grads["p4"], jax.grad(f4)(th4)) < 1e-6
    assert _rel(grads["p2"], jax.grad(f2)(th2)) < 1e-6
    # Dropping the indirect path p4 -> p1* -> p3* must change the answer (the test has teeth).
    c3_direct = lambda t4: c4(t4, {"p3": s3({"p1": t1, "p4": t4})}, 0.0)
    assert _rel(jax.grad(c3_direct)(th4), jax.grad(f4)(th4)) > 1e-3


def test_three_level_chain_matches_grad_through_exact_solutions():
    # Thesis 2.5.4 shape: reweight (3) -> pretrain (1) -> finetune (2) -> reweight (3).
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    c1, s1 = _quadratic(ks[0], ["rw"])
    c2, s2 = _quadratic(ks[1], ["pt"])
    c3, _ = _quadratic(ks[2], ["ft"])
    th3 = jax.random.normal(ks[3], (D,))

    def f3(t3):
        t1 = s1({"rw": t3})
        return c3(t3, {"ft": s2({"pt": t1})}, 0.0)

    t1 = s1({"rw": th3})
    t2 = s2({"pt": t1})
    for method in (CG, jaxmlo.neumann(steps=2000, lr=0.02)):
        prog = Program(
            [
                _problem("pt", c1, t1, method),
                _problem("ft", c2, t2, method),
                _problem("rw", c3, th3),
            ],
            u2l={"rw": ["pt"]},
            l2u={"pt": ["ft"], "ft": ["rw"]},
        )
        assert prog.order == ("pt", "ft", "rw")
        assert prog.paths("rw", "ft") == (("pt", "ft"),)
        grads = jaxmlo.testing.gradients(prog, jaxmlo.init(prog), _batches(prog.order))
        assert _rel(grads["rw"], jax.grad(f3)(th3)) < 1e-6, method.name


def _toy(name, deps=(), method=CG):
    def loss(p, d, batch):
        return jnp.sum(p**2) + sum(jnp.sum(p * d[n]) for n in deps) + 0.0 * jnp.sum(batch)

    return Problem(
        name, loss, jnp.ones(2), optax.sgd(0.1), method=method, example_batch=jnp.zeros(1)
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(problems=["a", "b"], u2l={"a": ["c"]}, l2u={"b": ["a"]}), r"unknown problem.*'c'"),
        (dict(problems=["a", "b"], u2l={"a": ["a"]}, l2u={"b": ["a"]}), r"self-edge.*'a'"),
        (
            dict(problems=["a", "b", "c"], u2l={}, l2u={"a": ["b"], "b": ["c"], "c": ["a"]}),
            r"cycle through \['a', 'b', 'c', 'a'\]",
        ),
        (
            dict(problems=["a", "b"], u2l={"a": ["b"], "b": ["a"]}, l2u={}),
            r"cycle through \['a', 'b', 'a'\]",
        ),
        (
            dict(problems=["a", "b", "c"], u2l={"a": ["b"]}, l2u={"b": ["a"]}),
            r"\['c'\] are unreachable",
        ),
        (
            dict(problems=["a", "b", "c"], u2l={"a": ["b", "c"]}, l2u={"b": ["a"]}),
            r"u2l edge 'a' -> 'c': problem 'a'.s loss is unreachable from 'c'",
        ),
    ],
)
def test_invalid_graphs_raise_naming_problems(kwargs, match):
    probs = [_toy(n) for n in kwargs.pop("problems")]
    with pytest.raises(ValueError, match=match):
        Program(probs, **kwargs)


def test_loss_asking_for_missing_dependency_raises():
    # 'inner' reads deps['outer'] but no u2l edge outer -> inner gives it.
    with pytest.raises(ValueError, match=r"problem 'inner'.*dependency 'outer'"):
        Program(
            [_toy("inner", deps=("outer",)), _toy("outer", deps=("inner",))],
            l2u={"inner": ["outer"]},
        )


def test_lower_problem_without_method_raises():
    with pytest.raises(
        ValueError, match=r"problem 'inner' has no hypergradient method.*problem 'outer'"
    ):
        Program(
            [_toy("inner", deps=("outer",), method=None), _toy("outer", deps=("inner",))],
            u2l={"outer": ["inner"]},
            l2u={"inner": ["outer"]},
        )


def test_duplicate_names_and_immutability():
    with pytest.raises(ValueError, match=r"duplicate problem names \['a'\]"):
        Program([_toy("a"), _toy("a")])
    prog = Program([_toy("a")])
    # A lower problem on no eq.-2.2 path (no u2l edge into it) needs no method.
    Program([_toy("pre", method=None), _toy("fine", deps=("pre",))], l2u={"pre": ["fine"]})
    with pytest.raises(AttributeError):
        prog._order = ()


def _bilevel(method, unroll=3):
    def inner(p, d, b):
        return jnp.mean(
            (b[:, :2] @ p - b[:, 2]) ** 2 * jax.nn.softplus(d["outer"][0])
        ) + 0.01 * jnp.sum(p**2)

    def outer(lam, d, b):
        return jnp.mean((b[:, :2] @ d["inner"] - b[:, 2]) ** 2) + 0.0 * jnp.sum(lam)

    return Program(
        [
            Problem(
                "inner", inner, jnp.zeros(2), optax.adam(0.1), unroll_steps=unroll, method=method
            ),
            Problem("outer", outer, jnp.ones(1), optax.adam(0.05)),
        ],
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


def _data(i, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), i), (t, 4, 3))
    return x


def test_compiled_step_traces_once_and_runs_every_method():
    traces = []
    for method in (jaxmlo.itd(), CG, jaxmlo.neumann(), jaxmlo.finite_difference(), jaxmlo.sama()):
        prog = _bilevel(method)
        state = jaxmlo.init(prog)

        def counted(s, b, prog=prog):
            traces.append(method.name)  # runs only while tracing
            return jaxmlo.step(prog, s, b)

        fn = jax.jit(counted)
        for i in range(2):
            state, metrics = fn(state, {"inner": _data(i, 3), "outer": _data(100 + i, 1)})
        assert traces.count(method.name) == 1, method.name
        assert int(state.step) == 2 and int(state.updates["inner"]) == 6
        assert all(np.isfinite(float(v)) for v in metrics.values()), (method.name, metrics)
        assert set(metrics) == {
            "inner/loss",
            "inner/grad_norm",
            "outer/loss",
            "outer/grad_norm",
            "outer/hypergrad_norm",
        }


def test_bad_batches_raise():
    prog = _bilevel(CG)
    with pytest.raises(
        ValueError, match=r"batches\['inner'\] must have leading axis unroll_steps=3"
    ):
        jaxmlo.step(prog, jaxmlo.init(prog), {"inner": _data(0, 2), "outer": _data(1, 1)})
    with pytest.raises(ValueError, match=r"no batches for problem\(s\) \['outer'\]"):
        jaxmlo.step(prog, jaxmlo.init(prog), {"inner": _data(0, 3)})


def test_optax_composition_multisteps_and_clipping():
    # Gradient accumulation and clipping come from optax; MultiSteps is unwrapped by Program.
    prog = _bilevel(jaxmlo.finite_difference(), unroll=2)
    inner = prog.problems["inner"]._replace(
        optimizer=optax.MultiSteps(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)), every_k_schedule=2
        )
    )
    prog = Program(
        [inner, prog.problems["outer"]], u2l=dict(outer=["inner"]), l2u=dict(inner=["outer"])
    )
    state, metrics = jax.jit(lambda s, b: jaxmlo.step(prog, s, b))(
        jaxmlo.init(prog), {"inner": _data(0, 2), "outer": _data(1, 1)}
    )
    assert int(state.opt_states["inner"].gradient_step) == 1  # two micro-steps, one update
    assert all(np.isfinite(float(v)) for v in metrics.values())
    with pytest.raises(TypeError, match=r"problem 'x': optimizer must be an optax"):
        Program([Problem("x", lambda p, d, b: jnp.sum(p), jnp.ones(1), "sgd")])


def test_missing_dependency_without_example_batch_raises_at_trace():
    inner = _toy("inner", deps=("outer",))._replace(example_batch=None)
    prog = Program(
        [inner, _toy("outer", deps=("inner",))._replace(example_batch=None)],
        l2u={"inner": ["outer"]},
    )
    with pytest.raises(ValueError, match=r"problem 'inner'.*dependency 'outer'"):
        jaxmlo.step(
            prog, jaxmlo.init(prog), {"inner": jnp.zeros((1, 1)), "outer": jnp.zeros((1, 1))}
        )


def test_sama_nudge_moves_only_the_lower_problem():
    batches = {"inner": _data(0, 3), "outer": _data(1, 1)}
    runs = {}
    for nudge in (True, False):
        prog = _bilevel(jaxmlo.sama(nudge=nudge))
        runs[nudge] = jax.jit(lambda s, b, prog=prog: jaxmlo.step(prog, s, b))(
            jaxmlo.init(prog), batches
        )[0]
    # Same meta update (the hypergradient is taken before the nudge) ...
    np.testing.assert_array_equal(runs[True].params["outer"], runs[False].params["outer"])
    # ... and the nudge is a step of norm alpha = 1 on the lower parameters.
    moved = jnp.linalg.norm(runs[True].params["inner"] - runs[False].params["inner"])
    assert abs(float(moved) - 1.0) < 1e-9  # float64: the nudge has norm alpha exactly


def test_problem_gradient_at_the_state_without_stepping():
    prog = _bilevel(CG, unroll=1)
    # The old way: a step whose lower problem does not move (lr 0) reports the same gradient.
    frozen = Program(
        [prog.problems["inner"]._replace(optimizer=optax.sgd(0.0)), prog.problems["outer"]],
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )
    state = jaxmlo.init(prog)
    state = state._replace(params=dict(state.params, inner=jnp.asarray([0.3, -0.2])))
    b_in, b_out = _data(0, 1), _data(1, 1)
    g = jax.jit(
        lambda s: jaxmlo.problem_gradient(prog, s, "outer", {"inner": b_in[0], "outer": b_out[0]})
    )(state)
    ref = jaxmlo.testing.gradients(frozen, state, {"inner": b_in, "outer": b_out})["outer"]
    np.testing.assert_allclose(g.total, ref, rtol=1e-10)
    np.testing.assert_allclose(g.direct + g.hypergrad, g.total, rtol=1e-12)
    assert float(jnp.linalg.norm(g.hypergrad)) > 1e-6  # the lower problem's response counts
    with pytest.raises(ValueError, match=r"no batch for problem\(s\) \['inner'\]"):
        jaxmlo.problem_gradient(prog, state, "outer", {"outer": b_out[0]})
    with pytest.raises(ValueError, match=r"unknown problem 'nope'"):
        jaxmlo.problem_gradient(prog, state, "nope", {})
