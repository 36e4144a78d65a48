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
from sketchfisher.compress.onebyte import OneByte
from sketchfisher.fisher import QUANTITIES, FisherStats
from sketchfisher.metric import shift
from tiny_models import generic_loss, make_batches, make_model

SETTINGS = [(v, n) for v in ("paper", "signed", "symmetric") for n in ("a", "pooled", "loo")]


@pytest.mark.parametrize("variant,normalizer", SETTINGS)
@pytest.mark.parametrize("vr", [True, False])
def test_needed_statistics_table(variant, normalizer, vr):
    needs = needed_statistics(sf.ScoreConfig(variant=variant, normalizer=normalizer),
                              sf.Sketch(k=8, variance_reduction=vr))
    i_mean = {"paper": "fisher", "signed": "sum", "symmetric": "abs"}[variant]
    j_mean = {"paper": "abs", "signed": "sum", "symmetric": "abs"}[variant]
    balance = set() if variant == "signed" else {"abs"}  # two passes per task: signed by the Fisher, others by Σ|g|
    want_a = {"fisher"} | (balance | {i_mean} if vr else set())
    want_b = ({"fisher"} if normalizer == "pooled" else set()) | (balance | {j_mean} if vr else set())
    assert set(needs["a"]) == want_a and set(needs["b"]) == want_b
    # task B once (1.5 passes; normaliser "a" only): every variant balances by a power of task A's normaliser, so
    # variance reduction adds each side's task mean only
    if normalizer == "a":
        needs = needed_statistics(sf.ScoreConfig(variant=variant, normalizer=normalizer),
                                  sf.Sketch(k=8, variance_reduction=vr), passes=1.5)
        want_a, want_b = {"fisher"} | ({i_mean} if vr else set()), {j_mean} if vr else set()
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
    assert slim[0].quantities == ("fisher",) and slim[1].quantities == (("fisher",) if normalizer == "pooled" else ())
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
    # B's Σ|g| (its centre) was consumed by the preparations and freed; A's Σg stays in host memory (the conflict
    # test's T is formed from A's exact mean after B's single pass)
    assert res.context.stats_a.quantities == ("fisher", "sum")
    assert res.context.stats_b.quantities == ()
    with pytest.raises(sf.InputError, match="not kept"):
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
    assert QUANTITIES == ("fisher", "m2", "abs", "sum", "half")


def test_half_sums_split_the_stream_by_position():
    """``half``: Σg over the samples at even positions of the stream, whatever the batches; kept through a
    file round trip; not carried into a union of two tasks."""
    g = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = FisherStats(quantities=("sum", "half"))
    for part in g.split([3, 1, 2, 1]):
        stats.update({"w": part})
    assert stats.half_count == 4
    torch.testing.assert_close(stats.sum_half["w"], g[0::2].sum(0))
    torch.testing.assert_close(stats.mean_grad_half("w"), g[0::2].mean(0))
    back = FisherStats.from_tensors(*stats.to_tensors())
    assert back.half_count == 4 and torch.equal(back.sum_half["w"], stats.sum_half["w"])
    assert "half" not in stats.merge(back).quantities


