"""Fisher accumulators: Welford merge, EMA bias correction, group views, pass-1 statistics from factors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sketchfisher as sf
from sketchfisher.capture import FactorCapture, per_sample_gradients
from sketchfisher.collect import collect
from sketchfisher.fisher import EMAFisher, FisherStats, Welford, channel_view, head_view, param_view
from tiny_models import generic_loss, make_batches, make_model


def test_welford_shards_merge_to_one_pass():
    x = torch.randn(37, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
    one = Welford()
    one.update(x)
    shards = [Welford() for _ in range(3)]
    for w, part in zip(shards, (x[:1], x[1:20], x[20:])):
        for chunk in part.split(4):
            w.update(chunk)
    merged = shards[0].merged(shards[1]).merged(shards[2])
    assert merged.count == one.count == 37
    torch.testing.assert_close(merged.mean, x.mean(0))
    torch.testing.assert_close(merged.m2, one.m2)
    torch.testing.assert_close(merged.variance(), x.var(0, unbiased=True))



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 1 << 19])
def test_stats_update_in_slices_equals_whole_batch_formulas(monkeypatch, dtype, chunk):
    """The CPU update takes a batch a slice of entries at a time (here several slices and a short last one,
    or the whole batch in one); every statistic equals its formula over all samples at once."""
    import sketchfisher.fisher.welford as welford

    monkeypatch.setattr(welford, "CHUNK_ENTRIES", chunk)
    g = torch.randn(11, 100, 90, generator=torch.Generator().manual_seed(1))
    stats = FisherStats(dtype=dtype)
    for part in g.split([3, 1, 7]):
        stats.update({"w": part})
    x = g.double()
    want = {"mean": x.square().mean(0), "m2": (x.square() - x.square().mean(0)).square().sum(0),
            "sum_abs": x.abs().sum(0), "sum_g": x.sum(0)}
    got = {"mean": stats.welford["w"].mean, "m2": stats.welford["w"].m2, "sum_abs": stats.sum_abs["w"],
           "sum_g": stats.sum_g["w"]}
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for key, value in got.items():
        assert value.dtype == dtype and stats.count == 11
        torch.testing.assert_close(value.double(), want[key], rtol=tol, atol=tol * float(want[key].abs().max()))

def test_kernel_updates_of_the_same_state_skip_its_checks_and_see_a_replaced_tensor(monkeypatch):
    """Where the Triton update takes a parameter's batches, a later update of the same state tensors launches it
    straight away (no re-check); a state tensor replaced in between (moved, rounded, read back) is checked and
    used. The kernel is stood in for by the in-place torch update it is tested against on a GPU."""
    from sketchfisher import kernels
    from sketchfisher.fisher.welford import update_in_chunks

    def kernel(g, mean, m2, sum_abs, sum_g, count, sum_half=None, dtype=None):
        update_in_chunks(g, count, dtype, *(None if t is None else t.view(-1) for t in (mean, m2, sum_abs, sum_g,
                                                                                          sum_half)))

    monkeypatch.setattr(kernels, "welford_update", kernel)
    monkeypatch.setattr(FisherStats, "_kernel_applies", lambda self, g, kept: True)
    checked = []
    monkeypatch.setattr(FisherStats, "_state", lambda self, name, g, inner=FisherStats._state: (
        checked.append(name), inner(self, name, g))[1])
    g = torch.randn(9, 6, 5, generator=torch.Generator().manual_seed(3))
    fast, plain = FisherStats(dtype=torch.float64), FisherStats(dtype=torch.float64)
    parts = g.split([2, 3, 1, 3])
    for i, part in enumerate(parts):
        fast.update({"w": part})
        if i == 1:  # another tensor in place of Σg: the next update must fold into it
            fast.sum_g["w"] = fast.sum_g["w"].clone()
    assert checked == ["w", "w"]  # the first update and the one after the replacement
    with monkeypatch.context() as m:
        m.setattr(FisherStats, "_kernel_applies", lambda self, g, kept: False)
        for part in parts:
            plain.update({"w": part})
    for got, want in ((fast.welford["w"].mean, plain.welford["w"].mean), (fast.welford["w"].m2, plain.welford["w"].m2),
                      (fast.sum_abs["w"], plain.sum_abs["w"]), (fast.sum_g["w"], plain.sum_g["w"])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fast.count == plain.count == 9
    import gc
    import weakref

    held = weakref.ref(fast.sum_abs["w"])  # statistics released (moved to the host) must not stay alive
    del fast.sum_abs["w"]
    gc.collect()
    assert held() is None


def test_recordable_welford_launches_read_the_count_from_the_statistics_tensor(monkeypatch):
    """The Welford update as a recorded launch reads (``FisherStats.update(replays=...)``): the state tensors passed
    as inputs in their order, the count and its rounding keys from the statistics' counts tensor, rewritten where the
    count changes. Run through Triton's interpreter with a stand-in for the recordings that calls each launch once;
    bitwise the by-value update, the bf16 sums' random bits and the half sum included."""
    pytest.importorskip("triton", reason="the Welford kernel runs through Triton's interpreter "
                        "(SKETCHFISHER_KERNEL_TESTS=1 bash scripts/test.sh installs it)")

    class Direct:  # (calls the launch as a replay would run it: the same inputs, the same order)
        active, calls = True, 0

        keys: set = set()

        def __call__(self, key, fn, *inputs):
            self.calls += 1
            self.keys.add(key)
            return fn(*inputs)

    monkeypatch.setattr(FisherStats, "_kernel_applies", lambda self, g, kept: True)
    quantities = ("fisher", "abs", "sum", "half")
    recorded, by_value = (FisherStats.accumulating(torch.float32, quantities) for _ in range(2))
    replays = Direct()
    for step, n in enumerate((2, 3, 2, 1)):
        g = torch.randn(n, 40, 3, generator=torch.Generator().manual_seed(step))
        recorded.update({"w": g, "v": g[:, :5]}, replays=replays)
        by_value.update({"w": g, "v": g[:, :5]})
    assert replays.calls == 8 and recorded._counts[torch.device("cpu")][1] == 7  # (before the last batch)
    assert len(replays.keys) == 2  # (one recording per parameter: a key is kept to a few recordings)
    for name in ("w", "v"):
        assert torch.equal(recorded.welford[name].mean, by_value.welford[name].mean)
        for (q, acc), (_, other) in zip(recorded.sums(), by_value.sums()):
            assert acc[name].dtype == torch.bfloat16 and torch.equal(acc[name], other[name]), q


