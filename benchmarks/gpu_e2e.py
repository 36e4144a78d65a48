"""The user path end to end on one GPU (or the GPUs of one host): ``sf.analyze`` with ``Sketch(k=256)``
on a full-depth Llama-shaped model, beside one plain forward+backward over the same data.

Random bf16 weights (no download), random token ids, per-sample next-token cross-entropy. Reports
wall time of ``sf.analyze`` (both passes, both tasks, scoring of the head means) as a multiple of one
plain forward+backward over the same batches, the peak device memory of each, and the planner's
prediction beside the measured peak.

    python3 benchmarks/gpu_e2e.py --shape llama-7b --samples 256 --tokens 512 --batch 4
    python3 benchmarks/gpu_e2e.py --shape llama3-8b ...          # GQA, 8 kv heads, vocabulary 128256
    python3 benchmarks/gpu_e2e.py --shape llama-13b --device-map auto   # layers spread over the GPUs
    python3 benchmarks/gpu_e2e.py --device cpu --shape tiny      # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import time
from dataclasses import replace

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as hf

import sketchfisher as sf

SHAPES = {  # hidden, heads, kv heads, intermediate, vocabulary, layers
    "llama-7b": (4096, 32, 32, 11008, 32000, 32),
    "llama3-8b": (4096, 32, 8, 14336, 128256, 32),
    "llama-13b": (5120, 40, 40, 13824, 32000, 40),
    "llama-70b": (8192, 64, 8, 28672, 32000, 80),
    "tiny": (64, 4, 2, 128, 100, 2),
}


def sketch_of(spec: str) -> sf.Sketch:
    """``K:DTYPE[:CENTRING][:rotate]`` → an sjlt sketch (seed 0), e.g. ``1024:int4:scaled:rotate``."""
    k, dtype, *rest = spec.split(":")
    rotate = "rotate" in rest
    centring = [r for r in rest if r != "rotate"]
    return sf.Sketch(k=int(k), kind="sjlt", seed=0, dtype=dtype, rotate=rotate,
                     **({"centring": centring[0]} if centring else {}))


def lm_loss(model, batch):
    """Per-sample mean next-token cross-entropy (softmax over the contiguous vocabulary axis)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           ids[:, 1:].reshape(-1).to(logits.device), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def build_model(args) -> torch.nn.Module:
    hidden, heads, kv, inter, vocab, layers = SHAPES[args.shape]
    config = hf.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                            intermediate_size=inter, vocab_size=vocab, num_hidden_layers=args.layers or layers,
                            max_position_embeddings=max(4096, args.tokens))
    torch.manual_seed(0)
    if args.device_map != "auto":
        with torch.device(args.device):  # random init on the GPU: seconds instead of minutes
            return hf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights():
        model = hf.LlamaForCausalLM(config).to(torch.bfloat16)
    n_dev, L = torch.cuda.device_count(), config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.norm": n_dev - 1, "model.rotary_emb": 0, "lm_head": n_dev - 1}
    device_map.update({f"model.layers.{i}": i * n_dev // L for i in range(L)})
    owner = lambda name: next(d for k, d in device_map.items() if name == k or name.startswith(k + "."))  # noqa
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, dtype=torch.bfloat16, device=f"cuda:{owner(name)}").normal_(0, 0.02)
        set_module_tensor_to_device(model, name, f"cuda:{owner(name)}", value=value)
    return dispatch_model(model, device_map=device_map).eval()


def save_for_cli(model, args) -> None:
    """Save the model with a word-level tokenizer and write two task files of random words."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    root = Path(args.cli)
    words = [f"w{i}" for i in range(min(model.config.vocab_size, 5000) - 3)]
    vocab = {"[UNK]": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = hf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>")
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        lines = [" ".join(words[i] for i in torch.randint(0, len(words), (args.tokens + 16,), generator=g).tolist())
                 for _ in range(args.samples)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")


def plain_over_cli_tasks(model, args, measure, model_dir=None, tasks=None, loss_kind: str = "clm") -> float:
    """Seconds of one plain forward+backward over the batches the CLI makes of the task files (by default
    what :func:`save_for_cli` wrote), with the CLI's loss (the CLI's own baseline: its tokenisation,
    attention masks and loss)."""
    from pathlib import Path

    from sketchfisher.tasks import input_device, loss_for, read_task, task_batches, to_device

    root = Path(args.cli)
    model_dir, tasks = model_dir or root / "model", tasks or [root / "a.txt", root / "b.txt"]
    tok = hf.AutoTokenizer.from_pretrained(model_dir)
    batches = [b for task in tasks for b in to_device(
        task_batches(read_task(task), tok, loss_kind, args.batch, args.tokens), input_device(model))]
    loss = loss_for(loss_kind)

    def plain():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    plain()  # warm-up
    return measure(plain)[0]


def run_cli(args, model_dir=None, tasks=None, loss_kind: str = "clm", dtype: str = "bf16", out=None) -> dict:
    """``sketchfisher collect`` on the task files (by default what :func:`save_for_cli` wrote) into the store
    ``out`` (default DIR/store); its JSON summary."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(args.cli)
    model_dir, tasks = model_dir or root / "model", tasks or [root / "a.txt", root / "b.txt"]
    cmd = [sys.executable, "-m", "sketchfisher", "collect", "--model", str(model_dir), "--task-a", str(tasks[0]),
           "--task-b", str(tasks[1]), "--out", str(out or root / "store"), "--loss", loss_kind, "--device",
           args.device, "--dtype", dtype, "--max-length", str(args.tokens), "--batch-size", str(args.batch),
           "--k", str(args.k), "--quiet", "--json"] + (["--device-map", "auto"] if getattr(args, "device_map", "none") == "auto"
                                             else []) + (["--no-checkpoint"] if getattr(args, "no_checkpoint", False) else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"CLI failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


@contextlib.contextmanager
def per_sample_gradients(dtype: str):
    """``"bf16"``: the library's per-sample gradients (a bf16 model's in bf16 for statistics and sketches);
    ``"fp32"``: every one in fp32, as before they were formed in the model's dtype."""
    from sketchfisher.capture import BatchFactors

    grad = BatchFactors.grad
    if dtype == "fp32":
        BatchFactors.grad = lambda self, module, low=False, into=None: grad(self, module)
    try:
        yield
    finally:
        BatchFactors.grad = grad


def alloc_retries() -> int:
    """CUDA allocations so far that failed once and were retried after the caching allocator freed its cached blocks
    (``cudaFree``, a wait for the device), over every device."""
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.memory_stats(d).get("num_alloc_retries", 0) for d in range(torch.cuda.device_count()))


