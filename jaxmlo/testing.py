"""Hooks for tests and benchmarks: the engine's gradients, SAMA's adaptation, compiled-HLO inspection.

These are not needed to build or run a program; they expose what a step computes inside so
that it can be compared with references.
"""

import collections
import re

from jaxmlo._src.adjoints import sama_adaptation
from jaxmlo._src.engine import gradients, total_gradient
from jaxmlo._src.parallel import count_collectives

__all__ = [
    "count_collectives",
    "count_matmuls",
    "count_passes",
    "gradients",
    "sama_adaptation",
    "total_gradient",
]

# `%name = f32[32,10]{1,0} dot(...)` or `... convolution(...)`; the layout suffix is optional.
_MATMUL = re.compile(r"=\s*(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+(dot|convolution)\(")


def count_matmuls(hlo_text: str) -> dict[str, int]:
    """Count the ``dot`` and ``convolution`` instructions of compiled HLO text by result type.

    Use ``jax.jit(f).lower(*args).compile().as_text()``: the compiled text, after XLA's common
    subexpression elimination, so a product computed twice in the program but merged by XLA
    counts once.  An instruction inside a loop body (``lax.scan``, CG's ``while``) counts once
    here but runs once per iteration.

    Returns:
      ``{"dot f32[32,10]": 5, ...}``, sorted by key.

    Example:
      >>> import jax, jax.numpy as jnp, jaxmlo.testing
      >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w))
      >>> hlo = jax.jit(jax.grad(f)).lower(jnp.ones((3, 2)), jnp.ones((4, 3))).compile().as_text()
      >>> counts = jaxmlo.testing.count_matmuls(hlo)  # {'dot f32[3,2]': 1, 'dot f32[4,2]': 1}
      >>> sum(counts.values())  # one forward product, one weight gradient
      2
    """
    found = collections.Counter(
        f"{op} {dtype}[{dims}]" for dtype, dims, op in _MATMUL.findall(hlo_text)
    )
    return dict(sorted(found.items()))


def count_passes(hlo_text: str, forward: tuple, backward: tuple) -> dict[str, int]:
    """Forward and backward passes of a model in compiled HLO text, counted by marker products.

    ``forward`` is the result shape of a product only a forward pass computes (the output
    layer's ``[batch, classes]`` logits), ``backward`` that of one only a backward pass
    computes (the first dense layer's ``[in, out]`` weight gradient); any dtype matches.  Pick
    shapes no other product of the program has.  Loop bodies count once (see
    :func:`count_matmuls`).

    Returns:
      ``{"forward": n, "backward": m}``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxmlo.testing
      >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w))
      >>> hlo = jax.jit(jax.grad(f)).lower(jnp.ones((3, 2)), jnp.ones((4, 3))).compile().as_text()
      >>> jaxmlo.testing.count_passes(hlo, forward=(4, 2), backward=(3, 2))
      {'forward': 1, 'backward': 1}
    """

    def count(shape):
        dims = ",".join(str(int(d)) for d in shape)
        return sum(1 for _, d, _ in _MATMUL.findall(hlo_text) if d == dims)

    return {"forward": count(forward), "backward": count(backward)}
