"""Engine examples on digits: the three application graphs build and take compiled steps."""

import jax
import numpy as np
import pytest

import jaxmlo
from jaxmlo.examples import digits as dg

pytest.importorskip("sklearn")


def _run(prog, sources, steps=1):
    res = jaxmlo.run(prog, sources, steps, progress=False)
    assert int(res.state.step) == steps
    assert all(np.isfinite(v) for v in res.history[-1][1].values()), res.history[-1]
    return res


def test_data_splits():
    d = dg.long_tailed_digits(50, 0)
    counts = np.bincount(d["train"].y, minlength=10)
    assert counts[0] == 100 and counts[-1] == 2 and np.all(np.diff(counts) <= 0)
    assert np.all(np.bincount(d["meta"].y) == 10)
    n = dg.noisy_digits(0.4, 0)
    assert abs(np.mean(n["train"].y != n["clean_train_y"]) - 0.4) < 0.05
    dd = dg.domain_digits(0)
    assert len(dd["finetune"].y) == 50 and 0.05 < dd["pretrain_is_target"].mean() < 0.15


def test_application_programs_step():
    key = jax.random.PRNGKey(0)
    d = dg.long_tailed_digits(10, 0)
    prog = dg.reweighting_program(jaxmlo.sama(), key=key, hidden=16)
    assert prog.paths("reweight", "classifier") == (("classifier",),)
    _run(
        prog,
        {"classifier": dg.sampler(d["train"], 16, 0), "reweight": dg.sampler(d["meta"], 16, 1)},
    )

    n = dg.noisy_digits(0.4, 0)
    prog = dg.noisy_label_program(jaxmlo.finite_difference(), key=key, hidden=16)
    assert prog.order[0] == "classifier" and prog.lowers("correct") == ("classifier",)
    assert prog.deps("classifier") == ("correct", "reweight")
    _run(
        prog,
        {
            "classifier": dg.sampler(n["train"], 16, 0),
            "reweight": dg.sampler(n["meta"], 16, 1),
            "correct": dg.sampler(n["meta"], 16, 2),
        },
    )

    dd = dg.domain_digits(0)
    prog = dg.domain_program(jaxmlo.finite_difference(), key=key, hidden=16)
    assert prog.order == ("pretrain", "finetune", "reweight")
    assert prog.paths("reweight", "finetune") == (("pretrain", "finetune"),)
    _run(
        prog,
        {
            "pretrain": dg.sampler(dd["pretrain"], 16, 0),
            "finetune": dg.sampler(dd["finetune"], 16, 1),
            "reweight": dg.sampler(dd["finetune"], 16, 2),
        },
    )
