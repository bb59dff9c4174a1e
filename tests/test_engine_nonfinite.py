"""run: non-finite numbers stop (or skip) a step, never train; bad arguments are refused."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmlo
from jaxmlo import Problem, Program


def _program():
    def inner(p, d, b):
        return jnp.mean((b[:, :3] @ p - b[:, 3] * d["outer"][0]) ** 2)

    def outer(lam, d, b):
        return jnp.mean((b[:, :3] @ d["inner"] - b[:, 3]) ** 2) + 1e-3 * jnp.sum(lam**2)

    return Program(
        [
            Problem("inner", inner, jnp.zeros(3), optax.sgd(0.05), 2, method=jaxmlo.cg()),
            Problem("outer", outer, jnp.ones(1), optax.sgd(0.01)),
        ],
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


PROG = _program()
STEP = jaxmlo.make_step(PROG)  # one compilation for the module


def _source(seed, bad_items=()):
    def fn(i):
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed * 1000 + i), (8, 4)))
        return np.full_like(x, np.nan) if i in bad_items else x

    return fn


def test_nonfinite_loss_stops_naming_problem_and_step_and_keeps_last_checkpoint(tmp_path):
    # Step 3 of 'outer' (item 2 of its source) sees a NaN batch.
    data = {"inner": _source(1), "outer": _source(2, bad_items={2})}
    ckpt = str(tmp_path / "c")
    with pytest.raises(FloatingPointError, match=r"step 3: problem 'outer' has a non-finite loss"):
        jaxmlo.run(
            PROG, data, 6, step_fn=STEP, checkpoint_dir=ckpt, checkpoint_every=1, progress=False
        )
    restored, _ = jaxmlo.restore_checkpoint(ckpt, jaxmlo.init(PROG))
    assert int(restored.step) == 2  # the last good step; nothing after it was saved
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored))
    # The same first two steps without the bad batch give the checkpointed state.
    good = jaxmlo.run(
        PROG, {"inner": _source(1), "outer": _source(2)}, 2, step_fn=STEP, progress=False
    )
    np.testing.assert_array_equal(good.state.params["outer"], restored.params["outer"])


def test_nonfinite_hypergradient_of_lower_problem_is_named():
    # A NaN in the lower problem's batch at step 2 makes its loss NaN first.
    data = {"inner": _source(1, bad_items={3}), "outer": _source(2)}
    with pytest.raises(FloatingPointError, match=r"step 2: problem 'inner' has a non-finite"):
        jaxmlo.run(PROG, data, 4, step_fn=STEP, progress=False)


def test_skip_policy_drops_the_step_and_goes_on():
    data = {"inner": _source(1), "outer": _source(2, bad_items={1})}
    res = jaxmlo.run(PROG, data, 4, step_fn=STEP, on_nonfinite="skip", progress=False)
    assert res.skipped == [2] and int(res.state.step) == 4
    assert int(res.state.updates["outer"]) == 3  # the skipped step updated nothing
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(res.state))
    # Equals running steps 1, 3, 4 by hand from the same data positions.
    state = jaxmlo.init(PROG)
    for s in (0, 2, 3):
        batches = {
            n: np.stack(
                [
                    _source(seed)(s * PROG.problems[n].unroll_steps + t)
                    for t in range(PROG.problems[n].unroll_steps)
                ]
            )
            for n, seed in (("inner", 1), ("outer", 2))
        }
        new, _ = STEP(state, batches)
        state = new._replace(step=jnp.asarray(s + 1, jnp.int32))
    np.testing.assert_allclose(res.state.params["outer"], state.params["outer"], rtol=1e-12)


def test_nonfinite_validation_score_never_wins():
    scores = iter([3.0, math.nan, 2.0, math.inf, math.nan])
    res = jaxmlo.run(
        PROG,
        {"inner": _source(1), "outer": _source(2)},
        10,
        step_fn=STEP,
        validate=lambda s: next(scores),
        validate_every=2,
        patience=2,
        progress=False,
    )
    assert res.best_score == 2.0 and res.best_step == 6
    assert res.stopped_early and int(res.state.step) == 10  # inf, nan: two without improvement
    res = jaxmlo.run(
        PROG,
        {"inner": _source(1), "outer": _source(2)},
        2,
        step_fn=STEP,
        validate=lambda s: math.nan,
        validate_every=1,
        mode="max",
        progress=False,
    )
    assert res.best_score is None and res.best_step is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(validate_every=-1), r"validate_every must be an int >= 0, got -1"),
        (
            dict(validate=lambda s: 0.0, validate_every=2, patience=0),
            r"patience must be an int >= 1, got 0",
        ),
        (dict(log_every=1.5), r"log_every must be an int >= 0, got 1.5"),
        (dict(checkpoint_every=-2), r"checkpoint_every must be an int >= 0"),
        (dict(max_to_keep=0), r"max_to_keep must be an int >= 1"),
        (dict(validate_every=2), r"validate_every > 0 needs a validate function"),
        (dict(validate=lambda s: 0.0), r"validate_every is 0"),
        (dict(validate=lambda s: 0.0, validate_every=1, patience=True), r"patience must be an int"),
        (dict(patience=2), r"patience needs validation"),
        (dict(mode="best"), r"mode must be 'min' or 'max'"),
        (dict(on_nonfinite="ignore"), r"on_nonfinite must be 'raise' or 'skip'"),
    ],
)
def test_bad_run_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxmlo.run(
            PROG,
            {"inner": _source(1), "outer": _source(2)},
            2,
            step_fn=STEP,
            progress=False,
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 0, got -1"):
        jaxmlo.run(PROG, {"inner": _source(1), "outer": _source(2)}, -1, progress=False)
