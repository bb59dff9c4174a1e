"""jaxmlo: multi-level gradient-based optimization in JAX.

Test hooks (the engine's per-problem gradients, collective counts) live in
:mod:`jaxmlo.testing`.
"""

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
from jaxmlo._src.hypergrad import (
    BilevelState,
    HypergradientState,
    HypergradInfo,
    HypergradMethod,
    SolveInfo,
    Unrolled,
    bilevel,
    cg,
    direct,
    finite_difference,
    hypergradient,
    hypergradient_transform,
    implicit,
    itd,
    meta_step,
    neumann,
    sama,
    unroll,
)

# Data parallelism and mixed precision.
from jaxmlo._src.parallel import data_mesh, mixed_precision, parallel_step, replicate, shard_batches
from jaxmlo._src.problem import Problem
from jaxmlo._src.program import Program

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # programs
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
    # hypergrad
    "BilevelState",
    "bilevel",
    "cg",
    "direct",
    "finite_difference",
    "hypergradient",
    "hypergradient_transform",
    "HypergradientState",
    "HypergradInfo",
    "HypergradMethod",
    "implicit",
    "itd",
    "meta_step",
    "neumann",
    "sama",
    "SolveInfo",
    "unroll",
    "Unrolled",
    # checkpointing
    "checkpointed_scan",
    # data parallelism
    "data_mesh",
    "mixed_precision",
    "parallel_step",
    "replicate",
    "shard_batches",
]
