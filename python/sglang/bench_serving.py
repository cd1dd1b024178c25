"""`python -m sglang.bench_serving`: load a running server with prompts and report latency percentiles.

Requests go to the native `/generate` (--backend sglang, the default) or the OpenAI-compatible `/v1/completions`
(--backend sglang-oai) as token ids, streamed, with `ignore_eos` so each produces exactly the asked number of tokens.
Prompts are random token ids (--dataset-name random) or the first turns of a ShareGPT-format file (sharegpt).
Arrivals follow a Poisson process at --request-rate (all at once when it is inf), optionally capped at
--max-concurrency requests in flight. Prints one JSON object.

    python -m sglang.bench_serving --backend sglang --base-url http://127.0.0.1:30000 \\
        --num-prompts 200 --random-input-len 512 --random-output-len 128 --max-concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

# Server flags worth recording next to the numbers they produced.
_SERVER_FIELDS = (
    "model_path",
    "dtype",
    "tp_size",
    "attention_backend",
    "disable_cuda_graph",
    "cuda_graph_max_bs",
    "max_running_requests",
    "chunked_prefill_size",
)


@dataclass
class RequestResult:
    """What one request saw: time to first token, gaps between later chunks, end-to-end latency."""

    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Backend:
    """How one --backend streams a request: its path, its request body, and how a chunk reports the output."""

    path: str
    payload: Callable[[str, list[int], int], dict[str, Any]]
    # (chunk) -> whether it carries new tokens, and the output length it reports (None if it reports none)
    read: Callable[[dict[str, Any]], tuple[bool, int | None]]


def _oai_payload(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def _oai_read(chunk: dict[str, Any]) -> tuple[bool, int | None]:
    usage = chunk.get("usage")
    return bool(chunk.get("choices")), usage["completion_tokens"] if usage else None


def _native_payload(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    params = {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    return {"input_ids": prompt, "sampling_params": params, "stream": True}


def _native_read(chunk: dict[str, Any]) -> tuple[bool, int | None]:
    # Every event of a /generate stream carries new tokens; completion_tokens counts all of them so far.
    return True, chunk["meta_info"]["completion_tokens"]


# Upstream's backend names: "sglang" is the native /generate API (upstream's default), "sglang-oai" the OpenAI one.
BACKENDS: dict[str, Backend] = {
    "sglang": Backend("/generate", _native_payload, _native_read),
    "sglang-oai": Backend("/v1/completions", _oai_payload, _oai_read),
}


async def send_request(
    session: aiohttp.ClientSession, backend: Backend, base_url: str, model: str, prompt: list[int], max_tokens: int
) -> RequestResult:
    """Stream one request and time its chunks."""
    result = RequestResult(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with session.post(base_url + backend.path, json=backend.payload(model, prompt, max_tokens)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                has_tokens, output_len = backend.read(json.loads(line[len("data:") :]))
                if output_len is not None:
                    result.output_len = output_len
                if not has_tokens:
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    return result


def random_requests(
    num: int, input_len: int, output_len: int, range_ratio: float, vocab: list[int], seed: int
) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) pairs; lengths are uniform in [range_ratio * len, len] like upstream's."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in = rng.randint(max(int(input_len * range_ratio), 1), input_len)
        n_out = rng.randint(max(int(output_len * range_ratio), 1), output_len)
        out.append(([rng.choice(vocab) for _ in range(n_in)], n_out))
    return out


def sharegpt_requests(
    path: str, num: int, tokenizer: Any, output_len: int | None, context_len: int, seed: int
) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) pairs from a ShareGPT-format JSON file, as upstream: each conversation's first
    turn is the prompt and the second's length the output length (unless output_len is given); pairs shorter
    than 2 tokens either way, or longer than context_len together, are skipped."""
    with open(path, encoding="utf-8") as f:
        conversations = [c.get("conversations", []) for c in json.load(f)]
    pairs = [(c[0]["value"], c[1]["value"]) for c in conversations if len(c) >= 2]
    random.Random(seed).shuffle(pairs)
    out: list[tuple[list[int], int]] = []
    for prompt, answer in pairs:
        ids = tokenizer.encode(prompt)
        n_out = output_len or len(tokenizer.encode(answer, add_special_tokens=False))
        if len(ids) < 2 or n_out < 2 or len(ids) + n_out > context_len:
            continue
        out.append((ids, n_out))
        if len(out) == num:
            break
    if not out:
        raise SystemExit(f"{path}: no conversation with a prompt and an answer that fit {context_len} tokens")
    return out


