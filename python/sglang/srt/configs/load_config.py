"""How weights are loaded: the load format and its options."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LoadFormat(str, enum.Enum):
    """Weight sources; `remote_instance` is Tensor R-Fork."""

    AUTO = "auto"
    SAFETENSORS = "safetensors"
    PT = "pt"
    DUMMY = "dummy"
    REMOTE_INSTANCE = "remote_instance"


@dataclass(frozen=True)
class LoadConfig:
    """Options a loader needs besides the model config."""

    load_format: LoadFormat = LoadFormat.AUTO
    seed_instance_ip: str | None = None
    seed_instance_service_port: int | None = None
    send_weights_group_ports: tuple[int, ...] | None = None
    remote_backend: str = "nccl"
    timeout: float = 120.0
    seed_api_key: str | None = None
    verify: bool = True
    refuse_unverified: bool = False
    peer_assist: bool = False
