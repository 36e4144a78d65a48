"""The interactive HTML report of a result (:mod:`sketchfisher.interference.report`), under a short name."""

from .interference.report import conflict_figure, top_pairs_per_cell, write_report

__all__ = ["conflict_figure", "top_pairs_per_cell", "write_report"]
