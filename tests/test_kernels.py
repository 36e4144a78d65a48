"""The Triton kernels (fused pass-2 sjlt sides, fused pass-1 statistics) against the torch code, on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels' code on CPU tensors, so CI checks
their semantics; ``tests/test_gpu.py`` checks the compiled kernels on the device.
"""

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a CUDA device runs these kernels compiled: tests/test_gpu.py", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does)", allow_module_level=True)
try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("SKETCHFISHER_KERNEL_TESTS") == "1":  # asked for (CI): a missing Triton is a failure
        raise
    pytest.skip("triton is not installed (SKETCHFISHER_KERNEL_TESTS=1 bash scripts/test.sh installs it)",
                allow_module_level=True)

import sketchfisher as sf  # noqa: E402
from sketchfisher.compress import fused as sketching  # noqa: E402
from sketchfisher import kernels  # noqa: E402
from sketchfisher.compress.sketchmaps import SketchMap  # noqa: E402
from sketchfisher.fisher import FisherStats  # noqa: E402
from tiny_models import assert_same_analysis, generic_loss, make_batches, make_model  # noqa: E402


@pytest.mark.parametrize("k,s,size,n", [(16, 1, 100, 3), (16, 4, 77, 2), (64, 2, 300, 5), (48, 1, 200, 2), (8, 8, 33, 1), (96, 3, 500, 3)])
def test_sketch_kernel_is_the_cpu_map(k, s, size, n):
    m = SketchMap("sjlt", k, size, 3, (1, 2, 3), s=s)
    x = torch.randn(n, size, generator=torch.Generator().manual_seed(k + s))
    for chunks, step in ((1, None), (3, 1), (2, 4)):
        sk, norm, cross, own, _ = kernels.sketch_heads(x, torch.tensor([m.hash_key()]), torch.zeros(1, dtype=torch.int64),
                                               size, size, size, k, s, chunks=chunks, tiles_per_step=step)
        torch.testing.assert_close(sk[:, 0], m.apply(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm[:, 0], x.square().sum(-1), rtol=1e-5, atol=1e-5)
        assert float(cross.abs().max()) == 0.0 and float(own.abs().max()) == 0.0


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("transform,k,s", [("identity", 16, 2), ("square", 16, 2), ("abs", 16, 2),
                                           ("square", 48, 1), ("abs", 96, 3)])  # (48 and 32 rows: padded tiles)
def test_sketch_kernel_strided_heads_with_side_transform(axis, transform, k, s):
    H, width, other_dim, B = 3, 4, 10, 2
    gen = torch.Generator().manual_seed(axis)
    G = torch.randn(B, H * width, other_dim, generator=gen) if axis == 0 else torch.randn(B, other_dim, H * width, generator=gen)
    size = width * other_dim
    maps = [SketchMap("sjlt", k, size, 0, (0, 3, h), s=s) for h in range(H)]
    w, c, o = torch.rand(H, size, generator=gen), torch.randn(H, size, generator=gen), torch.randn(H, size, generator=gen)
    if axis == 0:
        offsets, cols, row_stride = [h * width * other_dim for h in range(H)], other_dim, other_dim
    else:
        offsets, cols, row_stride = [h * width for h in range(H)], width, H * width
    u = torch.randn(2, H, size, generator=gen).to(torch.bfloat16)  # conflict weights, read in their own dtype
    sk, norm, cross, own, dots = kernels.sketch_heads(G, torch.tensor([m.hash_key() for m in maps]), torch.tensor(offsets),
                                                 size, cols, row_stride, k, s, transform=transform, weight=w, centre=c,
                                                 other=o, conflict=u, chunks=2)
    assert dots.shape == (B, H, 2)
    f = {"identity": lambda t: t, "square": torch.square, "abs": torch.abs}[transform]
    for h in range(H):
        block = G[:, h * width:(h + 1) * width] if axis == 0 else G[:, :, h * width:(h + 1) * width]
        torch.testing.assert_close(dots[:, h], block.reshape(B, -1) @ u[:, h].float().T, rtol=1e-5, atol=1e-5)
        v = f(block.reshape(B, -1)) * w[h]
        torch.testing.assert_close(cross[:, h], (v * o[h]).sum(-1), rtol=1e-5, atol=1e-5)
        v = v - c[h]
        torch.testing.assert_close(own[:, h], (v * c[h]).sum(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm[:, h], v.square().sum(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sk[:, h], maps[h].apply(v), rtol=1e-5, atol=1e-5)
    # scaled centring finished in the kernel: what scale_centring does after the torch path
    rc = torch.stack([maps[h].apply(c[h][None])[0] for h in range(H)])
    c2 = c.square().sum(-1)
    c2[1] = 0.0  # a block whose centre is zero keeps γ = 0
    scales = {"conflict": torch.tensor([[2.0, 0.5, 1.0], [1.0, 3.0, 0.25]])}
    sk_c, norm_c, cross_c, gamma, dots_c = kernels.sketch_heads(
        G, torch.tensor([m.hash_key() for m in maps]), torch.tensor(offsets), size, cols, row_stride, k, s,
        transform=transform, weight=w, centre=c, other=o, conflict=u, chunks=3, centring=(rc, c2), scales=scales)
    want_gamma = torch.where(c2 > 0, own / c2.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(own))
    torch.testing.assert_close(gamma, want_gamma, rtol=1e-5, atol=1e-7)
    assert float(gamma[:, 1].abs().max()) == 0.0
    allowance = torch.finfo(torch.float32).eps * size ** 0.5 * (norm + want_gamma.square() * c2)
    torch.testing.assert_close(norm_c, (norm - want_gamma * own).clamp_min(0) + allowance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sk_c, sk - want_gamma[..., None] * rc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cross_c, cross, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dots_c, dots * scales["conflict"].t()[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis,k,s,step,chunks", [(0, 16, 2, 1, 2), (1, 48, 1, 2, 3), (1, 96, 3, 1, 1),
                                                   (0, 32, 1, 4, 2)])
def test_prefetched_side_loads_give_the_same_outputs_bitwise(axis, k, s, step, chunks):
    """Each step's loads issued one step ahead (``prefetch=True``) give every output of the side kernel bitwise, over
    bands, tiles a step, column chunks (a program's last step prefetches past its tiles), strided head blocks, padded
    tiles, two conflict weights and scaled centring."""
    H, width, other_dim, B = 3, 4, 10, 3
    gen = torch.Generator().manual_seed(k)
    G = torch.randn(B, H * width, other_dim, generator=gen) if axis == 0 else torch.randn(B, other_dim, H * width,
                                                                                         generator=gen)
    size = width * other_dim
    if axis == 0:
        offsets, cols, row_stride = [h * width * other_dim for h in range(H)], other_dim, other_dim
    else:
        offsets, cols, row_stride = [h * width for h in range(H)], width, H * width
    keys = torch.randint(0, 2**31 - 1, (H, 2), generator=gen)
    kw = dict(transform="square", weight=torch.rand(H, size, generator=gen), centre=torch.randn(H, size, generator=gen),
              other=torch.randn(H, size, generator=gen), conflict=torch.randn(2, H, size, generator=gen),
              centring=(torch.randn(H, k, generator=gen), torch.rand(H, generator=gen)), chunks=chunks,
              tiles_per_step=step)
    out = [kernels.SketchHeads(keys, torch.tensor(offsets), size, cols, row_stride, k, s, device=torch.device("cpu"),
                               prefetch=prefetch, **kw).run(G) for prefetch in (False, True)]
    assert torch.equal(out[0], out[1])


def test_a_side_kernel_set_up_once_gives_each_batch_what_a_fresh_one_gives():
    """``SketchHeads`` keeps everything but the gradient between calls: batches of different sizes and values, one
    after another, come out as a kernel set up for each batch alone gives them (bitwise)."""
    H, size, k, s = 2, 90, 16, 2
    gen = torch.Generator().manual_seed(5)
    maps = [SketchMap("sjlt", k, size, 1, (2, 0, h), s=s) for h in range(H)]
    keys, offsets = torch.tensor([m.hash_key() for m in maps]), torch.arange(H) * size
    w, c, o = torch.rand(H, size, generator=gen), torch.randn(H, size, generator=gen), torch.randn(H, size, generator=gen)
    u = torch.randn(1, H, size, generator=gen)
    rc, c2 = torch.stack([maps[h].apply(c[h][None])[0] for h in range(H)]), c.square().sum(-1)
    options = dict(transform="square", weight=w, centre=c, other=o, conflict=u, centring=(rc, c2),
                   scales={"conflict": torch.tensor([[1.5, 0.5]])})
    kept = kernels.SketchHeads(keys, offsets, size, size, size, k, s, device=torch.device("cpu"), **options)
    for n in (3, 1, 3, 0):
        g = torch.randn(n, H * size, generator=gen)
        for mine, fresh in zip(kept(g), kernels.sketch_heads(g, keys, offsets, size, size, size, k, s, **options)):
            assert torch.equal(mine, fresh)
    with pytest.raises(TypeError, match="sketch_heads takes"):
        kept(torch.zeros(1, H * size, dtype=torch.int32))


def test_a_centre_that_is_also_the_other_is_read_once_with_the_same_sums():
    """Task B's single pass centres by x̄' and crosses with x̄' (one tensor, one scale): the kernel loads it once for
    both, and the outputs are bitwise those of the same values held in two tensors."""
    from sketchfisher.compress.onebyte import OneByte

    H, size, k = 3, 700, 32
    gen = torch.Generator().manual_seed(7)
    keys, offsets = torch.randint(0, 2**31 - 1, (H, 2), generator=gen), torch.arange(H) * size
    ob = OneByte.encode(torch.randn(H, size, generator=gen))
    options = dict(transform="abs", weight=torch.rand(H, size, generator=gen), conflict=torch.randn(2, H, size))
    once = kernels.SketchHeads(keys, offsets, size, size, size, k, 1, device=torch.device("cpu"), centre=ob.codes,
                               other=ob.codes, scales={"centre": ob.scale, "other": ob.scale}, **options)
    twice = kernels.SketchHeads(keys, offsets, size, size, size, k, 1, device=torch.device("cpu"), centre=ob.codes,
                                other=ob.codes.clone(), scales={"centre": ob.scale, "other": ob.scale.clone()}, **options)
    assert once.constants["O_IS_C"] and not twice.constants["O_IS_C"]
    g = torch.randn(2, H * size, generator=gen).to(torch.bfloat16)
    assert torch.equal(once.run(g), twice.run(g))


@pytest.mark.parametrize("quantities", [("fisher", "m2", "abs", "sum", "half"), ("fisher", "abs"), ("abs",), ("sum",),
                                        ("fisher",), ("sum", "half")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_welford_kernel_is_the_torch_update(dtype, quantities):
    """The kernel updates exactly the kept statistics (the others are passed as None and stay untouched),
    the half sum over the stream's even positions across batches of odd sizes."""
    names = ("fisher", "m2", "abs", "sum", "half")
    ref = FisherStats(dtype=dtype, quantities=quantities)
    keep = {q: q in quantities for q in names}
    state = [torch.zeros(7, 5, dtype=dtype) if keep[q] else None for q in names]
    count, seen = 0, []
    for B in (3, 1, 4):
        g = torch.randn(B, 7, 5, generator=torch.Generator().manual_seed(B))
        ref.update({"w": g})
        kernels.welford_update(g.reshape(B, -1), *state[:4], count=count, sum_half=state[4], block=16)
        count += B
        seen.append(g)
    w = ref.welford["w"]
    assert w.count == count
    if keep["half"]:
        torch.testing.assert_close(state[4], torch.cat(seen)[0::2].to(dtype).sum(0), rtol=1e-6, atol=1e-7)
        assert ref.half_count == len(range(0, count, 2))
    want = (w.mean, w.m2, ref.sum_abs.get("w"), ref.sum_g.get("w"), ref.sum_half.get("w"))
    for q, got, exp in zip(names, state, want):
        assert (got is None) == (exp is None) == (not keep[q])
        if got is not None:
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("quantities", [("fisher", "abs", "sum", "half"), ("abs",), ("sum", "half")])
def test_welford_kernel_rounds_bf16_sums_as_the_torch_update(quantities):
    """The bf16 plain sums of fp32 statistics (Σ|g|, Σg, the half sum) are rounded stochastically, with the same
    random bits in the kernel and in the torch update (bitwise equal), and independent bits for each sum."""
    names = ("fisher", "m2", "abs", "sum", "half")
    ref = FisherStats.accumulating(torch.float32, quantities)
    state = [torch.zeros(300, dtype=torch.bfloat16 if q in ("abs", "sum", "half") else torch.float32)
             if q in quantities else None for q in names]
    count = 0
    for step in range(60):
        g = torch.randn(3, 300, generator=torch.Generator().manual_seed(step))
        ref.update({"w": g})
        kernels.welford_update(g, *state[:4], count=count, sum_half=state[4], block=64, dtype=torch.float32)
        count += 3
    for q, acc in ref.sums():
        if q in quantities:
            assert acc["w"].dtype == torch.bfloat16
            assert torch.equal(state[names.index(q)], acc["w"]), q
    if "fisher" in quantities:
        torch.testing.assert_close(state[0], ref.welford["w"].mean, rtol=1e-6, atol=1e-7)


def test_welford_kernel_reads_its_count_from_memory_as_from_an_argument():
    """``counts=`` (the count and its rounding keys in an int64 tensor, what a recorded launch reads batch after
    batch) updates bitwise as the count passed by value, bf16 sums' random bits and the half sum's positions
    included."""
    kinds = [torch.float32, None, None, torch.bfloat16, torch.bfloat16]  # (Welford mean, Σg, half sum)
    by_value, from_memory = ([None if d is None else torch.zeros(300, dtype=d) for d in kinds] for _ in range(2))
    counts = torch.zeros(3, dtype=torch.int64)
    count = 0
    for step, n in enumerate((3, 2, 1, 3, 2)):
        g = torch.randn(n, 300, generator=torch.Generator().manual_seed(step))
        kernels.welford_update(g, *by_value[:4], count=count, sum_half=by_value[4], block=64, dtype=torch.float32)
        counts.copy_(torch.tensor(kernels.update_counts(count)))
        kernels.welford_update(g, *from_memory[:4], count=-1, sum_half=from_memory[4], block=64, dtype=torch.float32,
                               counts=counts)
        count += n
    for got, want in zip(from_memory, by_value):
        assert (got is None and want is None) or torch.equal(got, want)


def test_welford_kernel_reads_bf16_gradients_as_the_torch_update():
    """A bf16 model's per-sample gradients arrive in bf16 on a GPU (``BatchFactors.grad(low=True)``): the kernel
    reads them as the torch update does (each value widened exactly), bf16 sums rounded with the same bits."""
    quantities = ("fisher", "sum", "half")
    ref = FisherStats.accumulating(torch.float32, quantities)
    state = [torch.zeros(300, dtype=torch.float32), None, None, torch.zeros(300, dtype=torch.bfloat16),
             torch.zeros(300, dtype=torch.bfloat16)]
    count = 0
    for step in range(20):
        g = torch.randn(2, 300, generator=torch.Generator().manual_seed(step)).bfloat16()
        ref.update({"w": g})
        kernels.welford_update(g, *state[:4], count=count, sum_half=state[4], block=64, dtype=torch.float32)
        count += 2
    assert torch.equal(state[3], ref.sum_g["w"]) and torch.equal(state[4], ref.sum_half["w"])
    torch.testing.assert_close(state[0], ref.welford["w"].mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pair", [("sum", "half"), ("abs", "sum")])
def test_stochastically_rounded_sums_are_unbiased_and_independent(pair):
    """Σg and the half sum (pass 1 of task A), Σ|g| and Σg (task B's pass) in bf16 (fp32 statistics): unbiased, and
    their roundings independent of each other's although the two draw their bits from one hash word (the half sum's
    error does not track the whole sum's, so the conflict test's halves stay independent)."""
    stats = FisherStats.accumulating(torch.float32, pair)
    exact = {q: torch.zeros(4000, dtype=torch.float64) for q in pair}
    for step in range(400):
        g = 0.3 + torch.randn(2, 4000, generator=torch.Generator().manual_seed(step))
        stats.update({"w": g})
        added = {"sum": g.double().sum(0), "half": g.double()[0], "abs": g.double().abs().sum(0)}
        for q in pair:
            exact[q] += added[q]
    kept = {"sum": stats.sum_g, "half": stats.sum_half, "abs": stats.sum_abs}
    errors = [kept[q]["w"].double() - exact[q] for q in pair]
    assert all(kept[q]["w"].dtype == torch.bfloat16 for q in pair)
    assert float(errors[0].abs().mean() / exact[pair[0]].abs().mean()) < 0.04  # (0.021 for Σg: 400 updates near 240)
    for err in errors:  # the mean error over 4000 entries: within 4 of its standard errors of 0
        assert abs(float(err.mean())) < 4 * float(err.std()) / 4000 ** 0.5
    assert abs(float(torch.corrcoef(torch.stack(errors))[0, 1])) < 0.06


def test_a_stochastically_rounded_abs_sum_is_unbiased():
    """Where every increment is below half a unit in the last place of the sum, rounding to nearest stops
    counting; stochastic rounding stays unbiased (its error per entry is a percent or two after hundreds of
    updates, and averages out over entries)."""
    for scale, spread, steps in ((0.0, 1.0, 300), (0.2, 0.0, 1000)):
        stats = FisherStats(dtype=torch.float32, quantities=("abs",), abs_dtype=torch.bfloat16)
        nearest = torch.zeros(4000, dtype=torch.bfloat16)
        exact = torch.zeros(4000, dtype=torch.float64)
        for step in range(steps):
            g = scale + spread * torch.randn(2, 4000, generator=torch.Generator().manual_seed(step))
            stats.update({"w": g})
            nearest += g.abs().sum(0).to(torch.bfloat16)
            exact += g.double().abs().sum(0)
        err = (stats.sum_abs["w"].double() - exact) / exact
        assert float(err.abs().mean()) < 0.04 and abs(float(err.mean())) < 0.002
        if scale:  # 0.4 per update is below half an ulp of the sum from 128 on: to nearest, the sum stops there
            assert float(nearest.double().max()) <= 128 < 0.5 * float(exact.min())


@pytest.mark.parametrize("arch,variant,normalizer,stats_dtype,conflicts", [
    ("gpt2", "paper", "a", torch.float64, None), ("llama_gqa", "signed", "pooled", torch.float64, None),
    ("llama_gqa", "symmetric", "loo", torch.float64, None), ("llama_gqa", "paper", "a", torch.float32, None),
    ("gpt2", "paper", "a", torch.float32, False)])
def test_fused_pass2_gives_the_torch_path_scores(monkeypatch, arch, variant, normalizer, stats_dtype, conflicts):
    """The kernel reads the preparations as they are (fp32, or bf16 balance and centres with fp32 statistics), with
    and without the conflict test's scalars."""
    model = make_model(arch)
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    codec = sf.Sketch(k=64, kind="sjlt", seed=1, dtype="fp32", s=2)
    kw = dict(codec=codec, variant=variant, normalizer=normalizer, stats_dtype=stats_dtype, conflicts=conflicts)
    want = sf.analyze(model, generic_loss, ta, tb, **kw)
    calls = []
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(sketching.FusedSides, "applies", lambda self, factor: calls.append(1) or self.enabled)
    got = sf.analyze(model, generic_loss, ta, tb, **kw)
    assert calls, "the fused path was not taken"
    scale = float(want.scores.abs().max())
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(got.stderr, want.stderr, rtol=1e-4, atol=1e-5 * scale)
    if conflicts is False:
        return
    cols = ["T", "stderr", "alignment", "p_value"]  # the conflict scalars, read by the kernel in the same pass
    key = ["layer", "head", "block"]
    t_got, t_want = (r.head_conflicts().sort_values(key)[cols].to_numpy() for r in (got, want))
    assert t_got.shape == t_want.shape and len(t_got) > 0
    torch.testing.assert_close(torch.tensor(t_got), torch.tensor(t_want), rtol=1e-4, atol=1e-8)


def test_sketch_kernel_empty_batch_and_strided_rows():
    m = SketchMap("sjlt", 32, 90, 0, (0, 0, 0))
    keys, offsets = torch.tensor([m.hash_key()]), torch.zeros(1, dtype=torch.int64)
    sk, norm, cross, _, dots = kernels.sketch_heads(torch.zeros(0, 90), keys, offsets, 90, 90, 90, 32, 1)
    assert sk.shape == (0, 1, 32) and norm.shape == cross.shape == (0, 1) and dots is None
    *_, dots = kernels.sketch_heads(torch.zeros(0, 90), keys, offsets, 90, 90, 90, 32, 1, conflict=torch.ones(1, 1, 90))
    assert dots.shape == (0, 1, 1)
    with pytest.raises(ValueError, match="conflict weights"):
        kernels.sketch_heads(torch.zeros(2, 90), keys, offsets, 90, 90, 90, 32, 1, conflict=torch.ones(3, 1, 90))
    x = torch.randn(3, 180)[:, ::2]  # rows strided and not dense
    sk, *_ = kernels.sketch_heads(x, keys, offsets, 90, 90, 90, 32, 1)
    torch.testing.assert_close(sk[:, 0], m.apply(x.contiguous()), rtol=1e-5, atol=1e-5)


def test_the_one_multiply_32_bit_product_is_the_split_one():
    """``_mul32`` relies on int64 products wrapping modulo 2⁶⁴: its bits equal a product formed from 16-bit halves
    (no overflow) for values across the whole 32-bit range."""
    from sketchfisher.kernels.hashing import MASK32, _mul32

    x = torch.cat([torch.randint(0, 2**32, (100_000,), dtype=torch.int64, generator=torch.Generator().manual_seed(1)),
                   torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)])
    for c in (0x85EBCA6B, 0xC2B2AE35, 2**32 - 1, 1):
        split = (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32
        assert torch.equal(_mul32(x, c), split)


def test_a_recorded_layer_gives_what_its_launches_give_one_by_one(monkeypatch):
    """A layer's statistics updates and side launches through a recording (:mod:`sketchfisher.collect.layers`) give
    ``sf.analyze`` the statistics and scores that launching them one by one gives, in every pass (pass 1 A folds,
    pass B folds and sketches, pass 2 A sketches), a last batch of another size included. A stand-in for the CUDA
    graph runs the recorded work again on each replay while forbidding anything but device work in it: the counts
    of a replayed batch are the host's, outside the recording."""
    from sketchfisher.collect import layers
    from sketchfisher.kernels import graphs

    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(sketching.FusedSides, "applies", lambda self, factor: self.enabled)
    monkeypatch.setattr(FisherStats, "_kernel_applies", lambda self, g, state: True)  # (the kernel, interpreted)
    model = make_model("llama_gqa")
    ta, tb = make_batches(6, 2, seed=1), make_batches(4, 2, seed=2) + make_batches(1, 1, seed=3)
    kw = dict(codec=sf.Sketch(k=32, kind="sjlt", seed=1, dtype="fp32", s=2), stats_dtype=torch.float32)
    monkeypatch.setattr(graphs, "RECORDED", graphs.recorded_kinds("off"))
    want = sf.analyze(model, generic_loss, ta, tb, **kw)

    replays, in_recording = [], []

    class Recorder(graphs.Replays):  # the first call of a key runs directly, later ones "replay"
        def __init__(self, kind):
            super().__init__(kind)
            replays.append(self)

        def records(self, inputs):
            return self.kind == "layers" and self.active

        def __call__(self, key, fn, *inputs):
            if not self.records(inputs):
                return fn(*inputs)
            if key not in self.seen:  # (on the CPU the gradients are not formed into buffers: keyed by key alone)
                self.seen.add(key)
                return fn(*inputs)
            self.replayed += 1
            in_recording.append(True)
            try:
                out = fn(*inputs)
            finally:
                in_recording.pop()
            return None if out is None else out.clone()

    advance = FisherStats.advance

    def counted(self, name, n):
        assert not in_recording, "a recording counted a batch: a replay would not"
        advance(self, name, n)

    monkeypatch.setattr(FisherStats, "advance", counted)
    monkeypatch.setattr(layers, "Replays", Recorder)
    monkeypatch.setattr(graphs, "RECORDED", graphs.recorded_kinds("layers"))
    got = sf.analyze(model, generic_loss, ta, tb, **kw)
    assert sum(r.replayed > 0 for r in replays) == 3  # pass 1 A, pass B, pass 2 A
    assert_same_analysis(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_tile_order_stores_each_tile_as_the_kernel_reads_it(dtype):
    """``tile_order`` puts entry e of tile t at the row the sjlt map sends it to (the map's own definition,
    ``hashing.sjlt_codes``), for every head block and leading row, in place, and puts it back exactly."""
    from sketchfisher.kernels.hashing import sjlt_codes

    torch.manual_seed(0)
    L, H, m, tiles = 2, 3, 48, 5  # (m not a power of two: the kernel's lanes past m are masked)
    size = tiles * m
    keys = torch.randint(0, 2**31 - 1, (H, 2))
    x = torch.randn(L, H, size).to(dtype)
    y = x.clone()
    kernels.tile_order(y, keys, m)
    for h in range(H):
        rows, _ = sjlt_codes(tuple(keys[h].tolist()), size, 1, m)
        e = torch.arange(size)
        want = torch.empty_like(x[:, h])
        want[:, e // m * m + rows[0]] = x[:, h]
        assert torch.equal(y[:, h].view(torch.uint8), want.view(torch.uint8)), h
    kernels.tile_order(y, keys, m, inverse=True)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 48"):
        kernels.tile_order(torch.zeros(H, size + 1), keys, m)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("same_centre", [True, False])
@pytest.mark.parametrize("cols", [240, 40])
def test_tiled_preparations_give_the_same_sums_bitwise_and_go_back(same_centre, cols, prefetch):
    """The side kernel with its preparations in tile order (``tiled=True``), with or without each step's loads issued a
    step ahead (``prefetch``), gives the outputs of the rotated loads bitwise, for whole and strided head blocks and a
    centre that is also the other; ``untile`` restores the caller's tensors exactly and spends the set-up. Where the
    map has two bands or a tile is partial, nothing is rearranged."""
    from sketchfisher.compress.onebyte import OneByte

    torch.manual_seed(1)
    H, m = 3, 48
    size = 5 * m
    keys = torch.randint(0, 2**31 - 1, (H, 2))
    centre, other = OneByte.encode(torch.rand(H, size) - 0.5), OneByte.encode(torch.rand(H, size) - 0.5)
    if same_centre:
        other = centre
    given = dict(weight=torch.rand(H, size), centre=centre.codes, other=other.codes, conflict=torch.randn(2, H, size))
    scales = {"centre": centre.scale, "other": other.scale}
    row_stride = cols if cols == size else 2 * cols  # (head blocks: rectangles of cols columns of a wider gradient)
    offsets = torch.arange(H) * (size if cols == size else cols)
    g = torch.randn(2, H * size * (1 if cols == size else 2)).to(torch.bfloat16)

    def launch(tiled, tensors, k=m, s=1, size=size, prefetch=prefetch):
        return kernels.SketchHeads(keys, offsets, size, cols, row_stride, k, s, device=torch.device("cpu"),
                                   transform="abs", scales=scales, tiled=tiled, prefetch=prefetch, **tensors)

    want = launch(False, given, prefetch=False).run(g)
    assert torch.equal(launch(False, given).run(g), want)
    mine = {name: t.clone() for name, t in given.items()}
    if same_centre:
        mine["other"] = mine["centre"]
    sh = launch(True, mine)
    assert sh.tiled and sh.constants["O_IS_C"] == same_centre
    assert not torch.equal(mine["weight"], given["weight"])
    assert torch.equal(sh.run(g), want)
    sh.untile()
    for name, t in given.items():
        assert torch.equal(mine[name].view(torch.uint8), t.view(torch.uint8)), name
    with pytest.raises(RuntimeError, match="spent"):
        sh.run(g)
    partial = {name: t[..., :size - 8].clone() for name, t in given.items()}
    for tensors, kw in ((mine, dict(k=2 * m, s=2)), (partial, dict(size=size - 8))):
        before = {name: t.clone() for name, t in tensors.items()}
        assert not launch(True, tensors, **kw).tiled
        assert all(torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)) for name, t in tensors.items())


@pytest.mark.parametrize("passes", [1.5, 2])
def test_a_pass_with_tiled_preparations_gives_the_same_analysis(monkeypatch, passes):
    """``sf.analyze`` with each side pass's preparations in the kernel's tile order gives the statistics, scores,
    standard errors and conflict tables of the rotated loads, bitwise: the preparations are back in their own order
    before the centring and the scores read them (MLP channel groups in tile order, head blocks
    that end in a partial tile not)."""
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(sketching.FusedSides, "applies", lambda self, factor: self.enabled)
    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 2, seed=2)
    kw = dict(codec=sf.Sketch(k=48, kind="sjlt", seed=1, dtype="fp32"), stats_dtype=torch.float32, passes=passes,
              units="all", conflicts=True)  # (k 48: head blocks of 128 entries end in a partial tile, MLP's of 192 not)
    monkeypatch.setattr(sketching, "TILED", False)
    want = sf.analyze(model, generic_loss, ta, tb, **kw)
    tiled = []
    untile = kernels.SketchHeads.untile
    monkeypatch.setattr(kernels.SketchHeads, "untile",
                        lambda self: tiled.append((self.size, self.tiled)) or untile(self))
    monkeypatch.setattr(sketching, "TILED", True)
    got = sf.analyze(model, generic_loss, ta, tb, **kw)
    assert any(t for _, t in tiled) and not all(t for _, t in tiled)  # (some blocks rearranged, some not)
    assert_same_analysis(got, want)


def test_the_side_kernel_switches_are_read_strictly(monkeypatch):
    for name in ("SKETCHFISHER_TILED_PREPARATIONS", "SKETCHFISHER_SIDE_PREFETCH"):
        for value, on in (("1", True), ("on", True), ("0", False), ("off", False)):
            monkeypatch.setenv(name, value)
            assert kernels.switch(name) is on
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=name):
            kernels.switch(name)
