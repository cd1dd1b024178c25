"""The docs site: built with warnings as errors, its flag list equal to the launcher's, and every example run.

Examples are the fenced blocks of docs/**/*.md; a `% doc-test: ACTION ...` comment line right above a
block says what to do with it (docs/developer_guide/contributing.md lists the actions). They run in
page order against real servers, with the example ports and /tmp paths swapped for free ports and a
temporary directory. The README's commands are run the same way.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.test.test_utils import find_free_port, kill_process_tree

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
# Reading order: a page may use the servers an earlier page started.
PAGES = [
    "get_started/install.md",
    "get_started/quick_start.md",
    "basic_usage/http_api.md",
    "basic_usage/offline_engine.md",
    "advanced_features/rfork.md",
    "advanced_features/observability.md",
    "advanced_features/server_arguments.md",
    "references/supported_models.md",
    "references/benchmarks.md",
    "references/reliability.md",
    "developer_guide/architecture.md",
    "developer_guide/contributing.md",
    "index.md",
]
EXAMPLE_LANGS = {"bash", "sh", "shell", "console", "python"}
ACTIONS = {
    "run",
    "server",
    "fails",
    "python",
    "response",
    "output",
    "log",
    "skip",
    "request",
    "same-as-readme",
    "same-as-ci",
    "docs-build",
    "messages-in-source",
}
# Ports the examples use: HTTP ports 300xx, group ports 600xx, bootstrap ports 678x/679x.
EXAMPLE_PORT = re.compile(r"(?<![\d.])(300\d\d|600\d\d|67[89]\d)(?!\d)")
MARKER = re.compile(r"^% doc-test: (\S+)\s*(.*)$")
# Examples that cannot run in CI (CUDA, the GPU machine, network installs); a new one must be justified here.
MAX_SKIPPED = 5
SERVER_TIMEOUT = 300
RUN_TIMEOUT = 180


@dataclass
class Block:
    """A fenced block of a docs page and the doc-test marker above it (if any)."""

    page: str
    line: int
    lang: str
    code: str
    action: str | None = None
    args: str = ""
    table: list[str] = field(default_factory=list)  # for messages-in-source: the table below the marker

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"

    def option(self, name: str) -> str | None:
        """Value of `name=...` among the marker's arguments (`contains=` takes the rest of the line)."""
        if name == "contains":
            m = re.search(r"\bcontains=(.*)$", self.args)
            return m.group(1) if m else None
        m = re.search(rf"\b{name}=(\S+)", self.args)
        return m.group(1) if m else None

    def has_flag(self, name: str) -> bool:
        return name in self.args.split()


def parse_page(page: str, text: str) -> list[Block]:
    """Every fenced block of a Markdown page, with its marker; marked tables become blocks too."""
    lines = text.splitlines()
    blocks: list[Block] = []
    marker: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        m = MARKER.match(stripped)
        if m:
            marker = (m.group(1), m.group(2).strip())
            assert marker[0] in ACTIONS, f"docs/{page}:{i + 1}: unknown doc-test action {marker[0]!r}"
            if marker[0] == "messages-in-source":
                table = []
                i += 1
                while i < len(lines) and lines[i].strip().startswith("|"):
                    table.append(lines[i].strip())
                    i += 1
                blocks.append(Block(page, i, "table", "", *marker, table=table))
                marker = None
                continue
        elif stripped.startswith("```"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            info = stripped[3:].strip()
            lang = info.split()[1] if info.startswith("{code-block}") and len(info.split()) > 1 else info
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            code = "\n".join(line[indent:] for line in lines[start:i])
            blocks.append(Block(page, start, lang, code, *(marker or (None, ""))))
            marker = None
        elif stripped:
            marker = None  # a marker applies only to the block right below it
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_page(page, (DOCS / page).read_text())]


