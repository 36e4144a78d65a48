"""Data-parallel collection: 2 gloo processes on the CPU give the single-process store."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("stats_dtype", ["float64", "float32"])  # the CPU default, and the GPU default
def test_two_gloo_ranks_equal_single_process(tmp_path, stats_dtype):
    two_ranks_equal_single_process(tmp_path, "gloo", stats_dtype)


def test_two_nodes_under_torchrun_equal_single_process(tmp_path):
    """``torchrun --nnodes 2`` (two launchers on this machine, one rank each, meeting at a c10d rendezvous): each
    node's rank has local rank 0 and its own agent; the store they write together is the single process's."""
    single = subprocess.run([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "single")],
                            env=_env(SF_BACKEND="gloo"), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sketchfisher-test",
              "--max-restarts", "0", str(TESTS / "dist_worker.py"), str(tmp_path / "nodes")]
    nodes = [subprocess.Popen(launch, env=_env(SF_BACKEND="gloo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs
    a, b = sf.open_store(tmp_path / "single"), sf.open_store(tmp_path / "nodes")
    assert b.summary()["samples"] == a.summary()["samples"] == {"a": 9, "b": 7}
    assert a.manifest["tasks"] == b.manifest["tasks"]
    for name in a.stats["a"].names():
        torch.testing.assert_close(b.stats["a"].fisher(name), a.stats["a"].fisher(name), rtol=1e-12, atol=0)
    ra, rb = a.result(), b.result()
    torch.testing.assert_close(rb.scores, ra.scores, rtol=1e-5, atol=1e-6 * float(ra.scores.abs().max()))


def test_two_gloo_ranks_of_an_fsdp_model_equal_single_process(tmp_path):
    """The model wrapped with FSDP2 ``fully_shard`` (each block and the root, parameters sharded over the 2
    ranks): the hooks see the unsharded forward and backward, so the store is the unwrapped model's."""
    two_ranks_equal_single_process(tmp_path, "gloo", "float64", fsdp=True)


def test_an_fsdp_model_with_batches_that_do_not_split_evenly_is_refused_not_hung(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "dist")],
                              env=_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       SF_FSDP="uneven"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("every rank needs the same number of batches" in out and "5 batches" in out for out in outs), outs


def two_ranks_equal_single_process(tmp_path, backend: str, stats_dtype: str | None = None,
                                   fsdp: bool = False) -> None:
    """Collect one store in one process and one with 2 ranks (``backend``: gloo on CPU, nccl on 2 GPUs); compare.

    In fp64 the statistics agree to 1e-12 and the scores to 1e-5; in fp32 the reduction order and the bf16
    accumulators' stochastic rounding move the statistics by a few ulp, and each run's scores are then checked
    against the exact scores within its own error bars."""
    extra = {} if stats_dtype is None else {"SF_STATS_DTYPE": stats_dtype}
    extra["SF_FSDP"] = int(fsdp)  # (the single process runs the same, unwrapped model and the same batches)
    single = subprocess.run([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "single")],
                            env=_env(SF_BACKEND=backend, **extra), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "dist")],
                              env=_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       SF_BACKEND=backend, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = sf.open_store(tmp_path / "single"), sf.open_store(tmp_path / "dist")
    assert b.summary()["samples"] == a.summary()["samples"] == ({"a": 8, "b": 6} if fsdp else {"a": 9, "b": 7})
    assert a.manifest["tasks"] == b.manifest["tasks"]  # same batches, same sample ids
    # the paper variant with normaliser "a", task B once, keeps A's Fisher (the balance is a power of it) and only
    # Σ|g| of B; the conflict test adds both tasks' Σg and task A's Σg over half its samples (each process splits
    # its own stream: the halves differ between world sizes, their counts add up to the same)
    assert a.stats["a"].quantities == b.stats["a"].quantities == ("fisher", "sum", "half")
    assert a.stats["b"].quantities == b.stats["b"].quantities == ("abs", "sum")  # (B's Σ|g|: its mean residual)
    assert a.stats["a"].half_count == (4 if fsdp else 5) and 3 <= b.stats["a"].half_count <= 6
    for t in ("a", "b"):
        for name in a.stats[t].names():
            assert b.stats[t].welford[name].count == a.stats[t].welford[name].count
            assert b.stats[t].dtype == a.stats[t].dtype  # fp64 on the CPU, fp32 on GPUs
            rtol = 1e-12 if a.stats[t].dtype == torch.float64 else 1e-5  # the reduction order differs
            if t == "a":
                torch.testing.assert_close(b.stats[t].fisher(name), a.stats[t].fisher(name), rtol=rtol, atol=0)
            # with fp32 statistics Σ|g| accumulates in bf16, rounded stochastically: each rank rounds its own partial
            # sums, the single process its running sum, so the two differ by a few bf16 ulps (2^-8 apart,
            # relatively); each run then uses its own values throughout
            if name not in a.stats[t].sum_abs:  # (statistics not kept)
                continue
            flips = a.stats[t].sum_abs[name].dtype == torch.bfloat16 and a.stats[t].dtype == torch.float32
            torch.testing.assert_close(b.stats[t].mean_abs(name), a.stats[t].mean_abs(name),
                                       rtol=2 ** -5 if flips else rtol, atol=0)
    ra, rb = a.result(), b.result()
    if a.stats["a"].dtype == torch.float64:  # fp64 statistics (the CPU's default) agree to rounding
        allowed = 1e-5 * ra.scores.abs() + 1e-6 * float(ra.scores.abs().max())
        worst = float(((rb.scores - ra.scores).abs() / allowed).max())
        assert worst <= 1, f"scores differ by up to {worst:.2f} x the allowed difference"
        torch.testing.assert_close(rb.stderr, ra.stderr, rtol=1e-4, atol=1e-6 * float(ra.stderr.abs().max()))
        return
    # fp32: Σ|g| accumulated in bf16 and rounded stochastically in each rank's own order differs by a few bf16 ulps
    # between the runs, and so do the balance and centres built from it; the int4 dither is keyed by each stored
    # vector's scale, so a last-bit difference of a vector draws another dither. The two runs are two draws of the
    # estimate: each is judged against the exact scores, within its own error bars
    from tiny_models import generic_loss, make_batches, make_model

    sizes = ((8, 2), (6, 3)) if fsdp else ((9, 2), (7, 3))  # (as dist_worker.py)
    exact = sf.analyze(make_model("gpt2", seed=5), generic_loss, make_batches(*sizes[0], seed=1),
                       make_batches(*sizes[1], seed=2), codec=sf.Factors()).scores
    for res in (ra, rb):
        covered = float(((res.scores.cpu() - exact).abs() <= 1.96 * res.stderr.cpu()).double().mean())
        assert 0.85 <= covered, covered
    # (task B's recentred norms take one sd of a sketched cross term, itself a draw of each run's dither)
    assert abs(float(rb.stderr.median() / ra.stderr.median()) - 1) < 0.1
