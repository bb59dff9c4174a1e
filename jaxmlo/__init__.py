"""jaxmlo: multi-level gradient-based optimization in JAX.

The top level holds what a user needs, in three groups: hypergradients in your own training
loop (``unroll(..., adjoint=...)``, ``hypergradient_transform``, ``bilevel``), the adjoints
that say how to differentiate (``itd``, ``cg``, ...), and multi-level programs (``Problem``,
``Program``, ``run``, ...).  Public submodules hold the rest:

* :mod:`jaxmlo.functional` — the explicit ``hypergradient`` and ``meta_step`` and the records
  they pass (``BilevelState``, ``HypergradientState``, ``HypergradInfo``, ``Unrolled``);
* :mod:`jaxmlo.parallel` — data parallelism and mixed precision;
* :mod:`jaxmlo.testing` — test hooks (the engine's per-problem gradients, collective counts);
  import it explicitly.

A loss takes its own parameters first, then what it depends on, then the batch.
"""

# Public submodules, imported with the package (`jaxmlo.functional.meta_step`).
from jaxmlo import functional, parallel  # noqa: F401

# Hypergradients in your own training loop.
from jaxmlo._src.adjoints import (
    SolveInfo,
    cg,
    direct,
    finite_difference,
    implicit,
    itd,
    neumann,
    sama,
)
from jaxmlo._src.bilevel import bilevel, hypergradient_transform

# Checkpointed scans: reverse-mode memory O(sqrt(T)) through long unrolls.
from jaxmlo._src.checkpointing import checkpointed_scan

# Programs: problems, the graph, its state, one compiled step and the run driver.
from jaxmlo._src.driver import RunResult, restore_checkpoint, run, save_checkpoint
from jaxmlo._src.engine import (
    ProblemGradient,
    ProgramState,
    init,
    make_step,
    problem_gradient,
    step,
)
from jaxmlo._src.problem import Problem
from jaxmlo._src.program import Program
from jaxmlo._src.unroll import HypergradMethod, unroll

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # hypergradients in your own training loop
    "unroll",
    "hypergradient_transform",
    "bilevel",
    "checkpointed_scan",
    # adjoints: how to differentiate through an unroll
    "HypergradMethod",
    "itd",
    "cg",
    "neumann",
    "direct",
    "finite_difference",
    "sama",
    "implicit",
    "SolveInfo",
    # multi-level programs
    "Problem",
    "Program",
    "ProgramState",
    "init",
    "step",
    "make_step",
    "problem_gradient",
    "ProblemGradient",
    "run",
    "RunResult",
    "save_checkpoint",
    "restore_checkpoint",
]
