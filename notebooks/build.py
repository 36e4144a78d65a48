"""Build the notebooks from their percent-format sources and, optionally, run them to store outputs.

    python notebooks/build.py              # write notebooks/*.ipynb from notebooks/src/*.py (no outputs)
    python notebooks/build.py --execute    # also run them top to bottom (full mode) and keep the outputs

Sources are plain Python with ``# %%`` code cells and ``# %% [markdown]`` cells, so that they are
reviewable and diffable. ``SKETCHFISHER_FAST=1`` makes every notebook use few samples (CI mode).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def cells_from_source(text: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body.strip():
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_from_source(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 3600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return clean(nb)


NOISE = ("TqdmWarning", "Loading weights", "Writing model shards")


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop stderr noise of other libraries (tqdm's widget warning, transformers' loading bars, which also
    carry the machine's paths) from the outputs; the notebook's own outputs stay."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        cell["outputs"] = [o for o in cell.get("outputs", [])
                           if not (o.get("output_type") == "stream" and o.get("name") == "stderr"
                                   and any(n in o.get("text", "") for n in NOISE))]
    return nb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--execute", action="store_true")
    p.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = p.parse_args()
    sources = sorted((HERE / "src").glob("*.py"))
    for src in sources:
        if args.names and src.stem not in args.names:
            continue
        nb = build(src)
        if args.execute:
            print(f"running {src.stem} ...", file=sys.stderr, flush=True)
            nb = execute(nb, HERE)
        nbformat.write(nb, HERE / f"{src.stem}.ipynb")
        print(f"wrote notebooks/{src.stem}.ipynb", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
    main()
