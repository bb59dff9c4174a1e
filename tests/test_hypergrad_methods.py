"""Hypergradient methods against closed forms (thesis 3.3.1), analytic optimizer Jacobians,
and one contract test over every method.  float64 via tests/conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo as J
from jaxmlo._src.adjoints import sama_adaptation

# ---------------------------------------------------------------------------------------------
# Biased regression (thesis 3.3.1).  Losses carry a factor 1/2 so the closed forms hold as
# written there:  base = ½‖Xw−y‖² + ½β‖w−λ‖²,  meta = ½‖X'w−y'‖².
# ---------------------------------------------------------------------------------------------
BETA = 0.1
N, D = 40, 5
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, D))
XP = _rng.normal(size=(N, D))
Y = X @ _rng.normal(size=D) + 0.5 * _rng.normal(size=N)
A = X.T @ X + BETA * np.eye(D)  # base Jacobian (the Hessian of the base loss)
# y' from a known λ plus a little noise, so λ* is O(1) and reachable in 100 meta steps.
YP = XP @ np.linalg.solve(A, X.T @ Y + BETA * _rng.normal(size=D)) + 0.01 * _rng.normal(size=N)
LAM0 = np.zeros(D)
ETA = 1.0 / np.linalg.eigvalsh(A).max()  # stable SGD / Neumann step


def w_star(lam):
    return np.linalg.solve(A, X.T @ Y + BETA * lam)


def g_true(lam):
    return BETA * np.linalg.solve(A, XP.T @ (XP @ w_star(lam) - YP))


def lam_star():
    Am = BETA * XP @ np.linalg.inv(A)
    b = YP - XP @ np.linalg.solve(A, X.T @ Y)
    return np.linalg.solve(Am.T @ Am, Am.T @ b)


def base_loss(w, lam, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * BETA * jnp.sum((w - lam) ** 2)


def meta_loss(lam, w, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2)


def full_batches(T):
    return (jnp.broadcast_to(X, (T, N, D)), jnp.broadcast_to(Y, (T, N)))


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def converged():
    """θ* = w*(λ0) to rounding: 300 SGD steps at κ(A) ≈ 3 contract the error by ~1e-50."""
    opt = optax.sgd(ETA)
    w0 = jnp.zeros(D)
    un = jax.jit(lambda lam: J.unroll(base_loss, opt, w0, opt.init(w0), lam, full_batches(300)))(
        jnp.asarray(LAM0)
    )
    np.testing.assert_allclose(un.params, w_star(LAM0), rtol=1e-12)  # float64 rounding
    return opt, un


def _hypergrad(method, opt, un):
    fn = jax.jit(
        lambda un, lam: J.functional.hypergradient(
            method, base_loss, meta_loss, opt, un, lam, (X, Y), (XP, YP)
        )
    )
    g, info = fn(un, jnp.asarray(LAM0))
    assert bool(info.finite)
    return np.asarray(g)


@pytest.mark.parametrize(
    "method",
    [J.cg(maxiter=50, tol=1e-12), J.neumann(steps=300, lr=ETA, tol=1e-13)],
    ids=["cg", "neumann"],
)
def test_converged_implicit_methods_match_closed_form(converged, method):
    opt, un = converged
    # CG on a 5-dim SPD system and a 300-term Neumann series at contraction 1 - 1/κ ≈ 0.65 are
    # converged far below 1e-6; the residual is float64 rounding.
    np.testing.assert_allclose(_hypergrad(method, opt, un), g_true(LAM0), rtol=1e-6)


@pytest.mark.parametrize(
    "method", [J.finite_difference(), J.sama()], ids=["finite_difference", "sama"]
)
def test_identity_hessian_methods_align_with_closed_form(converged, method):
    opt, un = converged
    g = _hypergrad(method, opt, un)
    assert cosine(g, g_true(LAM0)) >= 0.9  # the thesis's claim at β = 0.1 (Fig. 3.2)
    # Both reduce exactly (the base loss is quadratic, so the central difference is exact) to
    # -(∂²L/∂λ∂w) v = β v for finite_difference, and to β·lr·v for sama with sgd(lr).
    v = XP.T @ (XP @ np.asarray(un.params) - YP)
    scale = ETA if method.name == "sama" else 1.0
    np.testing.assert_allclose(g, BETA * scale * v, rtol=1e-9)  # rounding in the difference


def test_itd_equals_grad_through_the_unrolled_loop():
    opt = optax.adam(0.05)  # a stateful optimizer: ITD must differentiate through its moments
    w0 = jnp.full(D, 0.3)
    batches = full_batches(10)

    def total(lam):
        un = J.unroll(base_loss, opt, w0, opt.init(w0), lam, batches)
        return meta_loss(lam, un.params, (XP, YP))

    lam = jnp.asarray(np.linspace(-1.0, 1.0, D))
    reference = jax.jit(jax.grad(total))(lam)
    for method in (J.itd(), J.itd(checkpoint=True)):
        un = J.unroll(base_loss, opt, w0, opt.init(w0), lam, batches)
        g, _ = jax.jit(
            lambda un, lam: J.functional.hypergradient(
                method, base_loss, meta_loss, opt, un, lam, None, (XP, YP)
            )
        )(un, lam)
        # The same float64 computation in a different association order.
        np.testing.assert_allclose(g, reference, rtol=1e-10, atol=1e-14)


ALL_METHODS = {
    "itd": J.itd(),
    "itd_checkpoint": J.itd(checkpoint=True),
    "cg": J.cg(maxiter=20),
    "neumann": J.neumann(steps=20, lr=ETA),
    "direct": J.direct(),
    "finite_difference": J.finite_difference(),
    "sama": J.sama(),
    "sama_no_nudge": J.sama(nudge=False),
}


@pytest.mark.parametrize(
    "name", ["itd", "cg", "neumann", "finite_difference", "sama", "sama_no_nudge"]
)
def test_meta_optimization_reaches_lambda_star(name):
    method = ALL_METHODS[name]
    opt = optax.sgd(ETA)
    meta_opt = optax.adam(optax.cosine_decay_schedule(0.3, 100))
    w0, lam0 = jnp.zeros(D), jnp.asarray(LAM0)
    state = J.functional.BilevelState(w0, opt.init(w0), lam0, meta_opt.init(lam0))
    batches = full_batches(20)  # warm-started: 20 base steps per meta step

    @jax.jit
    def run(state):
        def body(s, _):
            s, info = J.functional.meta_step(
                method, base_loss, meta_loss, opt, meta_opt, s, batches, (XP, YP)
            )
            return s, info.finite

        return jax.lax.scan(body, state, None, length=100)

    state, finite = run(state)
    assert bool(jnp.all(finite))
    d0 = np.linalg.norm(LAM0 - lam_star())
    d100 = np.linalg.norm(np.asarray(state.lam) - lam_star())
    assert d100 <= d0 / 10, (name, d0, d100)


# ---------------------------------------------------------------------------------------------
# SAMA adaptation against independently written analytic Jacobians of the optimizer update.
# ---------------------------------------------------------------------------------------------
def linear_loss(theta, deps, batch):
    """Gradient is exactly ``batch``: the reference below replays the same gradients."""
    del deps
    return jnp.sum(batch * theta)


def _run_and_adapt(opt, steps=4):
    rng = np.random.default_rng(1)
    theta0 = jnp.asarray(rng.normal(size=7))
    grads = rng.normal(size=(steps + 1, 7))
    un = J.unroll(linear_loss, opt, theta0, opt.init(theta0), None, jnp.asarray(grads[:steps]))
    v = rng.normal(size=7)
    pv = sama_adaptation(
        linear_loss, opt, un, None, jnp.asarray(grads[steps]), jnp.asarray(v), at="solution"
    )
    return np.asarray(pv), v, list(grads[:steps]), grads[steps]


def _adam_reference(grads, g, v, lr, b1, b2, eps):
    m = np.zeros_like(g)
    s = np.zeros_like(g)
    for gi in grads:
        m = b1 * m + (1 - b1) * gi
        s = b2 * s + (1 - b2) * gi**2
    t = len(grads) + 1
    m = b1 * m + (1 - b1) * g
    s = b2 * s + (1 - b2) * g**2
    c1, c2 = 1 - b1**t, 1 - b2**t
    mhat, shat = m / c1, s / c2
    r = np.sqrt(shat)
    # d/dg of lr·mhat/(r+eps):  lr[(1−b1)/c1/(r+eps) − mhat·(dr/dg)/(r+eps)²],
    # dr/dg = (1−b2)·g / (c2·r).
    dudg = lr * ((1 - b1) / c1 / (r + eps) - mhat * ((1 - b2) * g / (c2 * r)) / (r + eps) ** 2)
    return dudg * v


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd_momentum", "sgd_nesterov"])
def test_sama_adaptation_matches_analytic_jacobian(kind):
    lr, b1, b2, eps = 0.03, 0.8, 0.95, 1e-3
    if kind == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    elif kind == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.3)
    elif kind == "sgd_momentum":
        opt = optax.sgd(lr, momentum=0.9)
    else:
        opt = optax.sgd(lr, momentum=0.9, nesterov=True)
    pv, v, grads, g = _run_and_adapt(opt)
    if kind in ("adam", "adamw"):  # weight decay adds lr·wd·θ, independent of g
        ref = _adam_reference(grads, g, v, lr, b1, b2, eps)
    elif kind == "sgd_momentum":  # u = −lr(g + μ·trace): ∂/∂g = −lr
        ref = lr * v
    else:  # nesterov: u = −lr(g + μ(g + μ·trace)): ∂/∂g = −lr(1 + μ)
        ref = lr * 1.9 * v
    # Same float64 expression evaluated in a different order: agreement to rounding.
    np.testing.assert_allclose(pv, ref, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Contract test: every method, float32 and float64, jit, tree structure, dtype, finiteness.
# ---------------------------------------------------------------------------------------------
TRACES = {"n": 0}


def tree_loss(params, deps, batch):
    TRACES["n"] += 1  # a Python side effect: counts traces, not calls
    x, y = batch
    pred = jnp.tanh(x @ params["w"]) @ params["v"] + params["b"]
    decay = jax.nn.softplus(deps["decay"])
    return (
        jnp.mean((pred - y) ** 2)
        + jnp.sum(decay * params["w"] ** 2)
        + 0.5 * jnp.sum(params["v"] ** 2)
    )


def tree_meta_loss(deps, params, batch):
    x, y = batch
    pred = jnp.tanh(x @ params["w"]) @ params["v"] + params["b"]
    return jnp.mean((pred - y) ** 2) + 1e-3 * jnp.sum(deps["decay"] ** 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["itd", "cg", "neumann", "direct", "finite_difference", "sama"])
def test_contract_every_method(name, dtype):
    method = ALL_METHODS[name]
    rng = np.random.default_rng(3)
    cast = lambda x: jnp.asarray(x, dtype)
    params = {
        "w": cast(rng.normal(size=(3, 4)) * 0.5),
        "v": cast(rng.normal(size=4)),
        "b": cast(0.1),
    }
    deps = {"decay": cast(rng.normal(size=(3, 4))), "unused": cast(np.ones(2))}
    batches = (cast(rng.normal(size=(3, 8, 3))), cast(rng.normal(size=(3, 8))))
    meta_batch = (cast(rng.normal(size=(8, 3))), cast(rng.normal(size=8)))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, deps, batches, meta_batch):
        un = J.unroll(tree_loss, opt, params, opt.init(params), deps, batches)
        last = jax.tree.map(lambda x: x[-1], batches)
        return J.functional.hypergradient(
            method, tree_loss, tree_meta_loss, opt, un, deps, last, meta_batch
        )

    g, info = step(params, deps, batches, meta_batch)
    traces = TRACES["n"]
    g2, _ = step(params, jax.tree.map(lambda x: x + 1, deps), batches, meta_batch)
    assert TRACES["n"] == traces, "re-traced on new values of the same shapes"
    for out in (g, g2):
        assert jax.tree.structure(out) == jax.tree.structure(deps)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(deps)):
            assert a.dtype == dtype and a.shape == b.shape
            assert bool(jnp.all(jnp.isfinite(a)))
    assert bool(info.finite) and info.meta_loss.dtype == dtype
    assert jax.tree.structure(info.params) == jax.tree.structure(params)
    assert all(p.dtype == dtype for p in jax.tree.leaves(info.params))
    # deps["unused"] does not reach θ*: exactly zero from every method.
    np.testing.assert_array_equal(g["unused"], 0)
    assert float(jnp.abs(g["decay"]).sum()) > 0


def test_sama_adaptation_is_finite_where_adam_saw_no_gradient():
    # Adam's update differentiates to 0·∞ where the gradient and its history are exactly zero
    # (a dead unit); those entries are adapted by 0, the others exactly as before.
    opt = optax.adam(0.1)
    mask = jnp.array([1.0, 0.0, 1.0])
    loss = lambda th, deps, b: jnp.sum(mask * b * th)
    th0 = jnp.zeros(3)
    un = J.unroll(loss, opt, th0, opt.init(th0), None, jnp.ones((2, 3)))
    pv = sama_adaptation(loss, opt, un, None, jnp.ones(3), jnp.ones(3), at="solution")
    assert bool(jnp.all(jnp.isfinite(pv))) and float(pv[1]) == 0.0 and float(pv[0]) != 0.0
