"""The codec protocol: what a representation of per-sample contributions needs from a collection
pass, and the registry of codecs (one entry per codec, keyed by its serialised name).

* ``source``: what each batch of pass 1 must capture: ``"gradients"`` (full per-sample gradients
  from the autograd oracle) or ``"factors"`` (per-sample token factors from batched hooks).
* ``two_pass``: False when the representation is written during pass 1 (``Exact``, ``Factors``);
  True when it needs both tasks' pass-1 statistics first (``Sketch``: pass 2 writes the sketches).
* ``representation()``: an empty per-task container (None for two-pass codecs); it takes each
  captured batch with ``add`` and gives exact head-block gradients with ``block``.
* ``to_dict`` / :func:`codec_from_dict`: the serialised form stores and results carry.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Protocol, runtime_checkable

import torch

from ..errors import InputError
from ..layout import Layout
from .exact import Exact
from .factors import Factors
from .sketch import Sketch


class Representation(Protocol):
    """Per-task per-sample contributions of a one-pass codec."""

    def add(self, captured: Any) -> None:
        """Add one captured batch (a ``{name: [B, *shape]}`` dict, or a ``BatchFactors``)."""

    def block(self, layout: Layout, layer: int, block: str) -> Optional[torch.Tensor]:
        """Exact per-sample gradients of the distinct head blocks ``[n, H_b, S]``; None when absent."""

    def nbytes_per_sample(self) -> float:
        """Mean stored bytes per sample."""


@runtime_checkable
class Codec(Protocol):
    name: ClassVar[str]
    source: ClassVar[Literal["gradients", "factors"]]
    two_pass: ClassVar[bool]

    def to_dict(self) -> dict[str, Any]: ...

    def representation(self) -> Optional[Representation]: ...


CODECS: dict[str, type] = {c.name: c for c in (Exact, Factors, Sketch)}
USAGE = "sf.Exact(), sf.Factors(rank=None) or sf.Sketch(k, kind, seed, ...)"


def check_codec(codec: Any) -> Codec:
    """``codec`` itself when it is one of the registered codecs; otherwise a clear error."""
    if type(codec) not in CODECS.values():
        raise InputError(f"codec must be one of: {USAGE}; got {codec!r}")
    return codec


def codec_from_dict(d: Any) -> Codec:
    """Inverse of ``codec.to_dict()``; an unknown codec name or field raises :class:`~sketchfisher.InputError`."""
    if not isinstance(d, dict) or d.get("codec") not in CODECS:
        raise InputError(f"a codec is a JSON object with 'codec' in {tuple(CODECS)}, got {d!r}")
    fields = {k: v for k, v in d.items() if k != "codec"}
    try:
        return CODECS[d["codec"]](**fields)
    except TypeError as exc:
        raise InputError(f"codec {d['codec']!r}: {exc}") from None
