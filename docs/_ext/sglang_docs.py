"""Sphinx extension: pages and figures generated from the code at build time, so they cannot drift.

At `builder-inited` it writes into `docs/_generated/`:
- `server_args.md`: every `ServerArgs` field as a `{option}` entry (flag, type, default, choices, help),
  grouped by the section comments of the dataclass;
- `sampling_params.md`, `request_fields_*.md`: the fields the native and OpenAI requests accept;
- `endpoints.md`: every HTTP route of the server, each with a one-line description written here;
- `support_matrix.md`: architectures x features, each cell naming its tests (see `support_matrix.py`);
- `rfork_*.svg`, `request_flow.svg`: sequence diagrams (see `diagrams.py`);
- `benchmarks.md` and one PNG per plot (see `../plot_benchmarks.py`);
- `headline.md`, `benchmark_summary.md` and their charts: the numbers the landing page leads with, and
  the summary atop the benchmarks page (see `../headline.py`).

Anything the code has and these docs do not describe (a route, a sampling parameter), or the other
way round, stops the build with an error naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

DOCS = Path(__file__).resolve().parent.parent
PROGRAM = "sglang.launch_server"

# One line per route: what it is for. Routes of the running app missing here (or extra here) fail the build.
ENDPOINTS: dict[str, str] = {
    "/health": "Liveness: 200 while every scheduler process is alive, 503 with the reason otherwise.",
    "/health_generate": "Readiness: 200 once a one-token generation completes (503 after 20 s).",
    "/generate": "Native generation: text or token ids in, text and token ids out; optional streaming.",
    "/get_model_info": "Model path, architecture, dtype and context length.",
    "/get_server_info": "Every server argument (keys redacted), start-up facts (weight load time, fork report, "
    "`startup_timeline`: every phase of the start, timed from the launch) and live load counters.",
    "/flush_cache": "Empty the radix (prefix) cache; refused while requests are running.",
    "/get_weights_by_name": "One weight by runtime or checkpoint name, as upstream reads it (rows of TP rank 0).",
    "/abort_request": 'Stop a running request by its `rid`, or every request in flight with `"abort_all": true`.',
    "/tokenize": "Token ids of a text (or of each text of a list), their count and the context length.",
    "/detokenize": "Text of a list of token ids (or of each list of a list).",
    "/get_load": "Load of the server as upstream reports it: a list with one entry per data-parallel rank.",
    "/metrics": "Prometheus metrics (text format) with `--enable-metrics`; 404 without it.",
    "/start_profile": "Start a torch profiler run on every TP rank (trace per rank to a directory).",
    "/stop_profile": "Stop the profiler run and write each rank's trace.",
    "/v1/models": "OpenAI: the one served model.",
    "/v1/models/{model_id:path}": "OpenAI: the served model's card by its id (404 for any other id).",
    "/v1/completions": "OpenAI: text completions, streaming or not.",
    "/v1/chat/completions": "OpenAI: chat completions with the model's chat template, streaming or not.",
    "/remote_instance_weight_manifest": "R-Fork (ours): one TP rank's parameter list and checksums.",
    "/remote_instance_fork_lease": "R-Fork (ours, NCCL): reserve the seed's single fork slot.",
    "/remote_instance_fork_lease/release": "R-Fork (ours, NCCL): give the fork slot back.",
    "/init_weights_send_group_for_remote_instance": "R-Fork (upstream, NCCL): seed ranks open their pair groups.",
    "/send_weights_to_remote_instance": "R-Fork (upstream, NCCL): seed ranks broadcast every parameter.",
    "/remote_instance_transfer_engine_info": "R-Fork (upstream, TransferEngine): where one rank's weights live.",
    "/get_remote_instance_transfer_engine_info": "R-Fork (upstream, TransferEngine): deprecated alias of the above.",
    "/remote_instance_peers": "R-Fork (ours, TransferEngine peer assist): the seed's swarm registry of forking "
    "clients that serve tensors to each other (GET the list, PUT an announcement).",
}

# Every flag of the Tensor R-Fork section of ServerArgs (plus the two general ones a fork needs):
# (where it is set, which backend it concerns, what it does). A flag missing here fails the build.
RFORK_FLAGS: dict[str, tuple[str, str, str]] = {
    "load_format": (
        "client",
        "both",
        "`remote_instance` makes this instance fork its weights instead of loading them.",
    ),
    "remote_instance_weight_loader_seed_instance_ip": (
        "client",
        "both",
        "Address of the seed as the client reaches it; for NCCL also where the groups meet.",
    ),
    "remote_instance_weight_loader_seed_instance_service_port": (
        "client",
        "both",
        "The seed's HTTP `--port` (control requests only; no weights go through it).",
    ),
    "remote_instance_weight_loader_send_weights_group_ports": (
        "client",
        "nccl",
        "One free TCP port per TP rank on the seed's host, where the seed rank listens for "
        "its client rank while the weights move, e.g. `'[60000,60001]'` for `--tp-size 2`.",
    ),
    "remote_instance_weight_loader_backend": ("client", "both", "`nccl` or `transfer_engine`."),
    "remote_instance_weight_loader_start_seed_via_transfer_engine": (
        "seed",
        "transfer_engine",
        "Register the weights with Mooncake at start-up and publish where they are; "
        "a client of either kind can set it too, to be a seed once forked.",
    ),
    "remote_instance_weight_loader_peer_assist": (
        "client",
        "transfer_engine",
        "Fan-out: while forking, serve the tensors already verified to other clients of the same seed and read "
        "from them too (every byte checked against the seed's checksums); keep serving once forked.",
    ),
    "engine_info_bootstrap_port": (
        "seed",
        "transfer_engine",
        "Port of the seed's bootstrap server (node 0, on `--host`); every seed on one host needs its own.",
    ),
    "remote_instance_weight_loader_timeout": (
        "both",
        "both",
        "Client: the whole fork must finish within this many seconds. Seed: the longest it waits "
        "for a client's group; an unused lease expires after twice this plus 5 s.",
    ),
    "remote_instance_weight_loader_seed_api_key": (
        "client",
        "both",
        "Key sent to the seed (`Authorization: Bearer ...`); defaults to the client's own `--api-key`.",
    ),
    "remote_instance_weight_loader_disable_verify": (
        "client",
        "both",
        "Skip comparing the per-tensor checksums after the transfer (the manifest check still runs).",
    ),
    "remote_instance_weight_loader_refuse_unverified": (
        "client",
        "both",
        "Refuse a seed that publishes no manifest or checksums (an upstream SGLang seed) instead of forking "
        "over upstream's protocol with a warning naming what was not verified.",
    ),
    "api_key": ("seed", "both", "Guards every endpoint but `/health`, the R-Fork ones included."),
}

EXTRAS: dict[str, str] = {
    "test": "Running the test suite (`pytest`, the `openai` client the API tests use).",
    "docs": "Building these docs (Sphinx, MyST, the Furo theme, matplotlib for the benchmark charts).",
    "transfer-engine": "Mooncake TransferEngine, CUDA 12 build: the R-Fork TransferEngine backend on GPUs.",
    "transfer-engine-cpu": "Mooncake TransferEngine, CPU-only build: the same backend over TCP on any machine.",
    "flashinfer": "FlashInfer attention kernels (CUDA): the default attention backend on GPUs when installed.",
}

SAMPLING_PARAMS: dict[str, str] = {
    "max_new_tokens": "Most tokens to generate; `null` means no limit of its own (a stop condition or the "
    "context length ends the output: prompt plus output never exceed it).",
    "temperature": "Softmax temperature; 0 means greedy.",
    "top_p": "Nucleus sampling: smallest set of tokens whose probabilities add up to this.",
    "top_k": "Sample among the k most likely tokens; -1 disables.",
    "min_p": "Drop tokens less likely than this fraction of the most likely one.",
    "frequency_penalty": "Penalise tokens by how often they already appeared in the output.",
    "presence_penalty": "Penalise tokens that already appeared in the output at all.",
    "repetition_penalty": "Multiplicative penalty on tokens seen in the prompt or the output (1 = off).",
    "min_new_tokens": "Do not stop (EOS, stop ids) before this many tokens.",
    "stop": "Strings that end the generation; the text is cut before them.",
    "stop_token_ids": "Token ids that end the generation.",
    "ignore_eos": "Keep generating past the end-of-sequence token.",
    "skip_special_tokens": "Leave special tokens out of the returned text.",
    "seed": "Per-request random seed, for reproducible sampling.",
    "n": "Number of samples per prompt (1-64); with n > 1 the answer is a list; sample j uses seed + j.",
    "logit_bias": "Token id (a string) to a value in [-100, 100] added to that token's logit before sampling "
    "(-100 all but bans it, 100 all but forces it).",
    "json_schema": "Structured output: the text must be JSON matching this JSON Schema (a string, or an object).",
    "regex": "Structured output: the text must match this regular expression.",
    "ebnf": "Structured output: the text must match this EBNF grammar (rule `root` first).",
}


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("benchmark_results_dir", str(DOCS.parent / "benchmark" / "results"), "env")
    app.connect("builder-inited", _generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


def _generate(app: Sphinx) -> None:
    out = Path(app.srcdir) / "_generated"
    out.mkdir(exist_ok=True)
    sys.path.insert(0, str(DOCS))
    import diagrams
    import headline
    import plot_benchmarks
    import support_matrix

    files = {
        "server_args.md": server_args_markdown(),
        "sampling_params.md": sampling_params_markdown(),
        "endpoints.md": endpoints_markdown(),
        "extras.md": extras_markdown(),
        "rfork_flags.md": rfork_flags_markdown(),
        "source_map.md": source_map_markdown(),
        "support_matrix.md": support_matrix.support_matrix_markdown(),
        **request_fields_markdown(),
        **diagrams.all_svgs(),
    }
    results = plot_benchmarks.load_results(Path(app.config.benchmark_results_dir))
    files["benchmarks.md"] = plot_benchmarks.render(results, out, link_prefix="/_generated/")
    files.update(headline.render(headline.headlines(Path(app.config.benchmark_results_dir)), out, "/_generated/"))
    for name, text in files.items():
        write_if_changed(out / name, text)


def write_if_changed(path: Path, text: str) -> None:
    """Write text to path unless it already holds it (unchanged files do not trigger a rebuild)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# --- server arguments ------------------------------------------------------------------------------


