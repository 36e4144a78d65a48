"""Fisher estimators: per-task sufficient statistics of per-sample contributions C_i = g_i ⊙ g_i."""

from .host import HostStaging
from .views import channel_view, head_view, param_view, unit_view
from .ema import EMAFisher
from .precision import accumulator_dtype, kept_dtypes
from .stats import FisherStats
from .welford import MEAN_ACCESSOR, QUANTITIES, Welford

__all__ = ["MEAN_ACCESSOR", "QUANTITIES", "EMAFisher", "FisherStats", "HostStaging", "Welford", "accumulator_dtype", "channel_view",
           "kept_dtypes",
           "head_view", "param_view", "unit_view"]
