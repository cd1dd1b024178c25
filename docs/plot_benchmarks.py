"""Render the committed benchmark results (`benchmark/results/*.json`) as tables and bar charts.

    python docs/plot_benchmarks.py [--results benchmark/results] [--out docs/_generated]

writes `benchmarks.md` (the body of the docs' benchmarks page) and its PNG charts. The docs build calls
`load_results` and `render` itself, so the page always shows exactly the committed files. The file
format, and which numbers become charts (by unit suffix), is described in `benchmark/results/README.md`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

REQUIRED = ("command", "machine", "date")
META = (*REQUIRED, "benchmark", "description", "notes", "note")
# Key suffix -> axis label (longest suffixes first). Numbers that share a unit are drawn in one chart.
UNITS = {
    "_gb_per_s": "GB/s",
    "_gbps": "GB/s",
    "_tok_per_s": "tokens/s",
    "_tok_s": "tokens/s",
    "_ms": "milliseconds",
    "_s": "seconds",
}


class ResultsError(ValueError):
    """A results file does not follow benchmark/results/README.md; the message names the file."""


def load_results(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file stem, content) of every results file, sorted by name; ResultsError on a malformed one."""
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ResultsError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ResultsError(f"{path}: the top level must be a JSON object")
        missing = [key for key in REQUIRED if not data.get(key)]
        if missing:
            raise ResultsError(f"{path}: missing {', '.join(missing)}; every result says how it was produced")
        results.append((path.stem, data))
    return results


def render(results: list[tuple[str, dict[str, Any]]], out: Path, link_prefix: str = "") -> str:
    """Markdown for all results; charts are written to out and linked as link_prefix + file name."""
    if not results:
        return (
            "```{note}\nNo benchmark results are committed yet, so this page shows none. Numbers appear here "
            "once a run's JSON is committed to `benchmark/results/` (format: `benchmark/results/README.md`).\n```\n"
        )
    return "\n".join(_render_one(stem, data, out, link_prefix) for stem, data in results)


def unit_of(key: str) -> str | None:
    """The unit a key's suffix names, or None (also for ratios such as `fork_s_vs_disk_s`)."""
    if "_vs_" in key:
        return None
    for suffix, unit in UNITS.items():
        if key.endswith(suffix):
            return unit
    return None


