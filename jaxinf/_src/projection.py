"""LoGra projections: a Kronecker-factored projection ``P = P_in ⊗ P_out`` per layer.

For a layer whose per-example weight gradient is ``G = sum_t a_t d_t^T`` (``a_t`` the input of
token ``t`` with ``n_in`` features, ``d_t`` the gradient of the loss with respect to the layer
output, ``n_out`` features), LoGra (thesis 4.3.1, eq. 4.6) stores the ``[k_out, k_in]`` matrix

    P_out G^T P_in^T = sum_t (P_out d_t) (P_in a_t)^T,

computed from the projected activations, so the ``n_out x n_in`` gradient is never formed.

Weight layout convention (shared by Linen and NNX layers): the gradient matrix ``G`` of a layer
is ``kernel_grad.reshape(-1, n_out)`` (Dense/Linear ``[n_in, n_out]``, DenseGeneral kernels
``[*contracted_axes, *features]``, Einsum kernels transposed to (contracted axes in kernel
order, feature axes in output order), Conv kernels ``[*window, c_in, c_out]`` i.e. the patch features
ordered ``(window..., c_in)``, Embed tables ``[vocab, features]``). **Bias**: when a layer has a
bias, a constant-1 input feature is appended as the *last* input feature, so ``n_in`` counts it
and row ``n_in - 1`` of ``G`` is the bias gradient. Embeddings have no bias.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class Projection(NamedTuple):
    """The two factors of one layer's LoGra projection."""

    p_in: jax.Array  # [k_in, n_in]: projects layer inputs (bias feature last, if any)
    p_out: jax.Array  # [k_out, n_out]: projects gradients w.r.t. layer outputs


def _layer_key(key: jax.Array, path: str) -> jax.Array:
    # crc32 is stable across processes (Python's hash() is salted).
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _resolve_k(path: str, name: str, k_layer, k_default, n: int, clip: bool) -> int:
    k = k_layer if k_layer is not None else k_default
    if k is None:
        raise ValueError(
            f"layer {path!r}: no {name} given (pass {name}=... or set it in the Select rule)"
        )
    k = int(k)
    if k < 1:
        raise ValueError(f"layer {path!r}: {name}={k} must be >= 1")
    if k > n:
        if clip:  # a projection wider than the layer only adds dependent rows
            return n
        side = "input" if name == "k_in" else "output"
        raise ValueError(
            f"layer {path!r}: projection {name}={k} is larger than the layer's {side} size {n} "
            "(clip_k=True clips it to the layer)"
        )
    return k


def random_projections(
    layers: Mapping[str, Any],
    *,
    key: jax.Array,
    k_in: int | None = None,
    k_out: int | None = None,
    dtype=jnp.float32,
    clip_k: bool = True,
) -> dict[str, Projection]:
    """Gaussian LoGra projections, one per layer, derived from ``key`` and the layer path.

    Entries are i.i.d. ``N(0, 1/k)`` so that ``E ||P x||^2 = ||x||^2`` (Johnson–Lindenstrauss
    scaling). The key of a layer is ``fold_in(key, crc32(path))``: adding or removing other
    layers never changes a layer's projection.

    Args:
      layers: ``{path: LayerSpec}`` from :func:`find_layers` (anything with ``n_in``, ``n_out``
        and optional ``k_in``/``k_out`` attributes).
      key: a ``jax.random`` key.
      k_in, k_out: default projection sizes; a layer's own ``k_in``/``k_out`` (set by its
        :class:`Select` rule) take precedence.
      dtype: dtype of the projection matrices.
      clip_k: clip a size larger than the layer to the layer's size (``k_out=16`` on a
        10-class head gives ``k_out=10``); ``False`` raises instead.

    Returns:
      ``{path: Projection(p_in [k_in, n_in], p_out [k_out, n_out])}``.
    """
    sizes = {}
    for path, spec in layers.items():
        ki = _resolve_k(path, "k_in", getattr(spec, "k_in", None), k_in, spec.n_in, clip_k)
        ko = _resolve_k(path, "k_out", getattr(spec, "k_out", None), k_out, spec.n_out, clip_k)
        sizes[path] = ((ki, spec.n_in), (ko, spec.n_out))
    return dict(_random_projections(key, tuple(sizes.items()), jnp.dtype(dtype)))


@partial(jax.jit, static_argnums=(1, 2))
def _random_projections(key, sizes, dtype):
    # One compiled program for all layers (eager random ops would compile once per shape).
    out = {}
    for path, (shape_in, shape_out) in sizes:
        kin_key, kout_key = jax.random.split(_layer_key(key, path))
        p_in = jax.random.normal(kin_key, shape_in, dtype) / np.sqrt(shape_in[0])
        p_out = jax.random.normal(kout_key, shape_out, dtype) / np.sqrt(shape_out[0])
        out[path] = Projection(p_in, p_out)
    return out


@partial(jax.jit, static_argnums=1)
def top_eigenvectors(cov: ArrayLike, k: int) -> jax.Array:
    """Rows = the ``k`` eigenvectors of the symmetric ``cov`` with the largest eigenvalues.

    Signs are fixed so that each vector's largest-magnitude entry is positive.
    """
    cov = jnp.asarray(cov)
    _, vecs = jnp.linalg.eigh((cov + cov.T) / 2)  # ascending eigenvalues
    top = vecs[:, ::-1][:, :k].T  # [k, n]
    pivot = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=1)[:, None], axis=1)
    return top * jnp.where(pivot < 0, -1, 1).astype(top.dtype)


