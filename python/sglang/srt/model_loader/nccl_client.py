"""Client side of the NCCL backend (gloo on CPU): lease the seed, join a pair group per rank, receive."""

from __future__ import annotations

import threading
import time
from typing import Any

from torch import nn

from sglang.srt.distributed.parallel_state import all_gather_pyobj, broadcast_pyobj
from sglang.srt.model_loader.remote_instance_loader import (
    ForkContext,
    RemoteManifest,
    RemoteWeightBackend,
    agree_across_ranks,
    capture_error,
    register_remote_backend,
    seed_tp_size,
)
from sglang.srt.model_loader.remote_instance_weight_loader_utils import RemoteInstanceError
from sglang.srt.remote_instance.addresses import local_ip_towards
from sglang.srt.remote_instance.manifest import TensorSpec, weight_tensors
from sglang.srt.remote_instance.pair_group import PairGroupError, join_seed_group


class _Call(threading.Thread):
    """Runs a blocking seed request next to our own group work (the seed answers only once both sides acted)."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.fn()
        except Exception as e:  # surfaced by result()
            self.error = e

    def result(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError("the seed did not answer in time")
        if self.error is not None:
            raise self.error


def _agree_while(ctx: ForkContext, step: str, fn: Any, watched: _Call | None) -> None:
    """Run fn while every client rank keeps polling the others, so a failure anywhere (a seed that refused
    the request rank 0 sent, a rank that could not join) ends all ranks at once instead of at the timeout."""
    worker = _Call(fn)
    worker.start()
    while True:
        mine = worker.error
        if mine is None and watched is not None and not watched.is_alive():
            mine = watched.error
            if isinstance(mine, RemoteInstanceError):
                mine = mine.at_step(step)  # the seed's answer arrives during whichever step we are in
        done = not worker.is_alive() and worker.error is None
        states = all_gather_pyobj((done, None if mine is None else str(mine)))
        if mine is not None:
            raise mine
        failed = [(rank, err) for rank, (_, err) in enumerate(states) if err]
        if failed:
            raise RemoteInstanceError(ctx.seed.name, step, f"TP{failed[0][0]} failed: {failed[0][1]}")
        if all(d for d, _ in states):
            return
        if time.monotonic() > ctx.deadline:
            raise RemoteInstanceError(
                ctx.seed.name, step, "did not finish before --remote-instance-weight-loader-timeout"
            )
        worker.join(0.005)  # wakes at once when this rank's work ends


UPSTREAM_SEED = (
    "the seed serves no /remote_instance_weight_manifest (an upstream SGLang seed?): parameter names, dtypes, "
    "shapes and checksums cannot be verified, only that every broadcast arrived"
)


@register_remote_backend("nccl")
class NcclBackend(RemoteWeightBackend):
    """Upstream's wire protocol plus a lease, so a second client waits (HTTP 409) instead of colliding; against an
    upstream seed (no manifest), upstream's protocol alone: no lease, init then send."""

    def __init__(self) -> None:
        self.lease_id: str | None = None
        self.upstream_seed = False

    def fetch_manifest(self, ctx: ForkContext) -> RemoteManifest:
        try:
            data = ctx.seed.request("manifest", "GET", "/remote_instance_weight_manifest", params={"rank": ctx.tp_rank})
        except RemoteInstanceError as e:
            if "HTTP 400" in e.detail:  # this rank does not exist on the seed: say why, if the TP sizes differ
                _refuse_other_tp(ctx, seed_tp_size(ctx))
            if "HTTP 404" not in e.detail:
                raise
            self.upstream_seed = True
            return RemoteManifest(None, None, UPSTREAM_SEED)
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), list):
            raise RemoteInstanceError(ctx.seed.name, "manifest", f"malformed manifest answer: {str(data)[:200]}")
        _refuse_other_tp(ctx, data.get("tp_size"))
        return RemoteManifest([TensorSpec.from_json(d) for d in data["tensors"]], data.get("checksums"))

    def transfer(self, model: nn.Module, ctx: ForkContext) -> int:
        ports = list(ctx.load_config.send_weights_group_ports or [])
        if len(ports) != ctx.tp_size:
            raise RemoteInstanceError(
                ctx.seed.name,
                "ports",
                f"--remote-instance-weight-loader-send-weights-group-ports has "
                f"{len(ports)} port(s) for --tp-size {ctx.tp_size}; give exactly one per TP rank",
            )
        client_ip = local_ip_towards(ctx.seed.ip)
        body = {
            "master_address": ctx.seed.ip,
            "ports": ",".join(map(str, ports)),
            "group_name": f"send_weights_{client_ip}",
        }
        port = ports[ctx.tp_rank]
        key = f"{body['group_name']}_{port}_{ctx.tp_rank}"
        try:
            return self._transfer(model, ctx, body, port, key)
        finally:
            if ctx.tp_rank == 0 and self.lease_id is not None:
                self._release(ctx)

    def _transfer(self, model: nn.Module, ctx: ForkContext, body: dict[str, Any], port: int, key: str) -> int:
        t = time.perf_counter()
        if ctx.tp_rank == 0 and not self.upstream_seed:
            err = capture_error(lambda: self._lease(ctx, body["ports"]))
        else:
            err = None
        agree_across_ranks(ctx, "lease", err)
        if not self.upstream_seed:
            body = broadcast_pyobj({**body, "lease_id": self.lease_id}, src=0)

        # Ours: one call, the seed forms the group and broadcasts right away (the send_weights extension); its
        # answer arrives once the weights are sent, so "transfer" below starts when this rank's group is ready.
        # An upstream seed gets upstream's two calls: init (answered once every group formed), then send.
        extension = {} if self.upstream_seed else {"send_weights": True}
        init = _Call(
            lambda: ctx.seed.request(
                "init group",
                "POST",
                "/init_weights_send_group_for_remote_instance",
                json={**body, "group_rank": 0, "world_size": 2, "backend": "nccl", **extension},
                timeout=ctx.remaining(),
            )
        )
        if ctx.tp_rank == 0:
            init.start()
        watched = init if ctx.tp_rank == 0 else None
        group = None

        def join() -> None:
            nonlocal group
            try:
                group = join_seed_group(ctx.seed.ip, port, key, ctx.device, ctx.remaining())
            except PairGroupError as e:
                raise RemoteInstanceError(ctx.seed.name, "join group", str(e)) from None

        try:
            _agree_while(ctx, "init group", join, watched)
        except Exception:
            if group is not None:
                group.close()
            raise
        ctx.timings["group setup"] = time.perf_counter() - t

        if self.upstream_seed:
            # An upstream seed rank fails a send that arrives before its group exists: wait for init's answer.
            try:
                err = capture_error(lambda: init.result(ctx.remaining())) if ctx.tp_rank == 0 else None
                agree_across_ranks(ctx, "init group", err)
            except Exception:
                group.close()
                raise
            send_body = {k: body[k] for k in ("master_address", "ports", "group_name")}
            init = _Call(
                lambda: ctx.seed.request(
                    "send weights", "POST", "/send_weights_to_remote_instance", json=send_body, timeout=ctx.remaining()
                )
            )
            if ctx.tp_rank == 0:
                init.start()
            watched = init if ctx.tp_rank == 0 else None
        t = time.perf_counter()
        tensors = [tensor for _, tensor in weight_tensors(model)]
        received_at: list[float] = []

        def receive() -> None:
            try:
                group.broadcast_all(tensors, ctx.deadline)
            except (PairGroupError, RuntimeError) as e:
                group.close()
                raise RemoteInstanceError(ctx.seed.name, "transfer", f"receiving weights failed: {e}") from None
            received_at.append(time.perf_counter())
            group.close_later()
            if ctx.tp_rank == 0:
                init.result(ctx.remaining())

        _agree_while(ctx, "transfer", receive, watched)
        # "transfer" is the data movement alone; the seed's acknowledgement is "teardown" (groups close in the
        # background on both sides).
        ctx.timings["transfer"] = received_at[0] - t
        ctx.timings["teardown"] = time.perf_counter() - received_at[0]
        return sum(x.numel() * x.element_size() for x in tensors)

    def _lease(self, ctx: ForkContext, ports: str) -> None:
        data = ctx.seed.request(
            "lease",
            "POST",
            "/remote_instance_fork_lease",
            json={"ports": ports},
            retry_busy_until=ctx.deadline,
        )
        self.lease_id = data["lease_id"]

    def _release(self, ctx: ForkContext) -> None:
        try:
            ctx.seed.request(
                "release", "POST", "/remote_instance_fork_lease/release", json={"lease_id": self.lease_id}, timeout=5
            )
        except RemoteInstanceError:
            pass  # the seed drops an unreleased lease on its own when it expires
        self.lease_id = None


def _refuse_other_tp(ctx: ForkContext, seed_tp: Any) -> None:
    """A pair group joins client rank i to seed rank i: a seed of another TP size is refused before any group."""
    if isinstance(seed_tp, int) and seed_tp != ctx.tp_size:
        raise RemoteInstanceError(
            ctx.seed.name,
            "manifest",
            f"the seed runs --tp-size {seed_tp} and this client {ctx.tp_size}: "
            "the NCCL backend needs equal TP sizes. "
            f"Start the client with --tp-size {seed_tp}, or fork with --remote-instance-weight-loader-backend "
            "transfer_engine from a seed started with --remote-instance-weight-loader-start-seed-via-transfer-engine "
            "(it can change the TP size)",
        )
