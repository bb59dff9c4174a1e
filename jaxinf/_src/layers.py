"""Layer descriptions for capture: what a layer call is, and its inputs as features.

A captured layer call is summarised by a static :class:`_Config` (kind, feature counts, token
axes, how to lay out inputs and outputs); :func:`_input_features` and :func:`_project_inputs`
turn the call's input into the ``[tokens, n_in]`` features (bias feature last) or their
projections, following the weight layout of :mod:`jaxinf._src.projection`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class LayerSpec(NamedTuple):
    """A captured layer, as found by :func:`find_layers`."""

    path: str  # '/'-joined module path, the key of all per-layer results
    kind: str  # 'dense' | 'conv' | 'embed'
    type_name: str  # the Flax class name, e.g. 'Dense', 'LinearGeneral'
    n_in: int  # input features (+1 for the bias feature)
    n_out: int  # output features
    bias: bool  # whether a constant-1 input feature stands for the bias
    tokens: int  # tokens per example at discovery (sequence positions / patches; 1 for MLPs)
    k_in: int | None = None  # projection sizes requested by the Select rule, if any
    k_out: int | None = None
    # For one layer of a stack (nn.scan / nnx.scan / vmap over stacked parameters):
    # (stack path, index, stack length, stacking axis of the parameters); None otherwise.
    stack: tuple | None = None


def stack_path(path: str, index: int) -> str:
    """The name of layer ``index`` of the stack at ``path``: ``"blocks/Dense_0[3]"``."""
    return f"{path}[{index}]"


_STACK_NAME = re.compile(r"^(.*)\[(\d+)\]$")


def split_stack_path(name: str):
    """``(stack path, index)`` for a name made by :func:`stack_path`, else ``(name, None)``."""
    m = _STACK_NAME.match(name)
    return (name, None) if m is None else (m.group(1), int(m.group(2)))


READOUT_SUFFIX = ".attend"


def readout_path(path: str) -> str:
    """The logged name of the tied read-out ``Embed.attend`` of the embedding at ``path``."""
    return path + READOUT_SUFFIX


def _check_layer(path, cfg: _Config, n_in: int, n_out: int, what: str):
    if (cfg.n_in, cfg.n_out) != (n_in, n_out):
        raise ValueError(
            f"layer {path!r}: {what} has (n_in, n_out) = {(n_in, n_out)} but the layer is "
            f"called with (n_in, n_out) = {(cfg.n_in, cfg.n_out)}"
        )


class Select(NamedTuple):
    """One layer-selection rule: a layer is selected if it matches both fields.

    Attributes:
      types: Flax classes (``nn.Dense``, ``nnx.Linear``, ``nn.Einsum``, ...; matched with
        ``isinstance``) or kind names ``'dense'`` (Einsum included), ``'conv'``, ``'embed'``.
        Empty: every supported layer.
      pattern: a regular expression that must ``re.fullmatch`` the layer path. ``None``: any.
      k_in, k_out: projection sizes for the layers this rule selects (override the defaults
        passed to :func:`random_projections` / :func:`pca_projections`).
    """

    types: tuple = ()
    pattern: str | None = None
    k_in: int | None = None
    k_out: int | None = None


class _Config(NamedTuple):
    """Static description of one layer call, enough to compute its inputs' features."""

    kind: str
    n_in0: int  # input features without the bias feature
    n_out: int
    bias: bool
    tok_shape: tuple  # per-call token axes (includes the leading size-1 example axis)
    axes: tuple = ()  # dense: contracted input axes (non-negative; kernel order)
    out_perm: tuple | None = None  # dense (Einsum): output transpose to (tokens..., features...)
    conv: tuple = ()  # conv: (window, strides, padding, lhs_dilation, rhs_dilation)

    @property
    def n_in(self) -> int:
        return self.n_in0 + int(self.bias)


_LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
_NNX_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


class UncapturedLayerWarning(UserWarning):
    """A layer the loss uses is not captured (see :func:`find_layers`)."""


