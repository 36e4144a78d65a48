"""Whether a collection fits its device, checked before the first batch: the planner's prediction
(:func:`~sketchfisher.collect.memory.plan_phases`) for this model and these batches against the memory the device
has, and a refusal in one sentence that names what would fit."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd
import torch
from torch import nn

from ..capture.hooks import forms_bf16_gradients
from ..compress import Codec
from ..errors import InputError
from ..metric import ScoreConfig
from .memory import _families, format_bytes, plan_phases
from .plan import PassPlan, pass_plan


def batch_geometry(batch: Any) -> Optional[tuple[int, int]]:
    """(batch size, tokens) of a batch holding ``input_ids`` (a mapping), else None."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None


def check_plan_fits(model: nn.Module, plan: PassPlan, codec: Codec, cfg: ScoreConfig, stats_dtype: torch.dtype, task_a: Any,
                    task_b: Any, units: Any = "heads") -> Optional[pd.DataFrame]:
    """:func:`check_device_memory` for two tasks given as lists of batches (others cannot be counted
    without consuming them, and are not checked)."""
    if not all(isinstance(t, (list, tuple)) for t in (task_a, task_b)) or not task_a:
        return None
    samples = sum(geo[0] for t in (task_a, task_b) for geo in map(batch_geometry, t) if geo)
    return check_device_memory(model, plan, codec, cfg, stats_dtype, task_a[0], samples, units)


def check_device_memory(model: nn.Module, plan: PassPlan, codec: Codec, cfg: ScoreConfig, stats_dtype: torch.dtype,
                        first_batch: Any, samples: int, units: Any = "heads") -> Optional[pd.DataFrame]:
    """Refuse, before the first batch, a collection whose predicted peak exceeds a device's memory.

    The prediction is :func:`plan_phases` of ``plan`` for this model's shape and settings; a device's budget
    is its free memory, plus what PyTorch's caching allocator has reserved but no tensor uses, plus what
    the model's weights already take on it, within the process's memory fraction where one is set
    (``torch.cuda.set_per_process_memory_fraction``). Returns the plan (None when
    the model is not on CUDA or the batch's geometry cannot be read); raises :class:`InputError` with
    the numbers and the settings that would fit otherwise.
    """
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    geometry = batch_geometry(first_batch)
    if not cuda or geometry is None or getattr(model, "config", None) is None:
        return None
    batch, tokens = geometry
    weights = {d: sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda and (p.device.index or 0) == d)
               for d in cuda}
    # what the caching allocator holds but no tensor uses (an earlier run's blocks) is available too
    budget = min(min(torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d), _process_cap(d))
                 - torch.cuda.memory_allocated(d) + weights[d] for d in cuda)
    first = next(model.parameters())
    low = codec.two_pass and forms_bf16_gradients(first.dtype, first.is_cuda)  # (a sketch collection's statistics)
    return refuse_over_budget(model, budget, devices=len(cuda), samples=samples, tokens=tokens, batch_size=batch,
                              codec=codec, cfg=cfg, stats_dtype=stats_dtype, model_bytes_per_param=first.element_size(),
                              plan=plan, units=units, grad_bytes=2 if low else 4)


def _process_cap(device: int) -> float:
    """The bytes this process may allocate on ``device``: its total times the per-process memory fraction
    (``torch.cuda.set_per_process_memory_fraction``; 1 unless set)."""
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return fraction * torch.cuda.get_device_properties(device).total_memory


def refuse_over_budget(source: Any, budget: int, *, devices: int, samples: int, tokens: int, batch_size: int, codec: Codec,
                       cfg: Any, stats_dtype: torch.dtype, model_bytes_per_param: int, passes: Optional[float] = None,
                       plan: Optional[PassPlan] = None, units: Any = "heads", grad_bytes: int = 4) -> pd.DataFrame:
    """The plan when its busiest phase fits ``budget`` bytes per device; else :class:`InputError` with the
    numbers and the settings that would fit (fp32 statistics, a smaller batch, more devices)."""
    stats_bytes = torch.empty((), dtype=stats_dtype).element_size()
    args = dict(samples=samples, tokens=tokens, codec=codec, cfg=cfg, model_bytes_per_param=model_bytes_per_param,
                passes=passes, plan=plan, units=units, grad_bytes=grad_bytes)
    peak = lambda **kw: plan_phases(source, **{**args, "batch_size": batch_size, "stats_bytes": stats_bytes,  # noqa
                                               "devices": devices, **kw})
    df = peak()
    worst = df.loc[df["peak_device_bytes"].idxmax()]
    if worst["peak_device_bytes"] <= budget:
        return df
    hints = []
    if stats_bytes == 8 and peak(stats_bytes=4)["peak_device_bytes"].max() <= budget:
        hints.append("stats_dtype=torch.float32 (--stats-dtype float32)")
    current = plan or pass_plan(codec, cfg, passes)
    if current.conflicts and codec.two_pass:
        lighter = pass_plan(codec, cfg, current.passes, current.means, conflicts=False)
        lighter = lighter.with_writes() if "writes" in current.names else lighter
        if peak(plan=lighter)["peak_device_bytes"].max() <= budget:
            hints.append("without the conflict test's statistics (conflicts=False, --no-conflicts)")
    if "mlp" in _families(units) and "heads" in _families(units) and \
            all(peak(units=u, plan=None)["peak_device_bytes"].max() <= budget for u in ("heads", "mlp")):
        hints.append("heads alone, then MLP units in a second collection (units='heads', then units='mlp')")
    smaller = next((b for b in range(batch_size - 1, 0, -1) if peak(batch_size=b)["peak_device_bytes"].max() <= budget),
                   None)  # (the largest batch that fits: the peak grows with the batch)
    if smaller:
        hints.append(f"batch size {smaller}")
    more = next((n for n in (2, 4, 8) if n > devices and peak(devices=n)["peak_device_bytes"].max() <= budget), None)
    if more:
        hints.append(f"the layers spread over {more} devices (device_map / --device-map auto)")
    batch, stats_dtype_name = batch_size, str(stats_dtype).replace("torch.", "")
    phases = ", ".join(f"{r.phase} {format_bytes(r.peak_device_bytes)}" for r in df.itertuples())
    raise InputError(f"this collection needs about {format_bytes(worst['peak_device_bytes'])} on a device in "
                     f"{worst['phase']} but {format_bytes(budget)} is available (free plus the weights already "
                     f"there), batch {batch} x {tokens} tokens, {stats_dtype_name} statistics, {devices} device(s): "
                     f"{phases}. What would fit: {'; '.join(hints) or 'more or larger devices, or fewer layers'}")
