"""The headline numbers: one chart and one sentence each, computed from committed benchmark results.

The landing page and the top of the benchmarks page show these. Each headline reads named keys of named
files in `benchmark/results/`; a missing file or key stops the docs build with a message naming both, so
a renamed result cannot leave a stale number on the front page.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Chart colours: ours (forks, this runtime) in one hue, the baselines in greys.
OURS, OURS_2, BASELINE, LIMIT = "#1f4e79", "#5b9bd5", "#8c8c8c", "#c9c9c9"


class HeadlineError(ValueError):
    """A headline's results file or key is missing; the message names both."""


@dataclass(frozen=True)
class Bars:
    """A horizontal grouped bar chart: one group per label, one bar per series."""

    unit: str
    groups: list[str]
    series: dict[str, list[float]]
    colours: list[str]


@dataclass(frozen=True)
class Headline:
    """One headline: a title, a sentence with the numbers, a chart, and where the numbers come from."""

    key: str
    title: str
    sentence: str
    bars: Bars
    sources: list[tuple[str, str, str]]  # (results file, machine, date)
    ratios: list[tuple[str, str, str, str]]  # (what is compared, the two numbers, the ratio, results file stem)

    @property
    def image(self) -> str:
        return f"headline_{self.key}.png"


class Results:
    """Lookup of dotted keys in the committed results files, failing with the file and key named."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, dict[str, Any]] = {}

    def file(self, stem: str) -> dict[str, Any]:
        if stem not in self._cache:
            path = self.directory / f"{stem}.json"
            if not path.is_file():
                raise HeadlineError(f"{path} is missing; the docs' headline numbers (docs/headline.py) read it")
            self._cache[stem] = json.loads(path.read_text())
        return self._cache[stem]

    def get(self, stem: str, dotted: str) -> Any:
        value: Any = self.file(stem)
        for part in dotted.split("."):
            if isinstance(value, list):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise HeadlineError(f"benchmark/results/{stem}.json has no key {dotted!r} (docs/headline.py reads it)")
        return value

    def source(self, stem: str) -> tuple[str, str, str]:
        data = self.file(stem)
        return (f"benchmark/results/{stem}.json", str(data.get("machine")), str(data.get("date")))


COLD_START = "rfork_cold_start_h200x2"
NCCL = "rfork_nccl_h200x2"
TE = "rfork_transfer_engine_h200x2"
DECODE = "bench_one_batch_llama3_8b_h200"


def cold_start(r: Results) -> Headline:
    """Launch to first token and weights-ready of a forked replica, per backend, against a disk load."""
    clients = [("transfer_engine", "Fork, TransferEngine"), ("nccl", "Fork, NCCL"), ("disk", "Disk load")]
    first = {c: r.get(COLD_START, f"clients.{c}.launch_to_first_token_s") for c, _ in clients}
    ready = {c: r.get(COLD_START, f"clients.{c}.weight_load_s") for c, _ in clients}
    gb = r.get(COLD_START, "clients.disk.weight_gb")
    sentence = (
        f"A new replica of a {gb:.0f} GB model answers its first token {first['transfer_engine']:.1f} s after "
        f"launch when it forks over TransferEngine and {first['nccl']:.1f} s over NCCL, against "
        f"{first['disk']:.1f} s loading from disk ({first['disk'] / first['transfer_engine']:.1f}x and "
        f"{first['disk'] / first['nccl']:.1f}x sooner); its weights are in place after "
        f"{ready['transfer_engine']:.2f} s and {ready['nccl']:.2f} s instead of {ready['disk']:.1f} s."
    )
    bars = Bars(
        unit="seconds from launch (lower is better)",
        groups=[name for _, name in clients],
        series={
            "weights ready": [ready[c] for c, _ in clients],
            "first token": [first[c] for c, _ in clients],
        },
        colours=[OURS_2, OURS],
    )
    ratios = [
        (
            f"{label}: {what} vs disk",
            f"{values[c]:.2f} s vs {values['disk']:.2f} s",
            f"{values['disk'] / values[c]:.1f}x sooner",
            COLD_START,
        )
        for what, values in (("launch to first token", first), ("weights ready", ready))
        for c, label in clients[:2]
    ]
    return Headline(
        "cold_start", "A forked replica against a disk load", sentence, bars, [r.source(COLD_START)], ratios
    )


def fork_bandwidth(r: Results) -> Headline:
    """The fork's transfer rate against a bare transfer of the same bytes over the same link."""
    nccl_fork, nccl_raw = r.get(NCCL, "fork_transfer_gbps"), r.get(NCCL, "raw_nccl_broadcast_gbps")
    te_fork, te_raw = r.get(TE, "fork.nvlink_intra.gbps"), r.get(TE, "raw_mooncake_read.nvlink_intra.gbps")
    tcp_fork, tcp_raw = r.get(TE, "fork.tcp.gbps"), r.get(TE, "raw_mooncake_read.tcp.gbps")
    sentence = (
        f"Between two GPUs over NVLink a fork moves the weights at {te_fork:.0f} GB/s with TransferEngine "
        f"({te_fork / te_raw:.0%} of a bare TransferEngine read, {te_raw:.0f} GB/s) and {nccl_fork:.0f} GB/s "
        f"with NCCL ({nccl_fork / nccl_raw:.0%} of a bare NCCL broadcast, {nccl_raw:.0f} GB/s); over TCP, "
        f"{tcp_fork} GB/s against {tcp_raw} GB/s raw."
    )
    bars = Bars(
        unit="GB/s (higher is better)",
        groups=["TransferEngine, NVLink", "NCCL, NVLink"],
        series={"bare transfer": [te_raw, nccl_raw], "fork": [te_fork, nccl_fork]},
        colours=[LIMIT, OURS],
    )
    sources = [r.source(TE), r.source(NCCL)]
    ratios = [
        (f"Fork, {name}: GB/s vs bare transfer", f"{fork} vs {raw}", f"{fork / raw:.0%} of the link", stem)
        for name, fork, raw, stem in (
            ("TransferEngine NVLink", te_fork, te_raw, TE),
            ("NCCL NVLink", nccl_fork, nccl_raw, NCCL),
            ("TransferEngine TCP", tcp_fork, tcp_raw, TE),
        )
    ]
    return Headline("fork_bandwidth", "Fork bandwidth against the raw link", sentence, bars, sources, ratios)