def test_ema_constant_stream_returns_constant_every_step():
    ema = EMAFisher(beta=0.9)
    g = torch.full((1, 2, 3), 3.0)  # C = 9
    for step in range(1, 6):
        ema.update({"w": g})
        torch.testing.assert_close(ema.value("w"), torch.full((2, 3), 9.0, dtype=torch.float64))
        assert ema.steps == step
    with pytest.raises(sf.InputError, match=r"beta must be in \[0, 1\)"):
        EMAFisher(beta=1.0)


def test_ema_matches_recursion():
    cs = torch.rand(6, 4, dtype=torch.float64)
    ema = EMAFisher(beta=0.7)
    ema.update({"w": cs.sqrt()[:2]})
    ema.update({"w": cs.sqrt()[2:]})
    f = torch.zeros(4, dtype=torch.float64)
    for c in cs:
        f = 0.7 * f + 0.3 * c
    torch.testing.assert_close(ema.value("w"), f / (1 - 0.7 ** 6))


@pytest.fixture(scope="module")
def gpt2_stats():
    model = make_model("gpt2")
    layout = sf.layout_for(model)
    batches = make_batches(7, 3, seed=9)
    _, stats = collect(model, generic_loss, batches, layout, sf.Factors(), modules="all")
    oracle = {}
    names = stats.names()
    for part in per_sample_gradients(model, generic_loss, batches, names):
        for n, g in part.items():
            oracle.setdefault(n, []).append(g.double())
    return model, layout, stats, {n: torch.cat(v) for n, v in oracle.items()}


def test_pass1_statistics_from_factors_equal_oracle(gpt2_stats):
    model, layout, stats, oracle = gpt2_stats
    assert any(".mlp." in n for n in stats.names())  # modules="all" covers MLP weights
    assert stats.count == 7
    for n, g in oracle.items():
        scale = float(g.square().mean(0).abs().max())
        torch.testing.assert_close(stats.fisher(n), g.square().mean(0), rtol=1e-5, atol=1e-7 * scale)
        torch.testing.assert_close(stats.mean_abs(n), g.abs().mean(0), rtol=1e-5, atol=1e-7 * float(g.abs().max()))
        w = stats.welford[n]
        torch.testing.assert_close(w.variance(), g.square().var(0), rtol=1e-4, atol=1e-7 * scale ** 2)


