"""Engine-info bootstrap server (node 0): TP ranks PUT their TransferEngine info, the HTTP server reads it back."""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sglang.srt.remote_instance import peer_registry
from sglang.srt.remote_instance.peer_registry import PeerRegistry, PeerRequestError

logger = logging.getLogger(__name__)

# A registration carries one entry per parameter; even huge models stay far below this.
MAX_BODY_BYTES = 256 << 20
SOCKET_TIMEOUT = 30.0


@dataclass
class EngineInfoStore:
    """rank -> the serialized GET answer for that rank (serialized once: many clients may ask at once)."""

    answers: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, rank: int, info: dict[str, Any]) -> None:
        """Store a rank's info (last write wins)."""
        answer: dict[str, Any] = {
            "rank": rank,
            "remote_instance_transfer_engine_info": [info["session_id"], info["weights_info_dict"]],
        }
        # Ours, beside upstream's keys.
        for key in ("transfer_engine_endpoints", "weights_meta", "instance", "shard_layout"):
            if key in info:
                answer[key] = info[key]
        data = json.dumps(answer).encode()
        with self.lock:
            self.answers[rank] = data

    def get(self, rank: int) -> bytes | None:
        """The JSON answer for rank, or None if that rank never registered."""
        with self.lock:
            return self.answers.get(rank)


class BootstrapServer(ThreadingHTTPServer):
    """The HTTP server object; `store` holds what the ranks registered."""

    daemon_threads = True

    def __init__(self, host: str, port: int, api_key: str | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.store = EngineInfoStore()
        self.peers = PeerRegistry()
        self.expected_auth = f"Bearer {api_key}".encode() if api_key else None
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves our own name (getfqdn), which can stall on hosts without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def start_bootstrap_server(host: str, port: int, api_key: str | None = None) -> BootstrapServer:
    """Serve /health, PUT /register_transfer_engine_info, GET /get_transfer_engine_info and the swarm registry
    (GET/PUT /remote_instance_peers) from a daemon thread."""
    try:
        server = BootstrapServer(host, port, api_key)
    except OSError as e:
        raise RuntimeError(
            f"Cannot start the TransferEngine info bootstrap server on {host}:{port}: {e.strerror or e}. "
            "Every instance on a host needs its own port: pass a free one with --engine-info-bootstrap-port."
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="engine-info-bootstrap", daemon=True)
    thread.start()
    logger.info("TransferEngine info bootstrap server listening on %s:%d", host, server.server_address[1])
    return server


class _Handler(BaseHTTPRequestHandler):
    server: BootstrapServer
    timeout = SOCKET_TIMEOUT
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("bootstrap %s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes | str, content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        expected = self.server.expected_auth
        if expected is None:
            return True
        given = (self.headers.get("Authorization") or "").encode()
        if hmac.compare_digest(given, expected):
            return True
        self._send(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the instance's --api-key.")
        return False

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            self._send(200, "OK")
            return
        if url.path == peer_registry.PATH:
            query = parse_qs(url.query)
            rank = query.get("rank", [None])[0]
            with_addrs = query.get("addrs", ["1"])[0] != "0"
            self._peers(lambda: self.server.peers.get(peer_registry.parse_rank(rank), with_addrs))
            return
        if url.path != "/get_transfer_engine_info":
            self._send(404, f"Unknown path {url.path}")
            return
        if not self._authorized():
            return
        values = parse_qs(url.query).get("rank")
        try:
            rank = int(values[0]) if values else None
        except ValueError:
            rank = None
        if rank is None:
            self._send(400, "Missing or invalid rank parameter")
        elif rank < 0:
            self._send(400, "Invalid rank parameter")
        elif (answer := self.server.store.get(rank)) is None:
            self._send(404, f"No transfer engine info for rank {rank}")
        else:
            self._send(200, answer, "application/json")

    def _peers(self, answer: Any) -> None:
        """Answer a swarm-registry request: auth first, then whatever answer() returns or refuses."""
        if not self._authorized():
            return
        try:
            body = answer()
        except PeerRequestError as e:
            self._send(e.status, str(e))
            return
        self._send(200, body, "application/json")

    def _read_json(self, limit: int) -> Any:
        """The request's JSON body of at most `limit` bytes; PeerRequestError (411, 413, 400) says what is wrong."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise PeerRequestError(411, "Content-Length is required") from None
        if not 0 < length <= limit:
            raise PeerRequestError(413, f"Body of {length} bytes is out of range (1..{limit})")
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as e:
            raise PeerRequestError(400, f"Body is not JSON: {e}") from None

    def do_PUT(self) -> None:
        if urlsplit(self.path).path == peer_registry.PATH:
            put = self.server.peers.put
            self._peers(lambda: json.dumps(put(self._read_json(peer_registry.MAX_BODY_BYTES))).encode())
            return
        if urlsplit(self.path).path != "/register_transfer_engine_info":
            self._send(404, f"Unknown path {self.path}")
            return
        if not self._authorized():
            return
        try:
            body = self._read_json(MAX_BODY_BYTES)
        except PeerRequestError as e:
            self._send(e.status, str(e))
            return
        problem = _registration_problem(body)
        if problem:
            self._send(400, problem)
            return
        rank = body["rank"] if "rank" in body else body["tp_rank"]
        self.server.store.put(rank, body["transfer_engine_info"])
        logger.info("bootstrap: registered TransferEngine info of rank %d", rank)
        self._send(200, "OK")


def _registration_problem(body: Any) -> str | None:
    """Why a PUT body is unusable, or None."""
    if not isinstance(body, dict):
        return "Body must be a JSON object with 'rank' (or 'tp_rank') and 'transfer_engine_info'"
    rank = body.get("rank", body.get("tp_rank"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        return "Missing or invalid 'rank' (or 'tp_rank'): a non-negative integer is required"
    info = body.get("transfer_engine_info")
    if not isinstance(info, dict):
        return "Missing 'transfer_engine_info' object"
    if not isinstance(info.get("session_id"), str) or not isinstance(info.get("weights_info_dict"), dict):
        return "'transfer_engine_info' needs 'session_id' (string) and 'weights_info_dict' (object)"
    return None
