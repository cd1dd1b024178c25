"""Request bodies bounded in size and in time, as one ASGI middleware in front of every route."""

from __future__ import annotations

import asyncio
from typing import Any

from sglang.srt.entrypoints.http_auth import send_error

# Longest a client may pause while sending its body before the request is answered 408 and dropped: a client
# that trickles bytes holds a connection, never the server.
BODY_IDLE_TIMEOUT = 30.0


class BodyLimitMiddleware:
    """Read each request body up to --max-request-body-bytes (413 beyond it) before any route parses it."""

    def __init__(self, app: Any, max_bytes: int, idle_timeout: float = BODY_IDLE_TIMEOUT) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Refused from the header alone: nothing of the body is read.
            await _answer(send, 413, self._too_large(int(declared)))
            return
        messages, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except asyncio.TimeoutError:
                text = f"The request body did not arrive: nothing came for {self.idle_timeout:.0f} s."
                await _answer(send, 408, text)
                return
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left; the route sees the disconnect
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _answer(send, 413, self._too_large(size, at_least=True))
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        amount = f"at least {size}" if at_least else str(size)
        return (
            f"The request body has {amount} bytes, more than this server accepts ({self.max_bytes}, "
            "--max-request-body-bytes). Send a smaller request (fewer or shorter prompts)."
        )


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    """A receive() that hands out the buffered body messages, then whatever the connection sends next."""
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _answer(send: Any, status: int, message: str) -> None:
    # The rest of the body is never read, so the connection cannot be reused.
    await send_error(send, status, message, close=True)
