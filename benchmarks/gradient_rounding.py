"""What rounding a bf16 model's per-sample gradients to bf16 does to a sketch collection, simulated on the CPU.

On a GPU a bf16 model's per-sample gradients reach a sketch collection's statistics and side vectors rounded
once to bf16 (``BatchFactors.grad(low=True)``; the side vectors read them through ``collect.passes.block_gradients``).
Here every per-sample gradient the collection forms is rounded the same way on the CPU, and the scores are
compared with an unrounded collection, in standard errors of the unrounded one:

* ``consistent``: statistics and side vectors read the same rounded numbers (what the library does);
* ``sides only``: only the side vectors are rounded, the statistics keep fp32 (what reading two different sets of
  numbers would do: a leave-one-out normaliser subtracts a sample's own g² from its task's Fisher).

fp32 sketches (no dither) and both statistics precisions (fp32 statistics round their bf16 sums stochastically, with
the GPU's random bits, so a changed input re-draws that noise). Then the second table: the conflict table of fp32
statistics (the GPU setting, same random bits) against fp64's, each column's largest difference as a fraction of
the tolerance ``tests/test_gpu.py::test_conflict_table_on_cuda_equals_cpu`` allows, rows matched by block.

    python benchmarks/gradient_rounding.py
    python benchmarks/gradient_rounding.py --model-dtype bf16
    PYTHONPATH=<a checkout of an earlier commit> python benchmarks/gradient_rounding.py --conflicts-only
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import torch
import transformers as hf

import sketchfisher as sf
from gpu_e2e import lm_loss  # noqa: E402  (the same next-token loss as the e2e benchmark)

SETTINGS = (("llama", "paper", "a"), ("gpt2", "signed", "pooled"), ("llama", "symmetric", "loo"))
TOLERANCES = (("T", 2e-3), ("alignment", 2e-3), ("stderr", 3e-2))


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised two-layer Llama with GQA, or GPT-2 (Conv1D), fp32."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = hf.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                num_hidden_layers=2, vocab_size=64, max_position_embeddings=64)
        return hf.LlamaForCausalLM(config).eval()
    config = hf.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_inner=64, vocab_size=64, n_positions=64)
    return hf.GPT2LMHeadModel(config).eval()


def batches(n: int, size: int, tokens: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (min(size, n - lo), tokens), generator=g)} for lo in range(0, n, size)]


@contextmanager
def rounded(statistics: bool):
    """Per-sample gradients rounded to bf16 as on a GPU. ``statistics=True``: everywhere a sketch collection reads
    them (``grad(low=True)`` for the statistics, ``block_gradients`` for the side vectors, which reads the same
    rounded product where ``rounds``); False: the side vectors only, the statistics keep fp32."""
    from sketchfisher.capture.hooks import BatchFactors
    from sketchfisher.collect import sketches

    grad, rounds, blocks = BatchFactors.grad, BatchFactors.rounds, sketches.block_gradients
    if statistics:
        BatchFactors.rounds = lambda self, module: True
        BatchFactors.grad = lambda self, module, low=False, into=None: grad(self, module).to(
            torch.bfloat16 if low else torch.float32)
    else:
        sketches.block_gradients = lambda captured, module, hbs: blocks(captured, module, hbs).bfloat16().float()
    try:
        yield
    finally:
        BatchFactors.grad, BatchFactors.rounds, sketches.block_gradients = grad, rounds, blocks


def moved(a, b) -> dict[str, float]:
    """Per unit family: the largest |score difference| in standard errors of ``b``."""
    out = {}
    for family in b.families:
        z = ((a.units(family).scores - b.units(family).scores) / b.units(family).stderr).double()
        out[family] = float(z[z.isfinite()].abs().max())
    return out


def rounding_table(args, dtype: torch.dtype, ta: list, tb: list) -> None:
    print("| model | variant | normaliser | statistics | family | consistent: max \\|Δscore\\| / se "
          "| sides only: max \\|Δscore\\| / se |\n| --- | --- | --- | --- | --- | --- | --- |")
    for arch, variant, normalizer in SETTINGS:
        model = tiny_model(arch).to(dtype)
        for stats_dtype in (torch.float64, torch.float32):
            kw = dict(codec=sf.Sketch(k=args.k, kind="sjlt", seed=3, dtype="fp32"), variant=variant,
                      normalizer=normalizer, stats_dtype=stats_dtype, units="all")
            plain = sf.analyze(model, lm_loss, ta, tb, **kw)
            with rounded(statistics=True):
                both = sf.analyze(model, lm_loss, ta, tb, **kw)
            with rounded(statistics=False):
                sides = sf.analyze(model, lm_loss, ta, tb, **kw)
            m_both, m_sides = moved(both, plain), moved(sides, plain)
            for family in plain.families:
                print(f"| {arch} | {variant} | {normalizer} | {str(stats_dtype)[6:]} | {family} | {m_both[family]:.3g} "
                      f"| {m_sides[family]:.3g} |", flush=True)


def conflict_table(ta: list, tb: list) -> None:
    print("\n## conflict table, fp32 statistics against fp64 (largest difference / the GPU test's tolerance)")
    print("| units | codec | order | family | " + " | ".join(c for c, _ in TOLERANCES) + " |\n| --- | --- | --- | --- | "
          + " | ".join("---" for _ in TOLERANCES) + " |")
    model = tiny_model("llama")
    for units in ("heads", "all"):
        for codec, passes in ((sf.Factors(), None), (sf.Sketch(k=32), 2), (sf.Sketch(k=32), 1.5)):
            results = [sf.analyze(model, lm_loss, ta, tb, codec=codec, passes=passes, units=units, stats_dtype=d)
                       for d in (torch.float64, torch.float32)]
            for family in results[0].families:
                want, got = (r.units(family).head_conflicts() for r in results)
                want, got = (t.sort_values(list(t.columns[:3])) for t in (want, got))
                ratios = []
                for column, tol in TOLERANCES:
                    w, g = torch.tensor(want[column].to_numpy()), torch.tensor(got[column].to_numpy())
                    ratios.append(float(((g - w).abs() / (tol * w.abs() + tol * w.abs().max())).max()))
                print(f"| {units} | {type(codec).__name__} | {passes} | {family} | "
                      + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, nargs=2, default=[8, 6], help="samples of task A and task B")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="the first table's model weights (bf16: a bf16 model's factors, as on a GPU)")
    p.add_argument("--conflicts-only", action="store_true",
                   help="only the second table (it runs on earlier versions of the library too)")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.model_dtype]
    ta, tb = batches(args.samples[0], 4, args.tokens, 1), batches(args.samples[1], 3, args.tokens, 2)
    print(f"# CPU, torch {torch.__version__}, {args.samples[0]} + {args.samples[1]} samples, T={args.tokens}, "
          f"Sketch(sjlt, k={args.k}, fp32), heads + MLP units, {args.model_dtype} weights")
    if not args.conflicts_only:
        rounding_table(args, dtype, ta, tb)
    conflict_table(ta, tb)


if __name__ == "__main__":
    main()
