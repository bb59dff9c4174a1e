"""Counterfactual evaluation of attribution scores: linear datamodeling score and brittleness.

An attribution method is judged by retraining. Scores are a matrix ``[n_test, n_train]`` whose
entry ``(i, j)`` says how much training example ``j`` *raises* a measured output of test example
``i`` (for example its margin, or minus its loss): positive means helpful.

* **Linear datamodeling score** (LDS; Park et al. 2023, thesis 4.4.1): draw ``M`` random subsets
  ``S_m`` holding half of the training set, retrain on each with several seeds and measure the
  output ``f_i(S_m)`` averaged over seeds. The method predicts ``g_i(S_m) = sum_{j in S_m}
  scores[i, j]``. LDS is the mean over test examples ``i`` of the Spearman rank correlation over
  ``m`` between ``g_i(S_m)`` and ``f_i(S_m)``. :func:`lds_models` reports it as mean ± std over
  several independently trained attribution models (thesis 4.4.1, appendix C.2), all judged
  against the same retrained ground truth.
* **Brittleness** (Ilyas et al. 2022, thesis C.2.1): for a test example remove the ``k`` training
  examples with the largest scores, retrain with several seeds and see whether the prediction
  flips (or how much the output drops).

Retraining is generic: the user gives ``init_fn(key) -> params``,
``train_fn(params, weights, key) -> params`` (``weights`` is a float ``[n_train]`` mask of 0/1)
and ``output_fn(params) -> [n_test]``. :func:`retrain` ``vmap``s the three over masks and seeds
and ``jit``s them as one program, so hundreds of small models train in minutes on a CPU.

Rank correlation is a small NumPy routine (no SciPy at run time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "rankdata",
    "spearman",
    "random_subsets",
    "retrain",
    "LDSResult",
    "lds",
    "LDSModelsResult",
    "lds_models",
    "subset_predictions",
    "ensemble_scores",
    "BrittlenessResult",
    "brittleness",
]


# ---------------------------------------------------------------------------------------------
# Rank correlation.


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` of a 1-D array; tied values share the mean of their ranks.

    Args:
      x: ``[n]`` array.
    Returns:
      ``[n]`` float64 ranks.
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"rankdata: x must be 1-D, got shape {x.shape}")
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.arange(n)
    xs = x[order]
    # Start of each run of equal values in sorted order.
    new = np.concatenate([[True], xs[1:] != xs[:-1]]) if n else np.zeros(0, bool)
    group = np.cumsum(new)[inverse]  # 1-based run id of every element
    bounds = np.concatenate([np.flatnonzero(new), [n]])  # run g spans [bounds[g-1], bounds[g])
    # Mean of 1-based ranks bounds[g-1]+1 .. bounds[g].
    return 0.5 * (bounds[group - 1] + 1 + bounds[group]).astype(np.float64)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray | float:
    """Spearman rank correlation of ``x`` and ``y`` along ``axis`` (ties get mean ranks).

    Math: Pearson correlation of the ranks. Constant inputs give ``nan``.

    Args:
      x, y: arrays of the same shape.
      axis: axis along which the samples lie; the other axes are independent correlations.
    Returns:
      A float for 1-D inputs, else an array with ``axis`` removed.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman: x and y must have the same shape, got {x.shape} and {y.shape}")
    xr = np.apply_along_axis(rankdata, axis, x)
    yr = np.apply_along_axis(rankdata, axis, y)
    xr = np.moveaxis(xr, axis, 0).reshape(x.shape[axis], -1)
    yr = np.moveaxis(yr, axis, 0).reshape(y.shape[axis], -1)
    rho = _pearson_columns(xr, yr)
    rest = tuple(s for i, s in enumerate(x.shape) if i != axis % x.ndim)
    return float(rho[0]) if not rest else rho.reshape(rest)


# ---------------------------------------------------------------------------------------------
# Retraining.


