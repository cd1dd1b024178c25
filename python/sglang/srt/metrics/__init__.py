"""Observability: batch log lines, Prometheus metrics, request logs (see docs/advanced_features/observability.md)."""
