"""`python -m sglang.launch_server`: start the scheduler processes and serve the HTTP API until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import uvicorn

from sglang.srt.server_args import ServerArgs, ServerArgsError, prepare_server_args
from sglang.srt.utils import configure_logging

logger = logging.getLogger("sglang.launch_server")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds in-flight responses get to finish after a stop signal before their connections are closed.
GRACEFUL_SHUTDOWN_SECONDS = 3


def run_server(server_args: ServerArgs) -> int:
    """Serve until SIGINT/SIGTERM (or a scheduler dies); every child process is gone when this returns."""
    from sglang.srt.entrypoints.engine import launch_engine

    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    sock = _bind(server_args.host, server_args.port) if server_args.node_rank == 0 else None
    handle = None
    try:
        # A stop signal while the model loads raises SystemExit here; launch_engine then kills what it started.
        handle = launch_engine(server_args)
        if handle.tokenizer_manager is None:
            return _run_without_http(server_args, handle)
        return asyncio.run(_serve(server_args, handle, sock))
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        if handle is not None:
            handle.shutdown()
        if sock is not None:
            sock.close()


def _run_without_http(server_args: ServerArgs, handle: Any) -> int:
    # Nodes other than 0 only run their TP ranks; they live until stopped or until one of the ranks dies.
    logger.info("Node %d is running its TP ranks (no HTTP server on this node).", server_args.node_rank)
    died = threading.Event()
    handle.watch(lambda reason: (logger.error("Shutting down: %s", reason), died.set()))
    died.wait()
    return 1


def _stop(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(0)


def _bind(host: str, port: int) -> socket.socket:
    # Bound before the model loads: a taken port fails in a second, not after minutes of loading.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Made with IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections whose socket says so, and without it a
    # response written in two parts waits for the client's delayed ACK (about 40 ms per keep-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, plus a hook that runs as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self.on_stop()


async def _serve(server_args: ServerArgs, handle: Any, sock: socket.socket) -> int:
    from sglang.srt.entrypoints.http_server import create_app

    tm = handle.tokenizer_manager
    loop = asyncio.get_running_loop()

    def abort_in_flight() -> None:
        # Streams then end with finish_reason "abort" and [DONE] well inside the graceful-shutdown window,
        # instead of being cut off when it expires.
        tm.abort_all()

    debug = server_args.log_level == "debug"
    config = uvicorn.Config(
        create_app(tm, server_args.api_key),
        log_config=None,  # keep our log format
        log_level="debug" if debug else "warning",
        access_log=debug,
        ws="none",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config, on_stop=lambda: loop.call_soon_threadsafe(abort_in_flight))
    exit_code = 0

    def on_scheduler_death(reason: str) -> None:
        nonlocal exit_code
        logger.error("Shutting down: %s", reason)
        tm.mark_dead(reason)
        exit_code = 1
        server.should_exit = True

    handle.watch(lambda reason: loop.call_soon_threadsafe(on_scheduler_death, reason))
    # uvicorn takes over SIGINT/SIGTERM while it serves and re-raises them when done; by then they are
    # handled, so the re-raise must not unwind this loop.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            logger.info(
                "The server is ready to serve at %s (model %s)", server_args.url(), server_args.model_path
            )
        await serving
    finally:
        await tm.close()
    return exit_code if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; problems are reported as one line on stderr with a non-zero exit code."""
    try:
        server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    except ServerArgsError as e:
        print(f"sglang.launch_server: error: {e}", file=sys.stderr)
        return 2
    configure_logging(server_args.log_level)
    try:
        return run_server(server_args)
    except (ValueError, RuntimeError, OSError) as e:
        # ModelConfigError (a ValueError), a rank that failed to start, a port in use: say what, not where.
        print(f"sglang.launch_server: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
