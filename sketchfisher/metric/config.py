"""``ScoreConfig``: the validated Stage 6 options, and their serialisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import InputError
from .variants import VARIANTS, Variant, variant_of

NORMALIZER_MEANINGS = {"a": "task A's Fisher", "pooled": "the Fisher of A and B pooled",
                       "loo": "task A's Fisher without sample i (leave-one-out)"}
NORMALIZERS = tuple(NORMALIZER_MEANINGS)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ScoreConfig:
    """Validated Stage 6 options. ``dtype`` is the precision of the side vectors and contractions:
    fp32 by default (per-sample gradients are fp32), fp64 on request for reference computations
    (about 3× slower on CPU). ``normalizer``: task A's Fisher (``"a"``), the pooled A ∪ B Fisher
    (``"pooled"``), or task A's Fisher without sample i (``"loo"``)."""

    variant: Literal["paper", "signed", "symmetric"] = "paper"
    normalizer: Literal["a", "pooled", "loo"] = "a"
    eps: float = 1e-10
    ridge_abs: float = 0.0
    ridge_rel: float = 0.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        variant_of(self.variant)
        if self.normalizer not in NORMALIZERS:
            raise InputError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        for name in ("eps", "ridge_abs", "ridge_rel"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.dtype not in DTYPES.values():
            raise InputError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")

    @property
    def spec(self) -> Variant:
        """The variant's table entry (:data:`sketchfisher.metric.variants.VARIANTS`)."""
        return VARIANTS[self.variant]

    @property
    def slice_relative(self) -> bool:
        """True when λ depends on the slice, which breaks head additivity."""
        return self.ridge_rel > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stores keep it in their manifest)."""
        return {"variant": self.variant, "normalizer": self.normalizer, "eps": self.eps, "ridge_abs": self.ridge_abs,
                "ridge_rel": self.ridge_rel, "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreConfig":
        """Inverse of :meth:`to_dict`; unknown keys or values raise :class:`~sketchfisher.InputError`."""
        if not isinstance(d, dict):
            raise InputError(f"a score configuration is a JSON object, got {type(d).__name__}")
        fields = dict(d)
        unknown = set(fields) - {"variant", "normalizer", "eps", "ridge_abs", "ridge_rel", "dtype"}
        if unknown:
            raise InputError(f"unknown score configuration fields {sorted(unknown)}")
        if "dtype" in fields:
            if fields["dtype"] not in DTYPES:
                raise InputError(f"score dtype must be one of {tuple(DTYPES)}, got {fields['dtype']!r}")
            fields["dtype"] = DTYPES[fields["dtype"]]
        return cls(**fields)
