"""Data parallelism and mixed precision for jaxmlo programs.

``parallel_step`` is the compiled program step under ``shard_map`` over a ``'data'`` mesh axis
(one gradient all-reduce per SAMA meta step); ``data_mesh`` builds that mesh, ``replicate``
and ``shard_batches`` place the state and the batches on it, and ``mixed_precision`` runs a
problem's loss in a lower precision with float32 master parameters.  See docs/scaling.md.
"""

from jaxmlo._src.parallel import data_mesh, mixed_precision, parallel_step, replicate, shard_batches

__all__ = ["data_mesh", "mixed_precision", "parallel_step", "replicate", "shard_batches"]
