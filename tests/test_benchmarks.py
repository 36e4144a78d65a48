"""Every benchmark script runs on a tiny configuration, so a refactor cannot break one silently.

Speed and memory are not asserted here (benchmarks are not tests); only that each script runs to
the end on its smallest setting and prints its table. ``sjlt_tune.py`` times Triton kernels with
CUDA graphs and events, which have no CPU form: it is imported and its ``--help`` run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {
    "aligned_rotation.py": ["--model", "llama", "--layers", "1", "--train-steps", "1", "--samples", "4", "--k", "16",
                            "--aligns", "4"],
    "block_coverage.py": ["--samples", "4", "--seeds", "2", "--first-seed", "1", "--watch", "0:0:Q"],
    "block_errors.py": ["--model", "llama", "--layers", "1", "--train-steps", "1", "--samples", "4", "--k", "16",
                        "--blocks", "0:Q:0:0"],
    "accuracy_vs_memory.py": ["--samples", "4", "--ks", "16", "--kinds", "sjlt", "--dtypes", "fp16", "--centring",
                              "mean,scaled", "--passes", "2,1.5"],
    "code_bits.py": ["--dim", "64", "--maps", "3", "--rho", "0"],
    "conflict_calibration.py": ["--samples", "8", "--draws", "2", "--collections", "1", "--plain"],
    "conflict_cost.py": ["--device", "cpu", "--hidden", "64", "--heads", "4", "--samples", "16", "--blocks", "8",
                         "--repeats", "1"],
    "conflict_finetune.py": ["--samples", "8", "--steps", "2", "--k", "2", "--seeds", "1"],
    "conflict_predicts.py": ["--samples", "4", "--scales", "1e-3", "--blocks", "6"],
    "cpu_e2e.py": ["--samples", "4", "--batch", "2", "--tokens", "8", "--layers", "1", "--repeats", "1",
                   "--exact-samples", "2"],
    "host_transfer.py": ["--device", "cpu", "--layers", "1", "--hidden", "64", "--heads", "4", "--disk", "{tmp}",
                         "--disk-gib", "0.01"],
    "fingerprint_speed.py": ["--device", "cpu", "--layers", "1", "--hidden", "64", "--intermediate", "128"],
    "gpu_collect.py": ["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "4", "--kv", "4", "2",
                       "--intermediate", "64", "--vocab", "50", "--tokens", "6", "--batch", "2", "--steps", "1",
                       "--repeats", "1"],
    "capture_memory.py": ["--hidden", "64", "--heads", "4", "--intermediate", "128", "--layers", "1", "--batch", "2",
                          "--tokens", "16"],
    "gpu_e2e.py": ["--device", "cpu", "--shape", "tiny", "--samples", "3", "--tokens", "6", "--batch", "2", "--k", "8",
                   "--cli", "{tmp}", "--passes", "1.5", "2", "--signed-sums", "bf16", "fp32", "--compare-stats-dtype",
                   "--grads", "fp32", "--conflicts", "on", "off", "--side-loads", "tiled+prefetch"],
    "gpu_profile.py": ["--device", "cpu", "--shape", "tiny", "--layers", "1", "--samples", "4", "--top", "3", "--grads", "fp32"],
    "gradient_rounding.py": ["--samples", "4", "3", "--tokens", "6", "--k", "16"],
    "gpu_stage6.py": ["--device", "cpu", "--samples", "3", "--k", "8", "--exact-samples", "2"],
    "map_spread.py": ["--model", "llama", "--layers", "1", "--train-steps", "1", "--samples", "4", "--k", "16",
                      "--maps", "2"],
    "many_tasks.py": ["--samples", "3", "--k", "16", "--dtype", "fp16"],
    "one_byte_sides.py": ["--model", "llama", "--layers", "1", "--samples", "4", "--seeds", "1", "--k", "16",
                          "--balance", "abs,fisher"],
    "one_pass_b.py": ["--samples", "3", "--ks", "8", "--seeds", "1"],
    "sjlt_ptx.py": ["--stages", "1"],
    "sjlt_rotation.py": ["--device", "cpu"],
    "sjlt_tune.py": ["--help"],
    "sketch_throughput.py": ["--device", "cpu", "--rows", "2", "--size", "4096", "--k", "32", "--repeats", "1"],
    "stage1_cpu.py": ["--samples", "2", "--batch", "2", "--tokens", "6", "--repeats", "1", "--layers", "1"],
    "stage6.py": ["--samples", "3", "--old-samples", "1"],
    "store_disk.py": ["--layers", "1", "--samples", "2", "--units", "heads,all", "--stats-dtypes", "fp32"],
    "store_open.py": ["--shape", "tiny", "--samples", "4", "--k", "8", "--readers", "open,top,means,summary,verify"],
}

NEEDS_TRITON = {"sjlt_ptx.py", "sjlt_rotation.py"}  # (the kernels' source compiled or interpreted: Triton, not a GPU)


def test_every_benchmark_has_a_tiny_configuration():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(TINY)


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run one benchmark script as a user would, quietly, with the repository importable."""
    env = {**os.environ, "SKETCHFISHER_PROGRESS": "0", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(BENCH.parent)}
    return subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True,
                          env=env, timeout=1800)  # (a loaded 2-core machine is slow; a hang still ends)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_on_a_tiny_configuration(script, tmp_path):
    if script in NEEDS_TRITON and importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton (SKETCHFISHER_KERNEL_TESTS=1 bash scripts/test.sh installs it)")
    done = run_script(script, [a.replace("{tmp}", str(tmp_path)) for a in TINY[script]])
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert ("|" in done.stdout) or ("usage" in done.stdout), f"{script} printed no table:\n{done.stdout[-2000:]}"