class Sandbox:
    """Runs example code with the example ports and /tmp paths replaced; owns the servers it starts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: dict[str, str] = {}
        self.servers: list[subprocess.Popen] = []
        self.last_output = ""  # stdout of the last run, for response/output blocks
        self.last_log = ""  # full output of the last server or failing command, for log blocks
        self.last_skipped = False
        bindir = str(Path(sys.executable).parent)  # `python` in the examples is this interpreter
        pythonpath = os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "PYTHONPATH": pythonpath}

    def substitute(self, code: str) -> str:
        def port(m: re.Match) -> str:
            return self.ports.setdefault(m.group(1), str(find_free_port()))

        return EXAMPLE_PORT.sub(port, code).replace("/tmp/", f"{self.tmp}/")

    def run(self, code: str, timeout: float = RUN_TIMEOUT, script: bool = False) -> subprocess.CompletedProcess:
        code = self.substitute(code)
        if script:
            path = self.tmp / "example.py"
            path.write_text(code)
            command = [sys.executable, str(path)]
        else:
            command = ["bash", "-e", "-c", code]
        return subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_server(self, code: str, where: str) -> None:
        code = self.substitute(code)
        port = re.search(r"--port (\d+)", code)
        assert port, f"{where}: a server example needs --port"
        log_path = self.tmp / f"server_{port.group(1)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                ["bash", "-c", code],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.servers.append(proc)
        url = f"http://127.0.0.1:{port.group(1)}/health"
        deadline = time.monotonic() + SERVER_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{where}: the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    self.last_log = log_path.read_text()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(
            f"{where}: the server did not answer {url} within {SERVER_TIMEOUT} s:\n{log_path.read_text()[-4000:]}"
        )

    def refresh_log(self) -> None:
        """The latest server's log as it is now (log lines written after /health answered)."""
        if self.servers:
            self.last_log = self.servers[-1].log_path.read_text()  # type: ignore[attr-defined]

    def close(self) -> None:
        # Servers stop gracefully in a few seconds each: stop them all at once.
        with ThreadPoolExecutor(max(1, len(self.servers))) as pool:
            list(pool.map(lambda proc: kill_process_tree(proc.pid), self.servers))


