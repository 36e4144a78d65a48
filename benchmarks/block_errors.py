"""Why is one head block under-covered? Its errors under several codecs, and under independent hashes.

For each named block (layer, block, head, map seed): the coverage of the 95% intervals over the block's pairs and
the block's root-mean-square error over its root-mean-square standard error, for the default sketch and variants of
it (fp32 storage, mean centring, s = 4, a Gaussian map). Then the block's mean-centred raw gradients sketched with
the library's sjlt map and with two independent random hashes of the same k: whether the map's tiled structure or
the vectors themselves cause a shortfall.

    python benchmarks/block_errors.py --model gpt2 --train-steps 36 --blocks 1:Q:6:3 1:K:11:0
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf
from sketchfisher.capture.oracle import per_sample_gradients

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_vs_memory import MODELS, model_and_tasks  # noqa: E402


def codecs(seed: int, k: int) -> dict:
    return {"default (sjlt s=1, int4, scaled)": sf.Sketch(k=k, seed=seed),
            "sjlt s=1, fp32, scaled": sf.Sketch(k=k, seed=seed, dtype="fp32"),
            "sjlt s=1, fp32, mean centring": sf.Sketch(k=k, seed=seed, dtype="fp32", centring="mean"),
            "sjlt s=4, fp32, scaled": sf.Sketch(k=k, seed=seed, dtype="fp32", s=4),
            "gaussian, fp32, scaled": sf.Sketch(k=k, seed=seed, dtype="fp32", kind="gaussian")}


def block_gradients(model, loss, batches, blocks: dict) -> dict:
    """Per head block (``blocks``: key -> HeadBlock) its ``[n, |S|]`` fp64 per-sample gradients, one pass over the
    batches for all of them."""
    names = sorted({hb.param_name for hb in blocks.values()})
    full = {n: [] for n in names}
    for grads in per_sample_gradients(model, loss, batches, names):
        for n in names:
            full[n].append(grads[n].double())
    full = {n: torch.cat(v) for n, v in full.items()}
    out = {}
    for key, hb in blocks.items():
        g = full[hb.param_name]
        g = g[:, hb.start:hb.stop] if hb.storage_axis == 0 else g[:, :, hb.start:hb.stop]
        out[key] = g.reshape(g.shape[0], -1)
    return out


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its short training run, the samples per task and the sketch width (shared with map_spread.py)."""
    p.add_argument("--model", default="gpt2", choices=MODELS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=36)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--k", type=int, default=1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(p)
    p.add_argument("--blocks", nargs="+", default=["1:Q:6:3", "1:K:11:0"], metavar="LAYER:BLOCK:HEAD:SEED")
    args = p.parse_args()
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    exact = sf.analyze(model, loss, ta, tb, codec=sf.Factors())
    layout = exact.layout
    print(f"# {args.model} ({args.layers} layers, {args.train_steps} training steps), {args.samples} x {args.samples}")
    print("| block (seed) | codec | coverage | empirical / predicted error |\n| --- | --- | --- | --- |")
    for spec in args.blocks:
        layer, block, head, seed = spec.split(":")
        layer, head, seed, b = int(layer), int(head), int(seed), layout.block_names.index(block)
        for name, codec in codecs(seed, args.k).items():
            res = sf.analyze(model, loss, ta, tb, codec=codec)
            err = res.scores[:, :, layer, head, b] - exact.scores[:, :, layer, head, b]
            se = res.stderr[:, :, layer, head, b]
            print(f"| layer {layer} {block} head {head} ({seed}) | {name} | {float((err.abs() <= 1.959964 * se).double().mean()):.3f} "
                  f"| {float(err.square().mean().sqrt() / se.square().mean().sqrt()):.2f} |", flush=True)
    print("\nMean-centred raw gradients, the library's map against independent hashes (error / predicted, coverage):")
    print("| block | library sjlt | independent hash 0 | independent hash 1 |\n| --- | --- | --- | --- |")
    for spec in args.blocks:
        layer, block, head, seed = spec.split(":")
        layer, head, seed = int(layer), int(head), int(seed)
        hb = layout.head_blocks(layer, block)[head]
        x, y = (block_gradients(model, loss, batches, {0: hb})[0] for batches in (ta, tb))
        x, y = x - x.mean(0), y - y.mean(0)
        t = x @ y.T
        pred = ((t.square() + x.square().sum(1)[:, None] * y.square().sum(1)[None]) / args.k).sqrt()
        m = sf.Sketch(k=args.k, seed=seed, dtype="fp32").map(layer, layout.block_names.index(block), head, x.shape[1])
        cells = [m.apply(x) @ m.apply(y).T]
        for r in range(2):
            g = torch.Generator().manual_seed(r)
            h = torch.randint(0, args.k, (x.shape[1],), generator=g)
            sign = torch.randint(0, 2, (x.shape[1],), generator=g).double() * 2 - 1
            sk = lambda v: torch.zeros(v.shape[0], args.k, dtype=v.dtype).index_add_(1, h, v * sign)  # noqa: E731
            cells.append(sk(x) @ sk(y).T)
        row = [f"{float((c - t).square().mean().sqrt() / pred.square().mean().sqrt()):.2f}, "
               f"{float(((c - t).abs() <= 1.959964 * pred).double().mean()):.3f}" for c in cells]
        print(f"| layer {layer} {block} head {head} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
