"""The argument parser and the entry point: ``sketchfisher <command> --help``. Exit codes: 0 ok, 1 failure,
2 usage."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .._version import __version__
from .commands import _collect, _conflicts, _demo, _inspect, _interfere, _plan, _report, _tasks
from .verify import _verify


def _units(text: str):
    """``--units``: one family, ``all``, or a comma-separated list of the library's unit families."""
    from .choices import unit_families

    UNIT_FAMILIES = unit_families()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if text == "all":
        return "all"
    if not parts or any(p not in UNIT_FAMILIES for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"--units takes {', '.join(UNIT_FAMILIES)} (comma-separated) or all; "
                                         f"got {text!r}")
    return parts if len(parts) > 1 else parts[0]


def _score_args(p: argparse.ArgumentParser) -> None:
    """``--variant``, ``--normalizer``, ``--eps``: choices and help from the library's tables."""
    from .choices import normalizers, variants

    VARIANTS, NORMALIZER_MEANINGS = variants(), normalizers()
    p.add_argument("--variant", default="paper", choices=list(VARIANTS),
                   help="score: " + "; ".join(f"{name}{' (default)' if name == 'paper' else ''} {formula}"
                                              for name, formula in VARIANTS.items()))
    p.add_argument("--normalizer", default="a", choices=list(NORMALIZER_MEANINGS),
                   help="Fisher in the denominator: " + "; ".join(f"{k}{' (default)' if k == 'a' else ''}: {v}"
                                                                  for k, v in NORMALIZER_MEANINGS.items()))
    p.add_argument("--eps", type=_number(float, 0, "--eps"), default=1e-10,
                   help="added to the Fisher in the denominator (default: 1e-10)")


def _codec_args(p: argparse.ArgumentParser) -> None:
    """``--codec`` (the registered codecs a store can hold) and the options codecs take."""
    from .choices import SKETCH_DTYPES as DTYPES
    from .choices import SKETCH_KINDS as KINDS
    from .choices import codecs as storable

    codecs = storable()
    p.add_argument("--codec", default="sketch", choices=list(codecs),
                   help="what the store keeps per sample and head block: " + "; ".join(
                       f"{name}{' (default)' if name == 'sketch' else ''}: {summary}" for name, summary in codecs.items()))
    p.add_argument("--k", type=POSITIVE, default=1024, help="sketch width per head block (default: 1024)")
    p.add_argument("--kind", default="sjlt", choices=list(KINDS),
                   help="random map: sparse JL (sjlt, default), dense Gaussian, or subsampled Hadamard (srht)")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random maps (default: 0)")
    p.add_argument("--sketch-dtype", default="int4", choices=list(DTYPES),
                   help="storage precision of the sketches (default: int4, dithered)")
    p.add_argument("--no-variance-reduction", action="store_true",
                   help="plain sketches, without balancing and centering (less accurate at equal bytes)")
    p.add_argument("--rotate", action="store_true",
                   help="store each sketch turned by a random-sign Hadamard rotation (k a power of two): less rounding "
                        "error for int4/int8 at the same bytes, more arithmetic")


def codec_of(args: argparse.Namespace):
    """The codec the options name: the registered codec ``--codec`` built from the options it declares."""
    from ..compress import codec_from_options

    codec = codec_from_options(args.codec, {"k": args.k, "kind": args.kind, "seed": args.seed,
                                            "dtype": args.sketch_dtype,
                                            "variance_reduction": not args.no_variance_reduction,
                                            **({"rotate": True} if args.rotate else {})})
    if args.rotate and not getattr(codec, "rotate", False):
        from ..errors import InputError

        raise InputError(f"--rotate is an option of --codec sketch; codec {args.codec!r} has no rotation")
    return codec


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


def _fraction(name: str):
    """An argparse type: a number strictly between 0 and 1."""
    def parse(text: str) -> float:
        value = _number(float, 0, name)(text)
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be between 0 and 1, got {text}")
        return value
    return parse


POSITIVE = _number(int, 1, "this option")
NONNEGATIVE = _number(int, 0, "this option")


