"""Sequence diagrams as plain SVG (no Mermaid, no Graphviz): who calls whom during a fork and a request.

`python docs/_ext/diagrams.py OUT_DIR` writes them; the docs build does the same into `docs/_generated/`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

CHAR_W = 6.6  # average width of a 12 px sans-serif character
ROW_H = 34
TOP = 20
BOX_H = 46
COLORS = {"call": "#1f4e79", "reply": "#5b5b5b", "data": "#c0392b"}


@dataclass(frozen=True)
class Msg:
    """An arrow from one participant to another; style is call (solid), reply (dashed) or data (thick)."""

    src: str
    dst: str
    label: str
    style: str = "call"


@dataclass(frozen=True)
class Act:
    """Something a participant does on its own (a box on its lifeline)."""

    who: str
    label: str


@dataclass(frozen=True)
class Note:
    """A full-width section header between steps."""

    label: str


def render(participants: list[tuple[str, str, str]], steps: list[Msg | Act | Note], title: str) -> str:
    """SVG text of a sequence diagram; participants are (key, name, detail) from left to right."""
    keys = [p[0] for p in participants]
    col = 210.0
    for s in steps:
        if isinstance(s, Msg):
            span = abs(keys.index(s.dst) - keys.index(s.src))
            col = max(col, (len(s.label) * CHAR_W + 30) / span)
        elif isinstance(s, Act):
            col = max(col, len(s.label) * CHAR_W + 24)
    for _, name, detail in participants:
        col = max(col, max(len(name), len(detail)) * CHAR_W + 30)
    margin = col / 2 + 10
    x = {k: margin + i * col for i, k in enumerate(keys)}
    width = margin * 2 + col * (len(keys) - 1)
    y = TOP + 28
    body: list[str] = []
    for key, name, detail in participants:
        left = x[key] - col / 2 + 8
        body.append(
            f'<rect x="{left:.1f}" y="{y}" width="{col - 16:.1f}" height="{BOX_H}" rx="6" fill="#eef3f8" '
            'stroke="#1f4e79"/>'
        )
        body.append(_text(x[key], y + 19, name, weight="bold"))
        body.append(_text(x[key], y + 36, detail, size=11, fill="#444"))
    lifeline_top = y + BOX_H
    y = lifeline_top + 24
    for s in steps:
        if isinstance(s, Note):
            body.append(f'<line x1="10" y1="{y - 4}" x2="{width - 10:.1f}" y2="{y - 4}" stroke="#bbb"/>')
            body.append(_text(14, y + 11, s.label, anchor="start", weight="bold", fill="#1f4e79"))
            y += ROW_H - 6
        elif isinstance(s, Act):
            w = len(s.label) * CHAR_W + 16
            body.append(
                f'<rect x="{x[s.who] - w / 2:.1f}" y="{y - 6}" width="{w:.1f}" height="22" rx="4" fill="#fdf6e3" '
                'stroke="#b58900"/>'
            )
            body.append(_text(x[s.who], y + 9, s.label, size=11))
            y += ROW_H
        else:
            x1, x2 = x[s.src], x[s.dst]
            color = COLORS[s.style]
            dash = ' stroke-dasharray="6,4"' if s.style == "reply" else ""
            stroke = 3 if s.style == "data" else 1.4
            end = x2 - 8 if x2 > x1 else x2 + 8
            body.append(
                f'<line x1="{x1:.1f}" y1="{y + 8}" x2="{end:.1f}" y2="{y + 8}" stroke="{color}" '
                f'stroke-width="{stroke}"{dash}/>'
            )
            tip = 1 if x2 > x1 else -1
            body.append(
                f'<polygon points="{x2:.1f},{y + 8} {x2 - 10 * tip:.1f},{y + 3} {x2 - 10 * tip:.1f},{y + 13}" '
                f'fill="{color}"/>'
            )
            body.append(
                _text(
                    (x1 + x2) / 2, y + 2, s.label, size=11, fill=color, mono=s.label.startswith(("GET", "POST", "PUT"))
                )
            )
            y += ROW_H
    height = y + 10
    lifelines = [
        f'<line x1="{x[k]:.1f}" y1="{lifeline_top}" x2="{x[k]:.1f}" y2="{height - 10}" stroke="#999" '
        'stroke-dasharray="3,4"/>'
        for k in keys
    ]
    head = [_text(width / 2, TOP + 6, title, size=14, weight="bold")]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(head + lifelines + body) + "\n</svg>\n"
    )


def _text(
    x: float,
    y: float,
    text: str,
    size: int = 12,
    anchor: str = "middle",
    weight: str = "normal",
    fill: str = "#111",
    mono: bool = False,
) -> str:
    family = ' font-family="Menlo, Consolas, monospace"' if mono else ""
    return (
        f'<text x="{x:.1f}" y="{y}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
        f'fill="{fill}"{family}>{escape(text)}</text>'
    )


NCCL = (
    [
        ("client", "Client, TP rank i", "--load-format remote_instance"),
        ("http", "Seed HTTP server", "--port (e.g. 30000)"),
        ("seed", "Seed scheduler, TP rank i", "holds the weights on its device"),
    ],
    [
        Act("client", "build the model skeleton (no weights)"),
        Note("1. Check that the seed holds the same model"),
        Msg("client", "http", "GET /remote_instance_weight_manifest?rank=i"),
        Msg("http", "client", "names, dtypes, shapes, checksums", "reply"),
        Act("client", "compare with its own manifest: stop on any difference"),
        Note("2. Reserve the seed (rank 0 only)"),
        Msg("client", "http", "POST /remote_instance_fork_lease"),
        Msg("http", "client", "200 {lease_id}; 409 while another fork runs", "reply"),
        Note("3. Open one two-member group per rank on the group port p_i"),
        Msg("client", "http", "POST /init_weights_send_group_for_remote_instance"),
        Msg("http", "seed", "listen on seed_ip:p_i"),
        Msg("client", "seed", "join the group at seed_ip:p_i (rank 1 of 2)", "data"),
        Note("4. Move the bytes (the seed's scheduler is busy meanwhile)"),
        Msg("client", "http", "POST /send_weights_to_remote_instance"),
        Msg("http", "seed", "broadcast every parameter"),
        Msg("seed", "client", "NCCL broadcast (gloo on CPU), manifest order", "data"),
        Note("5. Verify and release"),
        Act("client", "checksum every tensor; any mismatch: refuse to start"),
        Msg("client", "http", "POST /remote_instance_fork_lease/release"),
        Act("client", "serve (and be a seed for the next client)"),
    ],
    "R-Fork over the NCCL backend (one TP rank shown; every rank does the same)",
)

TRANSFER_ENGINE = (
    [
        ("client", "Client, TP rank i", "--load-format remote_instance"),
        ("http", "Seed HTTP server", "--port (e.g. 30000)"),
        ("boot", "Bootstrap server", "--engine-info-bootstrap-port"),
        ("seed", "Seed TP rank i + Mooncake", "TransferEngine ports 15000-17000"),
    ],
    [
        Note("At seed start-up (--remote-instance-weight-loader-start-seed-via-transfer-engine)"),
        Act("seed", "register the weight memory"),
        Msg("seed", "boot", "PUT /register_transfer_engine_info"),
        Note("1. Where do the weights live? (per rank)"),
        Act("client", "build the model skeleton (no weights)"),
        Msg("client", "http", "GET /remote_instance_transfer_engine_info?rank=i"),
        Msg("http", "boot", "GET /get_transfer_engine_info?rank=i"),
        Msg("boot", "http", "session id, {name: [ptr, numel, ...]}", "reply"),
        Msg("http", "client", "passed through unchanged", "reply"),
        Act("client", "compare with its own manifest: stop on any difference"),
        Note("2. Read the bytes: one-sided, the seed's scheduler does nothing"),
        Msg("client", "seed", "reads of registered memory (TCP, RDMA or NVLink)", "data"),
        Note("3. Verify"),
        Act("client", "checksum every tensor; any mismatch: refuse to start"),
    ],
    "R-Fork over the TransferEngine (Mooncake) backend",
)

REQUEST = (
    [
        ("user", "HTTP client", "curl, openai, ..."),
        ("main", "Main process", "FastAPI + TokenizerManager"),
        ("tp0", "Scheduler TP0", "ModelRunner on device 0"),
        ("tpn", "Scheduler TP1..n-1", "ModelRunner on device k"),
    ],
    [
        Msg("user", "main", "POST /generate or /v1/..."),
        Act("main", "tokenize, validate sampling params"),
        Msg("main", "tp0", "token ids (ZMQ over IPC)"),
        Msg("tp0", "tpn", "new requests (broadcast, CPU group)"),
        Act("tp0", "queue, radix match, batch"),
        Act("tpn", "same decisions"),
        Msg("tp0", "tpn", "forward: all-reduce (NCCL / gloo)", "data"),
        Act("tp0", "sample; broadcast the token ids"),
        Msg("tp0", "main", "new token ids (ZMQ)", "reply"),
        Act("main", "detokenize incrementally"),
        Msg("main", "user", "JSON, or SSE chunks when streaming", "reply"),
    ],
    "A request (tensor parallel size n)",
)

DIAGRAMS = {"rfork_nccl.svg": NCCL, "rfork_transfer_engine.svg": TRANSFER_ENGINE, "request_flow.svg": REQUEST}


def http_paths() -> set[str]:
    """Every HTTP path a diagram names (the docs tests check each one exists)."""
    paths = set()
    for _, steps, _ in DIAGRAMS.values():
        for s in steps:
            if isinstance(s, Msg) and s.label.split(" ")[0] in ("GET", "POST", "PUT"):
                paths.add(s.label.split(" ")[1].split("?")[0])
    return paths


def all_svgs() -> dict[str, str]:
    """file name -> SVG text of every diagram."""
    return {name: render(parts, steps, title) for name, (parts, steps, title) in DIAGRAMS.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in all_svgs().items():
        (out / name).write_text(svg)
        print(out / name)
