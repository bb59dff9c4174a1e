"""Helpers that jaxmlo and jaxinf share: a device mesh, collective counts, example data.

A public module, so jaxinf uses these without reaching into jaxmlo's internals. Users reach
them through the libraries (``jaxmlo.parallel.data_mesh``, ``jaxmlo.testing.count_collectives``) and
the example modules (``jaxmlo.examples.digits``, ``jaxinf.examples``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

__all__ = ["axis_size", "cast_floats", "count_collectives", "data_mesh", "load_digits"]


def data_mesh(devices: Sequence | None = None, *, axis: str = "data") -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process).

    On several hosts call ``jax.distributed.initialize()`` first; ``jax.devices()`` then lists
    the devices of all processes.

    Example:
      >>> data_mesh().axis_names
      ('data',)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh: devices is empty")
    return Mesh(np.asarray(devices), (axis,))


def axis_size(mesh: Mesh, axis: str) -> int:
    """Number of devices along ``axis``; a clear error if the mesh has no such axis."""
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
    return mesh.shape[axis]


def cast_floats(tree, dtype):
    """Floating leaves of ``tree`` cast to ``dtype`` (others kept); ``dtype=None``: unchanged."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda v: v.astype(dtype) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v, tree
    )


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Count cross-device collective instructions in compiled HLO text.

    Use ``step.lower(state, batches).compile().as_text()``. Async pairs
    (``all-reduce-start`` / ``-done``) count once. A collective inside a loop body (e.g. CG's
    ``while``) counts once here but runs once per iteration.

    Example:
      >>> count_collectives("%r = f32[] all-reduce(f32[] %x), to_apply=%add")["all-reduce"]
      1
    """
    out = {}
    for name in _COLLECTIVES:
        pat = re.compile(r"=\s*[^=]*?\b" + re.escape(name) + r"(-start)?\(")
        out[name] = len(pat.findall(hlo_text))
    return out


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: ``x`` float32 ``[1797, 64]`` in [0, 1], ``y`` int32 ``[1797]``.

    The one loader behind every digits example (shipped with scikit-learn; nothing is
    downloaded).

    Example:
      >>> x, y = load_digits()
      >>> x.shape, x.dtype, int(y.max())
      ((1797, 64), dtype('float32'), 9)
    """
    from sklearn.datasets import load_digits as _sklearn_digits  # examples extra

    x, y = _sklearn_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)
