"""jaxmlo: multi-level gradient-based optimization in JAX."""

from jaxmlo._src.hypergrad import (
    BilevelState,
    HypergradInfo,
    HypergradMethod,
    Unrolled,
    cg,
    finite_difference,
    hypergradient,
    itd,
    meta_step,
    neumann,
    sama,
    sama_adaptation,
    unroll,
)

# --- engine: multi-level programs (problem DAG) ---
from jaxmlo._src.problem import Problem
from jaxmlo._src.program import Program
from jaxmlo._src.engine import (
    ProgramState,
    gradients,
    init,
    make_step,
    step,
    total_gradient,
)
from jaxmlo._src.driver import RunResult, restore_checkpoint, run, save_checkpoint
# --- end engine ---

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # hypergradients (Contract A)
    "BilevelState",
    "HypergradInfo",
    "HypergradMethod",
    "Unrolled",
    "cg",
    "finite_difference",
    "hypergradient",
    "itd",
    "meta_step",
    "neumann",
    "sama",
    "sama_adaptation",
    "unroll",
    # engine: multi-level programs (problem DAG)
    "Problem",
    "Program",
    "ProgramState",
    "gradients",
    "init",
    "make_step",
    "step",
    "total_gradient",
    "RunResult",
    "run",
    "save_checkpoint",
    "restore_checkpoint",
]

# --- scale stream: data parallelism and mixed precision ---
from jaxmlo._src.parallel import (  # noqa: E402
    count_collectives,
    data_mesh,
    mixed_precision,
    parallel_step,
    replicate,
    shard_batches,
)

__all__ += [
    "count_collectives", "data_mesh", "mixed_precision", "parallel_step", "replicate",
    "shard_batches",
]
# --- end scale stream ---
