"""Where the device time of ``sf.analyze`` goes: the CUDA kernels of one run under ``torch.profiler``, beside a
plain forward+backward over the same batches, grouped by kernel name.

    python3 benchmarks/gpu_profile.py --shape llama-7b --layers 8 --samples 8 --batch 2 --units all
    python3 benchmarks/gpu_profile.py ... --host      # the host's side instead: where Python spends a run (cProfile)
    python3 benchmarks/gpu_profile.py ... --syncs     # where the host waits for the device, by line
    python3 benchmarks/gpu_profile.py ... --timers    # the host's time per call of the functions each batch runs
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import os
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from torch.profiler import ProfilerActivity, profile

import sketchfisher as sf
from gpu_e2e import SHAPES, build_model, lm_loss, per_sample_gradients, sketch_of  # noqa: E402  (the same model and loss as the e2e benchmark)


def kernel_tables(prof, phases: list[str], top: int, device: str = "cuda") -> dict[str, tuple[float, list[tuple[str, float, int]]]]:
    """Per phase (by the ranges ``PhaseLog`` marks; each phase synchronises the device at its ends, so a kernel
    belongs to the range its start falls in) and for the whole run ("all"): (total device ms, [(kernel name, ms,
    calls)] largest first)."""
    events = prof.events()
    marks = [ev for ev in events if ev.name in phases]  # on CUDA: the ranges on the device's own timeline
    on_device = [ev for ev in marks if ev.device_type == torch.autograd.DeviceType.CUDA]
    ranges = [(ev.name, ev.time_range.start, ev.time_range.end) for ev in (on_device or marks)]
    if phases and not ranges:
        print(f"(no profiler range marks the phases {phases}: kernels are counted for the whole run only)")
    ms, calls = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    for ev in events:
        if ev.name in phases:
            continue
        if (ev.device_type == torch.autograd.DeviceType.CUDA if device == "cuda"
                else ev.name.startswith("aten::") and not (ev.cpu_parent and ev.cpu_parent.name.startswith("aten::"))):  # (on a CPU: top-level operators)
            name = ev.name if len(ev.name) < 90 else ev.name[:87] + "..."
            where = next((p for p, a, b in ranges if a <= ev.time_range.start <= b), "outside phases")
            for key in ("all", where):
                ms[key][name] += (ev.device_time_total if device == "cuda" else ev.cpu_time_total) / 1e3
                calls[key][name] += 1
    return {key: (sum(t.values()), sorted(((n, v, calls[key][n]) for n, v in t.items()), key=lambda r: -r[1])[:top])
            for key, t in ms.items()}


def host_profile(run, top: int) -> None:
    """Where the host's time goes in one run: cProfile's functions by own time and by cumulative time. A
    function that waits for the device (a copy to the host, a synchronisation) shows the device's time as its own."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(top)
        print(f"\n## host time by {order}\n" + out.getvalue().split("\n\n", 2)[-1])


