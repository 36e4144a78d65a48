"""Exact pipeline: scores equal a direct per-pair computation from the oracle's gradients."""

import logging
import math

import pytest
import torch

import sketchfisher as sf
from sketchfisher.capture import per_sample_gradients
from tiny_models import generic_loss, make_batches, make_model

EPS = 1e-10


def oracle(model, layout, batches, sliced=True):
    """Per-sample full gradients of the layout's parameters, as a list of dicts (fp64): as the Exact codec
    forms them (each sample alone) by default, so that the engine's arithmetic is checked to fp64 rounding."""
    out = []
    for grads in per_sample_gradients(model, generic_loss, batches, layout.params, sliced=sliced):
        n = next(iter(grads.values())).shape[0]
        out += [{k: v[b].double() for k, v in grads.items()} for b in range(n)]
    return out


def direct_score(gi, gj, fisher, variant):
    """One (i, j) score over one head block by the formula, in fp64."""
    denom = fisher + EPS
    if variant == "paper":
        return float((gi * gi / denom * gj.abs()).sum())
    if variant == "signed":
        return float((gi * gj / denom).sum())
    return float((gi.abs() * gj.abs() / denom).sum())


def magnitude(gi, gj, fisher, variant):
    """Σ |x_e y_e|: the scale of the rounding error of the sum (large cancellation for signed)."""
    return direct_score(gi.abs(), gj.abs(), fisher, "paper" if variant == "paper" else "symmetric")


# fp32 arithmetic: error relative to Σ|x y| below 3e-5; fp64: below 1e-10
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 3e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "bert", "deberta_v2", "falcon_new_gqa"])
@pytest.mark.parametrize("variant,normalizer", [("paper", "a"), ("paper", "pooled"), ("signed", "a"),
                                                ("symmetric", "pooled")])
def test_exact_scores_equal_direct_per_pair(arch, variant, normalizer, dtype, rtol):
    model = make_model(arch)
    layout = sf.layout_for(model)
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), variant=variant, normalizer=normalizer,
                     dtype=dtype)
    assert res.scores.shape == (5, 4, layout.num_layers, layout.num_heads, 4)
    assert_scores_follow_formula(res, variant, normalizer, rtol)


def assert_scores_follow_formula(res, variant, normalizer, rtol):
    """Every score of an Exact-codec result (any unit family) against :func:`direct_score` on the gradients
    the codec kept (tied to autograd by the test below)."""
    layout = res.layout
    n_a, n_b = res.n_a, res.n_b
    kept = lambda rep, n: [{p: rep.full(p)[i].double() for p in layout.params} for i in range(n)]  # noqa: E731
    ga, gb = kept(res.context.rep_a, n_a), kept(res.context.rep_b, n_b)
    pool = ga + gb if normalizer == "pooled" else ga
    for layer in range(layout.num_layers):
        for b, block in enumerate(layout.block_names):
            for h in range(layout.num_heads):
                hb = layout.head_block(layer, block, h)
                fisher = hb.select(torch.stack([g[hb.param_name] ** 2 for g in pool]).mean(0))
                for i in range(n_a):
                    for j in range(n_b):
                        gi, gj = hb.select(ga[i][hb.param_name]), hb.select(gb[j][hb.param_name])
                        want = direct_score(gi, gj, fisher, variant)
                        got = float(res.scores[i, j, layer, h, b])
                        assert abs(got - want) <= rtol * magnitude(gi, gj, fisher, variant) + 1e-30, \
                            (hb.key, i, j, got, want)


@pytest.fixture(scope="module")
def llama_setup():
    model = make_model("llama_gqa")
    return model, make_batches(4, 2, seed=3), make_batches(3, 3, seed=4)


def test_kv_scores_shared_by_query_heads_of_a_group(llama_setup):
    model, ta, tb = llama_setup
    s = sf.analyze(model, generic_loss, ta, tb).scores
    for b in (1, 2):  # K, V
        assert torch.equal(s[..., 0:4, b], s[..., 0:1, b].expand_as(s[..., 0:4, b]))
    assert not torch.equal(s[..., 0, 0], s[..., 1, 0])  # Q heads differ


