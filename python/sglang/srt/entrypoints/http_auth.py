"""API-key check for every HTTP endpoint, as one ASGI middleware so that routes added later are covered."""

from __future__ import annotations

import hmac
import json
from typing import Any

from sglang.srt.entrypoints.openai.protocol import error_body

# Load balancers and launchers probe liveness without credentials, and Prometheus scrapes without them (as upstream).
OPEN_PATHS = frozenset({"/health", "/metrics"})


class ApiKeyMiddleware:
    """Reject HTTP requests that lack `Authorization: Bearer <api_key>` with 401."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # A plain ASGI middleware (not BaseHTTPMiddleware) so that streamed responses and client
        # disconnects reach the endpoint untouched.
        guarded = scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS"
        if guarded and not hmac.compare_digest(self._token(scope), self.expected):
            await _reject(send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _token(scope: dict[str, Any]) -> bytes:
        return bearer_token(dict(scope["headers"]).get(b"authorization", b""))


def bearer_token(header: bytes) -> bytes:
    """The credentials of an `Authorization: Bearer <token>` header (b"" when it is not one). The scheme is
    case-insensitive (RFC 9110, section 11.1), so "bearer" and "BEARER" are accepted too."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


async def send_error(send: Any, status: int, message: str, close: bool = False) -> None:
    """Answer an ASGI request with the API's JSON error body (close: the connection cannot be reused, e.g. because
    the rest of the request body was never read)."""
    body = json.dumps(error_body(message, None, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _reject(send: Any) -> None:
    message = "Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the server's --api-key."
    await send_error(send, 401, message)
