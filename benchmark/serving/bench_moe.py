"""Decode step of a Qwen3-30B-A3B-shaped MoE model (random weights) against the roofline of the bytes a step
actually reads and against HF transformers, in one run; prints JSON.

    python benchmark/serving/bench_moe.py --batch-size 1 32 --result-filename moe.json

It writes a config-only model directory (no weights: --load-format dummy), runs sglang.bench_one_batch's
measurement on it (CUDA graphs, fused MoE) and HF transformers' generate on the same shape, and adds the
MoE roofline: a decode step reads the attention, router and norm weights of every layer, only the experts its
tokens were routed to, the lm_head, the batch's embedding rows and the KV cache, at the device's copy rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from sglang.bench_one_batch import BenchArgs, emit_report, run
from sglang.srt.server_args import ServerArgs

# Qwen/Qwen3-30B-A3B's config.json, shape fields only.
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Experts a layer reads for `tokens` tokens routed uniformly at random (random weights route about so)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def bytes_read_per_step(config: dict[str, Any], batch_size: int, context_len: float, dtype_bytes: int) -> dict:
    """Bytes one decode step of batch_size tokens must read from HBM, by part."""
    hidden, layers, head_dim = config["hidden_size"], config["num_hidden_layers"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    attention = hidden * (q + 2 * kv) + q * hidden + 2 * head_dim + 2 * hidden
    router = config["num_experts"] * hidden
    expert = 3 * config["moe_intermediate_size"] * hidden
    distinct = expected_distinct_experts(config["num_experts"], config["num_experts_per_tok"], batch_size)
    parts = {
        "attention_and_norms": layers * attention,
        "routers": layers * router,
        "active_experts": layers * distinct * expert,
        "lm_head_and_embedding_rows": config["vocab_size"] * hidden + batch_size * hidden + hidden,
        "kv_cache": batch_size * context_len * layers * 2 * kv,
    }
    return {
        "expected_distinct_experts_per_layer": distinct,
        "bytes": {name: int(count * dtype_bytes) for name, count in parts.items()},
    }


def write_model_dir(out: Path, config: dict[str, Any]) -> Path:
    """A config-only model directory (no weights, no tokenizer: the benchmark feeds token ids)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the model directory, measure, add the MoE roofline, print (and write) the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="benchmark/serving/bench_moe.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="where to write config.json (default: temp)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--result-filename", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--config-override",
        type=json.loads,
        default={},
        help="JSON merged into the config, e.g. '{\"num_hidden_layers\": 2}'",
    )
    args = parser.parse_args(argv)
    config = {**QWEN3_30B_A3B, **args.config_override}
    model_dir = write_model_dir(args.model_dir or Path(tempfile.mkdtemp(prefix="qwen3-moe-shape-")), config)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    longest = args.input_len + args.output_len
    server_args = ServerArgs(
        model_path=str(model_dir),
        load_format="dummy",
        dtype=dtype,
        device=args.device,
        max_total_tokens=max(args.batch_size) * longest + 64,
        max_running_requests=max(args.batch_size),
    )
    bench = BenchArgs(
        run_name="qwen3-30b-a3b-shape",
        batch_size=tuple(args.batch_size),
        input_len=args.input_len,
        output_len=args.output_len,
        skip_hf=args.skip_hf,
    )
    report = run(server_args, bench, " ".join(["python benchmark/serving/bench_moe.py", *argv]))
    bandwidth = report["copy_bandwidth_gb_per_s"] * 1e9
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    for row in report["results"]:
        # Decode steps see contexts from input_len to input_len + output_len; the mean is what a step reads.
        read = bytes_read_per_step(config, row["batch_size"], args.input_len + args.output_len / 2, dtype_bytes)
        total = sum(read["bytes"].values())
        row["moe_roofline"] = {**read, "total_bytes": total, "decode_ms": total / bandwidth * 1e3}
        row["decode_vs_moe_roofline"] = row["decode_median_ms"] / row["moe_roofline"]["decode_ms"]
    emit_report(report, args.result_filename)
    return report


if __name__ == "__main__":
    main()
