"""Multi-level programs on scikit-learn's digits (thesis 2.5.2-2.5.4, at toy scale).

Three applications of :class:`jaxmlo.Program`, all on ``sklearn.datasets.load_digits``
(1797 8x8 images shipped with scikit-learn; nothing is downloaded):

* :func:`reweighting_program` -- Meta-Weight-Net (MWN) data reweighting for class imbalance
  (thesis 2.5.2, Listing A.1): ``reweight`` (a 1-100-1 MLP mapping an example's loss to a
  weight) over ``classifier``. With ``sama`` most of the measured gain comes from SAMA's nudge,
  which trains the classifier on the meta objective: balanced accuracy at imbalance 10 / 50 is
  88.2 / 76.7 plain, 90.7 / 87.7 with sama, 87.9 / 75.3 with ``sama(nudge=False)``, and
  93.2 / 92.1 for plain training on train + meta data (``python -m benchmarks.mwn_digits``,
  3 seeds; docs/hypergradients.md).
* :func:`noisy_label_program` -- reweighting plus label correction (thesis 2.5.3, Listing
  A.2): two upper problems, ``reweight`` and ``correct``, over one ``classifier``.
* :func:`domain_program` -- pretrain -> finetune -> reweight, three levels (thesis 2.5.4,
  Listing A.3) on a domain split of digits (see :func:`domain_digits`).

Models are plain-JAX MLPs (params are tuples of ``{"w", "b"}`` dicts). The functions are
small on purpose: they are examples of the engine, used by ``benchmarks/`` and
``notebooks/data_reweighting.ipynb``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmlo import Problem, Program, cg, common, finite_difference, itd, run, sama

__all__ = [
    "Split",
    "long_tailed_digits",
    "noisy_digits",
    "domain_digits",
    "sampler",
    "mlp_init",
    "mlp_apply",
    "mwn_init",
    "mwn_apply",
    "cross_entropy",
    "reweighting_program",
    "noisy_label_program",
    "domain_program",
    "accuracy",
    "balanced_accuracy",
]


class Split(NamedTuple):
    """Arrays of one data set split: ``x`` float32 ``[n, 64]`` in [0, 1], ``y`` int32 ``[n]``."""

    x: np.ndarray
    y: np.ndarray


def _load():
    return common.load_digits()


def _split_per_class(y, rng, counts):
    """Per class, disjoint index sets of the given sizes (a count of None: the rest)."""
    out = [[] for _ in counts]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for j, n in enumerate(counts):
            n = len(idx) - start if n is None else (n(len(idx)) if callable(n) else n)
            out[j].append(idx[start : start + n])
            start += n
    return [np.sort(np.concatenate(o)) for o in out]


def long_tailed_digits(
    imbalance: float, seed: int, n_max: int = 100, meta_per_class: int = 10, test_frac: float = 0.3
) -> dict:
    """Long-tailed digits: class ``c`` keeps ``n_max * imbalance**(-c/9)`` training images.

    The imbalance factor is the ratio of the most to the least common class; counts in between
    are geometric, as in MWN / thesis A.2.1. The meta set is balanced (``meta_per_class`` per
    class) and the test set is a stratified ``test_frac`` of every class.

    Returns:
      ``{"train", "meta", "test": Split}``.
    """
    x, y = _load()
    rng = np.random.RandomState(seed)
    test, meta, pool = _split_per_class(
        y, rng, [lambda n: int(round(test_frac * n)), meta_per_class, None]
    )
    keep = []
    for c in range(10):
        n_c = max(1, int(n_max * imbalance ** (-c / 9)))
        idx = pool[y[pool] == c]
        if len(idx) < n_c:
            raise ValueError(f"long_tailed_digits: class {c} has {len(idx)} images, needs {n_c}")
        keep.append(idx[:n_c])
    train = np.concatenate(keep)
    return {
        "train": Split(x[train], y[train]),
        "meta": Split(x[meta], y[meta]),
        "test": Split(x[test], y[test]),
    }


def noisy_digits(noise: float, seed: int, meta_per_class: int = 10, test_frac: float = 0.3) -> dict:
    """Digits with symmetric label noise: each training label is, with probability ``noise``,
    replaced by a uniformly drawn *different* class. The meta set is small and clean.

    Returns:
      ``{"train", "meta", "test": Split, "clean_train_y": np.ndarray}``.
    """
    x, y = _load()
    rng = np.random.RandomState(seed)
    test, meta, train = _split_per_class(
        y, rng, [lambda n: int(round(test_frac * n)), meta_per_class, None]
    )
    y_tr = y[train].copy()
    flip = rng.rand(len(y_tr)) < noise
    y_tr[flip] = (y_tr[flip] + rng.randint(1, 10, flip.sum())) % 10
    return {
        "train": Split(x[train], y_tr),
        "meta": Split(x[meta], y[meta]),
        "test": Split(x[test], y[test]),
        "clean_train_y": y[train],
    }


def _transpose(x):
    return x.reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, 64)


def domain_digits(
    seed: int, finetune_per_class: int = 5, target_frac: float = 0.1, test_frac: float = 0.3
) -> dict:
    """A domain split of digits: the target domain is *transposed* images.

    The test set (a stratified ``test_frac``) and the finetuning set (``finetune_per_class``
    images per class) are transposed images of the target domain. The pretraining set is
    every other image, a random ``target_frac`` of them transposed (target domain) and the
    rest upright (source domain): a mixture whose upright part transfers poorly to an MLP
    on transposed pixels, so a per-example reweighting ``R(x)`` of pretraining can help.

    Returns:
      ``{"pretrain", "finetune", "test": Split, "pretrain_is_target": bool np.ndarray}``.
    """
    x, y = _load()
    rng = np.random.RandomState(seed)
    test, ft, pt = _split_per_class(
        y, rng, [lambda n: int(round(test_frac * n)), finetune_per_class, None]
    )
    is_tgt = rng.rand(len(pt)) < target_frac
    x_pt = np.where(is_tgt[:, None], _transpose(x[pt]), x[pt])
    return {
        "pretrain": Split(x_pt, y[pt]),
        "finetune": Split(_transpose(x[ft]), y[ft]),
        "test": Split(_transpose(x[test]), y[test]),
        "pretrain_is_target": is_tgt,
    }


def sampler(split: Split, batch_size: int, seed: int):
    """``fn(i) -> (x, y)``: batch ``i`` drawn with replacement, a pure function of ``(seed, i)``
    (so :func:`jaxmlo.run` can resume exactly)."""
    n = len(split.y)

    def fn(i):
        idx = np.random.default_rng([seed, i]).integers(0, n, batch_size)
        return split.x[idx], split.y[idx]

    return fn


# --- models -----------------------------------------------------------------------------------


def mlp_init(key, sizes):
    """He-initialised MLP params for layer ``sizes`` (e.g. ``(64, 64, 10)``)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    )


