"""Reweighting + label correction under 40% symmetric label noise (thesis 2.5.3, toy scale).

Digits with 40% of training labels replaced by a random other class and a small clean meta
set (10 images per class). Test accuracy of plain training, +reweight (MWN) and
+reweight & correct (two upper problems over one classifier, Listing A.2), mean +- std
over seeds.

  python -m benchmarks.noisy_digits --out benchmarks/results/noisy_digits_cpu.json
"""

import argparse
import time

import jax
import numpy as np

import jaxmlo
from benchmarks._common import run_record, write_json
from jaxmlo.examples import digits as dg

VARIANTS = {
    "plain": dict(reweight=False, correct=False),
    "plain+meta": dict(reweight=False, correct=False),
    "reweight": dict(reweight=True, correct=False),
    "reweight+correct": dict(reweight=True, correct=True),
}


def train_one(variant, noise, seed, steps, batch, method):
    data = dg.noisy_digits(noise, seed)
    train = data["train"]
    if variant == "plain+meta":  # control: the clean meta set simply added to training
        train = dg.Split(
            np.concatenate([train.x, data["meta"].x]), np.concatenate([train.y, data["meta"].y])
        )
    prog = dg.noisy_label_program(
        method, key=jax.random.PRNGKey(seed), steps=steps, **VARIANTS[variant]
    )
    sources = {"classifier": dg.sampler(train, batch, seed)}
    for i, n in enumerate(("reweight", "correct")):
        if n in prog.problems:
            sources[n] = dg.sampler(data["meta"], batch, 10_000 * (i + 1) + seed)
    res = jaxmlo.run(prog, sources, steps, log_every=0, progress=False)
    return dg.accuracy(res.state.params["classifier"], data["test"]), res.state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--noise",
        type=float,
        default=0.4,
        help="fraction of training labels replaced by random ones",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="programs to run (plain, plain+meta, reweight, reweight+correct)",
    )
    ap.add_argument(
        "--method",
        default="finite_difference",
        choices=["finite_difference", "sama", "cg"],
        help="hypergradient method of the upper problems",
    )
    ap.add_argument(
        "--seeds", type=int, default=3, help="seeds per variant (mean and std reported)"
    )
    ap.add_argument("--steps", type=int, default=1000, help="program steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size of every problem")
    ap.add_argument(
        "--out", default="benchmarks/results/noisy_digits_cpu.json", help="JSON results file"
    )
    args = ap.parse_args(argv)
    method = {
        "finite_difference": jaxmlo.finite_difference(),
        "sama": jaxmlo.sama(),
        "cg": jaxmlo.cg(maxiter=10),
    }[args.method]
    results = []
    for v in args.variants:
        accs, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            accs.append(train_one(v, args.noise, seed, args.steps, args.batch, method)[0])
        row = {
            "variant": v,
            "method": args.method if v not in ("plain", "plain+meta") else None,
            "test_acc": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "seconds": time.perf_counter() - t0,
        }
        results.append(row)
        print(
            f"noise {args.noise:g}  {v:<18} {100 * row['mean']:.2f} +- {100 * row['std']:.2f}  "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )
    write_json(args.out, run_record("noisy_digits", args, results))


if __name__ == "__main__":
    main()
