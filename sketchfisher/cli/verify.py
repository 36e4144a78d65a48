"""``sketchfisher verify``: re-score the top sketched candidates of a store, or of one pair of a task set, exactly
(their gradients recomputed with the model the collection recorded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .inputs import _recompute_inputs


def _verify(args: argparse.Namespace) -> int:
    import sketchfisher as sf
    from ..tasks import loss_for

    from ..errors import InputError

    if args.budget < args.top:
        raise InputError(f"--budget {args.budget} is smaller than --top {args.top}: the top {args.top} cannot be "
                         f"confirmed from fewer re-scored candidates; pass --budget {args.top} or more")
    root = Path(args.store)
    if (root / "tasks.json").exists():  # a task set (sketchfisher tasks): one ordered pair of it
        result, record, default = _task_set_pair(args, root)
    else:
        if args.pair:
            raise InputError(f"--pair is for a task set (sketchfisher tasks --out); {root} is a store of one pair")
        store = sf.open_store(root)
        result, record, default = store.result(), store, root / "verified.csv"
    model, loss, tasks = _recompute_inputs(args, record)
    v = result.verify_top(args.top, args.budget, model=model, loss_fn=loss_for(loss), task_a=tasks[0], task_b=tasks[1])
    target = Path(args.out) if args.out else default
    v.to_csv(target, index=False, float_format="%.6g")
    print(f"{v.attrs['held_fraction']:.0%} of the sketched top-{args.top} held among {len(v)} re-scored candidates; "
          f"wrote {target}")
    return 0


def _task_set_pair(args: argparse.Namespace, root: Path):
    """``verify`` on a task set: the ``--pair A,B`` result, a record of its inputs in the form a store's manifest
    gives them (task A and task B the pair's files), and the default output file."""
    import sketchfisher as sf
    from ..errors import InputError

    many = sf.open_tasks(root)
    names = (args.pair or "").split(",")
    if len(names) != 2 or not all(names):
        raise InputError(f"{root} is a task set of {', '.join(many.names)}: --pair A,B names the ordered pair to "
                         f"verify (A's samples on the i side)")
    unknown = [n for n in names if n not in many.names]
    if unknown:
        raise InputError(f"no task {', '.join(unknown)} in {root}; its tasks are {', '.join(many.names)}")
    unrecorded = [n for n in names if n not in many.inputs.get("files", {})]
    if unrecorded:
        raise InputError(f"{root} records no task file for {', '.join(unrecorded)} (a task set saved by the library "
                         f"records none; 'sketchfisher tasks' does)")
    return many.pair(*names), _TaskSetRecord(root, many, *names), root / f"verified-{names[0]}-{names[1]}.csv"


class _TaskSetRecord:
    """A task set's record in the form :func:`_recompute_inputs` reads a store's: its inputs with task A and task
    B the pair's files, and :meth:`check` of a model against the fingerprint ``tasks`` recorded."""

    def __init__(self, root: Path, many, a: str, b: str):
        inputs = {k: v for k, v in many.inputs.items() if k not in ("files", "model_fingerprint")}
        self.root, self.layout, self.fingerprint = root, many.layout, many.inputs.get("model_fingerprint")
        self.manifest = {"inputs": {**inputs, "task_a": many.inputs["files"][a], "task_b": many.inputs["files"][b]}}

    def check(self, model) -> None:
        from ..layout.adapters import base_model
        from ..store import StoreMismatchError
        from ..store.manifest import model_fingerprint

        if self.fingerprint is None:
            raise StoreMismatchError(f"task set {self.root} records no model fingerprint: its samples cannot be "
                                     "re-scored against a model")
        got = model_fingerprint(base_model(model), self.layout)
        diffs = sorted(k for k in set(got) | set(self.fingerprint) if got.get(k) != self.fingerprint.get(k))
        if diffs:
            raise StoreMismatchError(f"task set {self.root} was collected with another model (differs in: "
                                     f"{', '.join(diffs)})")
