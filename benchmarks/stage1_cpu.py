"""Stage 1 on CPU: pass 1 + Factors capture versus plain forward+backward and a batch-size-1 loop.

GPT-2-small-shaped random model (12 layers, 768 hidden, 12 heads), T tokens per sample, per-sample
next-token cross-entropy. Prints one table of ms/sample and ratios (all measured in this one run)
and bytes per sample for Exact, Factors and Factors(rank=16).

    python benchmarks/stage1_cpu.py [--samples 16] [--batch 8] [--tokens 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.collect import collect


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return ce.mean(1)


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=args.layers)).eval()
    layout = sf.layout_for(model)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.tokens))
    batches = [{"input_ids": ids[i:i + args.batch]} for i in range(0, args.samples, args.batch)]
    singles = [{"input_ids": ids[i:i + 1]} for i in range(args.samples)]
    attn = [model.get_parameter(n) for n in layout.params]

    def plain():
        for b in batches:
            model.zero_grad(set_to_none=True)
            lm_loss(model, b).sum().backward()

    def loop_bs1():  # the predecessor's way: one sample at a time, copy the attention gradients out
        for b in singles:
            grads = torch.autograd.grad(lm_loss(model, b).sum(), attn)
            [g.clone() for g in grads]

    def factors():
        collect(model, lm_loss, batches, layout, sf.Factors())

    plain()  # warm-up
    rows = [("plain forward+backward", timed(plain, args.repeats)),
            ("pass 1 + Factors capture", timed(factors, args.repeats)),
            ("batch-size-1 loop", timed(loop_bs1, args.repeats))]
    base = rows[0][1]
    print(f"# Stage 1, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"GPT-2-small shape, T={args.tokens}, batch {args.batch}, {args.samples} samples, torch {torch.__version__}")
    print("| method | ms/sample | x plain |\n| --- | --- | --- |")
    for name, sec in rows:
        print(f"| {name} | {1000 * sec / args.samples:.1f} | {sec / base:.2f} |")

    small = batches[0]["input_ids"][:2]
    rep_f, _ = collect(model, lm_loss, [{"input_ids": small}], layout, sf.Factors())
    rep_r, _ = collect(model, lm_loss, [{"input_ids": small}], layout, sf.Factors(rank=16))
    exact = sum(p.numel() for p in attn) * 4
    print("\n| codec (attention weights, fp32) | bytes/sample | x smaller than Exact |\n| --- | --- | --- |")
    for name, nbytes in (("Exact", exact), ("Factors", rep_f.nbytes_per_sample()),
                         ("Factors(rank=16)", rep_r.nbytes_per_sample())):
        print(f"| {name} | {nbytes / 2**20:.2f} MiB | {exact / nbytes:.1f} |")


if __name__ == "__main__":
    main()
