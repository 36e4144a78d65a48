"""Ready losses and batchers for HF models, and reading task files (the CLI's and the demo's inputs).

* :mod:`.files`: a task's samples from text lines, records or dataset folders (:func:`read_task`);
* :mod:`.batches`: masked LMs, :func:`make_batches` (deterministic, text-seeded 15% masking) and
  :func:`masked_token_loss` (masked tokens decoded with the tied input embeddings); causal LMs,
  :func:`clm_batches` and :func:`clm_loss` (next-token cross-entropy on real tokens); :func:`from_texts`;
* :mod:`.models`: a local HF model and its tokenizer (:func:`load_hf`) and the checks its folder allows.

Every batch builder and loss is correct under either padding side (a tokenizer's ``padding_side``; the Llama
family's default is left): targets sit on real tokens only, a prediction is counted only from a real token,
and a left-padded batch gets position ids counted from each sample's first real token
(:func:`model_inputs`), so each sample's loss is that of the sample run alone.
"""

from .batches import (clm_batches, clm_loss, from_texts, loss_for, make_batches, masked_token_loss, model_inputs,
                      task_batches, to_device)
from .files import RECORD_SUFFIXES, TASK_SUFFIXES, TEXT_SUFFIXES, Sample, file_sha256, read_task
from .models import (LOSSES, MODEL_DTYPES, TOKENIZER_FILES, check_device, check_max_length, check_model_dir,
                     infer_loss, input_device, load_adapter, load_hf)

__all__ = ["LOSSES", "MODEL_DTYPES", "RECORD_SUFFIXES", "Sample", "TASK_SUFFIXES", "TEXT_SUFFIXES", "TOKENIZER_FILES",
           "check_device", "check_max_length", "check_model_dir", "clm_batches", "clm_loss", "file_sha256",
           "from_texts", "infer_loss", "input_device", "load_adapter", "load_hf", "loss_for", "make_batches", "masked_token_loss",
           "model_inputs", "read_task", "task_batches", "to_device"]
