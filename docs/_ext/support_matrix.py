"""The "Supported models and features" matrix, generated from the code's registries and the test files.

Rows are the architectures of the model registry; options come from the registries the runtime looks
things up in (attention backends, load formats, R-Fork backends, grammar backends), read from their
`register_*` decorators and dicts, and checked against the choices `ServerArgs` offers. A matrix cell
names the test files that run that architecture for that feature, so a cell says "tested" only where a
test does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sphinx.errors import ExtensionError

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE = ROOT / "python" / "sglang"
TESTS = ROOT / "test" / "srt"


@dataclass(frozen=True)
class Feature:
    """A matrix column: what is tested, the test files that test it, and where they run."""

    name: str
    tests: tuple[str, ...]
    runs_on: str


FEATURES: list[Feature] = [
    Feature("Greedy output = HF transformers", ("test_models.py", "test_moe.py"), "CI, CPU"),
    Feature("Tensor parallel 2 = HF transformers", ("test_models.py", "test_moe.py"), "CI, CPU, gloo"),
    Feature("CUDA engine (CUDA graphs) = HF", ("test_cuda_engine.py", "test_moe_cuda.py"), "GPU machine"),
    Feature("HTTP / OpenAI serving", ("test_engine.py", "test_openai_server.py", "test_moe_serving.py"), "CI, CPU"),
    Feature("R-Fork, NCCL backend", ("test_rfork_nccl.py", "test_moe_serving.py"), "CI, CPU, gloo"),
    Feature(
        "R-Fork, TransferEngine backend",
        ("test_rfork_transfer_engine.py", "test_moe_serving.py"),
        "CI, CPU, Mooncake over TCP",
    ),
    Feature("R-Fork with upstream-style peers", ("test_rfork_upstream_wire.py",), "CI, CPU"),
    Feature("Structured output (JSON schema, regex, EBNF)", ("test_structured_output.py",), "CI, CPU"),
]


def architectures() -> dict[str, str]:
    """HF architecture name -> model_type, for every architecture the model registry serves."""
    from sglang.srt.models.registry import ModelRegistry
    from sglang.tools.make_tiny_model import ARCHITECTURES

    model_types = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
    missing = [a for a in ModelRegistry.supported() if a not in model_types]
    if missing:
        raise ExtensionError(
            f"{missing} are in the model registry but sglang.tools.make_tiny_model cannot build them; "
            "add them to its ARCHITECTURES so tests (and this matrix) can cover them."
        )
    return {arch: model_types[arch] for arch in ModelRegistry.supported()}


def decorated(decorator: str, pattern: str = r'"(\w+)"') -> list[str]:
    """Every name registered with @decorator(...) anywhere under python/sglang, in source order."""
    names: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        for args in re.findall(rf"^@{decorator}\((.*?)\)\s*$", path.read_text(), re.M):
            names += re.findall(pattern, args)
    return names


def registries() -> dict[str, list[str]]:
    """Option kind -> the names its registry holds, each checked against the flag's choices."""
    from sglang.srt.constrained.grammar_backend import GRAMMAR_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKENDS, DEVICES, LOAD_FORMATS, REMOTE_BACKENDS
    from sglang.srt.server_args import GRAMMAR_BACKENDS as GRAMMAR_CHOICES

    found = {
        "`--device`": (list(DEVICES), list(DEVICES)),
        "`--attention-backend`": (decorated("register_attention_backend"), list(ATTENTION_BACKENDS)),
        "`--load-format`": (
            [f.lower() for f in decorated("register_loader", r"LoadFormat\.(\w+)")],
            list(LOAD_FORMATS),
        ),
        "`--remote-instance-weight-loader-backend`": (decorated("register_remote_backend"), list(REMOTE_BACKENDS)),
        "`--grammar-backend`": ([*GRAMMAR_BACKENDS, "none"], list(GRAMMAR_CHOICES)),
    }
    for flag, (registered, choices) in found.items():
        if sorted(registered) != sorted(choices):
            raise ExtensionError(
                f"{flag}: the registry holds {sorted(registered)} but ServerArgs offers {sorted(choices)}; "
                "make them agree (python/sglang/srt/server_args.py and the registry's module)."
            )
    return {flag: choices for flag, (_, choices) in found.items()}


def covering_tests(feature: Feature, model_type: str) -> list[str]:
    """The feature's test files that name the architecture's model_type as a string."""
    hits = []
    for name in feature.tests:
        path = TESTS / name
        if not path.is_file():
            raise ExtensionError(f"docs/_ext/support_matrix.py names {path}, which does not exist")
        if re.search(rf"[\"']{re.escape(model_type)}[\"']", path.read_text()):
            hits.append(name)
    return hits


def support_matrix_markdown() -> str:
    """The matrix (features x architectures, cells naming tests) and the table of registered options."""
    archs = architectures()
    # Columns are headed by model_type (`llama`), which is short; the table above the matrix maps it to the class.
    header = " | ".join(f"`{t}`" for t in archs.values())
    lines = [f"| Feature (where its tests run) | {header} |", "|---|" + "---|" * len(archs)]
    for feature in FEATURES:
        cells = []
        for model_type in archs.values():
            hits = covering_tests(feature, model_type)
            cells.append("✓ " + ", ".join(f"`{h}`" for h in hits) if hits else "not tested")
        lines.append(f"| {feature.name} ({feature.runs_on}) | " + " | ".join(cells) + " |")
    lines += ["", "| Option | Values |", "|---|---|"]
    lines += [f"| {flag} | {', '.join(f'`{v}`' for v in values)} |" for flag, values in registries().items()]
    return "\n".join(lines) + "\n"
