"""Sketch accuracy versus memory on real MiniLM gradients (two shipped task sets).

Exact scores (``--variant``, paper by default; normalizer a) against every requested sketch configuration:
Spearman over all scores, median relative error, top-50 recall, nominal-95% interval coverage,
and bytes per sample; plus the memory ratio against full fp16 C_i and g_j per head block on MiniLM
and, from the same formula, at Llama-7B shapes.

    python benchmarks/accuracy_vs_memory.py [--samples 48] [--ks 64,256,1024] [--kinds gaussian,sjlt,srht] [--s 1,4]
    python benchmarks/accuracy_vs_memory.py --kinds sjlt --ks 256,1024 --dtypes fp16,int4 --vr on \
        --centring mean,scaled --passes 2,1.5          # the centrings side by side, in both pass orders
    python benchmarks/accuracy_vs_memory.py --kinds sjlt --ks 1024 --dtypes int4 --vr on --passes 1.5,2 --rotate off,on
    python benchmarks/accuracy_vs_memory.py --model gpt2 --kinds sjlt --ks 1024 --dtypes int4 --vr on --passes 1.5
        # the same shipped texts through a randomly initialised GPT-2-small-wide (or --model llama: Llama with GQA)
        # causal LM of --layers layers, next-token loss (MiniLM's tokenizer: its ids fit either vocabulary)
    python benchmarks/accuracy_vs_memory.py --model llama7b --layers 1 --samples 24 --kinds sjlt --ks 256,1024 \
        --dtypes fp16,int4 --vr on --centring mean,scaled --passes 1.5   # a slice of Llama-7B's shape: one layer
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf
from sketchfisher.evaluation import compare
from sketchfisher.demo import load_minilm, load_task, make_batches, masked_token_loss
from sketchfisher.tasks.batches import clm_loss, task_batches

MODELS = ("minilm", "gpt2", "llama", "llama7b")


def random_causal_lm(name: str, layers: int, vocab: int) -> torch.nn.Module:
    """A randomly initialised causal LM of the width of GPT-2 small (768, 12 heads), of a Llama with grouped
    KV heads (512, 8 query and 2 KV heads) or of Llama-2-7B (``llama7b``: 4096, 32 heads), ``layers`` deep (no
    network: configurations only)."""
    import transformers as hf

    torch.manual_seed(0)
    if name == "gpt2":
        config = hf.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=vocab, n_positions=128)
        return hf.GPT2LMHeadModel(config).eval()
    if name == "llama7b":  # Llama-2-7B's layer shape: head blocks of 128 x 4096 entries, as at full size
        config = hf.LlamaConfig(num_hidden_layers=layers, hidden_size=4096, num_attention_heads=32,
                                num_key_value_heads=32, intermediate_size=11008, vocab_size=vocab,
                                max_position_embeddings=128)
        model = hf.LlamaForCausalLM(config).eval()
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight.requires_grad_(False)  # no unit reads them; their weight gradients would be most of the work
        return model
    config = hf.LlamaConfig(num_hidden_layers=layers, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=1376, vocab_size=vocab, max_position_embeddings=128)
    return hf.LlamaForCausalLM(config).eval()


def metrics(exact, est, stderr, top: int = 50) -> dict:
    """:func:`compare`'s numbers, and the lowest 95% coverage of any head block ``[nA, nB, L, H, blocks]``
    (over its nA·nB pairs)."""
    out = compare(exact, est, stderr, top)
    inside = ((est - exact).abs() <= 1.959964 * stderr).double().flatten(0, 1)
    seen = torch.isfinite(exact).flatten(0, 1).all(0)
    out["worst_block_coverage95"] = float(inside.mean(0)[seen].min())
    return out


def bytes_full_fp16_per_sample(layout: sf.Layout) -> int:
    """Full fp16 C_i (task A) or g_j (task B) for every head block: one vector per head block."""
    total = 0
    for layer in range(layout.num_layers):
        for block in sf.BLOCKS:
            total += sum(hb.numel for hb in layout.head_blocks(layer, block)) * 2
    return total


def sketch_bytes_per_sample(layout: sf.Layout, codec: sf.Sketch) -> int:
    """Sketch vector + 2 exact fp64 scalars (norm², cross term) (+ γ with scaled centring) per distinct head
    block."""
    blocks = sum(len(layout.head_blocks(layer, block)) for layer in range(layout.num_layers) for block in sf.BLOCKS)
    return blocks * codec.bytes_per_block()


def llama7b_ratio(codec: sf.Sketch) -> float:
    layers, heads, block = 32, 32, 128 * 4096
    full = layers * 4 * heads * block * 2
    return full / (layers * 4 * heads * codec.bytes_per_block())


def model_and_tasks(name: str, samples: int, layers: int = 2, train_steps: int = 0):
    """``(model, per-sample loss, math batches, code batches)``: the real MiniLM with the masked-token loss, or a
    random causal LM (:func:`random_causal_lm`, trained first for ``train_steps``) with the next-token loss."""
    model, tok = load_minilm()
    if name == "minilm":
        return (model, masked_token_loss, make_batches(load_task("math", samples), tok),
                make_batches(load_task("code", samples), tok))
    model = random_causal_lm(name, layers, tok.vocab_size)
    ta, tb = (task_batches(load_task(t, samples), tok, "clm", 8, 48) for t in ("math", "code"))
    if train_steps:
        train(model, ta + tb, train_steps)
    return model, clm_loss, ta, tb


def train(model: torch.nn.Module, batches: list, steps: int, lr: float = 1e-3) -> None:
    """A short next-token training run (Adam, the batches in turn); prints the mean loss before and after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mean = lambda: sum(float(clm_loss(model, b).mean()) for b in batches) / len(batches)  # noqa: E731
    with torch.no_grad():
        before = mean()
    model.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        clm_loss(model, batches[step % len(batches)]).mean().backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        print(f"# trained {steps} Adam steps (lr {lr:g}): mean loss {before:.2f} -> {mean():.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--ks", default="64,256,1024")
    p.add_argument("--kinds", default="gaussian,sjlt,srht")
    p.add_argument("--dtypes", default="fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s", default="1", help="non-zeros per column for sjlt (comma-separated list)")
    p.add_argument("--variant", default="paper", choices=list(sf.VARIANTS))
    p.add_argument("--vr", default="off,on", help="variance reduction settings to run (off, on or both)")
    p.add_argument("--centring", default="scaled", help="centrings to run with variance reduction (scaled, mean)")
    p.add_argument("--passes", default="2", help="pass orders to run (2, 1.5)")
    p.add_argument("--rotate", default="off", help="the Hadamard rotation before storage (off, on or both)")
    p.add_argument("--model", default="minilm", choices=MODELS, help="the real MiniLM, or a random causal LM shape")
    p.add_argument("--layers", type=int, default=2, help="depth of the random causal LMs")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the causal LM first: this many Adam steps on both tasks' texts (next-token loss)")
    args = p.parse_args()
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    layout = sf.layout_for(model)
    t0 = time.perf_counter()
    exact = sf.analyze(model, loss, ta, tb, codec=sf.Factors(), variant=args.variant)
    what = "MiniLM" if args.model == "minilm" else (f"{'trained' if args.train_steps else 'random'} {args.model} "
                                                     f"({args.layers} layers, {type(model).__name__})")
    print(f"# {what}, math vs code, {args.variant} variant, {exact.n_a}x{exact.n_b} samples, {exact.scores.numel()} scores; "
          f"exact in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}")
    full = bytes_full_fp16_per_sample(layout)
    print("| kind | k | s | dtype | VR | passes | rotated | Spearman | median rel err | top-50 recall | 95% coverage "
          "| on the top 1% | worst head block | bytes/sample | x vs full fp16 (this model) | x at Llama-7B |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in args.kinds.split(","):
        for k in map(int, args.ks.split(",")):
            for dtype, s in itertools.product(args.dtypes.split(","), map(int, args.s.split(","))):
                if kind != "sjlt" and s != int(args.s.split(",")[0]):
                    continue  # s only matters for sjlt
                settings = [(False, "mean")] if "off" in args.vr.split(",") else []
                if "on" in args.vr.split(","):
                    settings += [(True, c) for c in args.centring.split(",")]
                rotations = [r == "on" for r in args.rotate.split(",")]
                for (vr, centring), passes, rotate in itertools.product(settings, map(float, args.passes.split(",")),
                                                                        rotations):
                    if passes == 1.5 and not vr:
                        continue  # task B in one pass needs variance reduction
                    codec = sf.Sketch(k=k, kind=kind, seed=args.seed, dtype=dtype, variance_reduction=vr, s=s,
                                      centring=centring, rotate=rotate)
                    res = sf.analyze(model, loss, ta, tb, codec=codec, variant=args.variant,
                                     passes=passes)
                    m = metrics(exact.scores, res.scores, res.stderr)
                    nbytes = sketch_bytes_per_sample(layout, codec)
                    print(f"| {kind} | {k} | {s if kind == 'sjlt' else '-'} | {dtype} | {centring if vr else 'off'} "
                          f"| {passes:g} | {'yes' if rotate else 'no'} | {m['spearman']:.4f} | {m['median_rel_err']:.4f} | {m['top50_recall']:.2f} "
                          f"| {m['coverage95']:.3f} | {m['coverage95_top1pct']:.3f} | {m['worst_block_coverage95']:.3f} "
                          f"| {nbytes} | {full / nbytes:.0f} | {llama7b_ratio(codec):.0f} |", flush=True)


if __name__ == "__main__":
    main()
