"""Bad inputs raise at trace time naming the argument; non-finite hypergradients are reported,
can be made to raise under jit, and are never applied by meta_step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo as J


def loss(params, lam, batch):
    return jnp.sum((params["w"] * batch - lam) ** 2)


def meta(lam, params, batch):
    return jnp.sum(params["w"] ** 2)


PARAMS = {"w": jnp.ones(3)}
LAM = jnp.zeros(3)
BATCHES = jnp.ones((2, 3))
OPT = optax.sgd(0.1)


def _unrolled():
    return J.unroll(loss, OPT, PARAMS, OPT.init(PARAMS), LAM, BATCHES)


def test_optimizer_state_from_another_optimizer():
    with pytest.raises(ValueError, match="opt_state"):
        J.unroll(loss, OPT, PARAMS, optax.adam(0.1).init(PARAMS), LAM, BATCHES)


def test_optimizer_state_for_other_params():
    with pytest.raises(ValueError, match="opt_state"):
        J.unroll(
            loss, optax.adam(0.1), PARAMS, optax.adam(0.1).init({"w": jnp.ones(4)}), LAM, BATCHES
        )


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        J.unroll(loss, lambda g: g, PARAMS, (), LAM, BATCHES)


def test_non_scalar_base_loss():
    bad = lambda p, lam, b: p["w"] * b
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        J.unroll(bad, OPT, PARAMS, OPT.init(PARAMS), LAM, BATCHES)


def test_non_scalar_meta_loss():
    bad = lambda lam, p, b: p["w"]
    with pytest.raises(ValueError, match="meta_loss must return a scalar"):
        J.functional.hypergradient(J.cg(), loss, bad, OPT, _unrolled(), LAM, BATCHES[-1], None)


def test_batches_without_common_leading_axis():
    with pytest.raises(ValueError, match="batches"):
        J.unroll(
            lambda p, l, b: loss(p, l, b[0]),
            OPT,
            PARAMS,
            OPT.init(PARAMS),
            LAM,
            (jnp.ones((2, 3)), jnp.ones((3, 3))),
        )


@pytest.mark.parametrize(
    "method", [J.itd(), J.cg(), J.neumann(), J.finite_difference(), J.sama()], ids=lambda m: m.name
)
def test_mismatched_vector_tree(method):
    with pytest.raises(ValueError, match="^v "):
        method.best_response_vjp(loss, OPT, _unrolled(), LAM, BATCHES[-1], {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="^v "):
        method.best_response_vjp(loss, OPT, _unrolled(), LAM, BATCHES[-1], {"u": jnp.ones(3)})


def test_integer_deps():
    with pytest.raises(TypeError, match="deps"):
        J.cg().best_response_vjp(
            loss, OPT, _unrolled(), jnp.zeros(3, jnp.int32), BATCHES[-1], PARAMS
        )


def test_bad_method_and_factory_arguments():
    with pytest.raises(TypeError, match="method"):
        J.functional.hypergradient("cg", loss, meta, OPT, _unrolled(), LAM, BATCHES[-1], None)
    with pytest.raises(ValueError, match="alpha"):
        J.sama(alpha=0.0)
    with pytest.raises(ValueError, match="eps"):
        J.finite_difference(eps=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        J.cg(maxiter=0)
    with pytest.raises(ValueError, match="lr"):
        J.neumann(lr=0.0)


def nan_meta(lam, params, batch):
    # sqrt of a negative number: a NaN direct gradient, as a diverged model would give.
    return jnp.sum(jnp.sqrt(params["w"] - 10.0))


def test_nonfinite_is_reported_and_can_raise_under_jit():
    un = _unrolled()
    f = jax.jit(
        lambda un, lam: J.functional.hypergradient(
            J.cg(), loss, nan_meta, OPT, un, lam, BATCHES[-1], None
        )
    )
    g, info = f(un, LAM)
    assert not bool(info.finite)
    # The SAMA nudge (here identity) is never applied with a non-finite vector.
    np.testing.assert_array_equal(info.params["w"], un.params["w"])
    f_raise = jax.jit(
        lambda un, lam: J.functional.hypergradient(
            J.sama(), loss, nan_meta, OPT, un, lam, BATCHES[-1], None, raise_nonfinite=True
        )
    )
    with pytest.raises(Exception, match="non-finite hypergradient"):
        jax.block_until_ready(f_raise(un, LAM))


def test_meta_step_skips_nonfinite_update():
    meta_opt = optax.adam(0.1)
    state = J.functional.BilevelState(PARAMS, OPT.init(PARAMS), LAM, meta_opt.init(LAM))
    new, info = jax.jit(
        lambda s: J.functional.meta_step(J.sama(), loss, nan_meta, OPT, meta_opt, s, BATCHES, None)
    )(state)
    assert not bool(info.finite)
    np.testing.assert_array_equal(new.lam, LAM)
    for a, b in zip(jax.tree.leaves(new.meta_opt_state), jax.tree.leaves(state.meta_opt_state)):
        np.testing.assert_array_equal(a, b)


# ITD through Adam where one gradient entry is exactly zero (an input feature that is always
# zero, like the output of a dead ReLU unit): d sqrt(nu)/d nu is infinite at nu = 0 and times
# d nu/d g = 0 gives NaN.  eps_root > 0 makes the derivative finite; the message says so.
def zero_feature_loss(w, lam, x):
    return lam * jnp.sum((w * x - 1.0) ** 2)  # x[1] = 0: the gradient of w[1] is exactly 0


def sum_meta(lam, w, batch):
    return jnp.sum(w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_itd_through_adam_at_a_zero_gradient_needs_eps_root(dtype):
    w0, lam = jnp.zeros(2, dtype), jnp.asarray(2.0, dtype)
    batches = jnp.asarray([[1.0, 0.0]], dtype)  # one step
    lr, eps = 0.1, 0.5  # a large eps makes the first step's derivative sizeable

    def hypergrad(opt, **kw):
        un = J.unroll(zero_feature_loss, opt, w0, opt.init(w0), lam, batches)
        return J.functional.hypergradient(
            J.itd(), zero_feature_loss, sum_meta, opt, un, lam, None, None, **kw
        )

    g, info = jax.jit(hypergrad, static_argnums=0)(optax.adam(lr, eps=eps))
    assert not bool(info.finite) and bool(jnp.isnan(g))
    with pytest.raises(Exception, match="eps_root"):
        jax.block_until_ready(
            jax.jit(lambda: hypergrad(optax.adam(lr, eps=eps), raise_nonfinite=True))()
        )

    g, info = jax.jit(hypergrad, static_argnums=0)(optax.adam(lr, eps=eps, eps_root=1e-16))
    # Adam's first step from zero moments is w1 = w0 - lr * g / (|g| + eps) per entry (bias
    # correction makes m = g, nu = g^2); g[0] = -2 lam, and w[1] stays put.
    ref = jax.grad(lambda lam: -lr * (-2 * lam) / (jnp.abs(-2 * lam) + eps))(lam)
    assert bool(info.finite)
    np.testing.assert_allclose(g, ref, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
