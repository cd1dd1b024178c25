"""Process launch shared by the HTTP server and the offline `sglang.Engine`."""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import last_output
from sglang.srt.server_args import PortArgs, ServerArgs
from sglang.srt.utils import kill_process_tree

logger = logging.getLogger(__name__)


@dataclass
class EngineHandle:
    """The scheduler processes of this launch and, on node 0, the TokenizerManager talking to them."""

    server_args: ServerArgs
    port_args: PortArgs
    procs: list[mp.process.BaseProcess]
    tokenizer_manager: Any = None
    scheduler_info: dict[str, Any] = field(default_factory=dict)
    _stopping: bool = False

    def shutdown(self) -> None:
        """Stop every scheduler process of this launch (idempotent)."""
        self._stopping = True
        # Signal every rank before waiting for any: a rank that sees its peer vanish first would log a crash.
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                kill_process_tree(proc.pid)

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call on_death(reason) from a thread if a scheduler process exits while we are serving."""

        def loop() -> None:
            while not self._stopping:
                for rank, proc in enumerate(self.procs):
                    if not proc.is_alive() and not self._stopping:
                        on_death(f"scheduler process TP{rank} exited with code {proc.exitcode}; see its log")
                        return
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True, name="watch-schedulers").start()


def launch_engine(server_args: ServerArgs) -> EngineHandle:
    """Start this node's scheduler processes, wait until they have loaded, and build the TokenizerManager."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.scheduler_process import run_scheduler_process

    # Fail fast in this process on what can be checked without a device: bad path, architecture, TP size.
    ModelConfig.from_path(
        server_args.model_path, server_args.dtype, server_args.context_length, server_args.device
    ).check_tp(server_args.tp_size)
    if server_args.remote_instance_weight_loader_start_seed_via_transfer_engine and server_args.node_rank == 0:
        from sglang.srt.remote_instance.bootstrap_server import start_bootstrap_server

        start_bootstrap_server(server_args.host, server_args.engine_info_bootstrap_port, server_args.api_key)
    port_args = PortArgs.init_new(server_args)
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    per_node = server_args.tp_size_per_node
    for local_rank in range(per_node):
        tp_rank = server_args.node_rank * per_node + local_rank
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=run_scheduler_process,
            args=(server_args, port_args, tp_rank, server_args.base_gpu_id + local_rank, writer),
            name=f"sglang-scheduler-TP{tp_rank}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        pipes.append(reader)
    handle = EngineHandle(server_args, port_args, procs)
    try:
        infos = [_wait_ready(proc, pipe) for proc, pipe in zip(procs, pipes)]
    except BaseException:
        handle.shutdown()
        raise
    handle.scheduler_info = infos[0]
    if server_args.node_rank == 0:
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        handle.tokenizer_manager = TokenizerManager(server_args, port_args, infos[0])
    return handle


def _wait_ready(proc: mp.process.BaseProcess, pipe: Any) -> dict[str, Any]:
    while not pipe.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode} while starting; see its log above")
    status, payload = pipe.recv()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


class Engine:
    """Offline engine: `Engine(model_path=..., **server_args).generate(prompt, sampling_params)`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        self.server_args = ServerArgs(**kwargs)
        self.loop = asyncio.new_event_loop()
        self.handle = launch_engine(self.server_args)
        self.tokenizer_manager = self.handle.tokenizer_manager
        self.handle.watch(lambda reason: self.loop.call_soon_threadsafe(self.tokenizer_manager.mark_dead, reason))
        atexit.register(self.shutdown)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict) or many (a list); with stream=True, an iterator of chunks."""
        obj = GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            stream=stream,
        )
        agen = self.tokenizer_manager.generate_request(obj)
        if stream:
            return self._iterate(agen)
        out = self.loop.run_until_complete(last_output(agen))
        self._raise_if_dead()
        return out

    def _iterate(self, agen: Any) -> Iterator[dict[str, Any]]:
        try:
            while True:
                chunk = self.loop.run_until_complete(agen.__anext__())
                self._raise_if_dead()
                yield chunk
        except StopAsyncIteration:
            return
        finally:
            self.loop.run_until_complete(agen.aclose())

    def _raise_if_dead(self) -> None:
        # A scheduler that died mid-request ends the request as aborted; an offline caller would otherwise get
        # empty outputs that look like a finished generation.
        reason = self.tokenizer_manager.dead_reason
        if reason:
            raise RuntimeError(f"the engine stopped serving: {reason}")

    def rpc(self, method: str, **params: Any) -> list[Any]:
        """Run a control method on every TP rank (see scheduler_rpc)."""
        return self.loop.run_until_complete(self.tokenizer_manager.rpc(method, **params))

    def get_weights_by_name(self, name: str, truncate_size: int | None = None) -> list:
        """The named parameter of TP rank 0, as nested lists."""
        return self.rpc("get_weights_by_name", name=name, truncate_size=truncate_size)[0]

    def flush_cache(self) -> bool:
        """Empty the radix cache; False if requests are running."""
        return all(self.rpc("flush_cache"))

    def get_server_info(self) -> dict[str, Any]:
        """Arguments, start-up facts and live load counters of rank 0."""
        return {**self.tokenizer_manager.server_info(), **self.rpc("get_load")[0]}

    def shutdown(self) -> None:
        """Stop the scheduler processes and this engine's event loop (idempotent)."""
        self.handle.shutdown()
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.tokenizer_manager.close())
            self.loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
