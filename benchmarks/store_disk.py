"""The store's disk plan against what a store writes, per unit family and statistics precision, then the plan at
full size.

Collects a store of a small random Llama (GQA; ``sf.analyze(..., store=...)``, the conflict test on, the default
order) for each of ``--units`` and ``--stats-dtypes``, and prints the bytes written beside the writer's plan
(``collect.disk.store_disk_bytes`` of the collection's layout; pass-1 checkpoints left out, as they are deleted
once a task's final statistics are written). Then the plan of a default store of ``--full-shape`` (fp32
statistics, a GPU's) at ``--full-samples``.

    python benchmarks/store_disk.py
    python benchmarks/store_disk.py --full-shape llama-7b --full-samples 512 --full-k 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import torch

import sketchfisher as sf
from gpu_e2e import lm_loss  # noqa: E402  (the same next-token loss as the e2e benchmark)
from sketchfisher.collect.disk import default_store_bytes, statistics_widths, store_disk_bytes
from sketchfisher.collect.memory import format_bytes
from sketchfisher.collect.plan import pass_plan

DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def small_llama(args) -> torch.nn.Module:
    import transformers as hf

    torch.manual_seed(0)
    config = hf.LlamaConfig(hidden_size=args.hidden, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=2 * args.hidden, vocab_size=100, num_hidden_layers=args.layers,
                            max_position_embeddings=64)
    return hf.LlamaForCausalLM(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=6, help="samples per task")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--units", default="heads,mlp,all")
    p.add_argument("--stats-dtypes", default="fp64,fp32")
    p.add_argument("--full-shape", default="llama-7b")
    p.add_argument("--full-samples", type=int, default=512, help="both tasks together")
    p.add_argument("--full-k", type=int, default=256)
    p.add_argument("--full-batch", type=int, default=2)
    args = p.parse_args()

    model, codec = small_llama(args), sf.Sketch(k=args.k, seed=0)
    gen = torch.Generator().manual_seed(0)
    make = lambda: [{"input_ids": torch.randint(0, 100, (args.batch, args.tokens), generator=gen)}  # noqa: E731
                    for _ in range(-(-args.samples // args.batch))]
    task_a, task_b = make(), make()
    print(f"# small random Llama (hidden {args.hidden}, {args.layers} layers, 4 heads, 2 KV heads), {args.samples} + "
          f"{args.samples} samples, Sketch(k={args.k}), conflict test on, torch {torch.__version__}")
    print("| units | statistics | written, bytes | planned without checkpoints, bytes | statistics written / planned |")
    print("| --- | --- | --- | --- | --- |")
    for dtype_name in args.stats_dtypes.split(","):
        for units in args.units.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp) / "s"
                sf.analyze(model, lm_loss, task_a, task_b, codec=codec, store=root, units=units,
                           stats_dtype=DTYPES[dtype_name])
                written = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
                stats = sum(f.stat().st_size for f in (root / "pass1").glob("*.safetensors"))
            layout = sf.units_layout(model, units)
            steps = pass_plan(codec, sf.ScoreConfig(), None, means=layout.beyond_heads, conflicts=True)
            widths = tuple(statistics_widths(steps.statistics[t], layout.beyond_heads, DTYPES[dtype_name])
                           for t in "ab")
            n = sum(len(t) for t in (task_a, task_b))
            plan = store_disk_bytes(layout, codec, 2 * args.samples, n, widths, conflicts=True)
            print(f"| {units} | {dtype_name} | {written:,} | {plan['total'] - plan['pass1_checkpoint']:,} | "
                  f"{stats:,} / {plan['statistics']:,} |")

    full = sf.Sketch(k=args.full_k)
    print(f"\n# {args.full_shape}, {args.full_samples} samples (both tasks), Sketch(k={args.full_k}), fp32 statistics, "
          f"batch {args.full_batch}, the defaults (conflict test, pass-1 checkpoints)")
    print("| units | sketches and shards | statistics | pass-1 checkpoints | total | without checkpoints |")
    print("| --- | --- | --- | --- | --- | --- |")
    for units in ("heads", "all"):
        d = default_store_bytes(args.full_shape, full, args.full_samples, args.full_batch, units=units)
        shards = d["sketches"] + d["conflict_scalars"] + d["shard_headers"] + d["manifest"]
        print(f"| {units} | {format_bytes(shards)} | {format_bytes(d['statistics'])} | "
              f"{format_bytes(d['pass1_checkpoint'])} | {format_bytes(d['total'])} | "
              f"{format_bytes(d['total'] - d['pass1_checkpoint'])} |")


if __name__ == "__main__":
    main()
