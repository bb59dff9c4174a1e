"""Per-example LoGra-projected gradients of Flax (Linen and NNX) layers, without editing the model.

How it works. The user's loss is run on one example (with a leading batch axis of size 1) while
every selected layer is *tapped*: its output ``y`` passes through an identity function with a
custom VJP that also takes the layer's projected inputs ``P_in a_t`` and a zero ``[k_out, k_in]``
"bottleneck" ``B`` (thesis Fig. 4.2). On the backward pass the tap hands back ``dy`` unchanged
(so the loss and every parameter gradient are exactly those of the plain model) and, as the
gradient of ``B``, ``sum_t (P_out d_t)(P_in a_t)^T``. ``jax.vmap(jax.grad(...))`` over the
examples, with the zero ``B``s unbatched (``in_axes=None``), returns ``[batch, k_out, k_in]`` per
layer; the full ``n_out x n_in`` per-example gradient never exists.

* Linen: ``nn.intercept_methods`` entered *inside* the traced function sees every ``__call__`` of
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed``.
* NNX: the model is rebuilt from its state inside the traced function and ``nnx.recursive_map``
  swaps each ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``, ``nnx.Embed``
  for a tapping wrapper that shares the original's Variables (the user's model object is not
  touched).

Einsum layers are captured when their equation is a dense projection: every kernel axis is
either contracted with the input (dropped from the output) or an output feature axis (absent
from the input), and every other input axis is a token axis kept in the output. Their ``G`` is
the kernel gradient transposed to (contracted axes in kernel order, feature axes in output
order), which is the bias layout, then reshaped to ``[n_in, n_out]``. Other equations (e.g. a
per-head kernel axis that is also an input and output axis) are not captured.

Never silent. Layer uses that are not captured are reported by :func:`find_layers`: with the
default selection (``select=None``) they are skipped with a :class:`UncapturedLayerWarning`
naming each layer and the reason; an explicit :class:`Select` rule matching such a layer raises
``ValueError``. This covers unsupported configurations of the types above (grouped or masked
Conv, ``DenseGeneral(batch_dims)``, non-dense Einsum equations, Linen layers inside ``nn.scan``
or ``nn.vmap`` with stacked parameters) and ``Embed.attend`` (a tied
read-out: the embedding is captured, but its projected gradient lacks the read-out's part).

Inputs by layer kind (see :mod:`jaxinf._src.projection` for the weight layout): dense-like layers
use the input's contracted axes as features and all other axes as tokens; convolutions use
patches (``P_in a_t`` is computed as a convolution with ``P_in`` reshaped to a kernel, so the
patches are never materialised); embeddings use the one-hot of the ids (``P_in a_t`` is a column
gather). A layer with a bias gets a constant-1 input feature appended last.

Masks. ``mask_fn(batch) -> [batch, *tokens]`` (1 = real token, 0 = padding). For a layer whose
per-example token axes start with the mask's axes (or with the mask's token axes, for inputs
without an example axis such as positions ``arange(T)``), masked tokens are dropped from the projected
gradient and from the KFAC statistics (and the statistics are normalised by the real-token
count). Other layers (e.g. a classifier head after pooling) are not masked.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf._src.projection import Projection, projection_metadata, random_projections

# ---------------------------------------------------------------------------------------------
# Layer descriptions


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


def _config(path: str, module, x, y, einsum_str=None) -> _Config:
    """The static _Config of a layer call; raises ValueError for unsupported configurations."""
    name = type(module).__name__
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The taps: identity on the forward pass; statistics as "gradients" of zero inputs


@jax.custom_vjp
def _logra_tap(y, pa, b, p_out):
    """Identity in ``y``; the cotangent of the zero ``b [k_out, k_in]`` is sum_t (P_out d_t)(pa_t)^T."""
    return y


def _logra_fwd(y, pa, b, p_out):
    return y, (pa, p_out, b)


def _logra_bwd(res, dy):
    pa, p_out, b = res
    d = dy.reshape(-1, p_out.shape[1]).astype(p_out.dtype)
    g = jnp.einsum("to,ko,ti->ki", d, p_out, pa.astype(p_out.dtype))
    # B = 0, so no gradient flows back into the projected inputs.
    return dy, jnp.zeros_like(pa), g.astype(b.dtype), jnp.zeros_like(p_out)


_logra_tap.defvjp(_logra_fwd, _logra_bwd)


@jax.custom_vjp
def _kfac_tap(y, a, m, s):
    """Identity in ``y``; the cotangent of ``s = (C_F, C_B, count)`` zeros is the layer's sums."""
    return y


