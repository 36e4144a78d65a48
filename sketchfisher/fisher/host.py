"""Host memory for statistics that leave the GPU, made ready while the GPU is busy.

At 7B scale one statistic is 8.6 GB. Copying it into a *fresh* host tensor is dominated by the
operating system faulting in and zeroing the pages (measured on an H200 host: 4.7 s for 8.6 GB),
while a copy into memory that was already touched takes 0.5 s. :class:`HostStaging` allocates and
touches the host tensors in a background thread as soon as their sizes are known (at the start of
pass 1), so that the copies after pass 1 run at transfer speed. Page faulting releases the GIL; the
thread competes with nothing on the GPU.

Where CUDA is, each buffer is also page-locked once touched (``cudaHostRegister``, at its exact size), so that
the copies to and from the GPU run as direct transfers rather than through the driver's pageable staging. A
locked buffer is unlocked just before its memory is freed. At a Llama-7B shape with MLP units this takes the
preparation and B's centring from 3.4 + 4.3 s to 1.6 + 1.6 s, and locking in the background costs pass 1 about
0.2 s (``benchmarks/gpu_e2e.py --pin on off``; :data:`PIN` = False keeps the buffers pageable).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter, deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterable, Iterator, Optional

import numpy as np
import torch

from ..errors import InputError

logger = logging.getLogger(__name__)
Key = tuple[int, torch.dtype]  # (number of elements, dtype): buffers are flat and take any shape
PIN = True  # page-lock the staged buffers where CUDA is
IN_FLIGHT = 8  # overlapped copies (:meth:`HostStaging.overlapped`) queued at most before the host waits for the oldest


def touched_buffer(numel: int, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """A flat host tensor whose pages are all faulted in (one byte per 4 KiB page, in this thread: numpy releases
    the GIL, where torch's ``zero_`` would take every core), page-locked for the GPU's copies when ``pin``. The
    memory is numpy's, so that the lock is released (``weakref.finalize`` on the array, which every tensor
    view keeps alive) before the memory is freed."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    arr = np.empty(max(nbytes, 1), dtype=np.uint8)
    arr[::4096] = 0
    if pin and nbytes and not _lock(arr, nbytes):  # (the pages stay pageable: a slower copy, the same result)
        logger.warning("could not page-lock a %d-byte host buffer; copies to it take the pageable way", nbytes)
    return torch.from_numpy(arr)[:nbytes].view(dtype)


def _lock(arr: np.ndarray, nbytes: int) -> bool:
    """Page-lock ``arr``'s memory for the GPU, and unlock it when the array is freed; False where that fails
    (a runtime without ``cudaHostRegister``, or the driver refuses)."""
    try:
        cudart = torch.cuda.cudart()
        ptr = arr.ctypes.data
        if int(cudart.cudaHostRegister(ptr, nbytes, 0)) != 0:
            return False
        weakref.finalize(arr, cudart.cudaHostUnregister, ptr)
        return True
    except Exception:  # noqa: BLE001  (any failure leaves an ordinary buffer)
        return False


def copy_stream(streams: dict, device: torch.device) -> torch.cuda.Stream:
    """The copy stream ``streams`` keeps for ``device`` (made on first use)."""
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    return stream