async def arrivals(items: list[Any], rate: float, seed: int) -> AsyncIterator[Any]:
    """Yield items with exponential gaps of mean 1/rate (no gaps when rate is inf)."""
    rng = random.Random(seed)
    for item in items:
        yield item
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


def _percentiles(name: str, values_s: list[float], points: tuple[int, ...]) -> dict[str, float]:
    ms = np.asarray(values_s or [0.0]) * 1e3
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms))}
    out.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in points})
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughput and TTFT / ITL / TPOT / end-to-end percentiles (upstream's key names)."""
    ok = [r for r in results if r.error is None]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_throughput": (total_in + total_out) / duration,
        **_percentiles("ttft", [r.ttft for r in ok], (90, 99)),
        **_percentiles("itl", [gap for r in ok for gap in r.itl], (90, 95, 99)),
        **_percentiles("tpot", tpots, (90, 99)),
        **_percentiles("e2e_latency", [r.latency for r in ok], (90, 99)),
    }


async def benchmark(args: argparse.Namespace, model: str, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    """Warm up with one request, then run them all and summarize."""
    backend, url = BACKENDS[args.backend], args.base_url.rstrip("/")
    limit = asyncio.Semaphore(args.max_concurrency or len(requests) or 1)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        warm = await send_request(session, backend, url, model, requests[0][0], min(requests[0][1], 4))
        if warm.error:
            raise SystemExit(f"warm-up request to {url} failed: {warm.error}")

        async def limited(prompt: list[int], max_tokens: int) -> RequestResult:
            async with limit:
                return await send_request(session, backend, url, model, prompt, max_tokens)

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(p, n)) async for p, n in arrivals(requests, args.request_rate, args.seed)]
        results = await asyncio.gather(*tasks)
        return summarize(results, time.perf_counter() - start)


def _get_json(base_url: str, path: str) -> dict[str, Any]:
    import requests

    resp = requests.get(base_url.rstrip("/") + path, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _vocab(tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Upstream bench_serving's flag names (random and ShareGPT datasets; native and OpenAI-compatible backends)."""
    p = argparse.ArgumentParser(prog="python -m sglang.bench_serving")
    p.add_argument("--backend", default="sglang", choices=sorted(BACKENDS))
    p.add_argument("--base-url", default=None, help="default: http://{--host}:{--port}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name sent with requests; default: the server's")
    p.add_argument("--tokenizer", default=None, help="where prompt ids come from; default: the server's model path")
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"])
    p.add_argument("--dataset-path", default=None, help="the ShareGPT-format JSON file (--dataset-name sharegpt)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="output length of every ShareGPT request")
    p.add_argument(
        "--sharegpt-context-len", type=int, default=None, help="skip longer pairs; default: the server's context"
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=512)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths drawn from [ratio*len, len]")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.dataset_name == "sharegpt" and not args.dataset_path:
        p.error("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark against a live server and print (and optionally write) the JSON report."""
    from sglang.bench_one_batch import emit_report, machine_name

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    server = _get_json(args.base_url, "/get_server_info")
    model = args.model or _get_json(args.base_url, "/v1/models")["data"][0]["id"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or server.get("tokenizer_path") or server["model_path"])
    if args.dataset_name == "sharegpt":
        context = args.sharegpt_context_len or _get_json(args.base_url, "/get_model_info")["context_length"]
        requests = sharegpt_requests(
            args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len, context, args.seed
        )
    else:
        requests = random_requests(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            _vocab(tokenizer),
            args.seed,
        )
    metrics = asyncio.run(benchmark(args, model, requests))
    report = {
        "command": " ".join(["python -m sglang.bench_serving", *argv]),
        # The client's host; the usual setup runs it beside the server it measures.
        "machine": machine_name(server.get("device") or "cpu"),
        "base_url": args.base_url,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "dataset_path": args.dataset_path,
        "num_prompts": len(requests),
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency,
        "server": {key: server.get(key) for key in _SERVER_FIELDS},
        **metrics,
    }
    emit_report(report, args.output_file)
    return report


if __name__ == "__main__":
    main()
