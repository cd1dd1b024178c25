"""Server arguments: one dataclass, the CLI generated from it, validation in one place."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.server_args_rfork import check_remote_instance_args, resolve_remote_instance_load

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "remote_instance")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
DEVICES = ("cpu", "cuda")
ATTENTION_BACKENDS = ("torch_native", "flashinfer")
REMOTE_BACKENDS = ("nccl", "transfer_engine")
SAMPLING_DEFAULTS = ("model", "openai")
GRAMMAR_BACKENDS = ("xgrammar", "none")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


MISSING_MODEL_PATH = "--model-path is required: pass the directory of an HF model."


class ServerArgsError(ValueError):
    """Raised when the server arguments are inconsistent; the message says what to change."""


def _opt(help: str, **kw: Any) -> Any:
    """A dataclass field that carries its CLI help text (and choices/flags) as metadata."""
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerArgs:
    """Every knob of a server or an offline Engine; field names are upstream SGLang's flag names."""

    # Model and tokenizer
    model_path: str = _opt(
        "Path of the HF model directory (config, tokenizer, weights), or a Hugging Face Hub id (ORG/NAME), "
        "resolved through the Hub cache (downloaded when missing; cache only with HF_HUB_OFFLINE=1).",
        default=None,
    )
    revision: str | None = _opt("Hub revision (branch, tag or commit) of a --model-path Hub id; defaults to main.")
    download_dir: str | None = _opt("Hugging Face cache directory for Hub ids; defaults to the Hub's (HF_HUB_CACHE).")
    tokenizer_path: str | None = _opt("Path of the tokenizer; defaults to --model-path.")
    trust_remote_code: bool = _opt("Allow custom model code from the hub (kept for compatibility).", default=False)
    dtype: str = _opt(
        "Data type of weights and activations. auto: the checkpoint's, except that float32 checkpoints run in "
        "float16 (bfloat16 for Gemma) on GPUs, as upstream SGLang; on CPU always float32.",
        default="auto",
        choices=DTYPES,
    )
    context_length: int | None = _opt("Maximum context length; defaults to the model's.")
    chat_template: str | None = _opt(
        "Chat template for /v1/chat/completions instead of the tokenizer's: a Jinja file, or a built-in name "
        "(chatml, llama-3-instruct)."
    )
    served_model_name: str | None = _opt("Model name reported by the OpenAI API; defaults to --model-path.")
    load_format: str = _opt("How weights are loaded.", default="auto", choices=LOAD_FORMATS)
    grammar_backend: str = _opt(
        "Structured output (json_schema, regex, ebnf, response_format): 'xgrammar', or 'none' to turn it off "
        "(requests that ask for it are then refused with a 400).",
        default="xgrammar",
        choices=GRAMMAR_BACKENDS,
    )
    sampling_defaults: str = _opt(
        "Where the sampling values of fields a request leaves out come from: 'model' reads temperature, top_p, "
        "top_k, min_p and repetition_penalty from the model's generation_config.json; 'openai' uses the constants "
        "of the sampling-parameter table (temperature 1, top_p 1, ...). A request's own values always win.",
        default="model",
        choices=SAMPLING_DEFAULTS,
    )

    # HTTP server
    host: str = _opt("Host the HTTP server binds to.", default="127.0.0.1")
    port: int = _opt("Port of the HTTP server.", default=30000)
    api_key: str | None = _opt(
        "If set, every endpoint except /health and /metrics requires 'Authorization: Bearer <key>'."
    )
    log_level: str = _opt("Logging level.", default="info", choices=LOG_LEVELS)
    decode_log_interval: int = _opt(
        "Log one 'Decode batch' line (running requests, KV usage, generation throughput, queue) every this many "
        "decode steps; every prefill batch logs its own line.",
        default=40,
    )
    enable_metrics: bool = _opt(
        "Serve Prometheus metrics at /metrics (request counters, latency histograms, scheduler gauges, R-Fork).",
        default=False,
    )
    log_requests: bool = _opt(
        "Log every request when it arrives and when it ends; --log-requests-level sets how much.", default=False
    )
    log_requests_level: int = _opt(
        "0: id, sizes, finish reason and latency; 1: also the sampling parameters; 2: also the output text "
        "(cut to 2048 characters); 3: also the prompt text, and nothing cut.",
        default=2,
        choices=(0, 1, 2, 3),
    )

    # Request limits (ours): bad or oversized input is refused with a 4xx naming the field and the flag
    max_request_body_bytes: int = _opt(
        "Largest HTTP request body accepted; a larger one gets 413 before it is parsed.", default=32 << 20
    )
    max_stop_strings: int = _opt("Most stop strings one request may give ('stop').", default=64)
    max_stop_string_length: int = _opt("Longest stop string (characters) a request may give.", default=512)
    max_n: int = _opt("Largest 'n' (choices sampled per prompt) a request may ask for.", default=64)
    max_top_logprobs_num: int = _opt(
        "Largest top_logprobs_num of a native /generate request (the OpenAI routes allow at most 20).", default=256
    )

    # Device and parallelism
    device: str | None = _opt("Device: cuda or cpu; defaults to cuda when available.", choices=DEVICES)
    tp_size: int = _opt("Tensor parallel size.", default=1)
    base_gpu_id: int = _opt("First GPU id used by this instance.", default=0)
    nnodes: int = _opt("Number of nodes (launches) that share the TP ranks.", default=1)
    node_rank: int = _opt("Rank of this node among --nnodes.", default=0)
    dist_init_addr: str | None = _opt("host:port of the torch.distributed rendezvous for multi-node runs.")
    random_seed: int | None = _opt("Random seed; defaults to a fixed value so runs are reproducible.")

    # Memory and scheduling
    mem_fraction_static: float | None = _opt("Fraction of device memory for weights plus KV cache.")
    max_total_tokens: int | None = _opt("Size of the KV cache in tokens; overrides --mem-fraction-static.")
    page_size: int = _opt(
        "Tokens per KV cache page: slots are handed out in pages of this many, a request fills its page before it "
        "takes the next, and the prefix cache reuses whole pages only (a partly written last page is not cached). "
        "FlashInfer then reads the cache page by page; on an H200 with a Llama-3-8B shape 16 was slower than 1.",
        default=1,
    )
    max_running_requests: int | None = _opt("Maximum number of requests in a batch.")
    stream_interval: int = _opt(
        "Send a request's new tokens to the HTTP process every this many decode steps (its first token and its end "
        "at once): fewer, larger stream chunks, less work for the HTTP process at high concurrency.",
        default=1,
    )
    incremental_streaming_output: bool = _opt(
        "Each chunk of a streamed /generate (and Engine) output holds only what is new since the previous chunk "
        "(text, output_ids, logprobs) instead of everything so far. The OpenAI routes stream deltas either way.",
        default=False,
    )
    chunked_prefill_size: int | None = _opt("Maximum tokens prefilled in one forward pass (-1 disables chunking).")
    attention_backend: str | None = _opt("Attention kernels.", choices=ATTENTION_BACKENDS)
    disable_radix_cache: bool = _opt("Disable the radix prefix cache.", default=False)
    cuda_graph_max_bs: int | None = _opt("Largest decode batch captured in a CUDA graph.")
    disable_cuda_graph: bool = _opt("Disable CUDA graphs.", default=False)
    disable_overlap_schedule: bool = _opt(
        "Run each step's stop checks and outputs before launching the next step, instead of while it runs "
        "(overlap scheduling, the default; outputs are the same either way).",
        default=False,
    )

    # Tensor R-Fork (upstream flag names)
    remote_instance_weight_loader_seed_instance_ip: str | None = _opt("R-Fork: IP of the seed instance.")
    remote_instance_weight_loader_seed_instance_service_port: int | None = _opt(
        "R-Fork: HTTP port of the seed instance."
    )
    remote_instance_weight_loader_send_weights_group_ports: list[int] | None = _opt(
        "R-Fork (nccl): JSON list of group ports on the seed host, one per TP rank, e.g. '[60000,60001]'.",
        parse=json.loads,
    )
    remote_instance_weight_loader_backend: str = _opt(
        "R-Fork: transfer backend used by a client.", default="nccl", choices=REMOTE_BACKENDS
    )
    remote_instance_weight_loader_start_seed_via_transfer_engine: bool = _opt(
        "R-Fork: publish this instance's weights through a Mooncake TransferEngine.", default=False
    )
    engine_info_bootstrap_port: int = _opt("R-Fork: port of the TransferEngine info bootstrap server.", default=6789)
    remote_instance_weight_loader_peer_assist: bool = _opt(
        "R-Fork (ours, transfer_engine): fan-out. While forking, serve the tensors already verified to other "
        "clients of the same seed and read from them too (every byte checked against the seed's checksums); keep "
        "serving them once forked. Off: every byte comes from the seed.",
        default=False,
    )
    remote_instance_weight_loader_timeout: float = _opt(
        "R-Fork (ours): seconds a whole fork may take; every wait inside it is bounded by this deadline.",
        default=120.0,
    )
    remote_instance_weight_loader_seed_api_key: str | None = _opt(
        "R-Fork (ours): API key sent to the seed; defaults to --api-key."
    )
    remote_instance_weight_loader_disable_verify: bool = _opt(
        "R-Fork (ours): skip the per-tensor checksum check after a fork.", default=False
    )
    remote_instance_weight_loader_refuse_unverified: bool = _opt(
        "R-Fork (ours): refuse to fork from a seed that publishes no manifest or checksums (an upstream SGLang "
        "seed) instead of forking over upstream's protocol with a warning that names what was not verified.",
        default=False,
    )

    def __post_init__(self) -> None:
        self._fill_defaults()
        resolve_remote_instance_load(self)
        self.validate()

    def _fill_defaults(self) -> None:
        if self.served_model_name is None:
            self.served_model_name = self.model_path  # a Hub id stays the name clients use
        if self.model_path:
            from sglang.srt.model_loader.hub import HubResolveError, resolve_model_path

            try:
                self.model_path = resolve_model_path(
                    self.model_path, self.revision, self.download_dir, self.load_format
                )
            except HubResolveError as e:
                raise ServerArgsError(str(e)) from None
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.device is None:
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.attention_backend is None:
            self.attention_backend = _default_attention_backend(self.device)
        if self.random_seed is None:
            self.random_seed = 42
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if self.device == "cuda" else 2048
        if self.max_running_requests is None:
            self.max_running_requests = 256 if self.device == "cuda" else 64
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.85 if self.device == "cuda" else 0.3
        if self.cuda_graph_max_bs is None:
            self.cuda_graph_max_bs = 32
        if self.remote_instance_weight_loader_seed_api_key is None:
            self.remote_instance_weight_loader_seed_api_key = self.api_key

    def validate(self) -> None:
        """Check everything that can be checked without loading the model; raise ServerArgsError."""
        if not self.model_path:
            raise ServerArgsError(MISSING_MODEL_PATH)
        if self.tp_size < 1:
            raise ServerArgsError(f"--tp-size must be >= 1, got {self.tp_size}.")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ServerArgsError(f"--node-rank {self.node_rank} must be in [0, --nnodes={self.nnodes}).")
        if self.tp_size % self.nnodes:
            raise ServerArgsError(f"--tp-size {self.tp_size} must be divisible by --nnodes {self.nnodes}.")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ServerArgsError("--nnodes > 1 needs --dist-init-addr host:port (the same on every node).")
        if not 0 < self.mem_fraction_static < 1:
            raise ServerArgsError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}.")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ServerArgsError(f"--max-total-tokens must be >= 16, got {self.max_total_tokens}.")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ServerArgsError(
                f"--page-size must be an integer >= 1 (tokens per KV cache page), got {self.page_size!r}."
            )
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ServerArgsError(
                f"--max-total-tokens {self.max_total_tokens} is less than one page of --page-size {self.page_size}; "
                "raise --max-total-tokens or lower --page-size."
            )
        if self.context_length is not None and self.context_length < 1:
            raise ServerArgsError(f"--context-length must be >= 1, got {self.context_length}.")
        if self.max_running_requests < 1:
            raise ServerArgsError(f"--max-running-requests must be >= 1, got {self.max_running_requests}.")
        if self.decode_log_interval < 1:
            raise ServerArgsError(f"--decode-log-interval must be >= 1, got {self.decode_log_interval}.")
        for name in ("max_request_body_bytes", "max_stop_strings", "max_stop_string_length", "max_n"):
            if getattr(self, name) < 1:
                raise ServerArgsError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.max_top_logprobs_num < 0:
            raise ServerArgsError(f"--max-top-logprobs-num must be >= 0, got {self.max_top_logprobs_num}.")
        if self.stream_interval < 1:
            raise ServerArgsError(f"--stream-interval must be >= 1, got {self.stream_interval}.")
        if self.grammar_backend == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
            raise ServerArgsError(
                "--grammar-backend xgrammar needs the xgrammar package (pip install xgrammar); "
                "or pass --grammar-backend none to serve without structured output."
            )
        if self.chat_template is not None:
            from sglang.srt.entrypoints.openai.chat_templates import ChatTemplateError, resolve_chat_template

            try:
                resolve_chat_template(self.chat_template)
            except ChatTemplateError as e:
                raise ServerArgsError(str(e)) from None
        if self.device == "cuda" and not _cuda_available():
            raise ServerArgsError("--device cuda was requested but CUDA is not available; use --device cpu.")
        if self.attention_backend == "flashinfer" and self.device != "cuda":
            raise ServerArgsError("--attention-backend flashinfer needs --device cuda; use torch_native on CPU.")
        for name in ("port", "engine_info_bootstrap_port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise ServerArgsError(f"--{name.replace('_', '-')} must be a port number, got {value}.")
        check_remote_instance_args(self)

    @property
    def tp_size_per_node(self) -> int:
        """TP ranks that this launch runs."""
        return self.tp_size // self.nnodes

    def url(self) -> str:
        """Base URL of this server's HTTP API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add one --flag per dataclass field to the parser."""
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help", ""), "default": _field_default(f)}
            if f.type in ("bool", bool):
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = meta.get("parse") or _scalar_type(f)
                if "choices" in meta:
                    kwargs["choices"] = meta["choices"]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        """Build ServerArgs from parsed CLI arguments."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable), e.g. for /get_server_info."""
        return dataclasses.asdict(self)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _scalar_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, typ in (("int", int), ("float", float)):
        if text.startswith(name):
            return typ
    return str


def _default_attention_backend(device: str) -> str:
    """flashinfer on CUDA when it is installed; torch_native otherwise (with a notice on CUDA, where it is slow)."""
    if device != "cuda":
        return "torch_native"
    import importlib.util

    # Looked up, not imported: importing FlashInfer here would cost the launcher a second that only the ranks need.
    if importlib.util.find_spec("flashinfer") is None:
        logger.warning("flashinfer is not installed; using the torch_native attention backend.")
        return "torch_native"
    return "flashinfer"


def _cuda_available() -> bool:
    if os.environ.get("SGLANG_FORCE_CPU") == "1":
        return False
    import torch

    return torch.cuda.is_available()


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so the launcher reports one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ServerArgsError(f"{message} (see python -m sglang.launch_server --help)")


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse a launcher command line without resolving it (cheap: no torch, no file system)."""
    parser = _Parser(
        prog="python -m sglang.launch_server",
        usage="python -m sglang.launch_server --model-path PATH [options]  (see --help)",
    )
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def prepare_server_args(argv: list[str]) -> ServerArgs:
    """Parse a launcher command line into ServerArgs."""
    return ServerArgs.from_cli_args(parse_cli(argv))


def rank_gpu_hints(args: argparse.Namespace) -> list[int | None]:
    """Per local TP rank of an unresolved command line, the GPU it will most likely use (None when --device cpu)."""
    nnodes = max(1, args.nnodes or 1)
    per_node = max(1, (args.tp_size or 1) // nnodes)
    base = args.base_gpu_id or 0
    return [None if args.device == "cpu" else base + i for i in range(per_node)]


@dataclass(frozen=True)
class PortArgs:
    """Internal addresses: ZMQ IPC endpoints between the main process and rank 0, and the TP rendezvous."""

    scheduler_input_ipc_name: str
    tokenizer_ipc_name: str
    dist_init_method: str

    @staticmethod
    def init_new(server_args: ServerArgs) -> PortArgs:
        """Fresh IPC names; the rendezvous is --dist-init-addr when given, else a free local port."""
        import tempfile
        import uuid

        base = os.path.join(tempfile.gettempdir(), f"sglang_{uuid.uuid4().hex[:12]}")
        if server_args.dist_init_addr:
            init = f"tcp://{server_args.dist_init_addr}"
        else:
            init = f"tcp://127.0.0.1:{free_port()}"
        return PortArgs(f"ipc://{base}_sched", f"ipc://{base}_tok", init)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0 and read it back)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
