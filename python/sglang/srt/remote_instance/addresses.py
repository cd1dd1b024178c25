"""Addresses of R-Fork peers: which local address routes to a peer (what the peer sees us as)."""

from __future__ import annotations

import socket


def local_ip_towards(host: str) -> str:
    """The address this host uses to reach host (what the seed will see us as)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