class HostStaging:
    """Touched host buffers for the given ``(numel, dtype)`` sizes (one buffer per entry, in order).

    :meth:`copy` moves a device tensor into a matching buffer, waiting for the background thread if
    that buffer is not ready yet; a tensor for which no buffer was reserved is copied the ordinary way
    (same result, slower). Inside :meth:`overlapped` the copies from a GPU run on a stream of their own without
    stopping the host, so that the device's next work (and its copies the other way) go on meanwhile.
    :meth:`close` stops the thread and drops the buffers not taken.
    """

    def __init__(self, sizes: Iterable[Key]):
        self._streams: dict = {}  # device -> the copy stream of overlapped copies
        self._in_flight: deque | None = None  # (inside overlapped) the events of the copies not known to be done
        self._todo = list(sizes)
        self._pending = Counter(self._todo)
        self._ready: dict[Key, list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._fill, name="sketchfisher-host-staging", daemon=True)
        self._thread.start()

    @classmethod
    def for_tensors(cls, like: Iterable[torch.Tensor], dtypes: Iterable[torch.dtype]) -> "HostStaging":
        """Buffers for one statistic per entry of ``dtypes`` shaped like each tensor (the largest first)."""
        sizes, dtypes = sorted((t.numel() for t in like), reverse=True), list(dtypes)
        return cls([(n, dtype) for n in sizes for dtype in dtypes])

    def _fill(self) -> None:
        for key in self._todo:
            with self._cond:
                if self._stop:
                    break
            try:  # fault every page in now, not during the copy
                buf = touched_buffer(*key, pin=PIN and torch.cuda.is_available())
            except Exception as exc:  # noqa: BLE001  (out of host memory, or any other failure: copies take the ordinary way)
                logger.warning("host staging stopped after allocation failure: %s", exc)
                break
            with self._cond:
                self._pending[key] -= 1
                self._ready.setdefault(key, []).append(buf)
                self._cond.notify_all()
        with self._cond:
            self._pending.clear()
            self._cond.notify_all()

    def _take(self, key: Key) -> torch.Tensor | None:
        with self._cond:
            while not self._ready.get(key) and self._pending.get(key, 0) > 0:
                self._cond.wait()
            return self._ready[key].pop() if self._ready.get(key) else None

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (``t`` itself when it is on the host already)."""
        if t.device.type == "cpu":
            return t
        buf = self._take((t.numel(), t.dtype))
        if buf is None:
            return t.to("cpu")
        out = buf.view(t.shape)
        if self._in_flight is None or not t.is_cuda:
            out.copy_(t)
            return out
        stream = copy_stream(self._streams, t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # (t as the work queued so far leaves it)
        with torch.cuda.stream(stream):
            out.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)  # (its memory is not reused before the copy has read it)
        self._in_flight.append(done)
        if len(self._in_flight) > IN_FLIGHT:  # (bounds the device memory freed but not yet reusable)
            self._in_flight.popleft().synchronize()
        return out

    @contextmanager
    def overlapped(self) -> Iterator["HostStaging"]:
        """Copies made inside run on a copy stream of their own and return before they are done (at most
        :data:`IN_FLIGHT` at a time); leaving waits for every one of them, so that the host copies are complete
        once the block is left (and not to be read inside it)."""
        if self._in_flight is not None:  # (nested: the outer block waits)
            yield self
            return
        self._in_flight = deque()
        try:
            yield self
        finally:
            pending, self._in_flight = self._in_flight, None
            for event in pending:
                event.synchronize()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> "HostStaging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CopiesAhead:
    """Host tensors brought to a GPU one item ahead of their use, so that each transfer runs while the device
    works on the item before.

    ``source(item, what)`` gives an item's host tensor of one kind (``what``); ``order`` is the order the items are
    asked for in. :meth:`get` returns the device copy of ``(item, what)`` (on a copy stream of its own, waited for by
    the current stream, not by the host) and queues the same kind of the next item in ``order``: the guess that the
    next item needs what this one did. A copy queued but never asked for is dropped when a later item is asked for.
    At most the next item's tensors wait on the device beside the ones in use. Off CUDA, a plain ``to``.
    """

    def __init__(self, order: Iterable[Hashable], source: Callable[[Hashable, str], torch.Tensor]):
        self.order = list(dict.fromkeys(order))
        self._after = dict(zip(self.order, self.order[1:]))
        self.source = source
        self._queued: dict = {}  # (item, what) -> (device tensor, its copy's event or None)
        self._streams: dict = {}  # device -> copy stream

    def get(self, item: Hashable, what: str, device: torch.device) -> torch.Tensor:
        got = self._queued.pop((item, what), None)
        if got is None or got[0].device != device:
            got = self._copy(item, what, device)
        t, event = got
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            t.record_stream(current)  # (its memory came from the copy stream; it is used and freed on this one)
        following = self._after.get(item)
        self._queued = {key: v for key, v in self._queued.items() if key[0] in (item, following)}
        if following is not None and (following, what) not in self._queued:
            try:
                self._queued[(following, what)] = self._copy(following, what, device)
            except (KeyError, InputError):  # (a guess only: asked for, the item's own call says what is missing)
                pass
        return t

    def _copy(self, item: Hashable, what: str, device: torch.device) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        src = self.source(item, what)
        if device.type != "cuda" or src.device == device:
            return src.to(device), None
        stream = copy_stream(self._streams, device)
        with torch.cuda.stream(stream):
            t = src.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return t, event


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """The ordinary host copy (the default where no :class:`HostStaging` is given)."""
    return t if t.device.type == "cpu" else t.to("cpu")