def _kfac_fwd(y, a, m, s):
    return y, (a, m, s)


def _kfac_bwd(res, dy):
    a, m, s = res
    sf, sb, sn = s
    d = dy.reshape(-1, sb.shape[0]).astype(sb.dtype)
    # Under vmap with `s` unbatched, JAX sums a cotangent over the batch only if it is batched.
    # `a` and `m` may not depend on the example (e.g. a positional Embed of arange(T)), so tie
    # the mask to `dy`, which always does; otherwise those sums would count one example only.
    m = m.astype(sb.dtype) * (1 + 0 * d[0, 0])
    a = a.astype(sf.dtype)
    cf = jnp.einsum("ti,t,tj->ij", a, m, a)
    cb = jnp.einsum("ti,t,tj->ij", d, m, d)
    return dy, jnp.zeros_like(a), jnp.zeros_like(res[1]), (cf, cb, jnp.sum(m).astype(sn.dtype))


_kfac_tap.defvjp(_kfac_fwd, _kfac_bwd)


# ---------------------------------------------------------------------------------------------
# Framework adapters: run the user's loss with a tap on every supported layer


class Capture(NamedTuple):
    """How to run a user's loss with taps. Build with :func:`linen_capture` / :func:`nnx_capture`.

    ``run(params, batch, tap, note=None) -> loss`` calls the user's loss; every call of a
    supported layer goes through ``tap(path, module, x, y) -> y`` (Einsum calls also pass
    ``einsum_str=``, the string given at call time or ``None``); uses that are seen but not
    captured call ``note(path, module, reason, captured)``: ``captured=True`` for a use of a
    layer that is tapped elsewhere (``Embed.attend``), ``False`` for a call that is not tapped
    at all (Linen layers inside ``nn.scan``/``nn.vmap`` with stacked parameters).
    """

    framework: str
    run: Callable[[Any, Any, Callable], jax.Array]


