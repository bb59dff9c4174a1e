"""jaxinf: training-data attribution (influence functions) at scale in JAX."""

__version__ = "0.1.0"

__all__ = ["__version__"]

# --- evaluate stream: counterfactual evaluation and attribution baselines -------------------
from jaxinf._src.baselines import (  # noqa: E402
    KFACFactors,
    block_influence,
    damped_inverse_apply,
    dense_activations,
    exact_influence,
    flatten_per_example,
    gaussian_projection,
    grad_cosine,
    grad_dot,
    kfac_factors,
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
    "BrittlenessResult", "KFACFactors", "LDSResult", "block_influence", "brittleness",
    "damped_inverse_apply", "dense_activations", "exact_influence", "flatten_per_example",
    "gaussian_projection", "grad_cosine", "grad_dot", "kfac_factors", "kfac_influence",
    "layer_grads_from_activations", "lds", "per_example_grads", "random_subsets", "rankdata",
    "representation_similarity", "retrain", "spearman", "subset_predictions", "trak",
]
# --- end evaluate stream ----------------------------------------------------------------------
