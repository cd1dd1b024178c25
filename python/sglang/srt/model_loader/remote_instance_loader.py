"""`--load-format remote_instance`: build the model skeleton and fill it from a running seed (Tensor R-Fork)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import all_gather_pyobj, get_tp_rank, get_tp_size
from sglang.srt.metrics import rfork_progress
from sglang.srt.model_loader.loader import BaseModelLoader, build_model_skeleton, register_loader
from sglang.srt.model_loader.remote_instance_weight_loader_utils import RemoteInstanceError, SeedClient
from sglang.srt.remote_instance.manifest import TensorSpec, build_manifest, diff_manifests, verify_checksums

logger = logging.getLogger(__name__)


@dataclass
class ForkContext:
    """What a backend needs to pull one TP rank's weights from the seed."""

    seed: SeedClient
    load_config: LoadConfig
    tp_rank: int
    tp_size: int
    device: torch.device
    deadline: float  # time.monotonic() by which the whole fork must be done
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # backend facts for the report, e.g. the transport used

    def remaining(self) -> float:
        """Seconds left before the deadline (at least 1, so a late step still fails with its own message)."""
        return max(1.0, self.deadline - time.monotonic())


@dataclass
class RemoteManifest:
    """The seed's view of this rank: its tensor specs and checksums, as far as it publishes them (an upstream
    seed publishes neither; `unverified` then says what this fork cannot check)."""

    specs: list[TensorSpec] | None
    checksums: dict[str, str] | None = None
    unverified: str | None = None
    # A backend that checks bytes its own way (a fork into another TP size): returns the names that differ.
    verify: Callable[[nn.Module], list[str]] | None = None


class RemoteWeightBackend(ABC):
    """One way of moving bytes from a seed rank into this rank's parameters."""

    def preflight(self, ctx: ForkContext) -> None:
        """Checks that must pass before anything on the seed is touched (default: none)."""
        return None

    @abstractmethod
    def fetch_manifest(self, ctx: ForkContext) -> RemoteManifest:
        """The seed's manifest for ctx.tp_rank."""

    @abstractmethod
    def transfer(self, model: nn.Module, ctx: ForkContext) -> int:
        """Fill model's parameters from the seed; returns the bytes moved."""


REMOTE_BACKENDS: dict[str, Callable[[], RemoteWeightBackend]] = {}


def register_remote_backend(name: str) -> Callable:
    """Class decorator: make a backend selectable with --remote-instance-weight-loader-backend name."""

    def wrap(cls: Callable[[], RemoteWeightBackend]) -> Callable[[], RemoteWeightBackend]:
        REMOTE_BACKENDS[name] = cls
        return cls

    return wrap


def _load_backends() -> None:
    from sglang.srt.model_loader import nccl_client  # noqa: F401

    try:
        from sglang.srt.model_loader import transfer_engine_client  # noqa: F401
    except ImportError:
        pass


