"""Fused MoE on CUDA: two grouped GEMMs written in Triton over the routes (token, chosen expert).

Decode of a few tokens runs one matrix-vector product per route; larger batches first sort the routes by
expert on the device into blocks, so that each block is one matrix product against one expert's weights.

Every shape here depends only on the number of tokens, never on how they were routed, and nothing is read
back to the host, so a decode step with this path can be captured in a CUDA graph and replayed for any
routing. The price is a padded worst case: the route list has room for every expert to need one extra
partial block, and blocks past the real end exit at their first instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.activation import SiluAndMul


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def block_config(num_routes: int, num_experts: int) -> BlockConfig:
    """Tiles for num_routes (tokens x top_k) spread over num_experts; small M for decode, larger for prefill."""
    per_expert = num_routes / num_experts
    if per_expert <= 16:
        # Decode: each expert sees a handful of rows; the cost is streaming its weights once, so wide K tiles.
        return BlockConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return BlockConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return BlockConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


@dataclass(frozen=True)
class RouteBlocks:
    """Routes (token x top_k slots) grouped by expert and padded per expert to whole blocks of block_m rows."""

    route_ids: torch.Tensor  # int32 [padded_capacity]: a route index, or num_routes for a padding row
    block_expert: torch.Tensor  # int32 [padded_capacity / block_m]: the expert each block multiplies by
    num_padded: torch.Tensor  # int32 [1]: rows in use; blocks at or after it do nothing


def align_routes(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> RouteBlocks:
    """Sort the routes by expert into block_m-row blocks with device-side ops of fixed shape (no host sync)."""
    flat = topk_ids.flatten().long()
    num_routes = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_routes, device=device) - start[sorted_experts]
    dest = padded_start[sorted_experts] + rank_in_expert
    # Worst case: every expert ends with a block that holds one real row.
    capacity = triton.cdiv(num_routes + num_experts * (block_m - 1), block_m) * block_m
    route_ids = torch.full((capacity,), num_routes, dtype=torch.int32, device=device)
    route_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return RouteBlocks(route_ids, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32))


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    route_weight_ptr,
    route_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_routes,
    N,
    K,
    num_blocks_n,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROWS_PER_ROUTE: tl.constexpr,
    MUL_ROUTE_WEIGHT: tl.constexpr,
    FP32_EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C[route, :] = A[row(route), :] @ B[expert]^T for the BLOCK_M routes of this block, one BLOCK_N slice.
    pid = tl.program_id(0)
    pid_m = pid // num_blocks_n
    pid_n = pid % num_blocks_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    routes = tl.load(route_ids_ptr + offs_m)
    row_ok = routes < num_routes
    # The first GEMM reads the token's hidden state (route // top_k), the second the route's own row.
    a_rows = (routes // A_ROWS_PER_ROUTE).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_EXACT:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_ROUTE_WEIGHT:
        acc = acc * tl.load(route_weight_ptr + routes, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + routes.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    blocks: RouteBlocks,
    config: BlockConfig,
    a_rows_per_route: int,
    route_weights: torch.Tensor | None = None,
) -> None:
    """out[route] = a[route // a_rows_per_route] @ b[expert(route)]^T (times the route's weight if given)."""
    num_routes, n = out.shape
    num_blocks_n = triton.cdiv(n, config.block_n)
    grid = (blocks.block_expert.numel() * num_blocks_n,)
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        route_weights if route_weights is not None else out,
        blocks.route_ids,
        blocks.block_expert,
        blocks.num_padded,
        num_routes,
        n,
        b.shape[2],
        num_blocks_n,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        out.stride(1),
        A_ROWS_PER_ROUTE=a_rows_per_route,
        MUL_ROUTE_WEIGHT=route_weights is not None,
        FP32_EXACT=a.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


@triton.jit
def _route_gemv_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    route_weight_ptr,
    topk_ids_ptr,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROWS_PER_ROUTE: tl.constexpr,
    MUL_ROUTE_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C[route, n-slice] = A[row(route), :] @ B[expert(route), n-slice, :]^T; rows are contiguous in K.
    route = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + route).to(tl.int64)
    a_row = (route // A_ROWS_PER_ROUTE).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    b_rows = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + offs_k
        k_ok = k < K
        a = tl.load(a_ptr + a_row * stride_am + k, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(b_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * a[None, :], axis=1)
    if MUL_ROUTE_WEIGHT:
        acc = acc * tl.load(route_weight_ptr + route)
    tl.store(c_ptr + route * stride_cm + offs_n, acc.to(c_ptr.dtype.element_ty), mask=n_ok)


# Up to this many routes (a decode step of a few tokens), each route is its own matrix-vector product: no
# sorting at all, which would otherwise cost some twenty small kernels per layer, more than the products.
GEMV_MAX_ROUTES = 32
_GEMV_BLOCK_N, _GEMV_BLOCK_K = 32, 256


def route_gemv(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    topk_ids: torch.Tensor,
    a_rows_per_route: int,
    route_weights: torch.Tensor | None = None,
) -> None:
    """out[route] = a[route // a_rows_per_route] @ b[topk_ids.flat[route]]^T, one program per route and slice."""
    num_routes, n = out.shape
    grid = (num_routes, triton.cdiv(n, _GEMV_BLOCK_N))
    _route_gemv_kernel[grid](
        a,
        b,
        out,
        route_weights if route_weights is not None else out,
        topk_ids,
        n,
        b.shape[2],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        A_ROWS_PER_ROUTE=a_rows_per_route,
        MUL_ROUTE_WEIGHT=route_weights is not None,
        BLOCK_N=_GEMV_BLOCK_N,
        BLOCK_K=_GEMV_BLOCK_K,
        num_warps=4,
    )


_act = SiluAndMul()


def triton_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The same result as torch_experts, from two grouped GEMMs over the routes sorted by expert."""
    num_tokens, top_k = topk_ids.shape
    num_routes, num_experts = num_tokens * top_k, w13.shape[0]
    # Both kernels index the weights' last dimension with stride 1.
    x, w13, w2 = hidden_states.contiguous(), w13.contiguous(), w2.contiguous()
    route_weights = topk_weights.flatten().contiguous()
    gate_up = torch.empty(num_routes, w13.shape[1], dtype=x.dtype, device=x.device)
    down = torch.empty(num_routes, w2.shape[1], dtype=x.dtype, device=x.device)
    if num_routes <= GEMV_MAX_ROUTES:
        ids = topk_ids.flatten().contiguous()
        route_gemv(x, w13, gate_up, ids, a_rows_per_route=top_k)
        route_gemv(_act(gate_up), w2, down, ids, a_rows_per_route=1, route_weights=route_weights)
    else:
        config = block_config(num_routes, num_experts)
        blocks = align_routes(topk_ids, num_experts, config.block_m)
        grouped_gemm(x, w13, gate_up, blocks, config, a_rows_per_route=top_k)
        grouped_gemm(_act(gate_up), w2, down, blocks, config, a_rows_per_route=1, route_weights=route_weights)
    # Each token's top_k weighted expert outputs are adjacent rows; their sum is the block's output.
    return down.view(num_tokens, top_k, -1).sum(dim=1)