def mlp_apply(params, x, return_embed: bool = False):
    """ReLU MLP; with ``return_embed`` also the last hidden activations."""
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return (out, h) if return_embed else out


def mwn_init(key, hidden: int = 100):
    """Meta-Weight-Net 1-``hidden``-1 params; starts near weight 0.5 for every loss."""
    p = mlp_init(key, (1, hidden, 1))
    return (p[0], {"w": p[1]["w"] * 0.1, "b": p[1]["b"]})


def mwn_apply(params, losses):
    """Per-example weights in (0, 1) from per-example losses ``[n] -> [n]``."""
    return jax.nn.sigmoid(mlp_apply(params, losses[:, None]))[:, 0]


def cross_entropy(logits, labels):
    """Per-example cross entropy with integer labels ``[n]`` or soft labels ``[n, k]``."""
    logp = jax.nn.log_softmax(logits)
    if labels.ndim == logits.ndim:
        return -jnp.sum(labels * logp, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def accuracy(params, split: Split) -> float:
    """Accuracy of an MLP classifier on ``split``."""
    pred = np.asarray(jnp.argmax(mlp_apply(params, split.x), -1))
    return float(np.mean(pred == split.y))


def balanced_accuracy(params, split: Split) -> float:
    """Mean per-class recall of an MLP classifier on ``split``."""
    pred = np.asarray(jnp.argmax(mlp_apply(params, split.x), -1))
    return float(np.mean([np.mean(pred[split.y == c] == c) for c in np.unique(split.y)]))


# --- programs ---------------------------------------------------------------------------------


def _classifier_opt(lr, steps):
    return optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9),
    )


def reweighting_program(
    method,
    *,
    key,
    hidden: int = 64,
    steps: int = 1000,
    lr: float = 0.1,
    meta_lr: float = 1e-3,
    unroll_steps: int = 1,
) -> Program:
    """MWN data reweighting (thesis 2.5.2); ``method=None`` gives the plain classifier alone.

    ``classifier``: ``mean_i R(L_i; theta) L_i`` with ``R`` the MWN on the (stopped) loss;
    ``reweight``: cross entropy of ``classifier*`` on the balanced meta set (Adam).
    Batches are ``(x, y)`` pairs.
    """
    k1, k2 = jax.random.split(key)
    clf = mlp_init(k1, (64, hidden, 10))

    def plain_loss(p, deps, batch):
        x, y = batch
        return jnp.mean(cross_entropy(mlp_apply(p, x), y))

    if method is None:
        return Program([Problem("classifier", plain_loss, clf, _classifier_opt(lr, steps))])

    def classifier_loss(p, deps, batch):
        x, y = batch
        losses = cross_entropy(mlp_apply(p, x), y)
        w = mwn_apply(deps["reweight"], jax.lax.stop_gradient(losses))
        return jnp.mean(w * losses)

    def reweight_loss(theta, deps, batch):
        return plain_loss(deps["classifier"], None, batch)

    return Program(
        [
            Problem(
                "classifier",
                classifier_loss,
                clf,
                _classifier_opt(lr, steps),
                unroll_steps=unroll_steps,
                method=method,
            ),
            Problem("reweight", reweight_loss, mwn_init(k2), optax.adam(meta_lr)),
        ],
        u2l={"reweight": ["classifier"]},
        l2u={"classifier": ["reweight"]},
    )


