"""Representations of per-sample contributions (codecs). Maths on plain tensors, no hooks."""

from .exact import Exact, ExactContributions

__all__ = ["Exact", "ExactContributions"]
