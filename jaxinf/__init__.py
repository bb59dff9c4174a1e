"""jaxinf: training-data attribution (influence functions) at scale in JAX."""

from jaxinf._src.adapters import Capture, linen_capture, nnx_capture
from jaxinf._src.baselines import (
    FISHERS,
    KFACEigenbasis,
    block_influence,
    damped_inverse_apply,
    dense_activations,
    exact_influence,
    fisher_batch,
    flatten_per_example,
    gaussian_projection,
    grad_cosine,
    grad_dot,
    kfac_eigenbasis,
    kfac_influence,
    layer_grads_from_activations,
    margin_grads,
    per_example_grads,
    projected_influence,
    representation_similarity,
    trak,
    weight_rows,
)
from jaxinf._src.capture import LoGra, logra, projected_gradients
from jaxinf._src.discovery import find_layers
from jaxinf._src.evaluate import (
    BrittlenessResult,
    LDSModelsResult,
    LDSResult,
    brittleness,
    ensemble_scores,
    lds,
    lds_models,
    random_subsets,
    rankdata,
    retrain,
    spearman,
    subset_predictions,
)
from jaxinf._src.index import build_index, query_index
from jaxinf._src.kfac import (
    KFACFactors,
    KFACState,
    kfac_batch_sums,
    kfac_factors,
    kfac_factors_from_activations,
)
from jaxinf._src.layers import LayerSpec, Select, UncapturedLayerWarning
from jaxinf._src.metagrad import (
    metagradient_scores,
    weighted_train,
)
from jaxinf._src.parallel import (
    LoggingState,
    LoggingStatistics,
    ShardedLogging,
    log_sharded,
    save_shard_statistics,
    sharded_logging,
    sharded_query,
    write_sharded,
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
from jaxinf._src.reader import LayerStatistics, Log, open_log
from jaxinf._src.statistics import Accumulator, projected_covariance
from jaxinf._src.store_files import LogLockedError
from jaxinf._src.store_format import LogFormatError
from jaxinf._src.writer import LogWriter, WriteHandle

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # baselines
    "block_influence",
    "damped_inverse_apply",
    "dense_activations",
    "exact_influence",
    "flatten_per_example",
    "gaussian_projection",
    "grad_cosine",
    "grad_dot",
    "kfac_eigenbasis",
    "kfac_influence",
    "KFACEigenbasis",
    "layer_grads_from_activations",
    "per_example_grads",
    "representation_similarity",
    "trak",
    "projected_influence",
    "margin_grads",
    "fisher_batch",
    "weight_rows",
    "FISHERS",
    # capture
    "Capture",
    "find_layers",
    "kfac_batch_sums",
    "LayerSpec",
    "linen_capture",
    "LoGra",
    "logra",
    "nnx_capture",
    "projected_gradients",
    "Select",
    "UncapturedLayerWarning",
    # evaluate
    "brittleness",
    "ensemble_scores",
    "BrittlenessResult",
    "lds",
    "lds_models",
    "LDSModelsResult",
    "LDSResult",
    "random_subsets",
    "rankdata",
    "retrain",
    "spearman",
    "subset_predictions",
    # metagrad
    "metagradient_scores",
    "weighted_train",
    # parallel (meshes: jaxmlo.data_mesh)
    "log_sharded",
    "LoggingState",
    "LoggingStatistics",
    "save_shard_statistics",
    "sharded_logging",
    "sharded_query",
    "ShardedLogging",
    "write_sharded",
    # projection
    "gradient_matrix",
    "pca_projections",
    "project_gradient",
    "Projection",
    "projection_metadata",
    "random_projections",
    "top_eigenvectors",
    # query
    "influence_scores",
    "merge_results",
    "Preconditioner",
    "preconditioner",
    "query",
    "build_index",
    "query_index",
    "QueryResult",
    "self_influence",
    "SelfInfluence",
    # statistics
    "Accumulator",
    "kfac_factors",
    "kfac_factors_from_activations",
    "KFACFactors",
    "KFACState",
    "projected_covariance",
    # store
    "LayerStatistics",
    "Log",
    "LogFormatError",
    "LogLockedError",
    "LogWriter",
    "open_log",
    "WriteHandle",
]
