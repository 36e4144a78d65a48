"""Capturing per-sample gradients from a model (the only package that touches autograd and hooks)."""

from .oracle import eval_mode, per_sample_gradients

__all__ = ["eval_mode", "per_sample_gradients"]