def same_shape(example, actual, path: str = "$", top: bool = True) -> list[str]:
    """Where actual lacks what example shows: keys (at the top, also extra keys), list items, JSON types."""
    if example is None:
        return []
    if isinstance(example, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {type(actual).__name__}"]
        problems = [f"{path}: no key {k!r}" for k in example if k not in actual]
        if top:
            problems += [f"{path}: key {k!r} is not in the docs' example" for k in actual if k not in example]
        for k in example:
            if k in actual:
                problems += same_shape(example[k], actual[k], f"{path}.{k}", top=False)
        return problems
    if isinstance(example, list):
        if not isinstance(actual, list) or len(actual) < len(example):
            return [f"{path}: expected a list of at least {len(example)} item(s), got {str(actual)[:80]}"]
        problems = []
        for i, item in enumerate(example):
            problems += same_shape(item, actual[i], f"{path}[{i}]", top=top and isinstance(item, dict))
        return problems
    kinds = ((bool,), (int, float), (str,))
    for kind in kinds:
        if isinstance(example, kind):
            ok = isinstance(actual, kind) and not (kind != (bool,) and isinstance(actual, bool))
            return [] if ok else [f"{path}: expected {type(example).__name__}, got {actual!r}"]
    return []


def log_pattern(example: str) -> re.Pattern:
    """A regex for an example log excerpt: any numbers, any whitespace, `...` for anything."""
    words = [re.escape(word).replace(r"\.\.\.", ".*?") for word in example.split()]
    pattern = re.sub(r"\d+(?:\\\.\d+)*", r"[\\d.]+", r"\s+".join(words))
    return re.compile(pattern, re.S)


def run_examples(blocks: list[Block], box: Sandbox) -> list[str]:
    """Run every marked block in order; returns the skip reasons (failures raise)."""
    skipped: list[str] = []
    have_mooncake = mooncake_available()
    for b in blocks:
        if b.action is None:
            continue
        if b.action in ("response", "output", "log") and box.last_skipped:
            continue
        box.last_skipped = False
        if b.option("needs") == "mooncake" and not have_mooncake:
            skipped.append(f"{b.where}: Mooncake is not importable")
            box.last_skipped = True
            continue
        if b.action == "server":
            box.start_server(b.code, b.where)
        elif b.action in ("run", "python"):
            result = box.run(b.code, script=b.action == "python")
            assert result.returncode == 0, f"{b.where} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            box.last_output = result.stdout
            if b.option("contains") is not None:
                assert b.option("contains") in result.stdout, f"{b.where}: output lacks {b.option('contains')!r}"
            if b.has_flag("same-lines"):
                lines = result.stdout.splitlines()
                assert len(lines) >= 2 and len(set(lines)) == 1, f"{b.where}: lines differ:\n{result.stdout}"
            box.refresh_log()
        elif b.action == "fails":
            result = box.run(b.code)
            box.last_log = result.stdout + result.stderr
            assert result.returncode != 0, f"{b.where}: expected a failure, it succeeded:\n{result.stdout}"
            assert b.option("contains") in box.last_log, (
                f"{b.where}: the error lacks {b.option('contains')!r}:\n{box.last_log}"
            )
        elif b.action == "response":
            problems = same_shape(json.loads(b.code), json.loads(box.last_output))
            assert not problems, f"{b.where}: the example response differs from the real one:\n" + "\n".join(problems)
        elif b.action == "output":
            assert box.last_output.strip() == b.code.strip(), f"{b.where}: the real output is\n{box.last_output}"
        elif b.action == "log":
            assert log_pattern(b.code).search(box.last_log), (
                f"{b.where}: no such line in the log:\n{box.last_log[-3000:]}"
            )
        elif b.action == "skip":
            assert b.args, f"{b.where}: say why the example is not run"
            skipped.append(f"{b.where}: {b.args}")
    return skipped


@functools.lru_cache(maxsize=1)
def launcher_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return result.stdout


def launcher_flags(help_text: str) -> set[str]:
    """Flags from the option lines of argparse's --help (`  -h, --help`, `  --port PORT`, ...)."""
    flags: set[str] = set()
    for line in help_text.splitlines():
        m = re.match(r"^  (-[\w-]+(?:, --[\w-]+)?)", line)
        if m:
            flags.update(part.strip() for part in m.group(1).split(","))
    return flags


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built with the command the contributing page gives, into a temporary directory."""
    (command,) = [b.code for b in all_blocks() if b.action == "docs-build"]
    out = tmp_path_factory.mktemp("html")
    argv = command.split()
    assert argv[0] == "sphinx-build" and argv[-1] == "docs/_build/html", command
    argv = [sys.executable, "-m", "sphinx", *argv[1:-1], str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out


def test_sphinx_build_has_no_warnings(built_site: Path) -> None:
    pages = {p.relative_to(built_site).as_posix() for p in built_site.rglob("*.html")}
    assert {page.replace(".md", ".html") for page in PAGES} <= pages


class _LinkCollector(HTMLParser):
    """The href/src targets and the element ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in ("href", "src") and value:
                self.targets.append((tag, value))


def _parse_page(path: Path) -> _LinkCollector:
    collector = _LinkCollector()
    collector.feed(path.read_text())
    return collector


def test_every_internal_link_and_image_resolves(built_site: Path) -> None:
    pages = {p: _parse_page(p) for p in built_site.rglob("*.html")}
    broken, checked = [], 0
    for page, parsed in pages.items():
        for tag, target in parsed.targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # another site: not checked offline
            path_part, _, fragment = target.partition("#")
            path_part = path_part.split("?", 1)[0]
            resolved = (page.parent / path_part).resolve() if path_part else page
            checked += 1
            where = f"{page.relative_to(built_site)}: <{tag}> {target}"
            if not resolved.is_file():
                broken.append(f"{where} (no file {resolved})")
            elif fragment and resolved.suffix == ".html":
                ids = pages[resolved].ids if resolved in pages else _parse_page(resolved).ids
                if fragment not in ids:
                    broken.append(f"{where} (no id {fragment!r} there)")
    assert checked > 500 and not broken, "\n".join(broken)


def test_server_arguments_page_lists_exactly_the_launchers_flags(built_site: Path) -> None:
    html = (built_site / "advanced_features" / "server_arguments.html").read_text()
    ids = set(re.findall(r'id="cmdoption-sglang\.launch_server-([\w-]+)"', html))
    page_flags = {"-h" if i == "h" else f"--{i}" for i in ids}
    help_flags = launcher_flags(launcher_help())
    assert "--remote-instance-weight-loader-backend" in help_flags and "-h" in help_flags
    assert page_flags == help_flags, (
        f"only in --help: {sorted(help_flags - page_flags)}; only on the page: {sorted(page_flags - help_flags)}"
    )


def test_every_example_is_marked_and_names_real_flags_and_extras() -> None:
    flags = launcher_flags(launcher_help())
    extras = set(docs_ext().pyproject_extras())
    problems = []
    for b in all_blocks():
        if b.lang in EXAMPLE_LANGS and b.action is None:
            problems.append(f"{b.where}: a {b.lang} example without a `% doc-test:` line above it")
        if "sglang.launch_server" in b.code:
            command = b.code.split("sglang.launch_server", 1)[1]
            problems += [
                f"{b.where}: {f} is not a launcher flag"
                for f in re.findall(r"(?<!\S)--[\w-]+", command)
                if f not in flags
            ]
        for named in re.findall(r'-e "\.\[([\w,-]+)\]"', b.code):
            problems += [f"{b.where}: no extra {e!r} in pyproject.toml" for e in named.split(",") if e not in extras]
    assert not problems, "\n".join(problems)


def docs_ext():
    """The docs' Sphinx extension module (for the lists it checks the code against)."""
    sys.path.insert(0, str(DOCS / "_ext"))
    import sglang_docs

    return sglang_docs


def test_troubleshooting_messages_are_in_the_source() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "python" / "sglang").rglob("*.py"))
    tables = [b for b in all_blocks() if b.action == "messages-in-source"]
    assert tables, "the R-Fork page has no troubleshooting table marked messages-in-source"
    fragments = [re.match(r"^\|\s*`([^`]+)`", row) for b in tables for row in b.table[2:]]
    assert all(fragments), "every row must start with a `message fragment`"
    missing = [m.group(1) for m in fragments if m.group(1) not in source]
    assert len(fragments) >= 10 and not missing, f"not in python/sglang any more: {missing}"


