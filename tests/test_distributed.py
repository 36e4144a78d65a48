"""Data-parallel collection: 2 gloo processes on the CPU give the single-process store."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import sketchfisher as sf

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_two_gloo_ranks_equal_single_process(tmp_path):
    two_ranks_equal_single_process(tmp_path, "gloo")


def two_ranks_equal_single_process(tmp_path, backend: str) -> None:
    """Collect one store in one process and one with 2 ranks (``backend``: gloo on CPU, nccl on 2 GPUs); compare."""
    single = subprocess.run([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "single")],
                            env=_env(SF_BACKEND=backend), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "dist")],
                              env=_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       SF_BACKEND=backend),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = sf.open_store(tmp_path / "single"), sf.open_store(tmp_path / "dist")
    assert b.summary()["samples"] == a.summary()["samples"] == {"a": 9, "b": 7}
    assert a.manifest["tasks"] == b.manifest["tasks"]  # same batches, same sample ids
    # the paper variant with normaliser "a" keeps A's Fisher and Σ|g|, and only Σ|g| of B
    assert a.stats["a"].quantities == b.stats["a"].quantities == ("fisher", "abs")
    assert a.stats["b"].quantities == b.stats["b"].quantities == ("abs",)
    for t in ("a", "b"):
        for name in a.stats[t].names():
            assert b.stats[t].welford[name].count == a.stats[t].welford[name].count
            assert b.stats[t].dtype == a.stats[t].dtype  # fp64 on the CPU, fp32 on GPUs
            rtol = 1e-12 if a.stats[t].dtype == torch.float64 else 1e-5  # the reduction order differs
            if t == "a":
                torch.testing.assert_close(b.stats[t].fisher(name), a.stats[t].fisher(name), rtol=rtol, atol=0)
            torch.testing.assert_close(b.stats[t].mean_abs(name), a.stats[t].mean_abs(name), rtol=rtol, atol=0)
    ra, rb = a.result(), b.result()
    torch.testing.assert_close(rb.scores, ra.scores, rtol=1e-5, atol=1e-6 * float(ra.scores.abs().max()))
    torch.testing.assert_close(rb.stderr, ra.stderr, rtol=1e-4, atol=1e-6 * float(ra.stderr.abs().max()))
