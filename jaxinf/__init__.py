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

# --- evaluate stream: counterfactual evaluation and attribution baselines -------------------
from jaxinf._src.baselines import (  # noqa: E402
    KFACEigenbasis,
    block_influence,
    damped_inverse_apply,
    dense_activations,
    exact_influence,
    flatten_per_example,
    gaussian_projection,
    grad_cosine,
    grad_dot,
    kfac_eigenbasis,
    kfac_influence,
    layer_grads_from_activations,
    per_example_grads,
    representation_similarity,
    trak,
)
from jaxinf._src.evaluate import (  # noqa: E402
    BrittlenessResult,
    LDSResult,
    brittleness,
    lds,
    random_subsets,
    rankdata,
    retrain,
    spearman,
    subset_predictions,
)

__all__ += [
    "BrittlenessResult", "KFACEigenbasis", "LDSResult", "block_influence", "brittleness",
    "damped_inverse_apply", "dense_activations", "exact_influence", "flatten_per_example",
    "gaussian_projection", "grad_cosine", "grad_dot", "kfac_eigenbasis", "kfac_influence",
    "layer_grads_from_activations", "lds", "per_example_grads", "random_subsets", "rankdata",
    "representation_similarity", "retrain", "spearman", "subset_predictions", "trak",
]
# --- end evaluate stream ----------------------------------------------------------------------

# --- scale stream: data-parallel logging and queries ---
from jaxinf._src.parallel import (  # noqa: E402
    LoggingState,
    LoggingStatistics,
    ShardedLogging,
    count_collectives,
    data_mesh,
    log_sharded,
    save_shard_statistics,
    sharded_logging,
    sharded_query,
    write_sharded,
)

__all__ += [
    "LoggingState", "LoggingStatistics", "ShardedLogging", "count_collectives", "data_mesh",
    "log_sharded", "save_shard_statistics", "sharded_logging", "sharded_query", "write_sharded",
]
# --- end scale stream ---
