"""Seed endpoints of the NCCL backend (upstream's two) plus ours: the manifest, a port check and a fork lease."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sglang.srt.remote_instance.addresses import check_master_address, parse_ports

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)


class InitGroupReq(BaseModel):
    """Upstream's InitWeightsSendGroupForRemoteInstanceReqInput (+ our optional lease_id and send_weights)."""

    master_address: str
    ports: str
    group_rank: int = 0
    world_size: int = 2
    group_name: str = "weight_send_group"
    backend: str = "nccl"
    lease_id: str | None = None
    # Ours: broadcast the weights as soon as the group forms and answer after that (one call instead of two).
    send_weights: bool = False


class SendWeightsReq(BaseModel):
    """Upstream's SendWeightsToRemoteInstanceReqInput (+ our optional lease_id)."""

    master_address: str
    ports: str
    group_name: str = "weight_send_group"
    lease_id: str | None = None


class LeaseReq(BaseModel):
    """Ask for the seed's single NCCL fork slot; ports are checked before it is granted."""

    ports: str


class ReleaseReq(BaseModel):
    lease_id: str


@dataclass
class Lease:
    """Who holds the seed's NCCL fork slot, and until when."""

    lease_id: str
    ports: str
    expires: float
    group_name: str | None = None


class ForkSlot:
    """One NCCL fork at a time: a second client gets 409 and retries instead of colliding on the ports."""

    def __init__(self, tm: TokenizerManager) -> None:
        self.tm = tm
        self.timeout = tm.server_args.remote_instance_weight_loader_timeout
        self.lease: Lease | None = None

    def busy_message(self) -> str:
        left = max(0.0, self.lease.expires - time.monotonic())
        return f"another R-Fork (NCCL) is in progress on this seed (slot free in at most {left:.0f} s); retry later"

    def acquire(self, ports: str) -> Lease | None:
        if self.lease is not None and time.monotonic() < self.lease.expires:
            return None
        # Long enough for group setup and the transfer, each bounded by the seed's own timeout.
        self.lease = Lease(uuid.uuid4().hex, ports, time.monotonic() + 2 * self.timeout + 5)
        asyncio.get_running_loop().create_task(self._expire(self.lease))
        return self.lease

    async def wait_acquire(self, ports: str) -> Lease | None:
        """acquire(), retried until the slot frees or one fork timeout has passed."""
        give_up = time.monotonic() + self.timeout
        while (lease := self.acquire(ports)) is None and time.monotonic() < give_up:
            await asyncio.sleep(0.2)
        return lease

    def holds(self, lease_id: str | None) -> bool:
        return self.lease is not None and lease_id is not None and self.lease.lease_id == lease_id

    def release(self, lease_id: str) -> None:
        if self.holds(lease_id):
            self.lease = None

    async def _expire(self, lease: Lease) -> None:
        await asyncio.sleep(max(0.0, lease.expires - time.monotonic()))
        if self.lease is lease:
            logger.warning("R-Fork lease %s expired; tearing down its groups", lease.lease_id)
            self.lease = None
            if lease.group_name:
                try:
                    await self.tm.rpc("destroy_weights_send_group", ports=lease.ports, group_name=lease.group_name)
                except RuntimeError as e:
                    logger.warning("tearing down expired R-Fork groups failed: %s", e)


