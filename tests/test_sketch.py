"""Sketch maps and the Sketch codec: statistical properties (fixed seeds, stated false-failure rates)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sketchfisher as sf
from sketchfisher.compress.sketch import dequantize, quantize
from sketchfisher.compress.sketchmaps import SketchMap, block_generator, fwht
from tiny_models import generic_loss, make_batches, make_model

KINDS = ("gaussian", "sjlt", "srht")


def _xy(size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=g, dtype=torch.float64), torch.randn(size, generator=g, dtype=torch.float64)


def _estimates(kind, k, x, y, seeds=range(300), key=(0, 1, 2)):
    out = []
    for seed in seeds:
        m = SketchMap(kind, k, x.shape[-1], seed, key)
        out.append(float(m.apply(x) @ m.apply(y)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_mean_over_seeds(kind):
    # 300 independent seeds; the mean is within 4 standard errors of the truth (false-failure rate ~6e-5).
    x, y = _xy()
    est = _estimates(kind, 16, x, y)
    se = est.std() / math.sqrt(len(est))
    assert abs(float(est.mean()) - float(x @ y)) < 4 * float(se)


@pytest.mark.parametrize("kind", ("gaussian", "sjlt"))
def test_variance_scales_as_one_over_k(kind):
    # Var(k=8)/Var(k=32) should be 4; with 300 seeds the ratio of sample variances lies in [2, 8]
    # with probability > 0.999 (F-distribution with 299, 299 d.o.f.).
    x, y = _xy(seed=1)
    v8, v32 = _estimates(kind, 8, x, y).var(), _estimates(kind, 32, x, y).var()
    assert 2.0 < float(v8 / v32) < 8.0
    jl = (float(x @ y) ** 2 + float(x @ x) * float(y @ y)) / 32
    assert 0.6 < float(v32) / jl < 1.5  # matches the JL variance formula used for the standard error


def test_srht_recovers_exact_at_full_width():
    x, y = _xy(size=100)
    m = SketchMap("srht", 128, 100, 3, (1, 2, 3))
    assert math.isclose(float(m.apply(x) @ m.apply(y)), float(x @ y), rel_tol=1e-10)
    assert torch.equal(fwht(torch.eye(2)), torch.tensor([[1.0, 1.0], [1.0, -1.0]]))


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed_and_independent_across_blocks(kind):
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = SketchMap(kind, 16, 64, 7, (0, 1, 2)).apply(x)
    assert torch.equal(a, SketchMap(kind, 16, 64, 7, (0, 1, 2)).apply(x))
    others = [SketchMap(kind, 16, 64, 8, (0, 1, 2)).apply(x), SketchMap(kind, 16, 64, 7, (0, 1, 3)).apply(x),
              SketchMap(kind, 16, 64, 7, (1, 1, 2)).apply(x)]
    for b in others:
        assert not torch.allclose(a, b)
    # independence: products of sketches from two different blocks average to ~0 cross-correlation
    corr = [float(torch.corrcoef(torch.stack([SketchMap(kind, 16, 64, s, (0, 0, 0)).apply(x[0]),
                                               SketchMap(kind, 16, 64, s, (0, 0, 1)).apply(x[0])]))[0, 1])
            for s in range(200)]
    assert abs(sum(corr) / len(corr)) < 0.05  # sd of the mean ≈ 0.26/√200 ≈ 0.018: ~3σ
    seeds = {int(block_generator(0, 0, b, h).initial_seed()) for b in range(4) for h in range(8)}
    assert len(seeds) == 32


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(KINDS), size=st.integers(1, 70), k=st.sampled_from([4, 8, 16]),
       dtype=st.sampled_from([torch.float32, torch.float64]), rows=st.integers(1, 3))
def test_dtype_and_shape_preserved(kind, size, k, dtype, rows):
    if kind == "srht" and k > 1 << math.ceil(math.log2(size)):
        with pytest.raises(sf.InputError, match="srht needs k"):
            SketchMap(kind, k, size, 0, (0, 0, 0))
        return
    m = SketchMap(kind, k, size, 0, (0, 0, 0))
    out = m.apply(torch.randn(rows, 2, size, dtype=dtype))
    assert out.dtype == dtype and out.shape == (rows, 2, k)


def test_quantisation_roundtrip():
    v = torch.randn(5, 3, 64, dtype=torch.float64)
    for dtype, tol in (("fp32", 1e-6), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 1e-2)):
        q, scale = quantize(v, dtype)
        err = (dequantize(q, scale) - v).abs().max() / v.abs().max()
        assert err < tol, dtype
    assert quantize(v, "int8")[0].dtype == torch.int8


def test_codec_validation():
    with pytest.raises(sf.InputError, match="Sketch.kind must be one of"):
        sf.Sketch(kind="fourier")
    with pytest.raises(sf.InputError, match="divisible by s"):
        sf.Sketch(k=10, kind="sjlt", s=4)
    with pytest.raises(sf.InputError, match="Sketch.dtype"):
        sf.Sketch(dtype="fp8")
    assert sf.Sketch(k=256, dtype="fp16").bytes_per_vector() == 512 + 4  # + the per-vector scale
    assert sf.Sketch(k=256, dtype="int8").bytes_per_vector() == 260


@pytest.fixture(scope="module")
def small():
    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=21), make_batches(3, 3, seed=22)
    return model, ta, tb, sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())


@pytest.mark.parametrize("vr", [False, True])
def test_sketch_codec_unbiased_over_seeds(small, vr):
    # Mean over 24 seeds of every score is within 5 combined standard errors of the exact score
    # for >= 99% of scores (each check alone fails with prob ~6e-7 under normality).
    model, ta, tb, exact = small
    runs = [sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16, kind="sjlt", seed=s, dtype="fp32",
                                                                       variance_reduction=vr)) for s in range(24)]
    est = torch.stack([r.scores for r in runs])
    se = est.std(0) / math.sqrt(len(runs))
    ok = (est.mean(0) - exact.scores).abs() <= 5 * se + 1e-9 * exact.scores.abs()
    assert ok.double().mean() > 0.99


def test_sketch_kv_shared_and_stderr_present(small):
    model, ta, tb, exact = small
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=32, kind="gaussian", seed=1))
    assert res.stderr.shape == res.scores.shape and (res.stderr > 0).all()
    assert torch.equal(res.scores[..., 0:4, 1], res.scores[..., 0:1, 1].expand(-1, -1, -1, 4))
    df = res.top_conflicts(5)
    assert (df["stderr"] > 0).all()


def test_sketch_needs_reiterable_tasks(small):
    model, ta, tb, _ = small
    with pytest.raises(sf.InputError, match="one-shot iterator"):
        sf.analyze(model, generic_loss, iter(ta), tb, codec=sf.Sketch(k=8))


@pytest.mark.parametrize("variant,normalizer", [("paper", "a"), ("paper", "pooled"), ("signed", "loo"),
                                                ("symmetric", "pooled")])
@pytest.mark.parametrize("vr", [False, True])
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_srht_full_width_codec_equals_exact(small, variant, normalizer, vr, stats_dtype):
    """k = P makes srht exact, so the whole sketch pipeline (side vectors, balancing, centering and
    the exact cross terms) must reproduce the exact scores for every variant and normaliser; with fp32
    statistics (the GPU setting) the balance and the centres are kept in one byte, which changes no score."""
    if normalizer == "loo" and stats_dtype == torch.float32:
        pytest.skip("leave-one-out's n·Î − g_i² cancels: fp32 statistics are not exact enough for it")
    model, ta, tb, _ = small
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), variant=variant, normalizer=normalizer)
    # head blocks of this model have 4 x 32 = 128 entries; k = 128 = P samples every Hadamard row
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=128, kind="srht", dtype="fp32",
                                                                   variance_reduction=vr),
                     variant=variant, normalizer=normalizer, stats_dtype=stats_dtype)
    # leave-one-out is ill-conditioned where one sample dominates an entry (n·Î − g_i² cancels), so
    # fp32 rounding differences between the two paths are amplified there
    scale = float(exact.scores.abs().max()) * (3e-4 if normalizer == "loo" else 1e-5)
    torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=scale)
    assert float(res.stderr.abs().max()) == 0.0


@pytest.mark.slow
def test_minilm_error_bars_cover_exact_scores():
    """On real MiniLM gradients the nominal 95% intervals cover 90-98% of exact scores."""
    from sketchfisher.demo import load_minilm, load_task, make_batches as mb, masked_token_loss

    model, tok = load_minilm()
    ta, tb = mb(load_task("math", 12), tok), mb(load_task("code", 12), tok)
    exact = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Factors())
    res = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Sketch(k=256, kind="sjlt", seed=0))
    cover = float(((res.scores - exact.scores).abs() <= 1.96 * res.stderr).double().mean())
    assert 0.90 <= cover <= 0.98, cover
    rel = ((res.scores - exact.scores).abs() / exact.scores.abs()).median()
    assert rel < 0.12


@pytest.mark.parametrize("kind,s", [("sjlt", 1), ("sjlt", 3), ("gaussian", 1), ("srht", 1)])
def test_all_heads_at_once_equals_each_head_by_its_map(kind, s):
    codec = sf.Sketch(k=48, kind=kind, seed=5, s=s)
    v = torch.randn(4, 5, 700, dtype=torch.float64)
    each = torch.stack([codec.map(1, 2, h, 700).apply(v[:, h]) for h in range(5)], 1)
    assert torch.equal(codec.apply_heads(1, 2, v), each)


@pytest.mark.parametrize("variant", ["paper", "signed", "symmetric"])
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_task_b_in_one_pass_equals_exact_at_full_width(small, variant, stats_dtype):
    """passes=1.5: B folded and sketched in one pass (balance from A, centred afterwards by linearity), A's
    pass 2 last. Full-width srht must give the exact scores; B's statistics are those of a pass 1."""
    model, ta, tb, _ = small
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), variant=variant)
    seen = {"a": 0, "b": 0}

    def counting(m, batch):  # forward passes over each task's batches
        seen["a" if any(batch is x for x in ta) else "b"] += 1
        return generic_loss(m, batch)

    res = sf.analyze(model, counting, ta, tb, codec=sf.Sketch(k=128, kind="srht", dtype="fp32"), variant=variant,
                     passes=1.5, stats_dtype=stats_dtype)
    assert (seen["a"], seen["b"]) == (2 * len(ta), len(tb))
    assert [row["phase"] for row in res.phases.rows()] == ["pass 1 A", "preparation", "pass B", "centring B",
                                                           "pass 2 A"]
    scale = float(exact.scores.abs().max()) * 1e-5
    torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=scale)
    assert res.context.stats_b.count == 3  # make_batches(3, 3): three samples
    if stats_dtype == torch.float32:
        return
    from sketchfisher.collect import collect

    # B's statistics, folded during its only pass, are those of a pass 1 (MLP units keep the task means)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16), variant=variant, passes=1.5,
                     units=("heads", "mlp"))
    _, pass1 = collect(model, generic_loss, tb, sf.layout_for(model), sf.Sketch(k=16), quantities=("abs", "sum"))
    for name in pass1.names():
        mean = res.context.stats_b.mean_abs if variant != "signed" else res.context.stats_b.mean_grad
        want = pass1.mean_abs(name) if variant != "signed" else pass1.mean_grad(name)
        torch.testing.assert_close(mean(name), want, rtol=1e-12, atol=0)


