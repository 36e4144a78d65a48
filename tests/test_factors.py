"""Stage 1 factors: batched hooks against the per-sample autograd oracle; invariances; truncation."""

import pytest
import torch

import sketchfisher as sf
from sketchfisher.capture import FactorCapture, linear_modules, per_sample_gradients
from sketchfisher.compress import FactorContributions, truncate
from tiny_models import ARCHS, generic_loss, make_batches, make_model, make_samples, pad_batch, positional_loss

RTOL, ATOL = 1e-5, 1e-6


def factor_grads(model, loss_fn, batches, modules):
    """{module: Tensor[n, *weight.shape]} of per-sample gradients from captured factors."""
    out = {m: [] for m in modules}
    with FactorCapture(model, modules) as cap:
        for batch in batches:
            bf = cap.run(loss_fn, batch)
            for m in modules:
                out[m].append(bf.grad(m))
    return {m: torch.cat(v) for m, v in out.items()}


def oracle_grads(model, loss_fn, batches, modules):
    names = [m + ".weight" for m in modules]
    parts = list(per_sample_gradients(model, loss_fn, batches, names))
    return {m: torch.cat([p[m + ".weight"] for p in parts]) for m in modules}


SHARED_CALLS = {"deberta_v2"}  # query_proj/key_proj also project the relative-position embeddings


def assert_grads_close(got, want, rtol=RTOL):
    for m in want:
        scale = want[m].abs().max()
        torch.testing.assert_close(got[m], want[m], rtol=rtol, atol=ATOL * float(scale) + 1e-12, msg=m)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_factors_equal_oracle_for_every_linear(arch):
    model = make_model(arch, wrapper=True)
    # a weight tied to another use (XLM-R's decoder and its embeddings) has a gradient beyond its module's
    # factors; sf.Exact detects that by the batch's sum and redoes it per sample (test_exact.py)
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    modules = [m for m in linear_modules(model) if uses[id(model.get_submodule(m).weight)] == 1]
    batches = make_batches(5, 3, seed=7)
    if arch in SHARED_CALLS:  # a projection also applied to batch-shared inputs: refused, the oracle serves
        with pytest.raises(sf.InputError, match="shared by the whole batch.*sf.Exact"):
            factor_grads(model, generic_loss, batches, modules)
        return
    assert_grads_close(factor_grads(model, generic_loss, batches, modules),
                       oracle_grads(model, generic_loss, batches, modules))


@pytest.fixture(scope="module")
def llama():
    return make_model("llama_gqa")


def _attn_modules(model):
    return [n.rsplit(".", 1)[0] for n in sf.layout_for(model).params]


def test_batch_size_and_composition_invariance(llama):
    modules = _attn_modules(llama)
    samples = make_samples(8, seed=3)
    ref = factor_grads(llama, positional_loss, [pad_batch([s]) for s in samples], modules)
    for bs in (3, 8):
        got = factor_grads(llama, positional_loss, [pad_batch(samples[i:i + bs]) for i in range(0, 8, bs)], modules)
        assert_grads_close(got, ref)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = factor_grads(llama, positional_loss, [pad_batch([samples[i] for i in perm[:5]]),
                                                     pad_batch([samples[i] for i in perm[5:]])], modules)
    assert_grads_close({m: g[torch.argsort(torch.tensor(perm))] for m, g in shuffled.items()}, ref)


@pytest.mark.parametrize("arch", ["llama_gqa", "bert", "gpt2"])
def test_padding_side_and_amount_invariance(arch):
    model = make_model(arch)
    modules = _attn_modules(model)
    samples = make_samples(4, seed=5)
    right = factor_grads(model, positional_loss, [pad_batch(samples, "right")], modules)
    left = factor_grads(model, positional_loss, [pad_batch(samples, "left", extra=3)], modules)
    assert_grads_close(left, right, rtol=1e-4)


def test_stored_factors_drop_padding(llama):
    modules = _attn_modules(llama)
    samples = make_samples(3, seed=2)
    reps = {}
    for side, extra in (("right", 0), ("left", 4)):
        rep = FactorContributions()
        with FactorCapture(llama, modules) as cap:
            bf = cap.run(positional_loss, pad_batch(samples, side, extra))
            rep.append(bf.A, bf.D, bf.lengths)
        reps[side] = rep
    for m in modules:
        for b, s in enumerate(samples):
            assert reps["right"].A[m][b].shape[0] == reps["left"].A[m][b].shape[0] == len(s)
    assert reps["right"].nbytes_per_sample() == reps["left"].nbytes_per_sample()


def test_a_padded_input_shared_by_several_modules_is_masked_once(llama):
    """q, k and v (and gate and up) read one input: with an attention mask their factor A is one masked tensor, not a
    copy per module, and it is the input with its padded rows zeroed; every D is zero on padded rows."""
    modules = sorted(linear_modules(llama))
    batch = pad_batch(make_samples(3, seed=4), "left", 3)
    inputs = {}
    def record(m):
        def hook(mod, args, out):
            inputs.setdefault(m, args[0].detach().clone())
        return hook

    hooks = [llama.get_submodule(m).register_forward_hook(record(m)) for m in modules]
    try:
        with FactorCapture(llama, modules) as cap:
            bf = cap.run(positional_loss, batch)
    finally:
        for h in hooks:
            h.remove()
    keep = batch["attention_mask"][:, :, None].to(bf.A[modules[0]].dtype)
    attn = [m for m in modules if m.startswith("layers.0.self_attn.") and not m.endswith("o_proj")]
    assert len(attn) == 3 and all(bf.A[m] is bf.A[attn[0]] for m in attn)
    for m in modules:
        torch.testing.assert_close(bf.A[m], inputs[m] * keep, rtol=0, atol=0)
        assert bool((bf.D[m][keep[..., 0] == 0] == 0).all()), m
    assert len({id(a) for a in bf.A.values()}) < len(modules)


