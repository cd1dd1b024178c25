"""The R-Fork side of ServerArgs: what an incomplete `--load-format remote_instance` falls back to, and the checks
of the remote-instance flags (kept apart so that server_args.py stays the dataclass and the generic checks)."""

from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger("sglang.srt.server_args")


def resolve_remote_instance_load(args: ServerArgs) -> None:
    """Upstream falls back to disk silently when R-Fork flags are incomplete; we say which flag is missing,
    and refuse when there is nothing on disk to fall back to."""
    from sglang.srt.server_args import ServerArgsError

    if args.remote_instance_weight_loader_start_seed_via_transfer_engine and not _mooncake_available():
        logger.warning(
            "--remote-instance-weight-loader-start-seed-via-transfer-engine ignored: mooncake is not "
            "installed (pip install mooncake-transfer-engine); this instance will not publish its weights."
        )
        args.remote_instance_weight_loader_start_seed_via_transfer_engine = False
    if args.load_format != "remote_instance":
        return
    missing = [
        flag
        for flag, value in (
            (
                "--remote-instance-weight-loader-seed-instance-ip",
                args.remote_instance_weight_loader_seed_instance_ip,
            ),
            (
                "--remote-instance-weight-loader-seed-instance-service-port",
                args.remote_instance_weight_loader_seed_instance_service_port,
            ),
        )
        if value is None
    ]
    backend = args.remote_instance_weight_loader_backend
    if backend == "nccl" and args.remote_instance_weight_loader_send_weights_group_ports is None:
        missing.append("--remote-instance-weight-loader-send-weights-group-ports")
    if backend == "transfer_engine" and not _mooncake_available():
        missing.append("mooncake (pip install mooncake-transfer-engine) for the transfer_engine backend")
    if not missing:
        return
    what = ", ".join(missing)
    if args.model_path and not _has_weight_files(args.model_path):
        raise ServerArgsError(
            f"--load-format remote_instance needs {what}, and {args.model_path} has no weight files to load "
            "from disk instead."
        )
    logger.warning("--load-format remote_instance is missing %s; loading weights from disk (auto) instead.", what)
    args.load_format = "auto"


def check_remote_instance_args(args: ServerArgs) -> None:
    """Raise ServerArgsError for remote-instance flags that cannot work together."""
    from sglang.srt.server_args import ServerArgsError

    ports = args.remote_instance_weight_loader_send_weights_group_ports
    if ports is not None and not (isinstance(ports, list) and all(isinstance(p, int) and 0 < p < 65536 for p in ports)):
        raise ServerArgsError(
            "--remote-instance-weight-loader-send-weights-group-ports must be a JSON list of ports, "
            f"e.g. '[60000,60001]'; got {ports!r}."
        )
    if args.load_format == "remote_instance" and ports is not None and len(ports) != args.tp_size:
        raise ServerArgsError(
            f"--remote-instance-weight-loader-send-weights-group-ports has {len(ports)} port(s) for "
            f"--tp-size {args.tp_size}; give exactly one port per TP rank."
        )
    if args.remote_instance_weight_loader_timeout <= 0:
        raise ServerArgsError("--remote-instance-weight-loader-timeout must be positive.")
    if (
        args.load_format == "remote_instance"
        and args.remote_instance_weight_loader_peer_assist
        and args.remote_instance_weight_loader_backend != "transfer_engine"
    ):
        raise ServerArgsError(
            "--remote-instance-weight-loader-peer-assist works over TransferEngine only; add "
            "--remote-instance-weight-loader-backend transfer_engine or drop the flag."
        )


def _mooncake_available() -> bool:
    # Imported here: the guard module is light, but mooncake itself is only imported on the TransferEngine branches.
    from sglang.srt.remote_instance.mooncake_guard import mooncake_available

    return mooncake_available()


def _has_weight_files(model_path: str) -> bool:
    return any(glob.glob(os.path.join(model_path, pattern)) for pattern in ("*.safetensors", "*.bin", "*.pt"))
