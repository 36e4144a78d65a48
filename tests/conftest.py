"""Test configuration: hypothesis runs derandomized, so every run checks the same examples; caches go to a
temporary folder.

Without a CUDA device, Triton kernels run in Triton's interpreter (``tests/test_kernels.py``); the
switch is read when triton is first imported, so it is set here, before anything imports it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("SKETCHFISHER_CACHE", tempfile.mkdtemp(prefix="sketchfisher-cache-"))  # not the user's cache
# One torch thread per process (subprocesses inherit it): on a busy 2-core machine two spinning OpenMP threads
# per test made the suite several times slower than one (docs/benchmarks.md); unloaded it costs little.
os.environ.setdefault("OMP_NUM_THREADS", "1")

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile("sketchfisher", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("sketchfisher")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT saved with MiniLM's tokenizer: a local HF model directory for the CLI."""
    import transformers as hf
    from sketchfisher.demo import load_minilm

    _, tok = load_minilm()
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    hf.BertModel(hf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=48)).save_pretrained(d)
    tok.save_pretrained(d)
    return d
