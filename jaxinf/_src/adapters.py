"""Framework adapters: run the user's loss with a tap on every supported layer (Linen and NNX).

Stacked layers. Under ``nn.scan``/``nn.vmap`` (Linen) or ``nnx.scan``/``nnx.vmap`` (NNX) a
layer's parameters are stacked along one axis and each iteration (or vmapped copy) sees its
slice. A tap needs per-layer data too (the layer's projections and zero bottleneck), so the
adapters hand it in the same way: ``run(..., inject={path: (axis, tree)})`` stores the leaves
of ``tree`` (stacked along ``axis``, like the layer's parameters) beside the layer's own
parameters: in the ``'params'`` tree given to a Linen loss, or as ``nnx.Param`` Variables of the
NNX tapping wrapper. The transform then slices them with the parameters, so the tap of
iteration ``i`` receives slice ``i`` (``tap(..., stack=slice_tree)``), the scan body is traced
once, and the gradients of the injected zeros come back stacked, one slice per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf._src.layers import _LINEN_TYPES, _NNX_TYPES, readout_path


class Capture(NamedTuple):
    """How to run a user's loss with taps. Build with :func:`linen_capture` / :func:`nnx_capture`.

    ``run(params, batch, tap, note=None, inject=None, example=None) -> loss`` calls the user's
    loss; every call of a supported layer goes through
    ``tap(path, module, x, y, stacked=..., stack=...) -> y`` (Einsum calls also pass
    ``einsum_str=``, the string given at call time or ``None``). ``stacked`` is ``None`` for a
    plain layer and ``(axis, length)`` for a layer whose parameters are slices of stacked ones
    (inside ``nn.scan``/``nnx.scan``/``vmap``); ``stack`` is this layer's slice of
    ``inject[path]`` (see the module docstring), or ``None``. Uses that are seen but not
    captured call ``note(path, module, reason)`` (e.g. nested stacks). An
    ``Embed.attend`` call (tied read-out) is tapped as a layer of its own, at
    :func:`readout_path` of the embedding's path, with ``readout=True`` among the call's
    arguments. ``example`` (an integer array) is folded into the NNX model's RNG keys so that
    each example draws its own dropout mask.
    """

    framework: str
    run: Callable[..., jax.Array]


TRAIN_MODE = (
    "is a BatchNorm in train mode: it normalises by statistics of the whole batch, so one "
    "example's gradient is not defined by that example alone (per example it sees a batch of "
    "one, and the layers before it would get zero gradients). Capture in eval mode: pass "
    "use_running_average=True (Linen) or call model.eval() (NNX), so the stored running "
    "statistics are used"
)
_ATTEND_STACKED = (
    "Embed.attend (tied read-out) of an embedding inside a stacking transform; not captured"
)
_NESTED = (
    "inside nested stacking transforms (parameters stacked along more than one axis); not captured"
)


def stack_axis(outer: Mapping[str, tuple], inner: Mapping[str, tuple]):
    """``None``, ``(axis, length)``, or ``'nested'``: how a layer's parameters are stacked.

    ``outer`` holds the shapes of the parameters as stored (stacked), ``inner`` the shapes the
    layer call sees (one slice); the axis is the one whose removal maps every outer shape to
    its inner shape (the first such axis when several qualify).
    """
    common = [k for k in inner if k in outer]
    if all(tuple(outer[k]) == tuple(inner[k]) for k in common):
        return None
    axes = None
    for k in common:
        o, i = tuple(outer[k]), tuple(inner[k])
        if len(o) != len(i) + 1:
            return "nested"
        ok = {a for a in range(len(o)) if o[:a] + o[a + 1 :] == i}
        axes = ok if axes is None else axes & ok
    if not axes:
        return "nested"
    axis = min(axes)
    return axis, int(outer[common[0]][axis])


def _inject_leaves(axis, tree):
    """Leaves of ``tree`` (stacked on axis 0) moved to the layer's stacking ``axis``."""
    leaves, treedef = jax.tree.flatten(tree)
    return [jnp.moveaxis(v, 0, axis) for v in leaves], treedef


_PREFIX = "__jaxinf_tap_"


