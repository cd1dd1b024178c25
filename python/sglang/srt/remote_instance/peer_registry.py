"""Swarm registry kept by a seed's bootstrap server: which R-Fork clients can serve which of its tensors right now.

Clients forking with peer assist PUT their Mooncake session id, where each of their tensors lives, a bitmap of the
tensors they hold verified and one of the tensors they are reading from the seed (their claims, so that the others
leave those to them); readers GET the list to pick sources. The seed only stores and returns what it was
told: everything is type- and size-checked, entries expire, and the number of entries is bounded, so no client can
grow the seed's memory or break its serving. Readers verify every byte against the seed's checksums anyway.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.remote_instance.mooncake_guard import PROTOCOLS

PATH = "/remote_instance_peers"
# A peer that stops refreshing its entry (it died, or its host did) is dropped after this long.
TTL_SECONDS = 15.0
MAX_PEERS_PER_RANK = 64
MAX_ENTRIES = 1024
MAX_RANK = 1 << 16
# One address per tensor; a MoE rank has tens of thousands of tensors, far below this.
MAX_TENSORS = 1 << 18
# Addresses over all entries: the registry holds them as JSON text, ~20 bytes each, so at most ~40 MB.
MAX_TOTAL_TENSORS = 1 << 21
MAX_BODY_BYTES = 16 << 20
_PEER_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]*$")


class PeerRequestError(ValueError):
    """A PUT or GET the registry refuses; status is the HTTP code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PeerEntry:
    """One announced client rank: how to reach it, where its tensors are, which ones it holds verified."""

    peer_id: str
    seq: int
    session_id: str
    protocol: str
    addrs_json: str  # kept as the text GET answers with: the seed never reads the addresses itself
    n_tensors: int
    have: str
    done: bool
    claims: str
    host_id: str | None
    gpu_uuid: str | None
    updated: float

    def to_json(self, now: float, with_addrs: bool) -> str:
        head = {
            "peer_id": self.peer_id,
            "seq": self.seq,
            "session_id": self.session_id,
            "protocol": self.protocol,
            "have": self.have,
            "claims": self.claims,
            "done": self.done,
            "host_id": self.host_id,
            "gpu_uuid": self.gpu_uuid,
            "age_s": round(now - self.updated, 3),
        }
        if not with_addrs:
            return json.dumps(head)
        return json.dumps(head)[:-1] + ', "addrs": ' + self.addrs_json + "}"


@dataclass
class PeerRegistry:
    """rank -> {peer_id: PeerEntry}; every access drops expired entries first."""

    ttl: float = TTL_SECONDS
    ranks: dict[int, dict[str, PeerEntry]] = field(default_factory=dict)
    next_seq: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, body: Any) -> dict[str, Any]:
        """Create or refresh one entry from a PUT body; PeerRequestError says what is wrong with it."""
        fields = _validated(body)
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            rank, peer_id = fields["rank"], fields["peer_id"]
            peers = self.ranks.get(rank, {})
            entry = peers.get(peer_id)
            if entry is None and fields["addrs"] is None:
                raise PeerRequestError(404, f"unknown peer {peer_id}: announce it with 'addrs' first")
            n = len(fields["addrs"]) if fields["addrs"] is not None else entry.n_tensors
            for key in ("have", "claims"):
                if len(fields[key]) > (n + 3) // 4:
                    raise PeerRequestError(400, f"'{key}' has more bits than the {n} announced tensors")
            held = sum(e.n_tensors for p in self.ranks.values() for e in p.values()) - (entry.n_tensors if entry else 0)
            if held + n > MAX_TOTAL_TENSORS:
                raise PeerRequestError(429, "the swarm registry is full; fork from the seed alone")
            if entry is None:
                if len(peers) >= MAX_PEERS_PER_RANK or sum(len(p) for p in self.ranks.values()) >= MAX_ENTRIES:
                    raise PeerRequestError(429, "the swarm registry is full; fork from the seed alone")
                seq = self.next_seq.get(rank, 0)
                self.next_seq[rank] = seq + 1
                entry = PeerEntry(peer_id, seq, "", "", "[]", 0, "", False, "", None, None, now)
                self.ranks.setdefault(rank, {})[peer_id] = entry
            if fields["addrs"] is not None:
                entry.addrs_json, entry.n_tensors = json.dumps(fields["addrs"]), n
            entry.session_id, entry.protocol = fields["session_id"], fields["protocol"]
            entry.host_id, entry.gpu_uuid = fields["host_id"], fields["gpu_uuid"]
            entry.have, entry.done, entry.updated = fields["have"], fields["done"], now
            entry.claims = fields["claims"]
            return {"seq": entry.seq, "ttl_s": self.ttl}

    def get(self, rank: int, with_addrs: bool = True) -> bytes:
        """The live entries of rank as a JSON answer (without their addresses: what readers poll)."""
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            peers = [e.to_json(now, with_addrs) for e in self.ranks.get(rank, {}).values()]
        return f'{{"rank": {rank}, "peers": [{", ".join(peers)}], "ttl_s": {json.dumps(self.ttl)}}}'.encode()

    def _expire(self, now: float) -> None:
        for rank in list(self.ranks):
            peers = self.ranks[rank]
            for peer_id in [p for p, e in peers.items() if now - e.updated > self.ttl]:
                del peers[peer_id]
            if not peers:
                del self.ranks[rank]


