"""Collection passes: run a model over a task's batches and keep what a codec and the Fisher need.

:mod:`.passes` holds the one capture loop every pass uses; :mod:`.stage1` the in-memory collection
(representation + statistics); :mod:`.sketches` pass 2 of the sketch codec.
"""

from .passes import factor_pass, fold_factors, gradient_pass, module_of, trainable_weights
from .sketches import FusedSides, collect_sketches, needed_statistics, prepare_all, sketch_batches
from .stage1 import collect, default_stats_dtype

__all__ = ["FusedSides", "collect", "collect_sketches", "default_stats_dtype", "factor_pass", "needed_statistics", "fold_factors", "gradient_pass", "module_of",
           "prepare_all", "sketch_batches", "trainable_weights"]
