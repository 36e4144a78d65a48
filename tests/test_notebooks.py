"""Every notebook runs top to bottom in fast mode (few samples) under a time limit."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(src, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nb_build", ROOT / "notebooks" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setenv("SKETCHFISHER_FAST", "1")
    monkeypatch.setenv("SKETCHFISHER_PROGRESS", "0")
    monkeypatch.setenv("SKETCHFISHER_ROOT", str(ROOT))
    nb = build.execute(build.build(src), tmp_path, timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
