"""Ready losses and batchers for HF models, and reading task files (the CLI's and the demo's inputs).

* masked LMs: :func:`make_batches` (deterministic, text-seeded 15% masking) and
  :func:`masked_token_loss` (masked tokens decoded with the tied input embeddings);
* causal LMs: :func:`clm_batches` and :func:`clm_loss` (next-token cross-entropy on real tokens).

Every batch builder and loss is correct under either padding side (a tokenizer's ``padding_side``; the Llama
family's default is left): targets sit on real tokens only, a prediction is counted only from a real token,
and a left-padded batch gets position ids counted from each sample's first real token
(:func:`model_inputs`), so each sample's loss is that of the sample run alone.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Union

import torch

from .errors import InputError

LOSSES = ("mlm", "clm")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


Sample = Union[str, tuple[str, str]]  # a text, or a (prompt, completion) pair: the loss on the completion only


TEXT_SUFFIXES = (".txt", ".text", "")  # one sample per line
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
TASK_SUFFIXES = (".txt", ".text", *RECORD_SUFFIXES)  # what a folder's files are read as (hidden entries skipped)


def read_task(path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
              completion_field: str = "completion") -> list[Sample]:
    """Samples of a task: a text file (``.txt`` or no suffix: one sample per line), or records with a string
    ``text_field``, or with ``prompt_field`` and ``completion_field`` (a prompt/completion pair: the causal-LM
    loss is taken on the completion's tokens only): ``.jsonl`` (one JSON object per line), ``.json`` (an array
    of objects or of strings), ``.csv``/``.tsv`` (a header row names the fields), ``.parquet`` (pandas/pyarrow),
    ``.arrow`` (the ``datasets`` package). Suffixes are matched in any case; any other suffix is refused by name.
    A directory is a local dataset: one split written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``
    folder is refused: give one split's folder), or a folder of task files read in name order, hidden files
    and folders (``.ipynb_checkpoints``) skipped."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"task file {path} does not exist")
    if path.is_dir():
        return _read_folder(path, text_field, prompt_field, completion_field)
    suffix = path.suffix.lower()
    fields = (text_field, prompt_field, completion_field)
    if suffix == ".parquet":
        return _records(path, _parquet_rows(path), *fields)
    if suffix == ".arrow":
        return _records(path, _dataset_rows(path), *fields)
    if suffix in (".csv", ".tsv"):
        return _records(path, _table_rows(path, "\t" if suffix == ".tsv" else ","), *fields)
    if suffix not in TEXT_SUFFIXES + (".jsonl", ".json"):
        raise InputError(f"task file {path}: unsupported type {path.suffix!r}; give one of "
                         f"{', '.join(TASK_SUFFIXES)} (or a text file without a suffix: one sample per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json task file holds an array of records or strings; found a "
                             f"{type(data).__name__} (one record per line is .jsonl)")
        rows = [(n, {text_field: r} if isinstance(r, str) else r) for n, r in enumerate(data, 1)]
        return _records(path, rows, *fields)
    lines = [line for line in text.splitlines() if line.strip()]
    if suffix != ".jsonl":
        return [line.strip() for line in lines]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append((n, json.loads(line)))
        except ValueError:
            raise InputError(f"{path}:{n}: not valid JSON") from None
    return _records(path, rows, *fields)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_folder(path: Path, text_field: str, prompt_field: str, completion_field: str) -> list[Sample]:
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        raise InputError(f"{path} holds a dataset with splits {splits or '(unreadable)'}; give one split's folder "
                         f"(e.g. {path / (splits[0] if splits else 'train')})")
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():  # Dataset.save_to_disk
        try:
            import datasets
        except ImportError:
            raise InputError(f"{path} was written by datasets' save_to_disk; reading it needs the 'datasets' "
                             "package (pip install datasets)") from None
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise InputError(f"{path} holds splits {sorted(data)}; give one split's folder")
        return _records(path, [(n, row) for n, row in enumerate(data, 1)], text_field, prompt_field, completion_field)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TASK_SUFFIXES
                   and not _hidden(p, path))
    if not files:
        raise InputError(f"{path} is a folder without task files ({', '.join(TASK_SUFFIXES)})")
    return [sample for f in files for sample in read_task(f, text_field, prompt_field, completion_field)]


def _table_rows(path: Path, sep: str) -> list[tuple[int, Any]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    return [(n, row) for n, row in enumerate(frame.to_dict("records"), 2)]  # line numbers after the header


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise InputError(f"{path}: reading .parquet task files needs pyarrow (pip install pyarrow), or give a "
                         ".jsonl file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read task file {path}: {exc}") from None
    return [(n, row) for n, row in enumerate(frame.to_dict("records"), 1)]


def _dataset_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path}: reading .arrow task files needs the 'datasets' package "
                         "(pip install datasets), or give a .jsonl file") from None
    data = datasets.load_dataset("arrow", data_files=str(path), split="train")
    return [(n, row) for n, row in enumerate(data, 1)]


