"""Stores: round trip, resume after SIGKILL, mismatches, corrupt and hostile files, planner, CLI."""

import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import sketchfisher as sf
from sketchfisher.planner import plan
from sketchfisher.store import collect_to_store
from tiny_models import generic_loss, make_batches, make_model

TESTS = Path(__file__).parent
CODEC = sf.Sketch(k=32, kind="sjlt", seed=4, dtype="fp16")  # (fp16: the byte counts below are per value)


@pytest.fixture(scope="module")
def small():
    model = make_model("llama_gqa", seed=3)
    return model, make_batches(6, 2, seed=1), make_batches(5, 2, seed=2)


def test_round_trip_equals_in_memory(small, tmp_path):
    model, ta, tb = small
    mem = sf.analyze(model, generic_loss, ta, tb, codec=CODEC)
    stored = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    torch.testing.assert_close(stored.scores, mem.scores, rtol=0, atol=0)
    torch.testing.assert_close(stored.stderr, mem.stderr, rtol=0, atol=0)
    reopened = sf.open_store(tmp_path / "s")  # another "process": no model needed
    torch.testing.assert_close(reopened.result().scores, mem.scores, rtol=0, atol=0)
    summary = reopened.summary()
    assert summary["samples"] == {"a": 6, "b": 5} and summary["codec"]["seed"] == 4
    again = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")  # complete: nothing rerun
    torch.testing.assert_close(again.scores, mem.scores, rtol=0, atol=0)


def _run_worker(path, kill_when=None, timeout=900, passes=2):  # (generous: a loaded machine is slow)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(TESTS / "store_worker.py"), str(path), str(passes)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if kill_when is not None and kill_when(Path(path)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.02)
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0, out
    return "finished"


def test_resume_after_sigkill_counts_every_sample_once(tmp_path):
    ref = tmp_path / "ref"
    assert _run_worker(ref) == "finished"
    run = tmp_path / "run"
    in_pass1 = lambda p: (p / "pass1" / "a.partial.safetensors").exists()  # noqa: E731
    in_pass2 = lambda p: len(list((p / "pass2" / "b").glob("*.safetensors"))) >= 3  # noqa: E731
    assert _run_worker(run, kill_when=in_pass1) == "killed"
    with pytest.raises(sf.StoreError, match="has not finished"):
        sf.open_store(run)
    assert _run_worker(run, kill_when=in_pass2) == "killed"
    assert _run_worker(run) == "finished"
    assert not list(run.rglob("*.sketchfisher-tmp"))  # leftovers of the killed runs are removed on restart
    a, b = sf.open_store(ref), sf.open_store(run)
    assert b.summary()["samples"] == {"a": 24, "b": 20}
    for t in ("a", "b"):
        assert a.stats[t].quantities == b.stats[t].quantities
        for name in a.stats[t].names():
            if "fisher" in a.stats[t].quantities:
                assert torch.equal(a.stats[t].fisher(name), b.stats[t].fisher(name))
            for (q, mine), (_, theirs) in zip(a.stats[t].sums(), b.stats[t].sums()):  # Σ|g|, Σg, the half sum
                if q in a.stats[t].quantities:
                    assert torch.equal(mine[name], theirs[name]), (t, q, name)
    torch.testing.assert_close(b.result().scores, a.result().scores, rtol=0, atol=0)


def test_task_b_once_into_a_store_equals_in_memory(small, tmp_path):
    """passes=1.5 into a store: the same arithmetic as in memory (bitwise), the order in the manifest, and a
    store begun in one order is not resumed in the other."""
    model, ta, tb = small
    mem = sf.analyze(model, generic_loss, ta, tb, codec=CODEC)  # the default order for these settings
    assert [r["phase"] for r in mem.phases.rows()][:3] == ["pass 1 A", "preparation", "pass B"]
    seen = {"a": 0, "b": 0}

    def counting(m, batch):
        seen["a" if any(batch is x for x in ta) else "b"] += 1
        return generic_loss(m, batch)

    stored = sf.analyze(model, counting, ta, tb, codec=CODEC, store=tmp_path / "s", passes=1.5)
    assert (seen["a"], seen["b"]) == (2 * len(ta), len(tb))
    torch.testing.assert_close(stored.scores, mem.scores, rtol=0, atol=0)
    torch.testing.assert_close(stored.stderr, mem.stderr, rtol=0, atol=0)
    store = sf.open_store(tmp_path / "s")
    assert store.passes == 1.5 and store.summary()["samples"] == {"a": 6, "b": 5} and store.summary()["passes"] == 1.5
    torch.testing.assert_close(store.result().scores, mem.scores, rtol=0, atol=0)
    with pytest.raises(sf.StoreMismatchError, match="passes"):
        sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s", passes=2)
    again = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")  # the store's own order
    torch.testing.assert_close(again.scores, mem.scores, rtol=0, atol=0)
    two = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "two", passes=2)
    assert sf.open_store(tmp_path / "two").passes == 2
    with pytest.raises(sf.StoreMismatchError, match="passes"):
        sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "two", passes=1.5)
    assert sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "two").context.store  # reopened
    assert not torch.equal(two.scores, stored.scores)  # another balance: another estimate of the same scores


def _same_store_contents(ref: Path, run: Path) -> None:
    """Every statistics file and shard of two stores holds bitwise the same tensors (their store ids differ)."""
    from sketchfisher.store.files import load_tensors

    files = sorted(str(p.relative_to(ref)) for p in ref.rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(run)) for p in run.rglob("*.safetensors"))
    for name in files:
        want, _ = load_tensors(ref / name)
        got, _ = load_tensors(run / name)
        assert set(want) == set(got), name
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}: {key} differs"


@pytest.fixture(scope="module")
def one_and_half_ref(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "store"
    assert _run_worker(ref, passes=1.5) == "finished"
    return ref


@pytest.mark.parametrize("crash", ["pass B", "B's shards", "pass 2 A"])
def test_task_b_once_resumes_bitwise_after_sigkill(one_and_half_ref, tmp_path, crash):
    """Killed during task B's only pass (its statistics not on disk: the pass is redone), after B's statistics
    reached the disk but before all of its shards did, or during A's pass 2: the finished store is bitwise the
    one an uninterrupted run writes (every shard, both statistics files, scores and standard errors)."""
    ref, run = one_and_half_ref, tmp_path / "run"
    b_shards = lambda p: len(list((p / "pass2" / "b").glob("*.safetensors")))  # noqa: E731
    a_shards = lambda p: len(list((p / "pass2" / "a").glob("*.safetensors")))  # noqa: E731
    when = {"pass B": lambda p: (p / "pass1" / "a.safetensors").exists(),
            "B's shards": lambda p: (p / "pass1" / "b.safetensors").exists() and b_shards(p) >= 1,
            "pass 2 A": lambda p: a_shards(p) >= 2}[crash]
    assert _run_worker(run, kill_when=when, passes=1.5) == "killed"
    if crash == "pass B":
        assert not (run / "pass1" / "b.safetensors").exists()
    if crash == "B's shards":  # the centring writes B's shards in a moment: as if killed before the later ones
        for shard in sorted((run / "pass2" / "b").glob("*.safetensors"))[3::2]:
            shard.unlink()
        for shard in (run / "pass2" / "a").glob("*.safetensors"):
            shard.unlink()
    assert _run_worker(run, passes=1.5) == "finished"
    _same_store_contents(ref, run)
    ra, rb = sf.open_store(ref).result(), sf.open_store(run).result()
    assert torch.equal(ra.scores, rb.scores) and torch.equal(ra.stderr, rb.stderr)


def test_shards_without_saved_statistics_are_redone(small, tmp_path):
    """The final pass-1 statistics are written while pass 2 runs; a run killed before they reached the disk
    leaves shards from a preparation no file records: the restart deletes them and collects them again."""
    model, ta, tb = small
    ref = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "ref")
    run = tmp_path / "run"
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=run)
    from sketchfisher.store.manifest import seal

    manifest = json.loads((run / "manifest.json").read_text())  # as the run wrote it before finishing
    (run / "manifest.json").write_text(json.dumps(seal({**manifest, "complete": False, "files": {}, "tasks": {}})))
    (run / "pass1" / "b.safetensors").unlink()  # killed before B's statistics were written
    shard = sorted((run / "pass2" / "a").glob("*.safetensors"))[0]
    torch.save({"not": "the sketches"}, shard)  # stands for a shard of another preparation: must not be read
    again = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=run)
    torch.testing.assert_close(again.scores, ref.scores, rtol=0, atol=0)


