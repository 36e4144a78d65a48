"""Stage 6 engine: streaming equals materialised, verify_top, statistics, sanity checks, plots."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import bootstrap, false_discovery_control

import sketchfisher as sf
from sketchfisher import run_sanity_checks
from sketchfisher.interference.stats import bootstrap_ci, permutation_test, result_grads
from sketchfisher.plots import plot_block_comparison, plot_block_heatmaps, plot_frontier, plot_sketch_vs_exact
from tiny_models import generic_loss, make_batches, make_model


@pytest.fixture(scope="module")
def setup():
    model = make_model("llama_gqa")
    ta, tb = make_batches(6, 3, seed=31), make_batches(5, 5, seed=32)
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
    return model, ta, tb, exact


@pytest.mark.parametrize("codec", [sf.Factors(), sf.Sketch(k=32, kind="sjlt", seed=3)])
def test_streaming_equals_materialised(setup, codec):
    model, ta, tb, _ = setup
    lazy = sf.analyze(model, generic_loss, ta, tb, codec=codec, max_bytes=1)  # one row per chunk
    full = sf.analyze(model, generic_loss, ta, tb, codec=codec).materialize()
    assert not lazy.materialized
    torch.testing.assert_close(lazy.head_means(), full.head_means())
    torch.testing.assert_close(lazy.head_means(), full.scores.double().nanmean((0, 1)), rtol=1e-6, atol=0)
    pd.testing.assert_frame_equal(lazy.top_conflicts(15), full.top_conflicts(15))
    pd.testing.assert_frame_equal(lazy.block_summary(), full.block_summary())
    pd.testing.assert_frame_equal(lazy.sample_summary(), full.sample_summary())
    assert not lazy.materialized
    torch.testing.assert_close(lazy.scores, full.scores)  # materialising in chunks changes nothing


def test_summaries_are_nan_aware(setup):
    model, ta, tb, _ = setup
    layout = sf.layout_for(model)
    p = model.get_parameter(layout.head_block(1, "K", 0).param_name)
    p.requires_grad_(False)
    try:
        res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
        means = res.head_means()
        summary = res.block_summary().set_index("block")
    finally:
        p.requires_grad_(True)
    assert torch.isnan(means[1, :, 1]).all() and torch.isfinite(means[0]).all()
    assert summary.loc["K", "missing_fraction"] == pytest.approx(0.5)
    assert (res.top_conflicts(500)["score"].notna()).all()


def test_verify_top_on_exact_result_holds_everything(setup):
    _, _, _, exact = setup
    v = exact.verify_top(k=10, budget=30)
    assert v.attrs["held_fraction"] == 1.0
    np.testing.assert_allclose(v["exact_score"], v["score"], rtol=1e-5)  # fp32 arithmetic, two summation orders


def test_verify_top_recovers_exact_top_k_from_sketches(setup):
    model, ta, tb, exact = setup
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=64, kind="sjlt", seed=0))
    v = sk.verify_top(k=10, budget=300, model=model, loss_fn=generic_loss, task_a=ta, task_b=tb)
    truth = exact.top_conflicts(10)
    key = lambda df: set(map(tuple, df[["block", "layer", "head", "sample_i", "sample_j"]].values.tolist()))  # noqa
    assert key(v.head(10)) == key(truth)
    np.testing.assert_allclose(v.head(10)["exact_score"].to_numpy(), truth["score"].to_numpy(), rtol=1e-5)
    with pytest.raises(sf.InputError, match="pass model="):
        sk.verify_top(k=5, budget=10)


def _brute_force_pvalues(model, ta, tb, layout, perms, variant="paper"):
    """p-values of the mean paper score per cell from re-running analyze on permuted sample sets."""
    samples = [(b, r) for b in ta + tb for r in range(b["input_ids"].shape[0])]
    single = [{k: v[r:r + 1] for k, v in b.items()} for b, r in samples]
    n_a = sum(b["input_ids"].shape[0] for b in ta)

    def stat(order):
        res = sf.analyze(model, generic_loss, [single[o] for o in order[:n_a]], [single[o] for o in order[n_a:]],
                         codec=sf.Factors(), variant=variant)
        return res.head_means()

    observed = stat(np.arange(len(single)))
    null = torch.stack([stat(p) for p in perms])
    return observed, (1 + (null >= observed).sum(0)).double() / (1 + len(perms))


def test_permutation_pvalues_match_brute_force(setup):
    model, ta, tb, exact = setup
    layout = exact.layout
    cfg = exact.context.cfg
    df = permutation_test(layout, result_grads(exact), cfg, n_permutations=12, seed=5)
    rng = np.random.default_rng(5)
    perms = np.stack([rng.permutation(11) for _ in range(12)])
    observed, p = _brute_force_pvalues(model, ta, tb, layout, perms)
    for row in df.itertuples():
        b = sf.BLOCKS.index(row.block)
        assert row.statistic == pytest.approx(float(observed[row.layer, row.head, b]), rel=1e-6)
        assert row.p_value == pytest.approx(float(p[row.layer, row.head, b]))
    distinct = df.drop_duplicates(["layer", "block", "statistic"])
    assert len(distinct) == 2 * (8 + 2 + 2 + 8)  # GQA: K/V tested once per kv head
    q = false_discovery_control(distinct["p_value"], method="bh")
    np.testing.assert_allclose(distinct["q_value"], q)
    assert df["p_value"].min() >= 1 / 13
    pd.testing.assert_frame_equal(exact.permutation_test(12, seed=5), df)


class _Synthetic:
    """Per-sample block gradients drawn i.i.d. (optionally with a signal on one cell of task B)."""

    def __init__(self, layout, n_a, n_b, seed, signal=None):
        g = torch.Generator().manual_seed(seed)
        self.data = {}
        for layer in range(layout.num_layers):
            for block in sf.BLOCKS:
                hb = len(layout.head_blocks(layer, block))
                size = layout.head_blocks(layer, block)[0].numel
                ga = torch.randn(n_a, hb, size, generator=g, dtype=torch.float64)
                gb = torch.randn(n_b, hb, size, generator=g, dtype=torch.float64)
                if signal == (layer, block):
                    gb[:, 0] *= 3.0
                self.data[(layer, block)] = (ga, gb)

    def __call__(self, layer, block):
        return self.data[(layer, block)]


def test_pure_noise_is_not_declared_significant(setup):
    # Exchangeable A and B: BH at q < 0.05 over 64 cells makes any rejection a < 5% event; with this
    # fixed seed none occur, and the p-values look uniform (mean within 0.5 ± 0.12).
    layout = setup[3].layout
    cfg = sf.ScoreConfig()
    df = permutation_test(layout, _Synthetic(layout, 12, 12, seed=0), cfg, n_permutations=199, seed=1)
    distinct = df.drop_duplicates(["layer", "block", "statistic"])
    assert (df["q_value"] < 0.05).sum() == 0
    assert abs(distinct["p_value"].mean() - 0.5) < 0.12


def test_permutation_test_detects_a_planted_signal(setup):
    layout = setup[3].layout
    df = permutation_test(layout, _Synthetic(layout, 12, 12, seed=0, signal=(1, "Q")), sf.ScoreConfig(),
                          n_permutations=999, seed=1)
    hit = df[(df.layer == 1) & (df.block == "Q") & (df["head"] == 0)]
    assert float(hit["q_value"].iloc[0]) < 0.05
    assert (df["q_value"] < 0.05).sum() <= 3


def test_bootstrap_matches_scipy(setup):
    exact = setup[3]
    df = bootstrap_ci(exact, n_resamples=200, seed=4)
    flat = exact.scores.double().reshape(exact.n_a, exact.n_b, -1).numpy()
    cell = 7

    def stat(ia, ib, axis=-1):
        return flat[np.asarray(ia, int)][:, np.asarray(ib, int), cell].mean()

    ref = bootstrap((np.arange(exact.n_a), np.arange(exact.n_b)), stat, paired=False, vectorized=False,
                    n_resamples=200, method="percentile", rng=np.random.default_rng(4))
    assert df.loc[cell, "mean"] == pytest.approx(flat[:, :, cell].mean())
    assert df.loc[cell, "low"] == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert df.loc[cell, "high"] == pytest.approx(ref.confidence_interval.high, rel=1e-9)


def test_statistics_refuse_sketches(setup):
    model, ta, tb, _ = setup
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16))
    with pytest.raises(sf.InputError, match="exact per-sample gradients"):
        result_grads(sk)


@pytest.mark.parametrize("arch,heads", [("llama_gqa", [4, 5, 6, 7]), ("gpt2", [1]), ("bert", [2])])
def test_sanity_checks_pass(arch, heads):
    model = make_model(arch)
    df = run_sanity_checks(model, generic_loss, make_batches(4, 2, seed=1), make_batches(3, 3, seed=2),
                           layer=1, heads=heads)
    assert df["passed"].all(), df


def test_sanity_checks_can_fail():
    """A broken layout (GPT-2 O sliced by the wrong storage axis) makes the masking check fail on the
    exact path. (Factors slice by logical role and never read the storage axis, so they stay right.)"""
    import dataclasses

    model = make_model("gpt2")
    layout = sf.layout_for(model)
    blocks = dict(layout.blocks)
    for layer in range(layout.num_layers):
        blocks[(layer, "O")] = tuple(dataclasses.replace(hb, transposed=False) for hb in blocks[(layer, "O")])
    broken = dataclasses.replace(layout, blocks=blocks)
    from sketchfisher.interference.checks import head_masking

    row = head_masking(sf.analyze, model, generic_loss, make_batches(3, 3), make_batches(2, 2), 0, [1],
                       layout=broken, codec=sf.Exact())
    assert row["passed"] is False
    ok = head_masking(sf.analyze, model, generic_loss, make_batches(3, 3), make_batches(2, 2), 0, [1],
                      layout=layout, codec=sf.Exact())
    assert ok["passed"] is True


def test_plots_render(setup, tmp_path):
    model, ta, tb, exact = setup
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32))
    means = exact.head_means()
    figs = {"h": plot_block_heatmaps(means, tmp_path / "h.png", significant=means > means.nanmedian()),
            "b": plot_block_comparison(means, tmp_path / "b.png"),
            "s": plot_sketch_vs_exact(exact.scores, sk.scores, sk.stderr, tmp_path / "s.png"),
            "f": plot_frontier(pd.DataFrame({"bytes_per_sample": [1e3, 1e4, 1e3, 1e4], "median_rel_err": [.3, .1, .2, .05],
                                             "label": ["a", "a", "b", "b"]}), tmp_path / "f.png")}
    for name, fig in figs.items():
        assert (tmp_path / f"{name}.png").stat().st_size > 2000
        assert hasattr(fig, "savefig")  # a Figure, for inline display
    heat = figs["h"].axes[:4]
    # one colour scale for the four panels, integer layer/head ticks
    assert len({ax.images[0].get_clim() for ax in heat}) == 1
    assert all(float(t).is_integer() for ax in heat for t in ax.get_xticks())


def test_frontier_axis_labels_are_short_and_only_on_major_ticks(tmp_path):
    """Under two decades of bytes the axis is labelled at 1, 2 and 5 of each decade, in short units; minor ticks,
    which matplotlib labels too on a short log axis (and there they overlap), carry none."""
    table = pd.DataFrame({"bytes_per_sample": [19456, 68608, 68096, 264704], "median_rel_err": [.055, .028, .057, .028],
                          "label": ["new", "new", "old", "old"]})
    fig = plot_frontier(table, tmp_path / "f.png")
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]
    assert shown == ["20k", "50k", "100k", "200k"]
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))


def test_compare_metrics():
    from sketchfisher.evaluation import compare

    e = torch.arange(1.0, 101.0)
    m = compare(e, e * 1.1, stderr=torch.full_like(e, 100.0), top=10)
    assert m == {"spearman": pytest.approx(1.0), "median_rel_err": pytest.approx(0.1), "top10_recall": 1.0,
                 "coverage95": 1.0, "coverage95_top1pct": 1.0}
    assert compare(e, -e, top=10)["top10_recall"] == 0.0
    with pytest.raises(sf.InputError, match="shapes differ"):
        compare(e, e[:3])


def test_head_conflicts_is_the_mean_signed_score_and_finds_a_planted_conflict():
    """The head-level statistic is the mean signed score over pairs (both tasks involved), its alignment is
    a cosine, and tasks whose per-sample gradients are exact opposites are found in conflict everywhere."""
    model = make_model("llama_gqa")
    base = make_batches(12, 4, seed=1)

    def tagged(model, batch):
        sign, inner = batch
        return sign * generic_loss(model, inner)

    ta, tb = [(1.0, b) for b in base], [(-1.0, b) for b in base]
    res = sf.analyze(model, tagged, ta, tb, codec=sf.Factors(), dtype=torch.float64)
    df = res.head_conflicts()
    signed = sf.analyze(model, tagged, ta, tb, codec=sf.Factors(), variant="signed", dtype=torch.float64).scores
    for row in df.head(6).itertuples():
        want = float(signed[:, :, row.layer, row.head, sf.BLOCKS.index(row.block)].mean())
        assert row.T == pytest.approx(want, rel=1e-7)  # fp32 gradients, fp64 sums in another order
    assert df["alignment"].between(-1 - 1e-9, -1 + 1e-9).all()  # g_B = -g_A sample by sample
    assert df["conflict"].mean() >= 0.9  # with 12 + 12 samples nearly every block is flagged
    # one row per distinct head block: the 2 K/V heads of each layer are shared by 4 query heads each
    assert len(df) == 2 * (8 + 2 + 2 + 8) and set(df[df.block.isin(["K", "V"])].shared_by) == {4}
    # the distributions-differ permutation test stays, named for what it tests
    differ = res.distributions_differ(n_permutations=99)
    assert set(differ.columns) >= {"alignment", "p_value", "q_value"}


def test_head_mean_stderr_is_calibrated_and_zero_when_exact(setup):
    """The stderr of a sketched head mean covers the exact head mean as a JL error bar should (plain sketches,
    over seeds); centred sketches make the mean exact (stderr ~ 0); exact codecs report 0."""
    model, ta, tb, exact = setup
    truth = exact.head_means()
    assert torch.equal(exact.head_means_stderr().nan_to_num(), torch.zeros_like(truth).nan_to_num())
    z = []
    for seed in range(6):
        sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32, seed=seed, variance_reduction=False, dtype="fp32"))
        se = sk.head_means_stderr()
        assert (se > 0).all()
        z.append(((sk.head_means() - truth) / se).flatten())
    z = torch.cat(z)
    assert 0.85 <= float((z.abs() <= 2).double().mean()) <= 1.0 and float(z.abs().max()) < 6
    vr = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32, seed=0, dtype="fp32"))
    scale = float(truth.abs().max())
    assert float(vr.head_means_stderr().max()) < 1e-4 * scale
    torch.testing.assert_close(vr.head_means(), truth, rtol=1e-4, atol=1e-5 * scale)
