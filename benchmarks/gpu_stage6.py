"""Stage 6 at 7B scale on one GPU: 768 x 768 samples over the full Llama-7B layout from sketches.

Random k = 256 sketches (and exact scalars) for every distinct head block of the 7B layout
(32 layers x (32 + 32 + 32 + 32) head blocks) live on the GPU; the streaming reductions that a 7B
user needs (head means, top-100 conflicts, block summary) are timed without materialising the
2.4e9-score tensor. Also: the exact engine from factors for one layer, projected to 32 layers.

    python3 benchmarks/gpu_stage6.py [--samples 768] [--k 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from sketchfisher.interference import ExactBlock, InterferenceResult, ScoreConfig
from sketchfisher.layout import Dims, HeadBlock, HeadKey, Layout
from sketchfisher.compress.sketch_block import SketchBlock


def llama7b_layout(layers: int = 32) -> Layout:
    """The Llama-7B QK-OV layout built from shapes alone (no weights needed)."""
    d, H, dh = 4096, 32, 128
    blocks = {}
    for layer in range(layers):
        base = f"model.layers.{layer}.self_attn."
        for block, module, role in (("Q", "q_proj", "out"), ("K", "k_proj", "out"), ("V", "v_proj", "out"),
                                    ("O", "o_proj", "in")):
            blocks[(layer, block)] = tuple(HeadBlock(HeadKey(layer, block, h), base + module + ".weight", (d, d), role,
                                                     h * dh, (h + 1) * dh) for h in range(H))
    names = tuple(dict.fromkeys(hb.param_name for hbs in blocks.values() for hb in hbs))
    return Layout("llama", Dims(layers, H, H, dh, d), blocks, names)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--exact-samples", type=int, default=64)
    args = p.parse_args()
    device = torch.device(args.device)
    layout = llama7b_layout()
    n, k, H = args.samples, args.k, layout.num_heads
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    blk = SketchBlock(r(n, H, k), r(n, H).abs(), r(n, H), r(n, H, k), r(n, H).abs(), r(n, H), r(H).double(), k, 1.0)
    res = InterferenceResult(layout, n, n, lambda layer, block: blk, ScoreConfig(), max_bytes=1 << 31)
    rows = [("head means (streamed)", *timed(res.head_means, device)),
            ("top-100 conflicts (streamed)", *timed(lambda: res.top_conflicts(100), device)),
            ("block summary (streamed)", *timed(res.block_summary, device))]
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}; "
          f"{n} x {n} samples over the Llama-7B layout ({layout.num_layers * 4 * H} head-block cells per pair), k={k}")
    print("| what | seconds |\n| --- | --- |")
    for label, sec, _ in rows:
        print(f"| {label} | {sec:.2f} |")
    m = args.exact_samples
    S = 128 * 4096
    ga, gb = r(m, H, S), r(m, H, S)
    fisher = ga.square().mean(0)
    cfg = ScoreConfig()
    one = InterferenceResult(llama7b_layout(1), m, m, lambda layer, block: ExactBlock.build(ga, gb, fisher, m, cfg),
                             cfg, max_bytes=1 << 31)
    sec, _ = timed(one.head_means, device)
    per_pair_layer = sec / (m * m)
    print(f"| exact engine, one layer, {m} x {m} | {sec:.2f} |")
    print(f"| exact engine projected (linear in pairs; use --exact-samples >= 64): 32 layers, {n} x {n} | {per_pair_layer * n * n * 32:.0f} |")


if __name__ == "__main__":
    main()
