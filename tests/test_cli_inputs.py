"""The CLI guesses the objective from the model directory, records it in the store, and refuses nonsense early."""

from __future__ import annotations

import dataclasses

from pathlib import Path

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


def test_prompt_completion_pairs_score_the_completion_only(tmp_path):
    """A (prompt, completion) pair's loss is the loss of the same text restricted to the completion's tokens,
    and it does not depend on the prompt's own next-token terms."""
    import json

    import torch

    from sketchfisher.demo import load_minilm
    from sketchfisher.tasks import clm_batches, clm_loss, read_task

    _, tok = load_minilm()
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "what is two plus two ?", "completion": " four"}) + "\n"
                    + json.dumps({"text": "a plain sample"}) + "\n")
    samples = read_task(path)
    assert samples == [("what is two plus two ?", " four"), "a plain sample"]
    batch = clm_batches(samples, tok, batch_size=2)[0]
    completion = batch["loss_mask"][0].nonzero().flatten().tolist()
    ids = batch["input_ids"][0, completion].tolist()
    assert tok.decode(ids).strip() == "four"
    assert torch.equal(batch["loss_mask"][1], batch["attention_mask"][1])  # a plain text keeps every real token
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2)).eval()
    loss = clm_loss(model, batch)
    full = clm_loss(model, {k: v for k, v in batch.items() if k != "loss_mask"})
    assert loss.shape == (2,) and not torch.isclose(loss[0], full[0])
    with pytest.raises(sf.InputError, match="causal-LM loss"):
        sf.tasks.task_batches(samples, tok, "mlm", 2, 32)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(sf.InputError, match="needs a string field 'text'"):
        read_task(tmp_path / "bad.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    assert read_task(tmp_path / "q.jsonl", text_field="question") == ["x"]


@pytest.mark.parametrize("flag,value", [("--k", "0"), ("--k", "-5"), ("--seed", "-1"), ("--eps", "-1"),
                                        ("--eps", "nan"), ("--eps", "inf"), ("--batch-size", "-1"),
                                        ("--batch-size", "0"), ("--max-length", "1"), ("--max-length", "-3"),
                                        ("--k", "ten")])
def test_nonsensical_numbers_are_usage_errors_before_any_work(flag, value, capsys):
    argv = ["collect", "--model", "/nonexistent", "--task-a", "a", "--task-b", "b", "--out", "o", flag, value]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2  # argparse's usage error, before the (missing) model is opened
    assert flag in capsys.readouterr().err


def test_parquet_files_and_dataset_folders_are_tasks(tmp_path):
    import json

    import pandas as pd

    from sketchfisher.tasks import file_sha256, read_task

    pd.DataFrame({"text": ["one", "two"], "n": [1, 2]}).to_parquet(tmp_path / "a.parquet")
    assert read_task(tmp_path / "a.parquet") == ["one", "two"]
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    pd.DataFrame({"prompt": ["p"], "completion": ["c"]}).to_parquet(folder / "b.parquet")
    (folder / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n")
    (folder / "sub" / "c.txt").write_text("last line\n")
    (folder / "notes.md").write_text("not a task file")
    assert read_task(folder) == ["first", ("p", "c"), "last line"]  # name order, as load_dataset's train split
    before = file_sha256(folder)
    (folder / "sub" / "c.txt").write_text("edited\n")
    assert file_sha256(folder) != before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(sf.InputError, match="without task files"):
        read_task(empty)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(sf.InputError, match="needs the 'datasets' package"):
            read_task(saved)


def test_each_task_format_is_read_as_what_it_is(tmp_path):
    """A .json array holds records (or strings); .csv/.tsv have a header row; suffixes in any case; unknown
    suffixes refused by name; hidden folders skipped; a DatasetDict folder needs a split."""
    import json

    from sketchfisher.tasks import read_task

    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert read_task(tmp_path / "a.json") == ["one", "two"]
    (tmp_path / "s.json").write_text(json.dumps(["x y", "z"]))
    assert read_task(tmp_path / "s.json") == ["x y", "z"]
    (tmp_path / "o.json").write_text(json.dumps({"text": "one"}))
    with pytest.raises(sf.InputError, match="an array of records"):
        read_task(tmp_path / "o.json")
    (tmp_path / "b.csv").write_text('text,label\n"hello, world",1\nsecond,0\n')
    assert read_task(tmp_path / "b.csv") == ["hello, world", "second"]  # the header is not a sample
    (tmp_path / "c.tsv").write_text("prompt\tcompletion\nQ\tA\n")
    assert read_task(tmp_path / "c.tsv") == [("Q", "A")]
    (tmp_path / "D.JSONL").write_text(json.dumps({"text": "upper"}) + "\n")
    assert read_task(tmp_path / "D.JSONL") == ["upper"]
    (tmp_path / "e.md").write_text("# title\n")
    with pytest.raises(sf.InputError, match="unsupported type '.md'"):
        read_task(tmp_path / "e.md")
    folder = tmp_path / "folder"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "a.txt").write_text("kept\n")
    (folder / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("hidden\n")
    (folder / ".hidden.txt").write_text("hidden too\n")
    assert read_task(folder) == ["kept"]
    splits = tmp_path / "dd"
    (splits / "train").mkdir(parents=True)
    (splits / "test").mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(sf.InputError, match=r"splits \['train', 'test'\]; give one split's folder"):
        read_task(splits)


def test_model_folders_and_tasks_are_checked_before_the_weights_load(tiny_bert_dir, tmp_path, capsys):
    """A wrong model path, a folder without a tokenizer (and --tokenizer for it), a one-sample task, --out naming a
    file, --max-length beyond the positions, a sketch wider than a head block and --budget below --k are each one
    clear error, and none of them begins a store or reads the weights."""
    import shutil

    a, b, one = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "one.txt"
    a.write_text("the cat sat on the mat\nthe dog ran in the park\n")
    b.write_text("one plus two is three\ntwo times four is eight\n")
    one.write_text("a single line\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / f, bare / f)

    def run(*argv, out="store"):
        base = ["collect", "--task-a", str(a), "--task-b", str(b), "--out", str(tmp_path / out), "--loss", "mlm",
                "--k", "4", "--quiet"]
        code = main([*base, *argv])
        return code, capsys.readouterr()

    code, io = run("--model", str(tmp_path / "nowhere"))
    assert code == 1 and "no such folder" in io.err and "hub" not in io.err.lower()
    code, io = run("--model", str(bare))
    assert code == 1 and "holds no tokenizer" in io.err and "--tokenizer" in io.err
    code, io = run("--model", str(tiny_bert_dir), "--task-a", str(one))
    assert code == 1 and "holds 1 sample" in io.err
    (tmp_path / "afile").write_text("")
    code, io = run("--model", str(tiny_bert_dir), out="afile")
    assert code == 1 and "is a file" in io.err
    code, io = run("--model", str(tiny_bert_dir), "--max-length", "100000")
    assert code == 1 and "positions" in io.err
    code, io = run("--model", str(tiny_bert_dir), "--k", "9999")
    assert code == 1 and "9999" in io.err
    code, io = run("--model", str(tiny_bert_dir), "--max-bytes", "1000")
    assert code == 1 and "over max_bytes=1,000" in io.err
    assert not (tmp_path / "store").exists()
    code, io = run("--model", str(bare), "--tokenizer", str(tiny_bert_dir))
    assert code == 0, io.err
    code = main(["verify", str(tmp_path / "store"), "--top", "50", "--budget", "10"])
    assert code == 1 and "--budget 10 is smaller than --top 50" in capsys.readouterr().err


def test_moved_model_and_task_files_still_resume(tiny_bert_dir, tmp_path, capsys):
    """The store checks the content of its inputs, not their paths: the same weights and task files under
    other paths finish (and verify) the same store."""
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    (first / "a.txt").write_text("the cat sat on the mat\nthe dog ran in the park\n")
    (first / "b.txt").write_text("one plus two is three\ntwo times four is eight\n")
    model = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    args = lambda root, m: ["collect", "--model", str(m), "--task-a", str(root / "a.txt"), "--task-b",  # noqa: E731
                            str(root / "b.txt"), "--out", str(tmp_path / "store"), "--loss", "mlm", "--k", "4",
                            "--quiet"]
    assert main(args(first, model)) == 0
    moved = shutil.move(str(first), str(tmp_path / "moved"))
    model2 = shutil.move(str(model), str(tmp_path / "model2"))
    capsys.readouterr()
    assert main(args(Path(moved), model2)) == 0, capsys.readouterr().err  # reopened, nothing mismatched
    sf.open_store(tmp_path / "store").check(sf.tasks.load_hf(model2, "mlm")[0])


def test_the_cli_answers_help_and_usage_errors_without_importing_torch():
    """`--help`, every sub-command's `--help`, `--version` and usage errors build the parser from light
    tables: no torch (nor pandas) in the process. Timing is a benchmark's business; the import is checked."""
    import subprocess
    import sys

    code = ("import sys, io, contextlib\n"
            "import sketchfisher.cli as cli\n"
            "for argv in (['--help'], ['collect', '--help'], ['plan', '--help'], ['conflicts', '--help'], "
            "['--version'], ['collect', '--k', 'ten']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
            "        try:\n"
            "            cli.main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_light_option_tables_are_the_librarys():
    from sketchfisher.cli import choices
    from sketchfisher.compress import storable
    from sketchfisher.compress.sketch import DTYPES
    from sketchfisher.compress.sketchmaps import KINDS
    from sketchfisher.layout import UNIT_FAMILIES
    from sketchfisher.metric import NORMALIZER_MEANINGS, VARIANTS

    assert choices.VARIANTS == {name: v.formula for name, v in VARIANTS.items()}
    assert choices.NORMALIZERS == NORMALIZER_MEANINGS
    assert choices.UNIT_FAMILIES == tuple(UNIT_FAMILIES) and choices.SKETCH_KINDS == tuple(KINDS)
    assert choices.SKETCH_DTYPES == tuple(DTYPES)
    assert choices.CODECS == {name: cls.summary for name, cls in storable().items()}


def test_rotate_flag_builds_a_rotating_sketch_or_a_clear_error():
    """``collect --rotate``: the sketch turned before storage; a k that is no power of two, or a codec without a
    rotation, is one clear error rather than a flag silently ignored."""
    from sketchfisher.cli.parser import codec_of
    from sketchfisher.compress import register_codec, unregister_codec

    base = ["collect", "--model", "m", "--task-a", "a", "--task-b", "b", "--out", "o"]
    assert codec_of(build_parser().parse_args([*base, "--rotate"])) == sf.Sketch(rotate=True)
    assert codec_of(build_parser().parse_args(base)) == sf.Sketch()
    with pytest.raises(sf.InputError, match="power-of-two k"):
        codec_of(build_parser().parse_args([*base, "--rotate", "--k", "1000"]))

    @dataclasses.dataclass(frozen=True)
    class Plain(sf.Exact):
        name = "plain-test"

    register_codec(Plain)
    try:
        args = build_parser().parse_args([*base, "--rotate"])
        args.codec = "plain-test"  # (a registered codec without a rotation; --codec lists storable ones)
        with pytest.raises(sf.InputError, match="no rotation"):
            codec_of(args)
    finally:
        unregister_codec("plain-test")