def linen_capture(loss_fn: Callable[[Any, Any], jax.Array]) -> Capture:
    """Capture for Flax Linen: ``loss_fn(params, batch) -> scalar`` calls ``model.apply`` inside.

    ``params`` is the ``'params'`` collection (or a variables dict holding it under
    ``'params'``), as ``loss_fn`` takes it. For a batch with one example, ``loss_fn`` must
    return that example's loss (sum or mean over the batch axis both qualify). The same loss
    serves :func:`jaxinf.per_example_grads` and :func:`jaxinf.dense_activations`.

    Dropout: the Linen RNGs are whatever ``loss_fn`` passes to ``apply``; for a different
    mask per example, take the key from the batch (one key per example).
    """

    def run(params, batch, tap, note=None, inject=None, example=None):
        del example  # Linen RNGs are the loss's own
        if inject:
            params = _linen_inject(params, inject)
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
            path = "/".join(module.path)
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
                if not nn.merge_param("use_running_average", module.use_running_average, ura):
                    raise ValueError(f"layer {path!r} {TRAIN_MODE}")
                return next_fun(*args, **kwargs)
            if context.method_name == "attend" and isinstance(module, nn.Embed):
                y = next_fun(*args, **kwargs)
                if roots and module.path and _linen_is_stacked(roots[-1], module):
                    if note is not None:
                        note(readout_path(path), module, _ATTEND_STACKED)
                    return y
                x = args[0] if args else kwargs["query"]
                return tap(readout_path(path), module, x, y, stacked=None, stack=None, readout=True)
            if context.method_name != "__call__" or not isinstance(module, _LINEN_TYPES):
                return next_fun(*args, **kwargs)
            x = args[0] if args else kwargs["inputs"]
            y = next_fun(*args, **kwargs)
            own = dict(module.variables.get("params", {}))
            injected = {k: own.pop(k) for k in list(own) if k.startswith(_PREFIX)}
            stacked = None
            if roots and module.path:
                stored = _linen_stored(roots[-1], module.path)
                stacked = stack_axis(
                    {k: v.shape for k, v in stored.items() if hasattr(v, "shape")},
                    {k: v.shape for k, v in own.items()},
                )
            if stacked == "nested":
                if note is not None:
                    note(path, module, _NESTED)
                return y
            stack = None
            if injected:
                treedef = jax.tree.structure(inject[path][1])
                stack = jax.tree.unflatten(
                    treedef, [injected[_PREFIX + str(i)] for i in range(len(injected))]
                )
            call = {"stacked": stacked, "stack": stack}
            if isinstance(module, nn.Einsum):
                call["einsum_str"] = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            return tap(path, module, x, y, **call)

        # Entered here, inside the function being traced, so it never leaks into cached traces.
        with nn.intercept_methods(interceptor):
            return loss_fn(params, batch)

    return Capture("linen", run)


def _linen_is_stacked(root_vars, module) -> bool:
    stored = _linen_stored(root_vars, module.path)
    own = dict(module.variables.get("params", {}))
    return (
        stack_axis(
            {k: v.shape for k, v in stored.items() if hasattr(v, "shape")},
            {k: v.shape for k, v in own.items() if hasattr(v, "shape")},
        )
        is not None
    )


def _linen_stored(root_vars, path) -> Mapping:
    """The stored (possibly stacked) ``'params'`` of the layer at ``path``, or ``{}``."""
    tree = root_vars.get("params", {})
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return {}
        tree = tree[name]
    return tree if isinstance(tree, Mapping) else {}


def _linen_inject(params, inject):
    """A copy of ``params`` with each layer's injected leaves stored beside its parameters."""

    def put(tree, names, leaves, where):
        if not names:
            out = dict(tree)
            out.update({_PREFIX + str(i): v for i, v in enumerate(leaves)})
            return out
        if not isinstance(tree, Mapping) or names[0] not in tree:
            raise KeyError(names[0])
        out = dict(tree)
        out[names[0]] = put(tree[names[0]], names[1:], leaves, where)
        return out

    for path, (axis, tree) in inject.items():
        leaves, _ = _inject_leaves(axis, tree)
        names = path.split("/")
        for prefix in ((), ("params",)):
            try:
                params = put(params, list(prefix) + names, leaves, path)
                break
            except KeyError:
                continue
        else:
            raise ValueError(
                f"layer {path!r}: its stacked parameters are not at params[{path!r}] nor "
                "params['params'][...] of the tree passed to the loss; pass the loss the "
                "'params' collection (or a variables dict holding it) as given to model.apply"
            )
    return params


