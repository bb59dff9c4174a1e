"""Brittleness test: remove each test example's top-k training examples, retrain (digits MLP or LM).

For correctly classified test examples (chosen at random, seeded) and each method, the ``k``
training examples with the largest scores are removed and the model is retrained with several
seeds (``jaxinf.brittleness``, vmapped). A prediction counts as flipped when the margin is
negative for a majority of seeds. For the byte LM (``--task lm``) the measure is the mean test
loss after removal (k = 0 is the unremoved baseline). Random scores are the control.

    python benchmarks/brittleness.py --out benchmarks/results/brittleness_cpu.json
    python benchmarks/brittleness.py --task lm --out benchmarks/results/brittleness_lm_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]  # the repo root; this folder for `from lds import`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lds import batch_loss, logra_grads  # noqa: E402

import jaxinf  # noqa: E402
from benchmarks._common import write_json  # noqa: E402
from jaxinf import examples  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", default="benchmarks/results/brittleness_cpu.json", help="JSON results file"
    )
    ap.add_argument(
        "--task", choices=("mlp", "lm"), default="mlp", help="digits MLP or byte-level LM"
    )
    ap.add_argument(
        "--num-test", type=int, default=10, help="correctly predicted test examples examined"
    )
    ap.add_argument(
        "--ks", default=None, help="comma-separated removal sizes (default 10,25,50; LM 0,5,10,20)"
    )
    ap.add_argument("--num-seeds", type=int, default=2, help="retraining seeds per removal")
    ap.add_argument(
        "--small", action="store_true", help="smaller training set and fewer steps (smoke run)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the task and the test examples drawn"
    )
    args = ap.parse_args(argv)
    lm = args.task == "lm"
    ks = [int(k) for k in (args.ks or ("0,5,10,20" if lm else "10,25,50")).split(",")]
    if lm:  # output = minus the test loss; "flips" do not apply, the loss rise does
        task = examples.lm_task(
            n_train=64 if args.small else 128, n_test=32, steps=50 if args.small else 100
        )
    else:
        task = examples.digits_task(
            "mlp", n_train=300 if args.small else 1000, n_test=100, steps=100 if args.small else 200
        )
    n_train = task.x_train.shape[0]
    t_all = time.perf_counter()
    params = jax.jit(task.train_fn)(
        task.init_fn(jax.random.PRNGKey(10_000 + args.seed)),
        jnp.ones(n_train),
        jax.random.PRNGKey(20_000 + args.seed),
    )
    margins = np.asarray(task.output_fn(params))
    rng = np.random.default_rng(args.seed)
    pool = np.arange(len(margins)) if lm else np.flatnonzero(margins > 0)  # correctly classified
    chosen = np.sort(rng.choice(pool, size=args.num_test, replace=False))

    batch = (task.x_train, task.y_train)
    g_tr = jaxinf.flatten_per_example(jaxinf.per_example_grads(batch_loss(task), params, batch))
    g_te = jaxinf.flatten_per_example(
        jaxinf.per_example_grads(batch_loss(task), params, (task.x_test, task.y_test))
    )
    dense = jaxinf.Select(types=("dense",))
    acts_tr = jaxinf.dense_activations(batch_loss(task), params, batch, select=dense)
    acts_te = jaxinf.dense_activations(
        batch_loss(task), params, (task.x_test, task.y_test), select=dense
    )
    init = "random" if lm else "pca"  # the better LoGra init per task in benchmarks/lds.py
    tr, te, nbytes = logra_grads(task, params, 16, init, seed=args.seed)
    methods = {
        "random": rng.normal(size=(task.x_test.shape[0], n_train)),
        "grad_dot": jaxinf.grad_dot(g_te, g_tr),
        "ekfac": jaxinf.kfac_influence(acts_te, acts_tr, ekfac=True),
        f"logra_{init}_16x16": jaxinf.influence_scores(tr, te),
        f"trak_{nbytes // 4}": jaxinf.trak(
            g_te, g_tr, dim=nbytes // 4, key=jax.random.PRNGKey(args.seed + 7)
        ),
    }
    out = {
        "command": "python benchmarks/brittleness.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": jax.default_backend(),
        "task": args.task,
        "n_train": int(n_train),
        "test_indices": chosen.tolist(),
        "ks": ks,
        "num_seeds": args.num_seeds,
        "methods": {},
    }
    for name, scores in methods.items():
        t0 = time.perf_counter()
        r = jaxinf.brittleness(
            np.asarray(scores),
            chosen,
            ks,
            init_fn=task.init_fn,
            train_fn=task.train_fn,
            output_fn=task.output_fn,
            num_seeds=args.num_seeds,
            seed=args.seed + 1,
            threshold=-np.inf if lm else 0.0,
            chunk_size=max(1, 64 // args.num_seeds),
            progress=False,
        )
        out["methods"][name] = {
            "flip_fraction": r.flip_fraction.tolist(),
            "mean_output": r.mean_output.tolist(),
            "retrain_s": time.perf_counter() - t0,
        }
        if lm:
            print(
                f"{name:18s} mean test loss at k={ks}: {np.round(-r.mean_output, 3).tolist()}",
                flush=True,
            )
        else:
            print(
                f"{name:18s} flip fraction at k={ks}: {np.round(r.flip_fraction, 2).tolist()}  "
                f"mean margin {np.round(r.mean_output, 2).tolist()}",
                flush=True,
            )
    out["total_s"] = time.perf_counter() - t_all
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
