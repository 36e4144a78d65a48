"""Pass 1's statistics folded straight from the gradients' factors, against forming each per-sample gradient and then
folding it: per Llama-7B layer (seven modules), batch 2, T = 512, the statistics task A keeps in pass 1 with the
conflict test (Fisher mean in fp32, Σg and the half sum in stochastically rounded bf16).

- "product + fold": ``torch.bmm`` into a bf16 buffer (fp32 accumulation, rounded once), then ``kernels.welford_update``
  (what a pass did before the fused kernel; the gradient is written and read again).
- "fused BMxBN/warps": ``kernels.fold_product`` with that tile (the gradient tile formed in registers, never written).

Each fused tile is checked against the two-step path on the same inputs: the statistics must agree except where an
fp32 sum rounds to the other bf16 neighbour (summation order), a small fraction of entries.

    python benchmarks/fused_fold.py                      # on a GPU: every tile, a table of ms per layer
    python benchmarks/fused_fold.py --device cpu         # tiny shapes through Triton's interpreter (a check only)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

TILES = {  # name: PRODUCT_TILES overrides
    "128x64/8": dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
    "64x128/8": dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=3),
    "128x128/8": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    "64x64/4": dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
    "128x64/4": dict(BM=128, BN=64, BK=32, num_warps=4, num_stages=4),
}


def layer_shapes(hidden: int, mlp: int) -> list[tuple[int, int]]:
    """(out, in) of a Llama layer's seven linear maps."""
    return [(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]


def make_inputs(shapes, n: int, tokens: int, device: str):
    torch.manual_seed(0)
    out = []
    for o, i in shapes:
        a = (torch.randn(n, tokens, i, device=device) * 0.05).bfloat16()
        d = (torch.randn(n, tokens, o, device=device) * 0.05).bfloat16()
        out.append((d.transpose(1, 2), a))  # left [n, out, T] (a view, as the capture gives it), right [n, T, in]
    return out


def fresh_state(o: int, i: int, device: str):
    return (torch.zeros(o, i, device=device), torch.zeros(o, i, dtype=torch.bfloat16, device=device),
            torch.zeros(o, i, dtype=torch.bfloat16, device=device))


def two_step(kernels, left, right, state, count, buffer):
    from sketchfisher.capture.hooks import fp32_reductions

    n = left.shape[0]
    with fp32_reductions():
        g = torch.bmm(left, right, out=buffer) if buffer is not None else torch.bmm(left.float(), right.float()).bfloat16()
    mean, sg, sh = state
    kernels.welford_update(g.reshape(n, -1), mean.view(-1), None, None, sg.view(-1), count=count,
                           sum_half=sh.view(-1), dtype=torch.float32)


def fused(kernels, left, right, state, count, tiles):
    mean, sg, sh = state
    kernels.fold_product(left, right, mean, None, sg, count=count, sum_half=sh, dtype=torch.float32, tiles=tiles)


def compare(a_state, b_state) -> float:
    """The largest fraction of entries that differ, over the three statistics."""
    return max((x != y).float().mean().item() for x, y in zip(a_state, b_state))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=list(TILES), choices=list(TILES))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.hidden, args.mlp, args.tokens, args.repeats = 32, 48, 24, 1
        small = dict(BM=16, BN=16, BK=16, num_warps=1, num_stages=1)
        tiles = {name: small for name in args.tiles[:1]}
    else:
        tiles = {name: TILES[name] for name in args.tiles}
    from sketchfisher import kernels

    shapes = layer_shapes(args.hidden, args.mlp)
    inputs = make_inputs(shapes, args.batch, args.tokens, args.device)
    entries = sum(o * i for o, i in shapes)
    buffers = {s: torch.empty(args.batch, *s, dtype=torch.bfloat16, device=args.device) for s in set(shapes)} if cuda else {}

    def run(step) -> list:
        states = [fresh_state(o, i, args.device) for o, i in shapes]
        for count in (0, args.batch):  # two batches: the second merges into a state that is not zero
            for (left, right), st, s in zip(inputs, states, shapes):
                step(left, right, st, count, s)
        return states

    ways = {"product + fold": lambda le, r, st, c, s: two_step(kernels, le, r, st, c, buffers.get(s))}
    for name, t in tiles.items():
        ways[f"fused {name}"] = lambda le, r, st, c, s, t=t: fused(kernels, le, r, st, c, t)
    reference = run(ways["product + fold"])
    rows = []
    for name, step in ways.items():
        states = run(step)
        differ = max(compare(a, b) for a, b in zip(reference, states))
        ms = float("nan")
        if cuda:
            sts = [fresh_state(o, i, args.device) for o, i in shapes]
            for _ in range(3):
                for (left, right), st, s in zip(inputs, sts, shapes):
                    step(left, right, st, 0, s)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.repeats):
                for (left, right), st, s in zip(inputs, sts, shapes):
                    step(left, right, st, 0, s)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.repeats
        rows.append((name, ms, differ))
    base = rows[0][1]
    print(f"layer: {len(shapes)} modules, {entries / 1e6:.0f} M entries, batch {args.batch}, T {args.tokens}, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}")
    print("| way | ms per layer | x product + fold | entries that differ |")
    print("| --- | --- | --- | --- |")
    for name, ms, differ in rows:
        print(f"| {name} | {ms:.2f} | {base / ms:.2f} | {differ:.2e} |")
    worst = max(d for _, _, d in rows)
    if worst > 0.02:
        raise SystemExit(f"a fused fold differs from the two-step fold in {worst:.1%} of entries")


if __name__ == "__main__":
    main()
