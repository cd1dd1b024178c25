"""Crash-proof use of a Mooncake TransferEngine: one engine per object, bounded reads, error codes as words."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sglang.srt.metrics import rfork_progress
from sglang.srt.remote_instance.addresses import local_ip_towards

logger = logging.getLogger(__name__)

NIC_PROTOCOLS = ("tcp", "rdma")
PROTOCOLS = (*NIC_PROTOCOLS, "nvlink_intra")
INSTALL_HINT = "pip install mooncake-transfer-engine (CUDA) or mooncake-transfer-engine-non-cuda (CPU only)"

# Mooncake's error.h codes that its Python API can return.
_ERRORS = {
    -1: "invalid argument or failed transfer (details in Mooncake's log on stderr)",
    -3: "address not registered",
    -7: "address range overlaps an already registered region",
    -101: "host name could not be resolved",
    -102: "socket error: the peer is unreachable",
    -104: "the peer rejected the handshake",
}
# Environment is process-wide and Mooncake reads it while initialize() installs transports.
_ENV_LOCK = threading.Lock()
# Engines are never destroyed: teardown holds the GIL for about a second, and after an abandoned read
# in-flight slices may still land in the engine's and the caller's buffers.
_KEEP_ALIVE: list[Any] = []
_POLL_SLEEP = 0.0005
# Extra wait past the caller's deadline so a read that fails on time reports its own error first.
_JOIN_GRACE = 2.0


class MooncakeError(RuntimeError):
    """A Mooncake call failed; the message says which call and why."""


def describe(rc: int) -> str:
    """Words for a Mooncake return code."""
    return f"{_ERRORS.get(rc, 'unknown error')} (code {rc})"


def mooncake_module() -> Any:
    """The `mooncake.engine` module, or MooncakeError saying how to install it."""
    try:
        import mooncake.engine as module
    except ImportError as e:
        raise MooncakeError(f"Mooncake TransferEngine is not usable here ({e}); {INSTALL_HINT}.") from None
    return module


def mooncake_available() -> bool:
    """Whether `mooncake.engine` imports."""
    try:
        mooncake_module()
    except MooncakeError:
        return False
    return True


def supports_intra_nvlink() -> bool:
    """Whether the installed Mooncake build has the intra-host NVLink (CUDA IPC) transport."""
    try:
        return bool(getattr(mooncake_module(), "SUPPORT_INTRA_NVLINK", False))
    except MooncakeError:
        return False


def rdma_devices() -> list[str]:
    """RDMA HCAs visible to this host (Mooncake picks RDMA over TCP whenever there is one)."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def forced_protocol() -> str | None:
    """The protocol MOONCAKE_PROTOCOL forces, None for automatic selection."""
    value = os.environ.get("MOONCAKE_PROTOCOL", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in PROTOCOLS:
        raise MooncakeError(f"MOONCAKE_PROTOCOL={value!r} is not one of {', '.join(PROTOCOLS)} (or unset for auto).")
    return value


def auto_nic_protocol() -> str:
    """What Mooncake will use for NIC traffic here: RDMA if an HCA exists, else TCP."""
    return "rdma" if rdma_devices() else "tcp"


def nic_device_for_gpu(gpu_id: int | None) -> str:
    """MOONCAKE_DEVICE resolved for one GPU: a NIC list, or a per-GPU JSON mapping (inline or a file)."""
    spec = os.environ.get("MOONCAKE_DEVICE", "").strip()
    if spec.endswith(".json") and os.path.isfile(spec):
        with open(spec) as f:
            spec = f.read().strip()
    if not spec.startswith("{"):
        return spec
    try:
        mapping = json.loads(spec)
    except ValueError as e:
        raise MooncakeError(
            f"MOONCAKE_DEVICE is not valid JSON ({e}); use 'mlx5_0,mlx5_1' or '{{\"0\": \"mlx5_0\"}}'."
        ) from None
    return str(mapping.get(str(gpu_id), "")) if gpu_id is not None else ""


# Bytes Mooncake's TCP transport moves per socket write, and for GPU memory per synchronous cudaMemcpy through a host
# staging buffer. Its default, 64 KiB, means about 20k copies per second on each side; on an H200 a 16 GB fork over
# TCP ran at 0.9 GB/s with it and 2.5 GB/s with 4 MiB. Set MC_TCP_SLICE_SIZE yourself to override.
TCP_SLICE_BYTES = 4 << 20


def use_large_tcp_slices() -> None:
    """Make this process's Mooncake TCP transport copy TCP_SLICE_BYTES at a time unless the user chose a size.

    Mooncake reads MC_TCP_SLICE_SIZE once, at its first TCP transfer, on the side that serves the read (the seed)
    and on the side that receives it (the client), so both call this before their engine moves anything.
    """
    os.environ.setdefault("MC_TCP_SLICE_SIZE", str(TCP_SLICE_BYTES))


@contextmanager
def _transport_env(protocol: str) -> Iterator[None]:
    wanted = {"MC_INTRANODE_NVLINK": "1" if protocol == "nvlink_intra" else None}
    # Only TCP needs forcing: Mooncake silently prefers RDMA when an HCA is present.
    wanted["MC_FORCE_TCP"] = "1" if protocol == "tcp" and rdma_devices() else None
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in wanted}
        try:
            for key, value in wanted.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def memory_location(gpu: int | None) -> str:
    """How Mooncake is told where registered memory lives: a GPU, or anywhere (host memory)."""
    return f"cuda:{gpu}" if gpu is not None else "*"


