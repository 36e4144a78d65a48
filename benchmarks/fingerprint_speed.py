"""How long the store's model fingerprint takes: the sha256 of every byte of every weight, on several threads.

Random bf16 weights of a Llama-shaped model (no download), built on ``--device``; prints one table row.

    python3 benchmarks/fingerprint_speed.py --device cuda --layers 32      # Llama-7B
    python3 benchmarks/fingerprint_speed.py --device cpu --layers 1 --hidden 64 --intermediate 128   # smoke run
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.store.manifest import model_fingerprint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    args = p.parse_args()
    config = hf.LlamaConfig(hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 128),
                            intermediate_size=args.intermediate, vocab_size=32000, num_hidden_layers=args.layers)
    with torch.device(args.device):
        model = hf.LlamaForCausalLM(config).to(torch.bfloat16)
    nbytes = sum(q.numel() * q.element_size() for q in model.parameters())
    start = time.perf_counter()
    model_fingerprint(model, sf.layout_for(model))
    seconds = time.perf_counter() - start
    print(f"| weights | device | CPU threads | seconds | GiB/s |\n| --- | --- | --- | --- | --- |\n"
          f"| {nbytes / 2**30:.2f} GiB bf16 | {args.device} | {min(8, os.cpu_count() or 1)} | {seconds:.2f} | "
          f"{nbytes / 2**30 / seconds:.2f} |")


if __name__ == "__main__":
    main()