@pytest.mark.slow
def test_cpu_e2e_compares_allocator_settings_in_child_processes():
    done = run_script("cpu_e2e.py", ["--malloc", "--models", "gpt2", "--samples", "2", "--batch", "2", "--tokens",
                                     "8", "--layers", "1", "--repeats", "1"])
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| gpt2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["defaults", "freed memory kept"], done.stdout


def test_sketch_throughput_times_storage():
    """``--storage``: the int4 dither in both forms and encode/decode with and without the rotation, one row each."""
    done = run_script("sketch_throughput.py", ["--storage", "--vectors", "2", "3", "--k", "16", "--repeats", "1"])
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| int4")]
    assert len(rows) == 6 and sum("rotated" in r for r in rows) == 2, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_accuracy_vs_memory_on_random_causal_lm_shapes(model):
    """``--model gpt2|llama``: the shipped texts through a randomly initialised causal LM, one table row."""
    done = run_script("accuracy_vs_memory.py", ["--model", model, "--layers", "1", "--samples", "4", "--ks", "16",
                                                "--kinds", "sjlt", "--dtypes", "int4", "--vr", "on", "--passes", "1.5"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"random {model}" in done.stdout and sum(line.startswith("| sjlt |") for line in done.stdout.splitlines()) == 1


def test_gpu_profile_timers_count_each_call_and_restore_what_they_wrap():
    """``--timers`` wraps the functions a pass runs per batch, counts their calls and puts them back afterwards."""
    import torch

    from sketchfisher.capture.hooks import BatchFactors, FactorCapture

    sys.path.insert(0, str(BENCH))
    try:
        import gpu_profile
    finally:
        sys.path.remove(str(BENCH))
    before = (FactorCapture.run, BatchFactors.grad)
    factors = BatchFactors(losses=torch.zeros(1), A={"m": torch.ones(1, 2, 3)}, D={"m": torch.ones(1, 2, 4)},
                           lengths=torch.tensor([2]), transposed={"m": False})
    with gpu_profile.timed(["sketchfisher.capture.hooks:FactorCapture.run",
                            "sketchfisher.capture.hooks:BatchFactors.grad"]) as spent:
        assert BatchFactors.grad is not before[1]
        assert factors.grad("m").shape == (1, 4, 3)
    assert spent["BatchFactors.grad"][0] == 1 and spent["FactorCapture.run"][0] == 0
    assert (FactorCapture.run, BatchFactors.grad) == before


def test_aligned_rotation_variance_is_the_sampled_maps_variance():
    """``aligned_rotation.py --check``: the exact variance of a sketched inner product under rotations in multiples
    of A (and A = 1, today's map) agrees with its variance over 20,000 sampled maps."""
    done = run_script("aligned_rotation.py", ["--check"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "within 6%" in done.stdout, done.stdout
