"""Example multi-level programs (need scikit-learn for the digits data)."""