def test_head_additivity(llama_setup):
    """Σ over distinct head blocks equals the score over the whole projection slice."""
    model, ta, tb = llama_setup
    layout = sf.layout_for(model)
    res = sf.analyze(model, generic_loss, ta, tb, dtype=torch.float64)
    ga, gb = oracle(model, layout, ta), oracle(model, layout, tb)
    for b, block in enumerate(sf.BLOCKS):
        name = layout.head_block(0, block, 0).param_name
        fisher = torch.stack([g[name] ** 2 for g in ga]).mean(0)
        # unsliced: all entries of the projection at once
        whole = torch.tensor([[direct_score(gi[name], gj[name], fisher, "paper") for gj in gb] for gi in ga])
        heads = layout.head_index(block).unique(sorted=True)
        first = [int((layout.head_index(block) == k).nonzero()[0]) for k in heads]
        summed = res.scores[:, :, 0, first, b].sum(-1)
        torch.testing.assert_close(summed, whole.to(summed.dtype), rtol=1e-6, atol=1e-12)


def test_symmetric_variant_is_symmetric(llama_setup):
    model, ta, _ = llama_setup
    s = sf.analyze(model, generic_loss, ta, ta, variant="symmetric", dtype=torch.float64).scores
    torch.testing.assert_close(s, s.transpose(0, 1), rtol=1e-12, atol=0)


def test_pooled_symmetric_swaps_tasks(llama_setup):
    model, ta, tb = llama_setup
    ab = sf.analyze(model, generic_loss, ta, tb, variant="symmetric", normalizer="pooled", dtype=torch.float64).scores
    ba = sf.analyze(model, generic_loss, tb, ta, variant="symmetric", normalizer="pooled", dtype=torch.float64).scores
    torch.testing.assert_close(ab, ba.transpose(0, 1), rtol=1e-10, atol=0)


def test_loss_scaling(llama_setup):
    """Scaling task A's loss leaves C_i/Î unchanged; M is linear in task B's loss scale."""
    model, ta, tb = llama_setup
    base = sf.analyze(model, generic_loss, ta, tb).scores
    a3 = sf.analyze(model, lambda m, b: 3.0 * generic_loss(m, b), ta, tb,
                    normalizer="a").scores  # both sides scaled by 3 -> only the |g_j| factor scales
    torch.testing.assert_close(a3, 3.0 * base, rtol=1e-5, atol=0)
    ta_scaled = [dict(b, scale=5.0) for b in ta]

    def loss(m, b):
        return b.get("scale", 1.0) * generic_loss(m, {k: v for k, v in b.items() if k != "scale"})

    torch.testing.assert_close(sf.analyze(model, loss, ta_scaled, tb).scores, base, rtol=1e-5, atol=0)
    tb_scaled = [dict(b, scale=7.0) for b in tb]
    torch.testing.assert_close(sf.analyze(model, loss, ta, tb_scaled).scores, 7.0 * base, rtol=1e-5, atol=0)


def test_leave_one_out_normalizer(llama_setup):
    model, ta, tb = llama_setup
    layout = sf.layout_for(model)
    res = sf.analyze(model, generic_loss, ta, tb, normalizer="loo", dtype=torch.float64)
    ga, gb = oracle(model, layout, ta), oracle(model, layout, tb)
    hb = layout.head_block(1, "V", 5)
    for i in range(len(ga)):
        others = [g for k, g in enumerate(ga) if k != i]
        fisher = hb.select(torch.stack([g[hb.param_name] ** 2 for g in others]).mean(0))
        want = direct_score(hb.select(ga[i][hb.param_name]), hb.select(gb[0][hb.param_name]), fisher, "paper")
        # (the oracle's fp32 autograd gradients against the library's from captured fp32 factors: ~1e-6 apart)
        assert math.isclose(float(res.scores[i, 0, 1, 5, 2]), want, rel_tol=1e-5)