def test_final_statistics_supersede_the_checkpoints(small, tmp_path):
    """Once a task's final pass-1 file is written, its checkpoints (every rank's) are deleted: the disk
    never holds both for long, which is what the disk plan counts on."""
    from sketchfisher.fisher import FisherStats
    from sketchfisher.store.pass1 import save_pass1 as _save_pass1

    (tmp_path / "a.partial.safetensors").write_bytes(b"x")
    (tmp_path / "a.rank1-of-2.partial.safetensors").write_bytes(b"x")
    (tmp_path / "b.partial.safetensors").write_bytes(b"x")
    stats = FisherStats(dtype=torch.float64, quantities=("abs",))
    stats.update({"w": torch.ones(2, 3, 4, dtype=torch.float64)})
    _save_pass1(stats, tmp_path / "a.safetensors", 1, "id", "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.partial.safetensors"]


def test_host_copies_and_stacked_shards_keep_values():
    from sketchfisher.compress.sketch import quantize
    from sketchfisher.fisher import FisherStats, HostStaging
    from sketchfisher.store.shards import ShardParts

    g = torch.Generator().manual_seed(0)
    blocks = {(0, "Q"): (torch.randn(3, 4, 8, generator=g), torch.rand(3, 4, generator=g), torch.randn(3, 4, generator=g),
                         torch.randn(3, 4, generator=g)),  # (sketches, ‖ṽ‖², cross, γ)
              (1, "K"): (torch.randn(3, 2, 8, generator=g) * 1e3, torch.rand(3, 2, generator=g), torch.randn(3, 2, generator=g),
                         torch.randn(3, 2, generator=g))}
    for dtype in ("int8", "fp16", "fp32"):
        shard = ShardParts.of(blocks, sf.Sketch(k=8, dtype=dtype)).tensors()
        for (layer, block), (sk, norm2, cross, gamma) in blocks.items():  # stacked, quantised once: as block by block
            q, scale = quantize(sk, dtype)
            assert torch.equal(shard[f"{layer}.{block}.vec"], q) and shard[f"{layer}.{block}.vec"].is_contiguous()
            assert (scale is None) == (f"{layer}.{block}.scale" not in shard)
            assert scale is None or torch.equal(shard[f"{layer}.{block}.scale"], scale)
            assert torch.equal(shard[f"{layer}.{block}.norm2"], norm2.double())
            assert torch.equal(shard[f"{layer}.{block}.cross"], cross.double())
            assert torch.equal(shard[f"{layer}.{block}.gamma"], gamma.float())
    with HostStaging([(12, torch.float32), (12, torch.float32)]) as staging:
        t = torch.randn(3, 4)
        assert staging.copy(t) is t  # host tensors are not copied
        buf = staging._take((12, torch.float32))  # a ready buffer (its pages touched; contents are overwritten)
        assert buf.shape == (12,) and buf.dtype == torch.float32
    stats = FisherStats(torch.float32, quantities=("fisher", "abs"))
    stats.update({"w": torch.randn(4, 3, 2)})
    host = stats.to_host()
    assert torch.equal(host.fisher("w"), stats.fisher("w")) and torch.equal(host.mean_abs("w"), stats.mean_abs("w"))
    stats.release(("fisher",))
    assert stats.quantities == ("fisher",) and not stats.sum_abs and torch.equal(stats.fisher("w"), host.fisher("w"))


def test_host_staging_that_cannot_lock_or_allocate_falls_back_to_ordinary_copies(monkeypatch, caplog):
    """A buffer that cannot be page-locked stays an ordinary touched buffer (with a warning); a failure of any
    kind while allocating stops the staging, and copies then take the ordinary way instead of waiting forever."""
    from sketchfisher.fisher import HostStaging, host

    def no_runtime():
        raise AttributeError("no cudaHostRegister here")

    monkeypatch.setattr(torch.cuda, "cudart", no_runtime)
    with caplog.at_level("WARNING", logger=host.__name__):
        buf = host.touched_buffer(10, torch.bfloat16, pin=True)
    assert buf.shape == (10,) and buf.dtype == torch.bfloat16 and "page-lock" in caplog.text

    def broken(numel, dtype, pin=False):
        raise ValueError("unexpected")

    monkeypatch.setattr(host, "touched_buffer", broken)
    device = torch.device("meta")  # (stands for a GPU: anything not on the host goes through the staging)
    with HostStaging([(6, torch.float32)]) as staging:
        t = torch.empty(6, device=device)
        monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: torch.zeros(self.shape))
        out = staging.copy(t)  # (returns instead of waiting for a buffer that never comes)
        assert out.shape == (6,) and out.device.type == "cpu"


def test_copies_ahead_bring_each_item_with_the_next_queued_and_drop_guesses_not_asked_for():
    """``CopiesAhead`` returns each item's tensor of the kind asked for, having asked its source for the next item's
    of the same kind while returning this one; a guess never asked for is dropped, and a source that fails for a
    guess fails only where that item is asked for."""
    from sketchfisher.errors import InputError
    from sketchfisher.fisher.host import CopiesAhead

    tensors = {(name, what): torch.full((3,), float(i), dtype=torch.float64)
               for i, (name, what) in enumerate((n, w) for n in "abcd" for w in ("fisher", "sum"))}
    asked = []

    def source(name, what):
        asked.append((name, what))
        if name == "d" and what == "sum":
            raise InputError("no sum of d")
        return tensors[(name, what)]

    ahead = CopiesAhead(["a", "a", "b", "c", "d"], source)
    cpu = torch.device("cpu")
    assert torch.equal(ahead.get("a", "fisher", cpu), tensors[("a", "fisher")])
    assert asked == [("a", "fisher"), ("b", "fisher")]
    assert torch.equal(ahead.get("a", "sum", cpu), tensors[("a", "sum")])
    assert asked[2:] == [("a", "sum"), ("b", "sum")]
    assert torch.equal(ahead.get("b", "sum", cpu), tensors[("b", "sum")])  # (queued: not asked again)
    assert asked[4:] == [("c", "sum")] and set(ahead._queued) == {("b", "fisher"), ("c", "sum")}
    assert torch.equal(ahead.get("c", "fisher", cpu), tensors[("c", "fisher")])  # (b's Fisher, never asked: dropped)
    assert ("b", "fisher") not in ahead._queued and asked[5:] == [("c", "fisher"), ("d", "fisher")]
    assert torch.equal(ahead.get("c", "sum", cpu), tensors[("c", "sum")])  # (d's sum fails as a guess: not queued)
    assert ("d", "sum") not in ahead._queued
    with pytest.raises(InputError, match="no sum of d"):
        ahead.get("d", "sum", cpu)


