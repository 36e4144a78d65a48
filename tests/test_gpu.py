"""CUDA checks, run on the device machine: ``python -m pytest -m gpu tests/test_gpu.py``."""

import pytest
import torch

import sketchfisher as sf
from sketchfisher.compress.sketchmaps import SketchMap
from tiny_models import generic_loss, make_batches, make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["gaussian", "sjlt", "srht"])
def test_sketch_maps_identical_on_cpu_and_cuda(kind):
    x = torch.randn(4, 3000, dtype=torch.float64)
    m = SketchMap(kind, 64, 3000, 5, (1, 2, 3))
    torch.testing.assert_close(m.apply(x.cuda()).cpu(), m.apply(x), rtol=1e-10, atol=1e-10)


def test_scores_identical_on_cpu_and_cuda():
    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    to = lambda bs: [{k: v.cuda() for k, v in b.items()} for b in bs]  # noqa: E731
    for codec in (sf.Factors(), sf.Sketch(k=32, kind="sjlt", seed=0, dtype="fp32")):
        cpu = sf.analyze(model, generic_loss, ta, tb, codec=codec)
        gpu = sf.analyze(model.cuda(), generic_loss, to(ta), to(tb), codec=codec)
        model.cpu()
        torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-6 * float(cpu.scores.abs().max()))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("size,k", [(524288, 256), (3001, 64), (40, 1024)])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_sjlt_kernels_match_cpu_map(dtype, tol, size, k, backend):
    from sketchfisher.compress import kernels

    if backend == "cuda":
        assert kernels.extension_available(), "the CUDA C++ kernel did not build on the device"
    x = torch.randn(5, size, generator=torch.Generator().manual_seed(1))
    m = SketchMap("sjlt", k, size, 11, (2, 3, 4))
    want = m.apply(x.double())  # the CPU index_add_ path
    out = kernels.sjlt_on_cuda(x.to(dtype).cuda(), m.hash_key(), k, 4, backend=backend)
    assert out is not None and out.dtype == dtype
    got = out.double().cpu()
    assert float((got - want).norm() / want.norm()) < tol
