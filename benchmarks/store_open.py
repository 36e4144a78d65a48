"""Opening a store and reading it, in a fresh process each: time and peak host memory (RSS).

Builds a store of a random Llama-shaped model (bf16 on a GPU, fp32 on the CPU; ``Sketch(k=256)``, fp32
statistics), then runs each reader in its own child process: ``open`` (``sf.open_store`` and ``.result()``),
``top`` (open and ``top_conflicts(20)``), ``means`` (open and ``head_means()``), ``summary`` (open and
``block_summary()``), for a store collected with ``--conflicts``, ``conflicts`` (``head_conflicts()``), and
``verify`` (``verify_top(100, 1000)``: the model and batches rebuilt from the same seeds, the 1,000 best
candidates re-scored exactly). Peak RSS is the child's high-water mark (``VmHWM``); "beyond" subtracts the peak after the
imports and the size of the store's statistics files. ``--compare DIR`` runs the same children against
another checkout's package (``DIR/sketchfisher``), e.g. the code before a change, in the same run.

    python benchmarks/store_open.py --shape cpu-2048 --device cpu               # 2048 hidden, 8 layers
    python benchmarks/store_open.py --shape llama-7b --device cuda --samples 16 --tokens 64
    python benchmarks/store_open.py --shape tiny --device cpu                    # the test suite's smoke run
    python benchmarks/store_open.py --shape tiny --samples 10000 --tokens 16 --batch 100 --k 64 --conflicts \
        --readers open,top,means,summary,conflicts,verify                        # many samples, bounded memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, heads, intermediate, vocabulary, layers
    "llama-7b": (4096, 32, 11008, 32000, 32),
    "cpu-2048": (2048, 16, 5504, 32000, 8),
    "tiny": (64, 4, 128, 100, 2),
}
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch, sketchfisher as sf


def hwm():  # this process's peak RSS (VmHWM: ru_maxrss would include the parent's, inherited at exec)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


base = hwm()
start = time.perf_counter()
store = sf.open_store(sys.argv[2])
res = store.result()
opened = time.perf_counter() - start
what = sys.argv[3]
if what == "top":
    res.top_conflicts(20)
elif what == "means":
    res.head_means()
elif what == "summary":
    res.block_summary()
elif what == "conflicts":
    res.head_conflicts()
elif what == "verify":  # the model and batches of build_store, rebuilt from the same seeds
    sys.path.insert(0, sys.argv[4])
    from store_open import model_and_batches
    model, task_a, task_b, loss = model_and_batches(json.loads(sys.argv[5]))
    held = res.verify_top(100, 1000, model=model, loss_fn=loss, task_a=task_a, task_b=task_b).attrs["held_fraction"]
    print(f"verify_top(100, 1000): {held:.2f} of the sketched top 100 held", file=sys.stderr)
print(json.dumps({"open_s": opened, "total_s": time.perf_counter() - start, "base_rss": base,
                  "peak_rss": hwm(),
                  "package": sf.__file__}))
"""


def model_and_batches(args: dict):
    """The random Llama-shaped model, both tasks' batches and the per-sample loss of a store (seeds 0 and 1)."""
    import torch
    import transformers as hf

    hidden, heads, inter, vocab, layers = SHAPES[args["shape"]]
    config = hf.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                            intermediate_size=inter, vocab_size=vocab, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(args["device"]):
        model = hf.LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if args["device"] != "cpu" else torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (args["batch"], args["tokens"]), generator=g).to(args["device"])}
               for _ in range(2 * args["samples"] // args["batch"])]

    def loss(m, batch):
        ids = batch["input_ids"]
        logits = m(input_ids=ids).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none")
        return ce.view(ids.shape[0], -1).mean(1)

    half = len(batches) // 2
    return model, batches[:half], batches[half:], loss


def build_store(args, path: Path) -> None:
    if args.build_with:  # another checkout's writer (one whose stores every compared reader opens)
        sys.path.insert(0, args.build_with)
    import inspect

    import torch

    import sketchfisher as sf
    from sketchfisher.store import collect_to_store

    extra = ({"conflicts": args.conflicts} if "conflicts" in inspect.signature(collect_to_store).parameters
             else {})
    model, task_a, task_b, loss = model_and_batches(vars(args))
    hidden, heads, inter, vocab, layers = SHAPES[args.shape]
    start = time.perf_counter()
    collect_to_store(path, model, loss, task_a, task_b, sf.layout_for(model), sf.Sketch(k=args.k),
                     sf.ScoreConfig(), stats_dtype=torch.float32, **extra)
    print(f"store of {args.shape} ({layers} layers, hidden {hidden}), {args.samples}+{args.samples} samples: "
          f"{time.perf_counter() - start:.1f} s")
    del model


def child(package: Path, store: Path, what: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(package), str(store), what, str(Path(__file__).parent),
                          json.dumps(args)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if out.returncode != 0:
        raise SystemExit(f"child {what} failed:\n{out.stderr[-3000:]}")
    if out.stderr.strip():
        print(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu-2048", choices=list(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--store", default=None, help="an existing store to read (else one is built in a temporary folder)")
    p.add_argument("--keep", default=None, help="build the store here and keep it (read it again with --store)")
    p.add_argument("--compare", action="append", default=[], help="another checkout to run the same children with")
    p.add_argument("--build-with", default=None, help="build the store with another checkout's package")
    p.add_argument("--readers", default="open,top,means,summary", help="also: conflicts (needs --conflicts), verify (the store built here, or --store with the same "
                        "--shape/--samples/--tokens/--batch)")
    p.add_argument("--conflicts", action="store_true", help="collect the conflict test's scalars too")
    p.add_argument("--compare-readers", default="open,top", help="readers run with the --compare checkouts")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store or args.keep or Path(tmp) / "store")
        if not args.store:
            build_store(args, store)
        stats = sum(f.stat().st_size for f in (store / "pass1").glob("*.safetensors"))
        shards = sum(f.stat().st_size for f in (store / "pass2").rglob("*.safetensors"))
        print(f"statistics files {stats / 2**30:.2f} GiB, shards {shards / 2**20:.1f} MiB")
        print("| code | reader | open (s) | open + read (s) | peak RSS (GiB) | beyond imports + statistics (GiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for package in [ROOT, *map(Path, args.compare)]:
            for what in (args.readers if package == ROOT else args.compare_readers).split(","):
                r = child(package, store, what, vars(args))
                beyond = (r["peak_rss"] - r["base_rss"] - stats) / 2**30
                print(f"| {package} | {what} | {r['open_s']:.2f} | {r['total_s']:.2f} | {r['peak_rss'] / 2**30:.2f} | "
                      f"{beyond:.2f} |", flush=True)


if __name__ == "__main__":
    main()
