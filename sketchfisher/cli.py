"""Command-line interface: ``sketchfisher <command> --help``. Exit codes: 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import SketchfisherError


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    start = time.perf_counter()
    out = run_demo(args.out, samples=args.samples, top=args.top, show_progress=not args.quiet)
    res = out["result"]
    print(f"sketchfisher demo: MiniLM (6 layers x 12 heads), math n={res.n_a} vs code n={res.n_b}, "
          f"exact paper scores, normalizer 'a'")
    print("\nTop (layer, head, block) cells by mean score over all sample pairs:")
    for score, block, layer, head in out["top_cells"]:
        print(f"  layer {layer}  head {head:2d}  {block}  {score:.4g}")
    print("\nTop conflicting sample pairs:")
    print(out["top_pairs"].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nheatmap: {out['heatmap']}\ntable:   {out['csv']}\ntook {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketchfisher", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="exact QK-OV interference of math vs code samples on the offline MiniLM")
    demo.add_argument("--out", default="demo_out", help="output folder for heatmap.png and top_conflicts.csv")
    demo.add_argument("--samples", type=int, default=None, help="samples per task (default: all 48)")
    demo.add_argument("--top", type=int, default=10, help="rows to print")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except SketchfisherError as exc:
        print(f"sketchfisher: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