def test_mismatched_settings_and_model_are_refused(small, tmp_path):
    model, ta, tb = small
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    with pytest.raises(sf.StoreMismatchError, match=r"codec \(seed: stored 4 vs requested 5\)"):
        sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32, kind="sjlt", seed=5, dtype="fp16"), store=tmp_path / "s")
    with pytest.raises(sf.StoreMismatchError, match=r"score \(variant"):
        sf.analyze(model, generic_loss, ta, tb, codec=CODEC, variant="signed", store=tmp_path / "s")
    other = make_model("llama_gqa", seed=9)
    with pytest.raises(sf.StoreMismatchError, match=r"model \(weights_sha256"):
        sf.analyze(other, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    with pytest.raises(sf.StoreMismatchError, match="layout"):
        sf.open_store(tmp_path / "s").check(make_model("gpt2"))
    from sketchfisher.store.manifest import seal
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    claimed = {k: v for k, v in manifest.items() if k != "digest"}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**claimed, "format_version": 2}))
    with pytest.raises(sf.StoreError, match="claims format version 2 but holds store_id, files"):
        sf.open_store(tmp_path / "s")  # an edited claim of an old format switches no check off
    old = {k: v for k, v in claimed.items() if k not in ("store_id", "files", "passes", "conflicts")}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**old, "format_version": 2}))
    with pytest.raises(sf.StoreError, match="carry no digests.*unverified=True"):
        sf.open_store(tmp_path / "s")
    manifest["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(sf.StoreError, match="format version 99"):
        sf.open_store(tmp_path / "s")


def test_fingerprint_sees_any_changed_byte():
    """Every byte of every weight is hashed: one entry changed anywhere (or by one ulp) gives another model."""
    from sketchfisher.store.manifest import model_fingerprint
    model = make_model("llama_gqa")
    layout = sf.layout_for(model)
    before = model_fingerprint(model, layout)["weights_sha256"]
    param = model.get_parameter("layers.1.mlp.down_proj.weight")
    with torch.no_grad():
        flat = param.view(-1)
        flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))
    assert model_fingerprint(model, layout)["weights_sha256"] != before


def test_fingerprint_leaves_out_what_the_checkpoint_lacks(tmp_path):
    """A BERT saved without its pooler gets a new random pooler on every load; the fingerprint covers the
    checkpoint's own tensors, says which it left out, and so the same checkpoint is the same model."""
    import transformers as hf
    from sketchfisher.store.manifest import model_fingerprint
    from sketchfisher.demo import load_minilm

    _, tok = load_minilm()
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48)
    hf.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prints = []
    for seed in (1, 2):  # the pooler is drawn anew on each load
        torch.manual_seed(seed)
        model, _ = sf.tasks.load_hf(tmp_path, "mlm")
        assert "pooler.dense.weight" in dict(model.named_parameters())
        prints.append(model_fingerprint(model, sf.layout_for(model)))
    assert prints[0] == prints[1]
    assert "left out" in prints[0]["weights_cover"] and "pooler.dense.weight" in prints[0]["weights_cover"]


def test_fingerprint_is_cached_by_file_identity_until_a_weight_changes(tiny_bert_dir, monkeypatch):
    from sketchfisher.store import manifest
    from sketchfisher.store.manifest import model_fingerprint

    first, _ = sf.tasks.load_hf(tiny_bert_dir, "mlm")
    want = model_fingerprint(first, sf.layout_for(first))
    again, _ = sf.tasks.load_hf(tiny_bert_dir, "mlm")

    def unexpected(p):
        raise AssertionError("hashed although the files and weights are unchanged")
    monkeypatch.setattr(manifest, "_param_digest", unexpected)
    assert model_fingerprint(again, sf.layout_for(again)) == want  # from the cache
    monkeypatch.undo()
    with torch.no_grad():
        again.encoder.layer[0].attention.self.query.weight[0, 0] += 1.0  # changed in memory: hashed again
    assert model_fingerprint(again, sf.layout_for(again))["weights_sha256"] != want["weights_sha256"]


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SF_PICKLE_MARKER"]),))