def correct_init(hidden: int, beta: float = 4.0):
    """Label-correction params: soft label ``softmax(e W + b + beta onehot(y))``; starts as
    (nearly) the given label."""
    return {"w": jnp.zeros((hidden, 10)), "b": jnp.zeros(10), "beta": jnp.asarray(beta)}


def correct_apply(params, embed, labels: jax.Array | None = None):
    """Soft labels ``[n, 10]`` from classifier embeddings (and the given labels, if any)."""
    logits = embed @ params["w"] + params["b"]
    if labels is not None:
        logits = logits + params["beta"] * jax.nn.one_hot(labels, 10)
    return jax.nn.softmax(logits)


def noisy_label_program(
    method,
    *,
    key,
    correct: bool = True,
    reweight: bool = True,
    hidden: int = 64,
    steps: int = 1000,
    lr: float = 0.1,
    meta_lr: float = 1e-3,
) -> Program:
    """Reweighting (+ label correction) of noisy labels (thesis 2.5.3, Listing A.2).

    ``classifier``: ``mean_i R(L_i) L_i`` with ``L_i`` the cross entropy against the corrected
    soft label ``g(e_i, y_i; alpha)`` (``e_i`` the classifier's stopped embedding);
    ``reweight``: meta-set cross entropy of ``classifier*``; ``correct``: the same plus the
    correction network's own cross entropy on the clean meta set (labels withheld).
    With both flags off this is the plain classifier.
    """
    k1, k2 = jax.random.split(key)
    clf = mlp_init(k1, (64, hidden, 10))
    if not (correct or reweight):
        return reweighting_program(None, key=key, hidden=hidden, steps=steps, lr=lr)

    def classifier_loss(p, deps, batch):
        x, y = batch
        logits, embed = mlp_apply(p, x, return_embed=True)
        target = y
        if correct:
            # Gradients of the corrector flow through the loss value, not through the embedding.
            target = correct_apply(deps["correct"], jax.lax.stop_gradient(embed), y)
        losses = cross_entropy(logits, target)
        if reweight:
            losses = mwn_apply(deps["reweight"], jax.lax.stop_gradient(losses)) * losses
        return jnp.mean(losses)

    def meta_ce(deps, batch):
        x, y = batch
        return jnp.mean(cross_entropy(mlp_apply(deps["classifier"], x), y))

    def reweight_loss(theta, deps, batch):
        return meta_ce(deps, batch)

    def correct_loss(alpha, deps, batch):
        x, y = batch
        _, embed = mlp_apply(deps["classifier"], x, return_embed=True)
        aux = jnp.mean(cross_entropy(embed @ alpha["w"] + alpha["b"], y))
        return meta_ce(deps, batch) + aux

    problems = [
        Problem("classifier", classifier_loss, clf, _classifier_opt(lr, steps), method=method)
    ]
    uppers = []
    if reweight:
        problems.append(Problem("reweight", reweight_loss, mwn_init(k2), optax.adam(meta_lr)))
        uppers.append("reweight")
    if correct:
        problems.append(Problem("correct", correct_loss, correct_init(hidden), optax.adam(meta_lr)))
        uppers.append("correct")
    return Program(problems, u2l={u: ["classifier"] for u in uppers}, l2u={"classifier": uppers})