def open_engine(host: str, protocol: str, gpu: int | None) -> GuardedEngine:
    """An engine for `protocol` on `host`, on the NIC nearest the GPU (NVLink needs none)."""
    return GuardedEngine(host, protocol, "" if protocol == "nvlink_intra" else nic_device_for_gpu(gpu))


def rank_engine(
    seed_ip: str, protocol: str, gpu: int | None, destination: Callable[[], list[tuple[int, int]]] | None = None
) -> GuardedEngine:
    """A client rank's engine for `protocol` towards the seed's host, on the NIC nearest its GPU. `destination`
    gives the (address, length) regions the reads land in; they are worked out and registered only when the
    transport writes into them (RDMA), and the engine is closed again if that fails."""
    engine = open_engine(local_ip_towards(seed_ip), protocol, gpu)
    if protocol == "rdma" and destination is not None:
        try:
            engine.register(destination(), memory_location(gpu))
        except BaseException:
            engine.close()
            raise
    return engine


@dataclass(frozen=True)
class ReadEntry:
    """One contiguous read: local destination, remote source, byte count, and the tensor it belongs to."""

    name: str
    local_addr: int
    remote_addr: int
    length: int


@dataclass(frozen=True)
class ReadPlan:
    """How to issue reads over one transport: entries per window, whether a window is one blocking batch, and
    whether to touch every tensor first (setup) so that the timed transfer is data movement alone."""

    window: int
    batched: bool = False
    touch_first: bool = False


