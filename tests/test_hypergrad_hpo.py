"""Synthetic hyperparameter optimization (thesis 2.5.5): a weight decay per parameter of a
logistic regression, tuned on validation loss by every method in a plain JAX loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo as J

D, N_TRAIN, N_VAL = 30, 20, 200  # fewer examples than features: decay matters
_rng = np.random.default_rng(0)
_W_TRUE = np.zeros(D)
_W_TRUE[:5] = 2 * _rng.normal(size=5)  # 5 informative features, 25 noise features


def _make(n):
    x = _rng.normal(size=(n, D))
    return x, np.sign(x @ _W_TRUE + 0.3 * _rng.normal(size=n))


TRAIN, VAL = _make(N_TRAIN), _make(N_VAL)
LAM0 = np.full(D, np.log(1e-2))  # λ is the log of the per-parameter decay (keeps it positive)


def base_loss(w, lam, batch):
    x, y = batch
    return jnp.mean(jax.nn.softplus(-y * (x @ w))) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def val_loss(lam, w, batch):
    x, y = batch
    return jnp.mean(jax.nn.softplus(-y * (x @ w)))


def _repeat(batch, T):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (T,) + a.shape), batch)


@pytest.fixture(scope="module")
def val_at_convergence():
    """Validation loss of the base problem solved to convergence at a given λ (2000 SGD steps)."""
    opt = optax.sgd(0.5)

    @jax.jit
    def f(lam):
        w0 = jnp.zeros(D)
        un = J.unroll(base_loss, opt, w0, opt.init(w0), lam, _repeat(TRAIN, 2000))
        return val_loss(lam, un.params, VAL), jnp.linalg.norm(
            jax.grad(base_loss)(un.params, lam, TRAIN)
        )

    return f


@pytest.mark.parametrize(
    "method",
    [J.itd(), J.cg(maxiter=20), J.neumann(steps=20, lr=0.5), J.finite_difference(), J.sama()],
    ids=lambda m: m.name,
)
def test_validation_loss_falls(method, val_at_convergence):
    opt = optax.adam(0.05)  # an adaptive base optimizer: SAMA's adaptation is exercised
    meta_opt = optax.adam(0.1)
    w0, lam0 = jnp.zeros(D), jnp.asarray(LAM0)
    state = J.functional.BilevelState(w0, opt.init(w0), lam0, meta_opt.init(lam0))
    batches = _repeat(TRAIN, 20)

    @jax.jit
    def run(state):
        def body(s, _):
            s, info = J.functional.meta_step(
                method, base_loss, val_loss, opt, meta_opt, s, batches, VAL
            )
            return s, info.finite

        return jax.lax.scan(body, state, None, length=30)

    state, finite = run(state)
    assert bool(jnp.all(finite))
    before, gnorm0 = val_at_convergence(lam0)
    after, gnorm1 = val_at_convergence(state.lam)
    assert float(gnorm0) < 1e-3 and float(gnorm1) < 1e-2  # the reference solves did converge
    assert float(after) < 0.5 * float(before), (method.name, before, after)  # 0.67 -> ~0.2 measured
