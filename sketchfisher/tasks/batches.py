"""Batches and per-sample losses for HF models: masked-token and next-token, correct under either padding
side."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch

from ..errors import InputError
from .files import Sample
from .models import LOSSES


def from_texts(texts: Any, tokenizer: Any, loss: str = "clm", batch_size: int = 8, max_length: int = 128,
               text_field: str = "text") -> list[dict]:
    """Batches for :func:`sketchfisher.analyze` from a list of strings or a ``datasets.Dataset``
    (its ``text_field`` column), for ``clm_loss`` (``loss="clm"``) or ``masked_token_loss`` (``"mlm"``).

    >>> batches = from_texts(["a question", "another"], tokenizer, loss="clm")  # doctest: +SKIP
    """
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    if hasattr(texts, "column_names"):  # a datasets.Dataset
        if text_field not in texts.column_names:
            raise InputError(f"the dataset has no column {text_field!r}; its columns: {texts.column_names}")
        texts = list(texts[text_field])
    if isinstance(texts, str) or not all(isinstance(t, str) or (isinstance(t, tuple) and len(t) == 2) for t in texts):
        raise InputError("from_texts takes a list of strings or (prompt, completion) pairs (or a datasets.Dataset "
                         "with a text column)")
    if not texts:
        raise InputError("from_texts got no texts")
    if loss == "clm" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return task_batches(list(texts), tokenizer, loss, batch_size, max_length)


def clm_batches(texts: list[Sample], tokenizer: Any, batch_size: int = 8, max_length: int = 128) -> list[dict]:
    """Padded batches for :func:`clm_loss` (on the tokenizer's padding side). A (prompt, completion) pair is
    tokenized as one text and gets a ``loss_mask`` that keeps only the completion's tokens (by character offsets)."""
    batches = []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo:lo + batch_size]
        pairs = any(isinstance(t, tuple) for t in chunk)
        joined = [t[0] + t[1] if isinstance(t, tuple) else t for t in chunk]
        enc = tokenizer(joined, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        return_offsets_mapping=pairs)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        short = [lo + i for i, n in enumerate(enc["attention_mask"].sum(1).tolist()) if n < 2]
        if short:
            raise InputError(f"samples {short}: fewer than 2 tokens within max_length={max_length}, so there is no "
                             "next token to predict; raise --max-length or drop empty samples")
        if pairs:
            start = torch.tensor([len(t[0]) if isinstance(t, tuple) else 0 for t in chunk])[:, None]
            offsets = enc["offset_mapping"]
            is_pair = torch.tensor([isinstance(t, tuple) for t in chunk])[:, None]
            completion = (offsets[..., 0] >= start) & (offsets[..., 1] > offsets[..., 0])
            # a plain text in the same batch keeps every real token, as without pairs
            batch["loss_mask"] = torch.where(is_pair, completion.long() * enc["attention_mask"], enc["attention_mask"])
            empty = [i for i in range(len(chunk)) if isinstance(chunk[i], tuple) and batch["loss_mask"][i].sum() == 0]
            if empty:
                raise InputError(f"samples {[lo + i for i in empty]}: no completion token is left within "
                                 f"max_length={max_length}; raise --max-length or shorten the prompts")
        batches.append(batch)
    return batches


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The keyword arguments a batch runs the model with: ``input_ids`` and ``attention_mask``, and for a
    left-padded batch ``position_ids`` counted from each sample's first real token, so a sample's positions
    are those it has alone (models with absolute position embeddings, such as GPT-2 and BERT, would otherwise
    shift it by its padding). A model whose forward takes no ``position_ids`` (such as OPT, which counts
    positions from the mask itself) gets none."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = {"input_ids": ids, "attention_mask": mask}
    if bool((mask[:, :1] == 0).any()) and _accepts_position_ids(model):
        kw["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0).to(ids.device)
    return kw


def clm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over real (unpadded) positions, or over the completion's
    tokens when the batch has a ``loss_mask`` (prompt/completion pairs). A prediction counts only when both
    the token it is made from and the token it predicts are real: under left padding the first real token
    is not predicted from the last pad."""
    logits = model(**model_inputs(model, batch)).logits[:, :-1]
    target = batch["input_ids"][:, 1:].to(logits.device)
    keep = batch.get("loss_mask", batch["attention_mask"])
    mask = (keep[:, 1:] * batch["attention_mask"][:, :-1]).to(device=logits.device, dtype=torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).float()  # the vocabulary axis contiguous: a fast softmax
    ce = torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def to_device(batches: list[dict], device: str) -> list[dict]:
    """The batches with every tensor moved to ``device``."""
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _mask_positions(text: str, n_tokens: int, rate: float = 0.15) -> list[int]:
    """Deterministic (text-seeded) choice of content positions 1..n_tokens-2 to mask; at least one."""
    content = list(range(1, n_tokens - 1))
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    order = torch.randperm(len(content), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(rate * len(content)))
    return sorted(content[k] for k in order[:count])


def make_batches(texts: list[str], tokenizer: Any, batch_size: int = 8, max_length: int = 48) -> list[dict]:
    """Padded batches (on the tokenizer's padding side) with masked inputs and per-sample targets on real tokens."""
    batches = []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo:lo + batch_size]
        if tokenizer.mask_token_id is None:
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token, so the masked-token "
                             "loss cannot be formed; a causal LM takes --loss clm / loss='clm'")
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"]
        targets = torch.full_like(ids, -100)
        for b, text in enumerate(chunk):
            real = attn[b].nonzero().flatten().tolist()  # the real tokens, whichever side the padding is on
            positions = [real[p] for p in _mask_positions(text, len(real))]
            if not positions:
                raise InputError(f"sample {lo + b}: nothing to mask within max_length={max_length} (the masked-token "
                                 "loss needs a token between the special tokens); raise --max-length")
            for pos in positions:
                targets[b, pos] = ids[b, pos]
                ids[b, pos] = tokenizer.mask_token_id
        batches.append({"input_ids": ids, "attention_mask": attn, "labels": targets})
    return batches


def masked_token_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample mean cross-entropy of the masked tokens, decoded with the tied word embeddings."""
    hidden = model(**model_inputs(model, batch)).last_hidden_state
    logits = hidden @ model.get_input_embeddings().weight.to(hidden.device).T
    labels = batch["labels"].to(hidden.device)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(1) / (labels != -100).sum(1).clamp_min(1)


def task_batches(texts: list[Sample], tokenizer: Any, loss: str, batch_size: int, max_length: int) -> list[dict]:
    """Batches of a task for ``loss`` ("mlm": masked-token, "clm": next-token)."""
    if loss == "mlm" and any(isinstance(t, tuple) for t in texts):
        raise InputError("prompt/completion pairs are scored with the causal-LM loss (--loss clm / loss='clm')")
    if loss == "mlm":
        return make_batches(texts, tokenizer, batch_size=batch_size, max_length=max_length)
    return clm_batches(texts, tokenizer, batch_size=batch_size, max_length=max_length)


def loss_for(loss: str):
    """The per-sample loss function of ``loss``: :func:`masked_token_loss` for ``"mlm"``, :func:`clm_loss` else."""
    return masked_token_loss if loss == "mlm" else clm_loss
