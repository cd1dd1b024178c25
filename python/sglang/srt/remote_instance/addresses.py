"""Addresses of R-Fork peers: which local address routes to a peer, and which rendezvous address a seed accepts."""

from __future__ import annotations

import asyncio
import socket

from sglang.srt.remote_instance.store_gate import normalize_ip


def local_ip_towards(host: str) -> str:
    """The address this host uses to reach host (what the seed will see us as)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


async def resolve_ips(host: str, timeout_s: float = 5.0) -> set[str]:
    """Every IP host resolves to (canonical spelling); ValueError naming host if it does not resolve in time."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM), timeout_s)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"{host!r} does not resolve to an address ({e})") from None
    except asyncio.TimeoutError:
        raise ValueError(f"{host!r} did not resolve within {timeout_s:.0f} s") from None
    return {normalize_ip(info[4][0]) for info in infos}


async def check_master_address(master_address: str, served_at: str | None, configured_host: str) -> None:
    """The pair group's rendezvous must be this seed as the caller reached it (or its --host): a caller may not
    point the seed at another host. ValueError says what was wrong."""
    wanted = await resolve_ips(master_address)
    ours = {normalize_ip(served_at)} if served_at else set()
    if configured_host not in ("0.0.0.0", "::", ""):
        try:
            ours |= await resolve_ips(configured_host)
        except ValueError:
            pass
    if not wanted & ours:
        raise ValueError(
            f"master_address {master_address!r} is not where this seed serves (reached at "
            f"{', '.join(sorted(ours)) or 'an unknown address'}); send the seed's address as you reach it "
            "(--remote-instance-weight-loader-seed-instance-ip)"
        )


def parse_ports(text: str) -> list[int]:
    """The comma-separated group ports; ValueError naming what is wrong."""
    try:
        ports = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"ports must be comma-separated integers, got {text!r}") from None
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise ValueError(f"ports {bad} are out of range: each must be in 1..65535")
    return ports
