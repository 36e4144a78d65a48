"""Collection: run a model over a task's batches and keep what a codec and the Fisher need.

:mod:`.plan` describes a collection as steps (the pass order, in one place); :mod:`.runner` executes a
plan into a sink; :mod:`.passes` holds the one capture loop every pass uses; :mod:`.stage1` a statistics
pass in memory; :mod:`.sketches` the side-codec steps (preparation, pass 2, task B's single pass);
:mod:`.memory` predicts each step's device memory.
"""

from .passes import factor_pass, fold_factors, gradient_pass, module_of, trainable_weights
from .plan import PassPlan, Step, needed_statistics, pass_plan, resolve_passes
from .runner import Job, MemorySink, Sink, execute
from .sketches import prepare_all, sketch_batches
from .stage1 import collect, default_stats_dtype

__all__ = ["Job", "MemorySink", "PassPlan", "Sink", "Step", "collect", "default_stats_dtype", "execute",
           "factor_pass", "fold_factors", "gradient_pass", "module_of", "needed_statistics", "pass_plan",
           "prepare_all", "resolve_passes", "sketch_batches", "trainable_weights"]
