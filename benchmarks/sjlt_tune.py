"""sjlt throughput on one head block (524,288 entries) beside a plain copy and a plain read, on CUDA.

For each row count n and dtype: ``copy_`` into a preallocated buffer (reads and writes x), ``x.sum``
(reads x once), and the Triton sjlt kernel (``SketchMap.apply``, s = 1 and s = 4) with the best of a
few launch shapes; then the fused pass-2 side kernel (square, weight, centre, cross term, norm and
sketch) on 32 head blocks of a Llama-7B Q projection gradient, beside the GEMM-shaped alternative
(torch elementwise side vectors, then a bf16 matmul with one shared Gaussian map). GB/s count the
bytes of x read.

    python benchmarks/sjlt_tune.py [--repeats 30] [--rows 1 4 16 64]
    python benchmarks/sjlt_tune.py --modules --batch 2      # pass 2's side kernel on every Llama-7B module shape
    python benchmarks/sjlt_tune.py --welford --batch 2      # pass 1's statistics kernel on a gate_proj gradient
    python benchmarks/sjlt_tune.py --one-byte --batch 2     # the side passes' kernel: bf16 or one-byte preparations
    python benchmarks/sjlt_tune.py --steps --grad-dtype bf16  # ... by tiles a step and warps, as the library calls it
    python benchmarks/sjlt_tune.py --launches                 # the host's time per launch: JIT against kept kernels
"""

from __future__ import annotations

import argparse
import itertools

import torch

from sketchfisher import kernels