def test_corrupt_truncated_and_pickled_shards_are_rejected(small, tmp_path, monkeypatch):
    model, ta, tb = small
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    shard = tmp_path / "s" / "pass2" / "a" / "0000001.safetensors"
    backup = shard.read_bytes()
    shard.write_bytes(backup[: len(backup) // 2])
    with pytest.raises(sf.StoreError, match="0000001.safetensors"):
        sf.open_store(tmp_path / "s").result().scores
    marker = tmp_path / "executed"
    monkeypatch.setenv("SF_PICKLE_MARKER", str(marker))
    shard.write_bytes(pickle.dumps(_Marker()))
    with pytest.raises(sf.StoreError, match="not safetensors"):
        sf.open_store(tmp_path / "s").result().scores
    assert not marker.exists()
    shard.write_bytes(backup)
    (tmp_path / "s" / "pass2" / "a" / "0000000.safetensors").unlink()
    with pytest.raises(sf.StoreError, match="not the recorded ones"):
        sf.open_store(tmp_path / "s")


def test_a_damaged_shard_is_named_and_computed_again_when_collection_reruns(small, tmp_path, caplog):
    """A rerun checks every shard it would skip: a flipped byte is reported by name, the shard deleted and its
    batch computed again, so the store ends bitwise the undamaged one; `conflicts` reads every file first."""
    from sketchfisher.cli import main

    model, ta, tb = small
    ref = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    shard = tmp_path / "s" / "pass2" / "b" / "0000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's bytes: the header still parses
    shard.write_bytes(bytes(data))
    assert main(["conflicts", str(tmp_path / "s"), "--no-plot"]) == 1  # damage reported, not a silent table
    with caplog.at_level("WARNING"):
        again = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    assert "0000001.safetensors is damaged" in caplog.text
    sf.open_store(tmp_path / "s").verify()
    assert torch.equal(again.scores, ref.scores) and torch.equal(again.stderr, ref.stderr)


def test_a_deleted_manifest_is_restored_from_its_copy(small, tmp_path, caplog):
    model, ta, tb = small
    ref = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(sf.StoreError):
        sf.open_store(tmp_path / "s")
    with caplog.at_level("WARNING"):
        again = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    assert "restored from its copy" in caplog.text and torch.equal(again.scores, ref.scores)
    (tmp_path / "s" / "manifest.json").unlink()
    (tmp_path / "s" / "pass1" / "manifest.json").unlink()
    with pytest.raises(sf.StoreError, match="no manifest.json and no copy"):
        sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")


def test_collection_refuses_over_max_bytes(small, tmp_path):
    model, ta, tb = small
    layout = sf.layout_for(model)
    with pytest.raises(sf.InputError, match=r"planned store is [\d,]+ bytes .*sketches 37.8 KiB, conflict scalars [\d.]+ KiB, shard headers .*"
                                            r"statistics .*11 samples\), over max_bytes=1,000"):
        collect_to_store(tmp_path / "s", model, generic_loss, ta, tb, layout, CODEC, sf.ScoreConfig(), max_bytes=1000)
    assert not list((tmp_path / "s").rglob("*.safetensors"))  # refused before pass 1: lists of batches are counted


def test_no_checkpoint_writes_none_and_the_same_store(small, tmp_path, monkeypatch):
    """checkpoint_every=0: pass 1 writes no checkpoint (the writer is watched), and the store is the checkpointed
    one's, bitwise; every other value is refused before any work."""
    from sketchfisher.store import pass1

    model, ta, tb = small
    written = []
    save = pass1.atomic_save_tensors
    monkeypatch.setattr(pass1, "atomic_save_tensors", lambda t, path, meta: (written.append(path), save(t, path, meta)))
    layout = sf.layout_for(model)
    collect_to_store(tmp_path / "every", model, generic_loss, ta, tb, layout, CODEC, sf.ScoreConfig(), checkpoint_every=1)
    assert any(".partial." in p.name for p in written)  # (the watch sees checkpoints where they are written)
    written.clear()
    collect_to_store(tmp_path / "never", model, generic_loss, ta, tb, layout, CODEC, sf.ScoreConfig(), checkpoint_every=0)
    assert written and not any(".partial." in p.name for p in written)
    a, b = (sf.open_store(tmp_path / name).result() for name in ("every", "never"))
    assert torch.equal(a.head_means(), b.head_means())
    for bad in (-1, True, 1.5):
        with pytest.raises(sf.InputError, match="checkpoint_every"):
            collect_to_store(tmp_path / "bad", model, generic_loss, ta, tb, layout, CODEC, sf.ScoreConfig(),
                             checkpoint_every=bad)
    assert not (tmp_path / "bad").exists()


def test_no_checkpoint_needs_less_disk(small, tmp_path, monkeypatch):
    """Without checkpoints the disk check leaves out what they add; with a disk between the two sizes a
    checkpointed collection is refused before pass 1 and one without checkpoints goes ahead."""
    import shutil

    from sketchfisher.collect.disk import store_disk_bytes
    from sketchfisher.store import writer

    model, ta, tb = small
    args = (model, CODEC, 11, 6, ([(8, 8), (8, 8)], [(8, 8)]))  # (two fp64 statistics of A, one of B)
    with_ckpt, without = store_disk_bytes(*args), store_disk_bytes(*args, checkpoints=False)
    assert with_ckpt["pass1_checkpoint"] > 0 and without["pass1_checkpoint"] == 0
    assert without["total"] == with_ckpt["total"] - with_ckpt["pass1_checkpoint"]
    real = shutil.disk_usage
    planned = {}

    def usage(path):  # a disk with room for the store without its checkpoints only
        u = real(path)
        return u._replace(free=planned["free"])

    monkeypatch.setattr(writer.shutil, "disk_usage", usage)
    layout = sf.layout_for(model)
    run = lambda name, every: collect_to_store(tmp_path / name, model, generic_loss, ta, tb, layout, CODEC,  # noqa
                                               sf.ScoreConfig(), checkpoint_every=every, passes=2)
    monkeypatch.setattr(writer, "store_disk_bytes", lambda *a, **k: (planned.setdefault("plan", store_disk_bytes(*a, **k)),
                                                                    store_disk_bytes(*a, **k))[1])
    planned["free"] = 10**15
    run("probe", None)  # the plan of this collection, with checkpoints
    plan = planned.pop("plan")
    planned["free"] = plan["total"] - plan["pass1_checkpoint"] // 2
    with pytest.raises(sf.InputError, match="more on disk.*without pass-1 checkpoints .*--no-checkpoint.* which fits"):
        run("refused", None)
    assert not list((tmp_path / "refused").rglob("*.safetensors"))
    run("fits", 0)
    assert sf.open_store(tmp_path / "fits").result().head_means().isfinite().all()


def test_planner_matches_hand_computation():
    df = plan("llama-7b", samples=768, tokens=512, k=256, rank=16, sketch_dtype="fp16").set_index("codec")
    assert df.loc["design note: 50 matrices x 60 MB (fp16) x samples", "disk_bytes"] == pytest.approx(2.304e12)
    exact = 32 * 4 * 4096 * 4096 * 2 * 768
    assert df.loc["Exact: full fp16 per-sample attention gradients", "disk_bytes"] == exact
    assert df.loc["Sketch(k=256, fp16)", "disk_bytes"] == 32 * (2 * 32 + 2 * 32) * (256 * 2 + 4 + 16 + 4) * 768
    assert df.loc["Factors (lossless, fp32)", "disk_bytes"] == 512 * 32 * (4 * (4096 + 4096)) * 4 * 768
    assert df.loc["Factors(rank=16, fp32)", "disk_bytes"] == 16 * 32 * (4 * (4096 + 4096)) * 4 * 768
    # attention + MLP: the design note's matrices (32 MB attention, 88 MB MLP in fp16) and its reduced figure
    assert 4096 * 4096 * 2 / 2**20 == 32 and round(4096 * 11008 * 2 / 2**20) == 86
    assert df.loc["design note, reduced to heads/channels: 50 x 8 KB (fp16) x samples", "disk_bytes"] == 50 * 8192 * 768
    assert df.loc["Exact: full fp16 per-sample attention + MLP gradients", "disk_bytes"] == \
        32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2 * 768
    both, heads = (df.loc[f"Exact: full fp16 per-sample attention{x} gradients", "peak_device_bytes"]
                   for x in (" + MLP", ""))
    assert both > 2.5 * heads  # every unit family has a device figure; MLP weights are twice the attention's
    per_block = 256 * 2 + 4 + 16 + 4  # fp16 vector, its scale, ‖x̃‖² and cross (fp64), γ (fp32)
    assert df.loc["Sketch(k=256, fp16): heads + MLP units (344 channels each)", "disk_bytes"] == \
        32 * (4 * 32 + 3 * 32) * per_block * 768
    assert df.loc["Sketch(k=256, fp16): MLP single neurons", "disk_bytes"] == 32 * 3 * 11008 * per_block * 768
    assert plan("gpt2", samples=1, k=256, sketch_dtype="fp16").set_index("codec").loc["Sketch(k=256, fp16): MLP single neurons", "disk_bytes"] == \
        12 * 2 * 3072 * per_block  # GPT-2's MLP is not gated: c_fc and c_proj
    gqa = plan("llama-70b", samples=1, k=256, sketch_dtype="fp16").set_index("codec")
    assert gqa.loc["Sketch(k=256, fp16)", "disk_bytes"] == 80 * (2 * 64 + 2 * 8) * 536
    with pytest.raises(sf.InputError, match="unknown preset"):
        plan("gpt5")


@pytest.mark.parametrize("passes", [2, 1.5])
def test_a_store_opens_light(small, tmp_path, monkeypatch, passes):
    """Opening a store reads no statistics and prepares no block; scoring prepares each block it scores, once,
    and keeps only its centre product (and, for task B's single pass, B's sketched mean residual: k values a
    head); the scores are those of the collection."""
    import sketchfisher.interference.stored as stored

    model, ta, tb = small
    want = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, passes=passes, store=tmp_path / "s").top_conflicts(5)
    prepared = []
    real = stored.prepare
    monkeypatch.setattr(stored, "prepare", lambda layout, layer, block, *a, **k: prepared.append((layer, block)) or
                        real(layout, layer, block, *a, **k))
    store = sf.open_store(tmp_path / "s")
    res = store.result()
    assert (res.n_a, res.n_b) == (6, 5) and not prepared and "stats" not in store.__dict__
    top = res.top_conflicts(5)
    assert sorted(prepared) == sorted(store.layout.groups()) and "stats" in store.__dict__
    pd.testing.assert_frame_equal(top, want)
    res.head_means()
    assert len(prepared) == len(store.layout.groups())  # each block's centre product is computed once
    kept = res.context.source.e.cache.items()
    assert all(e.numel() == len(store.layout.head_blocks(*key)) for key, (e, _, _) in kept)
    for key, (_, _, residual) in kept:
        assert (residual is None) == (passes == 2)
        if residual is not None:
            assert residual[0].shape == (len(store.layout.head_blocks(*key)), CODEC.k)


def test_store_sizes_match_the_planner(small, tmp_path):
    model, ta, tb = small
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s", conflicts=False)
    summary = sf.open_store(tmp_path / "s").summary()
    layout = sf.layout_for(model)
    per_sample = layout.num_layers * (2 * 8 + 2 * 2) * (32 * 2 + 4 + 16 + 4)
    from sketchfisher.collect.disk import statistics_widths, store_disk_bytes
    from sketchfisher.collect.memory import Shape

    # A keeps its Fisher (the balance is a power of it), B its Σ|g| (its own mean, which the scores take away from
    # its sketches; it only centres, so it is written in bf16)
    widths = (statistics_widths(("fisher",), False, torch.float64), statistics_widths(("abs",), False, torch.float64))
    assert widths == ([(8, 8)], [(8, 2)])
    plan = store_disk_bytes(layout, CODEC, samples=11, batches=6, widths=widths)
    assert plan["sketches"] == per_sample * 11 <= summary["sketch_bytes"] <= plan["sketches"] + plan["shard_headers"]
    written = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert written <= plan["total"] - plan["pass1_checkpoint"]  # the plan is an upper bound of what is written
    unit = layout.num_layers * Shape.of(model).attn_params_per_layer * 8  # one model-sized fp64 statistic
    assert plan["pass1_checkpoint"] == max(2 * 1, 1 + 2 * 1) * unit - (unit + unit // 4)
    assert written >= 0.5 * (plan["total"] - plan["pass1_checkpoint"])  # and not a wild one
    stats_bytes = sum(p.stat().st_size for p in (tmp_path / "s" / "pass1").glob("*.safetensors"))
    assert unit + unit // 4 <= stats_bytes <= plan["statistics"]
    # with the conflict test (the default): A's Σg (bf16) and Σg over half its samples, B's Σg (bf16), and
    # each sample's conflict scalars in the shards
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "c")
    widths = (statistics_widths(("fisher", "sum", "half"), False, torch.float64),
              statistics_widths(("abs", "sum"), False, torch.float64))
    plan = store_disk_bytes(layout, CODEC, samples=11, batches=6, widths=widths, conflicts=True)
    written = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    stats_bytes = sum(p.stat().st_size for p in (tmp_path / "c" / "pass1").glob("*.safetensors"))
    assert 2 * unit + 3 * unit // 4 <= stats_bytes <= plan["statistics"]
    assert 0.5 * (plan["total"] - plan["pass1_checkpoint"]) <= written <= plan["total"] - plan["pass1_checkpoint"]


@pytest.mark.parametrize("units", ["heads", "mlp", "all"])
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_store_disk_plan_covers_every_unit_family(small, tmp_path, units, stats_dtype):
    """The writer's disk plan counts the statistics of every collected weight (MLP units' too) at the width each is
    kept in (fp32 statistics: the plain sums in bf16), so it bounds what is written, and tightly: a plan of the
    attention weights alone would let an MLP store run out of disk, a plan at full width would refuse stores that
    fit."""
    from sketchfisher.collect.disk import footprint, statistics_widths, store_disk_bytes
    from sketchfisher.collect.plan import pass_plan

    model, ta, tb = small
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s", units=units, stats_dtype=stats_dtype)
    layout = sf.units_layout(model, units)
    plan_steps = pass_plan(CODEC, sf.ScoreConfig(), None, means=layout.beyond_heads, conflicts=True)
    widths = tuple(statistics_widths(plan_steps.statistics[t], layout.beyond_heads, stats_dtype) for t in "ab")
    plan = store_disk_bytes(layout, CODEC, samples=11, batches=6, widths=widths, conflicts=True)
    written = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    stats = sum(p.stat().st_size for p in (tmp_path / "s" / "pass1").glob("*.safetensors"))
    assert 0.9 * plan["statistics"] <= stats <= plan["statistics"]
    assert 0.9 * (plan["total"] - plan["pass1_checkpoint"]) <= written <= plan["total"] - plan["pass1_checkpoint"]
    # the layout's footprint against the shape's plan for the same units
    sizes, entries, groups = footprint(layout)
    assert (sorted(sizes), entries, groups) == (sorted(footprint(model, units)[0]), *footprint(model, units)[1:])


def test_balance_and_centre_statistics_are_rounded_once_final(small, tmp_path):
    """FisherStats.compact rounds Σ|g| and Σg (never the Fisher); a store writes them rounded, except when MLP
    units read exact task means from them; in memory and from the store the scores agree bitwise."""
    from sketchfisher.fisher import FisherStats
    from sketchfisher.store.files import load_tensors

    g = torch.randn(6, 3, 5, dtype=torch.float64)
    stats = FisherStats(dtype=torch.float64, quantities=("fisher", "abs", "sum"))
    stats.update({"w": g})
    fisher = stats.fisher("w").clone()
    stats.compact(("abs", "sum"))
    assert stats.sum_abs["w"].dtype == stats.sum_g["w"].dtype == torch.bfloat16
    assert torch.equal(stats.fisher("w"), fisher) and stats.mean_abs("w").dtype == torch.float64
    torch.testing.assert_close(stats.mean_abs("w"), g.abs().mean(0), rtol=1e-2, atol=0)
    model, ta, tb = small
    mem = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, passes=2)
    stored = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, passes=2, store=tmp_path / "heads")
    torch.testing.assert_close(stored.scores, mem.scores, rtol=0, atol=0)
    for t in ("a", "b"):  # (two passes per task balance by both tasks' Σ|g|)
        tensors, _ = load_tensors(tmp_path / "heads" / "pass1" / f"{t}.safetensors")
        assert {str(v.dtype) for k, v in tensors.items() if k.endswith("::sum_abs")} == {"torch.bfloat16"}
        assert {str(v.dtype) for k, v in tensors.items() if k.endswith("::mean")} <= {"torch.float64"}
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "mlp", units="all")
    tensors, _ = load_tensors(tmp_path / "mlp" / "pass1" / "b.safetensors")
    assert {str(v.dtype) for k, v in tensors.items() if k.endswith("::sum_abs")} == {"torch.float64"}


