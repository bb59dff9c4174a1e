"""jaxinf: training-data attribution (influence functions) at scale in JAX."""

__version__ = "0.1.0"

# --- store / query (stream `store`) ---
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
from jaxinf._src.store import LayerStatistics, Log, LogWriter, WriteHandle, open_log

_STORE_ALL = [
    "LayerStatistics",
    "Log",
    "LogWriter",
    "Preconditioner",
    "QueryResult",
    "SelfInfluence",
    "WriteHandle",
    "influence_scores",
    "merge_results",
    "open_log",
    "preconditioner",
    "query",
    "self_influence",
]
# --- end store / query ---

__all__ = ["__version__"] + _STORE_ALL
