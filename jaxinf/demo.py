"""End-to-end demo: which training images made the digits MLP predict what it predicts?

    python -m jaxinf.demo --out runs/demo

1. Trains a small MLP on scikit-learn's 8x8 digits, with some training labels flipped on purpose.
2. Captures LoGra-projected per-example gradients (PCA projections from KFAC factors) of every
   training example and logs them to a tensorstore log (``<out>/log``).
3. Queries the log with the gradients of a few test predictions: the most helpful and most
   harmful training images go to ``<out>/influence.png``.
4. Ranks the training set by self-influence and counts how many flipped labels land in its
   top 5% (a random ranking finds 5% of them).

Runs in well under 2 minutes on 2 CPU cores. No downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="jaxinf end-to-end influence demo on digits")
    ap.add_argument(
        "--out", default="runs/demo", help="output directory (log, figure, summary.json)"
    )
    ap.add_argument(
        "--n-train",
        type=int,
        default=1000,
        help="training images (the rest of digits' 1797, up to 200, are test images)",
    )
    ap.add_argument("--flip", type=int, default=50, help="training labels flipped on purpose")
    ap.add_argument(
        "--k", type=int, default=16, help="LoGra projection size per side (clipped per layer)"
    )
    ap.add_argument(
        "--init",
        choices=("pca", "random"),
        default="pca",
        help="LoGra projections: PCA of the KFAC factors, or random",
    )
    ap.add_argument("--steps", type=int, default=400, help="SGD steps when training the MLP")
    ap.add_argument(
        "--num-queries",
        type=int,
        default=4,
        help="test predictions whose helpful and harmful training images are shown",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, flipped labels, training and projections",
    )
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxinf
    from jaxinf import examples

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    task = examples.digits_task(
        "mlp", n_train=args.n_train, n_test=200, seed=args.seed, flip=args.flip, steps=args.steps
    )
    flipped = task.info["flipped"]
    n = task.x_train.shape[0]

    # 1. Train on all (partly mislabeled) data.
    params = jax.jit(task.train_fn)(
        task.init_fn(jax.random.PRNGKey(args.seed)), jnp.ones(n), jax.random.PRNGKey(args.seed + 1)
    )
    logits = jax.vmap(lambda x: task.model.apply({"params": params}, x))(task.x_test)
    test_acc = float(jnp.mean(jnp.argmax(logits, -1) == task.y_test))
    t_train = time.perf_counter() - t_start
    print(
        f"trained MLP on {n} digits ({len(flipped)} labels flipped): test accuracy {test_acc:.3f} "
        f"[{t_train:.1f} s]"
    )

    # 2. LoGra capture -> tensorstore log.
    t0 = time.perf_counter()
    cap = jaxinf.linen_capture(
        lambda p, b: jnp.mean(jax.vmap(lambda x, y: task.example_loss(p, (x, y)))(*b))
    )
    batch = (task.x_train, task.y_train)
    layers = jaxinf.find_layers(cap, params, batch, select=jaxinf.Select(types=("dense",)))
    layers = {
        p: s._replace(k_in=min(args.k, s.n_in), k_out=min(args.k, s.n_out))
        for p, s in layers.items()
    }
    if args.init == "pca":
        acc = jaxinf.kfac_factors(cap, layers)
        projs = jaxinf.pca_projections(
            acc.finalize(acc.update(acc.init(None), (params, batch))), layers=layers
        )
        meta = jaxinf.projection_metadata(projs, init="pca", model="digits-mlp")
    else:
        projs = jaxinf.random_projections(layers, key=jax.random.PRNGKey(args.seed))
        meta = jaxinf.projection_metadata(projs, init="random", seed=args.seed, model="digits-mlp")
    grads_fn = jaxinf.projected_gradients(cap, projs)
    log_dir = os.path.join(args.out, "log")
    shutil.rmtree(log_dir, ignore_errors=True)
    bs = 250
    with jaxinf.LogWriter(log_dir, meta) as w:
        for s in range(0, n, bs):
            w.write_async(
                grads_fn(params, (task.x_train[s : s + bs], task.y_train[s : s + bs])),
                ids=np.arange(s, min(s + bs, n)),
            )
    log = jaxinf.open_log(log_dir)
    bytes_per_row = sum(l["k_in"] * l["k_out"] for l in meta["layers"].values()) * 4
    t_log = time.perf_counter() - t0
    print(
        f"logged {log.num_rows} rows x {bytes_per_row} B to {log_dir} ({args.init}, k={args.k}) [{t_log:.1f} s]"
    )

    # 3. Query a few correctly classified test predictions.
    t0 = time.perf_counter()
    correct = np.flatnonzero(np.asarray(jnp.argmax(logits, -1) == task.y_test))
    q_idx = correct[: args.num_queries]
    test_grads = grads_fn(params, (task.x_test[q_idx], task.y_test[q_idx]))
    res = jaxinf.query(log, test_grads, meta, mode="dot", top_k=5, progress=False)
    t_query = time.perf_counter() - t0

    # 4. Self-influence ranking vs. the flipped labels.
    t0 = time.perf_counter()
    si = jaxinf.self_influence(log, progress=False)
    top = si.ids[np.argsort(-si.scores)[: int(round(0.05 * n))]]
    found = int(np.isin(flipped, top).sum())
    t_self = time.perf_counter() - t0
    print(
        f"self-influence: {found} of {len(flipped)} flipped labels are in the top 5% "
        f"({len(top)} examples; a random ranking finds ~{0.05 * len(flipped):.1f}) [{t_self:.1f} s]"
    )

    fig_path = os.path.join(args.out, "influence.png")
    _figure(fig_path, task, q_idx, res, set(flipped.tolist()))
    flipped_set = set(flipped.tolist())
    for r, i in enumerate(q_idx):
        helpful = [int(j) for j in res.top_ids[r]]
        harmful = [int(j) for j in res.bottom_ids[r]]
        print(
            f"test #{i} (label {int(task.y_test[i])}): helpful labels "
            f"{[int(task.y_train[j]) for j in helpful]}, harmful labels "
            f"{[int(task.y_train[j]) for j in harmful]} "
            f"(flipped among harmful: {sum(j in flipped_set for j in harmful)})"
        )
    total = time.perf_counter() - t_start
    summary = {
        "n_train": n,
        "flipped": len(flipped),
        "test_accuracy": test_acc,
        "projection": args.init,
        "k": args.k,
        "bytes_per_example": bytes_per_row,
        "flipped_found_in_top5pct": found,
        "top5pct_size": len(top),
        "random_expectation": 0.05 * len(flipped),
        "queries": q_idx.tolist(),
        "helpful_ids": res.top_ids.tolist(),
        "harmful_ids": res.bottom_ids.tolist(),
        "seconds": {
            "train": t_train,
            "log": t_log,
            "query": t_query,
            "self_influence": t_self,
            "total": total,
        },
        "figure": fig_path,
        "log": log_dir,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"figure: {fig_path}; total {total:.1f} s")
    return summary


def _figure(path, task, q_idx, res, flipped):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = res.top_ids.shape[1]
    fig, axes = plt.subplots(
        len(q_idx), 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.35 * len(q_idx)), squeeze=False
    )
    for r, i in enumerate(q_idx):
        row = axes[r]
        row[0].imshow(np.asarray(task.x_test[i]).reshape(8, 8), cmap="gray_r")
        row[0].set_title(f"test {int(task.y_test[i])}", fontsize=8, color="blue")
        for c, j in enumerate(res.top_ids[r]):
            ax = row[1 + c]
            ax.imshow(np.asarray(task.x_train[int(j)]).reshape(8, 8), cmap="Greens")
            ax.set_title(
                f"+ y={int(task.y_train[int(j)])}" + ("*" if int(j) in flipped else ""), fontsize=7
            )
        for c, j in enumerate(res.bottom_ids[r]):
            ax = row[1 + k + c]
            ax.imshow(np.asarray(task.x_train[int(j)]).reshape(8, 8), cmap="Reds")
            ax.set_title(
                f"- y={int(task.y_train[int(j)])}" + ("*" if int(j) in flipped else ""), fontsize=7
            )
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "most helpful (+, green) and most harmful (-, red) training images; * = flipped label",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