def test_request_examples_match_the_request_models() -> None:
    requests_shown = [b for b in all_blocks() if b.action == "request"]
    assert requests_shown
    for b in requests_shown:
        module, name = b.args.rsplit(".", 1)
        model = getattr(importlib.import_module(module), name)
        body = json.loads(b.code)
        unknown = set(body) - set(model.model_fields)
        missing = {k for k, f in model.model_fields.items() if f.is_required()} - set(body)
        assert not unknown and not missing, f"{b.where}: unknown fields {unknown}, missing {missing}"
        model(**body)


def test_diagrams_name_real_endpoints() -> None:
    ext = docs_ext()
    import diagrams

    bootstrap = {"/register_transfer_engine_info", "/get_transfer_engine_info"}
    unknown = diagrams.http_paths() - set(ext.app_routes()) - bootstrap
    assert diagrams.http_paths() and not unknown, f"diagrams name paths the server does not have: {unknown}"
    server = (ROOT / "python/sglang/srt/remote_instance/bootstrap_server.py").read_text()
    assert all(f'"{path}"' in server for path in bootstrap)


def test_readme_and_ci_commands_match_the_docs() -> None:
    readme, ci = README.read_text(), CI.read_text()
    for b in all_blocks():
        if b.action == "same-as-readme":
            assert b.code.strip() in readme, f"{b.where} differs from the README's command"
        if b.action == "same-as-ci":
            assert b.code.strip() in ci, f"{b.where} is not what .ci/run runs"
    readme_blocks = readme_code_blocks()
    assert readme_blocks[1].strip() in ci, "the README's test command is not what .ci/run runs"
    (build,) = [b.code.strip() for b in all_blocks() if b.action == "docs-build"]
    assert f"`{build}`" in readme, "the README's docs build command differs from the contributing page's"
    links = re.findall(r"\]\((docs/[^)]+)\)", readme)
    assert len(links) >= len(PAGES) - 1 and all((ROOT / link).is_file() for link in links), links