def test_ridge_relative_uses_block_median(llama_setup):
    model, ta, tb = llama_setup
    layout = sf.layout_for(model)
    res = sf.analyze(model, generic_loss, ta, tb, ridge_rel=0.5, ridge_abs=1e-12, dtype=torch.float64)
    ga, gb = oracle(model, layout, ta), oracle(model, layout, tb)
    hb = layout.head_block(0, "Q", 3)
    fisher = hb.select(torch.stack([g[hb.param_name] ** 2 for g in ga]).mean(0))
    lam = max(1e-12, 0.5 * float(fisher.flatten().median()))
    gi, gj = hb.select(ga[1][hb.param_name]), hb.select(gb[2][hb.param_name])
    want = float((gi ** 2 / (fisher + EPS + lam) * gj.abs()).sum())
    assert math.isclose(float(res.scores[1, 2, 0, 3, 0]), want, rel_tol=1e-6)


def test_frozen_parameters_give_nan_not_zero(llama_setup):
    model, ta, tb = llama_setup
    layout = sf.layout_for(model)
    p = dict(model.named_parameters())[layout.head_block(1, "O", 0).param_name]
    p.requires_grad_(False)
    try:
        s = sf.analyze(model, generic_loss, ta, tb).scores
    finally:
        p.requires_grad_(True)
    assert torch.isnan(s[:, :, 1, :, 3]).all()
    assert torch.isfinite(s[:, :, 0]).all() and torch.isfinite(s[:, :, 1, :, :3]).all()


def test_top_conflicts_is_tidy_and_sorted(llama_setup):
    model, ta, tb = llama_setup
    res = sf.analyze(model, generic_loss, ta, tb)
    df = res.top_conflicts(10)
    assert list(df.columns) == ["block", "layer", "head", "sample_i", "sample_j", "score", "stderr"]
    assert len(df) == 10 and df["score"].is_monotonic_decreasing
    row = df.iloc[0]
    b = sf.BLOCKS.index(row["block"])
    assert row["score"] == float(res.scores[row.sample_i, row.sample_j, row.layer, row["head"], b])
    assert row["score"] == float(res.scores.nan_to_num(-1).max())
    only_v = res.top_conflicts(3, block="V")
    assert (only_v["block"] == "V").all()
    signed = sf.analyze(model, generic_loss, ta, tb, variant="signed")
    assert signed.top_conflicts(1)["score"].iloc[0] == float(signed.scores.min())


def test_model_mode_restored(llama_setup):
    model, ta, tb = llama_setup
    model.train()
    try:
        sf.analyze(model, generic_loss, ta[:1], tb[:1])
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "bert", "t5"])
def test_each_sample_alone_equals_its_gradient_in_the_batch(arch):
    """The Exact codec runs each sample on its own; its gradients are those of the sample's loss inside the
    padded batch (the oracle: one forward, a backward per sample), up to float32 rounding."""
    model = make_model(arch)
    layout = sf.layout_for(model)
    batches = make_batches(5, 3, seed=4)
    alone, batched = oracle(model, layout, batches), oracle(model, layout, batches, sliced=False)
    for a, b in zip(alone, batched):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6 * float(b[name].abs().max()) + 1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "bert", "deberta_v2", "t5"])
def test_exact_codec_gradients_are_the_autograd_gradients(arch, caplog):
    """The Exact codec forms gradients from batched factors where their sum matches the batch's autograd
    gradient, and by per-sample autograd where it does not (DeBERTa's shared projections; a loss with a
    penalty on a weight, which reaches the weight other than through its module): autograd's answer."""
    model = make_model(arch)
    layout = sf.layout_for(model)
    batches = make_batches(5, 3, seed=6)
    penalised = layout.params[0]

    def with_penalty(m, b):  # reaches one weight directly, beside its module's output
        return generic_loss(m, b) + 5.0 * m.get_parameter(penalised).square().sum()  # grad 10 W: far above rounding

    for loss in (generic_loss, with_penalty):
        with caplog.at_level(logging.INFO, logger="sketchfisher.collect.passes"):
            caplog.clear()
            res = sf.analyze(model, loss, batches, batches[:1], codec=sf.Exact())
        redone = "per-sample autograd" in caplog.text
        assert redone == (loss is with_penalty or arch == "deberta_v2"), caplog.text
        want = []
        for grads in per_sample_gradients(model, loss, batches, layout.params):
            want += [{k: v[b] for k, v in grads.items()} for b in range(next(iter(grads.values())).shape[0])]
        for name in layout.params:
            got = res.context.rep_a.full(name)
            ref = torch.stack([w[name] for w in want])
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-12, msg=name)