def test_task_b_in_one_pass_is_unbiased_with_calibrated_error_bars(small):
    model, ta, tb, exact = small
    runs = [sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16, seed=s, dtype="fp32"), passes=1.5)
            for s in range(24)]
    est = torch.stack([r.scores for r in runs])
    se = est.std(0) / math.sqrt(len(runs))
    assert ((est.mean(0) - exact.scores).abs() <= 5 * se + 1e-9 * exact.scores.abs()).double().mean() > 0.99
    z = torch.stack([(r.scores - exact.scores).abs() / r.stderr for r in runs])
    # (k = 16 on a tiny model: the error bars are a little conservative, 0.989 with √mean|g| balance and 0.990 with
    # the normaliser's power over 48 seeds; at the default k MiniLM covers 0.94-0.97, docs/benchmarks.md)
    assert 0.9 <= float((z <= 1.96).double().mean()) <= 0.993


def test_task_b_in_one_pass_refuses_what_it_cannot_do(small, tmp_path):
    model, ta, tb, _ = small
    for kw in (dict(normalizer="pooled"), dict(codec=sf.Sketch(k=8, variance_reduction=False)),
               dict(codec=sf.Factors()), dict(modules="all"), dict(passes=1)):
        with pytest.raises(sf.InputError, match="passes|normalizer='a'"):
            sf.analyze(model, generic_loss, ta, tb, **{"codec": sf.Sketch(k=8), "passes": 1.5, **kw})


