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
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` (``__call__``
  and ``attend``).
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

Stacked layers. A layer under ``nn.scan``/``nn.vmap`` or ``nnx.scan``/``nnx.vmap`` with stacked
parameters is ``L`` logged layers, ``"path[0]"`` ... ``"path[L-1]"``, each with its own projection
(from the key and that name) and its own gradients and statistics; the per-slice projections and
zero bottlenecks travel through the transform beside the parameters (see
:mod:`jaxinf._src.adapters`), so the body is traced once. A layer reused by every iteration
(``variable_broadcast='params'``) is one layer whose gradient sums over the iterations.

Train mode. A batch-coupled layer (``BatchNorm`` with batch statistics) has no per-example
gradient: capture raises, naming the layer, and asks for eval mode (``use_running_average=True``
/ ``model.eval()``), where the stored statistics are used. NNX state updates made during capture
(RNG counters, statistics) are discarded; NNX dropout folds the example's index into its keys,
so each example draws its own mask.

Never silent. Layer uses that are not captured are reported by :func:`find_layers`: with the
default selection (``select=None``) they are skipped with a :class:`UncapturedLayerWarning`
naming each layer and the reason; an explicit :class:`Select` rule matching such a layer raises
``ValueError``. This covers unsupported configurations of the types above (grouped or masked
Conv, ``DenseGeneral(batch_dims)``, non-dense Einsum equations, layers inside nested stacking
transforms, ``Embed.attend`` of a stacked embedding).

Tied read-outs. ``Embed.attend(h)`` (logits ``h @ E^T``) is a dense layer of its own, logged as
``"<embedding path>.attend"``: input ``h``, output the logits, kernel ``E^T``. The lookup stays
the layer ``"<embedding path>"``. The two entries of one matrix add up to its gradient; they
are kept apart because each has its own Kronecker structure (one-hot inputs for the lookup,
hidden states for the read-out), hence its own KFAC factors, PCA projections and damping.

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf._src.adapters import Capture, _example_fn, linen_capture, nnx_capture
from jaxinf._src.discovery import find_layers
from jaxinf._src.layers import (
    LayerSpec,
    Select,
    _check_layer,
    _config,
    _on_output,
    _project_inputs,
    _token_mask,
    group_stacks,
    stacked_error,
)
from jaxinf._src.projection import Projection, projection_metadata, random_projections
from jaxinf._src.taps import _logra_tap


def projected_gradients(
    capture: Capture,
    projections: Mapping[str, Projection],
    *,
    layers: Mapping[str, LayerSpec] | None = None,
    mask_fn: Callable[[Any], jax.Array] | None = None,
    with_loss: bool = False,
) -> Callable:
    """The pure, jitted function ``(params, batch) -> {layer_path: [batch, k_out, k_in]}``.

    For example ``i`` and layer ``l`` the result is ``sum_t m_t (P_out d_t)(P_in a_t)^T``
    (thesis eq. 4.6), ``d_t`` the gradient of example ``i``'s loss w.r.t. the layer output at
    token ``t``, ``a_t`` the layer input (bias feature appended), ``m_t`` the mask. It equals
    ``project_gradient(P, G_i)`` of the full per-example weight gradient ``G_i`` without forming it.

    Layers of a stack (``"blocks/Dense_0[3]"``, see :func:`find_layers`) are computed together:
    their projections are stacked and handed to the scan (or vmap) with the layer's parameters,
    so each iteration projects with its own ``P`` and the scan body is traced once.

    Args:
      capture: from :func:`linen_capture` or :func:`nnx_capture`.
      projections: ``{path: Projection}`` (their keys select the layers).
      layers: the ``{path: LayerSpec}`` of :func:`find_layers`, for the stacking axis of
        stacked layers (without it, stacks named ``"path[i]"`` are taken as stacked on axis 0).
      mask_fn: ``mask_fn(batch) -> [batch, *tokens]`` of 0/1, or ``None``.
      with_loss: also return the per-example losses: ``(losses [batch], grads)``.

    Returns:
      A jitted function; calls with batches of the same shapes reuse one compilation.
    """
    projections = dict(projections)
    plain, stacks = group_stacks(projections, layers)
    for base, (_axis, names) in stacks.items():
        shapes = {(projections[n].p_in.shape, projections[n].p_out.shape) for n in names}
        if len(shapes) > 1:
            raise ValueError(
                f"stacked layer {base!r}: its layers' projections differ in shape {sorted(shapes)}; "
                "one stack needs one (k_in, n_in, k_out, n_out)"
            )

    def tap_factory(state, mask):
        bs, stacked_bs, projs, seen = state

        def tap(path, module, x, y, stacked=None, stack=None, **call):
            if stack is not None:
                b, p = stack[0], Projection(stack[1], stack[2])
            elif path in bs:
                if stacked is not None:
                    raise stacked_error(path, stacked)
                b, p = bs[path], projs[path]
            else:
                return y
            cfg = _config(path, module, x, y, **call)
            _check_layer(path, cfg, p.p_in.shape[1], p.p_out.shape[1], "its projection")
            seen.add(path)
            pa = _project_inputs(cfg, jax.lax.stop_gradient(x), p.p_in)
            m = _token_mask(cfg, mask)
            if m is not None:
                pa = pa * m[:, None].astype(pa.dtype)
            return _on_output(cfg, y, lambda y: _logra_tap(y, pa, b, p.p_out))

        return tap

    def inject_fn(state):
        _, stacked_bs, projs, _ = state
        return {
            base: (axis, (stacked_bs[base], *projs[base])) for base, (axis, _) in stacks.items()
        }

    f = _example_fn(capture, tap_factory, inject_fn)

    def per_example(params, bs, projs, example, mask, index):
        seen = set()  # trace-time bookkeeping only: which projected layers the loss called

        def loss(bs):
            return f(params, (*bs, projs, seen), example, mask, index)

        value, grads = jax.value_and_grad(loss)(bs)
        missing = (set(plain) | set(stacks)) - seen
        if missing:
            raise ValueError(f"projected layers never called by the loss: {sorted(missing)}")
        return value, grads

    @jax.jit
    def fn(params, batch, projs):
        # The zero bottlenecks, made once, unbatched; a stack's are stacked on axis 0.
        bs = {p: jnp.zeros((projs[p].p_out.shape[0], projs[p].p_in.shape[0])) for p in plain}
        bs = {p: v.astype(projs[p].p_out.dtype) for p, v in bs.items()}
        stacked_bs = {}
        sprojs = {p: projs[p] for p in plain}
        for base, (_axis, names) in stacks.items():
            p0 = projs[names[0]]
            k = (len(names), p0.p_out.shape[0], p0.p_in.shape[0])
            stacked_bs[base] = jnp.zeros(k, p0.p_out.dtype)
            sprojs[base] = Projection(
                jnp.stack([projs[n].p_in for n in names]),
                jnp.stack([projs[n].p_out for n in names]),
            )
        mask = None if mask_fn is None else mask_fn(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        losses, (g, gs) = jax.vmap(per_example, in_axes=(None, None, None, 0, 0, 0))(
            params, (bs, stacked_bs), sprojs, batch, mask, jnp.arange(n)
        )
        for base, (_axis, names) in stacks.items():
            g.update({name: gs[base][:, j] for j, name in enumerate(names)})
        g = {p: g[p] for p in projs}
        return (losses, g) if with_loss else g

    def call(params, batch):
        return fn(params, batch, projections)

    call.lower = lambda params, batch: fn.lower(params, batch, projections)
    call.jitted = fn
    return call


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
    clip_k: bool = True,
) -> LoGra:
    """One call from a loss (and model) to ``(params, batch) -> {layer: [batch, k_out, k_in]}``.

    Random LoGra projections from ``jax.random.key(seed)``; for PCA projections use the pieces
    (:func:`find_layers`, ``kfac_factors``, ``pca_projections``, :func:`projected_gradients`).

    Args:
      loss_fn: Linen: ``loss_fn(params, batch)``; NNX (``model`` given): ``loss_fn(model, batch)``,
        and ``params`` is ``nnx.state(model)``. On a one-example batch: that example's loss.
      params, batch: example inputs; only shapes matter (layer discovery).
      seed: integer seed of the random projections (recorded in the metadata).
      k_in, k_out: projection sizes (per-rule sizes in ``select`` win), clipped to each
        layer's size unless ``clip_k=False`` (then a size larger than a layer raises).
      model: the NNX model, or ``None`` for Linen.
      select, mask_fn: see :func:`find_layers` and :func:`projected_gradients`.
      dtype: projection dtype (also the dtype of the results).
      clip_k: see above.

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
        layers, key=jax.random.key(seed), k_in=k_in, k_out=k_out, dtype=dtype, clip_k=clip_k
    )
    fn = projected_gradients(capture, projections, layers=layers, mask_fn=mask_fn)
    meta = projection_metadata(projections, init="random", seed=seed)
    return LoGra(fn, capture, layers, projections, meta)