def _einsum_config(path: str, module, x, y, einsum_str) -> _Config:
    """An ``Einsum`` call of dense-projection form as a dense _Config; ValueError otherwise."""
    import opt_einsum

    if einsum_str is None:
        einsum_str = module.einsum_str
    if einsum_str is None:
        raise ValueError(f"layer {path!r}: Einsum called without an einsum_str")
    kshape = tuple(module.shape if isinstance(module, nn.Einsum) else module.kernel_shape)
    ops, out, _ = opt_einsum.parser.parse_einsum_input(
        (
            einsum_str.replace(" ", ""),
            jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32),
            jax.ShapeDtypeStruct(kshape, jnp.float32),
        )
    )
    lhs, rhs = ops.split(",")
    bad = f"layer {path!r}: Einsum {einsum_str!r} is not a dense projection"
    if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(set(out)) != len(out):
        raise ValueError(f"{bad} (a repeated index)")
    for c in rhs:
        if c in lhs and c in out:
            raise ValueError(
                f"{bad}: kernel axis {c!r} is also an input and output axis "
                "(per-group weights), not supported by capture"
            )
        if c not in lhs and c not in out:
            raise ValueError(f"{bad}: kernel axis {c!r} is summed over")
    for c in lhs:
        if c not in rhs and c not in out:
            raise ValueError(f"{bad}: input axis {c!r} is summed over")
    contracted = [c for c in rhs if c in lhs]
    if not contracted:
        raise ValueError(f"{bad}: no input axis is contracted with the kernel")
    feats = [c for c in out if c in rhs]
    toks = [c for c in lhs if c in out]
    axes = tuple(lhs.index(c) for c in contracted)
    perm = tuple(out.index(c) for c in toks + feats)
    n_in0 = int(np.prod([x.shape[a] for a in axes]))
    n_out = int(np.prod([y.shape[out.index(c)] for c in feats]))
    tok = tuple(x.shape[lhs.index(c)] for c in toks)
    use_bias = module.use_bias if isinstance(module, nn.Einsum) else module.bias is not None
    return _Config(
        "dense",
        n_in0,
        n_out,
        bool(use_bias),
        tok,
        axes=axes,
        out_perm=None if perm == tuple(range(len(out))) else perm,
    )


_KINDS = ("dense", "conv", "embed")


def _normalize_axes(axis, ndim) -> tuple:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _tuple(v, n, default=1) -> tuple:
    if v is None:
        return (default,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(v)


def _conv_padding(path, padding, n):
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID", "SAME_LOWER"):
            return padding.upper()
        raise ValueError(f"layer {path!r}: Conv padding {padding!r} is not supported by capture")
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pads = tuple(padding)
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


def _config(path: str, module, x, y, einsum_str=None, readout=False) -> _Config:
    """The static _Config of a layer call; raises ValueError for unsupported configurations.

    ``readout=True``: an ``Embed.attend`` call, ``y = x @ embedding.T``, taken as a dense layer
    from the last axis of ``x`` to the ``num_embeddings`` logits (kernel ``embedding.T``).
    """
    name = type(module).__name__
    if readout:
        tok = tuple(x.shape[:-1])
        return _Config("dense", x.shape[-1], y.shape[-1], False, tok, axes=(x.ndim - 1,))
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
        return _einsum_config(path, module, x, y, einsum_str)
    if isinstance(module, (nn.Embed, nnx.Embed)):
        return _Config("embed", module.num_embeddings, y.shape[-1], False, tuple(x.shape))
    if isinstance(module, (nn.Conv, nnx.Conv)):
        if module.feature_group_count != 1:
            raise ValueError(f"layer {path!r}: grouped Conv (feature_group_count != 1) unsupported")
        if getattr(module, "mask", None) is not None:
            raise ValueError(f"layer {path!r}: masked Conv kernels are not supported by capture")
        ks = _tuple(module.kernel_size, 1)
        nd = len(ks)
        if x.ndim != nd + 2:
            raise ValueError(
                f"layer {path!r}: Conv input must be [batch, *spatial, channels] with "
                f"{nd} spatial axes, got shape {tuple(x.shape)}"
            )
        conv = (
            ks,
            _tuple(module.strides, nd),
            _conv_padding(path, module.padding, nd),
            _tuple(module.input_dilation, nd),
            _tuple(module.kernel_dilation, nd),
        )
        n_in0 = int(np.prod(ks)) * x.shape[-1]
        return _Config(
            "conv", n_in0, y.shape[-1], bool(module.use_bias), tuple(y.shape[:-1]), conv=conv
        )
    if isinstance(module, (nn.Dense, nnx.Linear)):
        axes = (x.ndim - 1,)
        n_feat = 1
    elif isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"layer {path!r}: DenseGeneral with batch_dims is not supported")
        axes = _normalize_axes(module.axis, x.ndim)
        n_feat = 1 if isinstance(module.features, int) else len(module.features)
    elif isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(f"layer {path!r}: LinearGeneral with batch_axis is not supported")
        axes = _normalize_axes(module.axis, x.ndim)
        n_feat = len(module.out_features)
    else:  # pragma: no cover - callers only pass _LINEN_TYPES / _NNX_TYPES
        raise TypeError(f"layer {path!r}: unsupported layer type {name}")
    n_in0 = int(np.prod([x.shape[a] for a in axes]))
    n_out = int(np.prod(y.shape[y.ndim - n_feat :]))
    tok = tuple(x.shape[a] for a in range(x.ndim) if a not in axes)
    return _Config("dense", n_in0, n_out, bool(module.use_bias), tok, axes=axes)


def _kind_of(module) -> str:
    if isinstance(module, (nn.Embed, nnx.Embed)):
        return "embed"
    if isinstance(module, (nn.Conv, nnx.Conv)):
        return "conv"
    return "dense"


# Inputs of a layer call: full features (for statistics / references) and projected features


