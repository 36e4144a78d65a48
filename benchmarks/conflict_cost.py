"""What the conflict test costs outside the passes' own work, measured piece by piece.

1. The conflict scalars of one attention module on the fused path. The library reads them in the sketch kernel's
   own pass over the module's per-sample gradient (CUDA): the kernel with and without the two conflict weights,
   against contracting the gradient separately (one strided view and a multiply-and-sum per weight, a matrix
   product per head block, gathering the blocks and one ``einsum``: the earlier routes).
2. The table's arithmetic after collection: per block, the variance, Welch degrees of freedom, p-values and
   intervals, then Benjamini–Hochberg, for ``--blocks`` blocks of ``--heads`` heads and ``--samples`` per task.

    python benchmarks/conflict_cost.py --device cuda                      # a Llama-7B attention module, 4,096 blocks
    python benchmarks/conflict_cost.py --device cpu --hidden 256 --heads 4 --samples 64 --blocks 16   # smoke run
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
import transformers as hf
from scipy.stats import false_discovery_control

import sketchfisher as sf
from sketchfisher import kernels
from sketchfisher.compress.fused import FusedSides
from sketchfisher.interference.conflicts import _rows


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def strided(grad: torch.Tensor, hbs: list, u: torch.Tensor) -> torch.Tensor:
    """Every head of a module as one strided view of its gradient, one multiply-and-sum per weight."""
    H, B, width, start = len(hbs), grad.shape[0], hbs[0].width, hbs[0].start
    run = grad.narrow(1 + hbs[0].storage_axis, start, H * width)
    if hbs[0].storage_axis == 0:
        heads = run.reshape(B, H, width, run.shape[2])
    else:
        heads = run.reshape(B, run.shape[1], H, width).transpose(1, 2)
    weights = u.view(u.shape[0], H, *heads.shape[2:])
    return torch.stack([(heads * weights[k].to(grad.dtype)).sum((-1, -2)) for k in range(u.shape[0])], -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=768, help="per task, for the table")
    p.add_argument("--blocks", type=int, default=128, help="(layer, block) pairs, for the table")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    config = hf.LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                            intermediate_size=2 * args.hidden, vocab_size=100, num_hidden_layers=1)
    with torch.device("meta"):
        layout = sf.layout_for(hf.LlamaForCausalLM(config))
    print(f"| piece | {args.device}, hidden {args.hidden}, {args.heads} heads, batch {args.batch} | ms |")
    print("| --- | --- | --- |")
    fused = kernels.available() and args.device.startswith("cuda")
    codec, cfg = sf.Sketch(k=256), sf.ScoreConfig()
    for block in ("Q", "O"):
        hbs = list(layout.head_blocks(0, block))
        grad = torch.randn(args.batch, args.hidden, args.hidden, device=args.device)
        u = torch.randn(2, len(hbs), hbs[0].numel, device=args.device).to(torch.bfloat16)
        size = hbs[0].numel
        side = {"w": torch.rand(len(hbs), size, device=args.device) + 0.5,
                "c": torch.randn(len(hbs), size, device=args.device), "o": torch.randn(len(hbs), size, device=args.device)}
        runs = []
        if fused:
            sides = FusedSides(layout, codec, cfg, "b")
            keys, offsets, size, cols, row_stride = sides.geometry(0, block, grad.device)
            kernel = lambda conflict: kernels.sketch_heads(  # noqa: E731
                grad, keys, offsets, size, cols, row_stride, codec.k, codec.s, weight=side["w"], centre=side["c"],
                other=side["o"], conflict=conflict)
            runs += [("the sketch kernel alone", lambda: kernel(None)),
                     ("the library: the sketch kernel, conflict scalars in the same read", lambda: kernel(u))]
        per_head = lambda: torch.stack([grad.narrow(1 + hb.storage_axis, hb.start, hb.width).reshape(args.batch, -1)  # noqa: E731
                                        @ u[:, h].float().T for h, hb in enumerate(hbs)], 1)
        gathered = lambda: torch.einsum("bhs,mhs->bhm", layout.gather(0, block, grad), u.float())  # noqa: E731
        runs += [("separately: one strided view", lambda: strided(grad, hbs, u)),
                 ("separately: a matrix product per head block", per_head), ("separately: gather + einsum", gathered)]
        for name, fn in runs:
            print(f"| conflict scalars, {block} module | {name} | {timed(fn, args.device, args.repeats) * 1e3:.2f} |")
    g = torch.Generator().manual_seed(0)
    n, H = args.samples, args.heads
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    evs = [{"T": rand(H), "aa": rand(H).abs() + 1, "bb": rand(H).abs() + 1, "a": rand(n, H), "b": rand(n, H),
            "b_even": rand(n, H), "b_odd": rand(n, H)} for _ in range(args.blocks)]

    def table():
        rows = [r for i, ev in enumerate(evs) for r in _rows(ev, i // 4, "QKVO"[i % 4], list(range(H)), [1] * H, 0.95)]
        df = pd.DataFrame(rows)
        df["q_value"] = false_discovery_control(df["p_value"].to_numpy(), method="bh")
        return df

    sec = timed(table, "cpu", 1)
    print(f"| conflict table arithmetic | {args.blocks * H} blocks, {n} + {n} samples (CPU) | {sec * 1e3:.1f} |")


if __name__ == "__main__":
    main()