def random_subsets(
    n_train: int, num_subsets: int, *, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Masks of ``num_subsets`` random subsets, each of exactly ``round(fraction * n_train)`` examples.

    Returns:
      ``[num_subsets, n_train]`` bool array; row ``m`` marks the members of ``S_m``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"random_subsets: fraction must lie in (0, 1), got {fraction}")
    size = int(round(fraction * n_train))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n_train), dtype=bool)
    for m in range(num_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def retrain(
    init_fn: Callable[[jax.Array], Any],
    train_fn: Callable[[Any, jax.Array, jax.Array], Any],
    output_fn: Callable[[Any], jax.Array],
    masks: np.ndarray,
    *,
    num_seeds: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Trains one model per (mask, seed) and measures its outputs, ``vmap``ped over both.

    Model ``(m, s)`` uses ``key = fold_in(fold_in(PRNGKey(seed), m), s)`` split into an init and
    a training key, so results are reproducible and independent of ``chunk_size``.

    Args:
      init_fn: ``init_fn(key) -> params``.
      train_fn: ``train_fn(params, weights, key) -> params``; ``weights`` is float ``[n_train]``
        (1 = in the training set, 0 = removed). Must be ``vmap``-able (no Python control flow on
        the weights).
      output_fn: ``output_fn(params) -> [n_out]`` measured outputs (e.g. test margins).
      masks: ``[M, n_train]`` bool/0-1 masks.
      num_seeds: models per mask.
      seed: base seed.
      chunk_size: masks per compiled call (bounds memory); default all at once.
      progress: show a tqdm bar over chunks.
    Returns:
      ``[M, num_seeds, n_out]`` NumPy array of outputs.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"retrain: masks must be [M, n_train], got shape {masks.shape}")
    if num_seeds < 1:
        raise ValueError(f"retrain: num_seeds must be >= 1, got {num_seeds}")
    num = masks.shape[0]
    chunk = num if chunk_size is None else max(1, int(chunk_size))

    def one(weights, key):
        k_init, k_train = jax.random.split(key)
        params = train_fn(init_fn(k_init), weights, k_train)
        return output_fn(params)

    many = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, 0)))
    base = jax.random.PRNGKey(seed)
    seeds = jnp.arange(num_seeds)

    def keys_for(ms):
        return jax.vmap(
            lambda m: jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, m), s))(seeds)
        )(ms)

    from tqdm.auto import tqdm

    out = []
    starts = range(0, num, chunk)
    for start in tqdm(starts, desc="retrain", disable=not progress or len(starts) <= 1):
        stop = min(start + chunk, num)
        w = masks[start:stop].astype(np.float32)
        if stop - start < chunk and start > 0:  # pad the last chunk: one compiled shape
            w = np.concatenate([w, np.ones((chunk - (stop - start), w.shape[1]), w.dtype)])
        ids = jnp.arange(start, start + w.shape[0])
        res = many(jnp.asarray(w), keys_for(ids))
        out.append(np.asarray(res)[: stop - start])
    return np.concatenate(out, axis=0)


# ---------------------------------------------------------------------------------------------
# Linear datamodeling score.