def domain_program(
    method,
    *,
    key,
    reweight: bool = True,
    hidden: int = 32,
    steps: int = 1000,
    lr: float = 0.05,
    meta_lr: float = 1e-2,
    prox: float = 0.05,
) -> Program:
    """pretrain -> finetune -> reweight (thesis 2.5.4, Listing A.3); ``reweight=False`` gives
    the two-level baseline pretrain -> finetune.

    ``pretrain``: ``mean_i sigmoid(R(x_i; theta)) L_i`` on the pretraining mixture (``R``
    linear in the pixels); ``finetune``: cross entropy on the small target set plus
    ``prox * ||v - w*||^2`` towards the pretrained solution; ``reweight``: cross entropy of
    ``finetune*`` on the same target set (as in the thesis, following its ref. [10]).
    """
    k1, k2, k3 = jax.random.split(key, 3)

    def pretrain_loss(w, deps, batch):
        x, y = batch
        losses = cross_entropy(mlp_apply(w, x), y)
        if reweight:
            r = deps["reweight"]
            w = jax.nn.sigmoid(x @ r["w"] + r["b"])
            # Normalised to mean 1 in the batch: R redistributes weight between examples instead
            # of scaling the whole loss (which would just act as a learning rate).
            losses = w / jnp.mean(w) * losses
        return jnp.mean(losses)

    def finetune_loss(v, deps, batch):
        x, y = batch
        sq = sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(deps["pretrain"]))
        )
        return jnp.mean(cross_entropy(mlp_apply(v, x), y)) + prox * sq

    def reweight_loss(theta, deps, batch):
        x, y = batch
        return jnp.mean(cross_entropy(mlp_apply(deps["finetune"], x), y))

    opt = lambda: optax.adam(optax.cosine_decay_schedule(lr * 0.1, steps))
    problems = [
        Problem("pretrain", pretrain_loss, mlp_init(k1, (64, hidden, 10)), opt(), method=method),
        Problem("finetune", finetune_loss, mlp_init(k2, (64, hidden, 10)), opt(), method=method),
    ]
    if not reweight:
        return Program(problems, l2u={"pretrain": ["finetune"]})
    problems.append(
        Problem(
            "reweight", reweight_loss, {"w": jnp.zeros(64), "b": jnp.zeros(())}, optax.adam(meta_lr)
        )
    )
    return Program(
        problems,
        u2l={"reweight": ["pretrain"]},
        l2u={"pretrain": ["finetune"], "finetune": ["reweight"]},
    )


METHODS = {
    "finite_difference": finite_difference,
    "sama": sama,
    "cg": lambda: cg(maxiter=10),
    "itd": itd,
}


def _run_app(app: str, method, steps: int, batch: int, seed: int) -> tuple[float, float]:
    """(plain accuracy, multi-level accuracy) of one application, both trained for ``steps``."""
    key = jax.random.PRNGKey(seed)
    if app == "reweighting":
        data = long_tailed_digits(10, seed)
        progs = [reweighting_program(m, key=key, steps=steps) for m in (None, method)]
        sources = {
            "classifier": sampler(data["train"], batch, seed),
            "reweight": sampler(data["meta"], batch, 10_000 + seed),
        }
        score, trained = balanced_accuracy, "classifier"
    elif app == "noisy":
        data = noisy_digits(0.4, seed)
        progs = [
            noisy_label_program(method, key=key, steps=steps, correct=on, reweight=on)
            for on in (False, True)
        ]
        sources = {"classifier": sampler(data["train"], batch, seed)}
        for i, name in enumerate(("reweight", "correct")):
            sources[name] = sampler(data["meta"], batch, 10_000 * (i + 1) + seed)
        score, trained = accuracy, "classifier"
    else:
        data = domain_digits(seed)
        progs = [
            domain_program(method, key=key, steps=steps, reweight=False, prox=0.0),
            domain_program(method, key=key, steps=steps),
        ]
        sources = {
            "pretrain": sampler(data["pretrain"], batch, seed),
            "finetune": sampler(data["finetune"], batch, 10_000 + seed),
            "reweight": sampler(data["finetune"], batch, 20_000 + seed),
        }
        score, trained = accuracy, "finetune"
    out = []
    for prog in progs:
        mine = {name: src for name, src in sources.items() if name in prog.problems}
        result = run(prog, mine, steps, log_every=0, progress=False)
        out.append(score(result.state.params[trained], data["test"]))
    return out[0], out[1]


def main(argv=None) -> tuple[float, float]:
    """``python -m jaxmlo.examples.digits``: one application against its plain baseline."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Train one multi-level digits application and its plain baseline; print "
        "both test accuracies."
    )
    ap.add_argument(
        "--app",
        choices=("reweighting", "noisy", "domain"),
        default="noisy",
        help="reweighting: Meta-Weight-Net on long-tailed digits (balanced accuracy); noisy: "
        "reweighting + label correction under 40%% label noise; domain: pretrain -> finetune "
        "-> reweight on transposed digits",
    )
    ap.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="finite_difference",
        help="hypergradient method",
    )
    ap.add_argument("--steps", type=int, default=1000, help="program steps")
    ap.add_argument("--batch", type=int, default=64, help="batch size of every problem")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, initialization, batches")
    args = ap.parse_args(argv)
    plain, multi = _run_app(args.app, METHODS[args.method](), args.steps, args.batch, args.seed)
    baseline = {"domain": "finetune only"}.get(args.app, "plain")
    print(f"{args.app}, {args.method}, {args.steps} steps")
    print(f"test accuracy  {baseline}: {plain:.3f}")
    print(f"test accuracy  multi-level: {multi:.3f}")
    return plain, multi


if __name__ == "__main__":
    main()