def _records(path: Path, rows: list[tuple[int, Any]], text_field: str, prompt_field: str,
             completion_field: str) -> list[Sample]:
    out: list[Sample] = []
    for n, record in rows:
        if isinstance(record, dict) and isinstance(record.get(prompt_field), str) \
                and isinstance(record.get(completion_field), str):
            out.append((record[prompt_field], record[completion_field]))
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            out.append(record[text_field])
        else:
            raise InputError(f"{path}:{n}: each record needs a string field {text_field!r}, or the string fields "
                             f"{prompt_field!r} and {completion_field!r}")
    if not out:
        raise InputError(f"{path} holds no samples")
    return out


def file_sha256(path: str | Path) -> str:
    """Content hash of a task file, or of a folder's files with their relative names (hidden entries skipped, as
    :func:`read_task` skips them); stores record it, so later commands can tell the input is unchanged."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


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


def infer_loss(model_dir: str | Path) -> str:
    """The objective a local HF model directory was trained for: ``"clm"`` (next-token) for a causal LM,
    ``"mlm"`` (masked-token) for a masked LM; an architecture that is neither raises with the choices."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read a local HF config from {model_dir}: {exc}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) and not a.endswith("ForMaskedLM") for a in archs):
        return "clm"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "mlm"  # an encoder saved without its head (e.g. a sentence-embedding BERT)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    raise InputError(f"{model_dir}: cannot tell whether {archs or model_type!r} is a causal or a masked LM; "
                     f"pass --loss clm or --loss mlm")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Refuse, before anything is loaded, a model path that is not a saved HF model or a folder without a
    tokenizer (nothing is ever downloaded, so a hub name or a typo is an error here, not a failed connection)."""
    path = Path(model_dir)
    if not path.exists():
        raise InputError(f"--model {path}: no such folder (models are read from local folders only; nothing is "
                         "downloaded)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"--model {path}: not a saved HF model (a folder with config.json and the weights, as "
                         "save_pretrained writes it)")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else path
    if not tok.is_dir() or not any((tok / f).is_file() for f in TOKENIZER_FILES):
        where = "--tokenizer" if tokenizer_dir is not None else f"the model folder {path}"
        raise InputError(f"{where} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); pass --tokenizer DIR "
                         "with the tokenizer the model was trained with")


def load_hf(model_dir: str | Path, loss: str, device: str = "cpu", dtype: str = "float32",
            device_map: str | None = None, tokenizer: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """A local HF model (no network) and its tokenizer (from ``tokenizer``, else the model folder), for ``loss``
    in ("mlm", "clm").

    ``dtype`` is the weights' precision (float32, bfloat16 or float16); ``device_map="auto"`` spreads
    the layers over every visible GPU (transformers + accelerate) instead of moving the model to
    ``device``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    if dtype not in MODEL_DTYPES:
        raise InputError(f"dtype must be one of {tuple(MODEL_DTYPES)}, got {dtype!r}")
    check_device(device if not device_map else "cuda")
    check_model_dir(model_dir, tokenizer)
    cls = AutoModelForCausalLM if loss == "clm" else AutoModel
    kw = {"dtype": MODEL_DTYPES[dtype]} | ({"device_map": device_map} if device_map else {})
    try:
        model, info = cls.from_pretrained(model_dir, local_files_only=True, output_loading_info=True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a local HF model and tokenizer from {model_dir}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(MODEL_DTYPES[dtype])
    from .store.manifest import mark_fresh_parameters, mark_loaded_from

    mark_fresh_parameters(model, info.get("missing_keys", ()))  # random on each load: not part of the model's identity
    model = (model if device_map else model.to(device)).eval()
    weights = [f for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".json")]
    mark_loaded_from(model, weights, dtype)  # its fingerprint is cached by these files' identity
    return model, tokenizer


def check_device(device: str) -> None:
    """A device string this machine has: refused before anything is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this torch build or machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise InputError(f"--device {device}: use cpu or cuda[:N]")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's device (the first card under a device map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


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


def check_max_length(model: Any, max_length: int) -> None:
    """Refuse a truncation length beyond the positions the model (or its config) has embeddings for."""
    config = getattr(model, "config", model)
    limit = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(getattr(config, a, None), int)), None)
    if limit is not None and max_length > limit:
        raise InputError(f"--max-length {max_length} is beyond the {limit} positions {type(model).__name__} has "
                         f"embeddings for; use --max-length {limit} or less")


def loss_for(loss: str):
    """The per-sample loss function of ``loss``: :func:`masked_token_loss` for ``"mlm"``, :func:`clm_loss` else."""
    return masked_token_loss if loss == "mlm" else clm_loss
