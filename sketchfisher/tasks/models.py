"""Loading a local HF model and its tokenizer (nothing is downloaded), and the checks that need only its
folder or config: which objective it was trained for, the device, the truncation length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSSES = ("mlm", "clm")


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
    from ..store.manifest import mark_fresh_parameters, mark_loaded_from

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


def check_max_length(model: Any, max_length: int) -> None:
    """Refuse a truncation length beyond the positions the model (or its config) has embeddings for."""
    config = getattr(model, "config", model)
    limit = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(getattr(config, a, None), int)), None)
    if limit is not None and max_length > limit:
        raise InputError(f"--max-length {max_length} is beyond the {limit} positions {type(model).__name__} has "
                         f"embeddings for; use --max-length {limit} or less")


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the PEFT (LoRA) adapter saved in the local folder ``adapter_dir`` put on it (no network),
    its adapter parameters trainable: what a fine-tune trained, so what the analysis collects."""
    from ..errors import InputError

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"--adapter {adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError("--adapter needs peft: pip install 'sketchfisher[peft]'") from None
    return PeftModel.from_pretrained(model, str(path), is_trainable=True)
