"""MLP channel units: the layout (tiling, masking), exact scores against the formula, additivity, sketches
against exact, units collected beside heads in the same passes, stores, plots and Fisher views."""

import pytest
import torch

import sketchfisher as sf
from sketchfisher.capture import per_sample_gradients
from sketchfisher.interference.checks import head_additivity
from test_exact import assert_scores_follow_formula, direct_score
from tiny_models import generic_loss, make_batches, make_model

MLP_ARCHS = ["gpt2", "llama_gqa", "bert", "phi3_fused_gqa", "gpt_neox"]


def test_registered_mlp_types_cover_the_tiny_models():
    for arch in ("gpt2", "llama_gqa", "mistral_mqa", "qwen2_headdim", "bert", "roberta", "gpt_neox", "phi3_fused_gqa",
                 "qwen3", "gemma", "bloom", "opt", "gptj", "phi", "distilbert", "electra", "gpt_bigcode_mqa",
                 "deberta_v2", "mpt", "falcon_new_gqa"):
        layout = sf.mlp_layout_for(make_model(arch))
        assert layout.unit == "channels" and layout.block_names[-2:] == ("UP", "DOWN")
    with pytest.raises(sf.LayoutError, match="no MLP layout for model_type 'mixtral'"):
        sf.mlp_layout_for(make_model("mixtral"))


@pytest.mark.parametrize("arch", MLP_ARCHS)
@pytest.mark.parametrize("group", [1, 4])
def test_units_tile_the_mlp_weights(arch, group):
    model = make_model(arch)
    layout = sf.mlp_layout_for(model, group_size=group)
    params = dict(model.named_parameters())
    hits = {name: torch.zeros_like(params[name], dtype=torch.int64) for name in layout.params}
    for layer, block in layout.groups():
        for hb in layout.head_blocks(layer, block):
            hb.select(hits[hb.param_name]).add_(1)
    for name, count in hits.items():
        assert bool((count == 1).all()), f"{name}: entries covered {count.unique().tolist()} times"
    width = layout.num_heads * group
    assert all(len(layout.head_blocks(layer, "DOWN")) == width // group for layer in range(layout.num_layers))


def test_default_groups_stay_near_the_head_count_when_heads_do_not_divide_the_channels():
    import transformers as hf

    model = hf.BertModel(hf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=50))
    layout = sf.mlp_layout_for(model)  # 50 channels, 4 heads: groups of 25 (the smallest divisor >= 50 / 4)
    assert (layout.num_heads, layout.head_dim) == (2, 25)
    assert sf.planner.Shape.of(model).mlp_units_per_layer == 2


def test_group_size_must_divide_the_channels():
    with pytest.raises(sf.LayoutError, match=r"must divide the 48 hidden channels; got 5 \(sizes that do: \[1, 2, 3"):
        sf.mlp_layout_for(make_model("bert"), group_size=5)


def _down_module(model, layout, layer):
    return model.get_submodule(layout.head_blocks(layer, "DOWN")[0].module_name)


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_masking_a_channel_zeroes_exactly_its_unit(arch):
    """Zeroing hidden unit c after the nonlinearity zeroes its rows of GATE/UP and its column of DOWN and
    no other row or column of those weights."""
    model = make_model(arch)
    layout = sf.mlp_layout_for(model, group_size=1)
    layer, c = 1, 3
    down = _down_module(model, layout, layer)

    def zero_channel(_module, args):
        x = args[0].clone()
        x[..., c] = 0
        return (x,)

    handle = down.register_forward_pre_hook(zero_channel)
    try:
        grads = next(per_sample_gradients(model, generic_loss, make_batches(2, 2, seed=3), layout.params))
    finally:
        handle.remove()
    for block in layout.block_names:
        for u, hb in enumerate(layout.head_blocks(layer, block)):
            g = hb.select(grads[hb.param_name])  # [B, rows, cols] of unit u
            norm = float(g.abs().sum())
            if u == c:
                assert norm == 0.0, (block, u)
            else:
                assert norm > 0.0, (block, u)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "phi3_fused_gqa"])
@pytest.mark.parametrize("variant,normalizer", [("paper", "a"), ("signed", "a"), ("symmetric", "pooled")])
def test_exact_unit_scores_equal_direct_per_pair(arch, variant, normalizer):
    model = make_model(arch)
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), variant=variant, normalizer=normalizer,
                     dtype=torch.float64, units="mlp", mlp_group_size=4)
    assert res.scores.shape == (4, 3, res.layout.num_layers, res.layout.num_heads, len(res.layout.block_names))
    assert_scores_follow_formula(res, variant, normalizer, 1e-10)