def decode(r: Results) -> Headline:
    """Decode step time against the memory-bandwidth roofline and HF transformers, per batch size."""
    rows = r.get(DECODE, "results")
    roofline = r.get(DECODE, "roofline_decode_ms")
    names = [f"batch {row['batch_size']}" for row in rows]
    ours = [row["decode_median_ms"] for row in rows]
    hf = [row["hf_decode_step_ms"] for row in rows]
    parts = [
        f"{ms:.2f} ms at batch {row['batch_size']} ({ms / roofline:.2f}x the roofline, {h / ms:.1f}x faster than "
        f"HF transformers)"
        for row, ms, h in zip(rows, ours, hf)
    ]
    sentence = (
        f"A decode step of a Llama-3-8B-shaped bf16 model takes {' and '.join(parts)}; the roofline, "
        f"{roofline:.2f} ms, is the time to read the weights once at the GPU's measured copy bandwidth."
    )
    bars = Bars(
        unit="milliseconds per decode step (lower is better)",
        groups=names,
        series={"roofline": [roofline] * len(rows), "this runtime": ours, "HF transformers": hf},
        colours=[LIMIT, OURS, BASELINE],
    )
    ratios = [
        (
            f"Decode step, {name}: vs roofline",
            f"{ms:.2f} ms vs {roofline:.2f} ms",
            f"{ms / roofline:.2f}x the roofline",
            DECODE,
        )
        for name, ms in zip(names, ours)
    ] + [
        (f"Decode step, {name}: HF vs ours", f"{h:.1f} ms vs {ms:.2f} ms", f"{h / ms:.1f}x faster", DECODE)
        for name, ms, h in zip(names, ours, hf)
    ]
    title = "Decode against the memory roofline and HF transformers"
    return Headline("decode", title, sentence, bars, [r.source(DECODE)], ratios)


HEADLINES: list[Callable[[Results], Headline]] = [cold_start, fork_bandwidth, decode]


def headlines(directory: Path) -> list[Headline]:
    """Every headline, computed from the results in directory."""
    results = Results(directory)
    return [make(results) for make in HEADLINES]


def render(items: list[Headline], out: Path, link_prefix: str = "") -> dict[str, str]:
    """Draw the charts into out; return the landing page's markdown and the benchmarks page's summary.

    Charts are linked as link_prefix + file name. `headline.md` has a `##` section per headline;
    `benchmark_summary.md` has the ratio table, then the same sections one level down.
    """
    for h in items:
        draw(h, out / h.image)
    return {
        "headline.md": sections(items, link_prefix, "##"),
        "benchmark_summary.md": summary_table(items) + "\n" + sections(items, link_prefix, "###"),
    }


def sections(items: list[Headline], link_prefix: str, level: str) -> str:
    """One section per headline: title, sentence, chart, and the machine and date of its numbers."""
    lines: list[str] = []
    for h in items:
        where = "; ".join(f"{machine}, {date} (`{path}`)" for path, machine, date in h.sources)
        lines += [
            f"{level} {h.title}",
            "",
            h.sentence,
            "",
            f"```{{figure}} {link_prefix}{h.image}",
            f":alt: {h.title}: {h.sentence}",
            ":width: 640px",
            "",
            f"Measured on {where}.",
            "```",
            "",
        ]
    return "\n".join(lines)


def summary_table(items: list[Headline]) -> str:
    """Markdown table of every headline's ratios, each with the file it comes from."""
    rows = ["| Comparison | Measured | Ratio | Results file |", "|---|---|---|---|"]
    for h in items:
        rows += [f"| {what} | {numbers} | {ratio} | `{stem}.json` |" for what, numbers, ratio, stem in h.ratios]
    return "\n".join(rows) + "\n"


def draw(h: Headline, path: Path) -> None:
    """The headline's grouped bar chart as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = h.bars
    n = len(bars.series)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(7, 0.5 * n * len(bars.groups) + 1.3), dpi=120)
    for i, ((name, values), colour) in enumerate(zip(bars.series.items(), bars.colours)):
        ys = [g + (i - (n - 1) / 2) * height for g in range(len(bars.groups))]
        drawn = ax.barh(ys, values, height=height * 0.92, color=colour, label=name)
        ax.bar_label(drawn, labels=[_number(v) for v in values], padding=3, fontsize=9)
    ax.set_yticks(range(len(bars.groups)), bars.groups)
    ax.invert_yaxis()
    ax.set_xlabel(bars.unit)
    ax.margins(x=0.18)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    # Below the axis, so it never covers a bar.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=n, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
