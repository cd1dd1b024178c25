"""Entry points: the offline Engine and the HTTP server."""
