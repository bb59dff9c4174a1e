"""Meta-Weight-Net data reweighting on long-tailed digits (thesis 2.5.2 at toy scale).

Balanced test accuracy of plain training vs MWN reweighting with ``finite_difference`` and
``sama`` hypergradients, imbalance factors 10 and 50, mean +- std over seeds.

  python -m benchmarks.mwn_digits --out benchmarks/results/mwn_digits_cpu.json
"""

import argparse
import time

import jax
import numpy as np

import jaxmlo
from benchmarks._common import run_record, write_json
from jaxmlo.examples import digits as dg

# "plain+meta": plain training on the training set plus the (balanced) meta set -- the
# control for methods that touch the meta data (SAMA's nudge moves the classifier along
# the meta gradient).
METHODS = {
    "plain": None,
    "plain+meta": None,
    "finite_difference": jaxmlo.finite_difference(),
    "sama": jaxmlo.sama(),
    "sama(nudge=False)": jaxmlo.sama(nudge=False),
    "cg": jaxmlo.cg(maxiter=10),
    "itd": jaxmlo.itd(),
}


def train_one(method_name, imbalance, seed, steps, batch, progress=False):
    data = dg.long_tailed_digits(imbalance, seed)
    train = data["train"]
    if method_name == "plain+meta":
        train = dg.Split(
            np.concatenate([train.x, data["meta"].x]), np.concatenate([train.y, data["meta"].y])
        )
    prog = dg.reweighting_program(METHODS[method_name], key=jax.random.PRNGKey(seed), steps=steps)
    sources = {"classifier": dg.sampler(train, batch, seed)}
    if "reweight" in prog.problems:
        sources["reweight"] = dg.sampler(data["meta"], batch, 10_000 + seed)
    res = jaxmlo.run(prog, sources, steps, log_every=0, progress=progress)
    return dg.balanced_accuracy(res.state.params["classifier"], data["test"]), res.state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--imbalance",
        type=float,
        nargs="+",
        default=[10, 50],
        help="imbalance factors of the long-tailed training sets",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["plain", "plain+meta", "finite_difference", "sama", "sama(nudge=False)"],
        help="methods to compare (plain training, controls, hypergradient methods)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds per method and imbalance (mean and std reported)",
    )
    ap.add_argument("--steps", type=int, default=1000, help="program steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size of every problem")
    ap.add_argument(
        "--out", default="benchmarks/results/mwn_digits_cpu.json", help="JSON results file"
    )
    args = ap.parse_args(argv)
    results = []
    for imb in args.imbalance:
        for m in args.methods:
            accs, t0 = [], time.perf_counter()
            for seed in range(args.seeds):
                acc, _ = train_one(m, imb, seed, args.steps, args.batch)
                accs.append(acc)
            row = {
                "imbalance": imb,
                "method": m,
                "balanced_acc": accs,
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "seconds": time.perf_counter() - t0,
            }
            results.append(row)
            print(
                f"IF {imb:>4g}  {m:<18} {100 * row['mean']:.2f} +- {100 * row['std']:.2f}  "
                f"({row['seconds']:.0f}s)",
                flush=True,
            )
    write_json(args.out, run_record("mwn_digits", args, results))


if __name__ == "__main__":
    main()
