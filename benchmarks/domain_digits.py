"""Three-level pretrain -> finetune -> reweight on a digits domain split (thesis 2.5.4).

Target domain: transposed digit images; finetuning set: 5 transposed images per class;
pretraining set: all remaining images, 10% transposed (target domain), 90% upright
(source domain). Target test accuracy of the finetuned model: finetune alone, the
two-level pretrain -> finetune baseline, and the three-level program whose reweighting
network R(x) weights pretraining examples (finite_difference), mean +- std over seeds.

  python -m benchmarks.domain_digits --out benchmarks/results/domain_digits_cpu.json
"""

import argparse
import time

import jax
import numpy as np

import jaxmlo
from benchmarks._common import run_record, write_json
from jaxmlo.examples import digits as dg


def train_one(variant, seed, steps, batch, method, prox):
    data = dg.domain_digits(seed)
    key = jax.random.PRNGKey(seed)
    prog = dg.domain_program(
        method,
        key=key,
        reweight=variant == "pretrain+finetune+reweight",
        steps=steps,
        prox=0.0 if variant == "finetune only" else prox,
    )
    sources = {
        "pretrain": dg.sampler(data["pretrain"], batch, seed),
        "finetune": dg.sampler(data["finetune"], batch, 10_000 + seed),
    }
    if "reweight" in prog.problems:
        sources["reweight"] = dg.sampler(data["finetune"], batch, 20_000 + seed)
    res = jaxmlo.run(prog, sources, steps, log_every=0, progress=False)
    acc = dg.accuracy(res.state.params["finetune"], data["test"])
    extra = {}
    if "reweight" in prog.problems:
        r = res.state.params["reweight"]
        w = np.asarray(jax.nn.sigmoid(data["pretrain"].x @ r["w"] + r["b"]))
        tgt = data["pretrain_is_target"]
        extra = {
            "mean_weight_target": float(w[tgt].mean()),
            "mean_weight_source": float(w[~tgt].mean()),
        }
    return acc, extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["finetune only", "pretrain+finetune", "pretrain+finetune+reweight"],
        help="programs to run (finetune only, 2 levels, 3 levels)",
    )
    ap.add_argument(
        "--seeds", type=int, default=3, help="seeds per variant (mean and std reported)"
    )
    ap.add_argument("--steps", type=int, default=1000, help="program steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size of every problem")
    ap.add_argument(
        "--prox",
        type=float,
        default=0.05,
        help="weight of the finetuning pull ||v - w*||^2 towards the pretrained solution",
    )
    ap.add_argument(
        "--out", default="benchmarks/results/domain_digits_cpu.json", help="JSON results file"
    )
    args = ap.parse_args(argv)
    results = []
    for v in args.variants:
        accs, extras, t0 = [], [], time.perf_counter()
        for seed in range(args.seeds):
            acc, extra = train_one(
                v, seed, args.steps, args.batch, jaxmlo.finite_difference(), args.prox
            )
            accs.append(acc)
            extras.append(extra)
        row = {
            "variant": v,
            "test_acc": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "seconds": time.perf_counter() - t0,
        }
        if extras[0]:
            for k in extras[0]:
                row[k] = float(np.mean([e[k] for e in extras]))
        results.append(row)
        print(
            f"{v:<28} {100 * row['mean']:.2f} +- {100 * row['std']:.2f}  "
            f"({row['seconds']:.0f}s) {extras[0]}",
            flush=True,
        )
    write_json(args.out, run_record("domain_digits", args, results))


if __name__ == "__main__":
    main()
