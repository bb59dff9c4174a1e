"""jaxinf: training-data attribution (influence functions) at scale in JAX."""

from jaxinf._src.capture import (
    Capture,
    LayerSpec,
    LoGra,
    Select,
    find_layers,
    kfac_batch_sums,
    linen_capture,
    logra,
    nnx_capture,
    projected_gradients,
)
from jaxinf._src.projection import (
    Projection,
    gradient_matrix,
    pca_projections,
    project_gradient,
    projection_metadata,
    random_projections,
    top_eigenvectors,
)
from jaxinf._src.query import (
    Preconditioner,
    QueryResult,
    SelfInfluence,
    influence_scores,
    merge_results,
    preconditioner,
    query,
    self_influence,
)
from jaxinf._src.statistics import (
    Accumulator,
    KFACFactors,
    KFACState,
    kfac_factors,
    projected_covariance,
)
from jaxinf._src.store import LayerStatistics, Log, LogWriter, WriteHandle, open_log

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # capture (Contract B)
    "Capture",
    "LayerSpec",
    "LoGra",
    "Select",
    "find_layers",
    "kfac_batch_sums",
    "linen_capture",
    "logra",
    "nnx_capture",
    "projected_gradients",
    # projection
    "Projection",
    "gradient_matrix",
    "pca_projections",
    "project_gradient",
    "projection_metadata",
    "random_projections",
    "top_eigenvectors",
    # statistics
    "Accumulator",
    "KFACFactors",
    "KFACState",
    "kfac_factors",
    "projected_covariance",
    # store
    "LayerStatistics",
    "Log",
    "LogWriter",
    "WriteHandle",
    "open_log",
    # query
    "Preconditioner",
    "QueryResult",
    "SelfInfluence",
    "influence_scores",
    "merge_results",
    "preconditioner",
    "query",
    "self_influence",
]