def field_groups(cls: type) -> dict[str, str]:
    """field name -> the section comment (`# Title`) above it in the class body."""
    groups: dict[str, str] = {}
    group = "Other"
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"^    # (.+)$", line)
        if comment:
            group = comment.group(1).strip()
            continue
        name = re.match(r"^    (\w+)\s*:", line)
        if name:
            groups[name.group(1)] = group
    return groups


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unset_defaults(cls: Any) -> dict[str, dict[str, Any]]:
    """What each None-default field becomes when left unset, on CPU and on CUDA.

    Runs the dataclass's own default filling (`_fill_defaults`) on both devices, so the page shows the
    values the code picks, not a copy of them. Placeholders stand for fields that default to another one.
    """
    placeholders = {"model_path": "\0model_path", "api_key": "\0api_key"}
    filled = {}
    # The CUDA column describes the CUDA install of the installation page, which has FlashInfer; a stub
    # module stands in for it on a docs machine without it (its attention default is "flashinfer if importable").
    stub = "flashinfer" not in sys.modules and importlib.util.find_spec("flashinfer") is None
    if stub:
        stand_in = types.ModuleType("flashinfer")
        # The launcher looks FlashInfer up with find_spec, which refuses a module without a spec.
        stand_in.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
        sys.modules["flashinfer"] = stand_in
    try:
        for device in ("cpu", "cuda"):
            args = cls.__new__(cls)
            for f in dataclasses.fields(cls):
                setattr(args, f.name, _declared_default(f))
            for name, value in placeholders.items():
                setattr(args, name, value)
            args.device = device
            args._fill_defaults()
            filled[device] = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    finally:
        if stub:
            del sys.modules["flashinfer"]
    reverse = {v: k for k, v in placeholders.items()}
    result: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        if _declared_default(f) is not None or f.name in placeholders or f.name == "device":
            continue
        result[f.name] = {
            device: ("same as " + flag_of(reverse[v]) if v in reverse else v)
            for device, v in ((d, filled[d][f.name]) for d in ("cpu", "cuda"))
        }
    return result


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _value_text(value: Any) -> str:
    if isinstance(value, str) and value.startswith("same as "):
        return f"same as `{value.removeprefix('same as ')}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def server_args_markdown() -> str:
    """The body of the server-arguments page: one `{option}` per flag, grouped as in the dataclass."""
    from sglang.srt.server_args import ServerArgs

    groups = field_groups(ServerArgs)
    unset = _unset_defaults(ServerArgs)
    by_group: dict[str, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(ServerArgs):
        by_group.setdefault(groups.get(f.name, "Other"), []).append(f)
    lines = [f"```{{program}} {PROGRAM}", "```", ""]
    lines += [
        "```{option} -h, --help",
        "Print every flag with its help text, then exit.",
        "```",
        "",
    ]
    for group, fields in by_group.items():
        lines += [f"## {group}", ""]
        for f in fields:
            lines += _option_entry(f, unset.get(f.name))
    return "\n".join(lines)


def rfork_flags_markdown() -> str:
    """Table of the flags a fork involves, each linked to its entry on the server-arguments page."""
    from sglang.srt.server_args import ServerArgs

    fields = {f.name: f for f in dataclasses.fields(ServerArgs)}
    in_section = {name for name, group in field_groups(ServerArgs).items() if "R-Fork" in group}
    _same_keys(
        "R-Fork flag",
        in_section | {"load_format", "api_key"},
        set(RFORK_FLAGS),
        "RFORK_FLAGS in docs/_ext/sglang_docs.py",
    )
    rows = ["| Flag | Set on | Backend | Default | What it does |", "|---|---|---|---|---|"]
    for name, (role, backend, text) in RFORK_FLAGS.items():
        f = fields[name]
        default = (
            "flag"
            if str(f.type) == "bool"
            else _value_text(_declared_default(f))
            if _declared_default(f) is not None
            else "unset"
        )
        link = f"{{option}}`{flag_of(name)} <{PROGRAM} {flag_of(name)}>`"
        rows.append(f"| {link} | {role} | {backend} | {default} | {text} |")
    return "\n".join(rows) + "\n"


def _option_entry(f: dataclasses.Field, unset: dict[str, Any] | None) -> list[str]:
    meta = f.metadata
    is_flag = str(f.type) == "bool"
    choices = "{" + ",".join(map(str, meta["choices"])) + "}" if "choices" in meta else f.name.upper()
    metavar = "" if is_flag else " " + choices
    default = _declared_default(f)
    facts = ["Type: flag (no value)" if is_flag else f"Type: `{_type_text(f)}`"]
    if not is_flag:
        facts.append(f"default: {_value_text(default) if default is not None else 'unset'}")
    if "choices" in meta:
        facts.append("choices: " + ", ".join(f"`{c}`" for c in meta["choices"]))
    lines = [f"```{{option}} {flag_of(f.name)}{metavar}", _md_escape(meta.get("help", "")), "", "; ".join(facts) + "."]
    if unset is not None:
        cpu, cuda = unset["cpu"], unset["cuda"]
        if cpu == cuda and cpu is not None:
            lines += ["", f"When unset: {_value_text(cpu)}."]
        elif cpu is not None or cuda is not None:
            lines += ["", f"When unset: {_value_text(cpu)} on CPU, {_value_text(cuda)} on CUDA."]
    lines += ["```", ""]
    return lines


def _type_text(f: dataclasses.Field) -> str:
    text = str(f.type).replace(" | None", "")
    if f.metadata.get("parse") is not None and text.startswith("list"):
        return f"JSON {text}"
    return text


def _md_escape(text: str) -> str:
    return text.replace("*", r"\*").replace("<", r"\<")


def _cell_text(text: str) -> str:
    """text made safe for a Markdown table cell."""
    return _md_escape(text).replace("|", r"\|")


# --- source map ------------------------------------------------------------------------------------


def source_map_markdown() -> str:
    """One table per package: every module under python/sglang with the first line of its docstring."""
    import ast

    root = DOCS.parent / "python"
    by_package: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((root / "sglang").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.name == "__init__.py" and not doc:
            continue
        rel = path.relative_to(root).as_posix()
        by_package.setdefault(rel.rsplit("/", 1)[0], []).append((rel.rsplit("/", 1)[1], doc.strip().split("\n")[0]))
    lines = []
    for package, modules in by_package.items():
        lines += [f"`{package}/`", "", "| Module | What it is |", "|---|---|"]
        lines += [f"| `{name}` | {_cell_text(doc)} |" for name, doc in modules]
        lines.append("")
    return "\n".join(lines)


# --- install extras --------------------------------------------------------------------------------


def pyproject_extras() -> dict[str, list[str]]:
    """The optional-dependencies of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    text = (DOCS.parent / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    extras = {}
    for name, items in re.findall(r"^([\w-]+)\s*=\s*\[(.*?)\]", section.group(1) if section else "", re.M | re.S):
        extras[name] = re.findall(r'"([^"]+)"', items)
    return extras


def extras_markdown() -> str:
    """Table of the install extras: name, what it pulls in, what it is for."""
    extras = pyproject_extras()
    _same_keys("install extra", set(extras), set(EXTRAS), "EXTRAS in docs/_ext/sglang_docs.py")
    rows = ["| Extra | Packages | What it is for |", "|---|---|---|"]
    rows += [f"| `{name}` | {', '.join(f'`{p}`' for p in pkgs)} | {EXTRAS[name]} |" for name, pkgs in extras.items()]
    return "\n".join(rows) + "\n"


# --- request fields and sampling parameters ----------------------------------------------------------


def sampling_params_markdown() -> str:
    """Table of SamplingParams fields: name, type, default and the description above."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    _same_keys("SamplingParams field", set(fields), set(SAMPLING_PARAMS), "SAMPLING_PARAMS in docs/_ext/sglang_docs.py")
    rows = ["| Parameter | Type | Default | Meaning |", "|---|---|---|---|"]
    for name, f in fields.items():
        default = _declared_default(f)
        rows.append(f"| `{name}` | `{_annotation_text(f.type)}` | `{default!r}` | {SAMPLING_PARAMS[name]} |")
    return "\n".join(rows) + "\n"


def request_fields_markdown() -> dict[str, str]:
    """One table per request body: every field the endpoint accepts (others are rejected with 400)."""
    from sglang.srt.entrypoints.http_server import GenerateRequest
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    pages = {}
    for key, model in (
        ("generate", GenerateRequest),
        ("completions", CompletionRequest),
        ("chat_completions", ChatCompletionRequest),
    ):
        rows = ["| Field | Type | Default |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            annotation = _annotation_text(info.annotation)
            default = "required" if info.is_required() else f"`{info.default!r}`"
            rows.append(f"| `{name}` | `{annotation}` | {default} |")
        pages[f"request_fields_{key}.md"] = "\n".join(rows) + "\n"
    return pages


def _annotation_text(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\b[\w.]+\.(\w+)", r"\1", text)  # drop module paths
    return text.replace("typing.", "").replace("|", r"\|")


# --- endpoints ---------------------------------------------------------------------------------------


def app_routes() -> dict[str, list[str]]:
    """path -> HTTP methods of every API route the server's FastAPI app serves."""
    from fastapi.routing import APIRoute

    from sglang.srt.entrypoints.http_rfork_te import add_transfer_engine_routes
    from sglang.srt.entrypoints.http_server import create_app

    app = create_app(None)  # routes do not touch the TokenizerManager until called
    add_transfer_engine_routes(app)  # no-op if create_app added them already
    return {r.path: sorted(r.methods) for r in app.routes if isinstance(r, APIRoute)}


def endpoints_markdown() -> str:
    """Table of every route: methods, path, whether --api-key guards it, and what it is for."""
    from sglang.srt.entrypoints.http_auth import OPEN_PATHS

    routes = app_routes()
    _same_keys("route", set(routes), set(ENDPOINTS), "ENDPOINTS in docs/_ext/sglang_docs.py")
    rows = ["| Method | Path | Needs the API key | What it is for |", "|---|---|---|---|"]
    for path, methods in routes.items():
        key = "no" if path in OPEN_PATHS else "yes, when `--api-key` is set"
        rows.append(f"| {', '.join(methods)} | `{path}` | {key} | {ENDPOINTS[path]} |")
    return "\n".join(rows) + "\n"


def _same_keys(what: str, in_code: set[str], in_docs: set[str], where: str) -> None:
    missing, stale = sorted(in_code - in_docs), sorted(in_docs - in_code)
    if missing or stale:
        raise ExtensionError(
            f"The docs and the code disagree on each {what}: undocumented {missing}, documented but gone {stale}; "
            f"update {where}."
        )
