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

from sglang.srt import startup_timeline
from sglang.srt.entrypoints.rank_processes import RankProcesses, stop_processes
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import last_output
from sglang.srt.model_executor.weights_by_name import join_rank_answers
from sglang.srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class EngineHandle:
    """The scheduler processes of this launch and, on node 0, the TokenizerManager talking to them."""

    server_args: ServerArgs
    port_args: PortArgs
    procs: list[mp.process.BaseProcess]
    tokenizer_manager: Any = None
    scheduler_info: dict[str, Any] = field(default_factory=dict)
    rank_phases: list[startup_timeline.Phase] = field(default_factory=list)
    _stopping: bool = False

    def mark_ready(self) -> dict[str, Any]:
        """Close the start-up timeline now (the instance serves): log its summary and return it."""
        timeline = startup_timeline.current()
        summary = startup_timeline.summary(timeline.phases + self.rank_phases, timeline.origin, time.time())
        logger.info("Startup: %s", startup_timeline.summary_line(summary))
        if self.tokenizer_manager is not None:
            self.tokenizer_manager.startup_timeline = summary
        return summary

    def shutdown(self) -> None:
        """Stop every scheduler process of this launch (idempotent)."""
        self._stopping = True
        stop_processes(self.procs)

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


def launch_engine(
    server_args: ServerArgs,
    ranks: RankProcesses | None = None,
    while_loading: Callable[[EngineHandle], None] | None = None,
) -> EngineHandle:
    """Give this node's rank processes their orders, wait until they have loaded, and build the TokenizerManager.

    ranks are processes started by the launcher before it resolved the arguments; without them they start here.
    while_loading(handle) runs once the TokenizerManager exists, while the ranks are still loading.
    """
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.scheduler_process import RankOrders

    timeline = startup_timeline.current()
    per_node = server_args.tp_size_per_node
    if ranks is None:
        with timeline.phase("start rank processes"):
            hints = [server_args.base_gpu_id + i if server_args.device == "cuda" else None for i in range(per_node)]
            ranks = RankProcesses.start(hints)
    try:
        if len(ranks.procs) != per_node:
            raise RuntimeError(f"{len(ranks.procs)} rank processes were started for {per_node} TP ranks on this node")
        port_args = PortArgs.init_new(server_args)
    except BaseException:
        ranks.dismiss()
        raise
    for local_rank, (proc, pipe) in enumerate(zip(ranks.procs, ranks.pipes)):
        tp_rank = server_args.node_rank * per_node + local_rank
        proc.name = f"sglang-scheduler-TP{tp_rank}"
        orders = RankOrders(server_args, port_args, tp_rank, server_args.base_gpu_id + local_rank, timeline.origin)
        pipe.send(orders)
    handle = EngineHandle(server_args, port_args, ranks.procs)
    try:
        # Checked here too, while the ranks load, so a bad path or architecture reads as one clear line.
        with timeline.phase("model config"):
            model_config = ModelConfig.from_path(
                server_args.model_path, server_args.dtype, server_args.context_length, server_args.device
            )
            model_config.check_tp(server_args.tp_size)
        if server_args.remote_instance_weight_loader_start_seed_via_transfer_engine and server_args.node_rank == 0:
            from sglang.srt.remote_instance.bootstrap_server import start_bootstrap_server

            start_bootstrap_server(server_args.host, server_args.engine_info_bootstrap_port, server_args.api_key)
        if server_args.node_rank == 0:
            from sglang.srt.managers.tokenizer_manager import TokenizerManager

            # Built while the ranks load: the tokenizer and the IPC sockets do not need them.
            with timeline.phase("tokenizer manager"):
                handle.tokenizer_manager = TokenizerManager(server_args, port_args, model_config=model_config)
        if while_loading is not None:
            while_loading(handle)
        with timeline.phase("wait for ranks"):
            infos = ranks.wait_ready()
    except BaseException:
        handle.shutdown()
        if handle.tokenizer_manager is not None:
            handle.tokenizer_manager.close_sockets()
        raise
    for info in infos:
        handle.rank_phases += startup_timeline.phases_from_json(info.pop("startup_timeline"), timeline.origin)
    handle.scheduler_info = infos[0]
    if handle.tokenizer_manager is not None:
        handle.tokenizer_manager.attach_schedulers(infos[0])
    return handle


class Engine:
    """Offline engine: `Engine(model_path=..., **server_args).generate(prompt, sampling_params)`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        # An offline engine's start counts from its construction, not from its host process's start.
        startup_timeline.install("main", time.time())
        self.server_args = ServerArgs(**kwargs)
        self.loop = asyncio.new_event_loop()
        self.handle = launch_engine(self.server_args)
        self.startup_timeline = self.handle.mark_ready()
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

    def get_weights_by_name(self, name: str, truncate_size: int | None = None, raw: bool = False) -> list:
        """A weight as nested lists, read as /get_weights_by_name reads it (see weights_by_name): without
        truncate_size its first 100 rows, as upstream."""
        return join_rank_answers(self.rpc("get_weights_by_name", name=name, truncate_size=truncate_size, raw=raw))

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
