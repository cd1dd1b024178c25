"""Developer tools: helpers that are not part of the serving runtime itself."""