def _model_args(p: argparse.ArgumentParser, from_store: bool = False, many: bool = False) -> None:
    later = " (default: the one the store was collected with)" if from_store else ""
    p.add_argument("--model", required=not from_store, help="local HF model directory (config, weights, tokenizer)"
                   + later)
    p.add_argument("--adapter", default=None,
                   help="a local PEFT (LoRA) adapter directory to put on the model: the analysis is of its effective "
                        "weights, over the projections its adapters train (needs peft)" + later)
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory, when the model directory has none (default: the model's)")
    formats = ("one per line of a .txt file; .jsonl/.json/.csv/.tsv/.parquet records with a 'text' field; or a local "
               "dataset folder (one split)")
    if many:
        p.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                       help=f"a task, named (give two or more): its samples {formats}")
    else:
        p.add_argument("--task-a", required=not from_store, help=f"task A samples: {formats}" + later)
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
    p.add_argument("--dtype", default=None if from_store else "float32",
                   choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="precision of the model's weights (default: float32" + (", or the store's" if from_store else "")
                        + ")")
    p.add_argument("--device-map", default="none", choices=["none", "auto"],
                   help="auto: spread the layers over every visible GPU (needs accelerate); default: none")


def build_parser() -> argparse.ArgumentParser:
    from .choices import SKETCH_DTYPES, variants

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
    p.add_argument("--k", type=POSITIVE, default=1024, help="sketch width per head block (default: 1024)")
    p.add_argument("--rank", type=POSITIVE, default=16, help="rank of truncated factors")
    p.add_argument("--sketch-dtype", default="int4", choices=list(SKETCH_DTYPES),
                   help="storage precision of the sketches (default: int4, dithered)")
    p.add_argument("--batch-size", type=POSITIVE, default=4, help="samples per batch (default: 4)")
    p.add_argument("--devices", type=POSITIVE, default=1, help="devices the layers are spread over (default: 1)")
    p.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"],
                   help="precision of the pass-1 statistics (default: float32, the GPU default)")
    p.add_argument("--passes", default="auto", choices=["auto", "2", "1.5"],
                   help="pass order: 1.5 runs task B once (normalizer a with variance reduction), 2 runs two passes per "
                        "task; auto (default): 1.5 where it applies, else 2")
    p.set_defaults(func=_plan)

    p = sub.add_parser("collect", help="sketch two tasks into a resumable store (rerun the same command to resume)")
    _model_args(p)
    p.add_argument("--out", required=True, help="store directory")
    _codec_args(p)
    _score_args(p)
    p.add_argument("--max-bytes", type=POSITIVE, default=None, help="refuse to collect a store larger than this")
    p.add_argument("--units", default="heads", type=_units,
                   help="what the scores resolve, comma-separated: heads (default), mlp (MLP channel groups), linear "
                        "(output-channel groups of every other linear layer); all = heads,mlp")
    p.add_argument("--mlp-group-size", type=POSITIVE, default=None,
                   help="hidden channels per MLP unit (1 = single neurons; default: as many units as heads)")
    p.add_argument("--stats-dtype", default="auto", choices=["auto", "float64", "float32"],
                   help="precision of the model-sized pass-1 statistics (auto: float64 on the CPU, float32 on a GPU)")
    p.add_argument("--passes", default="auto", choices=["auto", "2", "1.5"],
                   help="pass order: 1.5 runs task B once (normalizer a with variance reduction), 2 runs two passes per "
                        "task; auto (default): 1.5 where it applies, else 2; an existing store keeps the order that began it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.add_argument("--no-conflicts", action="store_true",
                   help="do not record what the conflict test needs (saves one model-sized statistic per task during "
                        "pass 1 and two weight tensors in the passes; 'sketchfisher conflicts' then refuses the store)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="do not checkpoint pass 1 (a killed run then redoes pass 1; the disk need not hold a "
                        "checkpoint beside the statistics, tens of GB at 7B)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_collect)

    p = sub.add_parser("tasks", help="collect N tasks once (2N passes) and show which pairs conflict where: the N x N "
                                     "matrix, every pair's conflict test, a folder that pairs again without the model")
    _model_args(p, many=True)
    p.add_argument("--out", required=True, help="output folder (the task set, conflicts.csv, matrix.csv, matrix.png)")
    p.add_argument("--k", type=POSITIVE, default=1024, help="sketch width per unit block (default: 1024)")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random maps (default: 0)")
    p.add_argument("--sketch-dtype", default="int4", choices=list(SKETCH_DTYPES),
                   help="storage precision of the sketches (default: int4, dithered)")
    p.add_argument("--variant", default="paper", choices=list(variants()), help="score variant (default: paper)")
    p.add_argument("--units", default="heads", type=_units, help="heads (default), mlp, linear; all = heads,mlp")
    p.add_argument("--mlp-group-size", type=POSITIVE, default=None, help="hidden channels per MLP unit")
    p.add_argument("--level", type=_number(float, 0, "--level"), default=0.05,
                   help="q-value at or below which a unit block is flagged (default: 0.05)")
    p.add_argument("--no-plot", action="store_true", help="no matrix.png (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_tasks)

    p = sub.add_parser("interfere", help="Stage 6 from a store: top conflicts, head means, heatmap")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("--out", default=None, help="output folder (default: interfere/ inside the store, as conflicts/)")
    p.add_argument("--top", type=POSITIVE, default=100, help="conflicting pairs to list (default: 100)")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--all-scores", action="store_true",
                   help="also write every score with its stderr, one row per (pair, layer, head, block): can be large")
    p.add_argument("--scores-format", default="parquet", choices=["parquet", "csv"],
                   help="format of --all-scores: parquet (default; needs pyarrow) or gzipped csv")
    p.set_defaults(func=_interfere)

    p = sub.add_parser("verify", help="re-score a store's top candidates exactly by recomputing their gradients")
    p.add_argument("store", help="a store directory written by collect, or a task set folder written by tasks")
    p.add_argument("--pair", default=None, metavar="A,B",
                   help="for a task set: the ordered pair to verify (task A's samples on the i side)")
    _model_args(p, from_store=True)
    p.add_argument("--top", type=POSITIVE, default=100, help="top conflicting pairs to confirm (default: 100)")
    p.add_argument("--budget", type=POSITIVE, default=1000, help="sketched candidates to re-score exactly (default: 1000)")
    p.add_argument("--out", default=None, help="output CSV (default: verified.csv inside the store)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("conflicts", help="which blocks do the tasks fight over? the one-sided conflict test of each "
                       "unit block (T = sum g_A g_B / I < 0: training on A raises B's loss), from the store alone")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--q", type=_fraction("--q"), default=0.05,
                   help="false discovery rate at which a block is flagged (default: 0.05; below 1)")
    p.add_argument("--top", type=POSITIVE, default=20, help="flagged blocks to print (default: 20)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading every file of the store against its digest first (the table itself reads few)")
    p.add_argument("--out", default=None, help="output folder (default: conflicts/ inside the store)")
    p.set_defaults(func=_conflicts)

    p = sub.add_parser("report", help="one interactive HTML page of a store: the conflict map of every unit family, "
                       "hover for the numbers, click a cell for its strongest sample pairs (works offline)")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("-o", "--out", default=None, help="the HTML file to write (default: report.html inside the store)")
    p.add_argument("--top", type=POSITIVE, default=10, help="sample pairs listed per cell (default: 10)")
    p.add_argument("--q", type=_fraction("--q"), default=0.05,
                   help="false discovery rate at which a block is flagged (default: 0.05; below 1)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading every file of the store against its digest first")
    p.set_defaults(func=_report)

    p = sub.add_parser("inspect", help="summary of a store, after reading every file and checking its digest")
    p.add_argument("store", help="a store directory written by collect")
    p.add_argument("--no-verify", action="store_true", help="summary from the headers only (no full read)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
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
    from ..errors import SketchfisherError

    previous = _on_sigterm()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sketchfisher: interrupted (a store resumes when the same command is run again)", file=sys.stderr)
        return 130
    except Terminated:
        print("sketchfisher: terminated (SIGTERM; a store resumes when the same command is run again)", file=sys.stderr)
        return 143
    except Exception as exc:  # one line for every failure; --debug shows the traceback
        if args.debug:
            raise
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "" if isinstance(exc, SketchfisherError) else f"{type(exc).__name__}: "
        hint = "" if isinstance(exc, SketchfisherError) else " (run with --debug for the traceback)"
        print(f"sketchfisher: error: {kind}{what}{hint}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (what schedulers send) as an exception, so that it unwinds like Ctrl-C: the store's lock is
    released, background writes finish or leave no partial file."""


def _on_sigterm():
    """Raise :class:`Terminated` on SIGTERM while a command runs; the previous handler (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)
