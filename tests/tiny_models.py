"""Tiny randomly initialised HF models of every covered architecture, and a generic per-sample loss."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as hf

import sketchfisher as sf

VOCAB = 64

# name -> (config class, base class, wrapper class, config kwargs)
ARCHS = {
    "gpt2": (hf.GPT2Config, hf.GPT2Model, hf.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4)),
    "llama_gqa": (hf.LlamaConfig, hf.LlamaModel, hf.LlamaForCausalLM,
                  dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       intermediate_size=48)),
    "mistral_mqa": (hf.MistralConfig, hf.MistralModel, hf.MistralForCausalLM,
                    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         intermediate_size=48)),
    "qwen2_headdim": (hf.Qwen2Config, hf.Qwen2Model, hf.Qwen2ForCausalLM,
                      dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=12, intermediate_size=48)),
    "bert": (hf.BertConfig, hf.BertModel, hf.BertForMaskedLM,
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
    "roberta": (hf.RobertaConfig, hf.RobertaModel, hf.RobertaForMaskedLM,
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     pad_token_id=1, max_position_embeddings=40)),
    "xlm_roberta": (hf.XLMRobertaConfig, hf.XLMRobertaModel, hf.XLMRobertaForMaskedLM,
                    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         pad_token_id=1, max_position_embeddings=40)),
    "mbart": (hf.MBartConfig, hf.MBartModel, hf.MBartForConditionalGeneration,
              dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40, pad_token_id=1)),
    "gpt_neox": (hf.GPTNeoXConfig, hf.GPTNeoXModel, hf.GPTNeoXForCausalLM,
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
    "phi3_fused_gqa": (hf.Phi3Config, hf.Phi3Model, hf.Phi3ForCausalLM,
                       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=48, pad_token_id=0)),
    "qwen3": (hf.Qwen3Config, hf.Qwen3Model, hf.Qwen3ForCausalLM,
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=48)),
    "gemma": (hf.GemmaConfig, hf.GemmaModel, hf.GemmaForCausalLM,
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                   intermediate_size=48, pad_token_id=0)),
    "bloom": (hf.BloomConfig, hf.BloomModel, hf.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4)),
    "opt": (hf.OPTConfig, hf.OPTModel, hf.OPTForCausalLM,
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32)),
    "gptj": (hf.GPTJConfig, hf.GPTJModel, hf.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
    "phi": (hf.PhiConfig, hf.PhiModel, hf.PhiForCausalLM,
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
    "distilbert": (hf.DistilBertConfig, hf.DistilBertModel, hf.DistilBertForMaskedLM,
                   dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48)),
    "electra": (hf.ElectraConfig, hf.ElectraModel, hf.ElectraForMaskedLM,
                dict(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48)),
    "gpt_bigcode_mqa": (hf.GPTBigCodeConfig, hf.GPTBigCodeModel, hf.GPTBigCodeForCausalLM,
                        dict(n_embd=32, n_layer=2, n_head=4, multi_query=True)),
    "albert_shared": (hf.AlbertConfig, hf.AlbertModel, hf.AlbertForMaskedLM,
                      dict(hidden_size=32, embedding_size=16, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=48)),
    "deberta_v2": (hf.DebertaV2Config, hf.DebertaV2Model, hf.DebertaV2ForMaskedLM,
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        relative_attention=True, position_buckets=8, max_relative_positions=16,
                        pos_att_type=["p2c", "c2p"], share_att_key=True)),
    "t5": (hf.T5Config, hf.T5Model, hf.T5ForConditionalGeneration,
           dict(d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)),
    "bart": (hf.BartConfig, hf.BartModel, hf.BartForConditionalGeneration,
             dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40, pad_token_id=1)),
    "modernbert": (hf.ModernBertConfig, hf.ModernBertModel, hf.ModernBertForMaskedLM,
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0,
                        global_attn_every_n_layers=1)),
    "mpt": (hf.MptConfig, hf.MptModel, hf.MptForCausalLM, dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2)),
    "falcon_new_gqa": (hf.FalconConfig, hf.FalconModel, hf.FalconForCausalLM,
                       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
                            new_decoder_architecture=True)),
    "falcon_mqa": (hf.FalconConfig, hf.FalconModel, hf.FalconForCausalLM,
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                        new_decoder_architecture=False)),
    "falcon_mha": (hf.FalconConfig, hf.FalconModel, hf.FalconForCausalLM,
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                        new_decoder_architecture=False)),
}
LLAMA_LIKE = {  # the Llama attention module under other names: (config, base, causal-LM wrapper, extra kwargs)
    "mixtral": (hf.MixtralConfig, hf.MixtralModel, hf.MixtralForCausalLM, dict(num_local_experts=4,
                                                                               num_experts_per_tok=2)),
    "qwen2_moe": (hf.Qwen2MoeConfig, hf.Qwen2MoeModel, hf.Qwen2MoeForCausalLM,
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                       num_experts_per_tok=2)),
    "qwen3_moe": (hf.Qwen3MoeConfig, hf.Qwen3MoeModel, hf.Qwen3MoeForCausalLM,
                  dict(head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "gemma2": (hf.Gemma2Config, hf.Gemma2Model, hf.Gemma2ForCausalLM, dict(head_dim=16, pad_token_id=0)),
    "gemma3_text": (hf.Gemma3TextConfig, hf.Gemma3TextModel, hf.Gemma3ForCausalLM, dict(head_dim=16, pad_token_id=0)),
    "olmo": (hf.OlmoConfig, hf.OlmoModel, hf.OlmoForCausalLM, dict(pad_token_id=0)),
    "olmo2": (hf.Olmo2Config, hf.Olmo2Model, hf.Olmo2ForCausalLM, dict(pad_token_id=0)),
    "granite": (hf.GraniteConfig, hf.GraniteModel, hf.GraniteForCausalLM, dict()),
    "cohere": (hf.CohereConfig, hf.CohereModel, hf.CohereForCausalLM, dict(pad_token_id=0)),
    "starcoder2": (hf.Starcoder2Config, hf.Starcoder2Model, hf.Starcoder2ForCausalLM, dict()),
}
for _name, (_cfg, _base, _wrap, _extra) in LLAMA_LIKE.items():
    ARCHS[_name] = (_cfg, _base, _wrap, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=48, **_extra))


class ToyBertConfig(hf.BertConfig):
    """An architecture the library does not ship, registered below the way a user registers one: every
    parametrised architecture test covers it (``tests/test_extension.py`` runs it through the CLI)."""

    model_type = "toy_bert"


class ToyBertModel(hf.BertModel):
    config_class = ToyBertConfig


class ToyBertForMaskedLM(hf.BertForMaskedLM):
    config_class = ToyBertConfig


sf.register_layout("toy_bert", sf.AttentionSpec(layer="encoder.layer.{layer}.attention", q="self.query",
                                                k="self.key", v="self.value", o="output.dense"), overwrite=True)
hf.AutoConfig.register("toy_bert", ToyBertConfig, exist_ok=True)
hf.AutoModel.register(ToyBertConfig, ToyBertModel, exist_ok=True)
hf.AutoModelForMaskedLM.register(ToyBertConfig, ToyBertForMaskedLM, exist_ok=True)
ARCHS["toy_bert"] = (ToyBertConfig, ToyBertModel, ToyBertForMaskedLM,
                     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))


def make_model(arch: str, wrapper: bool = False, seed: int = 0) -> torch.nn.Module:
    cfg_cls, base_cls, wrap_cls, kw = ARCHS[arch]
    torch.manual_seed(seed)
    config = cfg_cls(vocab_size=VOCAB, **kw)
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(config, key, None) is not None:
            setattr(config, key, 0)
    model = (wrap_cls if wrapper else base_cls)(config)
    return model.float().eval()


def make_samples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 9) -> list[torch.Tensor]:
    """n token sequences of random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(t),), generator=g) for t in lengths]


