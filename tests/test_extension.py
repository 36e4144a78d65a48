"""Extending the library the documented ways: a codec, a variant and an architecture registered here (the
architecture in ``tiny_models.py``) run through ``sf.analyze``, ``sf.plan``, a store and the CLI, and the
pass plan is the one description every consumer reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import sketchfisher as sf
from sketchfisher.compress.sketch_block import SketchBlock
from sketchfisher.layout.registry import mlp_model_types, supported_model_types
from sketchfisher.metric import VARIANTS, Variant
from tiny_models import ARCHS, generic_loss, make_batches, make_model


@dataclass(frozen=True)
class Dense(sf.SideCodec):
    """A toy side codec: keeps each balanced, centred side vector whole (the identity map) in fp32, so its
    scores are the exact ones and its standard errors 0."""

    seed: int = 0  # (taken from the CLI's --seed: a codec takes the options it declares)
    variance_reduction: bool = True
    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "the whole side vector (a test codec)"

    def width(self, size: int) -> int:
        return size

    def apply_heads(self, layer: int, block: int, v: torch.Tensor) -> torch.Tensor:
        return v.clone()

    def bytes_per_block(self, size: int) -> int:
        return 4 * size + 16

    def block_scores(self, a, b, e, size):
        return SketchBlock(*a, *b, e.double().to(a[0].device), k=float("inf"), fpc=1.0)


@pytest.fixture
def dense():
    sf.register_codec(Dense)
    yield Dense()
    sf.compress.codec.unregister_codec("dense")


@pytest.fixture(scope="module")
def llama():
    return make_model("llama_gqa"), make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)


@pytest.mark.parametrize("passes", [2, 1.5])
def test_a_registered_codec_runs_through_analyze_plan_and_a_store(dense, llama, passes, tmp_path):
    model, ta, tb = llama
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
    res = sf.analyze(model, generic_loss, ta, tb, codec=dense, passes=passes)
    scale = float(exact.scores.abs().max())
    torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=1e-5 * scale)
    assert float(res.stderr.abs().max()) == 0.0
    stored = sf.analyze(model, generic_loss, ta, tb, codec=dense, passes=passes, store=tmp_path / "s")
    torch.testing.assert_close(stored.scores, res.scores, rtol=0, atol=0)
    store = sf.open_store(tmp_path / "s")
    assert store.codec == dense and store.manifest["codec"] == {"codec": "dense", "seed": 0, "variance_reduction": True}
    assert store.verify() == 2 + len(ta) + len(tb)
    # the planner reads the codec's declared bytes: one row per registered codec
    table = sf.plan("llama-7b", samples=10).set_index("codec")
    assert table.loc["Dense()", "disk_bytes"] == 32 * 128 * (4 * 128 * 4096 + 16) * 10
    assert table.loc["Dense()", "peak_device_bytes"] > 0
    phases = sf.plan_phases("llama-7b", codec=dense, passes=passes)
    assert list(phases.phase)[:-1] == [r["phase"] for r in res.phases.rows()]


def test_a_codec_must_be_registered_and_well_formed(dense):
    @dataclass(frozen=True)
    class Unregistered(Dense):
        name: ClassVar[str] = "unregistered"

    with pytest.raises(sf.InputError, match="registered with sf.register_codec"):
        sf.analyze(make_model("gpt2"), generic_loss, [], [], codec=Unregistered())
    @dataclass(frozen=True)
    class SameName(Dense):
        pass

    with pytest.raises(sf.InputError, match="already"):
        sf.register_codec(SameName)
    with pytest.raises(sf.InputError, match="dataclass subclassing"):
        sf.register_codec(object)


def test_a_registered_codec_and_variant_through_the_cli(dense, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    from sketchfisher.cli import main

    monkeypatch.setitem(VARIANTS, "cubed", Variant("cubed", "square", "square", 1, "Σ_S g_i² g_j² / (Î + ε + λ)",
                                                    "a large score: both squares meet"))
    (tmp_path / "a.txt").write_text("\n".join(f"what is {i} plus {i + 1}?" for i in range(5)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    common = ["--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "a.txt"), "--task-b", str(tmp_path / "b.txt"),
              "--batch-size", "2", "--quiet"]
    assert main(["collect", *common, "--out", str(tmp_path / "s"), "--codec", "dense", "--variant", "cubed"]) == 0
    capsys.readouterr()
    store = sf.open_store(tmp_path / "s")
    assert store.codec == Dense() and store.cfg.variant == "cubed"
    assert main(["interfere", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--no-plot"]) == 0
    assert (tmp_path / "o" / "top_conflicts.csv").exists()
    with pytest.raises(SystemExit):  # an unknown codec is a usage error naming the registered ones
        main(["collect", *common, "--out", str(tmp_path / "x"), "--codec", "nope"])
    assert "dense" in capsys.readouterr().err


def test_a_registered_architecture_through_the_cli(tmp_path, capsys):
    """``toy_bert`` (registered in tiny_models.py, unknown to the library) is collected by the CLI."""
    from sketchfisher.cli import main
    from sketchfisher.demo import load_minilm
    from tiny_models import ToyBertConfig, ToyBertModel

    _, tok = load_minilm()
    torch.manual_seed(0)
    ToyBertModel(ToyBertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "a.txt").write_text("\n".join(f"sample {i} of a" for i in range(3)))
    (tmp_path / "b.txt").write_text("\n".join(f"another {i} of b" for i in range(3)))
    assert main(["collect", "--model", str(tmp_path / "m"), "--task-a", str(tmp_path / "a.txt"), "--task-b",
                 str(tmp_path / "b.txt"), "--loss", "mlm", "--k", "8", "--out", str(tmp_path / "s"), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "toy_bert"


def test_every_registered_architecture_has_a_tiny_model():
    """The parametrised architecture tests (test_layout.py) run over tiny_models.ARCHS: every model type the
    registry knows must be there, so a new registry entry is covered as soon as it exists (ViT takes images:
    it has its own test)."""
    have = {cfg.model_type for cfg, _, _, _ in ARCHS.values()}
    assert set(supported_model_types()) - have == {"vit"}
    assert set(mlp_model_types()) <= have


@pytest.mark.parametrize("codec,cfg,passes", [
    (sf.Exact(), sf.ScoreConfig(), None), (sf.Factors(), sf.ScoreConfig(normalizer="pooled"), None),
    (sf.Sketch(k=8), sf.ScoreConfig(), 2), (sf.Sketch(k=8), sf.ScoreConfig(), 1.5),
    (sf.Sketch(k=8, variance_reduction=False), sf.ScoreConfig(variant="signed"), None)])
def test_the_planned_phases_are_the_measured_phases(llama, codec, cfg, passes, tmp_path):
    """One pass plan: the planner's rows (before scoring) are the phases sf.analyze and a store record."""
    model, ta, tb = llama
    res = sf.analyze(model, generic_loss, ta, tb, codec=codec, config=cfg, passes=passes)
    planned = sf.plan_phases(model, codec=codec, cfg=cfg, passes=passes, samples=9, tokens=9)
    assert [r["phase"] for r in res.phases.rows()] == list(planned.phase)[:-1]
    assert list(planned.phase)[-1] == "scoring"
    if codec.two_pass:
        from sketchfisher.phases import PhaseLog
        from sketchfisher.store import collect_to_store

        log = PhaseLog()
        collect_to_store(tmp_path / "s", model, generic_loss, ta, tb, sf.layout_for(model), codec, cfg, passes=passes,
                         log=log)
        stored = sf.plan_phases(model, codec=codec, cfg=cfg, passes=passes, samples=9, tokens=9, store=True)
        assert [r["phase"] for r in log.rows()] == list(stored.phase)[:-1]
        assert list(stored.phase)[-2] == "writes"
