"""Bad input raises a clear error naming what was expected and found."""

import pytest
import torch

import sketchfisher as sf
from tiny_models import generic_loss, make_batches, make_model


class InfGrad(torch.autograd.Function):
    """Identity whose backward turns any non-zero incoming gradient into inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.where(g != 0, torch.full_like(g, float("inf")), g)


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2")


def test_loss_fn_must_return_per_sample_losses(model):
    batches = make_batches(2, 2)
    with pytest.raises(sf.InputError, match=r"one loss per sample, shape \[B\].*got shape \(\)"):
        sf.analyze(model, lambda m, b: generic_loss(m, b).mean(), batches, batches)
    with pytest.raises(sf.InputError, match=r"got shape \([12], 1\)"):  # the Exact codec runs samples alone
        sf.analyze(model, lambda m, b: generic_loss(m, b)[:, None], batches, batches)
    with pytest.raises(sf.InputError, match="must return a torch.Tensor"):
        sf.analyze(model, lambda m, b: 1.0, batches, batches)


def test_nan_loss_and_gradients_are_reported(model):
    batches = make_batches(3, 3)
    second, third = batches[0]["input_ids"][1], batches[0]["input_ids"][2]
    is_row = lambda b, row: torch.tensor([torch.equal(r, row) for r in b["input_ids"]])  # noqa: E731 (works alone too)

    def nan_loss(m, b):  # per sample: the second sample's loss is NaN, in a batch or alone
        loss = generic_loss(m, b)
        return torch.where(is_row(b, second), torch.full_like(loss, float("nan")), loss)

    for codec in (sf.Exact(), sf.Factors()):
        with pytest.raises(sf.GradientError, match=r"non-finite losses for batch positions \[[01]\]"):
            sf.analyze(model, nan_loss, batches, batches, codec=codec)

    def inf_grad_loss(m, b):
        loss = generic_loss(m, b)
        w = m.h[0].attn.c_attn.weight
        poison = torch.stack([InfGrad.apply(w.sum() * 0) if bool(is_row(b, third)[i]) else w.sum() * 0
                              for i in range(loss.shape[0])])
        return loss + poison

    with pytest.raises(sf.GradientError, match=r"non-finite gradient for sample 2 .*h.0.attn.c_attn.weight"):
        sf.analyze(model, inf_grad_loss, batches, batches)


def test_bad_options(model):
    batches = make_batches(2, 2)
    with pytest.raises(sf.InputError, match="variant must be one of"):
        sf.analyze(model, generic_loss, batches, batches, variant="fancy")
    with pytest.raises(sf.InputError, match="normalizer must be one of"):
        sf.analyze(model, generic_loss, batches, batches, normalizer="b")
    with pytest.raises(sf.InputError, match="eps must be a finite number"):
        sf.analyze(model, generic_loss, batches, batches, eps=-1.0)
    with pytest.raises(sf.InputError, match="codec must be one of"):
        sf.analyze(model, generic_loss, batches, batches, codec="exact")


def test_empty_task(model):
    with pytest.raises(sf.InputError, match="yielded no samples"):
        sf.analyze(model, generic_loss, [], make_batches(2, 2))


def test_unsupported_architecture_in_analyze():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(sf.LayoutError, match="no QK-OV layout"):
        sf.analyze(model, lambda m, b: m(b).sum(-1), [torch.zeros(2, 3)], [torch.zeros(2, 3)])


def test_factor_path_reports_non_finite_gradients(model):
    batches = make_batches(3, 3)

    def inf_hidden(m, b):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        poison = InfGrad.apply(out[2].sum() * 0)  # only sample 2's hidden states get an inf gradient
        loss = generic_loss(m, b)
        return loss + torch.stack([loss[0] * 0, loss[1] * 0, poison])

    with pytest.raises(sf.GradientError, match=r"non-finite factors in .* for batch positions \[2\]"):
        sf.analyze(model, inf_hidden, batches, batches, codec=sf.Factors())


def test_finite_factors_whose_sum_overflows_are_not_refused():
    """Huge finite factors (whose sum overflows) are not bad data: the finiteness screen takes maxima."""
    from sketchfisher.capture import FactorCapture

    lin = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    x = torch.full((2, 3, 4), 3e38)
    x[1, 0, 0] = -3e38
    with FactorCapture(torch.nn.Sequential(lin), ["0"]) as cap:
        got = cap.run(lambda m, b: (m(b) * 1e-38).sum((1, 2)), x)
    assert not torch.isfinite(got.A["0"].sum()) and torch.isfinite(got.A["0"]).all()
    assert torch.allclose(got.D["0"], torch.full((2, 3, 4), 1e-38))


def test_the_finiteness_verdict_is_read_when_settled():
    """``defer_screen=True``: the capture returns a poisoned batch without stopping the host; ``settle()`` raises
    (every time it is called), a finite batch settles silently."""
    from sketchfisher.capture import FactorCapture

    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(3, 5, 4)
    with FactorCapture(torch.nn.Sequential(lin), ["0"]) as cap:
        bf = cap.run(lambda m, b: m(b).sum((1, 2)) + InfGrad.apply(m(b)[1].sum() * 0), x, defer_screen=True)
        for _ in range(2):
            with pytest.raises(sf.GradientError, match=r"non-finite factors in '0' for batch positions \[1\]"):
                bf.settle()
        bf = cap.run(lambda m, b: m(b).sum((1, 2)) * torch.tensor([1.0, float("nan"), 1.0]), x, defer_screen=True)
        with pytest.raises(sf.GradientError, match=r"non-finite losses for batch positions \[1\]"):
            bf.settle()
        cap.run(lambda m, b: m(b).sum((1, 2)), x, defer_screen=True).settle()


def test_a_pass1_checkpoint_holds_finite_batches_only(tmp_path):
    """A pass reads a batch's verdict after its consumer has queued work on it; a store's pass-1 checkpoint is
    written only once the batches it holds are known finite, so a run stopped by a bad batch resumes from clean
    statistics once the data are fixed, and ends where an unbroken run ends."""
    from safetensors import safe_open
    from sketchfisher.store import collect_to_store

    model = make_model("llama_gqa", seed=3)
    ta, tb = make_batches(6, 2, seed=1), make_batches(4, 2, seed=2)
    layout, codec = sf.layout_for(model), sf.Sketch(k=16, seed=0)

    def poisoned(m, b):
        loss = generic_loss(m, b)
        return loss * float("nan") if b["input_ids"] is ta[2]["input_ids"] else loss

    with pytest.raises(sf.GradientError, match=r"pass 1 A, batch 2, sample ids \[4, 5\]: .*non-finite losses"):
        collect_to_store(tmp_path / "s", model, poisoned, ta, tb, layout, codec, sf.ScoreConfig(), checkpoint_every=1)
    with safe_open(tmp_path / "s" / "pass1" / "a.partial.safetensors", "pt") as f:
        assert f.metadata()["batches_done"] == "2"
        assert all(torch.isfinite(f.get_tensor(name)).all() for name in f.keys())
    collect_to_store(tmp_path / "s", model, generic_loss, ta, tb, layout, codec, sf.ScoreConfig(), checkpoint_every=1)
    collect_to_store(tmp_path / "clean", model, generic_loss, ta, tb, layout, codec, sf.ScoreConfig())
    resumed, clean = (sf.open_store(tmp_path / name).result() for name in ("s", "clean"))
    torch.testing.assert_close(resumed.scores, clean.scores, rtol=0, atol=0)


@pytest.mark.parametrize("codec", [sf.Exact(), sf.Factors(), sf.Sketch(k=8, seed=0)])
@pytest.mark.parametrize("extra", [1, -1])
def test_a_loss_per_sample_or_a_clear_error_in_every_codec(model, codec, extra):
    batches = make_batches(4, 3)

    def wrong_length(m, b):
        loss = generic_loss(m, b)
        return torch.cat([loss, loss[:1]]) if extra > 0 else loss[:-1]

    # the Exact codec runs each sample alone (one loss for a batch of 1); the batched codecs see the batch of 3
    with pytest.raises(sf.InputError, match=r"pass 1 A.*(returned \d losses for a batch of [13] samples|got shape \(0,\))"):
        sf.analyze(model, wrong_length, batches, batches, codec=codec)


def test_factor_errors_name_the_task_batch_and_sample_ids(model):
    batches = make_batches(6, 3)  # two batches of 3: the poisoned sample of batch 1 is sample id 5

    def inf_in_second_batch(m, b):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        loss = generic_loss(m, b)
        if b["input_ids"] is batches[1]["input_ids"]:
            return loss + torch.stack([loss[0] * 0, loss[1] * 0, InfGrad.apply(out[2].sum() * 0)])
        return loss

    with pytest.raises(sf.GradientError, match=r"pass 1 B, batch 1, sample ids \[5\]: non-finite factors"):
        sf.analyze(model, inf_in_second_batch, make_batches(3, 3), batches,
                   codec=sf.Factors())


def test_huge_but_finite_gradients_give_finite_sketches_or_a_reason():
    """A sample whose gradients are 1e17 times the others: fp16 sketches stay finite (per-vector scale);
    gradients whose squares overflow float32 are refused with the reason in every codec, not NaN scores."""
    model = make_model("llama_gqa")
    ta, tb = make_batches(6, 3, seed=1), make_batches(5, 5, seed=2)

    def scaled(factor):
        def loss(m, b):
            out = generic_loss(m, b)
            if b["input_ids"] is ta[0]["input_ids"]:
                out = out * torch.tensor([1.0, factor, 1.0])
            return out
        return loss

    for codec in (sf.Sketch(k=16, seed=0), sf.Sketch(k=16, seed=0, variance_reduction=False)):
        res = sf.analyze(model, scaled(1e17), ta, tb, codec=codec)
        assert torch.isfinite(res.scores).all() and torch.isfinite(res.stderr).all()
    for codec in (sf.Factors(), sf.Sketch(k=16, seed=0)):
        with pytest.raises(sf.GradientError, match="overflow float32.*float64"):
            sf.analyze(model, scaled(1e21), ta, tb, codec=codec, stats_dtype=torch.float32).scores


def test_fp16_sketches_without_variance_reduction_stay_finite_on_minilm():
    """Without centering, x = g/(Î+ε) exceeds fp16's 65504 where Î is tiny; the per-vector scale keeps it."""
    from sketchfisher.demo import load_minilm, load_task
    from sketchfisher.tasks import make_batches as mlm_batches, masked_token_loss

    model, tok = load_minilm()
    ta, tb = mlm_batches(load_task("math", 8), tok), mlm_batches(load_task("code", 8), tok)
    for variant in ("signed", "symmetric"):
        res = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Sketch(k=64, variance_reduction=False),
                         variant=variant)
        assert torch.isfinite(res.scores).all(), variant


