"""The seed's rendezvous port: lets only the forking client's address through to the pair group's store.

Whoever joins a pair group as rank 1 receives every weight, and a TCPStore accepts anyone (and lists its keys), so the
store itself listens on loopback and this gate, bound where the seed serves, forwards only connections from the
address that made the authenticated HTTP call. Upstream clients see an ordinary TCPStore on the port."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.2
_CHUNK = 1 << 16


def normalize_ip(address: str) -> str:
    """An IP in one canonical spelling (IPv4-mapped IPv6 becomes IPv4); other strings are returned unchanged."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


@dataclass
class StoreGate:
    """Accepts on (bind_host, port) and splices connections from allowed addresses to the store at store_port."""

    bind_host: str
    port: int
    allowed: frozenset[str]
    store_port: int
    refused: list[str] = field(default_factory=list)
    _listener: socket.socket | None = None
    _conns: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> StoreGate:
        """Bind and start accepting; OSError if the port cannot be bound on bind_host."""
        host = "" if self.bind_host in ("0.0.0.0", "::") else self.bind_host
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, self.port))
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name=f"rfork-gate-{self.port}", daemon=True).start()
        return self

    def stop_listening(self) -> None:
        """Close the listening socket (connections already let through stay up)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        self._closed.set()
        self.stop_listening()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            peer = normalize_ip(addr[0])
            if peer not in self.allowed:
                self.refused.append(peer)
                logger.warning(
                    "R-Fork group port %d: refused a connection from %s (only %s may join this fork)",
                    self.port,
                    peer,
                    ", ".join(sorted(self.allowed)),
                )
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.store_port), timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            conn.settimeout(None)
            with self._lock:
                self._conns += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pump, args=(src, dst), name=f"rfork-gate-{self.port}-io", daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until either side closes."""
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
