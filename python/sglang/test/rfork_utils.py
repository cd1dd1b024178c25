"""What the TransferEngine R-Fork tests share: a client's flags, and reading back what an instance holds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

# More rows than any tiny model's weight has: /get_weights_by_name returns upstream's 100 rows without it.
WHOLE = {"truncate_size": 10**6}


def fork_client_args(seed: str | int, backend: str, *extra: str, timeout: int | None = 30) -> list[str]:
    """Flags of a client forking over `backend` from the seed at `seed` (its URL, or its HTTP port on this host),
    extra flags last; timeout None keeps the server's default."""
    args = [
        "--load-format", "remote_instance",
        "--remote-instance-weight-loader-backend", backend,
        "--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1",
        "--remote-instance-weight-loader-seed-instance-service-port", str(seed).rsplit(":", 1)[-1],
    ]  # fmt: skip
    if timeout is not None:
        args += ["--remote-instance-weight-loader-timeout", str(timeout)]
    return [*args, *extra]


def te_client_args(seed_url: str, *extra: str, timeout: int = 30) -> list[str]:
    """Flags of a TransferEngine client of the seed at seed_url (extra flags last)."""
    return fork_client_args(seed_url, "transfer_engine", *extra, timeout=timeout)


def rank_checksums(url: str, tp: int) -> list[dict[str, str]]:
    """Per-rank checksums of every parameter, each computed by the instance itself from its own bytes."""
    out = []
    for rank in range(tp):
        r = requests.get(f"{url}/remote_instance_weight_manifest", params={"rank": rank}, timeout=60)
        r.raise_for_status()
        out.append(r.json()["checksums"])
    return out


def weights_by_name(url: str, names: list[str] | None = None) -> dict[str, list]:
    """Whole values of the named parameters (default: every parameter of rank 0) as /get_weights_by_name gives them,
    all ranks' shards joined."""
    names = list(rank_checksums(url, 1)[0]) if names is None else names
    return {n: requests.post(f"{url}/get_weights_by_name", json={"name": n, **WHOLE}, timeout=60).json() for n in names}


def greedy_ids(url: str, prompt: str, params: dict) -> list[int]:
    """Output token ids of one /generate request."""
    r = requests.post(f"{url}/generate", json={"text": prompt, "sampling_params": params}, timeout=60)
    r.raise_for_status()
    return r.json()["output_ids"]


@contextmanager
def bootstrap_server(api_key: str) -> Iterator[tuple[str, Any]]:
    """A TransferEngine bootstrap server on a free loopback port: (its base URL, the server), shut down after."""
    from sglang.srt.remote_instance.bootstrap_server import start_bootstrap_server

    server = start_bootstrap_server("127.0.0.1", 0, api_key=api_key)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
