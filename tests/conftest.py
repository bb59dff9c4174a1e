"""Test configuration: float64 everywhere (references are exact by construction)."""

import jax

jax.config.update("jax_enable_x64", True)