def test_int4_dithered_storage_error_is_uniform_known_and_regenerated():
    """Two values per byte; the decoded error is uniform on ±scale/2, uncorrelated with the data; decoding
    regenerates the dither from what is stored (the same bits every time)."""
    from sketchfisher.compress.sketch import dequantize_int4, quantize

    v = torch.randn(400, 4, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(v, "int4", seed=3)
    assert q.dtype == torch.uint8 and q.shape == (400, 4, 32) and scale.shape == (400, 4)
    assert torch.equal(q, quantize(v, "int4", seed=3)[0]) and not torch.equal(q, quantize(v, "int4", seed=4)[0])
    err = (dequantize_int4(q, scale, 3) - v.double()) / scale.double()[..., None]
    assert float(err.abs().max()) <= 0.5
    assert abs(float(err.mean())) < 0.01 and abs(float(err.var() * 12) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([err.flatten(), v.double().flatten()]))[0, 1])) < 0.02
    codec = sf.Sketch(k=64, dtype="int4")
    assert codec.bytes_per_vector() == 32 + 4 and codec.stored_width(1000) == 32
    with pytest.raises(sf.InputError, match="even k"):
        sf.Sketch(k=63, dtype="int4")


@pytest.mark.parametrize("shape,k", [((64, 288), 1024), ((5, 7, 3), 1000), ((3,), 16), ((0, 4), 8), ((), 33)])
def test_cpu_dither_in_slices_has_the_formulas_bits(shape, k, monkeypatch):
    """The CPU's dither, hashed a slice of vectors at a time in place (here in slices of 3 vectors, so that
    slices end inside blocks and one is short), gives the bits of the one-expression formula the GPU runs."""
    from sketchfisher.compress import sketch as S
    from sketchfisher.kernels.hashing import fmix32

    m = 0xFFFFFFFF
    scale = torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 0.1
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & m
    base = fmix32(fmix32(bits ^ 7) ^ 0x5BD1E995)
    want = fmix32(base[..., None] ^ fmix32((torch.arange(k) + 0x9E3779B9) & m)).double() * 2.0 ** -32 - 0.5
    monkeypatch.setattr(S, "CPU_SLICE", 3 * k)
    got = S.dither(scale, k, 7)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("rotate", [False, True])
