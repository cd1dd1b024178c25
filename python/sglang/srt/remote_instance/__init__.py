"""Tensor R-Fork, seed side: control handlers that export this instance's weights."""
