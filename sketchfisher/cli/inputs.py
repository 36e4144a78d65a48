"""What the commands share: the inputs a store recorded (model, loss, task files, truncation), and
the optional extras they need."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def _need_plots(args: argparse.Namespace) -> None:
    """The figure needs matplotlib (an optional extra): say so before any work, not after the CSVs."""
    import importlib.util

    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        from ..errors import InputError

        raise InputError("the figure needs matplotlib: pip install 'sketchfisher[plots]', or pass --no-plot")


def _task_texts(store, side: str) -> list[str] | None:
    """The texts of a task as collect read them, if its file is still there unchanged (checked by hash)."""
    from ..tasks import file_sha256, read_task

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
    from ..errors import InputError
    from ..tasks import check_max_length, file_sha256, input_device, load_hf, task_batches, to_device

    recorded = store.manifest.get("inputs", {})
    if args.dtype is None:  # the precision the store was collected in (float32 for stores that record none)
        args.dtype = recorded.get("dtype", "float32")
    for flag in ("model", "adapter", "task_a", "task_b", "text_field", "batch_size", "max_length"):
        if getattr(args, flag) is None:
            value = recorded.get(flag)
            value = value.get("path") if isinstance(value, dict) else value
            if value is None and flag == "adapter":
                continue  # (collected without one)
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
    samples = preflight(args, loss)
    model, tok = load_hf(args.model, loss, args.device, args.dtype, _device_map(args), args.tokenizer)
    if args.adapter:
        from ..tasks import load_adapter

        model = load_adapter(model, args.adapter)
    store.check(model)
    check_max_length(model, args.max_length)
    tasks = [to_device(task_batches(texts, tok, loss, args.batch_size, args.max_length), input_device(model))
             for texts in samples]
    return model, loss, tasks


def preflight(args: argparse.Namespace, loss: str, codec=None, units=None, cfg=None, passes=None,
              tasks: Optional[list[tuple[str, str]]] = None) -> list:
    """Everything that can be checked without the weights, before the model is loaded (minutes at 7B): the
    task files (read; at least 2 samples each), the model and tokenizer folders, the
    truncation length against the config, and — on a weightless (meta-device) copy of the model — its layout
    and the codec against it, and (``cfg`` given: ``collect``) the store's planned size against the disk and
    ``--max-bytes``. ``tasks``: ``(what, path)`` of each task (default: ``--task-a`` and ``--task-b``). Returns
    every task's samples."""
    import torch

    from ..errors import InputError
    from ..tasks import check_max_length, check_model_dir, read_task

    samples = []
    for what, path in tasks or [("--task-a", args.task_a), ("--task-b", args.task_b)]:
        texts = read_task(path, args.text_field)
        if len(texts) < 2:
            raise InputError(f"{what} {path} holds {len(texts)} sample; the error bars and the conflict test need at "
                             "least 2 per task")
        samples.append(texts)
    check_model_dir(args.model, getattr(args, "tokenizer", None))
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"--model {args.model}: cannot read its config.json: {exc}") from None
    check_max_length(config, args.max_length)
    if codec is not None:
        import sketchfisher as sf

        cls = AutoModelForCausalLM if loss == "clm" else AutoModel
        with torch.device("meta"):
            try:
                skeleton = cls.from_config(config)
            except (ValueError, KeyError) as exc:
                raise InputError(f"--model {args.model}: transformers cannot build {config.model_type!r} for loss "
                                 f"{loss!r}: {exc}") from None
        layout = sf.units_layout(skeleton, units or "heads", getattr(args, "mlp_group_size", None))
        codec.check_layout(layout)
        if cfg is not None:  # the store's size against the disk and --max-bytes
            from ..collect.stage1 import stats_dtype_for
            from ..store.writer import check_space_before_loading

            on_gpu = str(args.device).startswith("cuda") or args.device_map != "none"
            dtype = stats_dtype_for(on_gpu) if args.stats_dtype == "auto" else getattr(torch, args.stats_dtype)
            check_space_before_loading(Path(args.out), codec, cfg, layout, tuple(map(len, samples)),
                                       args.batch_size, passes, not args.no_conflicts, dtype, args.max_bytes,
                                       not getattr(args, "no_checkpoint", False))
    return samples


def _device_map(args: argparse.Namespace) -> str | None:
    return None if args.device_map == "none" else args.device_map


def _loss(args: argparse.Namespace, store=None) -> str:
    """``--loss``, else the loss the store was collected with, else the model directory's objective."""
    from ..tasks import infer_loss

    recorded = None if store is None else store.manifest.get("inputs", {}).get("loss")
    if args.loss and recorded and args.loss != recorded:
        from ..errors import InputError

        raise InputError(f"--loss {args.loss}, but the store was collected with --loss {recorded}")
    return args.loss or recorded or infer_loss(args.model)
