"""A Llama-style decoder LM in Flax NNX with its blocks under ``nnx.scan``, and its byte data.

The model is written the way JAX LMs are written in practice (MaxText, Gemma): RMSNorm, rotary
attention with grouped key/value heads, a SwiGLU MLP, a tied or untied read-out, and one set of
block parameters stacked on a leading axis and run by ``nnx.scan``. jaxinf captures every
``nnx.Linear`` of the stack as its own logged layer (``blocks/attn/q[0]`` ...).

Configurations (:data:`CONFIGS`): ``"tiny"`` (tests, float64-ready), ``"small"`` (byte LM on
``pydoc_data.topics``, CPU minutes) and ``"134m"`` (12 layers, width 768, 12 heads, MLP 2048,
vocabulary 32000, sequence 512: 134M parameters untied, 85 linear layers), for a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "generate_bytes",
    "llama_config",
    "llama_loss",
    "pydoc_byte_batch",
    "token_mask",
    "train_llama",
]


class LlamaConfig(NamedTuple):
    """Shape of a :class:`Llama` model."""

    vocab: int = 256
    width: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention: each K/V head serves heads // kv_heads queries
    mlp: int = 128
    seq: int = 64
    tied: bool = False  # read-out by the embedding's transpose (``Embed.attend``)
    rope_base: float = 10000.0
    dtype: str = "float32"  # compute dtype (parameters stay in param_dtype)
    param_dtype: str = "float32"


CONFIGS = {
    "tiny": LlamaConfig(vocab=11, width=8, layers=2, heads=2, kv_heads=1, mlp=12, seq=6),
    "small": LlamaConfig(vocab=256, width=64, layers=2, heads=4, kv_heads=2, mlp=128, seq=64),
    "134m": LlamaConfig(
        vocab=32000, width=768, layers=12, heads=12, kv_heads=12, mlp=2048, seq=512
    ),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """The named configuration of :data:`CONFIGS`, with fields replaced by ``overrides``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown Llama config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]._replace(**overrides)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of ``x [..., T, heads, head_dim]`` (half-split rotation)."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq  # [T, half]
    cos = jnp.cos(angle)[:, None].astype(x.dtype)  # [T, 1, half]
    sin = jnp.sin(angle)[:, None].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        if cfg.width % cfg.heads or cfg.heads % cfg.kv_heads:
            raise ValueError(
                f"width {cfg.width} must divide by heads {cfg.heads}, and heads by "
                f"kv_heads {cfg.kv_heads}"
            )
        self.cfg = cfg
        hd = cfg.width // cfg.heads
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = nnx.Linear(cfg.width, cfg.heads * hd, **kw)
        self.k = nnx.Linear(cfg.width, cfg.kv_heads * hd, **kw)
        self.v = nnx.Linear(cfg.width, cfg.kv_heads * hd, **kw)
        self.o = nnx.Linear(cfg.heads * hd, cfg.width, **kw)

    def __call__(self, x):  # x [b, T, width]
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.width // cfg.heads
        pos = jnp.arange(t)
        q = rope(self.q(x).reshape(b, t, cfg.heads, hd), pos, cfg.rope_base)
        k = rope(self.k(x).reshape(b, t, cfg.kv_heads, hd), pos, cfg.rope_base)
        v = self.v(x).reshape(b, t, cfg.kv_heads, hd)
        # Causal only: with right padding, real queries never see padded keys.
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.reshape(b, t, cfg.heads * hd))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate = nnx.Linear(cfg.width, cfg.mlp, **kw)
        self.up = nnx.Linear(cfg.width, cfg.mlp, **kw)
        self.down = nnx.Linear(cfg.mlp, cfg.width, **kw)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(cfg.width, **kw)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.width, **kw)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """Decoder-only LM: ``ids [b, T] -> logits [b, T, vocab]``, blocks run by ``nnx.scan``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxinf.examples import Llama, llama_config
      >>> model = Llama(llama_config("tiny"), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 6), jnp.int32)).shape
      (2, 6, 11)
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.embed = nnx.Embed(cfg.vocab, cfg.width, **kw)

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(r):
            return Block(cfg, r)

        self.blocks = blocks(rngs)
        self.norm = nnx.RMSNorm(cfg.width, **kw)
        if not cfg.tied:
            self.head = nnx.Linear(cfg.width, cfg.vocab, use_bias=False, **kw)

    def __call__(self, ids):
        x = self.embed(ids)

        def body(x, block):
            return block(x)

        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        x = self.norm(x)
        logits = self.embed.attend(x) if self.cfg.tied else self.head(x)
        return logits.astype(jnp.float32)


def llama_loss(model: Llama, batch) -> jax.Array:
    """Mean next-token cross-entropy over the real tokens of ``batch = {"ids", "mask"}``.

    On a one-example batch this is that example's loss (the capture's convention).
    """
    logits = model(batch["ids"])[:, :-1]
    w = (batch["mask"][:, 1:] * batch["mask"][:, :-1]).astype(logits.dtype)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:])
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def token_mask(batch) -> jax.Array:
    """The ``mask_fn`` for capture: ``batch["mask"]`` (1 real token, 0 padding)."""
    return batch["mask"]


def pydoc_byte_batch(seq: int, *, min_len: int = 40, limit: int | None = None):
    """Paragraphs of ``pydoc_data.topics`` as bytes (vocabulary 256), right-padded to ``seq``.

    Returns:
      ``(batch, texts)``: ``batch = {"ids": int32 [n, seq], "mask": int32 [n, seq]}`` (paragraphs
      longer than ``seq`` are cut) and the paragraph texts, in id order.
    """
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para.encode()) >= min_len:
                texts.append(para)
    texts = sorted(set(texts))  # some topics repeat paragraphs
    if limit is not None:
        texts = texts[:limit]
    ids = np.zeros((len(texts), seq), np.int32)
    mask = np.zeros((len(texts), seq), np.int32)
    for i, s in enumerate(texts):
        b = np.frombuffer(s.encode()[:seq], np.uint8)
        ids[i, : len(b)] = b
        mask[i, : len(b)] = 1
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}, texts


def train_llama(
    model: Llama, data, *, steps: int, batch_size: int, lr: float = 3e-3, seed: int = 0
):
    """Adam on random minibatches of ``data`` (in place on ``model``); returns the losses."""
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(llama_loss)(model, batch)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    n = data["ids"].shape[0]
    losses = []
    for _ in range(steps):
        idx = rng.choice(n, size=batch_size, replace=False)
        losses.append(float(step(model, opt, jax.tree.map(lambda v: v[idx], data))))
    return losses


def generate_bytes(model: Llama, prompt: bytes, n_new: int) -> bytes:
    """Greedy continuation of ``prompt`` by ``n_new`` bytes (window of the model's ``seq``)."""
    seq = model.cfg.seq

    @nnx.jit
    def next_id(model, ids, last):
        return jnp.argmax(model(ids)[0, last])

    out = list(prompt)
    for _ in range(n_new):
        window = out[-seq:]
        ids = np.zeros((1, seq), np.int32)
        ids[0, : len(window)] = window
        out.append(int(next_id(model, jnp.asarray(ids), len(window) - 1)))
    return bytes(out)
