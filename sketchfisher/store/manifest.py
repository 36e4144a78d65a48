"""The store manifest: everything that produced a store, checked again whenever it is reopened."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from .._version import __version__
from ..layout import Layout
from ..metric import ScoreConfig
from .files import StoreMismatchError

FORMAT_VERSION = 2  # 2: tiled-shift sjlt map (stores of version 1 used the earlier hash)
CHECKED = ("format_version", "codec", "score", "layout", "model", "inputs")


def model_fingerprint(model: nn.Module, layout: Layout) -> dict[str, str]:
    """Hashes of the model's config, parameter names/shapes/dtypes, and a slice of each attention weight."""
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    shapes = "\n".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters())
    named = dict(model.named_parameters())
    weights = hashlib.sha256()
    for name in layout.params:
        weights.update(named[name].detach().flatten()[:64].float().cpu().numpy().tobytes())
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "params_sha256": hashlib.sha256(shapes.encode()).hexdigest(), "weights_sha256": weights.hexdigest()}


def build_manifest(model: nn.Module, layout: Layout, codec: Any, cfg: ScoreConfig,
                   inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that produced a store; ``inputs`` records how the CLI made the batches (loss, lengths)."""
    return {"inputs": inputs or {},"format_version": FORMAT_VERSION, "library_version": __version__, "codec": codec.to_dict(),
            "score": cfg.to_dict(), "layout": layout.to_dict(), "model": model_fingerprint(model, layout),
            "tasks": {}, "complete": False}


def check_same(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Raise :class:`StoreMismatchError` naming every field that differs between two manifests."""
    diffs = []
    for key in CHECKED:
        a, b = stored.get(key), wanted.get(key)
        if key == "inputs":  # stores written by the library (not the CLI) record none
            a, b = a or {}, b or {}
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(f"{f}: stored {_short(a.get(f))} vs requested {_short(b.get(f))}" for f in fields[:4])
            diffs.append(f"{key} ({shown})")
        else:
            diffs.append(f"{key} (stored {_short(a)} vs requested {_short(b)})")
    if diffs:
        raise StoreMismatchError(f"{where} was written with different settings: " + "; ".join(diffs)
                                 + ". Use a new store directory, or the original settings.")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
