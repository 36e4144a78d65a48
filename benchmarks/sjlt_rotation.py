"""What the side kernel's rotated loads cost: the library's sjlt side kernel beside variants of it that load each tile
without its rotation (a wrong sketch, timed only), with the preparations in the kernel's tile order (the library's
``tiled``: only the gradient's loads rotated), and that pipeline the loop's loads over NS stages.

The sjlt map's tiled-shift structure has each program load tile t rotated by a hash c_t (``kernels/_triton.py``), so
its addresses are not provably contiguous: Triton issues element-wise loads and cannot pipeline them (its pipeliner
copies aligned vectors asynchronously). The variants are made from the library kernel's own source at run time
(two edits: the rotation dropped, the loop given ``num_stages``), so they follow the library kernel as it changes.
Rotated variants, with the preparations in their own order or in tile order, must give the library's partial sums
bitwise at any NS (checked); unrotated ones bound what a sketch with contiguous tile loads could reach. The table's
"tiled" columns also include nothing of rearranging the preparations (once a pass): its own column times
``tile_order`` there and back over the block's preparations.

    python benchmarks/sjlt_rotation.py --grad-dtype bf16          # every Llama-7B module shape, batch 2, k 256
    python benchmarks/sjlt_rotation.py --device cpu               # the edits checked on tiny shapes (interpreter)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import inspect
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))

EDITS = {  # (library source, variant source, how often it occurs); ROTATE and NS are the variant's own constants
    "PREFETCH: tl.constexpr = False):": ("PREFETCH: tl.constexpr = False, ROTATE: tl.constexpr = True, "
                                         "NS: tl.constexpr = 1):", 1),
    "HAS_O: tl.constexpr, O_IS_C: tl.constexpr, MU: tl.constexpr):": (
        "HAS_O: tl.constexpr, O_IS_C: tl.constexpr, MU: tl.constexpr, ROTATE: tl.constexpr = True):", 1),
    "HAS_O, O_IS_C, MU)": ("HAS_O, O_IS_C, MU, ROTATE)", 2),
    "TWEAK: tl.constexpr, TILED: tl.constexpr):": ("TWEAK: tl.constexpr, TILED: tl.constexpr, "
                                                    "ROTATE: tl.constexpr = True):", 1),
    "TWEAK, TILED)": ("TWEAK, TILED, ROTATE)", 2),
    "    hoff = tl.load(hoff_ptr + h)\n": ("    hoff = tl.load(hoff_ptr + h)\n    if not ROTATE:\n"
                                          "        hoff = tl.multiple_of(hoff, 16)\n", 1),
    "    o = (j3 - c[None, :, None] + M) % M": ("    o = (j3 - c[None, :, None] + M) % M if ROTATE else "
                                             "tl.broadcast_to(j3, (1, tq.shape[0], j3.shape[2]))", 1),
    "    for tb in range(t0, t1, TT):": ("    for tb in tl.range(t0, t1, TT, num_stages=NS):", 1),
}


def variant_kernel():
    """The library's side kernel with the :data:`EDITS` applied, compiled from a temporary module."""
    from sketchfisher.kernels import _triton

    source = inspect.getsource(_triton)
    for old, (new, times) in EDITS.items():
        if source.count(old) != times:
            raise SystemExit(f"the library kernel changed: {old!r} is not in kernels/_triton.py {times} times; update "
                             "EDITS")
        source = source.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), "sjlt_variant.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("sjlt_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (Triton reads a kernel's source from its file)
    return module.sketch_kernel


def partial_sums(kernel, sh, g, **constants) -> torch.Tensor:
    """The sketch launch of :class:`~sketchfisher.kernels.SketchHeads` ``sh`` with ``kernel``: its partial sums
    (``constants`` over the set-up's own)."""
    n = g.shape[0]
    BR, row_blocks, TT, chunks, per = sh._shape(n)
    part = torch.empty(chunks, n, sh.H, sh.s * sh.BM + 3 + sh.mu, dtype=torch.float32, device=g.device)
    kernel[(chunks, sh.H, row_blocks)](g, *sh.args, part, n, sh.H, sh.size, sh.tiles, g.stride(0), sh.row_stride, per,
                                       sh.s ** -0.5, TT=TT, BR=BR, **{**sh.constants, **constants})
    return part


def check_on_cpu() -> None:
    """The edits on tiny shapes in Triton's interpreter: rotated variants equal the library's partial sums."""
    from sketchfisher import kernels
    from sketchfisher.compress.onebyte import OneByte

    kernel, library = variant_kernel(), kernels._kernels()[0]
    torch.manual_seed(0)
    H, size = 3, 1000
    ob = OneByte.encode(torch.rand(H, size) - 0.5)
    keys = torch.randint(0, 2**31 - 1, (H, 2))
    kw = dict(weight=torch.rand(H, size), centre=ob.codes, other=ob.codes, conflict=torch.randn(2, H, size))
    sh, tiled = (kernels.SketchHeads(keys, torch.arange(H) * size, size, size, size, 50, 1, device=torch.device("cpu"),
                                     transform="abs", scales={"centre": ob.scale, "other": ob.scale}, tiled=tiled,
                                     **(tiled_copies(kw) if tiled else kw)) for tiled in (False, True))
    assert tiled.tiled
    g = torch.randn(2, H * size).to(torch.bfloat16)
    want = partial_sums(library, sh, g)
    for ns in (1, 2):
        for setup, prefetch in itertools.product((sh, tiled), (False, True)):
            assert torch.equal(partial_sums(kernel, setup, g, ROTATE=True, NS=ns, PREFETCH=prefetch), want), ns
    unrotated = partial_sums(kernel, sh, g, ROTATE=False)
    other = lambda t: "another sketch" if not torch.equal(t, want) else "the same (unexpected)"  # noqa: E731
    print("| variant (interpreter, tiny shapes) | partial sums |\n| --- | --- |\n| rotated, NS 1 and 2, loads issued a "
          "step ahead or not | the library's, bitwise |\n| preparations in tile order, likewise | the library's, "
          f"bitwise |\n| unrotated | {other(unrotated)} |")


def tiled_copies(kw: dict) -> dict:
    """Copies of the preparations ``kw`` for a ``tiled=True`` set-up to rearrange (one copy where two names hold one
    tensor, as task B's centre and other are one: the kernel reads it once)."""
    copies: dict = {}
    return {name: copies[id(t)] if id(t) in copies else copies.setdefault(id(t), t.clone()) for name, t in kw.items()}


def there_and_back(sh) -> None:
    """``tile_order`` of every preparation ``sh`` rearranged, back and forth again (what a pass adds, twice)."""
    from sketchfisher import kernels

    for t in sh._tiled:
        kernels.tile_order(t.view(-1, sh.H, sh.size), sh.args[-2], sh.m, inverse=True)
        kernels.tile_order(t.view(-1, sh.H, sh.size), sh.args[-2], sh.m)


def sweep(repeats: int, ns_list: tuple[int, ...] | None = None) -> None:
    from sketchfisher import kernels
    from sjlt_tune import graphed, module_blocks, side_pass_inputs

    kernel = variant_kernel()
    stages = (1, 2, 3, 4) if ns_list is None else ns_list
    kinds = (("rotated", False, dict(ROTATE=True)), ("rotated, a step ahead", False, dict(ROTATE=True, PREFETCH=True)),
             ("tile order", True, dict(ROTATE=True)), ("tile order, a step ahead", True, dict(ROTATE=True, PREFETCH=True)),
             ("unrotated", False, dict(ROTATE=False)))
    calls = (("library call", False, False), ("a step ahead", False, True), ("tiled", True, False),
             ("tiled, a step ahead", True, True))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; ms per call (CUDA graphs), batch 2, k 256; "
          "first the library's call (both launches) as it is, with each step's loads issued a step ahead (prefetch), "
          "with its preparations in tile order (tiled) and both; 'tile order': rearranging the block's preparations "
          "there and back (a pass does it once each way); then the sketch launch alone, rotated, a step ahead, in tile "
          "order (the gradient's loads rotated) and unrotated, at NS stages")
    print("| module | pass | " + " | ".join(label for label, _, _ in calls) + " | tile order | "
          + " | ".join(f"{kind}, NS {ns}" for kind, _, _ in kinds for ns in stages) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in range(len(calls) + 1 + len(kinds) * len(stages))) + " |")
    for label, g, keys, offsets, size, uc, cols, H in module_blocks(2):
        for name, transform, kw, scales in side_pass_inputs(H, size, one_byte=True):
            setups = {(tiled, prefetch): kernels.SketchHeads(keys, offsets, size, uc, cols, 256, 1, device=g.device,
                                                             transform=transform, scales=scales, tiled=tiled,
                                                             prefetch=prefetch, **(tiled_copies(kw) if tiled else kw))
                      for _, tiled, prefetch in calls}
            sh, tiled = setups[(False, False)], setups[(True, False)]
            want = partial_sums(kernels._kernels()[0], sh, g)
            for setup in setups.values():
                assert torch.equal(setup.run(g), sh.run(g)), (label, name)
            cells = [f"{graphed(lambda: setups[(t, p)](g), repeats):.3f}" for _, t, p in calls]
            cells.append(f"{graphed(lambda: there_and_back(tiled), repeats):.3f}")
            for _, in_tiles, options in kinds:
                setup = tiled if in_tiles else sh
                for ns in stages:
                    if options["ROTATE"]:
                        assert torch.equal(partial_sums(kernel, setup, g, NS=ns, **options), want), (label, name, ns)
                    cells.append(f"{graphed(lambda: partial_sums(kernel, setup, g, NS=ns, **options), repeats):.3f}")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("this benchmark compiles or interprets the side kernel with Triton, which is not installed "
                         "(pip install triton, or SKETCHFISHER_KERNEL_TESTS=1 bash scripts/test.sh)")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--grad-dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], help="pipeline depths NS to time")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        check_on_cpu()
        return
    import sjlt_tune

    sjlt_tune.GRAD_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.grad_dtype]
    sweep(args.repeats, tuple(args.stages))


if __name__ == "__main__":
    main()
