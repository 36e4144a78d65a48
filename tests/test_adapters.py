"""LoRA (PEFT) models: the analysis of their effective weights, W + s·B·A, is the analysis of the merged model's
adapted weights; weights without an adapter are frozen, as in the fine-tune."""

import copy

import pytest
import torch

import sketchfisher as sf
from tiny_models import generic_loss, make_batches, make_model

peft = pytest.importorskip("peft")


def lora(arch: str, targets: list[str], seed: int = 0):
    """A tiny model with LoRA adapters on ``targets``, their B matrices non-zero (a trained adapter)."""
    model = make_model(arch)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return wrapped


def merged_copy(wrapped, targets: list[str]):
    """The merged model (W + s·B·A in place of each adapted weight), trainable exactly where the adapters are."""
    merged = copy.deepcopy(wrapped).merge_and_unload()
    for name, p in merged.named_parameters():
        p.requires_grad_(any(f".{t}." in f".{name}" for t in targets) and name.endswith(".weight"))
    return merged


@pytest.mark.parametrize("arch,targets", [("llama_gqa", ["q_proj", "v_proj"]),
                                          ("llama_gqa", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                          ("gpt2", ["c_attn"])])
@pytest.mark.parametrize("codec", [sf.Factors(), sf.Sketch(k=16, seed=3, dtype="fp32")])
def test_lora_model_scores_are_the_merged_models(arch, targets, codec):
    wrapped = lora(arch, targets)
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    got = sf.analyze(wrapped, generic_loss, ta, tb, codec=codec)
    want = sf.analyze(merged_copy(wrapped, targets), generic_loss, ta, tb, codec=codec)
    assert torch.equal(torch.isnan(got.scores), torch.isnan(want.scores))  # frozen, unadapted blocks: NaN in both
    assert bool(torch.isfinite(got.scores).any())
    scale = float(want.scores.nan_to_num().abs().max())
    # the two models' gradients differ in the last bits (W + s·B·A merged or not); a sketched score's parts cancel,
    # so its fp32 rounding can reach a few 1e-4 of it, always far below its standard error (~0.002 of it here)
    noise = 0.01 * want.stderr.nan_to_num() if codec.two_pass else 0.0
    diff = (got.scores - want.scores).abs().nan_to_num()
    assert bool((diff <= 1e-4 * want.scores.abs().nan_to_num() + 1e-5 * scale + noise).all()), float(diff.max())
    if targets == ["q_proj", "v_proj"]:  # K and O have no adapter: frozen in the fine-tune, not collected
        blocks = list(got.layout.block_names)
        assert bool(torch.isnan(got.scores[..., blocks.index("K")]).all())
        assert bool(torch.isfinite(got.scores[..., blocks.index("Q")]).all())


def test_lora_model_layout_names_the_base_weights_and_leaves_the_model_as_it_was():
    wrapped = lora("llama_gqa", ["q_proj", "v_proj"])
    layout = sf.layout_for(wrapped)
    assert layout.param_of(0, "Q").endswith("q_proj.base_layer.weight")
    assert layout.param_of(0, "K").endswith("k_proj.weight")
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in wrapped.named_parameters()}
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    res = sf.analyze(wrapped, generic_loss, ta, tb, codec=sf.Factors())
    assert res.head_conflicts()["T"].notna().any()
    for n, p in wrapped.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p.detach(), before[n][1]), n
        assert p.grad is None or not p.requires_grad


@pytest.mark.parametrize("arch,targets", [("llama_gqa", ["q_proj", "v_proj", "o_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_adapter_parameters_per_head_equal_autograd(arch, targets):
    """adapters="parameters": Q/K/V heads are rows of lora_B, O heads columns of lora_A. The hooks' scores equal
    those from autograd's per-sample gradients of the LoRA matrices; projections without an adapter stay NaN."""
    wrapped = lora(arch, targets)
    layout = sf.layout_for(wrapped, adapters="parameters")
    q, o = layout.head_blocks(0, "Q")[0], layout.head_blocks(0, "O")[0]
    assert ".lora_B." in q.param_name and q.storage_axis == 0 and q.param_shape[1] == 2  # [out, r]
    assert ".lora_A." in o.param_name and o.storage_axis == 1 and o.param_shape[0] == 2  # [r, in]
    ta, tb = make_batches(4, 2, seed=1), make_batches(3, 3, seed=2)
    got = sf.analyze(wrapped, generic_loss, ta, tb, codec=sf.Factors(), layout=layout)
    want = sf.analyze(wrapped, generic_loss, ta, tb, codec=sf.Exact(), layout=layout)
    scale = float(want.scores.nan_to_num().abs().max())
    assert scale > 0
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6 * scale, equal_nan=True)
    if arch == "llama_gqa":  # no adapter on k_proj: its blocks keep the frozen base weight
        assert bool(torch.isnan(got.scores[..., list(got.layout.block_names).index("K")]).all())
    assert got.head_conflicts()["T"].notna().any()


def test_adapter_parameters_need_an_adapter():
    with pytest.raises(sf.LayoutError, match="adapters must be one of"):
        sf.layout_for(make_model("llama_gqa"), adapters="lora")
    with pytest.raises(sf.LayoutError, match="needs a model with LoRA adapters"):
        sf.layout_for(make_model("llama_gqa"), adapters="parameters")


def test_cli_collects_verifies_and_reports_a_lora_adapter(tiny_bert_dir, tmp_path, capsys):
    """`collect --adapter DIR` analyses the effective weights of the base model with the saved LoRA adapter on
    it; `verify` reads the adapter from the store's record and checks the model (adapter included) is the one."""
    import transformers as hf

    from sketchfisher.cli import main

    base = hf.AutoModel.from_pretrained(tiny_bert_dir)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    wrapped.save_pretrained(tmp_path / "adapter")
    (tmp_path / "a.txt").write_text("\n".join(f"what is {i} plus {i + 1}?" for i in range(4)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(4)))
    common = ["--model", str(tiny_bert_dir), "--adapter", str(tmp_path / "adapter"), "--task-a",
              str(tmp_path / "a.txt"), "--task-b", str(tmp_path / "b.txt"), "--batch-size", "2"]
    assert main(["collect", *common, "--out", str(tmp_path / "store"), "--k", "16", "--quiet"]) == 0
    store = sf.open_store(tmp_path / "store")
    assert store.manifest["inputs"]["adapter"] == str((tmp_path / "adapter").resolve())
    res = store.result()
    blocks = list(res.layout.block_names)
    assert bool(torch.isnan(res.scores[..., blocks.index("K")]).all())  # no adapter on key: frozen
    assert bool(torch.isfinite(res.scores[..., blocks.index("Q")]).all())
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "store"), "--top", "3", "--budget", "10"]) == 0
    with pytest.raises(sf.StoreMismatchError, match="model"):  # the base model alone is another model
        store.check(hf.AutoModel.from_pretrained(tiny_bert_dir))