def pca_projections(
    factors: Mapping[str, Any],
    *,
    k_in: int | None = None,
    k_out: int | None = None,
    layers: Mapping[str, Any] | None = None,
    dtype=jnp.float32,
    clip_k: bool = True,
) -> dict[str, Projection]:
    """LoGra-PCA projections: top eigenvectors of each layer's KFAC factors (thesis 4.3.2).

    ``P_in`` holds the top-``k_in`` eigenvectors of the forward factor ``C_F = E[a a^T]`` and
    ``P_out`` the top-``k_out`` eigenvectors of the backward factor ``C_B = E[d d^T]``, so
    ``P_in ⊗ P_out`` spans the largest components of ``H_KFAC = C_F ⊗ C_B``.

    Args:
      factors: ``{path: KFACFactors}`` from ``kfac_factors(...).finalize``.
      k_in, k_out: default sizes; per-layer sizes from ``layers[path].k_in/k_out`` win.
      layers: optional ``{path: LayerSpec}`` carrying per-layer sizes.
      dtype: dtype of the projection matrices.
      clip_k: clip sizes larger than the layer to the layer's size; ``False`` raises.
    """
    out = {}
    for path, f in factors.items():
        spec = layers[path] if layers is not None else None
        n_in, n_out = f.forward.shape[0], f.backward.shape[0]
        ki = _resolve_k(path, "k_in", getattr(spec, "k_in", None), k_in, n_in, clip_k)
        ko = _resolve_k(path, "k_out", getattr(spec, "k_out", None), k_out, n_out, clip_k)
        out[path] = Projection(
            top_eigenvectors(f.forward, ki).astype(dtype),
            top_eigenvectors(f.backward, ko).astype(dtype),
        )
    return out


def gradient_matrix(kernel_grad: ArrayLike, bias_grad: ArrayLike | None = None) -> jax.Array:
    """A layer's weight gradient as the ``[n_in, n_out]`` matrix ``G`` LoGra projects.

    ``kernel_grad`` is reshaped to ``[-1, n_out]`` (``n_out`` = the product of the bias shape,
    or the last kernel axis for Conv/Dense/Embed when there is no bias; for a DenseGeneral
    without bias pass the kernel already reshaped). The bias gradient becomes the last row.
    """
    kernel_grad = jnp.asarray(kernel_grad)
    if bias_grad is None:
        return kernel_grad.reshape(-1, kernel_grad.shape[-1])
    bias_grad = jnp.asarray(bias_grad).reshape(1, -1)
    return jnp.concatenate([kernel_grad.reshape(-1, bias_grad.shape[1]), bias_grad], axis=0)


def project_gradient(projection: Projection, grad_matrix: ArrayLike) -> jax.Array:
    """``P_out G^T P_in^T`` (= ``(P_in ⊗ P_out) vec(G)`` reshaped) for a full ``G [n_in, n_out]``.

    This is the reference the memory-efficient capture is tested against; it forms the full
    gradient, so use it only for checks. A leading batch axis on ``grad_matrix`` is mapped over.
    """
    g = jnp.asarray(grad_matrix)
    return jnp.einsum("oj,...ij,ki->...ok", projection.p_out, g, projection.p_in)


def projection_metadata(
    projections: Mapping[str, Projection], *, init: str, seed: int | None = None, **extra
) -> dict:
    """JSON-able description of a set of projections (the store's compatibility record).

    Args:
      projections: ``{path: Projection}``.
      init: ``"random"`` or ``"pca"``.
      seed: the integer seed the random projections were made from (``None`` for PCA).
      **extra: further JSON-able entries (e.g. ``model="..."``) copied into the dict.

    Returns:
      ``{"layers": {path: {"k_in", "k_out", "n_in", "n_out"}}, "init", "seed", "dtype",
      "fingerprint", **extra}``; ``fingerprint`` is a SHA-256 over the layer paths, shapes and
      the projection matrices' bytes, so two logs made with different projections never match.
    """
    if init not in ("random", "pca"):
        raise ValueError(f"init must be 'random' or 'pca', got {init!r}")
    h = hashlib.sha256()
    layers = {}
    dtypes = set()
    for path in sorted(projections):
        p = projections[path]
        p_in, p_out = np.asarray(p.p_in), np.asarray(p.p_out)
        layers[path] = {
            "k_in": int(p_in.shape[0]),
            "k_out": int(p_out.shape[0]),
            "n_in": int(p_in.shape[1]),
            "n_out": int(p_out.shape[1]),
        }
        dtypes.add(str(p_in.dtype))
        h.update(path.encode())
        for m in (p_in, p_out):
            h.update(str(m.shape).encode() + str(m.dtype).encode())
            h.update(np.ascontiguousarray(m).tobytes())
    meta = {
        "layers": layers,
        "init": init,
        "seed": None if seed is None else int(seed),
        "dtype": ",".join(sorted(dtypes)),
        "fingerprint": h.hexdigest(),
    }
    meta.update(extra)
    return meta
