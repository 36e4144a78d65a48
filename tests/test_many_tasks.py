"""Many tasks collected once (``sf.analyze_tasks``): any pair's scores and conflict test are those of a dedicated
pairwise collection; 2N passes for N tasks."""

from __future__ import annotations

import pytest
import torch

import sketchfisher as sf
from tiny_models import generic_loss, make_batches, make_model


@pytest.fixture(scope="module")
def three():
    model = make_model("llama_gqa", seed=3)
    tasks = {"x": make_batches(6, 2, seed=1), "y": make_batches(5, 2, seed=2), "z": make_batches(4, 2, seed=7)}
    return model, tasks


@pytest.mark.parametrize("variant", ["paper", "signed"])
@pytest.mark.parametrize("units", ["heads", "all"])
def test_every_pair_equals_the_exact_scores_at_full_width(three, variant, units):
    """Full-width srht is exact, so every ordered pair must give the exact pairwise scores: the shared balance,
    each task's own centres and the per-task cross terms keep the identity for any pair."""
    model, tasks = three
    seen = {t: 0 for t in tasks}

    def counting(m, batch):
        seen[next(t for t, bs in tasks.items() if any(batch is b for b in bs))] += 1
        return generic_loss(m, batch)

    group = dict(mlp_group_size=4) if units == "all" else {}  # MLP blocks of 4 x 32 = 128 entries, as the heads'
    many = sf.analyze_tasks(model, counting, tasks, codec=sf.Sketch(k=128, kind="srht", dtype="fp32"), variant=variant,
                            units=units, **group)
    assert seen == {t: 2 * len(bs) for t, bs in tasks.items()}  # one statistics and one sketch pass per task
    for a in tasks:
        for b in tasks:
            if a == b:
                continue
            exact = sf.analyze(model, generic_loss, tasks[a], tasks[b], codec=sf.Factors(), variant=variant, units=units,
                               **group)
            res = many.pair(a, b)
            scale = float(exact.scores.abs().max()) * 1e-5
            torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=scale)
            if units == "all":
                mlp, emlp = res.units("mlp"), exact.units("mlp")
                torch.testing.assert_close(mlp.scores, emlp.scores, rtol=1e-4, atol=float(emlp.scores.abs().max()) * 1e-5)


