"""Command-line interface: ``sketchfisher <command> --help``. Exit codes: 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ._version import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    start = time.perf_counter()
    out = run_demo(args.out, samples=args.samples, top=args.top, show_progress=not args.quiet)
    res = out["result"]
    print(f"sketchfisher demo: MiniLM (6 layers x 12 heads), math n={res.n_a} vs code n={res.n_b}, exact scores")
    print("\nHead blocks where the two tasks pull the weights apart most (alignment of the tasks' mean gradients,"
          "\nFisher-normalised: -1 opposite, +1 the same; q: permutation test, Benjamini-Hochberg):")
    table = out["conflicts"].head(args.top)[["layer", "head", "block", "alignment", "p_value", "q_value"]]
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"{out['significant']} head blocks in significant conflict (q <= 0.05)")
    print("\nTop conflicting sample pairs (paper score: C_i / I_A * |g_j|):")
    print(out["top_pairs"].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nheatmap: {out['heatmap']}\ntable:   {out['csv']}\ntook {time.perf_counter() - start:.1f} s")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from .planner import format_bytes, plan, plan_phases

    source = args.preset
    if args.config:
        from transformers import AutoConfig

        source = AutoConfig.from_pretrained(args.config, local_files_only=True)
    stats_bytes = 4 if args.stats_dtype == "float32" else 8
    df = plan(source, samples=args.samples, tokens=args.tokens, k=args.k, rank=args.rank, sketch_dtype=args.sketch_dtype,
              batch_size=args.batch_size, stats_bytes=stats_bytes, devices=args.devices)
    print(f"plan for {args.config or args.preset}: {args.samples} samples of {args.tokens} tokens, batch "
          f"{args.batch_size}, {args.stats_dtype} statistics, {args.devices} device(s)")
    table = df[["codec", "disk", "peak_device", "x_smaller_than_exact"]].rename(
        columns={"disk": "disk (representation)", "peak_device": "peak device memory", "x_smaller_than_exact":
                 "x smaller than Exact"})
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    phases = plan_phases(source, samples=args.samples, tokens=args.tokens, batch_size=args.batch_size,
                         codec=sf.Sketch(k=args.k, dtype=args.sketch_dtype), stats_bytes=stats_bytes,
                         devices=args.devices)
    print(f"\nSketch(k={args.k}) with sf.analyze / collect, peak device memory per phase (busiest device):")
    for row in phases.itertuples():
        print(f"  {row.phase:<12} {format_bytes(row.peak_device_bytes)}")
    return 0


def _collect(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from .phases import PhaseLog
    from .store import collect_to_store
    from .tasks import check_max_length, file_sha256, input_device, load_hf, loss_for, read_task, task_batches
    from .tasks import to_device

    loss = _loss(args)
    model, tok = load_hf(args.model, loss, args.device, args.dtype, _device_map(args))
    check_max_length(model, args.max_length)
    device = input_device(model)
    tasks = [to_device(task_batches(read_task(p, args.text_field), tok, loss, args.batch_size, args.max_length),
                       device) for p in (args.task_a, args.task_b)]
    codec = sf.Sketch(k=args.k, kind=args.kind, seed=args.seed, dtype=args.sketch_dtype,
                      variance_reduction=not args.no_variance_reduction)
    cfg = sf.ScoreConfig(variant=args.variant, normalizer=args.normalizer, eps=args.eps)
    import torch

    start, log = time.perf_counter(), PhaseLog.for_devices([p.device for p in model.parameters()])
    path = collect_to_store(args.out, model, loss_for(loss), tasks[0], tasks[1], sf.layout_for(model), codec,
                            cfg, max_bytes=args.max_bytes, show_progress=not args.quiet,
                            inputs={"loss": loss, "max_length": args.max_length, "batch_size": args.batch_size,
                                    "text_field": args.text_field, "model": str(Path(args.model).resolve()),
                                    **{f"task_{s}": {"path": str(Path(p).resolve()), "sha256": file_sha256(p)}
                                       for s, p in (("a", args.task_a), ("b", args.task_b))}},
                            stats_dtype=None if args.stats_dtype == "auto" else getattr(torch, args.stats_dtype),
                            log=log)
    summary = sf.open_store(path).summary()
    summary["collection_seconds"] = round(time.perf_counter() - start, 2)
    summary["phases"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in log.rows()]
    if log.devices:
        summary["peak_device_GiB"] = [round(b / 2**30, 2) for b in log.device_peaks()]
    print(json.dumps(summary, indent=1))
    return 0


def _need_plots(args: argparse.Namespace) -> None:
    """The figure needs matplotlib (an optional extra): say so before any work, not after the CSVs."""
    import importlib.util

    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        from .errors import InputError

        raise InputError("the figure needs matplotlib: pip install 'sketchfisher[plots]', or pass --no-plot")


def _interfere(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from .plots import plot_block_heatmaps

    _need_plots(args)
    if args.all_scores and args.scores_format == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            from .errors import InputError

            raise InputError("--all-scores writes Parquet, which needs pyarrow: pip install 'sketchfisher[parquet]', "
                             "or pass --scores-format csv")
    store = sf.open_store(args.store)
    res = store.result()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    top = res.top_conflicts(args.top)
    for side, column, at in (("a", "text_i", 5), ("b", "text_j", 6)):  # the samples' text when the task file is there
        texts = _task_texts(store, side)
        if texts is not None:
            top.insert(at, column, [texts[i][:80] for i in top[f"sample_{'i' if side == 'a' else 'j'}"]])
    top.to_csv(out / "top_conflicts.csv", index=False, float_format="%.6g")
    means, errors = res.head_means(), res.head_means_stderr()
    rows = [{"layer": layer, "head": h, "block": b, "mean_score": float(means[layer, h, i]),
             "stderr": float(errors[layer, h, i])}
            for layer in range(means.shape[0]) for h in range(means.shape[1]) for i, b in enumerate(sf.BLOCKS)]
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "head_means.csv", index=False, float_format="%.6g")
    res.block_summary().to_csv(out / "block_summary.csv", index=False, float_format="%.6g")
    if args.all_scores:
        if args.scores_format == "parquet":
            res.to_frame().to_parquet(out / "scores.parquet", index=False)
        else:
            res.to_frame().to_csv(out / "scores.csv.gz", index=False, float_format="%.6g")
    if not args.no_plot:
        what = {"paper": "task B's Fisher-normalised gradient mass (A enters through Î)",
                "signed": "the Fisher-weighted alignment of the two task means (negative: they pull apart)",
                "symmetric": "the tasks' Fisher-normalised shared gradient mass"}.get(res.cfg.variant, "")
        plot_block_heatmaps(means, out / "heatmap.png", label=f"mean {res.cfg.variant} score",
                            title=f"{args.store}: mean {res.cfg.variant} score per head = {what}")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    if res.cfg.variant == "paper":
        print(f"the head means of the paper score reflect task B's gradients; for 'do A and B pull this head apart?' "
              f"run: sketchfisher conflicts {args.store}")
    return 0


def _task_texts(store, side: str) -> list[str] | None:
    """The texts of a task as collect read them, if its file is still there unchanged (checked by hash)."""
    from .tasks import file_sha256, read_task

    record = store.manifest.get("inputs", {}).get(f"task_{side}")
    if not record or not Path(record["path"]).exists():
        return None
    if file_sha256(record["path"]) != record["sha256"]:
        print(f"note: {record['path']} changed since collect; the sample texts are left out of top_conflicts.csv",
              file=sys.stderr)
        return None
    samples = read_task(record["path"], store.manifest["inputs"].get("text_field", "text"))
    return [" -> ".join(s) if isinstance(s, tuple) else s for s in samples]


def _recompute_inputs(args: argparse.Namespace, store):
    """Model, loss name and both tasks' batches as ``collect`` made them: every input not given on the command
    line comes from the store's record (model, task files, text field, batch size, max length, loss)."""
    from .errors import InputError
    from .tasks import check_max_length, file_sha256, input_device, load_hf, read_task, task_batches, to_device

    recorded = store.manifest.get("inputs", {})
    for flag in ("model", "task_a", "task_b", "text_field", "batch_size", "max_length"):
        if getattr(args, flag) is None:
            value = recorded.get(flag)
            value = value.get("path") if isinstance(value, dict) else value
            if value is None:
                defaults = {"text_field": "text", "batch_size": 8, "max_length": 128}
                if flag not in defaults:
                    raise InputError(f"the store does not record --{flag.replace('_', '-')}; pass it")
                value = defaults[flag]
            setattr(args, flag, value)
    changed = [side for side in ("a", "b") if isinstance(recorded.get(f"task_{side}"), dict)
               and Path(getattr(args, f"task_{side}")).resolve() == Path(recorded[f"task_{side}"]["path"])
               and Path(recorded[f"task_{side}"]["path"]).exists()
               and file_sha256(recorded[f"task_{side}"]["path"]) != recorded[f"task_{side}"]["sha256"]]
    if changed:
        raise InputError(f"task file(s) {', '.join(recorded[f'task_{s}']['path'] for s in changed)} changed since "
                         "collect (their hash differs): the samples would not be the ones in the store")
    loss = _loss(args, store)
    model, tok = load_hf(args.model, loss, args.device, args.dtype, _device_map(args))
    store.check(model)
    check_max_length(model, args.max_length)
    tasks = [to_device(task_batches(read_task(p, args.text_field), tok, loss, args.batch_size, args.max_length),
                       input_device(model)) for p in (args.task_a, args.task_b)]
    return model, loss, tasks