def charts(data: dict[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    """(title, unit, {label: value}) for every chart a result yields; only groups of two or more values.

    Top-level numbers are grouped by unit; a nested object whose key has a unit suffix is one chart of
    its numbers; a list of objects gives one chart per unit, bars labelled by the rows' first text column.
    """
    found: list[tuple[str, str, dict[str, float]]] = []
    top: dict[str, dict[str, float]] = {}
    for key, value in data.items():
        if key in META:
            continue
        unit = unit_of(key)
        if _is_number(value) and unit:
            top.setdefault(unit, {})[key] = value
        elif isinstance(value, dict) and unit:
            numbers = {k: v for k, v in value.items() if _is_number(v)}
            found.append((f"{key} ({unit})", unit, numbers))
        elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            # Bars are named by the rows' first text column, else by their first column (`batch_size=32`).
            label = next((c for c in value[0] if isinstance(value[0][c], str)), next(iter(value[0])))
            by_unit: dict[str, dict[str, float]] = {}
            for row in value:
                name = str(row.get(label)) if isinstance(value[0][label], str) else f"{label}={row.get(label)}"
                for column, cell in row.items():
                    if _is_number(cell) and unit_of(column):
                        by_unit.setdefault(unit_of(column), {})[f"{name}: {column}"] = cell
            found += [(f"{key} ({unit})", unit, numbers) for unit, numbers in by_unit.items()]
    found = [(f"{unit}", unit, numbers) for unit, numbers in top.items()] + found
    return [c for c in found if len(c[2]) >= 2]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _render_one(stem: str, data: dict[str, Any], out: Path, link_prefix: str) -> str:
    lines = [f"### {data.get('benchmark', stem)}", ""]
    for key in ("description", "notes", "note"):
        if data.get(key):
            lines += [_escape(str(data[key])), ""]
    lines += [
        f"- Machine: {data['machine']}",
        f"- Date: {data['date']}",
        f"- Results file: `benchmark/results/{stem}.json`",
        "- Command:",
        "",
        "```bash",
        str(data["command"]),
        "```",
        "",
    ]
    scalars, tables = _flatten(data)
    lines += readable_tables(data)
    for i, (title, unit, chart) in enumerate(charts(data)):
        image = f"bench_{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}_{i}.png"
        _bar_chart(f"{stem}: {title}", unit, chart, out / image)
        lines += [f"![{stem}: {title}]({link_prefix}{image})", ""]
    # Every value as the file spells it, folded away: for readers who check a number against the JSON.
    lines += ["<details>", f"<summary>Every value in <code>{stem}.json</code>, by its key</summary>", ""]
    if scalars:
        lines += ["| Key | Value |", "|---|---|"]
        lines += [f"| `{key}` | {_cell(value)} |" for key, value in scalars.items()]
        lines.append("")
    for name, rows in tables.items():
        lines += [f"`{name}`:", "", *_table(rows, code=True), ""]
    lines += ["</details>", ""]
    return "\n".join(lines)


def _kind(key: str) -> str | None:
    """The unit of a dotted key (its last part's, else its nearest parent's: `fork_steps_s.transfer` is in
    seconds), "ratio" for a comparison, or None for other values."""
    parts = key.split(".")
    if "_vs_" in parts[-1] or "speedup" in parts[-1] or parts[-1].endswith("_vs") or parts[-1].startswith("vs_"):
        return "ratio"
    if parts[-1].endswith("_pct"):
        return "percent"
    infix = next((unit for token, unit in INFIX_UNITS.items() if token in f"_{parts[-1]}"), None)
    return infix or next((unit for part in reversed(parts) if (unit := unit_of("_" + part))), None)


def _label(key: str) -> str:
    """A dotted key in words: units and underscores dropped (`fork_steps_s.transfer` -> fork steps › transfer)."""
    parts = []
    for part in key.split("."):
        for suffix in UNITS:
            if ("_" + part).endswith(suffix) and "_vs_" not in part:
                part = part[: -len(suffix)] or "rate"  # a bare unit (`gbps`) names a rate
                break
        for token in (*INFIX_UNITS, "_pct"):
            part = f"_{part}_".replace(token if token.endswith("_") else token + "_", "_").strip("_")
        parts.append(part.replace("_", " "))
    return " › ".join(parts)


SHORT = {"milliseconds": "ms", "seconds": "s", "tokens/s": "tok/s", "GB/s": "GB/s", "ratio": "x", "percent": "%"}
# Units the readable tables also find inside a key (`decode_step_ms_metrics_off`) or as a percentage; the
# charts go by the suffixes of UNITS only.
INFIX_UNITS = {"_ms_": "milliseconds", "_tok_s_": "tokens/s", "_gbps_": "GB/s"}


def _heading(key: str) -> str:
    """A column or row heading: the key in words, with its unit in short form."""
    kind = _kind(key)
    return f"{_label(key)} ({SHORT[kind]})" if kind else _label(key)


def readable_tables(data: dict[str, Any]) -> list[str]:
    """The numbers that matter as tables with words for headings.

    An object of objects (one per variant: `clients.disk`, `clients.nccl`) becomes one table with a row per
    variant; other numbers with a unit or a ratio are rows of one "Quantity | Value" table; a list of
    objects keeps its rows, cut to their text columns and their numbers with a unit or ratio.
    """
    lines: list[str] = []
    quantities: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in META:
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            rows = [{"": _label(name), **_leaf_numbers(sub)} for name, sub in value.items()]
            lines += [f"{_label(key)}:", "", *_table(rows, format_cell=_readable_cell), ""]
        elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            rows = [
                {_heading(k): v for k, v in row.items() if _is_number(v) and _kind(k) or _is_label(k, v)}
                for row in value
            ]
            lines += [f"{_label(key)}:", "", *_table(rows, format_cell=_readable_cell), ""]
        else:
            walked, _ = _flatten({key: value})
            quantities += [(_heading(k), v) for k, v in walked.items() if _is_number(v) and _kind(k)]
    if quantities:
        head = ["| Quantity | Value |", "|---|---|"]
        lines = head + [f"| {name} | {_readable_cell(v)} |" for name, v in quantities] + [""] + lines
    return lines


def _leaf_numbers(sub: dict[str, Any]) -> dict[str, Any]:
    """A variant's numbers (with a unit or a ratio if it has any such, else all of them), by heading."""
    numbers = {k: v for k, v in sub.items() if _is_number(v)}
    with_unit = {k: v for k, v in numbers.items() if _kind(k)}
    return {_heading(k): v for k, v in (with_unit or numbers).items()}


def _is_label(key: str, value: Any) -> bool:
    """Whether a row's cell says what the row is (a name, a batch size) rather than a result."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and not _kind(key))


def _readable_cell(value: Any) -> str:
    if _is_number(value) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return _cell(value)


def _flatten(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Dotted scalar rows, and the lists of objects (shown as tables)."""
    scalars: dict[str, Any] = {}
    tables: dict[str, list[dict[str, Any]]] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables[prefix] = value
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            scalars[prefix] = value

    for key, value in data.items():
        if key not in META:
            walk(key, value)
    return scalars, tables


def _table(rows: list[dict[str, Any]], code: bool = False, format_cell: Any = None) -> list[str]:
    """A Markdown table of rows (nested objects spread into dotted columns); headings as code if code."""
    format_cell = format_cell or _cell
    rows = [_flat_row(row) for row in rows]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    header = [f"`{c}`" if code else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def _flat_row(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A table row with nested objects spread into dotted columns."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flat_row(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and (len(value) > 8 or any(isinstance(v, (dict, list)) for v in value)):
        return f"({len(value)} items: see the JSON file)"
    return _escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value))


def _escape(text: str) -> str:
    """text with Markdown's punctuation escaped, so that it shows as written (`<dir>` is not HTML)."""
    return re.sub(r"([\\`*_<>|\[\]#~])", r"\\\1", text)


def _bar_chart(title: str, unit: str, numbers: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(numbers)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2), dpi=110)
    bars = ax.barh(range(len(labels)), [numbers[k] for k in labels], color="#1f4e79")
    values = [numbers[k] for k in labels]
    ax.bar_label(bars, labels=[f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" for v in values], padding=3, fontsize=9)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=root / "benchmark" / "results")
    parser.add_argument("--out", type=Path, default=root / "docs" / "_generated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(load_results(args.results), args.out)
    (args.out / "benchmarks.md").write_text(text)
    print(f"wrote {args.out / 'benchmarks.md'} and its charts")


if __name__ == "__main__":
    main()
