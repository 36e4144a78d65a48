"""The CLI guesses the objective from the model directory, records it in the store, and refuses nonsense early."""

from __future__ import annotations

import pytest
import transformers as hf

import sketchfisher as sf
from sketchfisher.cli import build_parser, main
from sketchfisher.tasks import infer_loss
from tiny_models import make_batches, make_model, generic_loss


@pytest.mark.parametrize("arch,wrapper,want", [("gpt2", True, "clm"), ("llama_gqa", True, "clm"),
                                               ("bert", True, "mlm"), ("bert", False, "mlm"),
                                               ("roberta", True, "mlm"), ("gpt_neox", True, "clm")])
def test_loss_is_inferred_from_the_model_directory(tmp_path, arch, wrapper, want):
    make_model(arch, wrapper=wrapper).save_pretrained(tmp_path)
    assert infer_loss(tmp_path) == want


def test_an_unknown_objective_asks_for_loss(tmp_path):
    hf.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=16, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(sf.InputError, match="pass --loss clm or --loss mlm"):
        infer_loss(tmp_path)


def test_version_and_help_of_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sketchfisher {sf.__version__}"
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for opt in action._actions:
            if opt.dest != "help":
                assert opt.help, f"{action.prog} {opt.dest} has no help text"


def test_a_sketch_wider_than_a_head_block_is_refused_before_any_work():
    model = make_model("gpt2")  # head blocks of 8 x 32 = 256 entries
    ta, tb = make_batches(4, 2, seed=1), make_batches(4, 2, seed=2)
    with pytest.raises(sf.InputError, match=r"Sketch\(k=256\) is not smaller than the smallest head block \(256 entries\)"):
        sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=256))


def test_from_texts_and_clear_errors_for_raw_inputs():
    from sketchfisher.demo import load_minilm

    _, tok = load_minilm()
    batches = sf.tasks.from_texts(["one text", "two texts here", "three"], tok, loss="mlm", batch_size=2)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 2
    with pytest.raises(sf.InputError, match="list of strings"):
        sf.tasks.from_texts("just one string", tok)
    with pytest.raises(sf.InputError, match="loss must be one of"):
        sf.tasks.from_texts(["x"], tok, loss="ranking")
    model = make_model("bert")
    with pytest.raises(sf.InputError, match="holds raw strings.*from_texts"):
        sf.analyze(model, generic_loss, ["a text"], ["b text"])
    with pytest.raises(sf.InputError, match="one mapping"):
        sf.analyze(model, generic_loss, tok(["a text"], return_tensors="pt"), batches)
