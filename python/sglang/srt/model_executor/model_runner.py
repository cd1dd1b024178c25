"""ModelRunner: one TP rank's model, KV cache and attention backend, and the forward pass."""

from __future__ import annotations

import logging
import time

import psutil
import torch

from sglang.srt import startup_timeline as startup
from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import init_distributed
from sglang.srt.layers import fused_kernels
from sglang.srt.layers.attention import create_attention_backend
from sglang.srt.layers.attention.kernel_build import start_kernel_build
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.cuda_graph_runner import maybe_create_cuda_graph_runner
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

# On CPU, KV buffers are capped so an idle tiny-model server does not reserve gigabytes.
_CPU_MAX_KV_TOKENS = 1 << 17


def load_config_from_server_args(server_args: ServerArgs) -> LoadConfig:
    """The LoadConfig a server's flags describe."""
    ports = server_args.remote_instance_weight_loader_send_weights_group_ports
    return LoadConfig(
        load_format=LoadFormat(server_args.load_format),
        seed_instance_ip=server_args.remote_instance_weight_loader_seed_instance_ip,
        seed_instance_service_port=server_args.remote_instance_weight_loader_seed_instance_service_port,
        send_weights_group_ports=tuple(ports) if ports else None,
        remote_backend=server_args.remote_instance_weight_loader_backend,
        timeout=server_args.remote_instance_weight_loader_timeout,
        seed_api_key=server_args.remote_instance_weight_loader_seed_api_key,
        verify=not server_args.remote_instance_weight_loader_disable_verify,
        refuse_unverified=server_args.remote_instance_weight_loader_refuse_unverified,
        peer_assist=server_args.remote_instance_weight_loader_peer_assist,
    )


