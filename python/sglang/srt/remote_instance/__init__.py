"""Tensor R-Fork, seed side and shared wire: control handlers that export this instance's weights, and what the
client halves in model_loader/ share with them (manifest, pair group, Mooncake guard, bootstrap server)."""

from sglang.srt.remote_instance import manifest_seed, nccl_seed, transfer_engine_seed  # noqa: F401
