"""Model passes in one compiled SAMA meta step, counted in the compiled HLO.

A SAMA meta step with one unrolled base step on a reweighted loss takes four forward and two
backward passes through the model: the base step (forward + backward), the meta gradient at θ*
(forward + backward), and the central difference's two evaluations of ∂L/∂λ at θ* ± εPv, which
are forward passes only because λ enters the loss as per-example weights (JAX differentiates λ
only, through the weights).  The optimizer adaptation reuses the base step's gradient; with
``adaptation="solution"`` it takes a new one at θ* (one more forward + backward).  The nudge
reuses the adaptation (XLA merges the two identical computations).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxmlo
import jaxmlo.testing

# Shapes chosen so that the marker products are unique: logits [N, C] only in a forward pass,
# the output layer's weight gradient [H2, C] only in a backward pass.
N, D, H1, H2, C = 6, 7, 9, 11, 5
MARKERS = dict(forward=(N, C), backward=(H2, C))


def _model(p, x):
    h = jnp.tanh(x @ p["w1"])
    h = jnp.tanh(h @ p["w2"])
    return h @ p["w3"]


def _ce(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_model(p, x), y)


def base_loss(p, lam, b):  # per-example weights sigmoid(λ[idx])
    x, y, idx = b
    return jnp.mean(jax.nn.sigmoid(lam[idx]) * _ce(p, x, y))


def meta_loss(lam, p, b):
    x, y = b
    return jnp.mean(_ce(p, x, y))


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 7)
    params = {
        "w1": jax.random.normal(k[0], (D, H1)) / D**0.5,
        "w2": jax.random.normal(k[1], (H1, H2)) / H1**0.5,
        "w3": jax.random.normal(k[2], (H2, C)) / H2**0.5,
    }
    lam = jnp.zeros(4 * N)
    batches = (
        jax.random.normal(k[3], (1, N, D)),
        jax.random.randint(k[4], (1, N), 0, C),
        jnp.arange(N)[None],
    )
    meta_batch = (jax.random.normal(k[5], (N, D)), jax.random.randint(k[6], (N,), 0, C))
    return params, lam, batches, meta_batch


def _passes(fn, *args):
    return jaxmlo.testing.count_passes(jax.jit(fn).lower(*args).compile().as_text(), **MARKERS)


def test_plain_step_is_one_forward_one_backward(setup):
    params, lam, batches, _ = setup
    opt = optax.adam(1e-3)

    def plain(p, s, b):
        u, s = opt.update(jax.grad(base_loss)(p, lam, b), s, p)
        return optax.apply_updates(p, u), s

    first = jax.tree.map(lambda a: a[0], batches)
    assert _passes(plain, params, opt.init(params), first) == {"forward": 1, "backward": 1}


SAMA_PASSES = {
    "last_step": {"forward": 4, "backward": 2},
    "solution": {"forward": 5, "backward": 3},
}


@pytest.mark.parametrize("adaptation", sorted(SAMA_PASSES))
@pytest.mark.parametrize("nudge", [True, False])
def test_sama_meta_step_passes(setup, nudge, adaptation):
    params, lam, batches, meta_batch = setup
    opt, meta_opt = optax.adam(1e-3), optax.adam(1e-2)
    method = jaxmlo.sama(alpha=0.1, nudge=nudge, adaptation=adaptation)
    state = jaxmlo.functional.BilevelState(params, opt.init(params), lam, meta_opt.init(lam))

    def step(s, b, mb):
        return jaxmlo.functional.meta_step(method, base_loss, meta_loss, opt, meta_opt, s, b, mb)

    # The nudge's adaptation is the hypergradient's: no extra pass with nudge=True.
    assert _passes(step, state, batches, meta_batch) == SAMA_PASSES[adaptation]


def test_program_step_sama_passes(setup):
    # The DAG engine hands the base problem's last gradient to SAMA too.
    params, lam, batches, meta_batch = setup
    prog = jaxmlo.Program(
        [
            jaxmlo.Problem(
                "base",
                lambda p, d, b: base_loss(p, d["meta"], b),
                params,
                optax.adam(1e-3),
                method=jaxmlo.sama(),
            ),
            jaxmlo.Problem(
                "meta", lambda m, d, b: meta_loss(m, d["base"], b), lam, optax.adam(1e-2)
            ),
        ],
        u2l={"meta": ["base"]},
        l2u={"base": ["meta"]},
    )
    data = {"base": batches, "meta": jax.tree.map(lambda a: a[None], meta_batch)}
    step = lambda s, d: jaxmlo.step(prog, s, d)  # noqa: E731
    assert _passes(step, jaxmlo.init(prog), data) == SAMA_PASSES["last_step"]


def test_central_difference_is_forward_only_for_weights(setup):
    params, lam, batches, _ = setup
    opt = optax.adam(1e-3)
    last = jax.tree.map(lambda a: a[-1], batches)
    un = jaxmlo.unroll(base_loss, opt, params, opt.init(params), lam, batches)

    def fd(u, v):
        return jaxmlo.finite_difference().best_response_vjp(base_loss, opt, u, lam, last, v)

    def sama(u, v):
        return jaxmlo.sama().best_response_vjp(base_loss, opt, u, lam, last, v)

    def sama_at_solution(u, v):
        method = jaxmlo.sama(adaptation="solution")
        return method.best_response_vjp(base_loss, opt, u, lam, last, v)

    # finite_difference: ∂L/∂λ at θ ± εv, two forwards; SAMA adapts at the unroll's last
    # gradient (no pass), or at a new base gradient at θ* ("solution").
    assert _passes(fd, un, params) == {"forward": 2, "backward": 0}
    assert _passes(sama, un, params) == {"forward": 2, "backward": 0}
    assert _passes(sama_at_solution, un, params) == {"forward": 3, "backward": 1}


def test_count_matmuls_counts_by_result_type():
    f = lambda w, x: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
    hlo = jax.jit(jax.grad(f)).lower(jnp.ones((3, 2)), jnp.ones((4, 3))).compile().as_text()
    counts = jaxmlo.testing.count_matmuls(hlo)
    assert sum(counts.values()) == 2  # x @ w forward, x^T @ dy backward
    assert counts.get("dot f32[4,2]", 0) + counts.get("dot f64[4,2]", 0) == 1
    assert jaxmlo.testing.count_passes(hlo, forward=(4, 2), backward=(3, 2)) == {
        "forward": 1,
        "backward": 1,
    }