def test_phase_plan_matches_hand_computation():
    """Each phase of the planner, term by term, for the Llama-7B shape (fp32 statistics, bf16 weights)."""
    from sketchfisher.planner import plan_phases

    L, h, I, V, B, T, n = 32, 4096, 11008, 32000, 4, 512, 512
    k256 = sf.Sketch(k=256, dtype="fp16")  # the byte counts below are k = 256 fp16's
    attn = L * 4 * h * h
    params = L * (4 * h * h + 3 * h * I) + V * h
    weights, stat = params * 2, attn * 4
    half = attn * 2  # a plain sum (Σ|g|, Σg: bf16, stochastically rounded)
    side = attn  # a balance or centre in one byte (the scales per head block aside)
    # bf16 factors of every projection, activations, logits, one module's fp32 per-sample gradient
    running = B * T * L * 8 * h * 2 + B * T * L * (26 * h + 11 * I) + B * T * V * 10 + 2 * B * h * h * 4
    preps = stat + 3 * side  # w_a (fp32), w_b, x̄', ȳ' (one byte)
    sketches = L * 128 * (256 * 2 + 4 + 16 + 4) * n  # fp16 vector, its scale, two fp64 scalars, fp32 γ
    # a pass holds what it writes (its task's sketches) beside what earlier steps left; A keeps its Fisher and
    # Σ|g|, B its Σ|g|
    want = {"pass 1 A": weights + stat + half + running, "pass 1 B": weights + stat + 2 * half + running,
            "preparation": weights + max(stat + 2 * half, preps), "pass 2 A": weights + preps + running + sketches / 2,
            "pass 2 B": weights + preps + running + sketches, "scoring": weights + sketches + 2 * B * h * h * 4}
    df = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B, passes=2, conflicts=False).set_index("phase")
    for phase, value in want.items():
        assert df.loc[phase, "peak_device_bytes"] == pytest.approx(value), phase
    # task B once (the default here): A keeps its Fisher alone (the balance is a power of it); preparations from A
    # alone, w_b and x̄' (which also centres B), no w_a; B's sketches centred during its pass and kept as they come, no statistics of B's own; after
    # the pass w_a is back and w_b gone
    b_preps, a_preps = 2 * side + half, stat + 2 * side
    ahead = 2 * h * h * 4  # B's centring: A's Fisher of the largest weight, and of the next one, coming back
    want = {"pass 1 A": weights + stat + running, "preparation": weights + max(stat, 2 * side),
            "pass B": weights + b_preps + running + sketches / 2, "centring B": weights + b_preps + sketches / 2 + ahead,
            "pass 2 A": weights + a_preps + running + sketches, "scoring": weights + sketches + 2 * B * h * h * 4}
    once = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B, conflicts=False).set_index("phase")
    assert list(once.index) == list(want)
    for phase, value in want.items():
        assert once.loc[phase, "peak_device_bytes"] == pytest.approx(value), phase
    # with the conflict test (the default): A also keeps Σg and Σg over half its samples during pass 1, B its Σg
    # during its pass, all three bf16 accumulators; task B's pass holds its two one-byte conflict weights, which go
    # with w_b after it; A's pass 2 holds the third
    u = attn
    want.update({"pass 1 A": weights + stat + 2 * half + running,
                 "preparation": weights + max(stat + 2 * half, 2 * side + 2 * u),
                 "pass B": weights + b_preps + 2 * u + half + running + sketches / 2,
                 "centring B": weights + b_preps + 2 * u + half + sketches / 2 + 2 * h * h * (4 + 2),  # (+ A's Σg)
                 "pass 2 A": weights + a_preps + u + running + sketches})
    default = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B).set_index("phase")
    for phase, value in want.items():
        assert default.loc[phase, "peak_device_bytes"] == pytest.approx(value), phase
    two = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B, devices=2, passes=2,
                      conflicts=False).set_index("phase")
    # layer-proportional terms halve; the logits and one module's per-sample gradient do not
    logits, grad = B * T * V * 10, 2 * B * h * h * 4
    assert two.loc["pass 2 B", "peak_device_bytes"] == pytest.approx(
        (weights + preps + running - logits - grad + sketches) / 2 + logits + grad)
    # pooled normaliser: task B keeps its Fisher too; fp64 statistics double them (Σ|g| in fp64 too)
    pooled = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B, cfg=sf.ScoreConfig(normalizer="pooled"),
                         stats_bytes=8, conflicts=False).set_index("phase")  # (two passes: the default where B's pass needs its Fisher)
    assert pooled.loc["pass 1 B", "peak_device_bytes"] == pytest.approx(weights + 4 * 2 * stat + running)
    # a bf16 model's per-sample gradient formed in bf16 (a sketch collection on a GPU): in every pass, one bf16 buffer
    # per module of a layer (Q, K, V, O) in place of one module's fp32 gradient; scoring's working set is not a
    # gradient and keeps its size
    low = plan_phases("llama-7b", codec=k256, samples=n, tokens=T, batch_size=B, grad_bytes=2).set_index("phase")
    for phase, value in want.items():
        lighter = grad - B * 2 * 4 * h * h if phase.startswith("pass") else 0
        assert low.loc[phase, "peak_device_bytes"] == pytest.approx(value - lighter), phase
    with pytest.raises(sf.InputError, match="grad_bytes 2 or 4"):
        plan_phases("llama-7b", codec=k256, grad_bytes=1)