def test_int4_sketches_are_unbiased_with_error_bars_that_count_the_dither(small, rotate):
    """The dither's error is zero-mean and its variance is in every score's standard error: over seeds the
    estimates centre on the exact scores and the nominal 95% intervals cover 90–99% of them, in both orders,
    with and without the Hadamard rotation."""
    model, ta, tb, exact = small
    for passes in (2, 1.5):
        runs = [sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16, seed=s, dtype="int4", rotate=rotate),
                           passes=passes) for s in range(24)]
        est = torch.stack([r.scores for r in runs])
        se = est.std(0) / math.sqrt(len(runs))
        assert ((est.mean(0) - exact.scores).abs() <= 5 * se + 1e-9 * exact.scores.abs()).double().mean() > 0.99
        z = torch.stack([(r.scores - exact.scores).abs() / r.stderr for r in runs])
        assert 0.9 <= float((z <= 1.96).double().mean()) <= 0.99, passes


def test_hadamard_rotation_is_orthogonal_recorded_and_spreads_spikes():
    """``rotate=True``: decoding turns the stored vector back (fp32 storage gives the vector again), so inner
    products and norms are kept; the option is recorded only when on (older stores read as they were) and needs a
    power-of-two k; a vector with a few large entries loses far less to int4 rounding once rotated."""
    from sketchfisher.compress.codec import codec_from_dict
    from sketchfisher.compress.sketch import hadamard

    gen = torch.Generator().manual_seed(2)
    v = torch.randn(50, 3, 64, generator=gen)
    turned = sf.Sketch(k=64, dtype="fp32", rotate=True)
    assert not torch.equal(turned.encode(v)["vec"], v)  # stored turned
    torch.testing.assert_close(turned.decode(turned.encode(v)), v.double(), rtol=1e-6, atol=1e-6)
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(hadamard(x), x @ h)  # the Walsh-Hadamard matrix (symmetric)
    assert "rotate" not in sf.Sketch().to_dict() and codec_from_dict(turned.to_dict()) == turned
    with pytest.raises(sf.InputError, match="power-of-two k"):
        sf.Sketch(k=48, rotate=True)
    spiky = torch.randn(200, 1, 1024, generator=gen)
    spiky[..., :4] *= 30
    err = {r: float((c.decode(c.encode(spiky)) - spiky.double()).norm() / spiky.norm())
           for r, c in ((r, sf.Sketch(rotate=r)) for r in (False, True))}
    assert err[True] < err[False] / 4