def test_group_views_sum_the_right_entries(gpt2_stats):
    model, layout, stats, oracle = gpt2_stats
    heads = head_view(layout, stats.fisher)
    fisher = {n: g.square().mean(0) for n, g in oracle.items()}
    c_attn = fisher["h.1.attn.c_attn.weight"]  # Conv1D [in, out]: head h's Q = columns h*8:(h+1)*8
    torch.testing.assert_close(heads[1, 2, 0], c_attn[:, 16:24].sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(heads[1, 2, 2], c_attn[:, 64 + 16:64 + 24].sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(heads[1, 3, 3], fisher["h.1.attn.c_proj.weight"][24:32].sum(), rtol=1e-5, atol=0)
    # all four blocks together cover the two attention weights exactly once
    total = fisher["h.1.attn.c_attn.weight"].sum() + fisher["h.1.attn.c_proj.weight"].sum()
    torch.testing.assert_close(heads[1].sum(), total, rtol=1e-5, atol=0)
    w = torch.arange(12.0).reshape(3, 4)
    assert channel_view(w).tolist() == [6.0, 22.0, 38.0]
    assert channel_view(w.T, transposed=True).tolist() == [6.0, 22.0, 38.0]
    assert float(param_view(w)) == 66.0


def test_fisher_stats_merge_equals_joint():
    model = make_model("bert")
    layout = sf.layout_for(model)
    b1, b2 = make_batches(3, 3, seed=1), make_batches(4, 2, seed=2)
    _, s1 = collect(model, generic_loss, b1, layout, sf.Factors())
    _, s2 = collect(model, generic_loss, b2, layout, sf.Factors())
    _, s12 = collect(model, generic_loss, b1 + b2, layout, sf.Factors())
    merged = s1.merge(s2)
    for n in s12.names():
        torch.testing.assert_close(merged.fisher(n), s12.fisher(n))
        torch.testing.assert_close(merged.welford[n].m2, s12.welford[n].m2)


class MLP(torch.nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d_in, d_hidden), torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 5), d_in=st.integers(1, 6), d_h=st.integers(1, 6),
       d_out=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_factor_capture_property_any_shape(B, T, d_in, d_h, d_out, seed):
    torch.manual_seed(seed)
    model = MLP(d_in, d_h, d_out)
    x = torch.randn(B, T, d_in)

    def loss(m, batch):
        return m(batch).square().sum((1, 2))

    want = next(per_sample_gradients(model, loss, [x], ["fc1.weight", "fc2.weight"]))
    with FactorCapture(model, ["fc1", "fc2"]) as cap:
        bf = cap.run(loss, x)
    for m in ("fc1", "fc2"):
        torch.testing.assert_close(bf.grad(m), want[m + ".weight"], rtol=1e-5, atol=1e-6)
    stats = FisherStats()
    stats.update({m: bf.grad(m) for m in ("fc1", "fc2")})
    torch.testing.assert_close(stats.fisher("fc1"), want["fc1.weight"].double().square().mean(0), rtol=1e-5,
                               atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), d_in=st.integers(1, 6), d_out=st.integers(1, 6),
       rank=st.integers(1, 7), seed=st.integers(0, 2 ** 16))
def test_truncation_property_any_shape(B, T, d_in, d_out, rank, seed):
    from sketchfisher.compress import truncate

    g = torch.Generator().manual_seed(seed)
    A, D = torch.randn(B, T, d_in, generator=g), torch.randn(B, T, d_out, generator=g)
    a, d = truncate(A, D, rank)
    full = D.transpose(1, 2).double() @ A.double()
    approx = d.transpose(1, 2).double() @ a.double()
    tail = torch.linalg.svdvals(full)[:, rank:].square().sum(-1).sqrt()
    err = (approx - full).flatten(1).norm(dim=1)
    # factors come back in fp32: allow fp32 rounding relative to the size of g
    torch.testing.assert_close(err, tail, rtol=1e-5, atol=1e-6 * max(1.0, float(full.flatten(1).norm(dim=1).max())))


def test_fp32_statistics_option():
    model = make_model("llama_gqa")
    layout = sf.layout_for(model)
    batches = make_batches(5, 2, seed=3)
    _, s64 = collect(model, generic_loss, batches, layout, sf.Factors())
    _, s32 = collect(model, generic_loss, batches, layout, sf.Factors(), stats_dtype=torch.float32)
    for name in s64.names():
        assert s32.fisher(name).dtype == torch.float32 and s64.fisher(name).dtype == torch.float64
        torch.testing.assert_close(s32.fisher(name).double(), s64.fisher(name), rtol=1e-5, atol=0)