def timed(fn, devices):
    """(seconds, peak GiB per CUDA device (NaN without one), fn's result)."""
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    out = fn()
    for d in devices:
        torch.cuda.synchronize(d)
    peaks = [torch.cuda.max_memory_allocated(d) / 2**30 for d in devices] or [float("nan")]
    return time.perf_counter() - start, peaks, out


def analyze_rows(model, task_a, task_b, args, base, measure, rows) -> list:
    """Run and print ``sf.analyze`` (and, on request, its fp64-statistics reference); the phase rows."""
    codecs = {spec: sketch_of(spec) for spec in (args.sketch or [f"{args.k}:fp16"])}
    if args.warm:  # compile the kernels first: the time of a second call in the same process
        for codec in codecs.values():
            sf.analyze(model, lm_loss, task_a[:1], task_b[:1], codec=codec, units=args.units).head_means()
    from sketchfisher import kernels

    default_shape = kernels.launch_shape

    def before_shape(rows, width, bands, tiles, programs, sms, tiles_per_step=None, chunks=None):
        return (tiles_per_step or max(1, 4096 // (rows * width * bands)),
                chunks or max(1, min(tiles // 8, -(-4 * sms // programs))))

    from sketchfisher.fisher import host

    from sketchfisher.fisher import FisherStats

    default_pin, accumulating = host.PIN, FisherStats.__dict__["accumulating"]

    def fp32_signed(cls, dtype, quantities):  # Σg and the half sum in the statistics' own precision
        return replace(accumulating.__func__(cls, dtype, quantities), signed_dtype=None)

    from sketchfisher.kernels import graphs

    default_graphs = graphs.RECORDED
    setting_of = {graphs.recorded_kinds(name): name for name in ("off", "statistics", "layers")}
    args.graphs = args.graphs or [setting_of[default_graphs]]
    from sketchfisher.compress import fused

    default_tiled, default_prefetch = fused.TILED, kernels.PREFETCH
    args.side_loads = args.side_loads or ["+".join(name for name, on in (("tiled", default_tiled),
                                                                          ("prefetch", default_prefetch)) if on) or "plain"]
    settings = list(itertools.product(args.passes, args.conflicts, codecs, args.sjlt_launch, args.pin, args.signed_sums,
                                      args.grads, args.graphs, args.side_loads))
    runs = []  # (conflicts, the other settings, seconds) of every sf.analyze, in order
    for setting in settings:  # orders, conflicts, codecs, launches, pinning, sums, gradients side by side
        passes, conflicts, spec, launch, pin, sums, grads, graphed, loads = setting
        flag = {"auto": None, "on": True, "off": False}[conflicts]
        codec = codecs[spec]
        kernels.launch_shape = default_shape if launch == "default" else before_shape
        host.PIN = pin == "on"
        FisherStats.accumulating = accumulating if sums == "bf16" else classmethod(fp32_signed)
        graphs.RECORDED = graphs.recorded_kinds(graphed)
        fused.TILED, kernels.PREFETCH = "tiled" in loads, "prefetch" in loads
        retries = alloc_retries()
        try:
            with per_sample_gradients(grads):
                sec, peaks, res = measure(lambda: sf.analyze(model, lm_loss, task_a, task_b, codec=codec, passes=passes,
                                                             conflicts=flag, units=args.units))
        finally:
            kernels.launch_shape, host.PIN, FisherStats.accumulating = default_shape, default_pin, accumulating
            graphs.RECORDED, fused.TILED, kernels.PREFETCH = default_graphs, default_tiled, default_prefetch
        rows.append((("sf.analyze: both passes, both tasks" if passes == 2 else
                      "sf.analyze(passes=1.5): pass 1 A, task B once, pass 2 A") +
                     f", conflicts {conflicts}, Sketch(k={codec.k}, {codec.dtype}, {codec.centring}{', rotated' if codec.rotate else ''}), units {args.units}"
                     f"{'' if launch == 'default' else ', sjlt launch as before'}"
                     f"{'' if pin == 'on' else ', pageable host buffers'}"
                     f"{'' if sums == 'bf16' else ', fp32 Σg and half sum'}"
                     f"{'' if grads == 'bf16' else ', fp32 per-sample gradients'}"
                     f", launches recorded: {graphed}{'' if loads == 'plain' else ', side loads: ' + loads}", sec,
                     peaks))
        runs.append((conflicts, setting[:1] + setting[2:], sec))
        sec_s, peaks_s, means = measure(res.head_means)
        rows.append(("scoring: head means over all pairs", sec_s, peaks_s))
        recorded = res.context.source.moments if hasattr(res.context.source, "moments") else None
        if recorded:
            sec_c, peaks_c, table = measure(res.head_conflicts)
            rows.append((f"conflict table ({int(table.conflict.sum())} of {len(table)} blocks flagged)", sec_c, peaks_c))
        for label, sec, peaks in rows[-3 if recorded else -2:]:
            print(f"| {label} | {sec:.1f} | {sec / base:.2f} | {', '.join(f'{x:.1f}' for x in peaks)} |")
        print(f"| phase of sf.analyze(passes={passes:g}, conflicts {conflicts}, {spec}, sjlt launch {launch}, pinned host "
              f"buffers {pin}, Σg and half sum {sums}, per-sample gradients {grads}, launches recorded: {graphed}, "
              f"side loads: {loads}) | seconds | | "
              "peak GiB (max over devices) |")
        for row in res.phases.rows():
            print(f"| {row['phase']} | {row['seconds']:.1f} | {row['seconds'] / base:.2f} | {row['peak_GiB']:.1f} |")
        print(f"allocator retries during sf.analyze (each frees cached blocks and waits for the device): "
              f"{alloc_retries() - retries}")
        print(f"head means finite: {torch.isfinite(means).all().item()}; stats {res.context.stats_a.dtype}, kept after "
              f"collection: A {res.context.stats_a.quantities}, B {res.context.stats_b.quantities}")
        phases = res.phases.rows()
        if setting != settings[-1]:
            del res, means  # free the device before the next order runs
            gc.collect()
    conflict_test_cost(runs)
    if args.compare_stats_dtype:
        ref = sf.analyze(model, lm_loss, task_a, task_b, codec=codec, stats_dtype=torch.float64)
        a, b, se = res.scores.double(), ref.scores.double(), ref.stderr.double()
        ok = torch.isfinite(a) & torch.isfinite(b)
        diff = (a - b).abs()[ok]
        print(f"statistics {res.context.stats_a.dtype} vs float64: max |Δscore| / max |score| "
              f"{float(diff.max() / b[ok].abs().max()):.2e}, median |Δscore| / stderr {float((diff / se[ok]).median()):.2e}, "
              f"max |Δscore| / stderr {float((diff / se[ok]).max()):.2e}")
    return phases


def conflict_test_cost(runs: list) -> None:
    """The conflict test's cost from runs with it and without it and the same other settings: each run is paired
    with the last unpaired run of the other kind (``--conflicts on off off on`` gives two pairs, each measured back to
    back). One figure per pair, then their mean and range, since a card's passes move between runs by more than the
    test costs."""
    costs, waiting = [], {}
    for conflicts, key, sec in runs:
        if conflicts not in ("on", "off"):
            continue
        other = waiting.pop(key, None)
        if other is not None and other[0] != conflicts:
            on, off = (sec, other[1]) if conflicts == "on" else (other[1], sec)
            costs.append(on / off - 1)
        else:
            waiting[key] = (conflicts, sec)
    if costs:
        print(f"conflict test's cost, pairs: {', '.join(f'{c:+.1%}' for c in costs)}; mean {sum(costs) / len(costs):+.1%}, "
              f"range {min(costs):+.1%} to {max(costs):+.1%} ({len(costs)} pair{'s' if len(costs) > 1 else ''})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    p.add_argument("--samples", type=int, default=256, help="samples per task")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--device-map", default="none", choices=["none", "auto"])
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--passes", type=float, nargs="+", default=[2], choices=[2, 1.5],
                   help="sf.analyze's pass orders, run one after another: 2 per task (default) and/or 1.5 "
                        "(task B once)")
    p.add_argument("--conflicts", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                   help="sf.analyze's conflicts= (auto: on where it fits); several run side by side, and the test's cost is "
                        "printed per on/off pair (on off off on: two pairs, back to back)")
    p.add_argument("--sketch", nargs="+", default=None, metavar="K:DTYPE[:CENTRING][:rotate]",
                   help="sketch codecs side by side, e.g. 256:fp16:mean 1024:int4 (default: --k with fp16)")
    p.add_argument("--units", default="heads", choices=["heads", "mlp", "all"], help="sf.analyze's units=")
    p.add_argument("--warm", action="store_true", help="run sf.analyze once on one batch first (kernels compiled)")
    p.add_argument("--plain-seconds", type=float, default=None, help="a plain time measured before (with --cli-only)")
    p.add_argument("--cli-only", action="store_true", help="skip sf.analyze; run only the CLI path (needs --cli)")
    p.add_argument("--no-checkpoint", action="store_true", help="the CLI's collect writes no pass-1 checkpoint")
    p.add_argument("--compare-stats-dtype", action="store_true",
                   help="also run with fp64 statistics and report how far the default (fp32 on GPUs) moves the scores")
    p.add_argument("--sjlt-launch", nargs="+", default=["default"], choices=["default", "before"],
                   help="the sjlt kernel's launch shapes to run side by side: today's default and/or the one before "
                        "(4096 elements a step, four programs per SM)")
    p.add_argument("--graphs", nargs="+", default=None, choices=["off", "statistics", "layers"],
                   help="which launches are recorded once as CUDA graphs and replayed: none, the statistics' Welford "
                        "updates one parameter a recording, or whole layers' updates and side kernels "
                        "(default: the library's setting, SKETCHFISHER_GRAPHS); several run side by side")
    p.add_argument("--side-loads", nargs="+", default=None, choices=["plain", "prefetch", "tiled", "tiled+prefetch"],
                   help="how the side kernel loads, side by side: as it does by default (plain), each step's loads a "
                        "step ahead (SKETCHFISHER_SIDE_PREFETCH), the preparations in its tile order "
                        "(SKETCHFISHER_TILED_PREPARATIONS), or both (default: the library's settings)")
    p.add_argument("--pin", nargs="+", default=["on"], choices=["on", "off"],
                   help="page-locked host buffers for the statistics that leave the GPU (the default), or pageable ones")
    p.add_argument("--signed-sums", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                   help="Σg and the half sum in stochastically rounded bf16 (the default with fp32 statistics) "
                        "and/or in fp32, side by side")
    p.add_argument("--grads", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                   help="per-sample gradients for statistics and sketches: a bf16 model's in bf16 (the library's) or "
                        "fp32 (before); several: side by side")
    p.add_argument("--memory-cap", type=float, default=None, metavar="GiB",
                   help="hold the process to this much device memory (an 80 GB card's budget on a larger one): "
                        "torch.cuda.set_per_process_memory_fraction, which sf.analyze's planner reads too")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--cli", default=None, metavar="DIR",
                   help="also save the model and a word-level tokenizer to DIR and run the CLI's collect on the same "
                        "shape of data (random words, truncated to --tokens)")
    args = p.parse_args()
    if args.memory_cap and torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(d).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 2**30 / total), d)
    model = build_model(args)
    devices = sorted({q.device for q in model.parameters()}, key=str)
    cuda = [d for d in devices if d.type == "cuda"]
    first = devices[0]
    vocab = model.config.vocab_size
    gen = torch.Generator(device=first).manual_seed(0)
    make = lambda: [{"input_ids": torch.randint(0, vocab, (args.batch, args.tokens), device=first, generator=gen)}  # noqa
                    for _ in range(-(-args.samples // args.batch))]
    task_a, task_b = make(), make()
    measure = lambda fn: timed(fn, cuda)  # noqa: E731

    def plain():
        for batch in task_a + task_b:
            model.zero_grad(set_to_none=True)
            lm_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    rows = []
    if not args.skip_plain:
        lm_loss(model, task_a[0]).sum().backward()  # warm-up
        model.zero_grad(set_to_none=True)
        sec, peaks, _ = measure(plain)
        rows.append(("plain forward+backward (both tasks)", sec, peaks))
    name = torch.cuda.get_device_name() if cuda else "CPU"
    hidden, heads, kv, inter, vocab, layers = SHAPES[args.shape]
    print(f"# {name} x {len(cuda)}, torch {torch.__version__}, {args.shape} ({args.layers or layers} layers, hidden "
          f"{hidden}, {heads} heads, {kv} kv heads, intermediate {inter}, vocabulary {vocab}), bf16 weights, "
          f"{args.samples} + {args.samples} samples, T={args.tokens}, batch {args.batch}, Sketch(sjlt, k={args.k})")
    base = rows[0][1] if rows else (args.plain_seconds or float("nan"))
    print("| what | seconds | x plain | peak GiB per device |\n| --- | --- | --- | --- |")
    for label, sec, peaks in rows:
        print(f"| {label} | {sec:.1f} | {sec / base:.2f} | {', '.join(f'{x:.1f}' for x in peaks)} |")
    phases = []
    if not args.cli_only:
        phases = analyze_rows(model, task_a, task_b, args, base, measure, rows)
    if args.cli:
        save_for_cli(model, args)
        cli_base = plain_over_cli_tasks(model, args, measure)
        rows.append(("plain forward+backward over the CLI's batches and loss", cli_base, [float("nan")]))
        del model  # the CLI runs in its own process: give it the device memory
        torch.cuda.empty_cache() if cuda else None
        cli = run_cli(args)
        peaks = cli.get("peak_device_GiB", [float("nan")])
        rows.append(("CLI collect (default pass order)", cli["collection_seconds"], peaks))
        print(f"| plain over the CLI's batches and loss | {cli_base:.1f} | 1.00 | |")
        print(f"| CLI collect, same data shape | {cli['collection_seconds']:.1f} | "
              f"{cli['collection_seconds'] / cli_base:.2f} | {', '.join(f'{x:.1f}' for x in peaks)} |")
        print("\nCLI phases (x the CLI's plain):\n| phase | seconds | x plain | peak GiB |\n| --- | --- | --- | --- |")
        for row in cli.get("phases", []):
            print(f"| {row['phase']} | {row['seconds']:.1f} | {row['seconds'] / cli_base:.2f} | {row['peak_GiB']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "phases": phases, "device": name,
                       "cli_phases": cli.get("phases") if args.cli else None}, fh, indent=1)


if __name__ == "__main__":
    main()