def test_a_run_that_would_not_fit_is_refused_with_numbers_and_alternatives():
    from sketchfisher.collect.fit import refuse_over_budget
    from sketchfisher.collect.plan import pass_plan

    plain = {p: pass_plan(sf.Sketch(), sf.ScoreConfig(), p, conflicts=False) for p in (2, 1.5)}
    kw = dict(devices=1, samples=512, tokens=512, batch_size=4, codec=sf.Sketch(), cfg=sf.ScoreConfig(),
              model_bytes_per_param=2, plan=plain[2])
    ok = refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float32, **kw)
    assert ok["peak_device_bytes"].max() < 72 * 2**30
    # task B once holds fewer model-sized tensors at a time: fp64 statistics fit the same card
    assert refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float64, **{**kw, "plan": plain[1.5]}) is not None
    # heads and MLP units with the conflict test's statistics (the default) fit at fp32 on 80 GB at batch 2 (below
    # 76 GiB); at batch 4 they are refused, saying what would fit
    both = refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float32,
                              **{**kw, "plan": None, "batch_size": 2, "units": "all"})
    assert both["peak_device_bytes"].max() < 76 * 2**30
    with pytest.raises(sf.InputError, match="conflicts=False, --no-conflicts") as err:
        refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float32,
                           **{**kw, "plan": None, "batch_size": 4, "units": "all"})
    assert "heads alone, then MLP units in a second collection" in str(err.value) and "batch size 2" in str(err.value)
    with pytest.raises(sf.InputError, match="batch size 2;"):  # the largest batch that fits, not half of 3
        refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float32,
                           **{**kw, "plan": None, "batch_size": 3, "units": "all"})
    with pytest.raises(sf.InputError) as err:
        refuse_over_budget("llama-7b", 80 * 2**30, stats_dtype=torch.float64, **{**kw, "batch_size": 8})
    text = str(err.value)
    assert "98.3 GiB on a device in pass 1 B but 80.0 GiB is available" in text  # fp64 statistics peak in pass 1
    assert "float64 statistics" in text and "stats_dtype=torch.float32" in text and "batch size 4" in text
    assert "e+" not in text  # human units, no scientific notation
    with pytest.raises(sf.InputError, match="spread over 2 devices"):
        refuse_over_budget("llama-13b", 80 * 2**30, stats_dtype=torch.float32, **kw)


def test_half_precision_models_keep_their_factors_in_their_own_dtype():
    """A bf16 model's captured factors stay bf16 (half the bytes of a batch in flight) and give the same
    per-sample gradients as the same factors in fp32; an fp32 model's stay fp32."""
    from sketchfisher.capture.hooks import FactorCapture

    model = make_model("llama_gqa")
    batch = make_batches(3, 1, seed=4)[0]
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj"))][:2]
    for dtype in (torch.bfloat16, torch.float32):
        m = model.to(dtype)
        with FactorCapture(m, names) as cap:
            bf = cap.run(generic_loss, batch)
        for name in names:
            assert bf.A[name].dtype == dtype and bf.D[name].dtype == dtype
            g = bf.grad(name)
            assert g.dtype == torch.float32
            a, d = bf.A[name].float(), bf.D[name].float()
            left, right = (a, d) if bf.transposed[name] else (d, a)
            torch.testing.assert_close(g, torch.bmm(left.transpose(1, 2), right), rtol=0, atol=0)