def test_non_finite_sides_are_caught_one_batch_late_and_never_written(tmp_path):
    """The pass-2 finiteness check reads a batch's verdict after the next batch is queued (no device stop
    per batch); the flagged batch's error names it, and a store's writer refuses a non-finite shard."""
    from sketchfisher.collect.finite import LaggedFiniteCheck
    from sketchfisher.store.shards import ShardParts, write_shard as _write_shard

    cfg = sf.ScoreConfig()
    good = {(0, "Q"): (torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3))}
    bad = {(0, "Q"): (torch.ones(2, 3, 4), torch.ones(2, 3), torch.tensor([[1.0, 1, 1], [1, float("inf"), 1]]),
                      torch.zeros(2, 3))}  # (sketches, ‖ṽ‖², cross, γ)
    check = LaggedFiniteCheck("pass 2 a", cfg)
    check.submit(0, good)
    check.submit(1, bad)  # not read yet
    with pytest.raises(sf.GradientError, match=r"pass 2 a, batch 1: .*batch positions \[1\] overflow float32"):
        check.submit(2, good)
    huge = {(0, "Q"): (torch.full((2, 3, 4), 3e38), torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3))}  # finite, norm overflows
    check = LaggedFiniteCheck("pass 2 a", cfg)
    check.submit(0, huge)
    check.finish()  # cleared by the precise check
    parts = ShardParts.of(bad, sf.Sketch(k=4, dtype="fp32"))
    with pytest.raises(sf.GradientError, match=r"pass 2 b, batch 7: .*positions \[1\]"):
        _write_shard(parts, tmp_path / "shard.safetensors", "id", "b", 7, 2)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("max_bytes", [0, -5, 1.5, True])
