"""The registry of codecs, keyed by their serialised name (the protocol is :mod:`.base`).

``sf.register_codec(MyCodec)`` adds one: ``sf.analyze``, ``sf.plan``, stores (side codecs only) and the
CLI's ``--codec`` choices then accept it. ``codec_from_dict`` rebuilds a codec from what a store or a
result recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InputError
from .base import Codec, Representation, SideCodec
from .exact import Exact
from .factors import Factors
from .sketch import Sketch

CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec], replace: bool = False) -> type[Codec]:
    """Register a codec class (usable as a decorator). It must subclass :class:`Codec` (one-pass) or
    :class:`SideCodec` (pass 2 writes side vectors; storable), be a dataclass, and carry a unique
    ``name``; ``replace=True`` re-registers a name."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)) or not dataclasses.is_dataclass(cls):
        raise InputError(f"a codec is a dataclass subclassing sketchfisher.Codec or sketchfisher.SideCodec; got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise InputError(f"codec class {cls.__name__} needs a class attribute name = '<registry key>'")
    if cls.source not in ("gradients", "factors"):
        raise InputError(f"codec {cls.name!r}: source must be 'gradients' or 'factors', got {cls.source!r}")
    if cls.name in CODECS and CODECS[cls.name] is not cls and not replace:
        raise InputError(f"a codec named {cls.name!r} is registered already ({CODECS[cls.name].__name__}); "
                         "pass replace=True to replace it")
    CODECS[cls.name] = cls
    return cls


def unregister_codec(name: str) -> None:
    """Remove a registered codec (tests that register their own)."""
    CODECS.pop(name, None)


for _cls in (Exact, Factors, Sketch):
    register_codec(_cls)


def usage() -> str:
    """How the registered codecs are built, for messages."""
    return ", ".join(f"sf.{cls.__name__}(...)" for cls in CODECS.values())


def check_codec(codec: Any) -> Codec:
    """``codec`` itself when it is an instance of a registered codec; otherwise a clear error."""
    if not isinstance(codec, Codec) or CODECS.get(getattr(codec, "name", None)) is not type(codec):
        raise InputError(f"codec must be one of: {usage()} (or a codec registered with sf.register_codec); "
                         f"got {codec!r}")
    return codec


def storable() -> dict[str, type[Codec]]:
    """The registered codecs a store can hold (side codecs)."""
    return {name: cls for name, cls in CODECS.items() if issubclass(cls, SideCodec)}


def codec_from_dict(d: Any) -> Codec:
    """Inverse of ``codec.to_dict()``; an unknown codec name or field raises :class:`~sketchfisher.InputError`."""
    if not isinstance(d, dict) or d.get("codec") not in CODECS:
        raise InputError(f"a codec is a JSON object with 'codec' in {tuple(CODECS)}, got {d!r}")
    fields = {k: v for k, v in d.items() if k != "codec"}
    try:
        return CODECS[d["codec"]](**fields)
    except TypeError as exc:
        raise InputError(f"codec {d['codec']!r}: {exc}") from None


def codec_from_options(name: str, options: dict[str, Any]) -> Codec:
    """Build the registered codec ``name`` from a dict of options (the CLI's), taking only the fields the
    codec declares (``k``, ``kind``, ``seed``, ``dtype``, ``variance_reduction``, ...)."""
    if name not in CODECS:
        raise InputError(f"unknown codec {name!r}; registered: {tuple(CODECS)}")
    cls = CODECS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})


__all__ = ["CODECS", "Codec", "Representation", "SideCodec", "check_codec", "codec_from_dict", "codec_from_options",
           "register_codec", "storable", "unregister_codec", "usage"]
