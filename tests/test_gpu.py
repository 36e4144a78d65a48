"""CUDA checks, run on the device machine: ``python -m pytest -m gpu tests/test_gpu.py``."""

import pytest
import torch

import sketchfisher as sf
from sketchfisher.compress.sketchmaps import SketchMap
from tiny_models import assert_same_analysis, generic_loss, make_batches, make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["gaussian", "sjlt", "srht"])
def test_sketch_maps_identical_on_cpu_and_cuda(kind):
    x = torch.randn(4, 3000, dtype=torch.float64)
    m = SketchMap(kind, 64, 3000, 5, (1, 2, 3))
    torch.testing.assert_close(m.apply(x.cuda()).cpu(), m.apply(x), rtol=1e-10, atol=1e-10)


def test_all_heads_in_one_kernel_equal_a_map_per_head():
    """Sketch.apply_heads on CUDA (one launch for every head, as B's centre in the 1.5-pass order) against the
    per-head maps on the GPU and the one-scatter CPU path."""
    codec = sf.Sketch(k=48, kind="sjlt", seed=5, s=2)
    v = torch.randn(4, 5, 700, device="cuda")
    each = torch.stack([codec.map(1, 2, h, 700).apply(v[:, h]) for h in range(5)], 1)
    torch.testing.assert_close(codec.apply_heads(1, 2, v), each, rtol=1e-6, atol=1e-6)
    cpu = codec.apply_heads(1, 2, v.cpu().double())
    torch.testing.assert_close(codec.apply_heads(1, 2, v).cpu().double(), cpu, rtol=1e-5, atol=1e-5)


def test_int4_codes_bitwise_identical_on_cpu_and_cuda():
    """The dither is a counter-based hash of the scale's bits: the same codes, scales and decoded vectors on
    either device, so a store collected on a GPU decodes the same on a laptop."""
    from sketchfisher.compress.sketch import dequantize_int4, quantize

    v = torch.randn(64, 4, 1024, dtype=torch.float32) * torch.logspace(-6, 3, 64)[:, None, None]
    (qc, sc), (qg, sg) = quantize(v, "int4", 7), quantize(v.cuda(), "int4", 7)
    assert torch.equal(qg.cpu(), qc) and torch.equal(sg.cpu(), sc)
    assert torch.equal(dequantize_int4(qg, sg, 7).cpu(), dequantize_int4(qc, sc, 7))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_byte_codes_bitwise_identical_on_cpu_and_cuda(dtype):
    """The one-byte preparations (one division in fp64, rounded once) give the same codes and scales on either
    device, from fp64 or fp32 values, over 60 orders of magnitude of block scale."""
    from sketchfisher.compress.onebyte import OneByte

    x = (torch.randn(64, 4, 1024, dtype=torch.float64) * torch.logspace(-30, 30, 64, dtype=torch.float64)[:, None, None]
         ).to(dtype)
    for positive in (False, True):
        xs = x.abs() if positive else x
        c, g = OneByte.encode(xs, positive=positive), OneByte.encode(xs.cuda(), positive=positive)
        assert torch.equal(g.scale.cpu(), c.scale)
        assert torch.equal(g.codes.cpu().view(torch.uint8), c.codes.view(torch.uint8))


