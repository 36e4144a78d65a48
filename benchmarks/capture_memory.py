"""Memory of capturing one batch's factors (``FactorCapture.run``: forward, backward, the factors of every linear
module), with and without an attention mask, in a fresh process each.

A padded batch's factors are masked (padded rows zeroed). This script measures what that costs beside an unmasked
batch of the same shape: the peak over the memory held before the call, and the bytes of the factors returned
(distinct storages: modules that read one input share it). On CUDA the peak is ``torch.cuda.max_memory_allocated``;
on the CPU it is the resident set sampled every half millisecond, with glibc told to map every allocation above
128 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once.
``--compare DIR`` runs the same children against another checkout's package (``DIR/sketchfisher``), e.g. the code
before a change, in the same run.

    python benchmarks/capture_memory.py                                   # Llama-shaped, 4 layers, hidden 1024
    python benchmarks/capture_memory.py --device cuda --hidden 4096 --heads 32 --intermediate 11008 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch, transformers as hf
from sketchfisher.capture import FactorCapture, linear_modules

args = json.loads(sys.argv[2])
device = torch.device(args["device"])
torch.manual_seed(0)
cfg = hf.LlamaConfig(hidden_size=args["hidden"], intermediate_size=args["intermediate"], num_hidden_layers=args["layers"],
                     num_attention_heads=args["heads"], num_key_value_heads=args["heads"], vocab_size=1000,
                     max_position_embeddings=args["tokens"])
model = hf.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
B, T = args["batch"], args["tokens"]
ids = torch.randint(0, 1000, (B, T), device=device)
batch = {"input_ids": ids}
if args["case"] == "mask":  # one sample left-padded by a fifth of its length
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, : T // 5] = 0
    batch["attention_mask"] = mask


def loss(m, b):
    mask = b.get("attention_mask")
    out = m(input_ids=b["input_ids"], attention_mask=mask).logits.float()
    per_token = out.square().mean(-1)
    return (per_token if mask is None else per_token * mask).sum(1)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


with FactorCapture(model, list(linear_modules(model))) as cap:
    cap.run(loss, batch)  # (kernels, allocator pools and lazy state first)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        bf = cap.run(loss, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss()
        high, stop = [base], [False]

        def watch():
            while not stop[0]:
                high[0] = max(high[0], rss())
                time.sleep(0.0005)

        thread = threading.Thread(target=watch)
        thread.start()
        bf = cap.run(loss, batch)
        stop[0] = True
        thread.join()
        peak = max(high[0], rss()) - base
held = {t.data_ptr(): t.numel() * t.element_size() for t in [*bf.A.values(), *bf.D.values()]}
print(json.dumps({"peak": peak, "held": sum(held.values())}))
"""


def child(source: Path, case: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TRANSFORMERS_VERBOSITY": "error"}
    spec = {**{k: getattr(args, k) for k in ("device", "hidden", "heads", "intermediate", "layers", "batch", "tokens")},
            "case": case}
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({source}, {case}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2752)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--compare", type=Path, default=None, help="another checkout, run beside this one")
    args = p.parse_args()
    sources = [("this checkout", ROOT)] + ([(f"{args.compare}", args.compare)] if args.compare else [])
    print(f"# FactorCapture.run, Llama-shaped bf16, {args.layers} layers, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, batch {args.batch} x {args.tokens} tokens, {args.device}")
    print("| batch | code | peak over before (MiB) | factors held (MiB) | peak / unmasked peak |")
    print("| --- | --- | --- | --- | --- |")
    for label, source in sources:
        runs = {case: child(source, case, args) for case in ("plain", "mask")}
        for case, name in (("plain", "no attention mask"), ("mask", "attention mask, one sample padded")):
            r = runs[case]
            print(f"| {name} | {label} | {r['peak'] / 2**20:.0f} | {r['held'] / 2**20:.0f} | "
                  f"{r['peak'] / max(runs['plain']['peak'], 1):.2f} |")


if __name__ == "__main__":
    main()
