"""Representations of per-sample contributions (codecs). Maths on plain tensors, no hooks."""

from .exact import Exact, ExactContributions
from .factors import FactorContributions, Factors, truncate

__all__ = ["Exact", "ExactContributions", "FactorContributions", "Factors", "truncate"]