@pytest.mark.parametrize("passes", [2, 1.5])
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_scores_identical_on_cpu_and_cuda(passes, stats_dtype):
    """The same settings give the same scores on either device; with fp32 statistics (the GPU default) both
    keep Σ|g| in bf16 with the same stochastic rounding and bf16 balances and centres."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    for codec in (sf.Factors(), sf.Sketch(k=32, kind="sjlt", seed=0, dtype="fp32")):
        kw = dict(codec=codec, passes=passes if codec.two_pass else None, stats_dtype=stats_dtype)
        cpu = sf.analyze(model, generic_loss, ta, tb, **kw)
        gpu = sf.analyze(model.cuda(), generic_loss, to(ta), to(tb), **kw)
        model.cpu()
        allowed = 1e-4 * cpu.scores.abs() + 1e-6 * float(cpu.scores.abs().max())
        if codec.two_pass and (stats_dtype == torch.float32 or passes == 1.5):
            # the kernel and the torch update sum a batch's |g| in other orders (fp32); where that moves a sum
            # across a stochastic-rounding threshold of the bf16 Σ|g|, a balance moves by 2^-8: a valid estimate
            # with the same expectation, a small fraction of the error bar away; and in the single pass over task
            # B, scaled centring's γ is a ratio of fp32 inner products that the two paths sum in other orders
            allowed = allowed + 0.1 * cpu.stderr
        worst = float(((gpu.scores - cpu.scores).abs() / allowed).max())
        assert worst <= 1, (codec, worst, float((gpu.scores - cpu.scores).abs().max()))


def test_shared_errors_on_cuda_equal_cpu():
    """``res.shared_errors()`` reads a CUDA result's sketches where they are and gives the CPU table."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(6, 3, seed=1), make_batches(5, 3, seed=2)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    codec = sf.Sketch(k=32, dtype="fp32")
    cpu = sf.analyze(model, generic_loss, ta, tb, codec=codec, stats_dtype=torch.float64).shared_errors()
    gpu = sf.analyze(model.cuda(), generic_loss, to(ta), to(tb), codec=codec, stats_dtype=torch.float64).shared_errors()
    model.cpu()
    torch.testing.assert_close(torch.tensor(gpu["independent_errors"].to_numpy()),
                               torch.tensor(cpu["independent_errors"].to_numpy()), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("units", ["heads", "all"])
def test_conflict_table_on_cuda_equals_cpu(units, tmp_path):
    """The conflict test of CUDA results (exact, sketched in both orders, from a store) is the CPU one; the
    distributions-differ permutation test runs on CUDA results too."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(8, 4, seed=1), make_batches(6, 3, seed=2)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    for codec, passes in ((sf.Factors(), None), (sf.Sketch(k=32), 2), (sf.Sketch(k=32), 1.5)):
        cpu = sf.analyze(model, generic_loss, ta, tb, codec=codec, passes=passes, units=units)
        gpu = sf.analyze(model.cuda(), generic_loss, to(ta), to(tb), codec=codec, passes=passes, units=units)
        model.cpu()
        for family in cpu.families:
            want, got = cpu.units(family).head_conflicts(), gpu.units(family).head_conflicts()
            want, got = (t.sort_values(list(t.columns[:3])) for t in (want, got))  # (ties in p may swap rows)
            # T and alignment from the exact means; the standard error from conflict weights kept in one byte,
            # rounded from the GPU's fp32 (bf16-summed) or the CPU's fp64 means (tests/test_conflicts.py)
            for column, tol in (("T", 2e-3), ("alignment", 2e-3), ("stderr", 3e-2)):
                torch.testing.assert_close(torch.tensor(got[column].to_numpy()), torch.tensor(want[column].to_numpy()),
                                           rtol=tol, atol=tol * float(want[column].abs().max()))
        if not codec.two_pass:
            assert len(gpu.distributions_differ(n_permutations=9)) > 0
    stored = sf.analyze(model.cuda(), generic_loss, to(ta), to(tb), codec=sf.Sketch(k=32), units=units,
                        store=tmp_path / "s")
    model.cpu()
    assert len(stored.head_conflicts()) > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("size,k,s", [(524288, 256, 1), (524288, 256, 4), (3001, 64, 2), (40, 1024, 1), (999, 96, 1)])
def test_cuda_sjlt_kernel_matches_cpu_map(dtype, tol, size, k, s):
    from sketchfisher import kernels

    assert kernels.available(), "Triton is not usable on the device"
    x = torch.randn(5, size, generator=torch.Generator().manual_seed(1))
    m = SketchMap("sjlt", k, size, 11, (2, 3, 4), s=s)
    want = m.apply(x.double())  # the CPU index_add_ path
    out = m.apply(x.to(dtype).cuda())
    assert out.dtype == dtype
    got = out.double().cpu()
    assert float((got - want).norm() / want.norm()) < tol
    again = m.apply(x.to(dtype).cuda())
    assert torch.equal(out, again), "the kernel must be bitwise reproducible"


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch,variant,normalizer", [("llama_gqa", "paper", "a"), ("gpt2", "signed", "pooled"),
                                                     ("llama_gqa", "symmetric", "loo")])
@pytest.mark.parametrize("units", ["heads", "all"])
def test_fused_cuda_collection_matches_torch_path(monkeypatch, model_dtype, arch, variant, normalizer, units):
    """Fused pass 1 (Welford kernel) and pass 2 (side sketch kernel) against the torch code on the same GPU,
    for head blocks and MLP channel-group blocks (rows of UP/GATE, columns of DOWN; Conv1D for GPT-2). The side
    kernel is compared on the same statistics (the Welford kernel's in both runs): the preparations' one-byte codes
    then agree, where statistics summed in another order could move a code by a step, a different (as accurate)
    estimate; the Welford kernel is compared with the torch update on its own."""
    from sketchfisher.compress import fused as sketching
    from sketchfisher.fisher import FisherStats

    model = make_model(arch).cuda().to(model_dtype)
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    kw = dict(codec=sf.Sketch(k=64, kind="sjlt", seed=3, dtype="fp32"), variant=variant, normalizer=normalizer,
              stats_dtype=torch.float32, units=units)
    fused = sf.analyze(model, generic_loss, to(ta), to(tb), **kw)
    with monkeypatch.context() as patch:
        patch.setattr(FisherStats, "_kernel_applies", lambda self, g, state: False)
        torch_stats = sf.analyze(model, generic_loss, to(ta), to(tb), **kw)
    for t in ("a", "b"):  # pass 1 (and B's statistics folded in its pass): the Welford kernel against torch
        got, want = getattr(fused.context, f"stats_{t}"), getattr(torch_stats.context, f"stats_{t}")
        for name in got.names():
            if "fisher" in got.quantities:
                torch.testing.assert_close(got.fisher(name), want.fisher(name), rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(sketching.FusedSides, "applies", lambda self, factor: False)
    plain = sf.analyze(model, generic_loss, to(ta), to(tb), **kw)
    for family in fused.families:
        f, p = fused.units(family), plain.units(family)
        scale = float(p.scores.abs().max())
        torch.testing.assert_close(f.scores, p.scores, rtol=1e-3, atol=1e-4 * scale)
        torch.testing.assert_close(f.stderr, p.stderr, rtol=1e-3, atol=1e-4 * scale)
        want, got = (r.head_conflicts() for r in (p, f))  # conflict scalars read inside the sketch kernel
        want, got = (t.sort_values(list(t.columns[:3])) for t in (want, got))  # (layer, unit, block)
        for column in ("T", "stderr"):
            torch.testing.assert_close(torch.tensor(got[column].to_numpy()), torch.tensor(want[column].to_numpy()),
                                       rtol=1e-3, atol=1e-4 * float(want[column].abs().max()))


def test_replays_record_a_call_the_second_time_and_replay_it_where_its_inputs_lie(monkeypatch):
    """``kernels.graphs.Replays``: the first call of a key runs directly (its kernels compile), the second records
    and replays, later ones replay; a replay reads its input's current values at the recorded place, returns a copy
    that the next replay does not touch, and an input elsewhere runs directly."""
    from sketchfisher.kernels import graphs
    from sketchfisher.kernels.graphs import Replays

    monkeypatch.setattr(graphs, "RECORDED", graphs.recorded_kinds("statistics"))
    replays = Replays("statistics")
    x = torch.randn(1000, device="cuda")
    fn = lambda t: torch.exp(t) * 2 + t.sum()  # noqa: E731
    outs = [replays("k", fn, x) for _ in range(3)]
    assert replays.replayed == 2 and len(replays.graphs) == 1
    for out in outs:
        torch.testing.assert_close(out, fn(x), rtol=0, atol=0)
    x.copy_(torch.randn(1000, device="cuda"))  # (new values, the same place)
    again = replays("k", fn, x)
    torch.testing.assert_close(again, fn(x), rtol=0, atol=0)
    assert not torch.equal(outs[0], again)  # (the earlier copies are the caller's)
    elsewhere = x.clone()
    assert torch.equal(replays("k", fn, elsewhere), fn(elsewhere)) and replays.replayed == 3
    layers = Replays("layers")  # (a kind not recorded: every call runs directly)
    assert all(torch.equal(layers("k", fn, x), fn(x)) for _ in range(3)) and layers.replayed == 0 and not layers.graphs
    replays.forget("k")
    assert not replays.graphs


@pytest.mark.parametrize("kinds,tiled", [(("statistics",), False), (("statistics", "layers"), False),
                                         (("statistics", "layers"), True)])
def test_recorded_launches_give_the_statistics_and_scores_of_direct_launches(monkeypatch, kinds, tiled):
    """``sf.analyze`` on a bf16 model with recorded launches gives bitwise the statistics, scores and conflict table of
    launching every call, over batches of two sizes: one recording per parameter's Welford update (side kernels
    launched), or one per layer's updates and side kernels (the default, ``collect.layers``), the per-sample
    gradients in one buffer per module of a layer; and so with the preparations in the side kernel's tile order and
    each step's loads issued a step ahead (the direct launches read them in their own order, step by step)."""
    from sketchfisher import kernels
    from sketchfisher.compress import fused
    from sketchfisher.kernels import graphs

    made = []
    init = graphs.Replays.__init__

    def keep(self, kind):
        init(self, kind)
        made.append(self)

    monkeypatch.setattr(graphs.Replays, "__init__", keep)
    monkeypatch.setattr(graphs, "RECORDED", frozenset(kinds))
    model = make_model("llama_gqa").cuda().to(torch.bfloat16)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    ta, tb = to(make_batches(12, 2, seed=1)), to(make_batches(10, 2, seed=2) + make_batches(1, 1, seed=3))
    kw = dict(codec=sf.Sketch(k=64, kind="sjlt", seed=3), units="all")
    monkeypatch.setattr(fused, "TILED", tiled)
    monkeypatch.setattr(kernels, "PREFETCH", tiled)
    replayed = sf.analyze(model, generic_loss, ta, tb, **kw)
    # per parameter: pass 1 A's and pass B's statistics; per layer: pass 1 A, pass B and pass 2 A
    assert sum(r.replayed > 0 for r in made) == (2 if "layers" not in kinds else 3)
    assert not any(r.broken for r in made)
    # one key per block, parameter or layer, recorded once per batch size (a shared key would stop at graphs.PER_KEY)
    assert all(max(r.count.values(), default=0) <= 2 for r in made)
    monkeypatch.setattr(graphs, "RECORDED", graphs.recorded_kinds("off"))
    monkeypatch.setattr(fused, "TILED", False)
    monkeypatch.setattr(kernels, "PREFETCH", False)
    direct = sf.analyze(model, generic_loss, ta, tb, **kw)
    assert_same_analysis(replayed, direct)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("cols", [4096, 344])
def test_tiled_preparations_on_cuda_give_the_rotated_loads_outputs_bitwise(cols, prefetch):
    """At 7B head-block sizes (a q block; a down_proj channel group, strided), one-byte centres and conflict weights,
    the side kernel with its preparations in tile order (vectorised loads), with or without each step's loads issued
    a step ahead, gives the rotated loads' outputs bitwise, ``tile_order`` stores each tile as the map reads it, and
    ``untile`` restores the tensors exactly."""
    from sketchfisher import kernels
    from sketchfisher.compress.onebyte import OneByte
    from sketchfisher.kernels.hashing import sjlt_codes

    torch.manual_seed(0)
    H, k, rows = 4, 256, 128 if cols == 4096 else 256
    size, dev = rows * cols, torch.device("cuda")
    keys = torch.randint(0, 2**31 - 1, (H, 2))
    centre = OneByte.encode((torch.rand(H, size, device=dev) - 0.5))
    u = OneByte.encode(torch.randn(2, H, size, device=dev))
    given = dict(weight=torch.rand(H, size, device=dev), centre=centre.codes, other=centre.codes, conflict=u.codes)
    scales = {"centre": centre.scale, "other": centre.scale, "conflict": u.scale}
    row_stride = 4096 if cols == 4096 else 11008
    offsets = torch.arange(H) * (size if cols == 4096 else cols)
    g = torch.randn(2, rows * row_stride if cols != 4096 else H * size, device=dev).to(torch.bfloat16)

    def launch(tiled, tensors, prefetch=prefetch):
        return kernels.SketchHeads(keys, offsets, size, cols, row_stride, k, 1, device=dev, transform="identity",
                                   scales=scales, tiled=tiled, prefetch=prefetch, **tensors)

    want = launch(False, given, prefetch=False).run(g)
    assert torch.equal(launch(False, given).run(g), want)
    mine = {name: t.clone() for name, t in given.items() if name != "other"}
    mine["other"] = mine["centre"]
    sh = launch(True, mine)
    assert sh.tiled and torch.equal(sh.run(g), want)
    rows0, _ = sjlt_codes(tuple(keys[1].tolist()), size, 1, k, device=dev)
    e = torch.arange(size, device=dev)
    assert torch.equal(mine["weight"][1][e // k * k + rows0[0]], given["weight"][1])
    sh.untile()
    assert all(torch.equal(mine[n].view(torch.uint8), t.view(torch.uint8)) for n, t in given.items())


def test_kept_compiled_kernels_launch_as_the_jit_does():
    """After its first call, a specialisation's compiled kernel is launched directly (``kernels.Launches``): the side
    kernel (both launches) and the Welford update give bitwise what the JIT's launch gives, batch sizes changing
    in between, and the direct path is taken."""
    from sketchfisher import kernels
    from sketchfisher.compress.onebyte import OneByte

    gen = torch.Generator(device="cuda").manual_seed(4)
    H, size, k = 3, 5000, 64
    keys, offsets = torch.randint(0, 2**31 - 1, (H, 2)), torch.arange(H) * size
    ob = OneByte.encode(torch.rand(H, size, device="cuda", generator=gen) - 0.5)
    options = dict(transform="square", weight=torch.rand(H, size, device="cuda", generator=gen), centre=ob.codes,
                   other=ob.codes, conflict=torch.randn(2, H, size, device="cuda", generator=gen).to(torch.bfloat16),
                   scales={"centre": ob.scale, "other": ob.scale})
    cuda = torch.device("cuda", torch.cuda.current_device())
    kept = kernels.SketchHeads(keys, offsets, size, size, size, k, 1, device=cuda, **options)
    for n in (2, 2, 3, 2, 3):  # (the first call of each size goes through the JIT)
        g = torch.randn(n, H * size, device="cuda", generator=gen).to(torch.bfloat16)
        fresh = kernels.SketchHeads(keys, offsets, size, size, size, k, 1, device=cuda, **options)
        for mine, theirs in zip(kept(g), fresh(g)):
            assert torch.equal(mine, theirs)
    assert all(len(launch.kept) == 2 for launch in kept._kept), "one kept kernel per batch size and launch"

    g = torch.randn(3, 4000, device="cuda", generator=gen).to(torch.bfloat16)
    first = [torch.rand(4000, device="cuda", generator=gen) for _ in range(4)]
    states = [first] + [[t.clone() for t in first] for _ in range(2)]
    kernels._welford.cache_clear()
    for state in states:  # the JIT, then the kept kernel twice
        kernels.welford_update(g, *state[:4], count=5)
    assert len(kernels._welford().kept) == 1
    for state in states[1:]:
        for mine, theirs in zip(state, states[0]):
            assert torch.equal(mine, theirs)


def test_fused_welford_matches_cpu():
    from sketchfisher.fisher import FisherStats

    cpu, gpu = FisherStats(dtype=torch.float64), FisherStats(dtype=torch.float64)
    for B in (3, 5):
        g = torch.randn(B, 64, 33, dtype=torch.float64)
        cpu.update({"w": g})
        gpu.update({"w": g.float().cuda()})
    for a, b in ((gpu.welford["w"].mean, cpu.welford["w"].mean), (gpu.welford["w"].m2, cpu.welford["w"].m2),
                 (gpu.sum_abs["w"], cpu.sum_abs["w"]), (gpu.sum_g["w"], cpu.sum_g["w"])):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)


def test_bf16_per_sample_gradients_are_the_fp32_product_rounded_once():
    """A bf16 model's per-sample gradients for statistics and sketches (``low=True``): the fp32 product of its
    factors rounded once to bf16 (no bf16 partial sums, even over a long token axis); fp16 models and stored
    gradients keep fp32."""
    from sketchfisher.capture import FactorCapture

    for dtype, low_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        model = make_model("llama_gqa").cuda().to(dtype)
        ids = torch.randint(2, 50, (3, 400), generator=torch.Generator().manual_seed(4))
        batch = {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()}  # (a long token axis)
        name = next(n for n, m in model.named_modules() if n.endswith("q_proj"))
        with FactorCapture(model, [name]) as cap:
            bf = cap.run(generic_loss, batch)
        want, got = bf.grad(name), bf.grad(name, low=True)
        assert want.dtype == torch.float32 and got.dtype == low_dtype
        rounded = want.to(low_dtype).float()
        # one bf16 step either side of a rounding boundary, plus the fp32 sums' own order (cancelled entries)
        tol = want.abs() * 2.0 ** -7 + want.abs().max() * 2.0 ** -20
        assert bool(((got.float() - rounded).abs() <= tol).all())
        assert float((got.float() - want).norm() / want.norm()) < 2.0 ** -8


def test_bf16_sums_of_fp32_statistics_on_cuda_equal_cpu():
    """fp32 statistics (the GPU setting) accumulate Σ|g|, Σg and the half sum in bf16 with stochastic rounding:
    the CUDA kernel draws the torch update's random bits (batches of 2: one fp32 sum order on either device)."""
    from sketchfisher.fisher import FisherStats

    quantities = ("fisher", "abs", "sum", "half")
    cpu, gpu = FisherStats.accumulating(torch.float32, quantities), FisherStats.accumulating(torch.float32, quantities)
    for step in range(50):
        g = 0.2 + torch.randn(2, 64, 33, generator=torch.Generator().manual_seed(step))
        cpu.update({"w": g})
        gpu.update({"w": g.cuda()})
    for (q, a), (_, b) in zip(gpu.sums(), cpu.sums()):
        assert a["w"].dtype == torch.bfloat16 and torch.equal(a["w"].cpu(), b["w"]), q


def test_the_planner_reads_the_process_memory_fraction():
    """A process held to part of the card (an 80 GB budget on a larger one) is budgeted within that part."""
    from sketchfisher.collect.fit import _process_cap

    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.cuda.set_per_process_memory_fraction(0.25, 0)
        assert _process_cap(0) == pytest.approx(0.25 * total)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert _process_cap(0) == pytest.approx(total)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_equal_single_process(tmp_path):
    from test_distributed import two_ranks_equal_single_process

    two_ranks_equal_single_process(tmp_path, "nccl")


def test_statistics_move_to_host_once_consumed_and_scores_do_not_change():
    """Building the preparations moves each parameter's statistics to host memory: same scores, bitwise."""
    from sketchfisher.collect import collect, needed_statistics, prepare_all

    model = make_model("llama_gqa").cuda()
    ta = [{k: v.cuda() for k, v in b.items()} for b in make_batches(5, 2, seed=1)]
    tb = [{k: v.cuda() for k, v in b.items()} for b in make_batches(4, 3, seed=2)]
    layout, codec, cfg = sf.layout_for(model), sf.Sketch(k=32, dtype="fp32"), sf.ScoreConfig()
    needs = needed_statistics(cfg, codec)
    stats = [collect(model, generic_loss, t, layout, codec, quantities=needs[k])[1] for t, k in ((ta, "a"), (tb, "b"))]
    kept = prepare_all(layout, *stats, cfg, codec, offload=False)
    assert all(w.mean is None or w.mean.is_cuda for w in stats[0].welford.values())
    import gc
    import weakref

    on_device = [weakref.ref(t) for s in stats for t in [*(w.mean for w in s.welford.values()),
                                                         *(t for _, acc in s.sums() for t in acc.values())]
                 if t is not None and t.is_cuda]
    moved = prepare_all(layout, *stats, cfg, codec, offload=True)
    gc.collect()
    assert on_device and all(ref() is None for ref in on_device)  # nothing keeps them on the card (the memory plan)
    assert all(w.mean.device.type == "cpu" for w in stats[0].welford.values())  # the Fisher, kept on the host
    assert not stats[0].sum_abs and not stats[1].sum_abs  # consumed by the preparations, freed
    assert stats[0].quantities == ("fisher",) and stats[1].quantities == ()
    for key, prep in kept.items():
        assert prep.w_a.is_cuda and torch.equal(prep.w_a, moved[key].w_a) and torch.equal(prep.e, moved[key].e)


def test_overlapped_host_copies_are_complete_on_leaving_and_their_sources_are_not_reused_early(monkeypatch):
    """Copies inside ``HostStaging.overlapped`` return before they are done: the device may free and reuse the
    sources at once (queued work overwrites the freed memory), and the host copies hold the values as they were
    when copied once the block is left, more copies than are kept in flight included."""
    from sketchfisher.fisher import HostStaging, host

    monkeypatch.setattr(host, "PIN", True)
    n, count = 1 << 22, host.IN_FLIGHT + 5
    with HostStaging([(n, torch.float32)] * count) as staging:
        gen = torch.Generator(device="cuda").manual_seed(0)
        sources = [torch.randn(n, device="cuda", generator=gen) for _ in range(count)]
        expected = [t.cpu() for t in sources]
        copies = []
        with staging.overlapped():
            for i in range(count):
                slow = sources[i] @ torch.ones(1, device="cuda").expand(n).contiguous() * 0  # (device busy first)
                t = sources[i] + slow
                sources[i] = None
                copies.append(staging.copy(t))
                del t
                torch.full((n,), float("nan"), device="cuda")  # (reuses freed memory where it may)
        assert all(c.is_pinned() for c in copies)
        for got, want in zip(copies, expected):
            assert torch.equal(got, want)
        assert staging._in_flight is None
        assert torch.equal(staging.copy(torch.ones(3, device="cuda")), torch.ones(3))  # (outside: the ordinary copy)


def test_copies_ahead_reach_the_device_in_order_while_it_is_busy():
    """``CopiesAhead`` on CUDA: each item's page-locked host tensor arrives on a copy stream, queued one item
    ahead, and the current stream's work reads it only once it is there (the device kept busy before every read)."""
    from sketchfisher.fisher.host import CopiesAhead

    n, names = 1 << 22, [f"p{i}" for i in range(6)]
    host = {name: torch.randn(n, generator=torch.Generator().manual_seed(i)).pin_memory()
            for i, name in enumerate(names)}
    ahead = CopiesAhead(names, lambda name, what: host[name])
    dev = torch.device("cuda", torch.cuda.current_device())
    busy = torch.randn(2048, 2048, device=dev)
    got = []
    for name in names:
        for _ in range(20):
            busy = (busy @ busy).tanh_()  # (the current stream is behind when the copy is asked for)
        t = ahead.get(name, "fisher", dev)
        assert t.is_cuda and t.device == dev
        got.append((t * 1.0).cpu())  # (work on the current stream reads the copy)
        del t
    for name, g in zip(names, got):
        assert torch.equal(g, host[name])
    assert not ahead._queued  # (the last item has no next one)


def test_staged_host_copies_and_background_store_writes_change_nothing(tmp_path, monkeypatch):
    """Statistics copied into host buffers made ready in the background, and a store whose pass-1 files and
    shards are written by a background thread (one transfer per shard), give the in-memory scores."""
    from sketchfisher.collect.sketches import host_staging
    from sketchfisher.fisher import host
    from sketchfisher.store.shards import ShardParts

    model = make_model("llama_gqa").cuda()
    ta = [{k: v.cuda() for k, v in b.items()} for b in make_batches(5, 2, seed=1)]
    tb = [{k: v.cuda() for k, v in b.items()} for b in make_batches(4, 3, seed=2)]
    layout, codec = sf.layout_for(model), sf.Sketch(k=32, kind="sjlt", seed=0, dtype="fp32")
    monkeypatch.setattr(host, "PIN", True)
    staging = host_staging(model, layout, [torch.float32, torch.bfloat16])
    assert staging is not None
    w = model.get_parameter(layout.params[0]).detach().float()
    host, host_bf16 = staging.copy(w), staging.copy(w.bfloat16())
    assert torch.equal(host, w.cpu()) and torch.equal(host_bf16, w.bfloat16().cpu())
    assert host.is_pinned() and host_bf16.is_pinned()  # (page-locked: the copies back are direct transfers)
    back = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, w)
    del host, host_bf16, back  # unlocked, then freed
    staging.close()
    blocks = {(0, "Q"): (torch.randn(3, 4, 8, device="cuda"), torch.rand(3, 4, device="cuda"), torch.randn(3, 4, device="cuda"),
                         torch.randn(3, 4, device="cuda"))}  # (sketches, ‖ṽ‖², cross, γ)
    shard = ShardParts.of(blocks, sf.Sketch(k=8, dtype="int8")).tensors()  # asynchronous copy, then waited for
    assert shard["0.Q.norm2"].device.type == "cpu" and torch.equal(shard["0.Q.norm2"], blocks[(0, "Q")][1].double().cpu())
    assert torch.equal(shard["0.Q.gamma"], blocks[(0, "Q")][3].float().cpu())
    mem = sf.analyze(model, generic_loss, ta, tb, codec=codec)
    stored = sf.analyze(model, generic_loss, ta, tb, codec=codec, store=tmp_path / "s")
    # the store's reader forms the centre products from the saved statistics on the host: rounding only
    torch.testing.assert_close(stored.scores, mem.scores, rtol=1e-5, atol=1e-6 * float(mem.scores.abs().max()))
    assert mem.context.stats_a.welford[layout.params[0]].mean.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_model_dispatched_over_two_devices_equals_one_device():
    """Layers on different cards: statistics, preparations and sketches live on each layer's card, and the
    scores equal those of the same model on one card."""
    from accelerate import dispatch_model

    model = make_model("llama_gqa", wrapper=True)
    ta, tb = make_batches(5, 2, seed=1), make_batches(4, 3, seed=2)
    to = lambda bs: [{k: v.cuda(0) for k, v in b.items()} for b in bs]  # noqa: E731
    for codec in (sf.Factors(), sf.Sketch(k=32, kind="sjlt", seed=0, dtype="fp32")):
        one = sf.analyze(model.cuda(0), generic_loss, to(ta), to(tb), codec=codec)
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                      "model.rotary_emb": 0, "lm_head": 1}
        two = sf.analyze(dispatch_model(model, device_map=device_map), generic_loss, to(ta), to(tb), codec=codec)
        if codec.two_pass:
            q1 = two.layout.param_of(1, "Q")
            assert two.context.stats_a.welford[q1].count == one.context.stats_a.welford[q1].count
        torch.testing.assert_close(two.scores, one.scores, rtol=1e-5, atol=1e-6 * float(one.scores.abs().max()))
        model = make_model("llama_gqa", wrapper=True)


