"""How :class:`~sketchfisher.fisher.FisherStats` is written to and read from a safetensors file: flat tensors named
``<param>::<name>`` and string metadata (counts, dtypes, the kept quantities, the half counts)."""

from __future__ import annotations

import json

import torch

from ..errors import InputError
from .precision import PLAIN_SUMS
from .welford import QUANTITIES, Welford

TENSOR_NAMES = dict(zip(PLAIN_SUMS, ("sum_abs", "sum_g", "sum_half")))
"""How each plain sum is named in a statistics file (``<param>::<name>``)."""


class FileForm:
    """:class:`~sketchfisher.fisher.FisherStats`'s file form (a mixin: it reads the statistics' ``welford``, plain
    sums, dtypes, ``quantities`` and ``half_counts``)."""

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors and string metadata for safetensors (``name::mean`` etc., the kept ones)."""
        tensors, counts = {}, {}
        for name, w in self.welford.items():
            if w.count == 0:
                continue
            for key, t in (("mean", w.mean), ("m2", w.m2), *((TENSOR_NAMES[q], acc.get(name)) for q, acc in self.sums())):
                if t is not None:
                    tensors[f"{name}::{key}"] = t
            counts[name] = w.count
        meta = {"counts": json.dumps(counts), "dtype": str(self.dtype), "quantities": json.dumps(self.quantities)}
        for key in ("abs_dtype", "signed_dtype"):
            if getattr(self, key) is not None:
                meta[key] = str(getattr(self, key))
        if "half" in self.quantities:
            meta["half_counts"] = json.dumps({n: c for n, c in self.half_counts.items() if n in counts})
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "FisherStats":
        """Inverse of :meth:`to_tensors`; a missing tensor raises :class:`~sketchfisher.InputError`."""
        counts = json.loads(metadata["counts"])
        quantities = tuple(json.loads(metadata["quantities"])) if "quantities" in metadata else QUANTITIES
        dtype = lambda key: getattr(torch, metadata[key].replace("torch.", ""))  # noqa: E731
        if any(k in metadata and metadata[k].replace("torch.", "") not in ("float64", "float32", "bfloat16")
               for k in ("dtype", "abs_dtype", "signed_dtype")):
            raise InputError(f"statistics dtype {metadata['dtype']!r} / {metadata.get('abs_dtype')!r} / "
                             f"{metadata.get('signed_dtype')!r} is not one this library writes")
        out = cls(dtype=dtype("dtype"), quantities=quantities, half_counts=json.loads(metadata.get("half_counts", "{}")),
                  **{k: dtype(k) for k in ("abs_dtype", "signed_dtype") if k in metadata})
        need = {"fisher": "mean", "m2": "m2", **TENSOR_NAMES}
        for name, count in counts.items():
            missing = [f"{name}::{need[q]}" for q in out.quantities if f"{name}::{need[q]}" not in tensors]
            if missing:
                raise InputError(f"statistics lack tensors {missing[:3]}")
            out.welford[name] = Welford(int(count), tensors.get(f"{name}::mean"), tensors.get(f"{name}::m2"))
            for q, acc in out.sums():
                if q in out.quantities:
                    acc[name] = tensors[f"{name}::{TENSOR_NAMES[q]}"]
        return out
