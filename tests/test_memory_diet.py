"""Pass-1 statistics keep only what the settings need, and that changes no number.

The paper variant with normaliser "a" never needs task B's Fisher, any M2 or Σg; the statistics
a collection keeps are decided by :func:`needed_statistics`, and the preparations built from them are
bitwise those built from the full statistics. Preparations are built parameter by parameter with
the statistics moved to host memory as soon as they are consumed (a no-op on the CPU).
"""

from __future__ import annotations

import pytest
import torch

import sketchfisher as sf
from sketchfisher.collect import collect, needed_statistics, prepare_all
from sketchfisher.fisher import QUANTITIES, FisherStats
from tiny_models import generic_loss, make_batches, make_model

SETTINGS = [(v, n) for v in ("paper", "signed", "symmetric") for n in ("a", "pooled", "loo")]


@pytest.mark.parametrize("variant,normalizer", SETTINGS)
@pytest.mark.parametrize("vr", [True, False])
def test_needed_statistics_table(variant, normalizer, vr):
    needs = needed_statistics(sf.ScoreConfig(variant=variant, normalizer=normalizer),
                              sf.Sketch(k=8, variance_reduction=vr))
    i_mean = {"paper": "fisher", "signed": "sum", "symmetric": "abs"}[variant]
    j_mean = {"paper": "abs", "signed": "sum", "symmetric": "abs"}[variant]
    want_a = {"fisher"} | ({"abs", i_mean} if vr else set())
    want_b = ({"fisher"} if normalizer == "pooled" else set()) | ({"abs", j_mean} if vr else set())
    assert set(needs["a"]) == want_a and set(needs["b"]) == want_b
    assert "m2" not in needs["a"] + needs["b"]
    exact = needed_statistics(sf.ScoreConfig(variant=variant, normalizer=normalizer), sf.Factors())
    assert exact == {"a": ("fisher",), "b": ("fisher",) if normalizer == "pooled" else ()}


@pytest.fixture(scope="module")
def llama():
    return make_model("llama_gqa"), make_batches(6, 3, seed=1), make_batches(5, 2, seed=2)


@pytest.mark.parametrize("variant,normalizer", SETTINGS)
def test_preparations_from_needed_statistics_equal_those_from_all(llama, variant, normalizer):
    model, ta, tb = llama
    layout, codec = sf.layout_for(model), sf.Sketch(k=8)
    cfg = sf.ScoreConfig(variant=variant, normalizer=normalizer)
    needs = needed_statistics(cfg, codec)
    full = [collect(model, generic_loss, t, layout, codec)[1] for t in (ta, tb)]
    slim = [collect(model, generic_loss, t, layout, codec, quantities=needs[k])[1] for t, k in ((ta, "a"), (tb, "b"))]
    assert slim[1].nbytes() < full[1].nbytes() and slim[0].nbytes() < full[0].nbytes()
    p_full, p_slim = prepare_all(layout, *full, cfg, codec), prepare_all(layout, *slim, cfg, codec, offload=True)
    for key, want in p_full.items():
        got = p_slim[key]
        for field in ("w_a", "w_b", "x_bar", "y_bar", "e"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), (key, field)


def test_analyze_keeps_only_the_needed_statistics(llama):
    model, ta, tb = llama
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=8))
    assert res.context.stats_a.quantities == ("fisher", "abs")
    assert res.context.stats_b.quantities == ("abs",)
    with pytest.raises(sf.InputError, match="was not collected"):
        res.context.stats_b.fisher(res.layout.param_of(0, "Q"))


def test_subset_statistics_round_trip_and_merge():
    g = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    full, slim = FisherStats(), FisherStats(quantities=("abs", "fisher"))
    for part in (g[:2], g[2:]):
        full.update({"w": part})
        slim.update({"w": part})
    assert slim.quantities == ("fisher", "abs")  # canonical order
    assert torch.equal(slim.fisher("w"), full.fisher("w")) and torch.equal(slim.mean_abs("w"), full.mean_abs("w"))
    back = FisherStats.from_tensors(*slim.to_tensors())
    assert back.quantities == slim.quantities and torch.equal(back.fisher("w"), slim.fisher("w"))
    merged = full.merge(slim)
    assert merged.quantities == ("fisher", "abs") and merged.count == 10
    with pytest.raises(sf.InputError, match="'m2' statistic needs 'fisher'"):
        FisherStats(quantities=("m2",))
    with pytest.raises(sf.InputError, match="unknown statistics"):
        FisherStats(quantities=("median",))
    counts_only = FisherStats(quantities=())
    counts_only.update({"w": g})
    assert counts_only.count == 5 and counts_only.nbytes() == 0
    assert QUANTITIES == ("fisher", "m2", "abs", "sum")
