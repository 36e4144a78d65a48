"""Where the pass-2 preparation's time goes at 7B: its arithmetic, and moving task A's Fisher to the host.

Builds random Llama-7B-shaped attention statistics on the device (task A: Fisher and Σ|g|; task B: Σ|g|),
times :func:`sketchfisher.collect.prepare_all` without and with moving the Fisher to host memory, then the
host copy itself: into fresh pageable memory, into memory already touched, into pinned memory (and the
pinning), back from pinned memory, and both directions at once on two streams. With ``--disk DIR``: what a store's background writer can do there, sha256 over one core and a
write with fsync. Measured on an H200 host (docs/benchmarks.md, "The user path at full size").

    python3 benchmarks/host_transfer.py                      # 32 layers of hidden 4096, on cuda
    python3 benchmarks/host_transfer.py --disk /tmp --disk-gib 4   # and the disk and hash rates
    python3 benchmarks/host_transfer.py --device cpu --layers 1 --hidden 64 --heads 4   # the suite's smoke run
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.collect import prepare_all, trainable_weights
from sketchfisher.fisher import FisherStats, Welford


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--disk", default=None, help="a directory: also measure sha256 and write+fsync there")
    p.add_argument("--disk-gib", type=float, default=4.0, help="GiB written for --disk (in 1 GiB pieces)")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def clock(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    config = hf.LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                            intermediate_size=2 * args.hidden, vocab_size=128, num_hidden_layers=args.layers)
    with torch.device("meta"):
        model = hf.LlamaForCausalLM(config)
    layout = sf.layout_for(model)
    shapes = {n: q.shape for n, q in model.named_parameters()}
    names = trainable_weights(model, layout)

    def stats(quantities):
        s = FisherStats(torch.float32, quantities=quantities)
        for n in names:
            s.welford[n] = Welford(256, torch.rand(shapes[n], device=dev) if "fisher" in quantities else None)
            if "abs" in quantities:
                s.sum_abs[n] = torch.rand(shapes[n], device=dev) * 256
        return s

    cfg, codec = sf.ScoreConfig(), sf.Sketch(k=256, kind="sjlt", seed=0)
    print(f"# {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, {args.layers} layers of hidden "
          f"{args.hidden}\n| what | seconds |\n| --- | --- |")
    for offload in (False, True):
        sec, _ = clock(lambda: prepare_all(layout, stats(("fisher", "abs")), stats(("abs",)), cfg, codec,
                                           offload=offload))
        print(f"| prepare_all, Fisher {'moved to the host' if offload else 'left on the device'} | {sec:.2f} |")
    tensors = [torch.rand(shapes[n], device=dev) for n in names]
    gb = sum(t.numel() * 4 for t in tensors) / 1e9
    sec, host = clock(lambda: [t.to("cpu", copy=True) for t in tensors])
    print(f"| copy {gb:.1f} GB into fresh pageable host memory | {sec:.2f} |")
    sec, _ = clock(lambda: [h.copy_(t) for h, t in zip(host, tensors)])
    print(f"| copy into host memory already touched | {sec:.2f} |")
    if dev.type == "cuda":
        sec, pinned = clock(lambda: [torch.empty(t.shape, pin_memory=True) for t in tensors])
        print(f"| pin {gb:.1f} GB of host memory | {sec:.2f} |")
        sec, _ = clock(lambda: [q.copy_(t, non_blocking=True) for q, t in zip(pinned, tensors)])
        print(f"| copy into pinned memory | {sec:.2f} |")
        back = [torch.empty_like(t) for t in tensors]
        sec, _ = clock(lambda: [b.copy_(q, non_blocking=True) for b, q in zip(back, pinned)])
        print(f"| copy from pinned memory back to the device | {sec:.2f} |")
        other = torch.cuda.Stream(dev)  # (one direction each: what the preparation's copy stream overlaps)

        def both_ways():
            other.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(other):
                for q, t in zip(pinned, tensors):
                    q.copy_(t, non_blocking=True)
            for b, q in zip(back, sources):
                b.copy_(q, non_blocking=True)
            torch.cuda.current_stream(dev).wait_stream(other)

        sources = [torch.empty(t.shape, pin_memory=True) for t in tensors]  # (another pinned set: the way back)

        sec, _ = clock(both_ways)
        print(f"| both at once, {gb:.1f} GB each way on two streams | {sec:.2f} |")
    if args.disk:
        disk(args.disk, args.disk_gib)


def disk(folder: str, gib: float) -> None:
    """sha256 on one core, and writing ``gib`` GiB with fsync into ``folder`` (the store writer's two costs)."""
    import hashlib

    piece = min(1 << 30, int(gib * 2**30))
    data = os.urandom(piece)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    hashed = piece / (time.perf_counter() - start) / 1e9
    path = os.path.join(folder, "sketchfisher-disk-test.bin")
    pieces = max(1, round(gib * 2**30 / piece))
    start = time.perf_counter()
    try:
        with open(path, "wb") as fh:
            for _ in range(pieces):
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        written = pieces * piece / (time.perf_counter() - start) / 1e9
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"| what | GB/s |\n| --- | --- |\n| sha256, one core | {hashed:.2f} |\n"
          f"| write {pieces * piece / 2**30:.1f} GiB + fsync into {folder} | {written:.2f} |")


if __name__ == "__main__":
    main()
