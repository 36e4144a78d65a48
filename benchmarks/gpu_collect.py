"""Collection cost on one GPU at Llama-7B layer shapes: plain forward+backward vs pass 1 vs pass 2.

LlamaConfig(hidden 4096, 32 heads, intermediate 11008, vocabulary 32000), ``--layers`` layers, bf16
weights, random tokens, T tokens per sample, per-sample next-token cross-entropy. For each of MHA
(32 kv heads) and GQA (8 kv heads) it times, per sample and side by side in one run:
plain forward+backward; pass 1 (factor capture + Welford/Σ|g|/Σg statistics); pass 2 with
Sketch(sjlt, k=256); pass 2 with lossless Factors kept on the GPU. Peak GPU memory per phase.

    python3 benchmarks/gpu_collect.py [--layers 4] [--tokens 512] [--batch 4] [--steps 4] [--repeats 3] [--profile]
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
from sketchfisher.capture import FactorCapture
from sketchfisher.compress import FactorContributions
from sketchfisher.fisher import FisherStats
from sketchfisher.collect import prepare_all, sketch_batches


def lm_loss(model, batch):
    """Per-sample mean next-token cross-entropy (softmax over the contiguous vocabulary axis)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                           reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def run(kv_heads: int, args) -> list:
    config = hf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                            num_attention_heads=32, num_key_value_heads=kv_heads, vocab_size=32000,
                            max_position_embeddings=max(2048, args.tokens))
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes for deep models
        model = hf.LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    layout = sf.layout_for(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 32000, (args.batch, args.tokens), device="cuda", generator=gen)}
               for _ in range(args.steps)]
    names = list(layout.params)
    modules = [n.rsplit(".", 1)[0] for n in names]

    def plain():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            lm_loss(model, batch).sum().backward()

    def pass1():  # what sf.collect / the store writer run: one capture, one FisherStats, every batch
        stats = FisherStats(dtype=torch.float32)
        with FactorCapture(model, modules) as cap:
            for batch in batches:
                bf = cap.run(lm_loss, batch)
                for module, name in zip(modules, names):
                    stats.update({name: bf.grad(module)})
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
        with FactorCapture(model, modules) as cap:
            for batch in batches:
                bf = cap.run(lm_loss, batch)
                rep.append(bf.A, bf.D, bf.lengths)

    def capture_only():  # the share of pass 1 and 2 that is factor capture (forward, backward to module outputs)
        with FactorCapture(model, modules) as cap:
            for batch in batches:
                cap.run(lm_loss, batch)

    def capture_grads():  # capture + every module's per-sample gradients (bmm), nothing else
        with FactorCapture(model, modules) as cap:
            for batch in batches:
                bf = cap.run(lm_loss, batch)
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
        sec, peak = timed(fn, args.repeats)
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
    args = p.parse_args()
    rows = []
    for kv in args.kv:
        rows += run(kv, args)
        torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Llama-7B layer shapes x {args.layers}, "
          f"bf16, T={args.tokens}, batch {args.batch}, {args.steps} batches per run, median of {args.repeats}")
    print("| model | phase | ms/sample | x plain | peak GiB |\n| --- | --- | --- | --- | --- |")
    base = {}
    for model, phase, ms, peak in rows:
        base.setdefault(model, ms)
        print(f"| {model} | {phase} | {ms:.1f} | {ms / base[model]:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