def test_fp32_statistics_keep_balance_and_centres_in_one_byte_and_the_denominator_exact(llama):
    """Where the statistics are fp32, w_b, x̄' and ȳ' are one byte each (fp8 codes, a scale per head block) and
    w_a = 1/((Î + ε + λ)·w_b) in fp32: the
    product of the weights is the denominator to fp32 precision. Before task B's single pass there is no w_a;
    the centring builds it again from task A's Fisher, bitwise as a full preparation would."""
    from sketchfisher.collect.sketches import centre_j_side

    model, ta, tb = llama
    layout, cfg, codec = sf.layout_for(model), sf.ScoreConfig(), sf.Sketch(k=8)
    _, stats_a = collect(model, generic_loss, ta, layout, codec, stats_dtype=torch.float32,
                         quantities=("fisher", "abs"))
    _, stats_b = collect(model, generic_loss, tb, layout, codec, stats_dtype=torch.float32, quantities=("abs",))
    assert stats_a.sum_abs[stats_a.names()[0]].dtype == torch.bfloat16  # (stochastically rounded)
    once = prepare_all(layout, stats_a, None, cfg, codec, balance_from_a=True)  # (not offloaded: reused below)
    both = prepare_all(layout, stats_a, stats_b, cfg, codec, balance_from_a=True)  # a full preparation
    w_b = {}
    for key, prep in once.items():
        if prep is not None:
            assert prep.w_a is None and all(isinstance(t, OneByte) for t in (prep.w_b, prep.x_bar, prep.y_bar))
            w_b[key] = prep.w_b
    assert w_b
    centre_j_side(layout, codec, cfg, once, stats_b, stats_a=stats_a)
    for key, wb in w_b.items():
        prep, fisher = once[key], stats_a.block(layout, *key, "fisher")
        assert prep.w_a.dtype == torch.float32 and prep.w_b is None
        assert torch.equal(prep.w_a, both[key].w_a)
        assert torch.equal(wb.codes.view(torch.uint8), both[key].w_b.codes.view(torch.uint8))
        assert torch.equal(wb.scale, both[key].w_b.scale) and (wb.decode() > 0).all()
        denom = fisher + shift(fisher, cfg)
        torch.testing.assert_close(prep.w_a * wb.decode(), denom.reciprocal(), rtol=3e-7, atol=0)


def test_bf16_per_sample_gradients_leave_the_estimates_as_accurate(llama, monkeypatch):
    """On a GPU a bf16 model's per-sample gradients reach a sketch collection's statistics and side vectors rounded
    once to bf16, the same numbers in both (``BatchFactors.grad(low=True)``, ``collect.passes.block_gradients``;
    ``tests/test_gpu.py`` checks the rounding). Simulated here on the CPU (fp64 statistics: fp32 ones' stochastic
    rounding would re-draw its own noise wherever an input moves). With fp32 sketches the scores move by a few
    hundredths of their standard errors. Any change also re-draws what follows a discontinuity (int4's dither, keyed
    by its scale's bits): a different estimate, as accurate, so the errors against the exact scores keep their size;
    the conflict test's T and standard error move by well under 1%."""
    from sketchfisher.capture.hooks import BatchFactors

    model, ta, tb = llama
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact(), units="all")
    grad = BatchFactors.grad

    def collect(dtype: str, rounded: bool):
        with monkeypatch.context() as patch:
            if rounded:  # the GPU's bf16 path on the CPU
                patch.setattr(BatchFactors, "rounds", lambda self, module: True)
                patch.setattr(BatchFactors, "grad", lambda self, module, low=False, into=None: grad(self, module).to(
                    torch.bfloat16 if low else torch.float32))
            return sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32, seed=2, dtype=dtype), units="all")

    def standardised(res, family, reference):
        z = ((res.units(family).scores - reference.units(family).scores) / res.units(family).stderr).double()
        return z[z.isfinite()]

    fp32, read = collect("fp32", False), collect("fp32", True)
    for family in fp32.families:
        moved = standardised(read, family, fp32)
        assert 0 < float(moved.abs().max()) < 0.05, family
    before, after = collect("int4", False), collect("int4", True)
    for family in before.families:
        rms = [float(standardised(r, family, exact).square().mean().sqrt()) for r in (before, after)]
        assert abs(rms[1] / rms[0] - 1) < 0.02, (family, rms)
        t_before, t_after = before.units(family).head_conflicts(), after.units(family).head_conflicts()
        for column in ("T", "stderr"):
            rel = (t_after[column] - t_before[column]).abs() / t_before[column].abs().max()
            assert float(rel.max()) < 1e-2, (family, column)
