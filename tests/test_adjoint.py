"""Adjoints as values: jax.grad through ``unroll(..., adjoint=...)`` is the hypergradient; the
implicit solves report convergence; the optax transform and ``bilevel`` give the same steps as
``meta_step``.  float64 via tests/conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo as J

# ---------------------------------------------------------------------------------------------
# A pytree problem (nonlinear, Adam base optimizer, a meta loss with a direct λ term).
# ---------------------------------------------------------------------------------------------


def tree_loss(params, deps, batch):
    x, y = batch
    pred = jnp.tanh(x @ params["w"]) @ params["v"] + params["b"]
    decay = jax.nn.softplus(deps["decay"])
    return (
        jnp.mean((pred - y) ** 2)
        + jnp.sum(decay * params["w"] ** 2)
        + 0.5 * jnp.sum(deps["scale"] * params["v"] ** 2)
    )


def tree_meta_loss(deps, params, batch):
    x, y = batch
    pred = jnp.tanh(x @ params["w"]) @ params["v"] + params["b"]
    return jnp.mean((pred - y) ** 2) + 1e-3 * jnp.sum(deps["decay"] ** 2)


_rng = np.random.default_rng(3)
PARAMS = {
    "w": jnp.asarray(_rng.normal(size=(3, 4)) * 0.5),
    "v": jnp.asarray(_rng.normal(size=4)),
    "b": jnp.asarray(0.1),
}
DEPS = {"decay": jnp.asarray(_rng.normal(size=(3, 4))), "scale": jnp.asarray(1.0 + _rng.random(4))}
BATCHES = (jnp.asarray(_rng.normal(size=(3, 8, 3))), jnp.asarray(_rng.normal(size=(3, 8))))
META_BATCH = (jnp.asarray(_rng.normal(size=(8, 3))), jnp.asarray(_rng.normal(size=8)))
OPT = optax.adam(1e-2)

METHODS = {
    "itd": J.itd(),
    "itd_checkpoint": J.itd(checkpoint=True),
    "cg": J.cg(maxiter=20, damping=1.0),
    "neumann": J.neumann(steps=20, damping=1.0),
    "cg_linearize": J.cg(maxiter=20, damping=1.0, hvp="linearize"),
    "neumann_linearize": J.neumann(steps=20, damping=1.0, hvp="linearize"),
    "direct": J.direct(damping=1.0),
    "finite_difference": J.finite_difference(),
    "sama": J.sama(),
    "sama_unit_scale": J.sama(unit_scale=True),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_grad_through_unroll_is_the_hypergradient(name):
    method = METHODS[name]

    @jax.jit
    @jax.grad
    def through_unroll(deps):
        un = J.unroll(tree_loss, OPT, PARAMS, OPT.init(PARAMS), deps, BATCHES, adjoint=method)
        return tree_meta_loss(deps, un.params, META_BATCH)

    @jax.jit
    def reference(deps):
        un = J.unroll(tree_loss, OPT, PARAMS, OPT.init(PARAMS), deps, BATCHES)
        last = jax.tree.map(lambda x: x[-1], BATCHES)
        g, info = J.functional.hypergradient(
            method, tree_loss, tree_meta_loss, OPT, un, deps, last, META_BATCH
        )
        return g, info

    g = through_unroll(DEPS)
    ref, info = reference(DEPS)
    assert bool(info.finite)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        # The same float64 computation compiled in two programs: agreement to rounding.
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        assert float(jnp.abs(a).sum()) > 0
    if name not in ("cg", "sama"):
        return

    @jax.jit
    def by_vjp(deps):  # jax.vjp of Unrolled.params alone gives the same pullback
        run = lambda d: (
            J.unroll(tree_loss, OPT, PARAMS, OPT.init(PARAMS), d, BATCHES, adjoint=method).params
        )
        theta, pull = jax.vjp(run, deps)
        (indirect,) = pull(jax.grad(tree_meta_loss, argnums=1)(deps, theta, META_BATCH))
        return indirect, jax.grad(tree_meta_loss)(deps, theta, META_BATCH)

    indirect, direct = by_vjp(DEPS)
    for a, b, c in zip(*map(jax.tree.leaves, (indirect, direct, ref))):
        np.testing.assert_allclose(a + b, c, rtol=1e-10, atol=1e-14)


def test_implicit_adjoint_refuses_forward_mode_naming_it():
    def val(deps, method):
        un = J.unroll(tree_loss, OPT, PARAMS, OPT.init(PARAMS), deps, BATCHES, adjoint=method)
        return tree_meta_loss(deps, un.params, META_BATCH)

    with pytest.raises(TypeError, match=r"adjoint=cg\(\.\.\.\)\).*no forward mode"):
        jax.jvp(lambda d: val(d, J.cg()), (DEPS,), (DEPS,))
    with pytest.raises(TypeError, match=r"adjoint=sama"):
        jax.jit(jax.jacfwd(lambda d: val(d, J.sama())))(DEPS)
    # itd has both modes.
    jax.jvp(lambda d: val(d, J.itd()), (DEPS,), (DEPS,))


# ---------------------------------------------------------------------------------------------
# Biased regression (thesis 3.3.1): closed forms for the solves and for SAMA's scale.
# ---------------------------------------------------------------------------------------------
BETA, N, D = 0.1, 40, 5
X = _rng.normal(size=(N, D))
Y = X @ _rng.normal(size=D) + 0.5 * _rng.normal(size=N)
XP, YP = _rng.normal(size=(N, D)), _rng.normal(size=N)
A = X.T @ X + BETA * np.eye(D)
ETA = 1.0 / np.linalg.eigvalsh(A).max()


def base_loss(w, lam, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * BETA * jnp.sum((w - lam) ** 2)


def meta_loss(lam, w, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2)


def full(T):
    return (jnp.broadcast_to(X, (T, N, D)), jnp.broadcast_to(Y, (T, N)))


def g_true(lam):
    w = np.linalg.solve(A, X.T @ Y + BETA * lam)
    return BETA * np.linalg.solve(A, XP.T @ (XP @ w - YP))


@pytest.fixture(scope="module")
def converged():
    opt = optax.sgd(ETA)
    w0 = jnp.zeros(D)
    un = jax.jit(lambda lam: J.unroll(base_loss, opt, w0, opt.init(w0), lam, full(300)))(
        jnp.zeros(D)
    )
    return opt, un


def _hypergrad(method, opt, un):
    return jax.jit(
        lambda un: J.functional.hypergradient(
            method, base_loss, meta_loss, opt, un, jnp.zeros(D), (X, Y), (XP, YP)
        )
    )(un)


@pytest.mark.parametrize(
    "method,rtol",
    [
        (J.direct(), 1e-10),
        (J.cg(), 1e-5),
        (J.neumann(steps=100), 1e-5),
        (J.cg(hvp="linearize"), 1e-5),
        (J.neumann(steps=100, hvp="linearize"), 1e-5),
    ],
    ids=["direct", "cg", "neumann_default_lr", "cg_linearize", "neumann_linearize"],
)
def test_solvers_converge_at_their_defaults_and_say_so(converged, method, rtol):
    opt, un = converged
    g, info = _hypergrad(method, opt, un)
    # direct: a dense solve of a 5x5 SPD system, rounding only.  cg and neumann stop at
    # relative residual 1e-6 (their default tol); with κ(A) ≈ 3 the error is below 1e-5.
    ref = g_true(np.zeros(D))
    assert np.linalg.norm(g - ref) <= rtol * np.linalg.norm(ref)
    assert bool(info.solve.converged)
    assert 0 <= float(info.solve.residual) <= 1e-6
    assert 1 <= int(info.solve.iterations) <= 100


def test_nonconverged_solve_is_reported_and_can_raise_under_jit(converged):
    opt, un = converged
    _, info = _hypergrad(J.cg(maxiter=1), opt, un)
    assert not bool(info.solve.converged)
    assert int(info.solve.iterations) == 1 and float(info.solve.residual) > 1e-6
    _, info = _hypergrad(J.neumann(steps=3, lr=ETA), opt, un)
    assert not bool(info.solve.converged) and int(info.solve.iterations) == 3
    # The residual Neumann reports is the true one: b - A x for its partial sum.
    with pytest.raises(Exception, match="adjoint 'cg'.*did not converge"):
        jax.block_until_ready(_hypergrad(J.cg(maxiter=1, throw=True), opt, un))

    # ... also inside jax.grad through the unroll.
    def val(lam):
        w0 = jnp.zeros(D)
        u = J.unroll(
            base_loss, opt, w0, opt.init(w0), lam, full(5), adjoint=J.cg(maxiter=1, throw=True)
        )
        return meta_loss(lam, u.params, (XP, YP))

    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(jax.jit(jax.grad(val))(jnp.zeros(D)))
    g, info = _hypergrad(J.cg(throw=True), opt, un)  # converged: no error
    assert bool(info.solve.converged)


def test_neumann_residual_is_the_true_residual(converged):
    opt, un = converged
    v = jnp.asarray(_rng.normal(size=D))
    x, info = J._src.adjoints.neumann_solve(lambda p: jnp.asarray(A) @ p, v, lr=ETA, maxiter=7)
    true = np.linalg.norm(A @ np.asarray(x) - np.asarray(v)) / np.linalg.norm(v)
    np.testing.assert_allclose(float(info.residual), true, rtol=1e-8)
    lam_max = J._src.adjoints.top_eigenvalue(lambda p: jnp.asarray(A) @ p, v, 50)
    np.testing.assert_allclose(float(lam_max), 1 / ETA, rtol=1e-8)


def test_pluggable_solve_is_the_core_of_every_implicit_method(converged):
    opt, un = converged

    def exact(matvec, b):  # numpy's solve of the same matrix, built by matvecs
        a = jax.vmap(matvec)(jnp.eye(D)).T
        return jnp.linalg.solve(a, b), J.SolveInfo(jnp.zeros(()), jnp.int32(D), jnp.asarray(True))

    g, info = _hypergrad(J.implicit(exact, name="exact"), opt, un)
    np.testing.assert_allclose(g, g_true(np.zeros(D)), rtol=1e-10)
    assert int(info.solve.iterations) == D


@pytest.mark.parametrize("lr", [1e-3, 0.3 * ETA, ETA])
def test_sama_scale_with_sgd(lr):
    opt = optax.sgd(lr)
    w0 = jnp.asarray(_rng.normal(size=D))
    un = J.unroll(base_loss, opt, w0, opt.init(w0), jnp.zeros(D), full(4))
    g = lambda m: np.asarray(_hypergrad(m, opt, un)[0])
    fd = g(J.finite_difference(eps=0.05))
    # P = lr·I: plain SAMA is lr × finite difference; unit scale is finite difference itself.
    # Both are the same central difference of a quadratic, so exact up to rounding.
    np.testing.assert_allclose(g(J.sama(alpha=0.05)), lr * fd, rtol=1e-9)
    np.testing.assert_allclose(g(J.sama(alpha=0.05, unit_scale=True)), fd, rtol=1e-9)


def test_grad_with_respect_to_the_start_is_zero_under_an_implicit_adjoint(converged):
    opt, _ = converged

    def val(w0):
        u = J.unroll(base_loss, opt, w0, opt.init(w0), jnp.zeros(D), full(5), adjoint=J.cg())
        return meta_loss(None, u.params, (XP, YP))

    np.testing.assert_array_equal(jax.grad(val)(jnp.ones(D)), 0.0)


# ---------------------------------------------------------------------------------------------
# The optax transform and bilevel() step exactly as meta_step does.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "sama"])
def test_optax_chain_and_bilevel_equal_meta_step(name):
    method = {"cg": J.cg(), "sama": J.sama(alpha=0.1)}[name]
    opt = optax.adam(0.05)  # stateful base optimizer: its state must travel in the transform
    meta_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    w0, lam0 = jnp.zeros(D), jnp.zeros(D)
    batches = full(3)
    tx = optax.chain(
        J.hypergradient_transform(base_loss, meta_loss, opt, w0, adjoint=method),
        optax.clip_by_global_norm(1.0),
        optax.adam(1e-2),
    )

    @jax.jit
    def tx_step(lam, state):
        updates, state = tx.update(None, state, lam, batches=batches, meta_batch=(XP, YP))
        return optax.apply_updates(lam, updates), state

    init, step = J.bilevel(base_loss, meta_loss, opt, meta_opt, adjoint=method)
    ref_step = jax.jit(
        lambda s: J.functional.meta_step(
            method, base_loss, meta_loss, opt, meta_opt, s, batches, (XP, YP)
        )
    )
    lam, tx_state = lam0, tx.init(lam0)
    state = ref = init(w0, lam0)
    for _ in range(4):
        lam, tx_state = tx_step(lam, tx_state)
        state, info = step(state, batches, (XP, YP))
        ref, _ = ref_step(ref)
    hg = tx_state[0]
    assert isinstance(hg, J.functional.HypergradientState) and bool(hg.finite) and bool(info.finite)
    # Three compiled programs of the same float64 computation: agreement to rounding.
    for a, b in ((lam, ref.lam), (hg.params, ref.params), (state.lam, ref.lam)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(state.params, ref.params, rtol=1e-10, atol=1e-14)
    assert float(jnp.abs(lam - lam0).sum()) > 0
    if name == "sama":  # the nudge lives in the transform's state: θ is not the plain unroll
        un = J.unroll(base_loss, opt, w0, opt.init(w0), lam0, batches)
        assert float(jnp.abs(tx.init(lam0)[0].params - un.params).sum()) > 0


def test_transform_asks_for_its_arguments():
    tx = J.hypergradient_transform(base_loss, meta_loss, optax.sgd(0.1), jnp.zeros(D))
    state = tx.init(jnp.zeros(D))
    with pytest.raises(ValueError, match="params=λ"):
        tx.update(None, state, None, batches=full(2), meta_batch=(XP, YP))
    with pytest.raises(ValueError, match="batches"):
        tx.update(None, state, jnp.zeros(D))


# ---------------------------------------------------------------------------------------------
# Factory and argument checks name the argument.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: J.cg(maxiter=2.5), "maxiter"),
        (lambda: J.cg(maxiter=0), "maxiter"),
        (lambda: J.cg(maxiter=True), "maxiter"),
        (lambda: J.cg(tol=-1e-3), "tol"),
        (lambda: J.cg(tol=float("nan")), "tol"),
        (lambda: J.cg(damping=-1.0), "damping"),
        (lambda: J.neumann(steps=0), "steps"),
        (lambda: J.neumann(lr=-0.1), "lr"),
        (lambda: J.neumann(power_iterations=1.5), "power_iterations"),
        (lambda: J.direct(max_size=0), "max_size"),
        (lambda: J.finite_difference(eps=0.0), "eps"),
        (lambda: J.sama(alpha=float("inf")), "alpha"),
        (lambda: J.sama(unit_scale=1), "unit_scale"),
        (lambda: J.itd(checkpoint="yes"), "checkpoint"),
        (lambda: J.implicit(3), "solve"),
        (lambda: J.cg(throw=1), "throw"),
        (lambda: J.cg(hvp="jvp"), "hvp"),
        (lambda: J.neumann(hvp=None), "hvp"),
    ],
)
def test_factory_arguments_are_checked(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_bad_adjoint_and_too_large_direct():
    w0 = jnp.zeros(D)
    with pytest.raises(TypeError, match="adjoint"):
        J.unroll(base_loss, optax.sgd(0.1), w0, optax.sgd(0.1).init(w0), w0, full(2), adjoint="cg")
    opt = optax.sgd(0.1)
    un = J.unroll(base_loss, opt, w0, opt.init(w0), w0, full(2))
    with pytest.raises(ValueError, match="max_size=4"):
        J.direct(max_size=4).best_response_vjp(base_loss, opt, un, w0, (X, Y), w0)


def test_recomputed_products_hold_one_products_activations():
    # A deep, narrow MLP on a large batch: activations dwarf the parameters, so compiled
    # memory (independent of machine load) shows what the solve keeps alive.
    layers, width, batch = 6, 16, 1024
    act_set = layers * batch * width * 8  # one float64 activation per layer and example

    def loss(p, lam, b):
        x, y = b
        for w in p:
            x = jnp.tanh(x @ w)
        return jnp.mean(jax.nn.sigmoid(lam) * (x[:, 0] - y) ** 2)

    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(size=(width, width)) / 4) for _ in range(layers)]
    b = (jnp.asarray(rng.normal(size=(batch, width))), jnp.asarray(rng.normal(size=batch)))
    lam, opt = jnp.zeros(batch), optax.sgd(0.1)
    un = J.unroll(loss, opt, params, opt.init(params), lam, jax.tree.map(lambda a: a[None], b))

    def temp(f, *args):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    one_product = temp(lambda p, v: J._src.adjoints._hvp(loss, p, lam, b, v), params, params)
    methods = {hvp: J.cg(maxiter=5, hvp=hvp) for hvp in ("recompute", "linearize")}
    solve = {
        hvp: temp(lambda u, v, m=m: m.best_response_vjp(loss, opt, u, lam, b, v), un, params)
        for hvp, m in methods.items()
    }
    # Five products in a while loop and the mixed derivative after them cost one product's
    # activations. Were the primal passes of the products hoisted out of the loop, or the
    # mixed derivative's forward pass run before the solve (it does not depend on its
    # result; measured: +0.5 of a set), their activations would stay alive beside it, as
    # "linearize" keeps the products' by design.
    assert solve["recompute"] <= one_product + act_set / 4
    assert solve["linearize"] >= solve["recompute"] + 2 * act_set