def test_a_memory_or_disk_bound_must_be_positive(max_bytes, tmp_path):
    from sketchfisher.store import collect_to_store
    model = make_model("llama_gqa")
    ta, tb = make_batches(4, 2, seed=1), make_batches(4, 2, seed=2)
    with pytest.raises(sf.InputError, match="max_bytes .* positive"):
        sf.analyze(model, generic_loss, ta, tb, max_bytes=max_bytes)
    with pytest.raises(sf.InputError, match="max_bytes .* positive"):
        collect_to_store(tmp_path / "s", model, generic_loss, ta, tb, sf.layout_for(model), sf.Sketch(k=8),
                         sf.ScoreConfig(), max_bytes=max_bytes)


def test_a_pass_reads_each_verdict_after_its_consumer_and_before_the_next_batch(model, monkeypatch):
    """The host does not wait for the device after each backward pass: ``factor_pass`` reads batch i's finiteness
    verdict once its consumer hands the batch back (its work on the device queued), before batch i + 1 runs."""
    from sketchfisher.capture import hooks
    from sketchfisher.collect import factor_pass, trainable_weights

    log = []
    settle, run = hooks.Screen.settle, hooks.FactorCapture.run
    monkeypatch.setattr(hooks.Screen, "settle", lambda self: (log.append("settle"), settle(self))[1])
    monkeypatch.setattr(hooks.FactorCapture, "run", lambda self, *a, **k: (log.append("run"), run(self, *a, **k))[1])
    weights = trainable_weights(model, sf.layout_for(model))
    for index, _ in factor_pass(model, generic_loss, make_batches(6, 2), weights):
        log.append(f"consumer {index}")
    assert log == [step for i in range(3) for step in ("run", f"consumer {i}", "settle")]


def test_the_recorded_launches_setting_is_read_or_refused():
    """``SKETCHFISHER_GRAPHS`` names which launches are recorded as CUDA graphs; anything else is refused by name."""
    from sketchfisher.kernels import graphs

    assert graphs.recorded_kinds("statistics") == {"statistics"}
    assert graphs.recorded_kinds("0") == graphs.recorded_kinds("off") == set()
    assert graphs.recorded_kinds("layers") == {"statistics", "layers"}
    assert graphs.recorded_kinds("1") == graphs.recorded_kinds("all") == {"statistics", "layers"}
    with pytest.raises(ValueError, match="SKETCHFISHER_GRAPHS must be one of"):
        graphs.recorded_kinds("yes")
    with pytest.raises(ValueError, match="kind is one of"):
        graphs.Replays("everything")
