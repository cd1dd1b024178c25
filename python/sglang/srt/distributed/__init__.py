"""Tensor-parallel process groups and collectives."""

from sglang.srt.distributed.parallel_state import (  # noqa: F401
    broadcast_pyobj,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_distributed,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