def test_each_pairs_conflict_test_is_the_exact_one(three, tmp_path):
    """The per-sample conflict scalars against every task are exact: each pair's conflict table (T, its standard
    error, p) is the exact codec's for that pair."""
    model, tasks = three
    many = sf.analyze_tasks(model, generic_loss, tasks, codec=sf.Sketch(k=16))
    cols, key = ["T", "stderr", "p_value", "alignment"], ["layer", "head", "block"]
    table = many.conflicts()
    assert set(zip(table.task_a, table.task_b)) == {(a, b) for a in tasks for b in tasks if a != b}
    for a, b in (("x", "y"), ("z", "x")):
        want = sf.analyze(model, generic_loss, tasks[a], tasks[b], codec=sf.Factors()).head_conflicts()
        got = many.pair(a, b).head_conflicts()
        w, g = (df.sort_values(key)[cols].to_numpy() for df in (want, got))
        w = torch.tensor(w)  # (the scalars are formed in the score dtype, fp32: rounding only)
        torch.testing.assert_close(torch.tensor(g), w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))
    m = many.matrix(table=table)
    assert list(m.index) == list(m.columns) == ["x", "y", "z"]
    assert all(m.isna().to_numpy().diagonal()) and not m.isna().to_numpy()[~torch.eye(3, dtype=bool).numpy()].any()
    for (a, b), n in table.groupby(["task_a", "task_b"])["conflict"].sum().items():
        assert m.loc[a, b] == n
    assert many.matrix(table=table, block="V").to_numpy()[0, 1] == table[(table.task_a == "x") & (table.task_b == "y")
                                                                         & (table.block == "V")].conflict.sum()
    pytest.importorskip("matplotlib")
    from sketchfisher.plots import plot_task_matrix

    fig = plot_task_matrix(m, tmp_path / "pairs.png", total=len(table) // 6)
    assert (tmp_path / "pairs.png").stat().st_size > 5000 and fig.axes


def test_sketched_pairs_have_calibrated_error_bars(three):
    """At k < P a pair's estimates scatter around the exact scores as their error bars say."""
    model, tasks = three
    many = sf.analyze_tasks(model, generic_loss, tasks, codec=sf.Sketch(k=32, seed=3))
    exact = sf.analyze(model, generic_loss, tasks["y"], tasks["z"], codec=sf.Factors())
    res = many.pair("y", "z")
    cover = float(((res.scores - exact.scores).abs() <= 1.96 * res.stderr).double().mean())
    assert 0.85 <= cover <= 1.0, cover


def test_bad_settings_are_refused(three):
    model, tasks = three
    with pytest.raises(sf.InputError, match="at least 2 tasks"):
        sf.analyze_tasks(model, generic_loss, {"x": tasks["x"]})
    with pytest.raises(sf.InputError, match="needs sketches"):
        sf.analyze_tasks(model, generic_loss, tasks, codec=sf.Factors())
    with pytest.raises(sf.InputError, match="normalizer='a'"):
        sf.analyze_tasks(model, generic_loss, tasks, config=sf.ScoreConfig(normalizer="pooled"))
    with pytest.raises(sf.InputError, match="one-shot iterator"):
        sf.analyze_tasks(model, generic_loss, {"x": iter(tasks["x"]), "y": tasks["y"]})
    with pytest.raises(sf.InputError, match="mapping"):
        sf.analyze_tasks(model, generic_loss, [tasks["x"], tasks["y"]])
    many = sf.analyze_tasks(model, generic_loss, {"x": tasks["x"], "y": tasks["y"]}, codec=sf.Sketch(k=8))
    with pytest.raises(sf.InputError, match="no task 'w'"):
        many.pair("x", "w")
    with pytest.raises(sf.InputError, match="two different tasks"):
        many.pair("x", "x")


def test_a_saved_task_set_reads_back_the_same_pairs_without_the_model(three, tmp_path):
    """save / sf.open_tasks: every pair's scores, error bars and conflict table bitwise; every file checked
    against its digest (a changed byte is refused); no second task set written over the first."""
    model, tasks = three
    many = sf.analyze_tasks(model, generic_loss, tasks, codec=sf.Sketch(k=16, dtype="int4"))
    many.save(tmp_path / "set")
    back = sf.open_tasks(tmp_path / "set")
    assert back.names == many.names
    for a, b in (("x", "y"), ("z", "y")):
        mine, theirs = many.pair(a, b), back.pair(a, b)
        assert torch.equal(mine.scores, theirs.scores) and torch.equal(mine.stderr, theirs.stderr)
        t1, t2 = (r.head_conflicts() for r in (mine, theirs))
        assert t1[["T", "stderr", "p_value"]].equals(t2[["T", "stderr", "p_value"]])
    with pytest.raises(sf.StoreError, match="holds a task set already"):
        many.save(tmp_path / "set")
    victim = tmp_path / "set" / "sides-1-b.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(sf.StoreError, match="does not match its recorded digest|cannot read"):
        sf.open_tasks(tmp_path / "set")
    with pytest.raises(sf.StoreError, match="not a sketchfisher"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "tasks.json").write_text('{"format": "something else"}')
        sf.open_tasks(tmp_path / "other")


def task_files(folder, extra=None):
    """Three small text tasks written to ``folder`` (``extra`` lines appended per task): ``({name: text},
    the CLI's --task arguments)``."""
    files = {"animals": "the cat sat on the mat\nthe dog ran in the park\na bird sang in the tree\nfish swim\n",
             "sums": "one plus two is three\ntwo times four is eight\nten minus six is four\nsix is even\n",
             "weather": "it rained all day\nthe sun came out at noon\nsnow fell in the night\nfog lifted\n"}
    files = {name: text + (extra or {}).get(name, "") for name, text in files.items()}
    args = []
    for name, text in files.items():
        (folder / f"{name}.txt").write_text(text)
        args += ["--task", f"{name}={folder / name}.txt"]
    return files, args


def test_the_tasks_command_collects_named_tasks_once(tiny_bert_dir, tmp_path, capsys):
    """``sketchfisher tasks --task NAME=PATH ...``: the N x N matrix printed and written, every pair's conflict
    test in conflicts.csv, the task set read back without the model; bad --task values are one clear error."""
    import pandas as pd

    from sketchfisher.cli import main

    files, args = task_files(tmp_path)
    base = ["tasks", "--model", str(tiny_bert_dir), "--loss", "mlm", "--k", "16", "--quiet", "--no-plot"]
    assert main([*base, *args, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 tasks collected once (6 passes)" in out and "animals" in out and "conflicts.csv" in out
    matrix = pd.read_csv(tmp_path / "out" / "matrix.csv", index_col=0)
    assert list(matrix.index) == list(matrix.columns) == list(files)
    table = pd.read_csv(tmp_path / "out" / "conflicts.csv")
    assert set(zip(table.task_a, table.task_b)) == {(a, b) for a in files for b in files if a != b}
    back = sf.open_tasks(tmp_path / "out")
    assert back.names == list(files) and back.pair("sums", "animals").scores.shape[:2] == (4, 4)
    (tmp_path / "two.txt").write_text("a line\nanother line\n")
    for bad, message in ((["--task", "only=" + str(tmp_path / "sums.txt")], "two or more"),
                         (args[:4] + ["--task", f"two={tmp_path / 'two.txt'}"], "at least 4 task-A samples: two (2)"),
                         (["--task", "nopath"], "NAME=PATH"), (args[:2] + args[:2], "given twice")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad")]) == 1
        assert message in capsys.readouterr().err
    assert main([*base, *args, "--out", str(tmp_path / "out")]) == 1
    assert "holds a task set already" in capsys.readouterr().err


def test_cli_verifies_a_pair_of_a_task_set_exactly(tiny_bert_dir, tmp_path, capsys):
    """``sketchfisher verify DIR --pair A,B`` on a ``tasks`` folder: the model, loss and both task files come from
    its record, and the re-scored candidates carry the exact scores of that ordered pair (an Exact analysis of the
    same batches); a missing or unknown --pair, or --pair on a store, is one clear error."""
    import pandas as pd

    from sketchfisher.cli import main
    from sketchfisher.tasks import load_hf, loss_for, read_task, task_batches

    _, args = task_files(tmp_path, extra={"sums": "nine\n"})  # (5 samples against 4: pairs are ordered)
    out = tmp_path / "set"
    assert main(["tasks", "--model", str(tiny_bert_dir), "--loss", "mlm", "--k", "16", "--quiet", "--no-plot",
                 "--batch-size", "2", *args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--pair", "sums,weather", "--top", "5", "--budget", "40"]) == 0
    assert "held among 40 re-scored candidates" in capsys.readouterr().out
    got = pd.read_csv(out / "verified-sums-weather.csv")
    model, tok = load_hf(str(tiny_bert_dir), "mlm", "cpu", "float32", None, None)
    batches = [task_batches(read_task(tmp_path / f"{n}.txt"), tok, "mlm", 2, 128) for n in ("sums", "weather")]
    exact = sf.analyze(model, loss_for("mlm"), *batches, codec=sf.Exact()).top_conflicts(10**6)
    keys = ["block", "layer", "head", "sample_i", "sample_j"]
    both = got.merge(exact[keys + ["score"]], on=keys, suffixes=("", "_exact"))
    assert len(both) == len(got) == 40
    torch.testing.assert_close(torch.tensor(both.exact_score.to_numpy()), torch.tensor(both.score_exact.to_numpy()),
                               rtol=1e-5, atol=1e-9)  # (fp32 gradients, summed in other orders)
    changed = tmp_path / "changed"  # the same model with one weight moved: refused by its fingerprint
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(changed)
    tok.save_pretrained(changed)
    for target, bad, message in ((out, ["--pair", "sums"], "--pair A,B names the ordered pair"),
                                 (out, [], "--pair A,B names"), (out, ["--pair", "sums,rain"], "no task rain"),
                                 (tmp_path / "store", ["--pair", "sums,weather"], "--pair is for a task set"),
                                 (out, ["--pair", "sums,weather", "--model", str(changed)], "another model")):
        assert main(["verify", str(target), *bad]) == 1
        assert message in capsys.readouterr().err
