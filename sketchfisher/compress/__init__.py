"""Representations of per-sample contributions (codecs). Maths on plain tensors, no hooks."""

from .exact import Exact, ExactContributions
from .factors import FactorContributions, Factors, truncate
from .sketch import Sketch, SketchSide
from .sketchmaps import SketchMap

__all__ = ["Exact", "ExactContributions", "FactorContributions", "Factors", "Sketch", "SketchMap", "SketchSide", "truncate"]
