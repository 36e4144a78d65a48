"""Collection cost on one GPU at Llama-7B layer shapes: plain forward+backward vs pass 1 vs pass 2.

LlamaConfig(hidden 4096, 32 heads, intermediate 11008, vocabulary 32000), ``--layers`` layers, bf16
weights, random tokens, T tokens per sample, per-sample next-token cross-entropy. For each of MHA
(32 kv heads) and GQA (8 kv heads) it times, per sample and side by side in one run:
plain forward+backward; pass 1 (factor capture + Welford/Σ|g|/Σg statistics); pass 2 with
Sketch(sjlt, k=256); pass 2 with lossless Factors kept on the GPU. Peak GPU memory per phase.

    python3 benchmarks/gpu_collect.py [--layers 4] [--tokens 512] [--batch 4] [--steps 4] [--repeats 3] [--profile]

``--device cpu`` with ``--hidden/--heads/--intermediate/--vocab`` runs the same phases on a small
shape (the test suite does, so a refactor cannot break the script silently).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.collect import factor_pass, fold_factors, prepare_all, sketch_batches
from sketchfisher.compress import FactorContributions
from sketchfisher.fisher import FisherStats


def lm_loss(model, batch):
    """Per-sample mean next-token cross-entropy (softmax over the contiguous vocabulary axis)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                           reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def timed(fn, repeats, device):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def run(kv_heads: int, args) -> list:
    device = torch.device(args.device)
    config = hf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=kv_heads, vocab_size=args.vocab,
                            max_position_embeddings=max(2048, args.tokens))
    torch.manual_seed(0)
    with device:  # random init on the GPU: seconds instead of minutes for deep models
        model = hf.LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    layout = sf.layout_for(model)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [{"input_ids": torch.randint(0, args.vocab, (args.batch, args.tokens), device=device, generator=gen)}
               for _ in range(args.steps)]
    names = list(layout.params)
    modules = list(dict.fromkeys(layout.head_blocks(layer, b)[0].module_name
                                 for layer in range(layout.num_layers) for b in sf.BLOCKS))

    def plain():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            lm_loss(model, batch).sum().backward()

    def pass1():  # what sf.collect / the store writer run: one capture, one FisherStats, every batch
        stats = FisherStats(dtype=torch.float32)
        for _, bf in factor_pass(model, lm_loss, batches, names):
            fold_factors(stats, bf, names)
        return stats

    stats = pass1()
    codec = sf.Sketch(k=256, kind="sjlt", seed=0)
    cfg = sf.ScoreConfig()
    preps = prepare_all(layout, stats, stats, cfg, codec)

    def pass2_sketch():
        for _ in sketch_batches(model, lm_loss, batches, layout, codec, preps, "a", stats.count, cfg):
            pass

    def pass2_factors():
        rep = FactorContributions()
        for _, bf in factor_pass(model, lm_loss, batches, names):
            rep.add(bf)

    def capture_only():  # the share of pass 1 and 2 that is factor capture (forward, backward to module outputs)
        for _ in factor_pass(model, lm_loss, batches, names):
            pass

    def capture_grads():  # capture + every module's per-sample gradients (bmm), nothing else
        for _, bf in factor_pass(model, lm_loss, batches, names):
            for module in modules:
                bf.grad(module)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("pass 1", pass1), ("pass 2 sketch", pass2_sketch), ("pass 2 factors", pass2_factors),
                          ("plain", plain)):
            fn()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            print(f"## profile: {label}, {kv_heads} kv heads, one run of {args.steps} batches (ms)")
            for key in ("self_device_time_total", "self_cpu_time_total"):
                print(f"top by {key}: " + "; ".join(
                    f"{e.key[:40]} x{e.count} cpu {e.self_cpu_time_total / 1e3:.1f} gpu {e.self_device_time_total / 1e3:.1f}"
                    for e in sorted(events, key=lambda e: -getattr(e, key))[:8]))
    rows = []
    for name, fn in (("plain forward+backward", plain), ("pass 1 (statistics)", pass1),
                     ("pass 2 Sketch(sjlt, k=256)", pass2_sketch), ("pass 2 Factors (lossless)", pass2_factors),
                     ("(part) factor capture only", capture_only),
                     ("(part) capture + per-sample gradients", capture_grads)):
        sec, peak = timed(fn, args.repeats, device)
        rows.append((f"{kv_heads} kv heads", name, 1000 * sec / (args.batch * args.steps), peak))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="batches per timed run (statistics and maps persist across them)")
    p.add_argument("--kv", type=int, nargs="+", default=[32, 8], help="key/value head counts to run")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of each phase first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    rows = []
    for kv in args.kv:
        rows += run(kv, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# {name}, torch {torch.__version__}, hidden {args.hidden}, {args.heads} heads, intermediate "
          f"{args.intermediate} x {args.layers} layers, bf16, T={args.tokens}, batch {args.batch}, {args.steps} batches per run, median of {args.repeats}")
    print("| model | phase | ms/sample | x plain | peak GiB |\n| --- | --- | --- | --- | --- |")
    base = {}
    for model, phase, ms, peak in rows:
        base.setdefault(model, ms)
        print(f"| {model} | {phase} | {ms:.1f} | {ms / base[model]:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