def _verify(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from .tasks import loss_for

    store = sf.open_store(args.store)
    model, loss, tasks = _recompute_inputs(args, store)
    v = store.result().verify_top(args.k, args.budget, model=model, loss_fn=loss_for(loss), task_a=tasks[0],
                                  task_b=tasks[1])
    target = Path(args.out) if args.out else Path(args.store) / "verified.csv"
    v.to_csv(target, index=False, float_format="%.6g")
    print(f"{v.attrs['held_fraction']:.0%} of the sketched top-{args.k} held among {len(v)} re-scored candidates; "
          f"wrote {target}")
    return 0


def _conflicts(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from .plots import plot_head_conflicts
    from .tasks import loss_for

    _need_plots(args)
    store = sf.open_store(args.store)
    model, loss, tasks = _recompute_inputs(args, store)
    codec = sf.Exact() if args.gradients == "exact" else sf.Factors()
    res = sf.analyze(model, loss_for(loss), tasks[0], tasks[1], codec=codec, config=store.cfg,
                     progress=not args.quiet)
    conflicts = res.head_conflicts(n_permutations=args.permutations, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.store) / "conflicts"
    out.mkdir(parents=True, exist_ok=True)
    conflicts.to_csv(out / "head_conflicts.csv", index=False, float_format="%.6g")
    significant = int(((conflicts.q_value <= args.q) & (conflicts.alignment < 0)).sum())
    if not args.no_plot:
        plot_head_conflicts(conflicts, res.layout.num_layers, res.layout.num_heads, out / "conflicts.png", q=args.q,
                            title=f"{args.store}: A (n={res.n_a}) vs B (n={res.n_b}); blue = the tasks pull apart, "
                                  f"dots: conflict with q ≤ {args.q:g}")
    print(f"{significant} head blocks where the tasks pull apart (q ≤ {args.q:g}, {args.permutations} permutations); "
          f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import sketchfisher as sf

    store = sf.open_store(args.store)
    summary = store.summary()
    if not args.no_verify:
        summary["verified_files"] = store.verify()  # every file read and checked against its digest
    print(json.dumps(summary, indent=1))
    return 0


def _number(kind: type, low: float, name: str):
    """An argparse type: a finite ``kind`` ≥ ``low``; anything else is a usage error (exit 2, before any work)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value >= low) or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= {low:g}, got {text}")
        return value
    return parse


POSITIVE = _number(int, 1, "this option")
NONNEGATIVE = _number(int, 0, "this option")


def _model_args(p: argparse.ArgumentParser, from_store: bool = False) -> None:
    later = " (default: the one the store was collected with)" if from_store else ""
    p.add_argument("--model", required=not from_store, help="local HF model directory (config, weights, tokenizer)"
                   + later)
    p.add_argument("--task-a", required=not from_store,
                   help="task A samples: .jsonl/.parquet records with a 'text' field, one per line of a text "
                        "file, or a local dataset folder" + later)
    p.add_argument("--task-b", required=not from_store, help="task B samples, same format" + later)
    p.add_argument("--loss", choices=["mlm", "clm"], default=None,
                   help="clm: next-token cross-entropy; mlm: masked tokens decoded with the tied embeddings "
                        "(default: what the model directory was trained for, from its config)")
    p.add_argument("--text-field", default=None if from_store else "text",
                   help="field of a .jsonl/.parquet record holding the text (default: text" + (", or the store's" if
                        from_store else "") + "); records with 'prompt' and 'completion' fields are scored on the "
                        "completion")
    p.add_argument("--batch-size", type=POSITIVE, default=None if from_store else 8,
                   help="samples per batch (default: 8" + (", or the store's" if from_store else "") + ")")
    p.add_argument("--max-length", type=_number(int, 2, "--max-length"), default=None if from_store else 128,
                   help="tokens per sample after truncation (default: 128" + (", or the store's" if from_store else "")
                        + ")")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (never chosen for you)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="precision of the model's weights (default: float32)")
    p.add_argument("--device-map", default="none", choices=["none", "auto"],
                   help="auto: spread the layers over every visible GPU (needs accelerate); default: none")


def _device_map(args: argparse.Namespace) -> str | None:
    return None if args.device_map == "none" else args.device_map


def _loss(args: argparse.Namespace, store=None) -> str:
    """``--loss``, else the loss the store was collected with, else the model directory's objective."""
    from .tasks import infer_loss

    recorded = None if store is None else store.manifest.get("inputs", {}).get("loss")
    if args.loss and recorded and args.loss != recorded:
        from .errors import InputError

        raise InputError(f"--loss {args.loss}, but the store was collected with --loss {recorded}")
    return args.loss or recorded or infer_loss(args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchfisher", description="Which attention heads, and which Q/K/V/O blocks, do the samples of two "
        "tasks fight over? Run 'sketchfisher COMMAND --help' for each command; exit codes: 0 ok, 1 failure, 2 usage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"sketchfisher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="exact QK-OV interference of math vs code samples on the offline MiniLM")
    p.add_argument("--out", default="demo_out", help="output folder for heatmap.png and top_conflicts.csv")
    p.add_argument("--samples", type=POSITIVE, default=None, help="samples per task (default: all 48)")
    p.add_argument("--top", type=POSITIVE, default=10, help="rows to print")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("plan", help="disk and device memory of each codec for a model and sample count")
    p.add_argument("--preset", default="llama-7b", help="gpt2, minilm, llama-7b, llama3-8b, llama-13b or llama-70b")
    p.add_argument("--config", help="a local HF config directory instead of a preset")
    p.add_argument("--samples", type=POSITIVE, default=768, help="samples over both tasks")
    p.add_argument("--tokens", type=POSITIVE, default=512, help="tokens per sample")
    p.add_argument("--k", type=POSITIVE, default=256, help="sketch width per head block")
    p.add_argument("--rank", type=POSITIVE, default=16, help="rank of truncated factors")
    p.add_argument("--sketch-dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8"],
                   help="storage precision of the sketches (default: fp16)")
    p.add_argument("--batch-size", type=POSITIVE, default=4, help="samples per batch (default: 4)")
    p.add_argument("--devices", type=POSITIVE, default=1, help="devices the layers are spread over (default: 1)")
    p.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"],
                   help="precision of the pass-1 statistics (default: float32, the GPU default)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("collect", help="sketch two tasks into a resumable store (rerun the same command to resume)")
    _model_args(p)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--k", type=POSITIVE, default=256, help="sketch width per head block (default: 256)")
    p.add_argument("--kind", default="sjlt", choices=["gaussian", "sjlt", "srht"],
                   help="random map: sparse JL (default), dense Gaussian, or subsampled Hadamard")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random maps (default: 0)")
    p.add_argument("--sketch-dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8"],
                   help="storage precision of the sketches (default: fp16)")
    p.add_argument("--no-variance-reduction", action="store_true",
                   help="plain sketches, without balancing and centering (less accurate at equal bytes)")
    p.add_argument("--variant", default="paper", choices=["paper", "signed", "symmetric"],
                   help="score: paper (default) C_i/(I+eps)*|g_j|, signed g_i g_j/(I+eps), symmetric |g_i||g_j|/(I+eps)")
    p.add_argument("--normalizer", default="a", choices=["a", "pooled", "loo"],
                   help="Fisher in the denominator: task A's (default), A and B pooled, or A without sample i")
    p.add_argument("--eps", type=_number(float, 0, "--eps"), default=1e-10, help="added to the Fisher in the denominator (default: 1e-10)")
    p.add_argument("--max-bytes", type=POSITIVE, default=None, help="refuse to collect a store larger than this")
    p.add_argument("--stats-dtype", default="auto", choices=["auto", "float64", "float32"],
                   help="precision of the model-sized pass-1 statistics (auto: float64 on the CPU, float32 on a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_collect)

    p = sub.add_parser("interfere", help="Stage 6 from a store: top conflicts, head means, heatmap")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top", type=POSITIVE, default=100, help="conflicting pairs to list (default: 100)")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--all-scores", action="store_true",
                   help="also write every score with its stderr, one row per (pair, layer, head, block): can be large")
    p.add_argument("--scores-format", default="parquet", choices=["parquet", "csv"],
                   help="format of --all-scores: parquet (default; needs pyarrow) or gzipped csv")
    p.set_defaults(func=_interfere)

    p = sub.add_parser("verify", help="re-score a store's top candidates exactly by recomputing their gradients")
    p.add_argument("store", help="a store directory written by collect")
    _model_args(p, from_store=True)
    p.add_argument("--k", type=POSITIVE, default=100, help="top conflicts to confirm (default: 100)")
    p.add_argument("--budget", type=POSITIVE, default=1000, help="sketched candidates to re-score exactly (default: 1000)")
    p.add_argument("--out", default=None, help="output CSV (default: verified.csv inside the store)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("conflicts", help="do the two tasks pull each head's weights apart? alignment of their mean "
                       "gradients per head block with permutation q-values (recomputes the gradients)")
    p.add_argument("store", help="a store directory written by collect")
    _model_args(p, from_store=True)
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--permutations", type=POSITIVE, default=999, help="label permutations per test (default: 999)")
    p.add_argument("--gradients", default="factors", choices=["factors", "exact"],
                   help="how per-sample gradients are formed: batched low-rank factors (default) or one sample at a "
                        "time (models whose projections also see batch-shared inputs, e.g. DeBERTa-v2)")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the permutations (default: 0)")
    p.add_argument("--q", type=_number(float, 0, "--q"), default=0.05,
                   help="false discovery rate that marks a conflict in the figure (default: 0.05)")
    p.add_argument("--out", default=None, help="output folder (default: conflicts/ inside the store)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_conflicts)

    p = sub.add_parser("inspect", help="summary of a store, after reading every file and checking its digest")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("--no-verify", action="store_true", help="summary from the headers only (no full read)")
    p.set_defaults(func=_inspect)
    for command in sub.choices.values():  # also accepted after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        import os

        os.environ["SKETCHFISHER_PROGRESS"] = "0"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' loading bars too
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .errors import SketchfisherError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sketchfisher: interrupted (a store resumes when the same command is run again)", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for every failure; --debug shows the traceback
        if args.debug:
            raise
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "" if isinstance(exc, SketchfisherError) else f"{type(exc).__name__}: "
        hint = "" if isinstance(exc, SketchfisherError) else " (run with --debug for the traceback)"
        print(f"sketchfisher: error: {kind}{what}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
