"""The demo on the real MiniLM (offline) and the CLI's exit codes."""

import pytest
import torch

import sketchfisher as sf
from sketchfisher.cli import main
from sketchfisher.demo import load_minilm, load_task


def test_shipped_tasks_have_enough_samples():
    assert len(load_task("math")) >= 24 and len(load_task("code")) >= 24
    with pytest.raises(sf.InputError, match="task must be one of"):
        load_task("poetry")


def test_minilm_layout_is_real_bert():
    model, _ = load_minilm()
    layout = sf.layout_for(model)
    assert (layout.num_layers, layout.num_heads, layout.head_dim) == (6, 12, 32)


def test_demo_cli_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples", "6", "--top", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Top conflicting sample pairs" in out and "layer" in out
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    assert (tmp_path / "top_conflicts.csv").read_text().count("\n") == 4


def test_demo_scores_match_factors_path():
    from sketchfisher.demo import make_batches, masked_token_loss

    model, tok = load_minilm()
    a = make_batches(load_task("math", 3), tok)
    b = make_batches(load_task("code", 2), tok)
    exact = sf.analyze(model, masked_token_loss, a, b, codec=sf.Exact())
    fact = sf.analyze(model, masked_token_loss, a, b, codec=sf.Factors())
    assert torch.isfinite(exact.scores).all() and (exact.scores >= 0).all()
    torch.testing.assert_close(fact.scores, exact.scores, rtol=1e-4, atol=1e-6 * float(exact.scores.max()))


def test_cli_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
