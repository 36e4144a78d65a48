"""What the side kernel's loads compile to on a Hopper GPU, without one: the library's sjlt side kernel and the
variants of ``sjlt_rotation.py`` compiled ahead of time for sm_90 (Triton's own compiler and ptxas, on the CPU) with the
constants the library launches them with at a Llama-7B q_proj block, batch 2, k 256, bf16 gradients and one-byte
preparations (task B's single pass and task A's second), and the global loads of their PTX counted by kind: plain
loads by width (``b8``: one byte a thread, ``v2.b32``: eight bytes) and asynchronous copies into shared memory (what
Triton's pipeliner makes of a load it can pipeline, by bytes a copy).

The prologue's loads count too: a variant that issues each step's loads a step ahead shows them twice (before the
loop and in it). Registers a thread come from the compiled cubin (``cuobjdump``, shipped with Triton): with 128
threads a program, they bound how many programs an SM holds at once. It says what each variant changes in the
instructions, not what it gains in time (``sjlt_rotation.py`` on a GPU).

    python benchmarks/sjlt_ptx.py     # rotated, a step ahead, in tile order (and both), unrotated; NS 1 and 3
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))

TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
         torch.float8_e4m3fn: "*fp8e4nv"}


def library_launch(transform: str, kw: dict, scales: dict, size: int, cols: int, n: int = 2, k: int = 256):
    """``(runtime arguments, constants)`` of the library's sketch launch for one set-up on the CPU (no data moves), its
    loads as they are by default (not a step ahead, not in tile order)."""
    from sketchfisher import kernels

    H = kw["weight"].shape[0]
    sh = kernels.SketchHeads(torch.zeros(H, 2, dtype=torch.int64), torch.arange(H) * size, size, cols, cols, k, 1,
                             device=torch.device("cpu"), transform=transform, scales=scales, prefetch=False, **kw)
    plan = sh._plan(n)
    g = torch.empty(n, H * size, dtype=torch.bfloat16)
    part = torch.empty(plan.part, dtype=torch.float32)
    args = (g, *sh.args, part, n, H, size, sh.tiles, g.stride(0), cols, plan.per, 1.0)
    return args, dict(plan.constants)


def ptx_loads(kernel, args: tuple, constants: dict, target: tuple = ("cuda", 90, 32)) -> tuple:
    """The global loads of ``kernel``'s PTX for sm_90, by kind (see the module), and :func:`machine_code`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    warps = constants.pop("num_warps", 4)
    # (a constexpr left out would compile as None, not as its default)
    constants = {**{n: q.default for n, q in params.items() if q.default is not inspect.Parameter.empty}, **constants}
    sig, attrs = {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            sig[name] = TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # (the library's tensors are 16-byte aligned)
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        sig[name] = "constexpr"
    src = ASTSource(kernel, sig, constexprs={(names.index(c),): v for c, v in constants.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget(*target), options=dict(num_warps=warps))
    kinds = collections.Counter()
    for op, _ in _loads(compiled.asm["ptx"]):
        kinds[op] += 1
    return kinds, machine_code(compiled.asm["cubin"])


def machine_code(cubin: bytes) -> tuple[str, str, str]:
    """``(registers a thread, SASS instructions, global loads placed among the floating-point arithmetic)`` of a
    cubin, read with ``cuobjdump`` (shipped with Triton); "?" where it cannot be read. The last counts the loads that
    come after the first floating-point add or multiply: 0 where every load of a step is issued before its
    arithmetic."""
    regs = re.search(r"REG:(\d+)", _cuobjdump(cubin, "-res-usage"))
    ops = [m.group(1) for line in _cuobjdump(cubin, "-sass").splitlines()
           for m in [re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)] if m]
    first = next((i for i, op in enumerate(ops) if op.startswith(("FFMA", "FADD", "FMUL"))), len(ops))
    among = sum(op.startswith("LDG") for op in ops[first:])
    return (regs.group(1) if regs else "?", str(len(ops)) if ops else "?", str(among) if ops else "?")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            return subprocess.run([tool, flag, f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ""


def _loads(ptx: str):
    """``(kind, 1)`` per global load instruction of ``ptx``: ``b16``, ``v2.b32``, ..., or ``cp.async N B``."""
    for line in ptx.splitlines():
        line = line.strip()
        plain = re.search(r"ld\.global\.([.\w]+)", line)
        if plain:
            yield plain.group(1), 1
        copy = re.search(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", line)
        if copy:
            yield f"cp.async {int(copy.group(1), 0)} B", 1


def main() -> None:
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("this benchmark compiles or interprets the side kernel with Triton, which is not installed "
                         "(pip install triton, or SKETCHFISHER_KERNEL_TESTS=1 bash scripts/test.sh)")
    os.environ["TRITON_INTERPRET"] = "0"  # (compiled, not interpreted: read when Triton is first imported, below)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (Triton's default up to 3.9, which launches use today)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 3], help="pipeline depths NS")
    p.add_argument("--size", type=int, default=128 * 4096, help="entries of a head block (a 7B q_proj block)")
    p.add_argument("--source", default=None, metavar="FILE",
                   help="also compile the side kernel of another kernels/_triton.py (e.g. an older commit's, from git "
                        "show) as the library launches it by default, in a row of its own")
    args = p.parse_args()
    from sjlt_rotation import variant_kernel
    from sjlt_tune import side_pass_inputs

    kernels = [(None, variant_kernel())]
    if args.source:
        spec = importlib.util.spec_from_file_location("sjlt_other", args.source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kernels.append((args.source, module.sketch_kernel))
    variants = (("rotated (the library's)", dict(ROTATE=True)), ("rotated, a step ahead", dict(PREFETCH=True)),
                ("preparations in tile order", dict(TILED=True)),
                ("tile order, a step ahead", dict(TILED=True, PREFETCH=True)),
                ("unrotated (another sketch)", dict(ROTATE=False)))
    print("# global loads per tile step of the side kernel's PTX for sm_90 (compiled on the CPU), a 7B q_proj block, "
          "batch 2, k 256, bf16 gradient, one-byte preparations; b8/b16/b32/b64: a plain load of that many bits a "
          "thread, v2/v4: vectors, cp.async N B: a pipelined copy of N bytes a thread; SASS: the cubin's instructions, "
          "and how many of its global loads come after its first floating-point add or multiply")
    print("| pass | variant | NS | loads | registers a thread | SASS instructions | loads among the arithmetic |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, transform, kw, scales in side_pass_inputs(1, args.size, one_byte=True, device="cpu"):
        launch, constants = library_launch(transform, kw, scales, args.size, 4096)
        rows = [(label, kernel_of, {**constants, **options, "NS": ns}) for label, options in variants
                for ns in args.stages for kernel_of in [kernels[0][1]]]
        for source, other in kernels[1:]:  # (its own constants only: an older kernel may lack the newer ones)
            params = inspect.signature(other.fn).parameters
            rows.append((f"{source} (as launched by default)", other,
                         {c: v for c, v in constants.items() if c in params or c == "num_warps"}))
        for label, kernel, options in rows:
            kinds, code = ptx_loads(kernel, launch, dict(options))
            print(f"| {name} | {label} | {options.get('NS', 1)} | "
                  + ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds.items())) + " | "
                  + " | ".join(code) + " |", flush=True)


if __name__ == "__main__":
    main()
