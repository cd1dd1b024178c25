"""Sphinx configuration of the docs site (MyST markdown, built with `sphinx-build -W`)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The package is imported from the tree, so a fresh clone builds without installing it.
sys.path.insert(0, str(DOCS.parent / "python"))
sys.path.insert(0, str(DOCS / "_ext"))

project = "SGLang with Tensor R-Fork"
author = "the project's maintainers"
copyright = "the project's maintainers"

extensions = ["myst_parser", "sglang_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md", "scripts", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# Flags like --model-path must stay two hyphens, not become dashes.
smartquotes = False

# Furo: a sidebar that follows the reader, a page-contents column, and a content area wide enough for the
# R-Fork page's five-column tables; wider tables scroll inside their own box instead of squeezing words.
html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = "SGLang with Tensor R-Fork"
html_theme_options = {
    "navigation_with_keys": True,
}

# Where the benchmarks page reads results from (override with -D benchmark_results_dir=...).
benchmark_results_dir = str(DOCS.parent / "benchmark" / "results")