@pytest.mark.parametrize("rotate", [False, True])
def test_int4_store_round_trip(small, tmp_path, rotate):
    model, ta, tb, _ = small
    codec = sf.Sketch(k=16, seed=1, dtype="int4", rotate=rotate)
    mem = sf.analyze(model, generic_loss, ta, tb, codec=codec)
    stored = sf.analyze(model, generic_loss, ta, tb, codec=codec, store=tmp_path / "s")
    again = sf.open_store(tmp_path / "s").result()
    assert torch.equal(again.scores, mem.scores) and torch.equal(again.stderr, mem.stderr)
    assert torch.equal(stored.scores, mem.scores)


@pytest.mark.parametrize("passes", [2, 1.5])
@pytest.mark.parametrize("variant", ["paper", "signed"])
def test_scaled_centring_is_exact_at_full_width_and_shrinks_every_residual(small, passes, variant):
    """Scaled centring takes each sample's best multiple of its side's centre away (γ recorded per vector) and
    adds it back exactly: full-width srht reproduces the exact scores, and no stored residual is longer than
    the mean-centred one where both use the same centre (the mean's multiple 1 is one of the candidates). Task
    B's single pass is centred by a direction from task A's statistics, during the pass."""
    model, ta, tb, _ = small
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), variant=variant)
    runs = {c: sf.analyze(model, generic_loss, ta, tb, variant=variant, passes=passes,
                          codec=sf.Sketch(k=128, kind="srht", dtype="fp32", centring=c)) for c in ("scaled", "mean")}
    scale = float(exact.scores.abs().max()) * 1e-5
    for res in runs.values():
        torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=scale)
    src = {c: r.context.source for c, r in runs.items()}
    scaled_any = False
    for key in src["mean"].side_a.keys():
        for side in ("side_a", "side_b"):
            mean, scaled = getattr(src["mean"], side).get(key), getattr(src["scaled"], side).get(key)
            assert mean.gamma is None and scaled.gamma is not None
            if side == "side_a" or passes == 2:  # the same centre, one more degree of freedom
                assert bool((scaled[1] <= mean[1] * (1 + 1e-5) + 1e-12).all())
            scaled_any |= bool(scaled.gamma.abs().max() > 1e-3)
    assert scaled_any