def readme_code_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S)


def test_benchmark_results_render(tmp_path: Path) -> None:
    sys.path.insert(0, str(DOCS))
    import plot_benchmarks

    (example,) = re.findall(r"^```json\n(.*?)^```", (ROOT / "benchmark/results/README.md").read_text(), re.M | re.S)
    results = tmp_path / "results"
    results.mkdir()
    (results / "example_run.json").write_text(example)
    text = plot_benchmarks.render(plot_benchmarks.load_results(results), tmp_path, "/_generated/")
    assert "`fork_steps_s.transfer` | 0.6 |" in text and "python benchmark/rfork/bench_nccl.py" in text
    # Readable first (words and units for headings), the keys as the file spells them folded below.
    readable, raw = text.split("<details>")
    assert "| fork steps › transfer (s) | 0.6 |" in readable and "`fork_steps_s" not in readable
    assert "`fork_steps_s.transfer`" in raw and raw.rstrip().endswith("</details>")
    charts = sorted(p.name for p in tmp_path.glob("*.png"))
    assert charts == ["bench_example_run_0.png", "bench_example_run_1.png", "bench_example_run_2.png"]
    assert all(f"(/_generated/{c})" in text for c in charts)
    assert "No benchmark results" in plot_benchmarks.render([], tmp_path)
    (results / "broken.json").write_text('{"command": "x", "date": "2026-01-01"}')
    with pytest.raises(plot_benchmarks.ResultsError, match="broken.json: missing machine"):
        plot_benchmarks.load_results(results)


def test_headline_numbers_come_from_the_committed_results(tmp_path: Path) -> None:
    sys.path.insert(0, str(DOCS))
    import headline

    results = ROOT / "benchmark" / "results"
    pages = headline.render(headline.headlines(results), tmp_path, "/_generated/")
    text = pages["headline.md"]
    cold = json.loads((results / "rfork_cold_start_h200x2.json").read_text())["clients"]
    for client in ("transfer_engine", "nccl", "disk"):
        assert f"{cold[client]['launch_to_first_token_s']:.1f} s" in text, client
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        f"headline_{k}.png" for k in ("cold_start", "decode", "fork_bandwidth")
    )
    assert text.count("Measured on ") == 3 and "vm: 2x NVIDIA H200" in text
    assert (
        "| Fork, NCCL: launch to first token vs disk | 8.37 s vs 18.49 s | 2.2x sooner |"
        in pages["benchmark_summary.md"]
    )
    # A renamed key must stop the build, naming the file and the key, rather than leave a stale number.
    for path in results.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text().replace('"fork_transfer_gbps"', '"renamed"'))
    with pytest.raises(headline.HeadlineError, match="rfork_nccl_h200x2.json has no key 'fork_transfer_gbps'"):
        headline.headlines(tmp_path)


def test_landing_page_leads_with_the_headline_and_names_the_interop_test(built_site: Path) -> None:
    html = (built_site / "index.html").read_text()
    first_chart = html.index("headline_cold_start.png")
    assert first_chart < html.index("What it is") and "headline_decode.png" in html
    assert "wire-compatible" not in html and "test_rfork_upstream_wire.py" in html
    assert (ROOT / "test" / "srt" / "test_rfork_upstream_wire.py").is_file()