@register_loader(LoadFormat.REMOTE_INSTANCE)
class RemoteInstanceModelLoader(BaseModelLoader):
    """Loads nothing from disk: every parameter comes from the seed's matching TP rank."""

    def load_model(self, model_config: ModelConfig, device: torch.device) -> nn.Module:
        cfg = self.load_config
        _load_backends()
        if cfg.remote_backend not in REMOTE_BACKENDS:
            raise ValueError(
                f"Unknown --remote-instance-weight-loader-backend {cfg.remote_backend!r}; "
                f"available here: {', '.join(sorted(REMOTE_BACKENDS))}."
            )
        seed = SeedClient(cfg.seed_instance_ip, cfg.seed_instance_service_port, cfg.timeout, cfg.seed_api_key)
        ctx = ForkContext(seed, cfg, get_tp_rank(), get_tp_size(), device, time.monotonic() + cfg.timeout)
        backend = REMOTE_BACKENDS[cfg.remote_backend]()
        start = time.perf_counter()
        model = build_model_skeleton(model_config, device)
        _step(ctx, "skeleton", start)

        t = time.perf_counter()
        agree_across_ranks(ctx, "preflight", capture_error(lambda: backend.preflight(ctx)))
        remote = None

        def check_manifest() -> None:
            nonlocal remote
            remote = backend.fetch_manifest(ctx)
            if remote.unverified:
                if cfg.refuse_unverified:
                    raise RemoteInstanceError(
                        ctx.seed.name,
                        "manifest",
                        f"{remote.unverified}; refusing to fork (--remote-instance-weight-loader-refuse-unverified)",
                    )
                logger.warning("TP%d: %s; forking over upstream's protocol anyway", ctx.tp_rank, remote.unverified)
            if remote.specs is None:
                return
            diffs = diff_manifests(build_manifest(model), remote.specs)
            if diffs:
                raise RemoteInstanceError(
                    ctx.seed.name,
                    "manifest",
                    f"TP{ctx.tp_rank} of the seed holds a different model: "
                    + "; ".join(diffs)
                    + ". Start the client with the seed's model, --dtype and --tp-size.",
                )

        agree_across_ranks(ctx, "manifest", capture_error(check_manifest))
        _step(ctx, "manifest", t)

        t = time.perf_counter()
        started = time.time()  # wall clock, so a benchmark can line the fork up with the seed's own timeline
        moved: list[int] = []
        label = f"TP{ctx.tp_rank} R-Fork from {seed.name} via {cfg.remote_backend}"
        # The bytes this rank receives are its own parameters' (an upstream seed sends no manifest to count from).
        with rfork_progress.track(label, sum(spec.nbytes for spec in build_manifest(model))):
            agree_across_ranks(ctx, "transfer", capture_error(lambda: moved.append(backend.transfer(model, ctx))))
        window = [started, time.time()]
        nbytes = moved[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # Backends with a setup phase record the pure data movement as "transfer" themselves.
        transfer_s = ctx.timings.get("transfer") or _step(ctx, "transfer", t)

        if cfg.verify and (remote.checksums is not None or remote.verify is not None):
            t = time.perf_counter()
            bad = remote.verify(model) if remote.verify else verify_checksums(model, remote.checksums)
            err = None
            if bad:
                err = RemoteInstanceError(
                    ctx.seed.name,
                    "verify",
                    f"{len(bad)} tensor(s) arrived corrupted on TP{ctx.tp_rank}, "
                    f"e.g. {bad[:3]}; refusing to serve them",
                )
            agree_across_ranks(ctx, "verify", err)
            _step(ctx, "verify", t)
        elif cfg.verify:
            logger.warning("TP%d: the seed publishes no checksums; bytes were not verified", ctx.tp_rank)

        model.post_load_weights()
        gbps = nbytes / max(transfer_s, 1e-9) / 1e9
        steps = ", ".join(f"{k} {v:.3f} s" for k, v in ctx.timings.items())
        logger.info(
            "TP%d R-Fork from %s via %s: %.1f MB in %.3f s (%.2f GB/s); steps: %s",
            ctx.tp_rank,
            seed.name,
            cfg.remote_backend,
            nbytes / 1e6,
            transfer_s,
            gbps,
            steps,
        )
        self.fork_report = {
            "bytes": nbytes,
            "transfer_s": transfer_s,
            "gbps": gbps,
            "timings": dict(ctx.timings),
            "backend_window_unix_s": window,
            **ctx.details,
        }
        return model


def seed_tp_size(ctx: ForkContext) -> int | None:
    """The seed's --tp-size from its /get_server_info (None when that cannot be learned)."""
    try:
        info = ctx.seed.request("diagnose", "GET", "/get_server_info", timeout=min(ctx.remaining(), 5.0))
    except RemoteInstanceError:
        return None
    tp = info.get("tp_size") if isinstance(info, dict) else None
    return tp if isinstance(tp, int) else None


def capture_error(fn: Callable[[], None]) -> Exception | None:
    try:
        fn()
    except Exception as e:  # reported after every rank has had its say, see agree_across_ranks
        return e
    return None


def agree_across_ranks(ctx: ForkContext, step: str, error: Exception | None) -> None:
    """Every client rank learns whether any rank failed, so no rank goes on to wait for a partner that quit."""
    errors = all_gather_pyobj(None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        rank, message = failed[0]
        raise RemoteInstanceError(ctx.seed.name, step, f"TP{rank} failed: {message}")


def _step(ctx: ForkContext, name: str, start: float) -> float:
    ctx.timings[name] = time.perf_counter() - start
    return ctx.timings[name]
