"""Small offline tasks for evaluation, the demo, benchmarks and notebooks (``jaxinf.examples``).

* digits: scikit-learn's 8x8 digits, an MLP or a small CNN (convolutions written as
  ``nn.Dense`` over 3x3 patches, so every layer is a dense layer for LoGra/KFAC).
* lm: a byte-level one-block transformer LM on the paragraphs of Python's ``pydoc_data.topics``.

Each task is a :class:`Task`: ``init_fn(key)``, ``train_fn(params, weights, key)`` (SGD/Adam on
minibatches drawn with probability proportional to ``weights``, so a 0/1 mask *is* a training
subset and the function ``vmap``s over masks), ``output_fn(params) -> [n_test]`` (margin or
minus the loss), and per-example losses for gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmlo import common


class Task(NamedTuple):
    model: nn.Module
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    init_fn: Callable  # key -> params
    train_fn: Callable  # (params, weights [n_train], key) -> params
    output_fn: Callable  # params -> [n_test] (margin or -loss, larger = better)
    example_loss: Callable  # (params, (x, y)) -> scalar, one example
    out_loss: Callable  # (model_output, y) -> scalar, one example (for dense_activations)
    features_fn: Callable  # (params, x batch) -> [n, d] penultimate representation
    info: dict


# ---------------------------------------------------------------------------------------------
# Models.


class MLP(nn.Module):
    hidden: tuple = (32, 32)
    classes: int = 10

    @nn.compact
    def __call__(self, x, features=False):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        if features:
            return x
        return nn.Dense(self.classes)(x)


def _patches(x):
    """[H, W, C] -> [H, W, 9C] 3x3 'SAME' patches."""
    p = jax.lax.conv_general_dilated_patches(
        x[None], (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return p[0]


def _avgpool2(x):
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


class CNN(nn.Module):
    """Two 3x3 convolutions (as Dense over patches) with 2x2 average pooling, then a linear head."""

    channels: tuple = (8, 16)
    classes: int = 10

    @nn.compact
    def __call__(self, x, features=False):
        x = x.reshape(8, 8, 1)
        for c in self.channels:
            x = _avgpool2(nn.relu(nn.Dense(c)(_patches(x))))
        x = x.reshape(-1)
        if features:
            return x
        return nn.Dense(self.classes)(x)


class Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):  # x [T, d]
        t = x.shape[0]
        h = nn.LayerNorm(use_bias=False, use_scale=False)(x)
        q = nn.Dense(self.dim, name="query")(h).reshape(t, self.heads, -1)
        k = nn.Dense(self.dim, name="key")(h).reshape(t, self.heads, -1)
        v = nn.Dense(self.dim, name="value")(h).reshape(t, self.heads, -1)
        att = jnp.einsum("thd,shd->hts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        o = jnp.einsum("hts,shd->thd", jax.nn.softmax(att, axis=-1), v).reshape(t, -1)
        x = x + nn.Dense(self.dim, name="out")(o)
        h = nn.LayerNorm(use_bias=False, use_scale=False)(x)
        h = nn.Dense(4 * self.dim, name="mlp_in")(h)
        return x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(h))


class ByteLM(nn.Module):
    """One-block byte-level causal transformer; input ``[T]`` bytes, output ``[T, 256]`` logits."""

    dim: int = 32
    heads: int = 2
    layers: int = 1
    max_len: int = 64

    @nn.compact
    def __call__(self, tokens, features=False):
        t = tokens.shape[0]
        x = (
            nn.Embed(256, self.dim)(tokens)
            + self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.dim))[:t]
        )
        for i in range(self.layers):
            x = Block(self.dim, self.heads, name=f"block_{i}")(x)
        x = nn.LayerNorm(use_bias=False, use_scale=False)(x)
        if features:
            return x.mean(0)
        return nn.Dense(256, name="head")(x)


# ---------------------------------------------------------------------------------------------
# Training on weighted subsets.


def _make_train_fn(model, x, y, example_loss, optimizer, steps, batch_size):
    n = x.shape[0]
    batch_loss = jax.vmap(example_loss, in_axes=(None, 0))

    def train_fn(params, weights, key):
        p = weights / jnp.sum(weights)
        opt_state = optimizer.init(params)

        def step(carry, k):
            params, opt_state = carry
            idx = jax.random.choice(k, n, (batch_size,), p=p)
            g = jax.grad(lambda q: batch_loss(q, (x[idx], y[idx])).mean())(params)
            upd, opt_state = optimizer.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
        return params

    return train_fn


def _margin(logits, y):
    """Correct logit minus logsumexp of the others (TRAK's margin); > 0 iff correctly classified
    with probability > 1/2 against the rest."""
    other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return logits[y] - jax.nn.logsumexp(other)


# ---------------------------------------------------------------------------------------------
# Tasks.


def load_digits_split(n_train: int = 1000, n_test: int = 200, *, seed: int = 0, flip: int = 0):
    """Digits as float32 in [0, 1]; returns x_tr, y_tr, x_te, y_te, flipped-index array."""
    x, y = common.load_digits()
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test must be <= {len(x)}, got {n_train + n_test}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    y_tr = y[tr].copy()
    flipped = (
        np.sort(rng.choice(n_train, size=flip, replace=False)) if flip else np.zeros(0, np.int64)
    )
    y_tr[flipped] = (y_tr[flipped] + rng.integers(1, 10, size=flip)) % 10  # always a wrong label
    return x[tr], y_tr, x[te], y[te], flipped


def digits_task(
    arch: str = "mlp",
    *,
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    flip: int = 0,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.05,
) -> Task:
    """Digits classification with an MLP (``arch='mlp'``) or the patch CNN (``'cnn'``).

    SGD with momentum 0.9 and weight decay 1e-3 (thesis table C.1 style).
    """
    x_tr, y_tr, x_te, y_te, flipped = load_digits_split(n_train, n_test, seed=seed, flip=flip)
    model = {"mlp": MLP(), "cnn": CNN()}.get(arch)
    if model is None:
        raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
    x_tr, y_tr, x_te, y_te = map(jnp.asarray, (x_tr, y_tr, x_te, y_te))

    def out_loss(logits, y):
        return -jax.nn.log_softmax(logits)[y]

    def example_loss(params, ex):
        return out_loss(model.apply({"params": params}, ex[0]), ex[1])

    def init_fn(key):
        return model.init(key, x_tr[0])["params"]

    opt = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=0.9))
    train_fn = _make_train_fn(model, x_tr, y_tr, example_loss, opt, steps, batch_size)

    def output_fn(params):
        logits = jax.vmap(lambda x: model.apply({"params": params}, x))(x_te)
        return jax.vmap(_margin)(logits, y_te)

    def features_fn(params, x):
        return jax.vmap(lambda v: model.apply({"params": params}, v, features=True))(x)

    return Task(
        model,
        x_tr,
        y_tr,
        x_te,
        y_te,
        init_fn,
        train_fn,
        output_fn,
        example_loss,
        out_loss,
        features_fn,
        {"arch": arch, "flipped": flipped, "steps": steps, "batch_size": batch_size},
    )


def pydoc_paragraphs(min_len: int) -> list[bytes]:
    """Paragraphs (blank-line separated) of ``pydoc_data.topics`` with at least ``min_len`` bytes."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            b = " ".join(p.split()).encode("utf-8", "replace")
            if len(b) >= min_len:
                paras.append(b)
    seen, out = set(), []
    for p in paras:  # duplicates would make attribution ambiguous
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def lm_task(
    *,
    n_train: int = 256,
    n_test: int = 32,
    seq_len: int = 32,
    dim: int = 32,
    seed: int = 0,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
) -> Task:
    """Byte-level LM: each training example is the first ``seq_len + 1`` bytes of a paragraph."""
    paras = pydoc_paragraphs(seq_len + 1)
    if n_train + n_test > len(paras):
        raise ValueError(
            f"n_train + n_test must be <= {len(paras)} paragraphs, got {n_train + n_test}"
        )
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(paras))[: n_train + n_test]
    seqs = np.stack([np.frombuffer(paras[i][: seq_len + 1], np.uint8) for i in pick]).astype(
        np.int32
    )
    x = jnp.asarray(seqs)
    x_tr, x_te = x[:n_train], x[n_train:]
    model = ByteLM(dim=dim, max_len=seq_len)

    def out_loss(logits, tokens):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=1))

    def example_loss(params, ex):
        return out_loss(model.apply({"params": params}, ex[0][:-1]), ex[0])

    def init_fn(key):
        return model.init(key, x_tr[0, :-1])["params"]

    opt = optax.adamw(lr, weight_decay=1e-2)
    train_fn = _make_train_fn(
        model, x_tr, x_tr, lambda p, ex: example_loss(p, (ex[0],)), opt, steps, batch_size
    )

    def output_fn(params):
        return -jax.vmap(lambda s: example_loss(params, (s,)))(x_te)

    def features_fn(params, xs):
        return jax.vmap(lambda s: model.apply({"params": params}, s[:-1], features=True))(xs)

    return Task(
        model,
        x_tr,
        x_tr,
        x_te,
        x_te,
        init_fn,
        train_fn,
        output_fn,
        lambda p, ex: example_loss(p, (ex[0],)),
        out_loss,
        features_fn,
        {
            "arch": "bytelm",
            "texts": [paras[i] for i in pick],
            "steps": steps,
            "batch_size": batch_size,
        },
    )
