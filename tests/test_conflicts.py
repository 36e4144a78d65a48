"""The conflict test (``res.head_conflicts()``): what T means, that its p-values are calibrated on planted
nulls, that it finds planted conflicts and not planted agreement, and that every codec, pass order and store
gives the same table.

Planted draws re-use one collection's exact per-sample gradients: task B's gradients multiplied by per-sample
factors s_j are task B with its losses multiplied by s_j (random signs: the true T is 0; 0.5: B agrees with
A at half the loss scale; −1: B is A's distribution with its loss negated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sketchfisher as sf
from tiny_models import generic_loss, make_batches, make_model, planted


@pytest.fixture(scope="module")
def same_distribution():
    """Three collections of 64 + 64 samples of one distribution (task B: other samples of task A's)."""
    model = make_model("llama_gqa")
    return [sf.analyze(model, generic_loss, make_batches(64, 16, seed=10 + s), make_batches(64, 16, seed=20 + s),
                       codec=sf.Exact()) for s in range(3)]


def test_null_p_values_are_calibrated(same_distribution):
    """True T = 0 (B's losses with random signs), 3 × 40 draws: the fraction of p < 0.05 averages 0.03–0.07;
    under this complete null a draw with any flagged block is a family-wise error, which Benjamini–Hochberg
    keeps near 5% of draws (a draw's blocks share its noise, so when one is flagged several often are)."""
    fractions, any_flagged = [], []
    for s, res in enumerate(same_distribution):
        g = torch.Generator().manual_seed(s)
        for _ in range(40):
            table = planted(res, torch.randint(0, 2, (res.n_b,), generator=g).double() * 2 - 1).head_conflicts()
            fractions.append(float((table.p_value < 0.05).mean()))
            any_flagged.append(bool(table.conflict.any()))
    assert 0.03 <= np.mean(fractions) <= 0.07
    assert np.mean(any_flagged) <= 0.10


def test_planted_agreement_and_conflict(same_distribution):
    """B = A's distribution: at half the loss scale no block is flagged; negated, ≥ 90% are; with 75% of B's
    samples negated (T = −0.5 × the agreeing T), ≥ 75% are."""
    for res in same_distribution:
        n = res.n_b
        assert not planted(res, torch.full((n,), 0.5, dtype=torch.float64)).head_conflicts().conflict.any()
        negated = planted(res, -torch.ones(n, dtype=torch.float64)).head_conflicts()
        assert negated.conflict.mean() >= 0.9 and (negated.alignment < 0).all()
        mostly = torch.where(torch.arange(n) < 3 * n // 4, -1.0, 1.0).double()
        assert planted(res, mostly).head_conflicts().conflict.mean() >= 0.75


def test_T_is_minus_the_first_order_change_of_B_loss():
    """A Fisher-preconditioned step on task A restricted to one head block, θ ← θ − η (Î+ε)⁻¹ ḡ_A, changes
    task B's mean loss by −η T + O(η²): the meaning of T < 0 (training on A raises B's loss)."""
    model = make_model("gpt2").double()
    ta, tb = make_batches(8, 4, seed=1), make_batches(8, 4, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), dtype=torch.float64)
    table = res.head_conflicts()
    layout, ctx = res.layout, res.context

    def loss_b() -> float:
        with torch.no_grad():
            return float(torch.cat([generic_loss(model, b) for b in tb]).mean())

    base = loss_b()
    for row in table.iloc[[0, len(table) // 2, -1]].to_dict("records"):
        hb = layout.head_block(row["layer"], row["block"], row["head"])
        param = model.get_parameter(hb.param_name)
        grad_a = ctx.rep_a.full(hb.param_name).double().mean(0)
        fisher = ctx.stats_a.fisher(hb.param_name).double()
        step = torch.zeros_like(param)
        mask = torch.zeros_like(param, dtype=torch.bool)
        hb.select(mask).fill_(True)
        step[mask] = (grad_a / (fisher + 1e-10))[mask]
        eta = 1e-4 / max(float(step.abs().max()), 1e-30)
        with torch.no_grad():
            param -= eta * step
            change = loss_b() - base
            param += eta * step
        assert change == pytest.approx(-eta * row["T"], rel=0.02, abs=1e-9 * abs(base))


@pytest.mark.parametrize("units", ["heads", "all"])
def test_every_codec_order_and_store_gives_the_same_table(units, tmp_path):
    """Sketch codecs record each sample's conflict scalars exactly: the table of Exact, Factors, Sketch in both
    pass orders and a store agree (the sketches' task means are rounded to bf16 for heads: ~1e-3), and so does a
    collection with fp32 statistics, whose Σg accumulate in bf16. T and alignment come from the exact means; the
    standard error from conflict weights kept in one byte (a relative rounding up to 2⁻⁴ per entry: ~1e-2 here,
    where a standard error's own sampling error is ~10%)."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(9, 3, seed=1), make_batches(8, 4, seed=2)
    key = ["layer", "unit" if units == "mlp" else "head", "block"]
    want = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), units=units)
    tables = {"factors": sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units=units)}
    for passes in (2, 1.5):
        tables[f"sketch {passes}"] = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), passes=passes,
                                                units=units)
    tables["store"] = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), units=units, store=tmp_path / "s")
    # the GPU setting: fp32 statistics, Σg and the half sum in stochastically rounded bf16 accumulators
    tables["fp32 statistics"] = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), units=units,
                                           stats_dtype=torch.float32)
    for family in want.families:
        ref = want.units(family).head_conflicts().set_index(key[:1] + [want.units(family).layout.unit_column, "block"])
        for name, res in tables.items():
            got = res.units(family).head_conflicts().set_index(ref.index.names).loc[ref.index]
            for column, tol in (("T", 5e-3), ("alignment", 5e-3), ("stderr", 3e-2), ("p_value", 3e-2)):
                np.testing.assert_allclose(got[column], ref[column], rtol=tol, atol=tol * ref[column].abs().max(),
                                           err_msg=f"{family} {name} {column}")


def test_a_collection_without_the_test_says_so(tmp_path):
    model = make_model("gpt2")
    ta, tb = make_batches(4, 2, seed=1), make_batches(4, 2, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), conflicts=False)
    with pytest.raises(sf.InputError, match="conflicts=True"):
        res.head_conflicts()
    with pytest.raises(sf.InputError, match="at least 4 task-A"):
        sf.analyze(model, generic_loss, ta[:1], tb, codec=sf.Factors()).head_conflicts()


def test_by_default_the_test_is_left_out_only_when_it_alone_does_not_fit(monkeypatch, caplog, tmp_path):
    """conflicts=None (the default): when only the conflict test's statistics keep a collection from fitting the
    device, it runs without them and says so; conflicts=True refuses; a store records which it did."""
    import sketchfisher.collect.runner as runner

    def device(model, plan, *args):  # a device on which only the plan without the test fits
        if plan.conflicts:
            raise sf.InputError("this collection needs about 81 GiB on a device in pass B. What would fit: without "
                                "the conflict test's statistics (conflicts=False, --no-conflicts); batch size 1")

    monkeypatch.setattr(runner, "check_plan_fits", device)
    model = make_model("gpt2")
    ta, tb = make_batches(4, 2, seed=1), make_batches(4, 2, seed=2)
    with caplog.at_level("WARNING"):
        res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8))
    assert "without the conflict test's statistics" in caplog.text and "81 GiB" in caplog.text
    assert "With the test, what would fit: batch size 1" in caplog.text  # (the other settings, not this one)
    with pytest.raises(sf.InputError, match="conflicts=True"):
        res.head_conflicts()
    with pytest.raises(sf.InputError, match="81 GiB"):
        sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), conflicts=True)
    sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8), store=tmp_path / "s")
    assert sf.open_store(tmp_path / "s").manifest["conflicts"] is False


@pytest.mark.parametrize("codec", [sf.Exact(), sf.Sketch(k=16, kind="sjlt", seed=0)])
def test_a_frozen_block_keeps_its_rows_with_missing_numbers(codec):
    """As everywhere else, data that was not collected is NaN, not absent: a frozen projection's blocks keep
    their rows (never flagged, outside the BH family)."""
    model = make_model("llama_gqa")
    model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    res = sf.analyze(model, generic_loss, make_batches(8, 4, seed=1), make_batches(6, 3, seed=2), codec=codec)
    table = res.head_conflicts()
    layout = res.layout
    assert len(table) == sum(len(layout.head_blocks(layer, b)) for layer in range(layout.num_layers)
                             for b in layout.block_names)
    frozen = table[(table.layer == 0) & (table.block == "Q")]
    assert len(frozen) == layout.num_heads and frozen[["T", "p_value", "q_value"]].isna().all().all()
    assert not frozen.conflict.any() and table.drop(frozen.index)["q_value"].notna().all()


@pytest.mark.parametrize("size", [4096 * 3, 3001, 524288 + 7])
def test_moments_from_fp32_means_are_the_fp64_sums(size):
    """T and the two norms from fp32 means (a GPU's statistics) are fp32 products summed in chunks whose sums are
    added in fp64: within 10⁻⁶ of Σ|terms| of the all-fp64 sums, including blocks whose terms nearly cancel and block
    sizes that do not divide into chunks."""
    from sketchfisher.compress.sketch_scores import conflict_moments, over_denominator

    g = torch.Generator().manual_seed(size)
    ma, mb = torch.randn(3, size, generator=g), torch.randn(3, size, generator=g)
    mb[1] = -ma[1] + 1e-3 * mb[1]  # T of row 1: nearly all cancels
    denom = torch.rand(3, size, generator=g, dtype=torch.float64) * 10 + 0.1
    weighted = {t: over_denominator([m], denom)[0] for t, m in (("a", ma), ("b", mb))}
    assert weighted["a"].dtype == torch.float32
    got = conflict_moments({"a": ma, "b": mb}, weighted)
    a64, b64, w = ma.double(), mb.double(), 1 / denom
    for name, terms in {"aa": a64 * a64 * w, "bb": b64 * b64 * w, "ab": a64 * b64 * w}.items():
        assert got[name].dtype == torch.float64
        assert bool(((got[name] - terms.sum(-1)).abs() <= 1e-6 * terms.abs().sum(-1)).all()), name
    # a moment known already is kept; B's side alone (after task B's single pass) gives bb and T from A's mean
    later = conflict_moments({"a": ma, "b": mb}, {"b": weighted["b"]}, {"aa": got["aa"]})
    assert later["aa"] is got["aa"] and torch.allclose(later["ab"], got["ab"], rtol=1e-6, atol=1e-6)
