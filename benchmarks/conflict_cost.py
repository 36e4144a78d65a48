"""What the conflict test costs outside the passes' own work, measured piece by piece.

1. The conflict scalars of one attention module on the fused path: every head block of a module's per-sample
   gradient contracted with the conflict weights, as the library does it (one strided view, one multiply-and-sum
   per weight), against a matrix product per head block and against gathering the block and one ``einsum``.
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
from sketchfisher.compress.sketch_scores import BlockPrep, conflict_scalars_from_module
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
    for block in ("Q", "O"):
        hbs = list(layout.head_blocks(0, block))
        grad = torch.randn(args.batch, args.hidden, args.hidden, device=args.device)
        u = torch.randn(2, len(hbs), hbs[0].numel, device=args.device).to(torch.bfloat16)
        prep = BlockPrep(None, None, None, None, None, u_b=u)
        per_head = lambda: torch.stack([grad.narrow(1 + hb.storage_axis, hb.start, hb.width).reshape(args.batch, -1)  # noqa: E731
                                        @ u[:, h].float().T for h, hb in enumerate(hbs)], 1)
        gathered = lambda: torch.einsum("bhs,mhs->bhm", layout.gather(0, block, grad), u.float())  # noqa: E731
        library = lambda: conflict_scalars_from_module(grad, hbs, prep, "b", torch.float32)  # noqa: E731
        for name, fn in (("library: one strided view", library), ("a matrix product per head block", per_head),
                         ("gather + einsum", gathered)):
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