def test_factors_codec_matches_exact_scores(llama):
    ta, tb = make_batches(5, 2, seed=11), make_batches(4, 4, seed=12)
    for variant, normalizer in (("paper", "a"), ("signed", "pooled"), ("symmetric", "loo")):
        exact = sf.analyze(llama, generic_loss, ta, tb, codec=sf.Exact(), variant=variant, normalizer=normalizer)
        fact = sf.analyze(llama, generic_loss, ta, tb, codec=sf.Factors(), variant=variant, normalizer=normalizer)
        scale = exact.scores.abs().max()
        torch.testing.assert_close(fact.scores, exact.scores, rtol=1e-5, atol=1e-7 * float(scale))


def test_gpt2_factors_codec_matches_exact_scores():
    model = make_model("gpt2")
    ta, tb = make_batches(3, 3, seed=1), make_batches(2, 2, seed=2)
    exact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Exact())
    fact = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors())
    torch.testing.assert_close(fact.scores, exact.scores, rtol=1e-5, atol=1e-7 * float(exact.scores.abs().max()))


def test_capture_leaves_model_untouched(llama):
    modules = _attn_modules(llama)
    weight = llama.get_submodule(modules[0]).weight
    weight.requires_grad_(False)
    llama.train()
    try:
        with FactorCapture(llama, modules) as cap:
            assert weight.requires_grad and not llama.training
            cap.run(generic_loss, make_batches(2, 2)[0])
            with pytest.raises(RuntimeError, match="entered twice"):
                cap.__enter__()
        assert not weight.requires_grad and llama.training
        assert all(p.grad is None for p in llama.parameters())
        assert all(not m._forward_hooks for m in llama.modules())
        with pytest.raises(sf.InputError):
            with FactorCapture(llama, modules) as cap:
                cap.run(lambda m, b: generic_loss(m, b).sum(), make_batches(2, 2)[0])
        assert all(not m._forward_hooks for m in llama.modules()) and llama.training
    finally:
        weight.requires_grad_(True)
        llama.eval()


def test_capture_errors(llama):
    with pytest.raises(sf.InputError, match="not found"):
        FactorCapture(llama, ["nope"])
    with pytest.raises(sf.InputError, match="no 2-D weight"):
        FactorCapture(llama, ["layers.0.input_layernorm"])
    with FactorCapture(llama, ["layers.0.self_attn.q_proj"]) as cap:
        with pytest.raises(sf.InputError, match="were not called"):
            cap.run(lambda m, b: b.sum(-1).float().requires_grad_(), torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    model32 = make_model("llama_gqa")
    model = make_model("llama_gqa").to(dtype)
    modules = _attn_modules(model)
    batches = make_batches(3, 3, seed=4)
    got = factor_grads(model, generic_loss, batches, modules)
    want = factor_grads(model32, generic_loss, batches, modules)
    for m in modules:
        assert got[m].dtype == torch.float32
        rel = (got[m] - want[m]).norm() / want[m].norm()
        assert rel < 0.1, (m, float(rel))
    res = sf.analyze(model, generic_loss, batches, batches, codec=sf.Factors())
    assert res.scores.dtype == torch.float32 and torch.isfinite(res.scores).all()


def _eckart_young_tail(A, D, rank):
    g = D.transpose(-1, -2).double() @ A.double()
    s = torch.linalg.svdvals(g)
    return g, s[..., rank:].square().sum(-1).sqrt()


def test_truncation_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    A, D = torch.randn(4, 12, 10, generator=g), torch.randn(4, 12, 7, generator=g)
    for rank in (1, 3, 6):
        a, d = truncate(A, D, rank)
        assert a.shape == (4, rank, 10) and d.shape == (4, rank, 7)
        full, tail = _eckart_young_tail(A, D, rank)
        err = (d.transpose(-1, -2).double() @ a.double() - full).flatten(1).norm(dim=1)
        torch.testing.assert_close(err, tail, rtol=1e-6, atol=1e-9)
    a, d = truncate(A, D, 12)
    assert a is A and d is D


def test_truncated_factors_codec_close_to_exact(llama):
    ta = make_batches(3, 3, seed=2, min_len=8, max_len=9)
    exact = sf.analyze(llama, generic_loss, ta, ta, codec=sf.Exact())
    lossless = sf.analyze(llama, generic_loss, ta, ta, codec=sf.Factors(rank=9))
    torch.testing.assert_close(lossless.scores, exact.scores, rtol=1e-5, atol=1e-7 * float(exact.scores.abs().max()))
    low = sf.analyze(llama, generic_loss, ta, ta, codec=sf.Factors(rank=2))
    rel = (low.scores - exact.scores).abs().sum() / exact.scores.abs().sum()
    assert 0 < rel < 1
    with pytest.raises(sf.InputError, match="rank must be None or a positive int"):
        sf.Factors(rank=0)
