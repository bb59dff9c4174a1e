"""Quickstart: learn per-example weights that undo label noise, with SAMA, in under a minute.

A softmax classifier is trained on scikit-learn's digits with 40% of its training labels
replaced by random ones. A meta problem learns one weight per training example so that the
classifier, trained on the weighted loss, does well on 100 clean examples (thesis 2.5.3,
L2RW-style reweighting). Run::

    python -m jaxmlo.quickstart [--method sama|finite_difference|cg|neumann|itd] [--steps 300]

It prints test accuracy without and with reweighting and how well the learned weights separate
noisy from clean examples.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmlo
from jaxmlo import common

METHODS = {
    "sama": lambda: jaxmlo.sama(),
    "finite_difference": lambda: jaxmlo.finite_difference(),
    "cg": lambda: jaxmlo.cg(maxiter=10),
    "neumann": lambda: jaxmlo.neumann(steps=10, lr=0.1),
    "itd": lambda: jaxmlo.itd(),
}


def load_noisy_digits(noise: float = 0.4, n_meta: int = 100, seed: int = 0):
    """Digits split into a noisy training set, a small clean meta set and a clean test set."""
    x, y = common.load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n_test = 500
    x_test, y_test = x[:n_test], y[:n_test]
    x_meta, y_meta = x[n_test : n_test + n_meta], y[n_test : n_test + n_meta]
    x_train, y_clean = x[n_test + n_meta :], y[n_test + n_meta :]
    flip = rng.random(len(y_clean)) < noise
    y_train = np.where(flip, rng.integers(0, 10, len(y_clean)), y_clean)
    noisy = y_train != y_clean
    return (x_train, y_train, noisy), (x_meta, y_meta), (x_test, y_test)


def init_params(key, d_in=64, d_hidden=64, d_out=10):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, d_hidden)) / jnp.sqrt(d_in),
        "b1": jnp.zeros(d_hidden),
        "w2": jax.random.normal(k2, (d_hidden, d_out)) / jnp.sqrt(d_hidden),
        "b2": jnp.zeros(d_out),
    }


def logits_fn(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def per_example_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)


def base_loss(params, lam, batch):
    """Training loss, each example weighted by sigmoid of its meta parameter."""
    x, y, idx = batch
    w = jax.nn.sigmoid(lam[idx])
    return jnp.sum(w * per_example_loss(params, x, y)) / jnp.maximum(jnp.sum(w), 1e-6)


def meta_loss(lam, params, batch):  # own parameters first, like every loss
    x, y = batch
    return jnp.mean(per_example_loss(params, x, y))


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        default="sama",
        choices=sorted(METHODS),
        help="hypergradient method of the meta problem",
    )
    parser.add_argument("--steps", type=int, default=300, help="meta steps")
    parser.add_argument("--unroll", type=int, default=5, help="base steps per meta step")
    parser.add_argument("--batch", type=int, default=128, help="training examples per base step")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, label noise, initialization and batches",
    )
    args = parser.parse_args(argv)

    (x_tr, y_tr, noisy), meta, (x_te, y_te) = load_noisy_digits(seed=args.seed)
    n = len(x_tr)
    # eps_root > 0 keeps Adam differentiable where a parameter's gradient is exactly zero (digits
    # has always-blank pixels): SAMA's adaptation and ITD differentiate through sqrt(v).
    opt, meta_opt = optax.adam(1e-2, eps_root=1e-8), optax.adam(0.1)
    method = METHODS[args.method]()
    rng = np.random.default_rng(args.seed)

    def batches():  # [unroll, batch] index blocks; reshuffled every epoch
        idx = rng.integers(0, n, size=(args.unroll, args.batch))
        return (jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]), jnp.asarray(idx))

    meta_batch = (jnp.asarray(meta[0]), jnp.asarray(meta[1]))

    init, meta_step = jaxmlo.bilevel(base_loss, meta_loss, opt, meta_opt, adjoint=method)

    @jax.jit
    def plain_steps(params, opt_state, b):  # the same base training with uniform weights
        un = jaxmlo.unroll(base_loss, opt, params, opt_state, jnp.zeros(n), b)
        return un.params, un.opt_state

    params0 = init_params(jax.random.key(args.seed))
    lam0 = jnp.zeros(n)
    state = init(params0, lam0)
    plain, plain_state = params0, opt.init(params0)

    t0 = time.perf_counter()
    skipped = 0
    for _ in range(args.steps):
        b = batches()
        state, info = meta_step(state, b, meta_batch)
        skipped += int(not info.finite)
        plain, plain_state = plain_steps(plain, plain_state, b)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0

    weights = np.asarray(jax.nn.sigmoid(state.lam))
    lowest = np.argsort(weights)[: int(noisy.sum())]
    precision = float(noisy[lowest].mean())  # of the k lowest weights, k = number of noisy labels
    result = {
        "plain_accuracy": accuracy(plain, x_te, y_te),
        "reweighted_accuracy": accuracy(state.params, x_te, y_te),
        "mean_weight_clean": float(weights[~noisy].mean()),
        "mean_weight_noisy": float(weights[noisy].mean()),
        "noisy_precision_of_lowest": precision,
        "skipped_steps": skipped,
    }
    print(
        f"digits, {noisy.mean():.0%} label noise, {n} training / {len(meta[0])} clean meta examples"
    )
    print(
        f"method={method.name}  meta steps={args.steps} x unroll {args.unroll}  ({seconds:.1f} s)"
    )
    if skipped:
        print(f"warning: {skipped} meta steps had a non-finite hypergradient and were skipped")
    print(f"test accuracy  plain training:      {result['plain_accuracy']:.3f}")
    print(f"test accuracy  learned reweighting: {result['reweighted_accuracy']:.3f}")
    print(
        f"mean weight  clean {weights[~noisy].mean():.3f}  noisy {weights[noisy].mean():.3f};  "
        f"noisy among the lowest-weighted: {precision:.1%} (chance {noisy.mean():.1%})"
    )
    return result


if __name__ == "__main__":
    main()