def pad_batch(samples: list[torch.Tensor], side: str = "right", extra: int = 0) -> dict:
    """Pad sequences (pad id 2, masked out) to the longest plus ``extra``, on the given side."""
    width = max(len(s) for s in samples) + extra
    ids = torch.full((len(samples), width), 2, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, sl], mask[b, sl] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def make_batches(n: int, batch_size: int, seed: int = 0, min_len: int = 4, max_len: int = 9,
                 side: str = "right") -> list[dict]:
    """Padded token batches with varying lengths."""
    samples = make_samples(n, seed, min_len, max_len)
    return [pad_batch(samples[lo:lo + batch_size], side) for lo in range(0, n, batch_size)]


def positional_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``generic_loss`` with position ids from the attention mask, so left padding is harmless."""
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return generic_loss(model, batch, position_ids=pos)


def generic_loss(model: torch.nn.Module, batch: dict, **kw) -> torch.Tensor:
    """A per-sample loss that depends on every head: masked mean over tokens of a fixed quadratic form."""
    if getattr(model.config, "is_encoder_decoder", False):  # the decoder reads the same tokens
        kw = {"decoder_input_ids": batch["input_ids"], "decoder_attention_mask": batch["attention_mask"], **kw}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    h = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    g = torch.Generator().manual_seed(123)
    u = torch.randn(h.shape[-1], generator=g).to(h)
    m = batch["attention_mask"].to(h)  # h's dtype and device (the last layer's card under a device map)
    per_token = (h @ u) ** 2 + (h @ u)
    return (per_token * m).sum(1) / m.sum(1)


def planted(res, factors: torch.Tensor):
    """``res`` (an exact result) with task B's per-sample gradients multiplied by ``factors [nB]``: task B with
    each sample's loss multiplied by its factor (the conflict test's planted draws)."""
    from dataclasses import replace

    from sketchfisher.compress import ExactContributions
    from sketchfisher.interference.context import ExactSource

    ctx = res.context
    grads = {k: [factors.view(-1, *[1] * (v[0].ndim - 1)).to(v[0]) * torch.cat(v)] for k, v in ctx.rep_b.grads.items()}
    return sf.InterferenceResult.from_context(replace(ctx, source=ExactSource(ctx.rep_a, ExactContributions(grads))))


def assert_same_analysis(got, want) -> None:
    """Two ``sf.analyze`` results are the same numbers: both tasks' statistics (counts, half counts, sums, Welford
    means), and every unit family's scores, standard errors and conflict table, bitwise."""
    for task in ("a", "b"):
        mine, theirs = (getattr(r.context, f"stats_{task}") for r in (got, want))
        assert mine.quantities == theirs.quantities and mine.count == theirs.count
        assert mine.half_counts == theirs.half_counts
        for (_, acc), (_, other) in zip(mine.sums(), theirs.sums()):
            assert acc.keys() == other.keys() and all(torch.equal(acc[k], other[k]) for k in acc)
        for name, w in mine.welford.items():
            assert (w.mean is None) == (theirs.welford[name].mean is None)
            assert w.mean is None or torch.equal(w.mean, theirs.welford[name].mean)
    assert got.families == want.families
    for family in want.families:
        r, d = got.units(family), want.units(family)
        assert torch.equal(r.scores, d.scores) and torch.equal(r.stderr, d.stderr)
        assert r.head_conflicts().equals(d.head_conflicts())
