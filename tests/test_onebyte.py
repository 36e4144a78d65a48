"""One-byte preparations (fp8 e4m3 codes, a scale per head block): what rounding keeps and what it must not lose."""

from __future__ import annotations

import pytest
import torch

from sketchfisher.collect.sketches import RECIPE, Recipe, recipe_of
from sketchfisher.compress.onebyte import FP8_MAX, OneByte, narrower, nbytes, values


def test_each_head_block_keeps_three_bits_of_its_own_scale():
    """Blocks whose scales differ by 10¹² each keep a relative rounding of at most 2⁻⁴ over the top 2⁶ of their
    range (e4m3's normal numbers), and the largest magnitude lands on 448 exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 500, generator=g, dtype=torch.float64) * torch.tensor([1e-9, 1.0, 1e3])[:, None, None].double()
    ob = OneByte.encode(x)
    assert ob.codes.dtype == torch.float8_e4m3fn and ob.scale.shape == (3, 4) and ob.scale.dtype == torch.float32
    assert nbytes(ob) == x.numel() + 12 * 4
    back = ob.decode(torch.float64)
    top = x.abs().amax(-1, keepdim=True)
    normal = x.abs() >= top * 2.0 ** -6
    assert float(((back - x).abs() / x.abs())[normal].max()) <= 2.0 ** -4
    assert torch.equal(ob.codes.float().abs().amax(-1), torch.full((3, 4), FP8_MAX))
    assert float((back - x).abs().max()) <= float(top.max()) * 2.0 ** -4


def test_a_balance_never_rounds_to_zero_and_zero_blocks_stay_zero():
    w = torch.tensor([[1e6, 1.0, 1e-6, 3.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    pos = OneByte.encode(w[:1], positive=True)
    assert bool((pos.decode() > 0).all())
    zero = OneByte.encode(w[1:])
    assert float(zero.scale) == 1.0 and bool((zero.decode() == 0).all())


def _encode_reference(x: torch.Tensor, positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious encoding: every step in fp64, rounded to fp32 once at the end, then to fp8."""
    x = x.double()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    y = (x / scale.double()[..., None]).clamp(2.0 ** -9 if positive else -FP8_MAX, FP8_MAX)
    return y.float().to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("positive", [False, True])
def test_encoding_is_bitwise_the_fp64_reference_from_any_input_precision(dtype, positive):
    """The fused encoding (largest magnitude, one division rounded once, clamp in fp32) gives the codes and scales of
    the all-fp64 reference, bit for bit, for fp64 and fp32 inputs: ranges 10⁻³⁰ to 10³⁰, values on fp8 rounding ties,
    subnormal quotients, zero blocks and exact maxima."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 300, generator=g, dtype=torch.float64)
    x = x * torch.logspace(-30, 30, 6, dtype=torch.float64)[:, None, None]
    x[0, 0] = 0.0
    x[1, 1, :20] = x[1, 1, :20] * 1e-12  # quotients far below fp8's smallest code
    ties = torch.tensor([1.0625, 1.1875, 3.25, 0.0029296875, 447.9, 448.0, -1.0625], dtype=torch.float64)
    x[2, 2, : len(ties)] = ties * float(x[2, 2].abs().max()) / 448.0
    x = (x.abs() if positive else x).to(dtype)
    ob = OneByte.encode(x, positive=positive)
    codes, scale = _encode_reference(x, positive)
    assert torch.equal(ob.scale, scale)
    assert torch.equal(ob.codes.view(torch.uint8), codes.view(torch.uint8))


def test_the_decoded_values_are_the_fp32_product_every_reader_forms():
    """CPU decoding is the fp32 product of code and scale (the kernel's), then cast; indexing keeps codes and scales
    together; a torch dtype casts instead."""
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    ob = OneByte.encode(x)
    assert torch.equal(ob.decode(torch.float64), (ob.codes.float() * ob.scale[..., None]).double())
    assert torch.equal(ob[0].decode(), ob.decode()[0]) and torch.equal(ob[None].decode(), ob.decode()[None])
    assert torch.equal(values(ob, torch.float64), ob.decode(torch.float64)) and values(None) is None
    assert narrower(x, torch.bfloat16).dtype == torch.bfloat16 and narrower(x, None) is x
    assert isinstance(narrower(x, "fp8"), OneByte)


@pytest.mark.parametrize("version,sides,balance", [(11, "fp8", "fisher"), (10, torch.bfloat16, "abs"),
                                                   (9, torch.bfloat16, "abs"), (8, None, "abs")])
def test_stores_are_prepared_by_the_recipe_they_were_written_with(version, sides, balance):
    assert recipe_of(version) == Recipe(sides, balance)
    assert RECIPE == recipe_of(11)
