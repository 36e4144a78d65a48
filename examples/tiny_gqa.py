"""A tiny Llama-style model with GQA, trained in seconds to minutes on CPU on two competing tasks.

Task A, *copy*:    [A] x1 … xn [SEP] x1 … xn
Task B, *reverse*: [B] x1 … xn [SEP] xn … x1
Both tasks share one model (8 query heads, 2 key/value heads per layer), so they compete for
heads. The loss of a sample is the mean next-token cross-entropy over its answer tokens.

    python examples/tiny_gqa.py --steps 1500 --out examples/.cache/tiny_gqa   # trains and saves
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as hf

A, B, SEP, PAD = 0, 1, 2, 3
DIGITS = 10
FIRST = 4  # token id of digit 0
VOCAB = FIRST + DIGITS
LENGTH = 6


def make_model(seed: int = 0) -> hf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
                            pad_token_id=PAD, bos_token_id=A, eos_token_id=SEP, tie_word_embeddings=False)
    return hf.LlamaForCausalLM(config).float()


def make_task(task: str, n: int, seed: int) -> torch.Tensor:
    """``[n, 2·LENGTH + 2]`` token sequences of one task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, DIGITS, (n, LENGTH), generator=g) + FIRST
    answer = x if task == "copy" else x.flip(1)
    head = torch.full((n, 1), A if task == "copy" else B)
    return torch.cat([head, x, torch.full((n, 1), SEP), answer], dim=1)


def batches(tokens: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": tokens[i:i + batch_size]} for i in range(0, len(tokens), batch_size)]


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample mean cross-entropy of the answer tokens (after SEP)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, LENGTH + 1:-1]
    target = ids[:, LENGTH + 2:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return ce.mean(1)


def accuracy(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model(input_ids=tokens).logits[:, LENGTH + 1:-1].argmax(-1)
    return float((pred == tokens[:, LENGTH + 2:]).all(1).double().mean())


def train(steps: int = 1500, batch_size: int = 64, seed: int = 0, log_every: int = 0) -> hf.LlamaForCausalLM:
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        tokens = torch.cat([make_task("copy", batch_size // 2, 10_000 + step),
                            make_task("reverse", batch_size // 2, 20_000 + step)])
        loss = answer_loss(model, {"input_ids": tokens}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default="examples/.cache/tiny_gqa")
    args = p.parse_args()
    start = time.perf_counter()
    model = train(args.steps, log_every=max(1, args.steps // 10))
    for task in ("copy", "reverse"):
        print(f"{task}: exact-match accuracy {accuracy(model, make_task(task, 500, 99)):.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    print(f"saved to {args.out} after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