def test_cli_end_to_end(tiny_bert_dir, tmp_path, capsys):
    from sketchfisher.cli import main

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"what is {i} plus {i + 1}?"}) for i in range(5)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    common = ["--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "a.jsonl"), "--task-b", str(tmp_path / "b.txt"),
              "--batch-size", "2"]
    assert main(["collect", *common, "--out", str(tmp_path / "store"), "--k", "16", "--quiet"]) == 0
    out = capsys.readouterr().out  # a short table in words, and what to run next
    assert re.search(r"task A +a\.jsonl: 5 samples", out) and re.search(r"task B +b\.txt: 4 samples", out)
    assert "masked tokens (inferred from the model folder's config)" in out and "Sketch(k=16, int4)" in out
    assert f"next: sketchfisher conflicts {tmp_path / 'store'}" in out
    assert main(["inspect", str(tmp_path / "store"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == {"a": 5, "b": 4}
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert "every file read and checked" in capsys.readouterr().out
    if importlib.util.find_spec("plotly") is not None:  # the interactive report, with the task files' texts
        assert main(["report", str(tmp_path / "store"), "-o", str(tmp_path / "report.html"), "--top", "3"]) == 0
        page = (tmp_path / "report.html").read_text()
        assert "id='pairs-heads'" in page and "what is 0 plus 1?" in page and "def f3(x): return x * 3" in page
    assert main(["interfere", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--top", "7"]) == 0
    assert {"top_conflicts.csv", "head_means.csv", "block_summary.csv", "heatmap.png"} <= \
        {p.name for p in (tmp_path / "out").iterdir()}
    top = pd.read_csv(tmp_path / "out" / "top_conflicts.csv")
    assert len(top) == 7
    means = pd.read_csv(tmp_path / "out" / "head_means.csv")
    assert list(means.columns) == ["layer", "head", "block", "mean_score", "stderr"] and (means.stderr >= 0).all()
    for fmt, name in (("parquet", "scores.parquet"), ("csv", "scores.csv.gz")):
        assert main(["interfere", str(tmp_path / "store"), "--out", str(tmp_path / fmt), "--all-scores",
                     "--scores-format", fmt]) == 0
        table = pd.read_parquet(tmp_path / fmt / name) if fmt == "parquet" else pd.read_csv(tmp_path / fmt / name)
        assert len(table) == 5 * 4 * 2 * 4 * 4 and {"score", "stderr", "sample_i"} <= set(table.columns)
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "pyarrow" else real(name, *a)
    try:  # without pyarrow: one line saying what to install, before any work
        assert main(["interfere", str(tmp_path / "store"), "--out", str(tmp_path / "x"), "--all-scores"]) == 1
    finally:
        importlib.util.find_spec = real
    assert "needs pyarrow" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # the store recorded the loss (inferred: a BERT encoder -> masked-token) and the task files with their hashes
    inputs = sf.open_store(tmp_path / "store").manifest["inputs"]
    assert inputs["loss"] == "mlm" and inputs["task_a"]["path"].endswith("a.jsonl")
    assert top["text_i"].iloc[0].startswith("what is") and top["text_j"].iloc[0].startswith("def f")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "store"), "--top", "5", "--budget", "20"]) == 0  # model, tasks from the store
    assert "held among 20 re-scored candidates" in capsys.readouterr().out
    assert (tmp_path / "store" / "verified.csv").exists()  # outputs go under the store, not the working directory
    assert main(["verify", str(tmp_path / "store"), *common, "--loss", "clm", "--top", "5"]) != 0  # not what was collected
    from sketchfisher.cli import _recompute_inputs, build_parser

    args = build_parser().parse_args(["verify", str(tmp_path / "store")])
    _recompute_inputs(args, sf.open_store(tmp_path / "store"))  # batch size and truncation as collect used them
    assert (args.batch_size, args.max_length, args.text_field) == (2, inputs["max_length"], "text")
    # the head-level answer from the store alone (no model): the conflict test of every head block
    capsys.readouterr()
    assert main(["conflicts", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "a (A, n=5) vs b (B, n=4)" in out and "head blocks in conflict at q <= 0.05" in out
    conflicts = pd.read_csv(tmp_path / "store" / "conflicts" / "head_conflicts.csv")
    want = sf.open_store(tmp_path / "store").result().head_conflicts()
    pd.testing.assert_series_equal(conflicts.alignment, want.alignment, atol=1e-6, rtol=1e-5)
    assert set(conflicts.columns) >= {"layer", "head", "block", "alignment", "alignment_low", "p_value", "q_value"}
    assert conflicts.alignment.between(-1, 1).all() and (tmp_path / "store" / "conflicts" / "conflicts.png").exists()
    (tmp_path / "b.txt").write_text("def changed(): pass\n" * 4)  # a task file edited after collect
    assert main(["verify", str(tmp_path / "store"), "--top", "5"]) == 1
    assert "changed since collect" in capsys.readouterr().err
    assert main(["interfere", str(tmp_path / "store"), "--out", str(tmp_path / "out2")]) == 0
    assert "changed since collect" in capsys.readouterr().err
    assert main(["plan", "--preset", "gpt2", "--samples", "10"]) == 0
    # a different seed on an existing store: one-line error, exit 1
    assert main(["collect", *common, "--out", str(tmp_path / "store"), "--k", "16", "--seed", "1", "--quiet"]) == 1
    assert "written with different settings" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--model", "x"])
    assert exc.value.code == 2


def test_settings_without_a_meaningful_result_are_refused(tiny_bert_dir, tmp_path, capsys):
    from sketchfisher.cli import main
    from sketchfisher.tasks import clm_batches
    from sketchfisher.demo import load_minilm

    (tmp_path / "a.txt").write_text("what is one plus two\nthree times four\n")
    common = ["--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "a.txt"), "--task-b", str(tmp_path / "a.txt"),
              "--k", "8"]
    assert main(["collect", *common, "--out", str(tmp_path / "s1"), "--max-length", "2", "--quiet"]) == 1
    assert "nothing to mask" in capsys.readouterr().err  # [CLS] [SEP] only: every gradient would be 0
    assert main(["collect", *common, "--out", str(tmp_path / "s2"), "--max-length", "100000", "--quiet"]) == 1
    assert "beyond the 512 positions" in capsys.readouterr().err
    assert main(["collect", "--model", str(tmp_path / "absent"), "--task-a", "x", "--task-b", "y", "--out",
                 str(tmp_path / "s3"), "--passes", "1.5", "--normalizer", "pooled", "--quiet"]) == 1
    assert "passes=1.5 (task B once) needs normalizer='a'" in capsys.readouterr().err  # before loading anything
    _, tok = load_minilm()
    def one_token_each(texts, **_):  # a tokenizer that keeps one token per text (no special tokens)
        n = len(texts)
        return {"input_ids": torch.ones(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long)}

    with pytest.raises(sf.InputError, match=r"samples \[0, 1\]: fewer than 2 tokens"):
        clm_batches(["fine text", "more"], one_token_each, max_length=1)
    tok.mask_token = None
    with pytest.raises(sf.InputError, match="has no mask token"):
        sf.tasks.make_batches(["x y"], tok)


def test_cli_subprocess_exit_codes(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "sketchfisher", *a], capture_output=True, text=True)  # noqa
    ok = run("--help")
    assert ok.returncode == 0 and "collect" in ok.stdout
    bad = run("inspect", str(tmp_path))
    assert bad.returncode == 1 and bad.stderr.startswith("sketchfisher: error:") and bad.stderr.count("\n") == 1
    assert run("nonsense").returncode == 2



def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """What schedulers send: a message, the store's lock released, exit 143."""
    code = ("import pathlib, sys, time\n"
            "import sketchfisher.cli.parser as P\n"
            "from sketchfisher.store.files import StoreLock\n"
            "def slow(args):\n"
            "    pathlib.Path(args.out).mkdir()\n"
            "    with StoreLock(pathlib.Path(args.out)):\n"
            "        print('started', flush=True); time.sleep(60)\n"
            "P._collect = slow\n"
            "sys.exit(P.main(['collect', '--model', 'm', '--task-a', 'a', '--task-b', 'b', '--out', sys.argv[1]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"started"
    assert (tmp_path / "s" / "lock.json").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and b"terminated (SIGTERM" in err
    assert not (tmp_path / "s" / "lock.json").exists()


def test_store_files_honour_the_umask(small, tmp_path, monkeypatch):
    from sketchfisher.store import files

    old = os.umask(0o027)
    try:
        assert files._umask() == 0o027
    finally:
        os.umask(old)
    model, ta, tb = small
    monkeypatch.setattr(files, "FILE_MODE", 0o666 & ~0o027)
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=tmp_path / "s")
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "s").rglob("*.safetensors")}
    assert modes == {oct(0o640)}


def test_cli_mlp_units_beside_heads(tiny_bert_dir, tmp_path, capsys):
    """collect --units all: interfere writes the MLP channel-group files beside the head files; conflicts
    recomputes both families' alignment from the store's layout."""
    from sketchfisher.cli import main

    (tmp_path / "a.txt").write_text("\n".join(f"what is {i} plus {i + 1}?" for i in range(5)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    common = ["--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "a.txt"), "--task-b", str(tmp_path / "b.txt"),
              "--batch-size", "2"]
    assert main(["collect", *common, "--out", str(tmp_path / "store"), "--k", "16", "--units", "all",
                 "--mlp-group-size", "12", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["interfere", str(tmp_path / "store"), "--out", str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"head_means.csv", "heatmap.png", "mlp_means.csv", "mlp_heatmap.png", "mlp_top_conflicts.csv"} <= names
    means = pd.read_csv(tmp_path / "out" / "mlp_means.csv")
    assert list(means.columns) == ["layer", "unit", "block", "mean_score", "stderr"]
    assert len(means) == 2 * (48 // 12) * 2 and set(means.block) == {"UP", "DOWN"}
    assert main(["conflicts", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "MLP channel-group blocks in conflict at q <= 0.05" in out
    conflicts = pd.read_csv(tmp_path / "store" / "conflicts" / "mlp_conflicts.csv")
    assert len(conflicts) == 2 * 4 * 2 and "unit" in conflicts.columns
    # every other linear layer (here BERT's pooler) as output-channel groups
    assert main(["collect", *common, "--out", str(tmp_path / "store2"), "--k", "16", "--units", "heads,linear",
                 "--quiet"]) == 0
    assert main(["interfere", str(tmp_path / "store2"), "--out", str(tmp_path / "out2"), "--no-plot"]) == 0
    assert {"head_means.csv", "linear_pooler.dense_means.csv"} <= {p.name for p in (tmp_path / "out2").iterdir()}
    with pytest.raises(SystemExit):
        main(["collect", *common, "--out", str(tmp_path / "x"), "--units", "heads,neurons"])


@pytest.fixture(scope="module")
def cli_store(tiny_bert_dir, tmp_path_factory):
    """A complete store collected by the CLI (tasks of 5 and 4 samples, batch size 2)."""
    from sketchfisher.cli import main

    d = tmp_path_factory.mktemp("cli_store")
    (d / "a.txt").write_text("\n".join(f"what is {i} plus {i + 1}?" for i in range(5)))
    (d / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    assert main(["collect", "--model", str(tiny_bert_dir), "--task-a", str(d / "a.txt"), "--task-b", str(d / "b.txt"),
                 "--batch-size", "2", "--out", str(d / "store"), "--k", "16", "--quiet", "--no-checkpoint"]) == 0
    return d / "store"  # (--no-checkpoint: the same store; the flag's plumbing runs here)


def _edited_copy(store, tmp_path, edit):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    edit(copy)
    return copy


def _manifest_edit(change):
    def edit(root):
        m = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps(change(m)))
    return edit


ONE_LINE_CASES = {
    "manifest is a list": _manifest_edit(lambda m: [m]),
    "manifest lacks the layout": _manifest_edit(lambda m: {k: v for k, v in m.items() if k != "layout"}),
    "manifest has an extra codec key": _manifest_edit(lambda m: {**m, "codec": {**m["codec"], "extra": 1}}),
    "manifest's dims edited": _manifest_edit(lambda m: {**m, "layout": {**m["layout"], "num_heads": 3}}),
    "a stray shard name": lambda root: (root / "pass2" / "a" / "evil.safetensors").write_bytes(b"junk"),
}


@pytest.mark.parametrize("case", sorted(ONE_LINE_CASES))
def test_damaged_stores_give_one_line_errors(cli_store, tmp_path, capsys, case):
    from sketchfisher.cli import main

    root = _edited_copy(cli_store, tmp_path, ONE_LINE_CASES[case])
    capsys.readouterr()
    for command in (["inspect", str(root)], ["interfere", str(root), "--out", str(tmp_path / "o"), "--no-plot"]):
        assert main(command) == 1, (case, command)
        err = capsys.readouterr().err
        assert err.startswith("sketchfisher: error:") and err.count("\n") == 1 and "Traceback" not in err, (case, err)


def _flip_data_byte(path, at=0.5):
    """Flip one byte inside a safetensors file's tensor data (not its header)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    pos = start + int((len(raw) - start) * at)
    raw[pos] ^= 0x5A
    path.write_bytes(bytes(raw))


def _other_store(tmp_path, cli_store):
    """The same collection again: another store id, otherwise the same files."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(cli_store, other)
    m = json.loads((other / "manifest.json").read_text())
    from sketchfisher.store.manifest import seal
    from sketchfisher.store.files import load_tensors
    from safetensors.torch import save_file

    for path in [*(other / "pass2").rglob("*.safetensors"), *(other / "pass1").glob("*.safetensors")]:
        tensors, meta = load_tensors(path)
        save_file(tensors, str(path), metadata={**meta, "store_id": "f" * 32})
    (other / "manifest.json").write_text(json.dumps(seal({**m, "store_id": "f" * 32})))
    return other


def _swap(a, b):
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _symlink_outside(root, tmp_path):
    import shutil

    outside = tmp_path / "outside.safetensors"
    shard = root / "pass2" / "a" / "0000001.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)


INTEGRITY_CASES = {
    "shard duplicated under the next number": lambda r, t, s: __import__("shutil").copy(
        r / "pass2" / "a" / "0000002.safetensors", r / "pass2" / "a" / "0000003.safetensors"),
    "flipped byte in a shard's data": lambda r, t, s: _flip_data_byte(r / "pass2" / "a" / "0000001.safetensors"),
    "flipped byte in the pass-1 statistics": lambda r, t, s: _flip_data_byte(r / "pass1" / "a.safetensors", 0.3),
    "last shard deleted": lambda r, t, s: (r / "pass2" / "b" / "0000001.safetensors").unlink(),
    "two shards swapped": lambda r, t, s: _swap(r / "pass2" / "a" / "0000000.safetensors",
                                                r / "pass2" / "a" / "0000001.safetensors"),
    "shard copied from task B": lambda r, t, s: __import__("shutil").copy(
        r / "pass2" / "b" / "0000000.safetensors", r / "pass2" / "a" / "0000000.safetensors"),
    "shard from another store": lambda r, t, s: __import__("shutil").copy(
        _other_store(t, s) / "pass2" / "a" / "0000000.safetensors", r / "pass2" / "a" / "0000000.safetensors"),
    "statistics from another store": lambda r, t, s: __import__("shutil").copy(
        _other_store(t, s) / "pass1" / "a.safetensors", r / "pass1" / "a.safetensors"),
    "shard symlinked outside the store": lambda r, t, s: _symlink_outside(r, t),
    "manifest's k edited": lambda r, t, s: _manifest_edit(lambda m: {**m, "codec": {**m["codec"], "k": 8}})(r),
}


@pytest.mark.parametrize("case", sorted(INTEGRITY_CASES))
def test_a_store_that_was_tampered_with_is_refused(cli_store, tmp_path, capsys, case):
    """Each defect is refused with a message naming the file and the check, by interfere and by inspect."""
    from sketchfisher.cli import main

    root = _edited_copy(cli_store, tmp_path, lambda r: INTEGRITY_CASES[case](r, tmp_path, cli_store))
    capsys.readouterr()
    assert main(["interfere", str(root), "--out", str(tmp_path / "o"), "--no-plot"]) == 1, case
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(root) in err, (case, err)
    assert main(["inspect", str(root)]) == 1, case  # inspect verifies every digest by default


def test_inspect_verifies_a_sound_store(cli_store, capsys):
    from sketchfisher.cli import main

    assert main(["inspect", str(cli_store), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["verified_files"] == 2 + 3 + 2
    assert sf.open_store(cli_store).verify() == 7


def test_cli_errors_are_one_line_with_a_debug_switch(cli_store, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    from sketchfisher.cli import main

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    args = ["collect", "--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "latin1.txt"), "--task-b",
            str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "s"), "--quiet"]
    capsys.readouterr()
    assert main(args) == 1 and "cannot read task file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args[:-3], "--out", str(tmp_path / "s"), "--device", "cuda:0"]) == 1
        assert capsys.readouterr().err.count("\n") == 1
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["interfere", str(cli_store), "--out", str(tmp_path / "o")]) == 1  # before any work
    assert "pip install 'sketchfisher[plots]'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(sf.Store, "summary", lambda self: {}["boom"])  # an unexpected failure
    assert main(["inspect", str(cli_store)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["inspect", str(cli_store), "--debug"])


def test_cleanup_never_touches_user_files(small, tmp_path):
    """Only the store's own temporary names in its own folders are removed on restart."""
    from sketchfisher.store.files import remove_stale_temps

    model, ta, tb = small
    root = tmp_path / "d"
    (root / "p" / "sub").mkdir(parents=True)
    (root / "p" / "sub" / "notes.tmp").write_text("mine")
    (root / "pass1").mkdir()
    (root / "pass1" / "notes.tmp").write_text("mine too")
    (root / "pass1" / "a.safetensors.123.sketchfisher-tmp").write_text("half-written")
    assert remove_stale_temps(root) == 1
    collect_to_store(root, model, generic_loss, ta, tb, sf.layout_for(model), CODEC, sf.ScoreConfig())
    assert (root / "p" / "sub" / "notes.tmp").read_text() == "mine"
    assert (root / "pass1" / "notes.tmp").read_text() == "mine too"


def test_model_identity_is_content_not_path(tiny_bert_dir, tmp_path):
    """The same weights under another path are the same model; other weights at the same path are not."""
    import shutil

    import transformers as hf
    from sketchfisher.store.manifest import model_fingerprint

    moved = tmp_path / "moved"
    shutil.copytree(tiny_bert_dir, moved)
    load = lambda d: hf.BertModel.from_pretrained(str(d))  # noqa: E731
    a, b = load(tiny_bert_dir), load(moved)
    assert model_fingerprint(a, sf.layout_for(a)) == model_fingerprint(b, sf.layout_for(b))
    with torch.no_grad():
        b.embeddings.word_embeddings.weight.mul_(1.01)  # perturbed embeddings, nothing else
    assert model_fingerprint(a, sf.layout_for(a))["weights_sha256"] != model_fingerprint(b, sf.layout_for(b))["weights_sha256"]
    bigger = hf.BertModel(hf.BertConfig(**{**a.config.to_dict(), "intermediate_size": 3 * a.config.intermediate_size}))
    assert model_fingerprint(bigger, sf.layout_for(bigger))["config_sha256"] != model_fingerprint(a, sf.layout_for(a))["config_sha256"]


def test_one_writer_at_a_time_and_a_stale_lock_is_taken_over(small, tmp_path):
    import socket

    model, ta, tb = small
    root = tmp_path / "s"
    root.mkdir()
    holds = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
             "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    sleeper = subprocess.Popen([sys.executable, "-c", holds, str(root / ".lock")], stdout=subprocess.PIPE)
    try:  # a live writer: refused, naming it
        assert sleeper.stdout.readline().strip() == b"held"
        (root / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "t"}))
        with pytest.raises(sf.StoreError, match=f"being written by pid {sleeper.pid} on this host"):
            sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=root)
    finally:
        sleeper.kill()
        sleeper.wait()
    res = sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=root)  # its process is gone: taken over
    assert res.n_a == 6 and not (root / "lock.json").exists()  # released at the end
    (root / "lock.json").write_text("")  # what a full disk left in an earlier version: taken over, not refused
    sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=root)
    (root / "lock.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(sf.StoreError, match="host 'elsewhere'.*delete"):
        sf.analyze(model, generic_loss, ta, tb, codec=CODEC, store=root)


def test_a_full_disk_leaves_no_lock(tmp_path, monkeypatch):
    from sketchfisher.store.files import StoreLock

    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith("lock.json"):
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(sf.StoreError, match="No space left"):
        with StoreLock(tmp_path):
            pass
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    with StoreLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_taking_over_a_stale_lock_is_one_writer_at_a_time(tmp_path):
    """Several processes find the same stale lock at once: their held intervals never overlap."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "t"}))
    go = tmp_path / "go"
    code = ("import sys, time, pathlib; from sketchfisher.store.files import StoreLock, StoreError\n"
            "root, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
            "while not go.exists(): time.sleep(0.001)\n"
            "try:\n"
            "    with StoreLock(root):\n"
            "        start = time.time(); time.sleep(0.3); print('held', start, time.time())\n"
            "except StoreError: print('refused')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(go)], stdout=subprocess.PIPE, env=env)
             for _ in range(6)]
    time.sleep(1.5)  # every process imported and waiting
    go.touch()
    outs = [p.communicate(timeout=60)[0].decode().split() for p in procs]
    held = sorted((float(o[1]), float(o[2])) for o in outs if o[0] == "held")
    assert held and all(o[0] in ("held", "refused") for o in outs)
    assert all(end <= start for (_, end), (start, _) in zip(held, held[1:])), held


def test_fingerprint_samples_stay_inside_large_parameters():
    """Past 2^24 entries a float32 linspace rounds its last index up, out of the tensor (seen on a GPU with a
    32000 x 4096 embedding); the samples are integer-spaced and include the last entry."""
    from sketchfisher.store.manifest import model_fingerprint

    model = torch.nn.Module()
    model.big = torch.nn.Parameter(torch.zeros(2 ** 24 + 2))  # last index 2^24 + 1: not a float32
    before = model_fingerprint(model, sf.Layout("x", sf.Dims(1, 1, 1, 1, 1), {}, ()))
    with torch.no_grad():
        model.big[-1] = 1.0  # the last entry is sampled
    assert model_fingerprint(model, sf.Layout("x", sf.Dims(1, 1, 1, 1, 1), {}, ()))["weights_sha256"] != \
        before["weights_sha256"]


def test_verify_reads_the_precision_the_store_was_collected_in(tiny_bert_dir, tmp_path, capsys):
    """A store collected with --dtype bf16 is verified without repeating it (the store records its dtype)."""
    from sketchfisher.cli import main

    (tmp_path / "a.txt").write_text("\n".join(f"what is {i} plus {i + 1}?" for i in range(4)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    assert main(["collect", "--model", str(tiny_bert_dir), "--task-a", str(tmp_path / "a.txt"), "--task-b",
                 str(tmp_path / "b.txt"), "--batch-size", "2", "--out", str(tmp_path / "s"), "--k", "16", "--dtype",
                 "bf16", "--quiet"]) == 0
    assert sf.open_store(tmp_path / "s").manifest["inputs"]["dtype"] == "bf16"
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "s"), "--top", "3", "--budget", "6"]) == 0
    assert "held among 6 re-scored candidates" in capsys.readouterr().out


@pytest.mark.parametrize("passes", [1.5, 2])
def test_fp32_statistics_store_equals_in_memory(small, tmp_path, passes):
    """With fp32 statistics (the GPU setting: Σ|g| accumulated in bf16 with stochastic rounding, the balance and
    centres in one byte, task B's single pass without w_a) a store gives the in-memory numbers bitwise, also when
    reopened without the model, and its statistics record how Σ|g| was accumulated."""
    model, ta, tb = small
    kw = dict(codec=CODEC, stats_dtype=torch.float32, passes=passes)
    mem = sf.analyze(model, generic_loss, ta, tb, **kw)
    stored = sf.analyze(model, generic_loss, ta, tb, store=tmp_path / "s", **kw)
    torch.testing.assert_close(stored.scores, mem.scores, rtol=0, atol=0)
    torch.testing.assert_close(stored.stderr, mem.stderr, rtol=0, atol=0)
    reopened = sf.open_store(tmp_path / "s")
    torch.testing.assert_close(reopened.result().scores, mem.scores, rtol=0, atol=0)
    assert reopened.stats["b"].abs_dtype == torch.bfloat16
    assert reopened.stats["b"].sum_abs[reopened.stats["b"].names()[0]].dtype == torch.bfloat16
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
    assert float((mem.scores - exact.scores).abs().max()) <= 4 * float(mem.stderr.max())