class LDSResult(NamedTuple):
    """Linear datamodeling score with a bootstrap confidence interval.

    Attributes:
      score: mean over test examples of the per-example Spearman correlation.
      ci_low, ci_high: percentile bootstrap interval (resampling test examples).
      per_test: ``[n_test]`` Spearman correlation of each test example (``nan`` if constant).
    """

    score: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Additive prediction ``g_i(S_m) = sum_{j in S_m} scores[i, j]``, shape ``[M, n_test]``."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores must be [n_test, n_train] and masks [M, n_train]; got {scores.shape} and {masks.shape}"
        )
    return masks @ scores.T


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score of an attribution score matrix.

    Args:
      scores: ``[n_test, n_train]``; larger = training example raises the test output more.
      masks: ``[M, n_train]`` subset masks used for retraining (:func:`random_subsets`).
      outputs: measured outputs ``[M, n_test]``, or ``[M, num_seeds, n_test]`` (averaged over
        seeds first), from :func:`retrain`.
      num_bootstrap: bootstrap resamples of the test examples for the interval.
      confidence: interval coverage.
      seed: bootstrap seed.
    Returns:
      :class:`LDSResult`. Test examples whose correlation is undefined (constant predictions or
      outputs) are left out of the mean.
    """
    if np.ndim(scores) == 3:
        raise ValueError(
            "lds: scores has shape [n_models, n_test, n_train]; use lds_models for several attribution models"
        )
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 3:
        outputs = outputs.mean(axis=1)
    pred = subset_predictions(scores, masks)
    if outputs.shape != pred.shape:
        raise ValueError(f"outputs must be [M, n_test] = {pred.shape}, got {outputs.shape}")
    per_test = spearman(pred, outputs, axis=0)
    per_test = np.atleast_1d(np.asarray(per_test, dtype=np.float64))
    valid = per_test[np.isfinite(per_test)]
    if valid.size == 0:
        return LDSResult(float("nan"), float("nan"), float("nan"), per_test)
    rng = np.random.default_rng(seed)
    boot = valid[rng.integers(0, valid.size, size=(num_bootstrap, valid.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return LDSResult(float(valid.mean()), float(lo), float(hi), per_test)


class LDSModelsResult(NamedTuple):
    """LDS over several independently trained attribution models (thesis 4.4.1, appendix C.2).

    Attributes:
      mean: mean over models of each model's LDS.
      std: standard deviation over models (``ddof`` as passed to :func:`lds_models`; ``nan`` for
        a single model with ``ddof=1``).
      per_model: ``[n_models]`` LDS of each model.
      results: one :class:`LDSResult` per model (bootstrap interval over test examples, per-test
        correlations).
    """

    mean: float
    std: float
    per_model: np.ndarray
    results: tuple


def ensemble_scores(scores: Sequence[ArrayLike], *, reduce: str = "mean") -> np.ndarray:
    """Scores of an ensemble of models or checkpoints: the ``[n_test, n_train]`` matrices summed
    or averaged (TracIn sums over checkpoints; TRAK and LoGra ensembles average).

    Args:
      scores: one ``[n_test, n_train]`` matrix per model or checkpoint, same shape.
      reduce: ``"mean"`` or ``"sum"``.
    Returns:
      ``[n_test, n_train]``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f'reduce must be "mean" or "sum", got {reduce!r}')
    mats = [np.asarray(s) for s in scores]
    if not mats:
        raise ValueError("ensemble_scores needs at least one score matrix")
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or mats[0].ndim != 2:
        raise ValueError(f"score matrices must be 2-D and of one shape, got {sorted(shapes)}")
    total = np.sum(mats, axis=0)
    return total / len(mats) if reduce == "mean" else total


