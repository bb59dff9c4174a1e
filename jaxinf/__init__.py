"""jaxinf: training-data attribution (influence functions) at scale in JAX."""

__version__ = "0.1.0"

__all__ = ["__version__"]
