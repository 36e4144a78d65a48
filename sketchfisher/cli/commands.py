"""The commands: each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from .inputs import _device_map, _loss, _need_plots, _task_texts, preflight


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    start = time.perf_counter()
    out = run_demo(args.out, samples=args.samples, top=args.top, show_progress=not args.quiet)
    res = out["result"]
    print(f"sketchfisher demo: MiniLM (6 layers x 12 heads), math n={res.n_a} vs code n={res.n_b}, exact scores")
    print("\nHead blocks where training on math raises the code loss (T = sum g_A g_B / I < 0; alignment: the\n"
          "cosine of the tasks' Fisher-weighted mean gradients with its 95% interval; one-sided q-values):")
    _print_conflicts(out["conflicts"], args.top, "head blocks")
    print("\nTop conflicting sample pairs (paper score: C_i / I_A * |g_j|):")
    print(out["top_pairs"].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nheatmap: {out['heatmap']}\ntable:   {out['csv']}\ntook {time.perf_counter() - start:.1f} s")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..collect.plan import resolve_passes
    from ..planner import format_bytes, plan, plan_phases

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
    codec = sf.Sketch(k=args.k, dtype=args.sketch_dtype)
    passes = resolve_passes(_passes(args), sf.ScoreConfig(), codec)
    phases = plan_phases(source, samples=args.samples, tokens=args.tokens, batch_size=args.batch_size,
                         codec=codec, stats_bytes=stats_bytes, devices=args.devices, passes=passes)
    order = "task B in one pass" if passes == 1.5 else "two passes per task"
    print(f"\nSketch(k={args.k}) with sf.analyze / collect ({order}), peak device memory per phase (busiest device):")
    for row in phases.itertuples():
        print(f"  {row.phase:<12} {format_bytes(row.peak_device_bytes)}")
    return 0


def _passes(args: argparse.Namespace) -> Optional[float]:
    """``--passes``: None for auto (the library's default, or an existing store's order)."""
    return None if args.passes == "auto" else float(args.passes)


def _collect(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..phases import PhaseLog
    from ..store import collect_to_store
    from ..tasks import check_max_length, input_device, load_hf, loss_for, task_batches
    from ..tasks import to_device
    from ..collect.plan import resolve_passes
    from .parser import codec_of

    codec = codec_of(args)
    cfg = sf.ScoreConfig(variant=args.variant, normalizer=args.normalizer, eps=args.eps)
    resolve_passes(_passes(args), cfg, codec)  # settings that cannot run in the order asked for: before loading
    loss = _loss(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        from ..errors import InputError

        raise InputError(f"--out {args.out} is a file; give a directory for the store")
    samples = preflight(args, loss, codec, args.units, cfg, _passes(args))  # every cheap check before the weights load
    model, tok = load_hf(args.model, loss, args.device, args.dtype, _device_map(args), args.tokenizer)
    if args.adapter:
        from ..tasks import load_adapter

        model = load_adapter(model, args.adapter)
    check_max_length(model, args.max_length)
    device = input_device(model)
    tasks = [to_device(task_batches(texts, tok, loss, args.batch_size, args.max_length), device) for texts in samples]
    import torch

    start, log = time.perf_counter(), PhaseLog.for_devices([p.device for p in model.parameters()])
    layout = sf.units_layout(model, args.units, args.mlp_group_size)
    path = collect_to_store(args.out, model, loss_for(loss), tasks[0], tasks[1], layout, codec,
                            cfg, max_bytes=args.max_bytes, show_progress=not args.quiet, passes=_passes(args),
                            checkpoint_every=0 if args.no_checkpoint else None,
                            inputs={**_input_record(args, loss), **{f"task_{s}": _file_record(p)
                                                                    for s, p in (("a", args.task_a), ("b", args.task_b))}},
                            stats_dtype=None if args.stats_dtype == "auto" else getattr(torch, args.stats_dtype),
                            log=log, conflicts=False if args.no_conflicts else None)
    store = sf.open_store(path)
    summary = store.summary()
    summary["collection_seconds"] = round(time.perf_counter() - start, 2)
    summary["phases"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in log.rows()]
    if log.devices:
        summary["peak_device_GiB"] = [round(b / 2**30, 2) for b in log.device_peaks()]
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    why = "--loss" if args.loss else "inferred from the model folder's config"
    peak = f", peak {max(summary['peak_device_GiB']):.1f} GiB on a device" if log.devices else ""
    print(f"sketchfisher collect: done in {summary['collection_seconds']:.1f} s{peak}")
    _print_store(store, loss_why=why)
    return 0


def _named_tasks(args: argparse.Namespace) -> dict[str, str]:
    """``--task NAME=PATH`` (two or more, names unique) as ``{name: path}``."""
    from ..errors import InputError

    tasks: dict[str, str] = {}
    for item in args.task:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--task {item!r}: give NAME=PATH, e.g. --task math=math.txt")
        if name in tasks:
            raise InputError(f"--task {name} is given twice; task names must differ")
        tasks[name] = path
    if len(tasks) < 2:
        raise InputError(f"sketchfisher tasks needs two or more --task NAME=PATH, got {len(tasks)}")
    return tasks


def _input_record(args: argparse.Namespace, loss: str) -> dict:
    """What a collection records of how its batches were made, so that ``verify`` can make them again."""
    return {"loss": loss, "max_length": args.max_length, "batch_size": args.batch_size, "dtype": args.dtype,
            "text_field": args.text_field, "model": str(Path(args.model).resolve()),
            **({"adapter": str(Path(args.adapter).resolve())} if args.adapter else {})}


def _file_record(path: str) -> dict:
    """A task file as recorded: its absolute path and content hash (a changed file is refused later)."""
    from ..tasks import file_sha256

    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def _tasks(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..tasks import check_max_length, input_device, load_hf, loss_for, task_batches, to_device

    named = _named_tasks(args)
    out = Path(args.out)
    if (out / "tasks.json").exists():
        from ..errors import InputError

        raise InputError(f"--out {out} holds a task set already; choose another folder")
    if not args.no_plot:
        _need_plots(args)
    codec = sf.Sketch(k=args.k, seed=args.seed, dtype=args.sketch_dtype)
    loss = _loss(args)
    samples = preflight(args, loss, codec, args.units, tasks=[(f"--task {n}", p) for n, p in named.items()])
    few = [f"{n} ({len(s)})" for n, s in zip(named, samples) if len(s) < 4]
    if few:
        from ..errors import InputError

        raise InputError(f"every task plays task A in some pair, and the conflict test needs at least 4 task-A "
                         f"samples: {', '.join(few)}")
    model, tok = load_hf(args.model, loss, args.device, args.dtype, _device_map(args), args.tokenizer)
    if args.adapter:
        from ..tasks import load_adapter

        model = load_adapter(model, args.adapter)
    check_max_length(model, args.max_length)
    device = input_device(model)
    batches = {n: to_device(task_batches(texts, tok, loss, args.batch_size, args.max_length), device)
               for n, texts in zip(named, samples)}
    start = time.perf_counter()
    many = sf.analyze_tasks(model, loss_for(loss), batches, codec=codec, variant=args.variant, units=args.units,
                            mlp_group_size=args.mlp_group_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    from ..layout.adapters import base_model
    from ..store.manifest import model_fingerprint

    many.save(out, inputs={**_input_record(args, loss), "files": {n: _file_record(p) for n, p in named.items()},
                           "model_fingerprint": model_fingerprint(base_model(model), many.layout)})
    table = many.conflicts(args.level)
    matrix = many.matrix(args.level, table=table)
    table.to_csv(out / "conflicts.csv", index=False)
    matrix.to_csv(out / "matrix.csv")
    if not args.no_plot:
        from ..plots import plot_task_matrix

        plot_task_matrix(matrix, out / "matrix.png")
    print(f"sketchfisher tasks: {len(named)} tasks collected once ({2 * len(named)} passes) in {seconds:.1f} s")
    print(f"unit blocks flagged at q <= {args.level:g} (rows: task A, trained on; columns: task B, whose loss rises):")
    print(matrix.to_string(na_rep="-", float_format=lambda v: f"{v:.0f}"))
    print(f"outputs in {out}: conflicts.csv (every pair's test), matrix.csv" + ("" if args.no_plot else ", matrix.png")
          + "; the task set itself: sf.open_tasks('" + str(out) + "').pair(A, B) in Python")
    return 0


def _print_store(store, loss_why: str | None = None) -> None:
    """What a store holds, as a short table, and the commands to run next."""
    rows = _store_rows(store, loss_why)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"next: sketchfisher conflicts {store.path}   # which blocks do A and B fight over?\n"
          f"      sketchfisher report {store.path}      # the same as one interactive page\n"
          f"      sketchfisher interfere {store.path}   # top sample pairs, head means, heatmap\n"
          f"      (--json prints this summary as JSON)")


def _store_rows(store, loss_why: str | None = None) -> list[tuple[str, str]]:
    """What a store holds: ``(name, value)`` rows (model, loss, tasks, units, codec, passes)."""
    from ..collect.memory import format_bytes

    m, summary = store.manifest, store.summary()
    inputs = m.get("inputs", {})
    rows = [("store", str(store.path)), ("model", f"{m['model']['class']} ({m['layout']['model_type']})")]
    if inputs.get("loss"):
        rows.append(("loss", {"mlm": "masked tokens", "clm": "next token"}.get(inputs["loss"], inputs["loss"])
                     + (f" ({loss_why})" if loss_why else "") + (f", max length {inputs['max_length']}"
                                                                  if inputs.get("max_length") else "")))
    for t in ("a", "b"):
        record = inputs.get(f"task_{t}")
        where = Path(record["path"]).name if isinstance(record, dict) else "(given in memory)"
        rows.append((f"task {t.upper()}", f"{where}: {summary['samples'][t]} samples"))
    units = ", ".join(store.layout.unit_settings()[0])
    rows.append(("units", units))
    per = summary["bytes_per_sample"]
    rows.append(("codec", f"{store.codec.describe()}, {format_bytes(per)} per sample, {format_bytes(summary['sketch_bytes'])} "
                          f"of sketches; {store.cfg.variant} score, normaliser {store.cfg.normalizer}"))
    rows.append(("passes", "1.5 (task B once)" if store.passes == 1.5 else "2 per task"))
    return rows


def _file_prefix(family: str) -> str:
    """Output file prefix of a unit family: none for heads, ``mlp_``, ``linear_lm_head_`` (safe characters)."""
    import re

    return "" if family == "heads" else re.sub(r"[^A-Za-z0-9.-]+", "_", family.replace("*", "N")) + "_"


def _interfere(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..plots import plot_block_heatmaps

    _need_plots(args)
    if args.all_scores and args.scores_format == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            from ..errors import InputError

            raise InputError("--all-scores writes Parquet, which needs pyarrow: pip install 'sketchfisher[parquet]', "
                             "or pass --scores-format csv")
    store = sf.open_store(args.store)
    first = store.result()
    out = Path(args.out) if args.out else Path(args.store) / "interfere"
    out.mkdir(parents=True, exist_ok=True)
    for family in first.families:  # heads, and MLP channel groups when the store has them ("mlp_" files)
        res, prefix = first.units(family), _file_prefix(family)
        layout, unit = first.units(family).layout, first.units(family).layout.unit_column
        top = res.top_conflicts(args.top)
        for side, column, at in (("a", "text_i", 5), ("b", "text_j", 6)):  # the samples' text when the task file is there
            texts = _task_texts(store, side)
            if texts is not None:
                top.insert(at, column, [texts[i][:80] for i in top[f"sample_{'i' if side == 'a' else 'j'}"]])
        top.to_csv(out / f"{prefix}top_conflicts.csv", index=False, float_format="%.6g")
        means, errors = res.head_means(), res.head_means_stderr()
        rows = [{"layer": layer, unit: h, "block": b, "mean_score": float(means[layer, h, i]),
                 "stderr": float(errors[layer, h, i])}
                for layer in range(means.shape[0]) for h in range(means.shape[1]) for i, b in enumerate(layout.block_names)]
        import pandas as pd

        pd.DataFrame(rows).to_csv(out / ("head_means.csv" if family == "heads" else f"{prefix}means.csv"), index=False,
                                  float_format="%.6g")
        res.block_summary().to_csv(out / f"{prefix}block_summary.csv", index=False, float_format="%.6g")
        if args.all_scores:
            if args.scores_format == "parquet":
                res.to_frame().to_parquet(out / f"{prefix}scores.parquet", index=False)
            else:
                res.to_frame().to_csv(out / f"{prefix}scores.csv.gz", index=False, float_format="%.6g")
        if not args.no_plot:
            what = {"paper": "task B's Fisher-normalised gradient mass (A enters through Î)",
                    "signed": "the Fisher-weighted alignment of the two task means (negative: they pull apart)",
                    "symmetric": "the tasks' Fisher-normalised shared gradient mass"}.get(res.cfg.variant, "")
            label = {"heads": "head", "mlp": f"MLP channel group ({layout.head_dim} channels)"}.get(
                family, f"group of {layout.head_dim} output channels")
            plot_block_heatmaps(means, out / f"{prefix}heatmap.png", label=f"mean {res.cfg.variant} score",
                                blocks=layout.block_names, unit="head" if family == "heads" else "channel group",
                                title=f"{args.store}: mean {res.cfg.variant} score per {label} = {what}")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    if res.cfg.variant == "paper":
        print(f"the head means of the paper score reflect task B's gradients; for 'do A and B pull this head apart?' "
              f"run: sketchfisher conflicts {args.store}")
    return 0


def _print_conflicts(table, top: int, what: str, unit: str = "head") -> None:
    """The flagged blocks in words, the most conflicting first, and how many there are."""
    from ..interference.conflicts import describe

    flagged = table[table.conflict]
    for row in flagged.head(top).to_dict("records"):
        print("  " + describe(row, unit))
    more = f" (the first {top} listed)" if len(flagged) > top else ""
    print(f"{len(flagged)} of {len(table)} {what} in conflict at q <= {table.attrs.get('level', 0.05):g}{more}")
    if flagged.empty:  # the closest candidates, so that "none" can be read against them
        print("the most negative alignments (not significant):")
        for row in table.sort_values("alignment").head(min(top, 3)).to_dict("records"):
            print("  " + describe(row, unit))


def _conflicts(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..plots import plot_head_conflicts

    _need_plots(args)
    store = sf.open_store(args.store)
    if not args.no_verify:  # the table reads few of the store's bytes: damage elsewhere is reported, by name
        store.verify()
    first = store.result()
    tasks = store.manifest.get("inputs", {})
    names = [Path(tasks[f"task_{t}"]["path"]).stem if f"task_{t}" in tasks else t.upper() for t in ("a", "b")]
    out = Path(args.out) if args.out else Path(args.store) / "conflicts"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{names[0]} (A, n={first.n_a}) vs {names[1]} (B, n={first.n_b}): blocks where training on A raises B's "
          "loss (T < 0),\nwith the cosine of the tasks' mean gradients and its 95% interval:")
    for family in first.families:  # the store's units: heads, and MLP channel groups ("mlp_" files)
        res, prefix = first.units(family), "head_" if family == "heads" else _file_prefix(family)
        table = res.head_conflicts(level=args.q)
        table.to_csv(out / f"{prefix}conflicts.csv", index=False, float_format="%.6g")
        what = {"heads": "head blocks", "mlp": "MLP channel-group blocks"}.get(family, f"{family} output-channel blocks")
        _print_conflicts(table, args.top, what, res.layout.unit_column)
        if not args.no_plot:
            plot_head_conflicts(table, res.layout, out / ("conflicts.png" if family == "heads" else f"{prefix}conflicts.png"),
                                title=f"{names[0]} (A, n={res.n_a}) vs {names[1]} (B, n={res.n_b}): blue = training "
                                      "on A raises B's loss")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import sketchfisher as sf

    store = sf.open_store(args.store)
    if not args.no_verify:
        store.verify()
    tasks = store.manifest.get("inputs", {})
    names = [Path(tasks[f"task_{t}"]["path"]).stem if f"task_{t}" in tasks else t.upper() for t in ("a", "b")]
    out = Path(args.out) if args.out else Path(args.store) / "report.html"
    res = store.result()
    res.report(out, texts_a=_task_texts(store, "a"), texts_b=_task_texts(store, "b"), top=args.top, level=args.q,
               title=f"{names[0]} (A) vs {names[1]} (B): where do they conflict?", summary=dict(_store_rows(store)))
    print(f"wrote {out} (one file, works offline: open it in a browser)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import sketchfisher as sf

    store = sf.open_store(args.store)
    summary = store.summary()
    if not args.no_verify:
        summary["verified_files"] = store.verify()  # every file read and checked against its digest
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    checked = (f"every file read and checked against its digest ({summary['verified_files']} files)"
               if not args.no_verify else "headers only (--no-verify)")
    print(f"sketchfisher inspect: a complete store, format {summary['format_version']}; {checked}")
    _print_store(store)
    return 0