def sync_sites(run, top: int) -> None:
    """Every operation of one run that makes the host wait for the device (``torch.cuda.set_sync_debug_mode``),
    counted by the innermost line of the package that asked for it. A count that grows with the batches is a
    wait per batch: the host cannot queue the next batch's work while the device finishes this one's."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}sketchfisher{os.sep}" in f.filename]
        where = frames[-1] if frames else None
        sites["(outside the package)" if where is None else
              f"{where.filename.rsplit(os.sep + 'sketchfisher' + os.sep, 1)[-1]}:{where.lineno} {where.name}"] += 1

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"\n## where the host waited for the device: {sum(sites.values())} waits\n| line | waits |\n| --- | --- |")
    for site, n in sites.most_common(top):
        print(f"| {site} | {n} |")


TIMED = ("sketchfisher.capture.hooks:FactorCapture.run", "sketchfisher.capture.hooks:BatchFactors.grad",
         "sketchfisher.capture.hooks:BatchFactors.settle", "sketchfisher.fisher.stats:FisherStats.update",
         "sketchfisher.compress.fused:FusedSides.__call__", "sketchfisher.compress.fused:sketched_centre",
         "sketchfisher.kernels:sketch_heads", "sketchfisher.kernels:welford_update",
         "sketchfisher.collect.finite:LaggedFiniteCheck.submit", "sketchfisher.kernels:Launches.__call__",
         "sketchfisher.collect.layers:LayerWork.run", "sketchfisher.kernels.graphs:Replays.__call__")
"""What ``--timers`` times: ``module:attribute`` (a function, or a class's method)."""


@contextlib.contextmanager
def timed(paths) -> dict:
    """The host's wall time in each of ``paths`` (and in each Triton launch of the package's kernels) while the
    block runs: ``{name: [calls, seconds]}``. A call's time is its own work where the host does not wait for
    the device, which is what a pass with no synchronisation per batch gives (``--syncs`` checks)."""
    spent: dict = {}
    undo = []

    def wrap(owner, attr, name):
        inner = getattr(owner, attr)
        spent[name] = [0, 0.0]

        def timed_call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name][0] += 1
                spent[name][1] += time.perf_counter() - t

        undo.append((owner, attr, vars(owner).get(attr)))  # (None: looked up elsewhere, e.g. a bound method)
        setattr(owner, attr, timed_call)

    for path in paths:
        module, attr = path.split(":")
        owner = importlib.import_module(module)
        *classes, attr = attr.split(".")
        for c in classes:
            owner = getattr(owner, c, None)
        if owner is None or not hasattr(owner, attr):
            print(f"(not timed: {path} is not in this checkout)")
            continue
        wrap(owner, attr, attr if not classes else f"{classes[-1]}.{attr}")
    from sketchfisher import kernels
    if kernels.available():
        for kernel in kernels._kernels():  # a launch, kernel[grid](...), calls the JIT function's run
            wrap(kernel, "run", f"launch {kernel.fn.__name__}")
    try:
        yield spent
    finally:
        for owner, attr, original in reversed(undo):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def host_timers(run, top: int) -> None:
    """The host's time per call and per run of the functions a pass runs for each batch (:data:`TIMED`)."""
    with timed(TIMED) as spent:
        t = time.perf_counter()
        res = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print("phases: " + ", ".join(f"{r['phase']} {r['seconds']:.2f}s" for r in res.phases.rows()))
    print(f"\n## the host's time in each function: {wall:.2f} s of wall time in all\n"
          "| function | calls | ms in all | us per call |\n| --- | --- | --- | --- |")
    for name, (calls, seconds) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name} | {calls} | {seconds * 1e3:.1f} | {seconds * 1e6 / max(calls, 1):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--units", default="all", choices=["heads", "mlp", "all"])
    p.add_argument("--sketch", default="256:int4:scaled", metavar="K:DTYPE[:CENTRING][:rotate]")
    p.add_argument("--passes", type=float, default=1.5, choices=[2, 1.5])
    p.add_argument("--conflicts", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda")
    p.add_argument("--device-map", default="none")
    p.add_argument("--host", action="store_true", help="profile the host's Python (cProfile) instead of the kernels")
    p.add_argument("--syncs", action="store_true", help="count where the host waits for the device, by line")
    p.add_argument("--timers", action="store_true",
                   help="the host's time per call of the functions each batch runs (no profiler's overhead)")
    p.add_argument("--grads", default="bf16", choices=["bf16", "fp32"],
                   help="per-sample gradients for statistics and sketches (gpu_e2e.py --grads)")
    args = p.parse_args()
    if args.syncs and args.device != "cuda":
        p.error("--syncs counts waits for a CUDA device; run it with --device cuda")
    with per_sample_gradients(args.grads):
        profile_run(args)


def profile_run(args) -> None:
    model = build_model(args)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=args.device).manual_seed(0)
    make = lambda: [{"input_ids": torch.randint(0, vocab, (args.batch, args.tokens), device=args.device, generator=gen)}  # noqa
                    for _ in range(-(-args.samples // args.batch))]
    task_a, task_b = make(), make()
    codec = sketch_of(args.sketch)
    flag = {"auto": None, "on": True, "off": False}[args.conflicts]
    run = lambda: sf.analyze(model, lm_loss, task_a, task_b, codec=codec, passes=args.passes, conflicts=flag,  # noqa
                             units=args.units)

    def plain():
        for batch in task_a + task_b:
            model.zero_grad(set_to_none=True)
            lm_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    activity = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])  # (CPU: the ranges)
    plain(), run()  # warm-up: compiled kernels, allocator
    print("unprofiled phases: " + ", ".join(f"{r['phase']} {r['seconds']:.2f}s" for r in run().phases.rows()))
    if args.host:
        host_profile(run, args.top)
        return
    if args.syncs:
        sync_sites(run, args.top)
        return
    if args.timers:
        host_timers(run, args.top)
        sync()
        t = time.perf_counter()
        plain()
        sync()  # (at tiny widths the device keeps up: this is the host's own time for the model)
        print(f"\nplain forward+backward: {(time.perf_counter() - t) / len(task_a + task_b) * 1e3:.1f} ms a batch")
        return
    for label, fn in (("plain forward+backward", plain), (f"sf.analyze(units={args.units!r}, {args.sketch})", run)):
        sync()
        with profile(activities=activity) as prof:
            res = fn()
            sync()
        names = [r["phase"] for r in res.phases.rows()] if res is not None else []
        tables = kernel_tables(prof, names, args.top, args.device)
        print(f"\n## {label}: {tables['all'][0]:.0f} ms of kernels")
        if res is not None:
            print("phases: " + ", ".join(f"{r['phase']} {r['seconds']:.2f}s" for r in res.phases.rows()))
        for key in (["all"] if res is None else names):
            total, rows = tables.get(key, (0.0, []))
            print(f"\n### {key}: {total:.0f} ms of kernels\n| kernel | ms | calls | share |\n| --- | --- | --- | --- |")
            for name, t, c in rows:
                print(f"| {name} | {t:.1f} | {c} | {t / max(total, 1e-9):.1%} |")


if __name__ == "__main__":
    main()