def test_many_tasks_on_cuda_equal_cpu():
    """Tasks collected once on a GPU (fp64 statistics on both devices): every pair's scores and conflict test are
    the CPU's, and at full width the exact scores."""
    model = make_model("llama_gqa")
    tasks = {"x": make_batches(5, 2, seed=1), "y": make_batches(4, 2, seed=2), "z": make_batches(4, 2, seed=3)}
    on = {t: [{k: v.cuda() for k, v in b.items()} for b in bs] for t, bs in tasks.items()}
    codec = sf.Sketch(k=128, kind="srht", dtype="fp32")
    cpu = sf.analyze_tasks(model, generic_loss, tasks, codec=codec, stats_dtype=torch.float64)
    gpu = sf.analyze_tasks(model.cuda(), generic_loss, on, codec=codec, stats_dtype=torch.float64)
    model.cpu()
    exact = sf.analyze(model, generic_loss, tasks["z"], tasks["x"], codec=sf.Factors())
    for a, b in (("x", "y"), ("z", "x")):
        c, g = cpu.pair(a, b), gpu.pair(a, b)
        torch.testing.assert_close(g.scores, c.scores, rtol=1e-4, atol=1e-6 * float(c.scores.abs().max()))
        tc, tg = (r.head_conflicts().sort_values(["layer", "head", "block"]) for r in (c, g))
        want = torch.tensor(tc[["T", "stderr"]].to_numpy())  # (fp32 gradients formed in another order: as the
        torch.testing.assert_close(torch.tensor(tg[["T", "stderr"]].to_numpy()), want,  # pairwise GPU test allows)
                                   rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    res = gpu.pair("z", "x")
    torch.testing.assert_close(res.scores, exact.scores, rtol=1e-4, atol=1e-5 * float(exact.scores.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_cuda_batch_with_a_nan_or_inf_factor_is_refused_at_settle(dtype):
    """The finiteness screen takes per-sample maxima on the device: a single NaN or inf entry in any factor must
    reach the host's verdict (a maximum that dropped NaN would let it through)."""
    from sketchfisher.capture import FactorCapture

    lin = torch.nn.Linear(64, 32, bias=False).to("cuda", dtype)
    x = torch.randn(3, 50, 64, device="cuda", dtype=dtype)
    loss = lambda m, b: m(b)[:, :10].float().square().sum((1, 2))  # noqa: E731  (token 17 is only in A)
    with FactorCapture(torch.nn.Sequential(lin), ["0"]) as cap:
        cap.run(loss, x, defer_screen=True).settle()
        for bad in (float("nan"), float("inf")):
            poisoned = x.clone()
            poisoned[2, 17, 5] = bad
            bf = cap.run(loss, poisoned, defer_screen=True)
            with pytest.raises(sf.GradientError, match=r"non-finite factors in '0' for batch positions \[2\]"):
                bf.settle()
