"""Fisher estimators: per-task sufficient statistics of per-sample contributions C_i = g_i ⊙ g_i."""

from .stats import TaskStats

__all__ = ["TaskStats"]
