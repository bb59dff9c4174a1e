"""Layer discovery and selection: trace the loss once (shapes only) and list its layers."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxinf._src.adapters import Capture
from jaxinf._src.layers import (
    _KINDS,
    LayerSpec,
    Select,
    UncapturedLayerWarning,
    _config,
    _kind_of,
    stack_path,
)


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
      ``{path: LayerSpec}`` in call order. A layer of a stack (``nn.scan``/``nn.vmap``,
      ``nnx.scan``/``nnx.vmap`` over stacked parameters) of length ``L`` gives ``L`` entries
      ``"path[0]"`` ... ``"path[L-1]"`` (``LayerSpec.stack`` says where each sits), each a
      layer of its own: its own projection, gradients and statistics. Rules match these names;
      a rule selecting only part of a stack raises.

    Raises:
      ValueError: a rule matches no layer, a layer is matched by two rules, or a layer
        matched by an explicit rule has an unsupported configuration (each message names the
        rule or layer).

    Warns:
      UncapturedLayerWarning: with ``select=None``, once per call, naming every layer of a
        supported type whose configuration is unsupported (skipped: grouped/masked Conv,
        ``DenseGeneral(batch_dims)``, Einsum equations that are not dense projections, layers
        inside nested stacking transforms, ``Embed.attend`` of a stacked embedding).

    A tied read-out (``Embed.attend``) is a layer of its own, ``"<embedding path>.attend"``,
    of kind ``'dense'`` (``type_name`` ``'Embed.attend'``): input the query (hidden state),
    output the logits, kernel the embedding's transpose. The embedding's lookup stays the
    layer ``"<embedding path>"``; a rule on the type ``nn.Embed``/``nnx.Embed`` selects both.
    """
    found: dict[str, tuple] = {}
    kinds: dict[str, str] = {}

    def tap(path, module, x, y, stacked=None, stack=None, **call):
        if path not in found:
            try:
                cfg = _config(path, module, x, y, **call)
            except ValueError as e:
                cfg = e
            readout = call.get("readout", False)
            name = type(module).__name__ + (".attend" if readout else "")
            found[path] = (module, name, cfg, stacked)
            kinds[path] = "dense" if readout else _kind_of(module)
        return y

    def note(path, module, reason):
        if path not in found:
            found[path] = (
                module,
                type(module).__name__,
                ValueError(f"layer {path!r}: {reason}"),
                None,
            )

    jax.eval_shape(lambda p, b: capture.run(p, b, tap, note), params, _first_example(batch))
    if not found:
        raise ValueError(
            "find_layers: the loss calls no supported layer (Dense/Linear, "
            "DenseGeneral/LinearGeneral, Einsum, Conv, Embed)"
        )

    rules = (
        [Select()] if select is None else ([select] if isinstance(select, Select) else list(select))
    )
    names = {}  # {name: (found path, stack index or None)}
    for path, (*_, stacked) in found.items():
        if stacked is None:
            names[path] = (path, None)
        else:
            names.update({stack_path(path, j): (path, j) for j in range(stacked[1])})
    chosen: dict[str, tuple[int, Select]] = {}
    hits = [0] * len(rules)
    for name, (path, _j) in names.items():
        module = found[path][0]
        kind = kinds.get(path) or _kind_of(module)
        for i, rule in enumerate(rules):
            if _matches(rule, name, module, kind):
                if name in chosen:
                    raise ValueError(
                        f"layer {name!r} is selected twice: by rule {chosen[name][0]} "
                        f"{chosen[name][1]} and by rule {i} {rule}"
                    )
                chosen[name] = (i, rule)
                hits[i] += 1
    for i, (rule, n) in enumerate(zip(rules, hits)):
        if n == 0:
            raise ValueError(
                f"select rule {i} {rule} matches no layer; layers found: {sorted(names)}"
            )
    for path, (*_, stacked) in found.items():
        if stacked is not None:
            parts = [stack_path(path, j) for j in range(stacked[1])]
            got = [p for p in parts if p in chosen]
            if got and len(got) < len(parts):
                raise ValueError(
                    f"layer {path!r} is a stack of {len(parts)} layers and the selection takes "
                    f"only {got}; select all of {path + '[...]'!r} or none (its projections are "
                    "applied by the stacking transform, one per slice)"
                )
            sizes = {(chosen[p][1].k_in, chosen[p][1].k_out) for p in got}
            if len(sizes) > 1:
                raise ValueError(
                    f"layer {path!r}: the layers of one stack need one (k_in, k_out); the "
                    f"selection gives {sorted(sizes, key=str)}"
                )

    out = {}
    skipped = []
    for name, (_i, rule) in chosen.items():
        path, j = names[name]
        module, type_name, cfg, stacked = found[path]
        if isinstance(cfg, ValueError):
            if select is None:  # default selection: skip, and say so below
                if j in (None, 0):
                    skipped.append(f"{path!r} ({type_name}): {cfg}")
                continue
            raise cfg
        out[name] = LayerSpec(
            name,
            cfg.kind,
            type_name,
            cfg.n_in,
            cfg.n_out,
            cfg.bias,
            int(np.prod(cfg.tok_shape)),
            rule.k_in,
            rule.k_out,
            None if j is None else (path, j, stacked[1], stacked[0]),
        )
    if skipped:
        msg = (
            "find_layers: some parametrized layer uses are not captured. Not captured "
            "(skipped by the default selection; an explicit Select rule matching them "
            "raises): " + "; ".join(skipped) + "."
        )
        warnings.warn(msg, UncapturedLayerWarning, stacklevel=2)
    if not out:
        raise ValueError(
            "find_layers: no supported layer is selected; not captured: " + "; ".join(skipped)
        )
    return out