def bench(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed(fn, repeats, calls=10):
    """GPU time per call of ``fn`` captured ``calls`` times in a CUDA graph (no Python launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench(graph.replay, repeats) / calls


def best_sketch(x, key, k, s, repeats):
    """Best (ms, config) over launch shapes; every shape gives the same sketch (checked)."""
    n, size = x.shape
    offsets = torch.zeros(1, dtype=torch.int64, device=x.device)
    keys = torch.tensor([key], dtype=torch.int64, device=x.device)
    ref = None
    best = None
    for chunks, warps, step in itertools.product((None, 264), (4, 8), (None, 1, 4)):
        fn = lambda: kernels.sketch_heads(x, keys, offsets, size, size, size, k, s, chunks=chunks,  # noqa: E731
                                          tiles_per_step=step, num_warps=warps)[0]
        out = fn()
        ref = out if ref is None else ref
        assert float((out - ref).norm() / ref.norm()) < 1e-5
        t = graphed(fn, repeats)
        if best is None or t < best[0]:
            best = (t, f"chunks={chunks or 'auto'} warps={warps} tiles/step={step or 'auto'}", bench(fn, repeats))
    return best


MODULES = {  # Llama-7B: (rows, columns, units, unit rows, unit columns) of a weight and its unit blocks
    "q_proj (32 heads of 128 rows)": (4096, 4096, 32, 128, 4096),
    "gate_proj (32 groups of 344 rows)": (11008, 4096, 32, 344, 4096),
    "down_proj (32 groups of 344 columns)": (4096, 11008, 32, 4096, 344),
}


GRAD_DTYPE = torch.float32  # the per-sample gradients' dtype (--grad-dtype): fp32, or bf16 as a bf16 model's arrive


def module_blocks(batch: int):
    """Per Llama-7B module shape: ``(label, g [batch, rows, cols] in GRAD_DTYPE, keys, offsets, size, unit columns,
    columns, units)`` for :func:`kernels.sketch_heads`."""
    for label, (rows, cols, H, ur, uc) in MODULES.items():
        g = torch.randn(batch, rows, cols, device="cuda").to(GRAD_DTYPE)
        offsets = (torch.arange(H, device="cuda") * ur * cols) if uc == cols else torch.arange(H, device="cuda") * uc
        keys = torch.randint(0, 2**31 - 1, (H, 2), device="cuda")
        yield label, g, keys, offsets, ur * uc, uc, cols, H


def module_sweep(batch: int, ks: list[int], repeats: int) -> None:
    """The pass-2 side kernel (square, fp32 weight, bf16 centre and other, cross term, norm, sketch) over the unit
    blocks of each Llama-7B module shape, a batch of per-sample gradients (fp32, or --grad-dtype): the default launch beside the best
    of a sweep, against copy_ of g and the bytes read (g once, the three vectors once)."""
    print(f"\n## pass 2's side kernel per module, batch {batch}, {str(GRAD_DTYPE)[6:]} gradient, weight fp32, centre and "
          "other bf16")
    print("| module | k | copy_ of g ms | default ms | GB/s read | best ms | x default | best launch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, g, keys, offsets, size, uc, cols, H in module_blocks(batch):
        w = torch.rand(H, size, device="cuda")
        c, o = (torch.rand(H, size, device="cuda").to(torch.bfloat16) for _ in range(2))
        buf = torch.empty_like(g)
        t_copy = graphed(lambda: buf.copy_(g), repeats)
        read = g.numel() * g.element_size() + H * size * (4 + 2 + 2)
        for k in ks:
            def call(**kw):
                return kernels.sketch_heads(g, keys, offsets, size, uc, cols, k, 1, transform="square", weight=w,
                                            centre=c, other=o, **kw)
            ref = call()[0]
            t_def = graphed(call, repeats)
            best = (t_def, "default")
            for rows_, step, warps, chunks in itertools.product((1, 2), (None, 2, 8), (4, 8), (None, 64)):
                kw = dict(block_rows=rows_, tiles_per_step=step, num_warps=warps, chunks=chunks)
                out = call(**kw)[0]
                assert float((out - ref).norm() / ref.norm()) < 1e-5, kw
                t = graphed(lambda: call(**kw), repeats)
                if t < best[0]:
                    best = (t, " ".join(f"{a}={b}" for a, b in kw.items() if b is not None))
            print(f"| {label} | {k} | {t_copy:.3f} | {t_def:.3f} | {read / t_def / 1e6:.0f} | {best[0]:.3f} "
                  f"| {best[0] / t_def:.2f} | {best[1]} |", flush=True)


def side_pass_inputs(H: int, size: int, one_byte: bool, conflicts: bool = True, device: str = "cuda"):
    """The side passes' kernel arguments per pass: ``(pass, transform, tensors, scales)`` as task B's single pass
    calls it (abs, balance w_b, centre x̄', the cross term, two conflict weights) and as task A's second pass does
    (square, fp32 w_a, centres x̄' and ȳ', one conflict weight); the preparations in bf16, or in one byte (fp8 codes
    and a scale per unit block)."""
    from sketchfisher.compress.onebyte import OneByte

    vec = lambda *lead: torch.rand(*lead, H, size, device=device) + 0.1  # noqa: E731
    w_a, w_b, x_bar, y_bar, u = vec(), vec(), vec() - 0.5, vec() - 0.5, vec(2) - 0.5
    for name, transform, given in (("B", "abs", dict(weight=w_b, centre=x_bar, other=x_bar, conflict=u)),
                                   ("A", "square", dict(weight=w_a, centre=x_bar, other=y_bar, conflict=u[:1]))):
        kw, scales, coded = {}, {}, {}
        for key, t in given.items():
            if key == "conflict" and not conflicts:
                continue
            if key == "weight" and name == "A":
                kw[key] = t  # (w_a stays fp32)
            elif one_byte:  # (pass B's centre and other are one tensor, as the library's: read once)
                ob = coded[id(t)] = coded.get(id(t)) or OneByte.encode(t)
                kw[key], scales[key] = ob.codes, ob.scale
            else:
                kw[key] = t.to(torch.bfloat16)
        yield name, transform, kw, scales


def one_byte_sweep(batch: int, k: int, repeats: int) -> None:
    """The side passes' kernel (:func:`side_pass_inputs`) with the preparations in bf16 beside one byte, per
    Llama-7B module shape."""
    print(f"\n## the side passes' kernel, batch {batch}, k {k}, {str(GRAD_DTYPE)[6:]} gradients: bf16 against one-byte "
          "preparations (ms, CUDA graphs)")
    print("| module | pass | bf16 ms | one byte ms | one byte / bf16 | conflict weights off: bf16, one byte |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, g, keys, offsets, size, uc, cols, H in module_blocks(batch):
        times = {}
        for conflicts in (True, False):
            for one_byte in (False, True):
                for name, transform, kw, scales in side_pass_inputs(H, size, one_byte, conflicts):
                    times[(name, conflicts, one_byte)] = graphed(
                        lambda: kernels.sketch_heads(g, keys, offsets, size, uc, cols, k, 1, transform=transform,
                                                     scales=scales, **kw), repeats)
        for name in ("B", "A"):
            t = [times[(name, c, o)] for c in (True, False) for o in (False, True)]
            print(f"| {label} | {name} | {t[0]:.3f} | {t[1]:.3f} | {t[1] / t[0]:.2f} | {t[2]:.3f}, {t[3]:.3f} |",
                  flush=True)


def steps_sweep(batch: int, k: int, repeats: int) -> None:
    """The side passes' kernel as the library calls it (one-byte preparations, the conflict weights, both
    launches), per Llama-7B module shape, at one and two tiles a step and 4 and 8 warps (ms, CUDA graphs)."""
    print(f"\n## the side passes' kernel by tiles a step, batch {batch}, k {k}, {str(GRAD_DTYPE)[6:]} gradients "
          "(ms, CUDA graphs; the library's default marked *)")
    shapes = list(itertools.product((1, 2), (4, 8)))
    print("| module | pass | " + " | ".join(f"{t} tile(s), {w} warps" for t, w in shapes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in shapes) + " |")
    for label, g, keys, offsets, size, uc, cols, H in module_blocks(batch):
        for name, transform, kw, scales in side_pass_inputs(H, size, one_byte=True):
            rows = min(kernels._next_pow2(batch), 4)
            default = kernels.launch_shape(rows, kernels._next_pow2(k), 1, -(-size // k), H, 1)[0]
            cells = []
            for step, warps in shapes:
                sh = kernels.SketchHeads(keys, offsets, size, uc, cols, k, 1, device=g.device, transform=transform,
                                         scales=scales, tiles_per_step=step, num_warps=warps, **kw)
                t = graphed(lambda: sh(g), repeats)
                cells.append(f"{t:.3f}{'*' if step == default and warps == 4 else ''}")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


def launch_sweep(rounds: int = 3, calls: int = 200) -> None:
    """The host's time per call of the side kernel (both launches) and of the Welford update, each launched through
    the kept compiled kernel (``kernels.Launches``) and through the JIT every time, alternating: shapes so small that
    the device keeps up, so the host's loop sets the time (the device is waited for only after the loop)."""
    import time

    from sketchfisher.compress.onebyte import OneByte

    dev = torch.device("cuda", torch.cuda.current_device())
    H, size = 32, 4096
    ob = OneByte.encode(torch.rand(H, size, device=dev) - 0.5)
    sh = kernels.SketchHeads(torch.randint(0, 2**31 - 1, (H, 2)), torch.arange(H) * size, size, size, size, 256, 1,
                             device=dev, transform="abs", weight=ob.codes, centre=ob.codes, other=ob.codes,
                             conflict=torch.stack([ob.codes, ob.codes]),
                             scales={"weight": ob.scale, "centre": ob.scale, "other": ob.scale,
                                     "conflict": torch.stack([ob.scale, ob.scale])})
    g = torch.randn(2, H * size, device=dev).to(torch.bfloat16)
    mean, sum_g, half = torch.zeros(size, device=dev), *(torch.zeros(size, device=dev, dtype=torch.bfloat16)
                                                         for _ in range(2))
    kept = kernels.Launches.__call__

    def jit(self, grid, args, constants, options):
        self.fn[grid](*args, **constants)

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        return host / calls * 1e6

    side = lambda i=0: sh(g)  # noqa: E731
    welford = lambda i=0: kernels.welford_update(g[:, :size], mean, None, None, sum_g, count=5 + 2 * i,  # noqa: E731
                                                 sum_half=half)
    print("\n## the host's time per call (µs): the JIT's launch against the kept compiled kernel, alternating")
    print("| round | launch | side kernel call (two launches) | Welford update |\n| --- | --- | --- | --- |")
    try:
        for r in range(rounds):
            for name, call in (("JIT", jit), ("kept", kept)):
                kernels.Launches.__call__ = call
                print(f"| {r + 1} | {name} | {per_call(side):.1f} | {per_call(welford):.1f} |", flush=True)
    finally:
        kernels.Launches.__call__ = kept


def welford_sweep(batch: int, repeats: int, conflict_sums: bool = False) -> None:
    """The pass-1 statistics kernel on a Llama-7B gate_proj per-sample gradient ``[batch, 11008·4096]`` fp32, with
    the statistics of task A's first pass at 7B (the Fisher's Welford mean in fp32, Σ|g| in bf16 rounded
    stochastically; ``conflict_sums``: Σg and the half sum in bf16 instead, as with the conflict test): launch shapes
    side by side, GB/s of the bytes read and written. The gradient in GRAD_DTYPE."""
    N = 11008 * 4096
    g = torch.randn(batch, N, device="cuda").to(GRAD_DTYPE)
    bf16 = lambda: torch.zeros(N, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    mean = torch.zeros(N, device="cuda")
    sabs, sg, sh = (None, bf16(), bf16()) if conflict_sums else (bf16(), None, None)
    buf = torch.empty_like(g)
    t_copy = graphed(lambda: buf.copy_(g), repeats)
    moved = g.numel() * g.element_size() + N * (4 + 4 + (8 if conflict_sums else 4))
    sums = "Σg + half sum bf16" if conflict_sums else "Σ|g| bf16"
    print(f"\n## pass 1's statistics kernel, gate_proj [{batch}, {N}] {str(GRAD_DTYPE)[6:]}, Fisher mean fp32 + {sums} "
          f"(stochastic); copy_ of g {t_copy:.3f} ms")
    print("| block | warps | ms | GB/s moved | x copy_ of g |\n| --- | --- | --- | --- | --- |")
    for block, warps in itertools.product((512, 1024, 2048, 4096), (4, 8)):
        t = graphed(lambda: kernels.welford_update(g, mean, None, sabs, sg, 0, sum_half=sh, block=block,
                                                   dtype=torch.float32, num_warps=warps), repeats)
        print(f"| {block} | {warps} | {t:.3f} | {moved / t / 1e6:.0f} | {t / t_copy:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16, 64], help="row counts of the single-block sweep")
    p.add_argument("--modules", action="store_true", help="only the side kernel on the Llama-7B module shapes")
    p.add_argument("--welford", action="store_true", help="only the pass-1 statistics kernel's launch shapes")
    p.add_argument("--one-byte", action="store_true", help="only the side passes' kernel: bf16 or one-byte preparations")
    p.add_argument("--steps", action="store_true", help="only the side passes' kernel at one and two tiles a step")
    p.add_argument("--launches", action="store_true", help="only the host's time per launch: JIT against kept kernels")
    p.add_argument("--batch", type=int, default=2, help="samples per batch of the module and statistics sweeps")
    p.add_argument("--grad-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="the per-sample gradients of the module, one-byte and statistics sweeps (bf16: a bf16 model's)")
    p.add_argument("--conflict-sums", action="store_true",
                   help="the statistics sweep with Σg and the half sum (the conflict test's pass 1) instead of Σ|g|")
    p.add_argument("--k", type=int, nargs="+", default=[256, 1024], help="sketch widths of the module sweep")
    args = p.parse_args()
    global GRAD_DTYPE
    GRAD_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.grad_dtype]
    if args.welford:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.repeats} CUDA-graph timings")
        welford_sweep(args.batch, args.repeats, args.conflict_sums)
        return
    if args.launches:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
        launch_sweep()
        return
    if args.steps:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.repeats} CUDA-graph timings")
        steps_sweep(args.batch, args.k[0], args.repeats)
        return
    if args.one_byte:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.repeats} CUDA-graph timings")
        one_byte_sweep(args.batch, args.k[0], args.repeats)
        return
    if args.modules:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.repeats} CUDA-graph timings")
        module_sweep(args.batch, args.k, args.repeats)
        return
    size, k = 524288, 256
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, one head block of {size} entries, k = {k}; "
          f"median of {args.repeats} CUDA-event timings")
    print("GPU time per call from CUDA graphs of 10 calls; the last column is one eager call with Python overhead")
    print("| n | dtype | copy_ ms | x.sum ms | sjlt s=1 ms | GB/s | x copy_ | x sum | sjlt s=4 ms | x copy_ "
          "| best launch (s=1) | eager sjlt s=1 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, dtype in itertools.product(args.rows, (torch.bfloat16, torch.float32)):
        x = torch.randn(n, size, device="cuda").to(dtype)
        buf = torch.empty_like(x)
        t_copy = graphed(lambda: buf.copy_(x), args.repeats)
        t_sum = graphed(lambda: x.sum(), args.repeats)
        t1, cfg1, eager1 = best_sketch(x, (123, 456), k, 1, args.repeats)
        t4, _, _ = best_sketch(x, (123, 456), k, 4, args.repeats)
        gbs = x.numel() * x.element_size() / t1 / 1e6
        print(f"| {n} | {str(dtype).split('.')[-1]} | {t_copy:.4f} | {t_sum:.4f} | {t1:.4f} | {gbs:.0f} | {t1 / t_copy:.2f} "
              f"| {t1 / t_sum:.2f} | {t4:.4f} | {t4 / t_copy:.2f} | {cfg1} | {eager1:.4f} |", flush=True)

    # the fused pass-2 side kernel on a whole Q projection: 32 heads x (128 x 4096), batch 4, fp32 gradient
    B, H, d, hidden = 4, 32, 128, 4096
    g = torch.randn(B, H * d, hidden, device="cuda")
    size = d * hidden
    keys = torch.randint(0, 2**31 - 1, (H, 2), device="cuda")
    offsets = torch.arange(H, device="cuda") * size
    w, c, o = (torch.rand(H, size, device="cuda") for _ in range(3))
    buf = torch.empty_like(g)
    t_copy = graphed(lambda: buf.copy_(g), args.repeats)
    print(f"\nfused side kernel, Q projection [{B}, {H * d}, {hidden}] fp32 + 3 fp32 [H, S] vectors (weight, centre, "
          f"other: 1.75x the bytes of g read in all); copy_ of g {t_copy:.3f} ms")
    print("| kernel | ms | x copy_ of g |\n| --- | --- | --- |")
    t_plain = graphed(lambda: kernels.sketch_heads(g, keys, offsets, size, hidden, hidden, k, 1), args.repeats)
    t_fused = graphed(lambda: kernels.sketch_heads(g, keys, offsets, size, hidden, hidden, k, 1, transform="square",
                                                   weight=w, centre=c, other=o), args.repeats)
    print(f"| sketch only | {t_plain:.3f} | {t_plain / t_copy:.2f} |")
    print(f"| fused side (square, weight, centre, cross, norm, sketch) | {t_fused:.3f} | {t_fused / t_copy:.2f} |")

    # the GEMM-shaped alternative: one Gaussian map [S, k] in bf16 shared by the block type,
    # the side vectors formed by torch elementwise ops, then [B·H, S] @ [S, k] on tensor cores
    R = (torch.randn(size, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
    gh = g.view(B, H, size)
    v = (gh.square() * w - c).to(torch.bfloat16)
    t_mm = graphed(lambda: v.view(B * H, size) @ R, args.repeats)

    def gemm_side():
        x = gh.square() * w
        cross = (x * o).sum(-1)
        x = x - c
        return (x.to(torch.bfloat16).view(B * H, size) @ R), x.square().sum(-1), cross

    t_gemm = graphed(gemm_side, args.repeats)
    print(f"| GEMM-shaped: bf16 [B·H, S] @ [S, k] only (shared Gaussian map) | {t_mm:.3f} | {t_mm / t_copy:.2f} |")
    print(f"| GEMM-shaped side: torch elementwise (square, weight, cross, centre, norm) + GEMM | {t_gemm:.3f} "
          f"| {t_gemm / t_copy:.2f} |")

if __name__ == "__main__":
    main()