class GuardedEngine:
    """One initialized TransferEngine; no method can reach Mooncake before or after its useful life."""

    def __init__(self, host: str, protocol: str, device_name: str = "") -> None:
        module = mooncake_module()
        if protocol not in PROTOCOLS:
            raise MooncakeError(f"unknown Mooncake protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        self.host = host
        self.protocol = protocol
        before = _listening()
        engine = module.TransferEngine()
        use_large_tcp_slices()
        with _transport_env(protocol):
            rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            # A failed engine is never touched again: methods on it may segfault.
            _KEEP_ALIVE.append(engine)
            raise MooncakeError(
                f"TransferEngine.initialize({host!r}, protocol={protocol!r}, device={device_name!r}) failed: "
                f"{describe(rc)}; check MOONCAKE_PROTOCOL/MOONCAKE_DEVICE and Mooncake's log"
            )
        self._engine: Any = engine
        self.rpc_port = int(engine.get_rpc_port())
        self.listening = sorted(_listening() - before, key=lambda a: a[1])
        self._registered: list[int] = []

    @property
    def session_id(self) -> str:
        """The name peers use to reach this engine."""
        return f"{self.host}:{self.rpc_port}"

    def _live(self) -> Any:
        if self._engine is None:
            raise MooncakeError("this TransferEngine was closed; create a new one")
        return self._engine

    def register(self, regions: list[tuple[int, int]], location: str) -> None:
        """Register (addr, length) regions for access by peers; MooncakeError names the first bad one."""
        engine = self._live()
        regions = [r for r in regions if r[1] > 0]
        if not regions:
            return
        rc = engine.batch_register_memory([a for a, _ in regions], [n for _, n in regions], location)
        if rc == 0:
            self._registered.extend(a for a, _ in regions)
            return
        # The batch call does not say which region failed; find out one by one.
        for addr, length in regions:
            if addr in self._registered:
                continue
            rc = engine.register_memory(addr, length, location)
            if rc != 0:
                raise MooncakeError(
                    f"registering {length} bytes at {addr:#x} ({location}) with Mooncake failed: {describe(rc)}"
                )
            self._registered.append(addr)

    def read(
        self,
        session_id: str,
        entries: list[ReadEntry],
        deadline: float,
        plan: ReadPlan,
        owner: Any,
        cuda_device: int | None = None,
    ) -> int:
        """Read every entry from session_id by deadline; returns bytes read. Windowed (plan.batched False): one
        request per entry, at most plan.window in flight, polled with sleeps (spares the CPU that a TCP transfer
        needs). Batched: plan.window entries per blocking batch call, Mooncake's own fastest way for a
        copy-engine transport.

        owner holds the local buffers; if the read is abandoned mid-flight it is kept alive with the engine.
        cuda_device is the GPU of the local buffers: the reading thread must make it current, or Mooncake's NVLink
        copies run from GPU 0's context at a tenth of the speed (38 vs 386 GB/s measured on 2xH200).
        """
        engine = self._live()
        outcome: dict[str, Any] = {}
        loop = self._read_batches if plan.batched else self._read_loop

        def work() -> None:
            try:
                if cuda_device is not None:
                    import torch

                    torch.cuda.set_device(cuda_device)
                outcome["bytes"] = loop(engine, session_id, entries, deadline, plan.window, owner)
            except BaseException as e:  # handed to the waiting thread
                outcome["error"] = e

        worker = threading.Thread(target=work, name="mooncake-read", daemon=True)
        worker.start()
        # Some Mooncake calls block inside C (a frozen peer stalls the handshake for about 60 s): bound them here.
        worker.join(max(0.0, deadline - time.monotonic()) + _JOIN_GRACE)
        if worker.is_alive():
            self._abandon(owner)
            raise MooncakeError(
                f"reading from {session_id}: a Mooncake call did not return before the deadline; "
                "the peer's TransferEngine is hung or unreachable"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["bytes"]

    def _read_batches(
        self, engine: Any, session_id: str, entries: list[ReadEntry], deadline: float, window: int, owner: Any
    ) -> int:
        todo = [e for e in entries if e.length > 0]
        done = 0
        for i in range(0, len(todo), window):
            if time.monotonic() > deadline:
                raise MooncakeError(f"reading from {session_id} did not finish before the deadline ({done} bytes done)")
            chunk = todo[i : i + window]
            rc = engine.batch_transfer_sync_read(
                session_id, [e.local_addr for e in chunk], [e.remote_addr for e in chunk], [e.length for e in chunk]
            )
            if rc != 0:
                # The call may give up while copies are still queued: the buffers must outlive them.
                self._abandon(owner)
                raise MooncakeError(
                    f"reading {chunk[0].name} .. {chunk[-1].name} ({len(chunk)} tensors) from {session_id} failed: "
                    f"{describe(rc)}; the peer died, dropped the connection or does not hold those addresses"
                )
            done += sum(e.length for e in chunk)
            rfork_progress.advance(sum(e.length for e in chunk))
        return done

    def _read_loop(
        self, engine: Any, session_id: str, entries: list[ReadEntry], deadline: float, window: int, owner: Any
    ) -> int:
        pending = deque(e for e in entries if e.length > 0)
        inflight: dict[int, ReadEntry] = {}
        done = 0
        try:
            while pending or inflight:
                while pending and len(inflight) < window:
                    entry = pending.popleft()
                    batch = engine.batch_transfer_async_read(
                        session_id, [entry.local_addr], [entry.remote_addr], [entry.length]
                    )
                    if not batch:
                        raise MooncakeError(
                            f"submitting the read of {entry.name} to {session_id} failed: the peer's TransferEngine "
                            "is unreachable or gone (Mooncake's log on stderr has the cause)"
                        )
                    inflight[batch] = entry
                progressed = False
                for batch, entry in list(inflight.items()):
                    status = engine.transfer_check_status(batch)
                    if status == 0:
                        continue
                    # Mooncake frees the batch when it reports 1 or -1; never poll it again.
                    del inflight[batch]
                    if status != 1:
                        why = "timed out (MC_TRANSFER_TIMEOUT)" if status == -2 else "failed"
                        raise MooncakeError(
                            f"reading {entry.name} ({entry.length} bytes) from {session_id} {why}: the peer died, "
                            "dropped the connection or does not hold that address"
                        )
                    done += entry.length
                    rfork_progress.advance(entry.length)
                    progressed = True
                if not progressed:
                    if time.monotonic() > deadline:
                        raise MooncakeError(
                            f"reading from {session_id} did not finish before the deadline "
                            f"({len(inflight)} request(s) in flight, {done} bytes done)"
                        )
                    time.sleep(_POLL_SLEEP)
        except BaseException:
            if inflight:
                self._abandon(owner)
            raise
        return done

    def _abandon(self, owner: Any) -> None:
        # In-flight slices may still land in the destination buffers: keep both alive and never reuse the engine.
        _KEEP_ALIVE.append((self._engine, owner))
        self._engine = None

    def close(self) -> None:
        """Unregister everything and retire the engine (kept, idle: destroying one holds the GIL for ~1 s)."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._registered:
            rc = engine.batch_unregister_memory(self._registered)
            if rc != 0:
                logger.warning("unregistering %d Mooncake region(s) failed: %s", len(self._registered), describe(rc))
            self._registered = []
        _KEEP_ALIVE.append(engine)


def _listening() -> set[tuple[str, int]]:
    """(ip, port) of this process's listening TCP sockets, to report exactly what Mooncake opened."""
    import psutil

    try:
        conns = psutil.Process().net_connections("tcp")
    except (psutil.Error, OSError):
        return set()
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
