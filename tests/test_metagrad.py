"""jaxinf.metagradient_scores / weighted_train against references exact by construction (float64).

References: a plain Python loop of optax steps written here (the batch loss summed example by
example), differentiated by ``jax.jacrev``; central finite differences of that loop's retrained
output in each weight; and a closed form for one SGD step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinf

# ---------------------------------------------------------------------------------------------
# Two small problems: ridge regression trained by SGD with momentum and a decaying step, and
# softmax regression trained by Adam with warm-up + cosine decay.


def ridge_loss(p, ex):
    x, y = ex
    return 0.5 * (x @ p["w"] + p["b"] - y) ** 2 + 0.05 * jnp.sum(p["w"] ** 2)


def ridge_test(p, x):  # the prediction
    return x @ p["w"] + p["b"]


def softmax_loss(p, ex):
    x, y = ex
    return -jax.nn.log_softmax(x @ p["w"] + p["b"])[y]


def softmax_test(p, ex):  # the margin: correct logit minus logsumexp of the others
    x, y = ex
    z = x @ p["w"] + p["b"]
    return z[y] - jax.nn.logsumexp(jnp.where(jnp.arange(z.shape[0]) == y, -jnp.inf, z))


def _problem(kind):
    rng = np.random.default_rng(0 if kind == "ridge" else 1)
    n_train, n_test, d, steps, batch = 10, 3, 4, 6, 4
    x = rng.normal(size=(n_train + n_test, d))
    if kind == "ridge":
        y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n_train + n_test)
        params = {"w": jnp.asarray(0.1 * rng.normal(size=d)), "b": jnp.asarray(0.0)}
        opt = optax.sgd(optax.exponential_decay(0.2, transition_steps=2, decay_rate=0.7), 0.9)
        loss, test = ridge_loss, ridge_test
        test_data = jnp.asarray(x[n_train:])
    else:
        y = rng.integers(0, 3, size=n_train + n_test)
        params = {"w": jnp.asarray(0.1 * rng.normal(size=(d, 3))), "b": jnp.zeros(3)}
        sched = optax.warmup_cosine_decay_schedule(0.0, 0.3, warmup_steps=2, decay_steps=steps)
        opt = optax.adam(sched)
        loss, test = softmax_loss, softmax_test
        test_data = (jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:]))
    train = (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]))
    # Repeats on purpose; the last two examples are in no batch.
    batches = jnp.asarray(rng.integers(0, n_train - 2, size=(steps, batch)))
    return dict(
        loss_fn=loss, optimizer=opt, params=params, train_data=train, batches=batches
    ), dict(test_fn=test, test_data=test_data)


def ref_train(loss_fn, optimizer, params, train_data, batches, w, reduction="mean"):
    """T optax steps as a Python loop; the batch loss is summed one example at a time."""
    scale = 1.0 / batches.shape[1] if reduction == "mean" else 1.0
    state = optimizer.init(params)
    for idx in np.asarray(batches):

        def batch_loss(p, idx=idx):
            total = 0.0
            for i in idx:
                total = total + w[i] * loss_fn(p, jax.tree.map(lambda a, i=i: a[i], train_data))
            return scale * total

        upd, state = optimizer.update(jax.grad(batch_loss)(params), state, params)
        params = optax.apply_updates(params, upd)
    return params


def ref_outputs(recipe, test, w, reduction="mean"):
    p = ref_train(**recipe, w=w, reduction=reduction)
    return jax.vmap(test["test_fn"], in_axes=(None, 0))(p, test["test_data"])


PROBLEMS = {kind: _problem(kind) for kind in ("ridge", "softmax")}


@pytest.fixture(scope="module", params=["ridge", "softmax"])
def case(request):
    recipe, test = PROBLEMS[request.param]
    n_train = recipe["train_data"][0].shape[0]
    ones = jnp.ones(n_train)
    f = jax.jit(lambda w: ref_outputs(recipe, test, w))
    jac = np.asarray(jax.jacrev(f)(ones))
    scores = np.asarray(jaxinf.metagradient_scores(**recipe, **test, test_block=2))
    return dict(recipe=recipe, test=test, f=f, jac=jac, scores=scores, n_train=n_train)


def _close(a, b, rel):
    """Entrywise, relative to the largest reference entry (exactly-zero scores exist: an example
    in no batch has none)."""
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * np.max(np.abs(b)))


def test_scores_equal_jacrev_through_the_unrolled_loop(case):
    assert case["scores"].shape == case["jac"].shape == (3, case["n_train"])
    assert np.max(np.abs(case["jac"])) > 1e-3  # a non-trivial reference
    _close(case["scores"], case["jac"], 1e-6)


def test_scores_equal_central_differences_of_retraining(case):
    # Step 1e-5 in float64: truncation ~1e-10, rounding ~1e-11, far inside 1e-6 relative.
    h, n = 1e-5, case["n_train"]
    eye = np.eye(n)
    fd = np.stack(
        [
            (np.asarray(case["f"](jnp.asarray(1.0 + h * eye[i])))
             - np.asarray(case["f"](jnp.asarray(1.0 - h * eye[i])))) / (2 * h)
            for i in range(n)
        ],
        axis=1,
    )  # fmt: skip
    _close(case["scores"], fd, 1e-6)


def test_examples_in_no_batch_score_zero(case):
    unused = np.setdiff1d(np.arange(case["n_train"]), np.asarray(case["recipe"]["batches"]))
    assert unused.size > 0  # the fixture's batches leave some examples out
    assert np.all(case["scores"][:, unused] == 0.0)


@pytest.mark.parametrize("segments", [1, 4, 6])
def test_checkpointed_and_plain_agree(case, segments):
    # segments=1 is the plain scan; 4 does not divide T=6 (a shorter last segment).
    s = jaxinf.metagradient_scores(**case["recipe"], **case["test"], segments=segments)
    np.testing.assert_allclose(s, case["scores"], rtol=0, atol=1e-10 * np.max(np.abs(case["jac"])))


@pytest.mark.parametrize("test_block", [1, 64])
def test_test_block_does_not_change_scores(case, test_block):
    s = jaxinf.metagradient_scores(**case["recipe"], **case["test"], test_block=test_block)
    np.testing.assert_allclose(s, case["scores"], rtol=0, atol=1e-12 * np.max(np.abs(case["jac"])))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_train_is_the_reference_loop(reduction):
    recipe, _ = PROBLEMS["softmax"]
    w = jnp.asarray(np.random.default_rng(3).uniform(0.0, 2.0, size=10))
    got = jaxinf.weighted_train(**recipe, weights=w, reduction=reduction, segments=2)
    want = ref_train(**recipe, w=w, reduction=reduction)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_sgd_step_closed_form_and_batch_convention(reduction):
    # θ1 = θ0 - lr·c·Σ_j w_{b_j} ∇ℓ_{b_j}(θ0), c = 1/B ("mean") or 1 ("sum"); the prediction
    # f = x_te·θ1 gives score_i = -lr·c·count_i·x_te·∇ℓ_i(θ0): a repeated index counts twice,
    # an absent one scores zero.
    rng = np.random.default_rng(4)
    x, y, x_te = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(2, 3))
    theta0, lr = rng.normal(size=3), 0.3
    batch = np.array([[0, 2, 2, 4]])

    def loss(p, ex):
        return 0.5 * (ex[0] @ p - ex[1]) ** 2

    s = jaxinf.metagradient_scores(
        loss, optax.sgd(lr), jnp.asarray(theta0), (jnp.asarray(x), jnp.asarray(y)),
        jnp.asarray(batch), lambda p, xt: xt @ p, jnp.asarray(x_te), reduction=reduction,
    )  # fmt: skip
    c = 1.0 / batch.shape[1] if reduction == "mean" else 1.0
    count = np.bincount(batch[0], minlength=5)
    grads = (x @ theta0 - y)[:, None] * x  # ∇ℓ_i(θ0), [5, 3]
    want = -lr * c * count[None, :] * (x_te @ grads.T)
    np.testing.assert_allclose(s, want, rtol=1e-12, atol=1e-14)
    assert s[0, 1] == 0.0 and s[0, 3] == 0.0


def test_scores_are_jittable_and_float32_follows_params():
    recipe, test = PROBLEMS["ridge"]
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), recipe["params"])
    data32 = jax.tree.map(lambda a: a.astype(jnp.float32), recipe["train_data"])
    r = dict(recipe, params=p32, train_data=data32)
    s = jax.jit(
        lambda b, t: jaxinf.metagradient_scores(
            **dict(r, batches=b), test_fn=test["test_fn"], test_data=t
        )
    )(recipe["batches"], test["test_data"].astype(jnp.float32))
    assert s.dtype == jnp.float32
    s64 = jaxinf.metagradient_scores(**recipe, **test)
    np.testing.assert_allclose(s, s64, rtol=1e-4, atol=1e-5)  # float32 rounding over 6 steps


# ---------------------------------------------------------------------------------------------
# Bad input names the problem.


def _args():
    recipe, test = PROBLEMS["ridge"]
    return dict(recipe, **test)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(batches=jnp.array([[0, 10]])), r"batches\[0, 1\] = 10 is outside train_data"),
        (dict(batches=jnp.array([[0.0, 1.0]])), "batches must be an int array"),
        (dict(batches=jnp.array([0, 1])), "batches must be an int array"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(segments=0), "segments must be None or an int >= 1"),
        (dict(test_block=0), "test_block must be an int >= 1"),
        (dict(loss_fn=lambda p, ex: ex[0] * p["b"]), "loss_fn.*must return a scalar"),
        (dict(test_fn=lambda p, x: x * p["b"]), "test_fn.*must return a scalar"),
        (dict(optimizer=optax.sgd), "optimizer must be an optax.GradientTransformation"),
        (
            dict(train_data=(jnp.ones((10, 4)), jnp.ones(9))),
            "train_data: every leaf needs the same leading",
        ),
    ],
)
def test_bad_input_is_named(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jaxinf.metagradient_scores(**dict(_args(), **change))


def test_weighted_train_checks_weights():
    recipe, _ = PROBLEMS["ridge"]
    with pytest.raises(ValueError, match=r"weights must be \[n_train\] = \[10\]"):
        jaxinf.weighted_train(**recipe, weights=jnp.ones(9))


def test_adam_with_a_never_updated_parameter_warns_and_eps_root_fixes_it():
    # Two input features that are always 0, with weights starting at 0: those weights' gradient
    # is exactly zero (in the same array as the others), so Adam's nu stays 0 there, where sqrt
    # has an infinite derivative: 0 * inf = NaN in reverse mode.
    recipe, test = PROBLEMS["ridge"]
    x, y = recipe["train_data"]
    pad = lambda a: jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (2,))], axis=-1)  # noqa: E731
    params = dict(recipe["params"], w=pad(recipe["params"]["w"]))
    r = dict(recipe, params=params, train_data=(pad(x), y), optimizer=optax.adam(0.1))
    t = dict(test, test_data=pad(test["test_data"]))
    with pytest.warns(RuntimeWarning, match="eps_root"):
        s = jaxinf.metagradient_scores(**r, **t)
    assert not np.all(np.isfinite(s))
    r["optimizer"] = optax.adam(0.1, eps_root=1e-16)
    s = jaxinf.metagradient_scores(**r, **t)
    # Without the zero features the scores are the same (eps_root changes nothing visible).
    ref = jaxinf.metagradient_scores(**dict(recipe, optimizer=optax.adam(0.1)), **test)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)


def test_nonfinite_scores_name_their_test_rows():
    # Test row 1 is scaled by inf, so only its scores are not finite.
    recipe, test = PROBLEMS["ridge"]
    scale = jnp.array([1.0, jnp.inf, 1.0])
    t = dict(
        test_fn=lambda p, ex: ex[1] * ridge_test(p, ex[0]), test_data=(test["test_data"], scale)
    )
    with pytest.warns(RuntimeWarning, match=r"in 1 of 3 test rows \(rows 1\)") as rec:
        s = np.asarray(jaxinf.metagradient_scores(**recipe, **t))
    n_nan, n_inf = int(np.isnan(s).sum()), int(np.isinf(s).sum())
    assert f"{n_nan} NaN and {n_inf} infinite scores" in str(rec[0].message)
    np.testing.assert_array_equal(np.isfinite(s).all(axis=1), [True, False, True])
    np.testing.assert_allclose(
        s[[0, 2]], np.asarray(jaxinf.metagradient_scores(**recipe, **test))[[0, 2]]
    )
    with pytest.raises(FloatingPointError, match=r"rows 1\)"):
        jaxinf.metagradient_scores(**recipe, **t, nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        jaxinf.metagradient_scores(**recipe, **test, nonfinite="ignore")
