"""Tensor R-Fork, seed side: control handlers that export this instance's weights."""

from sglang.srt.remote_instance import nccl_sender, seed_rpc, transfer_engine_seed  # noqa: F401