def parse_rank(text: str | None) -> int:
    """The rank query parameter; PeerRequestError when missing or out of range."""
    try:
        rank = int(text) if text is not None else -1
    except ValueError:
        rank = -1
    if not 0 <= rank < MAX_RANK:
        raise PeerRequestError(400, "Missing or invalid rank parameter")
    return rank


def _validated(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PeerRequestError(400, "Body must be a JSON object")
    rank = body.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < MAX_RANK:
        raise PeerRequestError(400, f"'rank' must be an integer in 0..{MAX_RANK - 1}")
    peer_id = body.get("peer_id")
    if not isinstance(peer_id, str) or not _PEER_ID.match(peer_id):
        raise PeerRequestError(400, "'peer_id' must be 1-64 characters of [A-Za-z0-9_.:-]")
    session_id = body.get("session_id")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= 256:
        raise PeerRequestError(400, "'session_id' must be a non-empty string of at most 256 characters")
    protocol = body.get("protocol")
    if protocol not in PROTOCOLS:
        raise PeerRequestError(400, f"'protocol' must be one of {', '.join(PROTOCOLS)}")
    addrs = body.get("addrs")
    if addrs is not None and not (
        isinstance(addrs, list)
        and len(addrs) <= MAX_TENSORS
        and all(type(a) is int and 0 <= a < 1 << 64 for a in addrs)
    ):
        raise PeerRequestError(400, f"'addrs' must be a list of at most {MAX_TENSORS} addresses (0 <= a < 2**64)")
    bitmaps = {}
    for key, what in (("have", "the tensors held verified"), ("claims", "the tensors being read from the seed")):
        value = body.get(key, "")  # a client that predates "claims" sends none: it claims nothing
        if not isinstance(value, str) or not _HEX.match(value):
            raise PeerRequestError(400, f"'{key}' must be a lowercase hex bitmap of {what}")
        bitmaps[key] = value.lstrip("0")
    done = body.get("done", False)
    if not isinstance(done, bool):
        raise PeerRequestError(400, "'done' must be true or false")
    ident = {}
    for key in ("host_id", "gpu_uuid"):
        value = body.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= 256):
            raise PeerRequestError(400, f"'{key}' must be a string of at most 256 characters")
        ident[key] = value
    return {
        "rank": rank,
        "peer_id": peer_id,
        "session_id": session_id,
        "protocol": protocol,
        "addrs": addrs,
        **bitmaps,
        "done": done,
        **ident,
    }
