"""Seed-side control handlers shared by both R-Fork backends: the per-rank manifest with checksums."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.rpc_registry import register_rpc
from sglang.srt.remote_instance.manifest import build_manifest, model_checksums

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


def cached_checksums(runner: Any) -> dict[str, str]:
    """Checksums of this rank's weights, computed once: weights do not change after load."""
    sums = getattr(runner, "_rfork_checksums", None)
    if sums is None:
        start = time.perf_counter()
        sums = model_checksums(runner.model)
        runner._rfork_checksums = sums
        seconds = time.perf_counter() - start
        logger.info("TP%d computed %d weight checksums in %.3f s", runner.tp_rank, len(sums), seconds)
    return sums


@register_rpc("remote_instance_weight_manifest")
def weight_manifest(scheduler: Scheduler) -> dict[str, Any]:
    """This rank's manifest: ordered tensor specs, checksums and the facts a client must share."""
    runner = scheduler.runner
    return {
        "tp_rank": runner.tp_rank,
        "tp_size": runner.tp_size,
        "architecture": scheduler.model_config.architecture,
        "dtype": str(scheduler.model_config.dtype).removeprefix("torch."),
        "tensors": [spec.to_json() for spec in build_manifest(runner.model)],
        "checksums": cached_checksums(runner),
    }