def lds_models(
    scores: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray,
    outputs: np.ndarray,
    *,
    ddof: int = 1,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSModelsResult:
    """LDS of each of several attribution models, with mean and std over the models.

    Each model (e.g. the same method run on networks trained from different seeds) gives its own
    score matrix; all are judged against the same retrained outputs, as in the thesis, where LDS
    is reported as mean ± std over independently trained models. The spread measures how much
    the score depends on which trained model the attribution was computed from, which the
    per-model bootstrap over test examples does not capture.

    Args:
      scores: ``[n_models, n_test, n_train]`` array, or a sequence of ``[n_test, n_train]``.
      masks: ``[M, n_train]`` subset masks (:func:`random_subsets`).
      outputs: ``[M, n_test]`` or ``[M, num_seeds, n_test]`` measured outputs (:func:`retrain`).
      ddof: delta degrees of freedom of the std (1: sample std, 0: population std).
      num_bootstrap, confidence, seed: passed to :func:`lds` for every model.
    Returns:
      :class:`LDSModelsResult`. Models whose LDS is ``nan`` are left out of mean and std.
    """
    stack = [np.asarray(s, dtype=np.float64) for s in scores]
    if not stack or any(s.ndim != 2 for s in stack):
        raise ValueError(
            "lds_models: scores must be [n_models, n_test, n_train] with n_models >= 1"
        )
    results = tuple(
        lds(s, masks, outputs, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
        for s in stack
    )
    per_model = np.array([r.score for r in results], dtype=np.float64)
    valid = per_model[np.isfinite(per_model)]
    mean = float(valid.mean()) if valid.size else float("nan")
    std = float(valid.std(ddof=ddof)) if valid.size > ddof else float("nan")
    return LDSModelsResult(mean, std, per_model, results)


# ---------------------------------------------------------------------------------------------
# Brittleness.


class BrittlenessResult(NamedTuple):
    """Outcome of removing each test example's top-k training examples and retraining.

    Attributes:
      ks: the removal sizes ``[K]``.
      test_indices: the test examples examined ``[n_sel]``.
      outputs: ``[K, n_sel, num_seeds]`` output of each examined test example after removal.
      flip_fraction: ``[K]`` fraction of examined test examples whose output falls below
        ``threshold`` for a majority of seeds (a flipped prediction when the output is a margin).
      mean_output: ``[K]`` mean output after removal (for language models: minus the loss).
    """

    ks: np.ndarray
    test_indices: np.ndarray
    outputs: np.ndarray
    flip_fraction: np.ndarray
    mean_output: np.ndarray


def brittleness(
    scores: np.ndarray,
    test_indices: Sequence[int],
    ks: Sequence[int],
    *,
    init_fn: Callable,
    train_fn: Callable,
    output_fn: Callable,
    num_seeds: int = 3,
    seed: int = 0,
    threshold: float = 0.0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> BrittlenessResult:
    """Brittleness test: remove the ``k`` highest-scored training examples, retrain, count flips.

    Args:
      scores: ``[n_test, n_train]`` attribution scores (larger = more helpful).
      test_indices: test examples to examine (typically correctly classified ones).
      ks: removal sizes.
      init_fn, train_fn, output_fn, num_seeds, seed, chunk_size, progress: as in :func:`retrain`;
        ``output_fn`` returns the output of every test example (e.g. margins).
      threshold: an output below it counts as flipped (0 for a margin).
    Returns:
      :class:`BrittlenessResult`.
    """
    scores = np.asarray(scores)
    test_indices = np.asarray(test_indices, dtype=np.int64)
    ks = np.asarray(ks, dtype=np.int64)
    n_train = scores.shape[1]
    if np.any(ks < 0) or np.any(ks >= n_train):
        raise ValueError(
            f"brittleness: every k must lie in [0, n_train={n_train}), got {ks.tolist()}"
        )
    order = np.argsort(-scores[test_indices], axis=1, kind="stable")  # most helpful first
    masks = np.ones((len(ks), len(test_indices), n_train), dtype=bool)
    for a, k in enumerate(ks):
        for b in range(len(test_indices)):
            masks[a, b, order[b, :k]] = False
    outs = retrain(
        init_fn,
        train_fn,
        output_fn,
        masks.reshape(-1, n_train),
        num_seeds=num_seeds,
        seed=seed,
        chunk_size=chunk_size,
        progress=progress,
    )  # [K*n_sel, S, n_test]
    outs = outs.reshape(len(ks), len(test_indices), num_seeds, -1)
    picked = np.take_along_axis(outs, test_indices[None, :, None, None], axis=3)[..., 0]
    flipped = (picked < threshold).mean(axis=2) > 0.5
    return BrittlenessResult(
        ks, test_indices, picked, flipped.mean(axis=1), picked.mean(axis=(1, 2))
    )
