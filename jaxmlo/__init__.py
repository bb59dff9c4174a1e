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
]