@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_unit_scores_add_up_to_the_whole_mlp_block(arch):
    model = make_model(arch)
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), dtype=torch.float64, units="mlp",
                     mlp_group_size=2)
    check = head_additivity(res)
    assert check["passed"], check


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "bert"])
def test_heads_and_units_collected_together_equal_separate_runs(arch):
    """One collection over both families gives each family's scores as its own collection does."""
    model = make_model(arch)
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    both = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units=("heads", "mlp"))
    assert both.families == ("heads", "mlp") and both.layout.unit == "head"
    heads = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
    mlp = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="mlp")
    torch.testing.assert_close(both.scores, heads.scores, rtol=0, atol=0)
    torch.testing.assert_close(both.units("mlp").scores, mlp.scores, rtol=0, atol=0)
    with pytest.raises(sf.InputError, match="was not collected"):
        heads.units("mlp")
    table = both.units("mlp").top_conflicts(5)
    assert list(table.columns[:3]) == ["block", "layer", "unit"] and set(table["block"]) <= {"GATE", "UP", "DOWN"}


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_full_width_srht_unit_sketches_equal_exact(arch):
    model = make_model(arch)
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), dtype=torch.float64, units="mlp",
                       mlp_group_size=8)
    size = max(hb.numel for key in exact.layout.groups() for hb in exact.layout.head_blocks(*key))
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=1 << (size - 1).bit_length(), kind="srht", seed=0,
                                                                  dtype="fp32"),
                    dtype=torch.float64, units="mlp", mlp_group_size=8)
    torch.testing.assert_close(sk.scores, exact.scores, rtol=1e-4, atol=1e-6 * float(exact.scores.abs().max()))


def test_sketched_unit_scores_carry_calibrated_error_bars():
    """Sketched MLP-unit scores: the exact score lies within 3 standard errors for nearly every pair."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(6, 3, seed=1), make_batches(6, 3, seed=2)
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="all")
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=64, seed=0, dtype="fp32"), units="all")
    for family in ("heads", "mlp"):
        e, s = exact.units(family), sk.units(family)
        z = ((s.scores - e.scores).abs() / s.stderr.clamp_min(1e-30)).flatten()
        assert float((z <= 3).double().mean()) >= 0.95, family
        assert s.head_means_stderr().shape == s.head_means().shape


def test_a_store_keeps_both_families(tmp_path):
    model = make_model("gpt2")
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    codec = sf.Sketch(k=16, seed=0)
    mem = sf.analyze(model, generic_loss, ta, tb, codec=codec, units="all")
    stored = sf.analyze(model, generic_loss, ta, tb, codec=codec, units="all", store=tmp_path / "s")
    assert stored.families == ("heads", "mlp")
    for family in ("heads", "mlp"):
        torch.testing.assert_close(stored.units(family).scores, mem.units(family).scores, rtol=1e-2, atol=1e-3)
    with pytest.raises(sf.StoreMismatchError):  # the same store with other units is another collection
        sf.analyze(model, generic_loss, ta, tb, codec=codec, units="heads", store=tmp_path / "s")


def test_unit_heatmaps_and_fisher_views(tmp_path):
    pytest.importorskip("matplotlib")
    from sketchfisher.fisher import channel_view, unit_view
    from sketchfisher.plots import plot_block_heatmaps, plot_head_conflicts

    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=1), make_batches(4, 2, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="all").units("mlp")
    layout = res.layout
    plot_block_heatmaps(res.head_means(), tmp_path / "mlp.png", blocks=layout.block_names, unit="channel group")
    conflicts = res.head_conflicts()
    assert "unit" in conflicts.columns and len(conflicts) == layout.num_layers * layout.num_heads * 3
    plot_head_conflicts(conflicts, res.layout, tmp_path / "c.png")
    plot_head_conflicts(conflicts, path=tmp_path / "d.png")  # the table knows its own grid
    assert conflicts.attrs["geometry"] == {"layers": layout.num_layers, "units": layout.num_heads, "unit": "unit",
                                           "blocks": list(layout.block_names)}
    assert (tmp_path / "mlp.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
    assert (tmp_path / "d.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    # the unit view of the Fisher is the full-shape Fisher reduced over each unit's entries
    stats = res.context.stats_a
    view = unit_view(layout, stats.fisher)
    for b, block in enumerate(layout.block_names):
        name = layout.param_of(0, block)
        f = stats.fisher(name)
        per_channel = channel_view(f, axis="in" if block == "DOWN" else "out")
        group = layout.head_dim
        torch.testing.assert_close(view[0, :, b], per_channel.double().view(-1, group).sum(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("codec", [sf.Factors(), sf.Sketch(k=16, seed=0)])
@pytest.mark.parametrize("variant,normalizer", [("paper", "a"), ("signed", "a"), ("symmetric", "pooled")])
def test_single_neuron_pair_means_from_statistics_equal_exact_means(codec, variant, normalizer):
    """Every neuron's mean score over all pairs, from pass-1 statistics only, equals the mean of the exact
    per-neuron scores (collected at group size 1), whatever the codec and group size of the collection."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    kw = dict(variant=variant, normalizer=normalizer, dtype=torch.float64)
    neurons = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="mlp", mlp_group_size=1, **kw)
    grouped = sf.analyze(model, generic_loss, ta, tb, codec=codec, units="all", mlp_group_size=8,
                         stats_dtype=torch.float64, **kw).units("mlp")
    want = neurons.head_means()
    got = grouped.pair_means_from_statistics(group_size=1)
    assert got.shape == want.shape == (2, 48, 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))  # gradients formed in fp32
    torch.testing.assert_close(grouped.pair_means_from_statistics(group_size=8), neurons.head_means().view(2, 6, 8, 3)
                               .sum(2), rtol=1e-6, atol=1e-7 * float(want.abs().max()))
    with pytest.raises(sf.InputError, match="positive divisor"):
        grouped.pair_means_from_statistics(group_size=3)


