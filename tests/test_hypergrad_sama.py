"""SAMA's adaptation at the unroll's last gradient, against hand-written Jacobians (float64).

``sama()`` takes ``P = -∂u/∂g`` at the gradient of the unroll's last step (no new pass);
``sama(adaptation="solution")`` at a new gradient at θ*.  The loss below is linear in θ with
gradient ``x + λ``, so each step's gradient is known in closed form and the central difference
of ``∂L/∂λ = θ`` is exact: the hypergradient's indirect term is ``-P v`` with no rounding
beyond the optimizer's own arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo as J
from jaxmlo._src.adjoints import sama_adaptation

T, N = 3, 5
LR, B1, B2, EPS = 0.05, 0.8, 0.9, 1e-3


def loss(theta, lam, x):  # ∂L/∂θ = x + λ, ∂L/∂λ = θ
    return jnp.sum((x + lam) * theta)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    return dict(
        theta0=rng.normal(size=N),
        lam=rng.normal(size=N),
        xs=rng.normal(size=(T, N)),
        x_meta=rng.normal(size=N),
        v=rng.normal(size=N),
    )


def _adam_jacobian_diag(grads, g, t_next):
    """``∂u/∂g`` of Adam's update at gradient ``g`` after the moments of ``grads`` (step
    ``t_next``, bias-corrected), written out by hand: u = -lr·m̂/(√ŝ + eps)."""
    m = np.zeros_like(g)
    s = np.zeros_like(g)
    for gi in grads:
        m = B1 * m + (1 - B1) * gi
        s = B2 * s + (1 - B2) * gi**2
    m = B1 * m + (1 - B1) * g
    s = B2 * s + (1 - B2) * g**2
    c1, c2 = 1 - B1**t_next, 1 - B2**t_next
    mhat, r = m / c1, np.sqrt(s / c2)
    dr = (1 - B2) * g / (c2 * r)  # d√ŝ/dg
    return -LR * ((1 - B1) / c1 / (r + EPS) - mhat * dr / (r + EPS) ** 2)


def _grads(p):
    return [p["xs"][i] + p["lam"] for i in range(T)]  # the unroll's T gradients


def test_adaptation_at_last_step_matches_hand_jacobian(problem):
    p = problem
    opt = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
    th0 = jnp.asarray(p["theta0"])
    un = J.unroll(loss, opt, th0, opt.init(th0), jnp.asarray(p["lam"]), jnp.asarray(p["xs"]))
    grads = _grads(p)
    np.testing.assert_array_equal(un.grad, grads[-1])  # the scan's last gradient, carried
    # P at the last step's gradient, with the state after T steps (the next update, t = T+1).
    dudg = _adam_jacobian_diag(grads, grads[-1], T + 1)
    pv = sama_adaptation(loss, opt, un, jnp.asarray(p["lam"]), None, jnp.asarray(p["v"]))
    # Same float64 formula evaluated in another order: agreement to rounding.
    np.testing.assert_allclose(pv, -dudg * p["v"], rtol=1e-10, atol=1e-14)
    # "solution": the gradient at θ* on the batch given (here x_meta stands in for b_T).
    x = jnp.asarray(p["x_meta"])
    pv_sol = sama_adaptation(
        loss, opt, un, jnp.asarray(p["lam"]), x, jnp.asarray(p["v"]), at="solution"
    )
    dudg_sol = _adam_jacobian_diag(grads, p["x_meta"] + p["lam"], T + 1)
    np.testing.assert_allclose(pv_sol, -dudg_sol * p["v"], rtol=1e-10, atol=1e-14)
    assert not np.allclose(pv, pv_sol)  # the two adaptations are different numbers


@pytest.mark.parametrize("path", ["unroll", "hypergradient"])
def test_sama_hypergradient_is_minus_adapted_v(problem, path):
    # ∂L/∂λ = θ is linear in θ, so the central difference is exact: the indirect term is
    # -(∂²L/∂λ∂θ) P v = -P v, and the meta loss m·θ* has v = m.
    p = problem
    opt = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
    th0, lam, xs = (jnp.asarray(p[k]) for k in ("theta0", "lam", "xs"))
    m = jnp.asarray(p["v"])
    method = J.sama(alpha=0.3)
    meta = lambda lam, th, b: jnp.sum(m * th)  # noqa: E731  (no direct λ term)
    if path == "unroll":
        g = jax.jit(
            jax.grad(
                lambda lam: meta(
                    lam,
                    J.unroll(loss, opt, th0, opt.init(th0), lam, xs, adjoint=method).params,
                    None,
                )
            )
        )(lam)
    else:
        un = J.unroll(loss, opt, th0, opt.init(th0), lam, xs)
        g, info = J.functional.hypergradient(method, loss, meta, opt, un, lam, xs[-1], None)
        assert bool(info.finite)
    pv_ref = -_adam_jacobian_diag(_grads(p), _grads(p)[-1], T + 1) * p["v"]
    np.testing.assert_allclose(g, -pv_ref, rtol=1e-9, atol=1e-12)


def test_sgd_last_step_equals_solution_and_lr_times_fd(problem):
    # With SGD P = lr·I wherever the gradient is taken: both adaptations agree.
    p = problem
    opt = optax.sgd(LR)
    th0, lam, xs = (jnp.asarray(p[k]) for k in ("theta0", "lam", "xs"))
    un = J.unroll(loss, opt, th0, opt.init(th0), lam, xs)
    v = jnp.asarray(p["v"])
    a = J.sama(alpha=0.2).best_response_vjp(loss, opt, un, lam, xs[-1], v)
    b = J.sama(alpha=0.2, adaptation="solution").best_response_vjp(loss, opt, un, lam, xs[-1], v)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(a, -LR * p["v"], rtol=1e-10)


def test_hand_built_unrolled_falls_back_to_solution(problem):
    p = problem
    opt = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
    th0, lam, xs = (jnp.asarray(p[k]) for k in ("theta0", "lam", "xs"))
    un = J.unroll(loss, opt, th0, opt.init(th0), lam, xs)
    bare = un._replace(grad=None)
    v = jnp.asarray(p["v"])
    x = jnp.asarray(p["x_meta"])
    np.testing.assert_array_equal(
        sama_adaptation(loss, opt, bare, lam, x, v),
        sama_adaptation(loss, opt, un, lam, x, v, at="solution"),
    )


def test_adaptation_option_is_checked():
    with pytest.raises(ValueError, match="adaptation"):
        J.sama(adaptation="next")
