"""Hooks for tests and benchmarks: the engine's gradients, SAMA's adaptation, compiled-HLO inspection.

These are not needed to build or run a program; they expose what a step computes inside so
that it can be compared with references.
"""

from jaxmlo._src.adjoints import sama_adaptation
from jaxmlo._src.engine import gradients, total_gradient
from jaxmlo._src.parallel import count_collectives

__all__ = ["count_collectives", "gradients", "sama_adaptation", "total_gradient"]
