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
