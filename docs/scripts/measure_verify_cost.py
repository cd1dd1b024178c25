"""Measure what R-Fork's verification costs: the per-tensor checksum over a model-sized set of weights.

    python docs/scripts/measure_verify_cost.py --megabytes 512 --dtype bfloat16

Prints one JSON object (bytes hashed, seconds, GB/s) next to a plain read of the same bytes
(`tensor.sum()`), so the result says how close to a memory-bound read the checksum runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from sglang.srt.remote_instance.manifest import tensor_checksum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights(total_bytes: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Tensors shaped like a transformer's: a few large matrices and many small norms."""
    esize = torch.empty((), dtype=dtype).element_size()
    hidden = 2048
    per_matrix = hidden * hidden * esize
    out = []
    while sum(t.numel() * t.element_size() for t in out) + per_matrix <= total_bytes:
        out.append(torch.randn(hidden, hidden, dtype=torch.float32, device=device).to(dtype))
        out.append(torch.randn(hidden, dtype=torch.float32, device=device).to(dtype))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tensors = weights(args.megabytes * 10**6, DTYPES[args.dtype], args.device)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    checksum_s = best_of(lambda: [tensor_checksum(t) for t in tensors], args.repeats)
    read_s = best_of(lambda: [float(t.sum()) for t in tensors], args.repeats)
    print(
        json.dumps(
            {
                "bytes": nbytes,
                "tensors": len(tensors),
                "dtype": args.dtype,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "checksum_s": round(checksum_s, 3),
                "checksum_gbps": round(nbytes / checksum_s / 1e9, 2),
                "plain_read_s": round(read_s, 3),
                "plain_read_gbps": round(nbytes / read_s / 1e9, 2),
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