def test_scaled_centring_gains_where_samples_differ_in_scale(small):
    """Samples that share a direction but differ in size (per-sample loss scales): scaled centring removes
    the size from what is sketched, so the error falls well below that of centring by the mean, with
    error bars that still cover."""
    model, ta, tb, _ = small
    scaled_loss = lambda m, batch: generic_loss(m, batch) * (1 + 3 * torch.arange(len(batch["input_ids"])))  # noqa: E731
    exact = sf.analyze(model, scaled_loss, ta, tb, codec=sf.Factors())
    err = {}
    for centring in ("mean", "scaled"):
        runs = [sf.analyze(model, scaled_loss, ta, tb, codec=sf.Sketch(k=16, seed=s, dtype="fp32", centring=centring))
                for s in range(8)]
        err[centring] = torch.stack([(r.scores - exact.scores).abs() for r in runs]).mean()
        z = torch.stack([(r.scores - exact.scores).abs() / r.stderr for r in runs])
        assert 0.85 <= float((z <= 1.96).double().mean()) <= 0.995, centring
    assert err["scaled"] < 0.8 * err["mean"], err


def test_task_b_in_one_pass_is_centred_by_its_own_mean_when_scored(small, tmp_path):
    """Task B's single pass with scaled centring takes away each sample's own multiple of task A's centre x̄'
    during the pass; its mean residual m (orthogonal to x̄') is taken away when scoring, so the B vectors that
    are scored average to zero, as two passes per task would centre them, while the stored ones do not. A store
    scores the same, and a format-9 store of this kind (B centred by another direction) is refused."""
    import json

    from sketchfisher.store.manifest import seal

    model, ta, tb, _ = small
    codec = sf.Sketch(k=16, dtype="fp32")
    res = sf.analyze(model, generic_loss, ta, tb, codec=codec, passes=1.5, store=tmp_path / "s")
    ctx = res.context
    src = ctx.source
    assert src.residual
    offset = []
    for key in ctx.layout.groups():
        a, b = src.side_a.get(key), src.side_b.get(key)
        blk = codec.block_scores(a, b, src.e.get(key), ctx.layout.head_blocks(*key)[0].numel,
                                 residual=src.residual.get(key))
        rms = blk.yb.square().mean().sqrt()
        assert float(blk.yb.mean(0).abs().max()) <= 2e-2 * float(rms)  # (B's mean is kept rounded to bf16)
        offset.append(float(b[0].mean(0).abs().max() / rms))
    assert max(offset) > 0.1  # (the stored vectors kept B's mean residual)
    again = sf.open_store(tmp_path / "s").result()
    torch.testing.assert_close(again.scores, res.scores, rtol=1e-5, atol=1e-5 * float(res.scores.abs().max()))
    path = tmp_path / "s" / "manifest.json"
    path.write_text(json.dumps(seal({**json.loads(path.read_text()), "format_version": 9})))
    with pytest.raises(sf.StoreError, match="format version 9 centred task B's single pass"):
        sf.open_store(tmp_path / "s")


def test_store_written_before_scaled_centring_reads_as_mean_centred(small, tmp_path, monkeypatch):
    """A format-7 store (no γ in its shards, a codec without a centring) is read as what it is: centred by the
    means, the same scores as when it was written. (The store is today's, relabelled: its preparations are read by
    today's recipe, as a real format-7 store is read by its own, ``collect.sketches.recipe_of``.)"""
    import json

    from sketchfisher.collect.sketches import RECIPE
    from sketchfisher.store.manifest import seal

    monkeypatch.setattr("sketchfisher.interference.stored.recipe_of", lambda version: RECIPE)

    model, ta, tb, _ = small
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16, centring="mean"), store=tmp_path / "s")
    path = tmp_path / "s" / "manifest.json"
    m = json.loads(path.read_text())
    codec = {k: v for k, v in m["codec"].items() if k != "centring"}
    path.write_text(json.dumps(seal({**m, "format_version": 7, "codec": codec})))
    old = sf.open_store(tmp_path / "s")
    assert old.codec.centring == "mean"
    torch.testing.assert_close(old.result().scores, res.scores, rtol=0, atol=0)