class ModelRunner:
    """Owns the model and KV cache of one TP rank."""

    def __init__(
        self,
        model_config: ModelConfig,
        server_args: ServerArgs,
        tp_rank: int,
        gpu_id: int,
        dist_init_method: str,
    ) -> None:
        self.model_config = model_config
        self.server_args = server_args
        self.tp_rank = tp_rank
        self.tp_size = server_args.tp_size
        self.gpu_id = gpu_id
        with startup.phase("device init"):
            if server_args.device == "cuda":
                torch.cuda.set_device(gpu_id)
                self.device = torch.device("cuda", gpu_id)
                # Serve on a non-blocking stream of our own: copies that other libraries issue on the legacy default
                # stream (Mooncake's TCP transport reads a seed's GPU weights with synchronous cudaMemcpy) would
                # otherwise serialise with every kernel of every step.
                torch.cuda.set_stream(torch.cuda.Stream(self.device))
            else:
                self.device = torch.device("cpu")
        if self.device.type == "cuda" and server_args.remote_instance_weight_loader_start_seed_via_transfer_engine:
            # A TransferEngine seed publishes block checksums of all its weights once it is up: the fused kernel
            # (see block_checksum_gpu) compiles or loads meanwhile. Not on clients: loading it took 2.3-2.6 s beside
            # the rest of start-up, so a fork's reads began before it was ready, and loading it while the rank
            # process imports (so that it would be) made those imports 0.55-0.65 s slower (2xH200). A client sums
            # with torch instead (staged rounds laid out for that: transfer_engine_reshard.rounds).
            from sglang.srt.remote_instance import block_checksum_gpu

            block_checksum_gpu.warm_up(self.device)
        # FlashInfer's kernels compile (fresh node) or load from the JIT cache while the weights arrive.
        kernels = start_kernel_build(server_args.attention_backend, model_config, self.tp_size, self.device)
        with startup.phase("distributed init"):
            init_distributed(tp_rank, self.tp_size, dist_init_method, self.device)
        torch.manual_seed(server_args.random_seed)
        self.load_model()
        # Any instance may become a seed: checksum the weights now (before the KV pool takes the memory
        # the temporaries need), so a first fork does not wait for it.
        from sglang.srt.remote_instance.manifest_seed import cached_checksums

        with startup.phase("weight checksums"):
            cached_checksums(self)
        with startup.phase("KV cache"):
            self.init_memory_pool()
        if kernels is not None:
            with startup.phase("FlashInfer kernels (wait for build)"):
                kernels.wait()
        with startup.phase("attention backend"):
            self.attn_backend = create_attention_backend(server_args.attention_backend, self)
        # Recorded after each step's attention plan is enqueued (see forward).
        self.plan_done = torch.cuda.Event() if self.device.type == "cuda" else None
        # Captured after the KV pool and backend exist: the graphs point at their buffers.
        with startup.phase("CUDA graphs"):
            self.cuda_graph_runner = maybe_create_cuda_graph_runner(self)
        if server_args.remote_instance_weight_loader_start_seed_via_transfer_engine:
            from sglang.srt.remote_instance.transfer_engine_seed import start_transfer_engine_seed

            with startup.phase("TransferEngine seed"):
                self.transfer_engine_seed = start_transfer_engine_seed(self)

    def load_model(self) -> None:
        import sglang.srt.model_loader.remote_instance_loader  # noqa: F401  (registers remote_instance)
        from sglang.srt.model_loader import get_model_loader

        start = time.perf_counter()
        self.load_config = load_config_from_server_args(self.server_args)
        loader = get_model_loader(self.load_config)
        with startup.phase(f"weights ({self.load_config.load_format.value})"):
            self.model = loader.load_model(self.model_config, self.device)
        self.fork_report = getattr(loader, "fork_report", None)
        self.weight_load_seconds = time.perf_counter() - start
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info(
            "TP%d loaded weights (%s, %.1f MB) in %.2f s",
            self.tp_rank,
            self.load_config.load_format.value,
            self.weight_bytes / 1e6,
            self.weight_load_seconds,
        )
        kernels = fused_kernels.describe(self.device, self.model_config.dtype)
        logger.info("TP%d elementwise kernels: %s", self.tp_rank, kernels)

    def init_memory_pool(self) -> None:
        cfg = self.model_config
        kv_heads = cfg.num_kv_heads_per_rank(self.tp_size)
        per_token = MHATokenToKVPool.bytes_per_token(cfg.num_layers, kv_heads, cfg.head_dim, cfg.dtype)
        if self.server_args.max_total_tokens:
            tokens = self.server_args.max_total_tokens
        else:
            tokens = self._tokens_that_fit(per_token)
        page = self.server_args.page_size
        tokens -= tokens % page  # whole pages
        if tokens < 16:
            raise RuntimeError(
                f"Not enough memory for the KV cache ({tokens} tokens fit); "
                "raise --mem-fraction-static or set --max-total-tokens."
            )
        self.max_total_num_tokens = tokens
        rows = self.server_args.max_running_requests + 8
        self.req_to_token_pool = ReqToTokenPool(rows, cfg.context_len + 8, self.device)
        # Page 0 holds the scratch slot 0 and is never handed out; the pool adds slot 0 to the size it is given, so
        # the buffers are (tokens / page + 1) whole pages and the allocator hands out exactly `tokens` slots.
        slots = tokens + page - 1
        self.token_to_kv_pool = MHATokenToKVPool(slots, cfg.num_layers, kv_heads, cfg.head_dim, cfg.dtype, self.device)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(slots, self.device, page)
        assert self.token_to_kv_pool_allocator.size == tokens
        logger.info("TP%d KV cache: %d tokens (%.1f MB)", self.tp_rank, tokens, tokens * per_token / 1e6)

    def _tokens_that_fit(self, per_token: int) -> int:
        frac = self.server_args.mem_fraction_static
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            budget = total * frac - used_elsewhere
            return int(max(budget, 0) // per_token)
        budget = psutil.virtual_memory().available * frac
        return int(min(budget // per_token, _CPU_MAX_KV_TOKENS))

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch):
        """Run the model on a batch; returns the model's LogitsProcessorOutput."""
        if self.plan_done is not None:
            # Under overlap scheduling this step is planned while the previous one may not have started: FlashInfer's
            # plan fills a pinned host buffer that an asynchronous copy then reads, so the previous plan's copy must
            # have run before any plan refills one (it has, long since, when steps do not overlap).
            self.plan_done.synchronize()
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(forward_batch):
            return self.cuda_graph_runner.replay(forward_batch)
        if forward_batch.host_inputs is not None:
            raise RuntimeError("a decode batch was built on the host for a CUDA graph that cannot run it")
        self.attn_backend.init_forward_metadata(forward_batch)
        if self.plan_done is not None:
            self.plan_done.record()
        return self.model(forward_batch.input_ids, forward_batch.positions, forward_batch)
