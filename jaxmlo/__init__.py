"""jaxmlo: multi-level gradient-based optimization in JAX."""

from jaxmlo._src.checkpointing import (
    checkpointed_scan,
)
from jaxmlo._src.driver import (
    RunResult,
    restore_checkpoint,
    run,
    save_checkpoint,
)
from jaxmlo._src.engine import (
    ProgramState,
    gradients,
    init,
    make_step,
    step,
    total_gradient,
)
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
from jaxmlo._src.parallel import (
    count_collectives,
    data_mesh,
    mixed_precision,
    parallel_step,
    replicate,
    shard_batches,
)
from jaxmlo._src.problem import (
    Problem,
)
from jaxmlo._src.program import (
    Program,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # checkpointing
    "checkpointed_scan",
    # driver
    "restore_checkpoint",
    "run",
    "RunResult",
    "save_checkpoint",
    # engine
    "gradients",
    "init",
    "make_step",
    "ProgramState",
    "step",
    "total_gradient",
    # hypergrad
    "BilevelState",
    "cg",
    "finite_difference",
    "hypergradient",
    "HypergradInfo",
    "HypergradMethod",
    "itd",
    "meta_step",
    "neumann",
    "sama",
    "sama_adaptation",
    "unroll",
    "Unrolled",
    # parallel
    "count_collectives",
    "data_mesh",
    "mixed_precision",
    "parallel_step",
    "replicate",
    "shard_batches",
    # problem
    "Problem",
    # program
    "Program",
]
