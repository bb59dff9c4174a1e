"""Engine driver: exact checkpoint resume, validation with early stopping, callbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmlo
from jaxmlo import Problem, Program


def _program():
    def inner(p, d, b):
        w = jax.nn.sigmoid(b[:, 3] * d["outer"][0] + d["outer"][1])  # per-example weights
        return jnp.mean(w * (b[:, :3] @ p - b[:, 2]) ** 2)

    def outer(lam, d, b):
        return jnp.mean((b[:, :3] @ d["inner"] - b[:, 2]) ** 2) + 1e-3 * jnp.sum(lam**2)

    return Program(
        [
            Problem(
                "inner", inner, jnp.zeros(3), optax.adam(0.05), unroll_steps=2, method=jaxmlo.sama()
            ),
            Problem("outer", outer, jnp.zeros(2), optax.adam(0.01)),
        ],
        u2l={"outer": ["inner"]},
        l2u={"inner": ["outer"]},
    )


def _source(seed):
    return lambda i: np.asarray(jax.random.normal(jax.random.PRNGKey(seed * 1000 + i), (8, 4)))


def test_checkpoint_restore_continue_equals_uninterrupted(tmp_path):
    prog = _program()
    data = {"inner": _source(1), "outer": _source(2)}
    step_fn = jaxmlo.make_step(prog)  # one compilation shared by the three runs
    full = jaxmlo.run(prog, data, 6, step_fn=step_fn, progress=False)
    ckpt = str(tmp_path / "ckpt")
    part = jaxmlo.run(prog, data, 3, step_fn=step_fn, checkpoint_dir=ckpt, progress=False)
    assert int(part.state.step) == 3
    rest = jaxmlo.run(prog, data, 6, step_fn=step_fn, checkpoint_dir=ckpt, progress=False)
    assert int(rest.state.step) == 6
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), full.state, rest.state
    )
    assert all(jax.tree.leaves(same))  # bit for bit: params, optimizer states, counters
    assert rest.history == full.history[3:]


def test_iterable_sources_resume_by_skipping(tmp_path):
    prog = _program()
    mk = lambda: {
        "inner": (_source(1)(i) for i in range(100)),
        "outer": (_source(2)(i) for i in range(100)),
    }
    fn = jaxmlo.make_step(prog)
    full = jaxmlo.run(prog, mk(), 4, step_fn=fn, progress=False)
    ckpt = str(tmp_path / "c")
    jaxmlo.run(prog, mk(), 2, step_fn=fn, checkpoint_dir=ckpt, progress=False)
    rest = jaxmlo.run(prog, mk(), 4, step_fn=fn, checkpoint_dir=ckpt, progress=False)
    np.testing.assert_array_equal(rest.state.params["outer"], full.state.params["outer"])


def test_validation_early_stopping_and_callback():
    prog = _program()
    seen = []
    scores = iter([3.0, 2.0, 2.5, 2.6, 1.0])  # best at the 2nd validation, then 2 worse ones
    res = jaxmlo.run(
        prog,
        {"inner": _source(1), "outer": _source(2)},
        20,
        validate=lambda s: next(scores),
        validate_every=2,
        patience=2,
        callback=lambda i, m: seen.append((i, m)),
        log_every=1,
        progress=False,
    )
    assert res.stopped_early and int(res.state.step) == 8
    assert res.best_score == 2.0 and res.best_step == 4
    assert [s for s, _ in res.validations] == [2, 4, 6, 8]
    assert len(seen) == 8 and "outer/hypergrad_norm" in seen[-1][1] and "val/score" in seen[-1][1]
