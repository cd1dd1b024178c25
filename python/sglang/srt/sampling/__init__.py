"""Sampling parameters and the per-batch sampling state."""