def busy_ports(ports: list[int]) -> list[int]:
    """Ports on this host that something already listens on (or that we may not bind)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def _fail(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def add_rfork_routes(app: FastAPI) -> None:
    """Register the R-Fork (NCCL) seed endpoints on app."""

    def slot(request: Request) -> ForkSlot:
        if not hasattr(request.app.state, "fork_slot"):
            request.app.state.fork_slot = ForkSlot(request.app.state.tokenizer_manager)
        return request.app.state.fork_slot

    @app.get("/remote_instance_weight_manifest")
    async def weight_manifest(request: Request, rank: int | None = None) -> Any:
        tm = request.app.state.tokenizer_manager
        if rank is None or not 0 <= rank < tm.server_args.tp_size:
            return JSONResponse(
                {"error": {"message": f"rank must be an integer in [0, {tm.server_args.tp_size})"}}, status_code=400
            )
        return (await tm.rpc("remote_instance_weight_manifest"))[rank]

    @app.post("/remote_instance_fork_lease")
    async def fork_lease(req: LeaseReq, request: Request) -> Any:
        tm = request.app.state.tokenizer_manager
        try:
            ports = parse_ports(req.ports)
        except ValueError as e:
            return _fail(str(e))
        if len(ports) != tm.server_args.tp_size:
            return _fail(
                f"{len(ports)} group port(s) for a seed with --tp-size {tm.server_args.tp_size}; "
                "the client needs the same --tp-size and one port per rank"
            )
        s = slot(request)
        if s.lease is not None and time.monotonic() < s.lease.expires:
            return _fail(s.busy_message(), 409)
        taken = busy_ports(ports)
        if taken:
            return _fail(
                f"group port(s) {taken} are already in use on the seed host; pick free ports "
                "with --remote-instance-weight-loader-send-weights-group-ports"
            )
        lease = s.acquire(req.ports)
        return {"success": True, "lease_id": lease.lease_id, "expires_in": lease.expires - time.monotonic()}

    @app.post("/remote_instance_fork_lease/release")
    async def release_lease(req: ReleaseReq, request: Request) -> Any:
        slot(request).release(req.lease_id)
        return {"success": True}

    @app.post("/init_weights_send_group_for_remote_instance")
    async def init_group(req: InitGroupReq, request: Request) -> Any:
        tm = request.app.state.tokenizer_manager
        try:
            parse_ports(req.ports)
            served_at = request.scope.get("server")
            await check_master_address(req.master_address, served_at[0] if served_at else None, tm.server_args.host)
        except ValueError as e:
            return _fail(str(e))
        s = slot(request)
        lease = s.lease if s.holds(req.lease_id) else None
        if lease is None:
            if req.lease_id is not None:
                return _fail("unknown or expired lease_id; ask /remote_instance_fork_lease again", 409)
            # An upstream client has no lease and ignores a 409 (then waits for a group that never comes): it
            # queues for the slot instead, as long as a fork may take.
            lease = await s.wait_acquire(req.ports)
            if lease is None:
                return _fail(s.busy_message(), 409)
        lease.group_name = req.group_name
        params = req.model_dump(exclude={"lease_id"})
        params["client_address"] = request.client.host if request.client else None
        try:
            await tm.rpc("init_weights_send_group_for_remote_instance", timeout=None, **params)
        except RuntimeError as e:
            s.release(lease.lease_id)
            what = "init group and send weights" if req.send_weights else "init group"
            return _fail(f"Failed to {what}: {str(e).rstrip('.')}.")
        if req.send_weights:
            s.release(lease.lease_id)
            return {"success": True, "message": "Succeeded to init group and send weights through nccl."}
        return {"success": True, "message": "Succeeded to init group through nccl."}

    @app.post("/send_weights_to_remote_instance")
    async def send_weights(req: SendWeightsReq, request: Request) -> Any:
        s = slot(request)
        # Only the client that opened the groups may trigger (and thereby end) its fork: an upstream client
        # has no lease_id and is recognised by its group name.
        lease = s.lease if s.holds(req.lease_id) else None
        if lease is None and req.lease_id is None and s.lease is not None and s.lease.group_name == req.group_name:
            lease = s.lease
        if lease is None:
            return _fail("no fork in progress for this client; call /init_weights_send_group_for_remote_instance first")
        tm = request.app.state.tokenizer_manager
        try:
            await tm.rpc("send_weights_to_remote_instance", timeout=None, **req.model_dump(exclude={"lease_id"}))
        except RuntimeError as e:
            return _fail(f"Failed to send weights: {str(e).rstrip('.')}.")
        finally:
            s.release(lease.lease_id)
        return {"success": True, "message": "Succeeded to send weights through nccl."}
