"""Model execution: the runner, forward batch metadata."""