def test_support_matrix_follows_the_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    from sphinx.errors import ExtensionError

    from sglang.srt import server_args
    from sglang.srt.models.registry import ModelRegistry

    docs_ext()
    import support_matrix

    text = support_matrix.support_matrix_markdown()
    header = text.splitlines()[0]
    assert re.findall(r"`(\w+)`", header) == [support_matrix.architectures()[a] for a in ModelRegistry.supported()]
    hand_table = (DOCS / "references" / "supported_models.md").read_text()
    assert sorted(re.findall(r"^\| `(\w+ForCausalLM)`", hand_table, re.M)) == ModelRegistry.supported()
    assert "| `--remote-instance-weight-loader-backend` | `nccl`, `transfer_engine` |" in text
    # A cell cites a test file only if that file builds the architecture.
    feature = support_matrix.Feature("x", ("test_structured_output.py",), "CI")
    assert support_matrix.covering_tests(feature, "llama") == ["test_structured_output.py"]
    assert support_matrix.covering_tests(feature, "no_such_arch") == []
    # A flag choice with no registered implementation (or the other way round) stops the build.
    monkeypatch.setattr(server_args, "ATTENTION_BACKENDS", (*server_args.ATTENTION_BACKENDS, "triton"))
    with pytest.raises(ExtensionError, match="--attention-backend.*'triton'"):
        support_matrix.registries()


@pytest.fixture
def sandbox(tmp_path: Path):
    if shutil.which("curl") is None:
        pytest.fail("the docs' examples use curl; install it (apt-get install -y curl)")
    box = Sandbox(tmp_path)
    yield box
    box.close()


@pytest.fixture(scope="module")
def readme_demo(tmp_path_factory: pytest.TempPathFactory):
    """The README's main command (after its installation part), started in the background.

    The docs' examples ask for it too, so that it runs alongside them: both mostly wait on processes
    starting up, and two cores serve both in little more than the time of one.
    """
    demo = readme_code_blocks()[0].strip().rsplit(" && ", 1)[1]
    assert demo.startswith("python -m sglang.tools.rfork_demo"), demo
    tmp = tmp_path_factory.mktemp("demo")
    with open(tmp / "demo.log", "w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", demo],
            cwd=ROOT,
            env=Sandbox(tmp).env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield proc, tmp / "demo.log"
    kill_process_tree(proc.pid)


def test_docs_examples_run(sandbox: Sandbox, readme_demo) -> None:
    skipped = run_examples(all_blocks(), sandbox)
    marked_skip = [s for s in skipped if "Mooncake" not in s]
    assert len(marked_skip) <= MAX_SKIPPED, f"more examples are skipped than before: {marked_skip}"
    for reason in skipped:
        if "Mooncake" in reason:
            warnings.warn(f"docs example not run: {reason}", stacklevel=1)


def test_readme_examples_run(sandbox: Sandbox, tiny_model_dir, readme_demo) -> None:
    proc, log = readme_demo
    proc.wait(timeout=600)
    assert proc.returncode == 0 and "Every weight matched" in log.read_text(), log.read_text()[-6000:]
    fork = readme_code_blocks()[2]
    # The five-line fork: the seed in the background, then the client; a tiny model stands in for the
    # README's /models/llama (under /tmp/, which the sandbox maps to its own directory).
    model = sandbox.tmp / "llama"
    shutil.copytree(tiny_model_dir("llama"), model)
    (sandbox.tmp / "llama-config-only").mkdir()
    for f in model.glob("*.json"):
        shutil.copy(f, sandbox.tmp / "llama-config-only" / f.name)
    fork = fork.replace("/models/", "/tmp/")
    commands = [re.sub(r"\s+#.*$", "", c).strip() for c in fork.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 2 and commands[0].endswith("&"), commands
    sandbox.start_server(commands[0].rstrip("&").replace("10.0.0.1", "127.0.0.1"), "README seed")
    sandbox.start_server(commands[1].replace("10.0.0.1", "127.0.0.1"), "README client")
    assert "R-Fork from 127.0.0.1" in sandbox.last_log
