"""Pass 2 of sjlt sketches on CUDA in one Triton kernel per (layer, block) (:meth:`Sketch.fused_sides
<sketchfisher.compress.sketch.Sketch.fused_sides>`)."""

from __future__ import annotations

import torch

from .. import kernels
from ..layout import Layout, block_index
from .onebyte import OneByte
from .sketch import Sketch
from .sketch_scores import BlockPrep, Side, sketched_centre


TILED = kernels.switch("SKETCHFISHER_TILED_PREPARATIONS")
"""Whether side passes rearrange their preparations into the kernel's tile order for the pass (off until measured on
a GPU: the same numbers either way)."""


class FusedSides:
    """The side vectors, their cross terms and norms and the sketches, read straight out of a module's
    per-sample gradient (:func:`sketchfisher.kernels.sketch_heads`). Computes what the torch path of
    :func:`sketchfisher.collect.sketches.sketch_batches` computes (``tests/test_gpu.py``); leave-one-out
    task-A sides and non-fp32 score dtypes take the torch path.

    With :data:`TILED`, each block's preparation is rearranged in place into the order the kernel reads it when its
    launcher is set up, and put back by :meth:`close` (the pass's end), before anything else reads it."""

    def __init__(self, layout: Layout, codec: Sketch, cfg, side: Side):
        self.layout, self.codec, self.cfg, self.side = layout, codec, cfg, side
        self.enabled = (codec.kind == "sjlt" and cfg.dtype == torch.float32 and kernels.available()
                        and not (side == "a" and cfg.normalizer == "loo"))
        self._geometry: dict = {}
        self._launchers: dict = {}  # (layer, block) -> (the preparation, its kernels.SketchHeads)
        self.tiled = TILED

    def applies(self, factor: torch.Tensor) -> bool:
        return self.enabled and factor.is_cuda

    def geometry(self, layer: int, block: str, device: torch.device):
        """Hash keys ``[H_b, 2]``, element offsets ``[H_b]``, size, columns and row stride of the head blocks."""
        if (layer, block) not in self._geometry:
            hbs = self.layout.head_blocks(layer, block)
            hb = hbs[0]
            size, cols_p = hb.numel, hb.param_shape[1]
            if hb.storage_axis == 0:
                offsets, cols = [b.start * cols_p for b in hbs], cols_p
            else:
                offsets, cols = [b.start for b in hbs], hb.width
            keys = [self.codec.map(layer, block_index(block), h, size).hash_key() for h in range(len(hbs))]
            self._geometry[(layer, block)] = (kernels.to_device(torch.tensor(keys, dtype=torch.int64), device),
                                              kernels.to_device(torch.tensor(offsets, dtype=torch.int64), device),
                                              size, cols, cols_p)
        return self._geometry[(layer, block)]

    def launcher(self, layer: int, block: str, prep: BlockPrep, device: torch.device) -> kernels.SketchHeads:
        """The side kernel of one (layer, block) set up for ``prep`` on ``device``, kept for the pass's later batches
        (set up again where the preparation or the device changes)."""
        kept = self._launchers.get((layer, block))
        if kept is not None and kept[0] is prep and kept[1].device == device:
            return kept[1]
        if kept is not None:
            kept[1].untile()
        keys, offsets, size, cols, row_stride = self.geometry(layer, block, device)
        given = {"weight": prep.weight(self.side), "centre": prep.centre(self.side), "other": prep.other(self.side),
                 "conflict": prep.u(self.side)}
        scales = {name: t.scale for name, t in given.items() if isinstance(t, OneByte)}  # (the kernel reads codes)
        tensors = {name: t.codes if isinstance(t, OneByte) else t for name, t in given.items()}
        centring = sketched_centre(prep, self.side, self.codec, layer, block_index(block), device,
                                   torch.float32, torch.float32)
        launch = kernels.SketchHeads(keys, offsets, size, cols, row_stride, self.codec.k, self.codec.s, device=device,
                                     transform=getattr(self.cfg.spec, "i_side" if self.side == "a" else "j_side"),
                                     scales=scales, centring=centring, tiled=self.tiled, **tensors)
        self._launchers[(layer, block)] = (prep, launch)
        return launch

    def close(self) -> None:
        """Every preparation back in its own order and the launchers let go (the end of a pass)."""
        for _, launch in self._launchers.values():
            launch.untile()
        self._launchers.clear()

    def __call__(self, grad: torch.Tensor, layer: int, block: str, prep: BlockPrep):
        """``(sketches, ‖ṽ‖², cross, γ[, conflict scalars [B, H_b, m]])`` of one (layer, block), scaled-centred
        where the codec centres so (:func:`~sketchfisher.compress.sketch_scores.scale_centring`'s outputs; γ = 0
        where it does not); the conflict scalars where the preparation has the other task's mean."""
        launch = self.launcher(layer, block, prep, grad.device)
        return self.outputs(launch, launch.run(grad))

    @staticmethod
    def outputs(launch: kernels.SketchHeads, res: torch.Tensor):
        """:meth:`__call__`'s outputs (views) of the tensor ``res`` that ``launch.run`` wrote."""
        sk, norm2, cross, gamma, dots = launch.split(res)
        sides = (sk, norm2, cross, gamma if launch.centring else torch.zeros_like(norm2))
        return sides if dots is None else (*sides, dots)