def test_other_linear_layers_get_output_channel_units():
    """units='linear': every linear layer outside the head and MLP layouts, grouped by module pattern, with
    output-row units that tile its weight; masking output channel c zeroes exactly its unit's rows; exact
    scores follow the formula; a store keeps the families (block names hold dots and stars)."""
    model = make_model("llama_gqa", wrapper=True)
    layout = sf.units_layout(model, ("heads", "linear"), linear_group_sizes={"lm_head": 8})
    assert layout.family_name == "heads+linear:lm_head"
    lin = layout.family("linear:lm_head")
    vocab = model.lm_head.weight.shape[0]
    assert lin.block_names == ("lm_head",) and lin.num_heads == vocab // 8 and lin.unit_column == "unit"
    hits = torch.zeros_like(model.lm_head.weight, dtype=torch.int64)
    for hb in lin.head_blocks(0, "lm_head"):
        hb.select(hits).add_(1)
    assert bool((hits == 1).all())
    c = 5
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([c]), 0.0))
    try:
        grads = next(per_sample_gradients(model, generic_loss, make_batches(2, 2, seed=3), ["lm_head.weight"]))
    finally:
        handle.remove()
    g = grads["lm_head.weight"]
    assert float(g[:, c].abs().sum()) == 0.0 and bool((g.abs().sum((0, 2)) > 0).sum() == vocab - 1)
    # outside the heads and the MLP, BERT's masked-LM head keeps one linear layer of its own
    assert sf.units_layout(make_model("bert", wrapper=True), "linear").family_name == \
        "linear:cls.predictions.transform.dense"
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), dtype=torch.float64, units=("heads", "linear"),
                     linear_group_sizes={"lm_head": 8}).units("linear:lm_head")
    assert head_additivity(res)["passed"]
    ga = [res.context.rep_a.full("lm_head.weight")[i].double() for i in range(4)]
    gb = [res.context.rep_b.full("lm_head.weight")[j].double() for j in range(3)]
    fisher = torch.stack([g ** 2 for g in ga]).mean(0)
    for u in (0, 3):
        hb = res.layout.head_block(0, "lm_head", u)
        want = direct_score(hb.select(ga[1]), hb.select(gb[2]), hb.select(fisher), "paper")
        assert float(res.scores[1, 2, 0, u, 0]) == pytest.approx(want, rel=1e-9)


def test_a_store_keeps_linear_families(tmp_path):
    model = make_model("llama_gqa", wrapper=True)
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    codec = sf.Sketch(k=16, seed=0, dtype="fp32")
    kw = dict(codec=codec, units=("heads", "linear"), linear_group_sizes={"lm_head": 8})
    mem = sf.analyze(model, generic_loss, ta, tb, **kw)
    stored = sf.analyze(model, generic_loss, ta, tb, store=tmp_path / "s", **kw)
    assert stored.families == ("heads", "linear:lm_head")
    torch.testing.assert_close(stored.units("linear:lm_head").scores, mem.units("linear:lm_head").scores)
    sf.open_store(tmp_path / "s").check(model)  # the model rebuilds the store's families


def test_verify_top_rescores_mlp_unit_candidates_exactly():
    model = make_model("llama_gqa")
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="all").units("mlp")
    sk = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16, seed=0), units="all").units("mlp")
    v = sk.verify_top(5, budget=20, model=model, loss_fn=generic_loss, task_a=ta, task_b=tb)
    assert len(v) == 20 and "unit" in v.columns
    for r in v.to_dict("records"):
        want = float(exact.scores[r["sample_i"], r["sample_j"], r["layer"], r["unit"],
                                  exact.layout.position(r["block"])])
        assert r["exact_score"] == pytest.approx(want, rel=1e-4)
