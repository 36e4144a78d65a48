"""Representations of per-sample contributions (codecs). Maths on plain tensors, no hooks.

:mod:`.base` is the codec protocol, :mod:`.codec` the registry; every codec is one module."""

from .base import Codec, Representation, SideCodec, SketchSide, decode_side
from .codec import (CODECS, check_codec, codec_from_dict, codec_from_options, register_codec, storable,
                    unregister_codec)
from .exact import Exact, ExactContributions
from .factors import FactorContributions, Factors, truncate
from .sketch import Sketch
from .sketchmaps import SketchMap

__all__ = ["CODECS", "Codec", "Exact", "ExactContributions", "FactorContributions", "Factors", "Representation",
           "SideCodec", "Sketch", "SketchMap", "SketchSide", "check_codec", "codec_from_dict", "codec_from_options",
           "decode_side", "register_codec", "storable", "truncate", "unregister_codec"]