def _planted_block(rank_one: bool, n=32, d=2048, seed=0):
    """Side vectors of one planted head block: nearly rank one (one shared direction per side, 3% noise) or
    spread over many directions."""
    g = torch.Generator().manual_seed(seed)
    if not rank_one:
        return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    u, v = torch.randn(2, d, generator=g, dtype=torch.float64)
    noise = lambda: 0.03 * torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return (torch.randn(n, 1, generator=g, dtype=torch.float64) * u + noise(),
            torch.randn(n, 1, generator=g, dtype=torch.float64) * v + noise())


@pytest.mark.parametrize("rank_one", [True, False])
def test_a_blocks_pairs_share_their_sketch_error_when_its_vectors_span_few_directions(rank_one):
    """Planted: a head block whose side vectors span one direction each, and one whose vectors span many. The
    sketch's 95% intervals hold on average over maps in both; under one map the rank-one block's pairs hold or
    fail together (the fraction that holds swings from map to map), the spread one holds steady. The block's
    estimated ranks (from its sketches) tell the two apart, and the spread they predict is of the size seen."""
    from sketchfisher.compress.sketch_block import SketchBlock

    x, y = _planted_block(rank_one)
    k, exact = 256, x @ y.T
    zeros = lambda n: torch.zeros(n, 1, dtype=torch.float64)  # noqa: E731
    covered, predicted = [], []
    for seed in range(120):
        m = SketchMap("sjlt", k, x.shape[1], seed, (0, 1, 2))
        blk = SketchBlock(m.apply(x)[:, None], x.square().sum(1)[:, None], zeros(len(x)), m.apply(y)[:, None],
                          y.square().sum(1)[:, None], zeros(len(y)), torch.zeros(1, dtype=torch.float64), k, 1.0)
        scores, se = blk.rows(0, len(x))
        covered.append(float(((scores[..., 0] - exact).abs() <= 1.959964 * se[..., 0]).double().mean()))
        rank_a, rank_b = blk.shared_error_ranks()
        predicted.append(float(rank_a * rank_b))
    covered, independent = torch.tensor(covered), torch.tensor(predicted).median()
    assert 0.90 <= float(covered.mean()) <= 0.99  # right on average over maps either way
    spread = float(covered.std())
    if rank_one:
        assert float(independent) < 3 and spread > 0.15, (float(independent), spread)
    else:
        assert float(independent) > 300 and spread < 0.03, (float(independent), spread)
    assert 0.3 <= spread / math.sqrt(0.95 * 0.05 / float(independent)) <= 3  # the predicted spread's size


def test_shared_errors_table(small, tmp_path):
    """``res.shared_errors()`` gives each distinct head block's ranks, from memory and from a store alike; exact
    scores have no sketch error to describe."""
    model, ta, tb, _ = small
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Sketch(k=16), store=tmp_path / "s")
    df = res.shared_errors()
    stored = sf.open_store(tmp_path / "s").result().shared_errors()
    torch.testing.assert_close(torch.tensor(stored["independent_errors"].to_numpy()),
                               torch.tensor(df["independent_errors"].to_numpy()), rtol=1e-6, atol=0)
    assert list(df.columns) == ["block", "layer", "head", "rank_a", "rank_b", "independent_errors", "coverage_spread"]
    n_blocks = sum(len(res._first_heads(b)) for b in range(4)) * res.layout.num_layers
    assert len(df) == n_blocks
    assert ((df.rank_a >= 1) & (df.rank_a <= res.n_a) & (df.rank_b >= 1) & (df.rank_b <= res.n_b)).all()
    with pytest.raises(sf.InputError, match="exact scores"):
        sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors()).shared_errors()
