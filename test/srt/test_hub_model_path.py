"""--model-path ORG/NAME through the Hugging Face cache (populated here; no network): a real server started from a
Hub id, --revision and --download-dir, HF_HUB_OFFLINE, and an R-Fork client that has no weights in its snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests

from sglang.srt.server_args import ServerArgs, ServerArgsError
from sglang.test.test_utils import config_only_copy, kill_process_tree, popen_launch_server

HUB_ID = "tiny-org/tiny-llama"
MAIN, V1 = "a" * 40, "b" * 40


def _add_snapshot(cache: Path, repo: str, ref: str, commit: str, model_dir: str) -> None:
    """Lay model_dir out as the Hub cache does: refs/<ref> holds the commit, snapshots/<commit> the files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    _add_snapshot(cache, HUB_ID, "main", MAIN, tiny_model_dir("llama"))
    _add_snapshot(cache, HUB_ID, "v1", V1, tiny_model_dir("llama", max_position_embeddings=1024))
    weightless = config_only_copy(tiny_model_dir("llama"), tmp_path_factory.mktemp("weightless"))
    _add_snapshot(cache, "tiny-org/config-only", "main", MAIN, weightless)
    return cache


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "not-here"))  # only --download-dir may find the model
    return cache


def test_server_from_hub_id_revision_and_download_dir(cache: Path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "not-here")}
    args = ["--revision", "v1", "--download-dir", str(cache)]
    proc = popen_launch_server(HUB_ID, other_args=args, env=env)
    try:
        url = proc.base_url
        assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == [HUB_ID]
        info = requests.get(f"{url}/get_model_info", timeout=10).json()
        assert info["context_length"] == 1024  # the v1 snapshot's, not main's 2048
        assert info["model_path"].endswith(f"snapshots/{V1}")
        out = requests.post(
            f"{url}/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 3}}, timeout=60
        ).json()
        assert out["meta_info"]["completion_tokens"] == 3
    finally:
        kill_process_tree(proc.pid)


def test_default_revision_is_main(offline: Path):
    args = ServerArgs(model_path=HUB_ID, download_dir=str(offline), device="cpu")
    assert args.model_path.endswith(f"snapshots/{MAIN}") and args.served_model_name == HUB_ID
    assert args.tokenizer_path == args.model_path


def test_offline_without_the_model_names_it(offline: Path):
    with pytest.raises(ServerArgsError, match=r"tiny-org/absent.*HF_HUB_OFFLINE"):
        ServerArgs(model_path="tiny-org/absent", download_dir=str(offline), device="cpu")
    with pytest.raises(ServerArgsError, match="revision nope"):
        ServerArgs(model_path=HUB_ID, revision="nope", download_dir=str(offline), device="cpu")


def test_remote_instance_client_needs_no_weights(offline: Path):
    args = ServerArgs(
        model_path="tiny-org/config-only",
        download_dir=str(offline),
        device="cpu",
        load_format="remote_instance",
        remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
        remote_instance_weight_loader_seed_instance_service_port=30000,
        remote_instance_weight_loader_send_weights_group_ports=[60000],
    )
    snapshot = Path(args.model_path)
    assert (snapshot / "config.json").is_file() and not list(snapshot.glob("*.safetensors"))
    assert args.load_format == "remote_instance"


def test_local_paths_are_left_alone(tiny_model_dir):
    path = tiny_model_dir("llama")
    assert ServerArgs(model_path=path, device="cpu").model_path == path