class _NNXTap(nnx.Module):
    """Calls the wrapped layer, then the tap. Shares the wrapped layer's Variables."""

    def __init__(self, inner, path: str, tap, note, inject=None):
        self.inner = inner
        self.path = path
        self.tap = tap
        self.note = note
        # Shapes of the parameters as stored: inside a scan/vmap the call sees one slice.
        self.outer = tuple(
            (k, tuple(v.shape)) for k, v in vars(inner).items() if isinstance(v, nnx.Param)
        )
        self.treedef = None
        if inject is not None:
            leaves, self.treedef = _inject_leaves(*inject)
            for i, v in enumerate(leaves):
                setattr(self, _PREFIX + str(i), nnx.Param(v))

    def _stacked(self):
        inner = {k: tuple(v.shape) for k, v in vars(self.inner).items() if isinstance(v, nnx.Param)}
        return stack_axis(dict(self.outer), inner)

    def _call(self, x, y, **call):
        stacked = self._stacked()
        if stacked == "nested":
            if self.note is not None:
                self.note(self.path, self.inner, _NESTED)
            return y
        stack = None
        if self.treedef is not None:
            n = self.treedef.num_leaves
            stack = jax.tree.unflatten(
                self.treedef, [getattr(self, _PREFIX + str(i))[...] for i in range(n)]
            )
        return self.tap(self.path, self.inner, x, y, stacked=stacked, stack=stack, **call)

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        if isinstance(self.inner, nnx.Einsum):
            s = args[0] if args else kwargs.get("einsum_str")
            return self._call(x, y, einsum_str=s)
        return self._call(x, y)

    def attend(self, query):  # nnx.Embed's tied read-out: its own logged layer
        y = self.inner.attend(query)
        path = readout_path(self.path)
        if self._stacked() is not None:
            if self.note is not None:
                self.note(path, self.inner, _ATTEND_STACKED)
            return y
        return self.tap(path, self.inner, query, y, stacked=None, stack=None, readout=True)


class _NNXBatchNormCheck(nnx.Module):
    """Calls the wrapped ``nnx.BatchNorm`` after checking that it runs in eval mode."""

    def __init__(self, inner, path: str):
        self.inner = inner
        self.path = path

    def __call__(self, x, *args, **kwargs):
        ura = args[0] if args else kwargs.get("use_running_average")
        if not nnx.module.first_from(
            ura,
            self.inner.use_running_average,
            error_msg="No `use_running_average` argument was provided to BatchNorm",
        ):
            raise ValueError(f"layer {self.path!r} {TRAIN_MODE}")
        return self.inner(x, *args, **kwargs)


def _merge(graphdef, state, example):
    """The model from a copy of ``state``, with ``example`` folded into its RNG keys.

    The copy gives Variables of the current trace (those unflattened by an enclosing ``jit``
    belong to its trace, and nnx transforms inside the loss would reject them).
    """
    m = nnx.merge(graphdef, jax.tree.map(lambda v: v, state))
    if example is not None:
        for _, node in nnx.iter_graph(m):
            if isinstance(node, nnx.RngKey):
                node[...] = jax.random.fold_in(node[...], example)
    return m


def nnx_capture(loss_fn: Callable[[Any, Any], jax.Array], model: nnx.Module) -> Capture:
    """Capture for Flax NNX: ``loss_fn(model, batch) -> scalar``; ``params`` is ``nnx.state(model)``.

    The model is rebuilt from the state passed at call time (``nnx.merge`` of a copy made inside
    the traced function) and its supported layers are wrapped there, so the user's ``model``
    object is never modified: state updates made by ``loss_fn`` (RNG counters, any other
    Variable writes) are discarded. Each example folds its index into the RNG keys, so dropout
    draws a different mask per example. BatchNorm in train mode raises (see ``TRAIN_MODE``).
    """
    graphdef = nnx.graphdef(model)

    def run(state, batch, tap, note=None, inject=None, example=None):
        m = _merge(graphdef, state, example)
        inject = inject or {}

        def wrap(path, node):
            p = "/".join(str(q) for q in path)
            if isinstance(node, _NNX_TYPES):
                return _NNXTap(node, p, tap, note, inject.get(p))
            if isinstance(node, nnx.BatchNorm):
                return _NNXBatchNormCheck(node, p)
            return node

        return loss_fn(nnx.recursive_map(wrap, m), batch)

    return Capture("nnx", run)


def _example_fn(capture: Capture, tap_factory, inject_fn=None):
    """``f(params, state, example, mask, index) -> loss`` on one example (batch axis of 1 added)."""

    def f(params, state, example, mask, index):
        ex = jax.tree.map(lambda v: v[None], example)
        m = None if mask is None else mask[None]
        inject = None if inject_fn is None else inject_fn(state)
        return capture.run(params, ex, tap_factory(state, m), inject=inject, example=index)

    return f
