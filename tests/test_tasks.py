"""The ready batch builders and losses of ``sf.tasks``: each sample's loss and gradient in a padded batch are
those of the sample run alone, whichever side the tokenizer pads on."""

import pytest
import torch
import transformers as hf
from tokenizers import Tokenizer, models, pre_tokenizers

import sketchfisher as sf

WORDS = [f"w{i}" for i in range(40)]
TEXTS = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9 w10", "w11 w12 w13 w14 w15", "w16 w17 w18 w19 w20 w21 w22 w23 w24 w25"]


def tokenizer(side: str, mask: bool = False) -> hf.PreTrainedTokenizerFast:
    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"} if mask else {"eos_token": "[SEP]"}
    fast = hf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **extra)
    fast.padding_side = side
    return fast


def causal_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    n = len(WORDS) + 5
    if arch == "gpt2":  # absolute positions: left padding would shift them
        config = hf.GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return hf.GPT2LMHeadModel(config).eval()
    config = hf.LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return hf.LlamaForCausalLM(config).eval()


def per_sample(model, loss_fn, batches):
    """Each sample's loss and its gradient with respect to every parameter (flattened)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for batch in batches:
        losses = loss_fn(model, batch)
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
            out.append((losses[i].detach(), flat))
    return out


def assert_alone(model, loss_fn, batched, alone):
    for (lb, gb), (la, ga) in zip(per_sample(model, loss_fn, batched), per_sample(model, loss_fn, alone)):
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_clm_batches_give_each_sample_its_own_loss(arch, side):
    model = causal_model(arch)
    batched = sf.tasks.from_texts(TEXTS, tokenizer(side), loss="clm", batch_size=4)
    alone = sf.tasks.from_texts(TEXTS, tokenizer(side), loss="clm", batch_size=1)
    assert (batched[0]["attention_mask"][:, 0 if side == "left" else -1] == 0).any(), "the batch is not padded"
    assert_alone(model, sf.tasks.clm_loss, batched, alone)


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_completion_pairs_under_either_padding(side):
    model = causal_model("gpt2")
    pairs = [("w1 w2", " w3 w4"), ("w5 w6 w7 w8 w9", " w10"), ("w11", " w12 w13 w14 w15 w16")]
    batched = sf.tasks.from_texts(pairs, tokenizer(side), loss="clm", batch_size=3)
    alone = sf.tasks.from_texts(pairs, tokenizer(side), loss="clm", batch_size=1)
    assert_alone(model, sf.tasks.clm_loss, batched, alone)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlm_batches_put_targets_on_real_tokens(side):
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = hf.BertModel(config, add_pooling_layer=False).eval()
    batched = sf.tasks.from_texts(TEXTS, tokenizer(side, mask=True), loss="mlm", batch_size=4)
    alone = sf.tasks.from_texts(TEXTS, tokenizer(side, mask=True), loss="mlm", batch_size=1)
    for b in batched:
        targets = b["labels"] != -100
        assert bool((b["attention_mask"][targets] == 1).all()), "a target sits on a pad position"
    # the same tokens are masked as when the sample is alone (masking is seeded by the text)
    masked = [set(b["input_ids"][i][b["labels"][i] != -100].tolist()) for b in batched for i in range(len(b["labels"]))]
    assert masked == [set(b["input_ids"][0][b["labels"][0] != -100].tolist()) for b in alone]
    assert_alone(model, sf.tasks.masked_token_loss, batched, alone)
