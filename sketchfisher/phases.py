"""Where a run spends its time and device memory: one record per phase (pass 1 A, pass 2 B, ...).

``sf.analyze`` fills a :class:`PhaseLog` and attaches it to the result (``res.phases``); the GPU
benchmarks print it beside the planner's prediction. On CUDA each phase's peak is the allocator's
peak during the phase (``torch.cuda.max_memory_allocated`` after a reset at the phase start), over
every device the model uses.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


@dataclass
class Phase:
    name: str
    seconds: float
    peak_bytes: int  # the largest over the devices; 0 when no CUDA device was used
    device_peaks: tuple[int, ...] = ()  # per tracked device, in the order of PhaseLog.devices


@dataclass
class PhaseLog:
    """Phases in the order they ran; ``devices`` are the CUDA devices whose memory is tracked."""

    devices: tuple[int, ...] = ()
    phases: list[Phase] = field(default_factory=list)

    @classmethod
    def for_devices(cls, devices: list[torch.device]) -> "PhaseLog":
        return cls(tuple(sorted({d.index or 0 for d in devices if d.type == "cuda"})))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        for d in self.devices:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        start = time.perf_counter()
        with torch.profiler.record_function(name):  # (a range in profiler traces; nearly free otherwise)
            yield
        for d in self.devices:
            torch.cuda.synchronize(d)
        peaks = tuple(torch.cuda.max_memory_allocated(d) for d in self.devices)
        peak = max(peaks, default=0)
        self.phases.append(Phase(name, time.perf_counter() - start, peak, peaks))
        logger.info("%s: %.2f s, peak %.2f GiB", name, self.phases[-1].seconds, peak / 2**30)

    def peak_bytes(self) -> int:
        return max((p.peak_bytes for p in self.phases), default=0)

    def device_peaks(self) -> list[int]:
        """The peak of each tracked device over all phases."""
        return [max((p.device_peaks[i] for p in self.phases), default=0) for i in range(len(self.devices))]

    def rows(self) -> list[dict]:
        return [{"phase": p.name, "seconds": p.seconds, "peak_GiB": p.peak_bytes / 2**30} for p in self.phases]