def linen_capture(loss_fn: Callable[[Any, Any], jax.Array]) -> Capture:
    """Capture for Flax Linen: ``loss_fn(params, batch) -> scalar`` calls ``model.apply`` inside.

    ``params`` is whatever ``loss_fn`` takes (typically the ``'params'`` collection). For a
    batch with one example, ``loss_fn`` must return that example's loss (sum or mean over the
    batch axis both qualify).
    """

    def run(params, batch, tap, note=None):
        roots = []  # variables of the enclosing top-level (applied) modules

        def interceptor(next_fun, args, kwargs, context):
            if not roots and not context.module.path:  # the applied (outermost) module
                roots.append(context.module.variables)
                try:
                    return tapped(next_fun, args, kwargs, context)
                finally:
                    roots.pop()
            return tapped(next_fun, args, kwargs, context)

        def tapped(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "attend" and isinstance(module, nn.Embed):
                if note is not None:
                    note("/".join(module.path), module, _ATTEND, True)
                return next_fun(*args, **kwargs)
            if context.method_name != "__call__" or not isinstance(module, _LINEN_TYPES):
                return next_fun(*args, **kwargs)
            x = args[0] if args else kwargs["inputs"]
            y = next_fun(*args, **kwargs)
            path = "/".join(module.path)
            if roots and module.path and _stacked(module, roots[-1]):
                if note is not None:
                    note(path, module, _STACKED, False)
                return y
            if isinstance(module, nn.Einsum):
                s = args[1] if len(args) > 1 else kwargs.get("einsum_str")
                return tap(path, module, x, y, einsum_str=s)
            return tap(path, module, x, y)

        # Entered here, inside the function being traced, so it never leaks into cached traces.
        with nn.intercept_methods(interceptor):
            return loss_fn(params, batch)

    return Capture("linen", run)


def _stacked(module, root_vars) -> bool:
    """Whether ``module``'s parameters are slices of stacked ones (inside ``nn.scan``/``nn.vmap``)."""
    tree = root_vars.get("params", {})
    for name in module.path:
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    if not isinstance(tree, Mapping):
        return False
    own = module.variables.get("params", {})
    return any(
        k in tree and hasattr(tree[k], "shape") and tuple(tree[k].shape) != tuple(v.shape)
        for k, v in own.items()
    )


_STACKED = (
    "inside nn.scan/nn.vmap with stacked parameters (one projection would be shared by "
    "the stacked layers and their gradients summed); not captured"
)
_ATTEND = (
    "Embed.attend (tied read-out) is not captured: the embedding's projected gradient "
    "holds the lookup part only"
)


class _NNXTap(nnx.Module):
    """Calls the wrapped layer, then the tap. Shares the wrapped layer's Variables."""

    def __init__(self, inner, path: str, tap, note):
        self.inner = inner
        self.path = path
        self.tap = tap
        self.note = note

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        if isinstance(self.inner, nnx.Einsum):
            s = args[0] if args else kwargs.get("einsum_str")
            return self.tap(self.path, self.inner, x, y, einsum_str=s)
        return self.tap(self.path, self.inner, x, y)

    def attend(self, query):  # nnx.Embed's tied read-out: delegated, not captured
        if self.note is not None:
            self.note(self.path, self.inner, _ATTEND, True)
        return self.inner.attend(query)


def nnx_capture(loss_fn: Callable[[Any, Any], jax.Array], model: nnx.Module) -> Capture:
    """Capture for Flax NNX: ``loss_fn(model, batch) -> scalar``; ``params`` is ``nnx.state(model)``.

    The model is rebuilt from the state passed at call time (``nnx.merge``) inside the traced
    function and its supported layers are wrapped there, so the user's ``model`` object is
    never modified. State updates made by ``loss_fn`` (batch statistics, RNG counters) are
    discarded.
    """
    graphdef = nnx.graphdef(model)

    def run(state, batch, tap, note=None):
        m = nnx.merge(graphdef, state)

        def wrap(path, node):
            if isinstance(node, _NNX_TYPES):
                return _NNXTap(node, "/".join(str(p) for p in path), tap, note)
            return node

        return loss_fn(nnx.recursive_map(wrap, m), batch)

    return Capture("nnx", run)


# ---------------------------------------------------------------------------------------------
# Discovery and selection


def _first_example(batch):
    return jax.tree.map(lambda v: v[:1], batch)


def _matches(rule: Select, path: str, module, kind: str) -> bool:
    if rule.types:
        ok = False
        for t in rule.types:
            if isinstance(t, str):
                if t not in _KINDS:
                    raise ValueError(f"Select.types: unknown kind {t!r}; use one of {_KINDS}")
                ok |= t == kind
            else:
                ok |= isinstance(module, t)
        if not ok:
            return False
    return rule.pattern is None or re.fullmatch(rule.pattern, path) is not None


def find_layers(
    capture: Capture,
    params: Any,
    batch: Any,
    *,
    select: Select | Sequence[Select] | None = None,
) -> dict[str, LayerSpec]:
    """Trace the loss once (shapes only) and return the selected layers.

    Args:
      capture: from :func:`linen_capture` or :func:`nnx_capture`.
      params: the parameters ``capture`` is run with.
      batch: a batch with a leading example axis (only its first example's shapes are used).
      select: one :class:`Select` rule or several; ``None`` selects every supported layer.

    Returns:
      ``{path: LayerSpec}`` in call order.

    Raises:
      ValueError: a rule matches no layer, a layer is matched by two rules, or a layer
        matched by an explicit rule has an unsupported configuration (each message names the
        rule or layer).

    Warns:
      UncapturedLayerWarning: with ``select=None``, once per call, naming every layer of a
        supported type whose configuration is unsupported (skipped: grouped/masked Conv,
        ``DenseGeneral(batch_dims)``, Einsum equations that are not dense projections, Linen
        layers inside ``nn.scan``/``nn.vmap`` with stacked parameters); and,
        with any selection, naming every selected ``Embed`` that the loss also uses through
        ``Embed.attend`` (captured, but the read-out's part of its gradient is not).
    """
    found: dict[str, tuple] = {}
    notes: dict[str, str] = {}

    def tap(path, module, x, y, **call):
        if path not in found:
            try:
                cfg = _config(path, module, x, y, **call)
            except ValueError as e:
                cfg = e
            found[path] = (module, type(module).__name__, cfg)
        return y

    def note(path, module, reason, captured):
        if captured:
            notes.setdefault(path, reason)
        elif path not in found:
            found[path] = (module, type(module).__name__, ValueError(f"layer {path!r}: {reason}"))

    jax.eval_shape(lambda p, b: capture.run(p, b, tap, note), params, _first_example(batch))
    if not found:
        raise ValueError(
            "find_layers: the loss calls no supported layer (Dense/Linear, "
            "DenseGeneral/LinearGeneral, Einsum, Conv, Embed)"
        )

    rules = (
        [Select()] if select is None else ([select] if isinstance(select, Select) else list(select))
    )
    chosen: dict[str, tuple[int, Select]] = {}
    hits = [0] * len(rules)
    for path, (module, _type_name, _cfg) in found.items():
        kind = _kind_of(module)
        for i, rule in enumerate(rules):
            if _matches(rule, path, module, kind):
                if path in chosen:
                    raise ValueError(
                        f"layer {path!r} is selected twice: by rule {chosen[path][0]} "
                        f"{chosen[path][1]} and by rule {i} {rule}"
                    )
                chosen[path] = (i, rule)
                hits[i] += 1
    for i, (rule, n) in enumerate(zip(rules, hits)):
        if n == 0:
            raise ValueError(
                f"select rule {i} {rule} matches no layer; layers found: {sorted(found)}"
            )

    out = {}
    skipped = []
    for path, (_i, rule) in chosen.items():
        module, type_name, cfg = found[path]
        if isinstance(cfg, ValueError):
            if select is None:  # default selection: skip, and say so below
                skipped.append(f"{path!r} ({type_name}): {cfg}")
                continue
            raise cfg
        out[path] = LayerSpec(
            path,
            cfg.kind,
            type_name,
            cfg.n_in,
            cfg.n_out,
            cfg.bias,
            int(np.prod(cfg.tok_shape)),
            rule.k_in,
            rule.k_out,
        )
    partly = [f"{p!r}: {r}" for p, r in notes.items() if p in out]
    if skipped or partly:
        msg = ["find_layers: some parametrized layer uses are not captured."]
        if skipped:
            msg.append(
                "Not captured (skipped by the default selection; an explicit Select "
                "rule matching them raises): " + "; ".join(skipped) + "."
            )
        if partly:
            msg.append("Partly captured: " + "; ".join(partly) + ".")
        warnings.warn(" ".join(msg), UncapturedLayerWarning, stacklevel=2)
    if not out:
        raise ValueError(
            "find_layers: no supported layer is selected; not captured: " + "; ".join(skipped)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


def _example_fn(capture: Capture, tap_factory):
    """``f(params, state, example, mask) -> loss`` on one example (batch axis of 1 added)."""

    def f(params, state, example, mask):
        ex = jax.tree.map(lambda v: v[None], example)
        m = None if mask is None else mask[None]
        return capture.run(params, ex, tap_factory(state, m))

    return f


def _check_layer(path, cfg: _Config, n_in: int, n_out: int, what: str):
    if (cfg.n_in, cfg.n_out) != (n_in, n_out):
        raise ValueError(
            f"layer {path!r}: {what} has (n_in, n_out) = {(n_in, n_out)} but the layer is "
            f"called with (n_in, n_out) = {(cfg.n_in, cfg.n_out)}"
        )


def projected_gradients(
    capture: Capture,
    projections: Mapping[str, Projection],
    *,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    with_loss: bool = False,
) -> Callable:
    """The pure, jitted function ``(params, batch) -> {layer_path: [batch, k_out, k_in]}``.

    For example ``i`` and layer ``l`` the result is ``sum_t m_t (P_out d_t)(P_in a_t)^T``
    (thesis eq. 4.6), ``d_t`` the gradient of example ``i``'s loss w.r.t. the layer output at
    token ``t``, ``a_t`` the layer input (bias feature appended), ``m_t`` the mask. It equals
    ``project_gradient(P, G_i)`` of the full per-example weight gradient ``G_i`` without forming it.

    Args:
      capture: from :func:`linen_capture` or :func:`nnx_capture`.
      projections: ``{path: Projection}`` (their keys select the layers).
      mask_fn: ``mask_fn(batch) -> [batch, *tokens]`` of 0/1, or ``None``.
      with_loss: also return the per-example losses: ``(losses [batch], grads)``.

    Returns:
      A jitted function; calls with batches of the same shapes reuse one compilation.
    """
    projections = dict(projections)

    def tap_factory(state, mask):
        bs, projs, seen = state

        def tap(path, module, x, y, **call):
            if path not in bs:
                return y
            p = projs[path]
            cfg = _config(path, module, x, y, **call)
            _check_layer(path, cfg, p.p_in.shape[1], p.p_out.shape[1], "its projection")
            seen.add(path)
            pa = _project_inputs(cfg, jax.lax.stop_gradient(x), p.p_in)
            m = _token_mask(cfg, mask)
            if m is not None:
                pa = pa * m[:, None].astype(pa.dtype)
            return _on_output(cfg, y, lambda y: _logra_tap(y, pa, bs[path], p.p_out))

        return tap

    def per_example(params, bs, projs, example, mask):
        seen = set()  # trace-time bookkeeping only: which projected layers the loss called

        def loss(bs):
            return _example_fn(capture, tap_factory)(params, (bs, projs, seen), example, mask)

        value, grads = jax.value_and_grad(loss)(bs)
        missing = set(bs) - seen
        if missing:
            raise ValueError(f"projected layers never called by the loss: {sorted(missing)}")
        return value, grads

    @jax.jit
    def fn(params, batch, projs):
        bs = {  # the zero bottlenecks, made once, unbatched
            path: jnp.zeros((p.p_out.shape[0], p.p_in.shape[0]), p.p_out.dtype)
            for path, p in projs.items()
        }
        mask = None if mask_fn is None else mask_fn(batch)
        losses, grads = jax.vmap(per_example, in_axes=(None, None, None, 0, 0))(
            params, bs, projs, batch, mask
        )
        return (losses, grads) if with_loss else grads

    def call(params, batch):
        return fn(params, batch, projections)

    call.lower = lambda params, batch: fn.lower(params, batch, projections)
    call.jitted = fn
    return call


def kfac_batch_sums(
    capture: Capture,
    layers: Mapping[str, Any],
    *,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    dtype=jnp.float32,
) -> Callable:
    """Jitted ``(params, batch) -> {path: (sum_F [n_in,n_in], sum_B [n_out,n_out], tokens)}``.

    ``sum_F = sum_{i,t} m a a^T`` over examples and (unmasked) tokens of the layer inputs (bias
    feature appended), ``sum_B = sum_{i,t} m d d^T`` of the gradients of each example's loss
    w.r.t. the layer output. Accumulated inside the backward pass: per-example factors are never
    materialised. Used by :func:`jaxinf.kfac_factors`.
    """
    layers = dict(layers)

    def tap_factory(state, mask):
        s, z = state

        def tap(path, module, x, y, **call):
            if path not in s:
                return y
            cfg = _config(path, module, x, y, **call)
            spec = layers[path]
            _check_layer(path, cfg, spec.n_in, spec.n_out, "its LayerSpec")
            a = _input_features(cfg, jax.lax.stop_gradient(x)).astype(dtype)
            m = _token_mask(cfg, mask)
            if m is None:
                m = jnp.ones((a.shape[0],), dtype)
            # Adding the example's zero `z` makes the tapped output batched even when it does not
            # depend on the example (a positional Embed of arange(T)); newer JAX refuses a
            # custom_vjp whose unbatched output receives a batched cotangent.
            return _on_output(
                cfg, y, lambda y: _kfac_tap(y + z.astype(y.dtype), a, m.astype(dtype), s[path])
            )

        return tap

    f = _example_fn(capture, tap_factory)

    @jax.jit
    def fn(params, batch):
        s = {
            path: (
                jnp.zeros((spec.n_in, spec.n_in), dtype),
                jnp.zeros((spec.n_out, spec.n_out), dtype),
                jnp.zeros((), dtype),
            )
            for path, spec in layers.items()
        }
        mask = None if mask_fn is None else mask_fn(batch)

        zeros = jnp.zeros((jax.tree.leaves(batch)[0].shape[0],), dtype)

        def total(s):
            # s is shared by all examples (in_axes=None): its cotangent sums over the batch.
            state = (s, zeros)
            return jnp.sum(jax.vmap(f, in_axes=(None, (None, 0), 0, 0))(params, state, batch, mask))

        return jax.grad(total)(s)

    return fn


class LoGra(NamedTuple):
    """Everything :func:`logra` sets up; ``fn(params, batch)`` is the extraction."""

    fn: Callable  # (params, batch) -> {layer_path: [batch, k_out, k_in]}, jitted
    capture: Capture
    layers: dict  # {path: LayerSpec}
    projections: dict  # {path: Projection}
    metadata: dict  # projection_metadata(...), JSON-able, for the store


def logra(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    seed: int,
    k_in: int | None = None,
    k_out: int | None = None,
    model: nnx.Module | None = None,
    select: Select | Sequence[Select] | None = None,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    dtype=jnp.float32,
) -> LoGra:
    """One call from a loss (and model) to ``(params, batch) -> {layer: [batch, k_out, k_in]}``.

    Random LoGra projections from ``jax.random.key(seed)``; for PCA projections use the pieces
    (:func:`find_layers`, ``kfac_factors``, ``pca_projections``, :func:`projected_gradients`).

    Args:
      loss_fn: Linen: ``loss_fn(params, batch)``; NNX (``model`` given): ``loss_fn(model, batch)``,
        and ``params`` is ``nnx.state(model)``. On a one-example batch: that example's loss.
      params, batch: example inputs; only shapes matter (layer discovery).
      seed: integer seed of the random projections (recorded in the metadata).
      k_in, k_out: projection sizes (per-rule sizes in ``select`` win).
      model: the NNX model, or ``None`` for Linen.
      select, mask_fn: see :func:`find_layers` and :func:`projected_gradients`.
      dtype: projection dtype (also the dtype of the results).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> params = model.init(jax.random.key(0), jnp.ones(5))["params"]
      >>> loss_fn = lambda p, batch: jnp.sum(model.apply({"params": p}, batch) ** 2)
      >>> batch = jnp.ones((4, 5))
      >>> lg = logra(loss_fn, params, batch, seed=0, k_in=2, k_out=2)
      >>> {path: g.shape for path, g in lg.fn(params, batch).items()}
      {'layers_0': (4, 2, 2), 'layers_2': (4, 2, 2)}
    """
    capture = linen_capture(loss_fn) if model is None else nnx_capture(loss_fn, model)
    layers = find_layers(capture, params, batch, select=select)
    projections = random_projections(
        layers, key=jax.random.key(seed), k_in=k_in, k_out=k_out, dtype=dtype
    )
    fn = projected_gradients(capture, projections, mask_fn=mask_fn)
    meta = projection_metadata(projections, init="random", seed=seed)
    return LoGra(fn, capture, layers, projections, meta)