def _conv_dims(nd):
    spatial = "HWD"[:nd] if nd <= 3 else None
    if spatial is None:
        raise ValueError("Conv with more than 3 spatial dimensions is not supported by capture")
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _input_features(cfg: _Config, x) -> jax.Array:
    """``[tokens, n_in]`` input features of one layer call (bias feature last)."""
    if cfg.kind == "embed":
        a = jax.nn.one_hot(x.reshape(-1), cfg.n_in0, dtype=jnp.float32)
    elif cfg.kind == "conv":
        ks, strides, padding, lhs_d, rhs_d = cfg.conv
        nd = len(ks)
        p = jax.lax.conv_general_dilated_patches(
            x, ks, strides, padding, lhs_d, rhs_d, dimension_numbers=_conv_dims(nd)
        )  # [1, *out_spatial, C*prod(ks)], features ordered (C, *window)
        c = x.shape[-1]
        p = p.reshape(-1, c, *ks)
        a = jnp.moveaxis(p, 1, -1).reshape(-1, cfg.n_in0)  # -> (*window, C), the kernel's order
    else:
        others = [ax for ax in range(x.ndim) if ax not in cfg.axes]
        a = jnp.transpose(x, others + list(cfg.axes)).reshape(-1, cfg.n_in0)
    if cfg.bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return a


def _project_inputs(cfg: _Config, x, p_in) -> jax.Array:
    """``[tokens, k_in]`` = ``a_t @ p_in.T`` for every token, without forming patches/one-hots."""
    w = p_in[:, : cfg.n_in0]  # [k_in, n_in0]
    k = p_in.shape[0]
    if cfg.kind == "embed":
        pa = jnp.take(w.T, x.reshape(-1), axis=0)
    elif cfg.kind == "conv":
        ks, strides, padding, lhs_d, rhs_d = cfg.conv
        kernel = w.T.reshape(*ks, x.shape[-1], k)  # [*window, C, k_in], same layout as the layer
        pa = jax.lax.conv_general_dilated(
            x.astype(w.dtype),
            kernel,
            strides,
            padding,
            lhs_d,
            rhs_d,
            dimension_numbers=_conv_dims(len(ks)),
        ).reshape(-1, k)
    else:
        wk = w.T.reshape(*[x.shape[a] for a in cfg.axes], k)
        pa = jnp.tensordot(x.astype(w.dtype), wk, axes=(cfg.axes, tuple(range(len(cfg.axes)))))
        pa = pa.reshape(-1, k)
    if cfg.bias:
        pa = pa + p_in[:, cfg.n_in0]
    return pa


def _token_mask(cfg: _Config, mask) -> jax.Array | None:
    """``[tokens]`` mask for this layer call, or None when the mask does not fit its tokens."""
    if mask is None:
        return None
    if cfg.tok_shape[: mask.ndim] != tuple(mask.shape):
        # Inputs without the example axis (e.g. a positional Embed of arange(T)) get the mask
        # of the one example being processed.
        if cfg.tok_shape[: mask.ndim - 1] != tuple(mask.shape[1:]):
            return None
        mask = mask[0]
    m = mask.reshape(mask.shape + (1,) * (len(cfg.tok_shape) - mask.ndim))
    return jnp.broadcast_to(m, cfg.tok_shape).reshape(-1)


def _on_output(cfg: _Config, y, f):
    """``f`` applied to ``y`` laid out as ``(tokens..., features...)`` (Einsum outputs may not be)."""
    if cfg.out_perm is None:
        return f(y)
    inv = tuple(int(i) for i in np.argsort(cfg.out_perm))
    return jnp.transpose(f(jnp.transpose(y, cfg.out_perm)), inv)


def group_stacks(names, layers=None):
    """Split layer names into plain ones and stacks ``{stack path: (axis, [names by index])}``.

    A name belongs to a stack when its ``layers[name].stack`` says so or, without ``layers``,
    when it reads ``"path[i]"`` (the stacking axis is then taken to be 0, the axis
    ``nn.scan``/``nnx.scan``/``vmap`` use by default).
    """
    plain, stacks = [], {}
    for name in names:
        spec = None if layers is None else layers.get(name)
        if spec is not None and spec.stack is not None:
            base, j, length, axis = spec.stack
        else:
            base, j = split_stack_path(name)
            if j is None:
                plain.append(name)
                continue
            length, axis = None, 0
        stacks.setdefault(base, [axis, length, {}])[2][j] = name
    out = {}
    for base, (axis, length, idx) in stacks.items():
        length = max(idx) + 1 if length is None else length
        if sorted(idx) != list(range(length)):
            raise ValueError(
                f"stacked layer {base!r}: entries for indices {sorted(idx)} of a stack of "
                f"{length} layers; give all of them (one per slice) or none"
            )
        out[base] = (axis, [idx[j] for j in range(length)])
    return plain, out


def stacked_error(path, stacked) -> ValueError:
    return ValueError(
        f"layer {path!r} is a stack of {stacked[1]} layers (inside nn.scan/nnx.scan/vmap); "
        f"give its projections or statistics per layer, as {stack_path(path, 0)!r}, ..., "
        f"{stack_path(path, stacked[1] - 1)!r} (find_layers lists them)"
    )
