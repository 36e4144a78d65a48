"""Representations of per-sample contributions (codecs). Maths on plain tensors, no hooks."""

from .codec import CODECS, Codec, Representation, check_codec, codec_from_dict
from .exact import Exact, ExactContributions
from .factors import FactorContributions, Factors, truncate
from .sketch import Sketch, SketchSide
from .sketchmaps import SketchMap

__all__ = ["CODECS", "Codec", "Exact", "ExactContributions", "FactorContributions", "Factors", "Representation",
           "Sketch", "SketchMap", "SketchSide", "check_codec", "codec_from_dict", "truncate"]
