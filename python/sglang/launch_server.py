"""`python -m sglang.launch_server`: start the scheduler processes and serve the HTTP API until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from sglang.srt import startup_timeline
from sglang.srt.server_args import ServerArgs, ServerArgsError, parse_cli, rank_gpu_hints
from sglang.srt.utils import configure_logging

logger = logging.getLogger("sglang.launch_server")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds in-flight responses get to finish after a stop signal before their connections are closed.
GRACEFUL_SHUTDOWN_SECONDS = 3


def run_server(server_args: ServerArgs, ranks: Any = None) -> int:
    """Serve until SIGINT/SIGTERM (or a scheduler dies); every child process is gone when this returns.

    ranks: rank processes the caller started before resolving server_args (see RankProcesses).
    """
    from sglang.srt.entrypoints.engine import launch_engine

    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    handle = None
    sock = None
    try:
        sock = _bind(server_args.host, server_args.port) if server_args.node_rank == 0 else None
        # A stop signal while the model loads raises SystemExit here; launch_engine then kills what it started.
        apps: list[Any] = []
        handle = launch_engine(server_args, ranks, while_loading=lambda h: apps.append(_prepare_app(server_args, h)))
        ranks = None
        if handle.tokenizer_manager is None:
            return _run_without_http(server_args, handle)
        return asyncio.run(_serve(server_args, handle, sock, apps[0]))
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        if ranks is not None:  # launch_engine never took them over
            ranks.dismiss()
        if handle is not None:
            handle.shutdown()
        if sock is not None:
            sock.close()


def _run_without_http(server_args: ServerArgs, handle: Any) -> int:
    # Nodes other than 0 only run their TP ranks; they live until stopped or until one of the ranks dies.
    logger.info("Node %d is running its TP ranks (no HTTP server on this node).", server_args.node_rank)
    handle.mark_ready()
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


def _prepare_app(server_args: ServerArgs, handle: Any) -> Any:
    """The HTTP app (and the web stack's imports), made while the ranks still load; None without HTTP here."""
    if handle.tokenizer_manager is None:
        return None
    with startup_timeline.phase("HTTP app"):
        import uvicorn  # noqa: F401

        from sglang.srt.entrypoints.http_server import create_app

        return create_app(handle.tokenizer_manager, server_args.api_key)


async def _serve(server_args: ServerArgs, handle: Any, sock: socket.socket, app: Any) -> int:
    # Imported here: rank processes re-import this module when they start, and need no web server.
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, plus a hook that runs as soon as a stop signal arrives."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            loop.call_soon_threadsafe(abort_in_flight)

    tm = handle.tokenizer_manager
    loop = asyncio.get_running_loop()

    def abort_in_flight() -> None:
        # Streams then end with finish_reason "abort" and [DONE] well inside the graceful-shutdown window,
        # instead of being cut off when it expires.
        tm.abort_all()

    debug = server_args.log_level == "debug"
    timeline = startup_timeline.current()
    http_started = time.time()

    def close_timeline() -> None:
        # The app's startup hook runs before uvicorn answers its first request, so whoever sees /health 200
        # also sees the finished timeline in /get_server_info.
        timeline.add("HTTP server", http_started, time.time())
        handle.mark_ready()

    app.router.on_startup.append(close_timeline)
    config = uvicorn.Config(
        app,
        log_config=None,  # keep our log format
        log_level="debug" if debug else "warning",
        access_log=debug,
        ws="none",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config)
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
            logger.info("The server is ready to serve at %s (model %s)", server_args.url(), server_args.model_path)
        await serving
    finally:
        await tm.close()
    return exit_code if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; problems are reported as one line on stderr with a non-zero exit code."""
    # The launch is the instant the OS started this process: interpreter start-up and imports count.
    launched = startup_timeline.process_start_time()
    timeline = startup_timeline.install("main", launched)
    entered = time.time()
    try:
        cli = parse_cli(sys.argv[1:] if argv is None else argv)
    except ServerArgsError as e:
        print(f"sglang.launch_server: error: {e}", file=sys.stderr)
        return 2
    if not cli.model_path:  # before any process starts: the commonest mistake costs nothing
        print(
            "sglang.launch_server: error: --model-path is required: pass the directory of an HF model.", file=sys.stderr
        )
        return 2
    configure_logging(cli.log_level)
    # Logged once the arguments are known good, so a bad command line reads as one error line.
    timeline.add("interpreter start + imports", launched, entered, log=False)
    from sglang.srt.entrypoints.rank_processes import RankProcesses

    # The ranks start importing torch and the model stack now, while this process resolves the arguments.
    spawned = time.time()
    ranks = RankProcesses.start(rank_gpu_hints(cli))
    timeline.add("start rank processes", spawned, time.time(), log=False)
    resolving = time.time()
    try:
        server_args = ServerArgs.from_cli_args(cli)
    except ServerArgsError as e:
        ranks.dismiss()
        print(f"sglang.launch_server: error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        ranks.dismiss()
        raise
    timeline.add("resolve arguments", resolving, time.time(), log=False)
    timeline.log_all()
    try:
        return run_server(server_args, ranks)
    except (ValueError, RuntimeError, OSError) as e:
        # ModelConfigError (a ValueError), a rank that failed to start, a port in use: say what, not where.
        print(f"sglang.launch_server: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
