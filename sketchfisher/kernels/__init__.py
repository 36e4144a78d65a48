"""GPU kernels (Triton, CUDA tensors): the fused sjlt side sketch (pass 2) and the fused pass-1 statistics.

A leaf package: it depends on torch (and Triton where present) only, so both the codecs
(:mod:`sketchfisher.compress`) and the Fisher statistics (:mod:`sketchfisher.fisher`) build on it.
Both kernels are optional accelerations of torch code that computes the same thing on any device
(:func:`sketchfisher.compress.sketch_scores.side_vector` + :class:`~sketchfisher.compress.sketchmaps.SketchMap`,
:meth:`sketchfisher.fisher.FisherStats.update`); ``tests/test_gpu.py`` checks them against it.

``sketch_heads`` reads each head block of a per-sample gradient once, straight out of the whole
module's gradient ``[B, out, in]`` (a head block is a rectangle of it), and in the same pass forms
the variant's side vector ``v = f(g)·w`` (f = identity, square or abs; ``w`` the per-entry weight),
its cross term ``Σ v·other``, the centred ``ṽ = v − centre``, ``‖ṽ‖²`` and the sjlt sketch of
``ṽ``. The sjlt map's tiled-shift structure (:mod:`sketchfisher.kernels.hashing`) makes each output
row a gather: output row ``b·m + j`` of tile ``t`` reads entry ``(j − c_{b,t}) mod m``, so a program
loads a rotated, coalesced tile and accumulates into registers: no scatter, no atomics, and partial
sums per column chunk are added in a fixed order (bitwise reproducible) by a second, small launch, which also
finishes scaled centring and scales the conflict scalars: two launches per (layer, block) in all, where the
torch ops that finished each block had taken about fifteen (the host's time, on hosts slower than the device).
Each launch goes through :class:`Launches`, which keeps the compiled kernel of each specialisation and launches it
directly after the first call, without the JIT's per-call inspection of every argument.

``welford_update`` folds a batch of per-sample gradients into a Welford state of g², Σ|g| and Σg
in one pass over the batch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import NamedTuple, Optional

import torch

from .hashing import SHIFT_TWEAK

def switch(name: str, default: str = "0") -> bool:
    """An on/off setting from the environment variable ``name`` (``0``/``off`` or ``1``/``on``; else refused by name)."""
    value = os.environ.get(name, default)
    settings = {"0": False, "off": False, "1": True, "on": True}
    if value not in settings:
        raise ValueError(f"{name} must be one of {sorted(settings)}, got {value!r}")
    return settings[value]


PREFETCH = switch("SKETCHFISHER_SIDE_PREFETCH")
"""Whether the side kernel issues each step's loads one step ahead (:class:`SketchHeads`' ``prefetch``; off until
measured on a GPU: the same numbers either way)."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRANSFORMS = {"identity": 0, "square": 1, "abs": 2}  # the kernel's codes for f in v = f(g)·w (metric.variants)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a blocking copy (pinned memory, asynchronous)."""
    if t.device == device:
        return t
    if t.device.type != "cpu" or device.type != "cuda":  # (a device tensor, or a CPU target: a plain copy)
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Triton is importable and a CUDA device is present (Triton ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401  (availability check only)
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _kernels():
    from . import _triton

    return _triton.sketch_kernel, _triton.welford_kernel, _triton.finish_kernel, _triton.tile_order_kernel


@functools.lru_cache(maxsize=None)
def _tail_names(fn) -> tuple[str, ...]:
    """A JIT function's parameter names in order (the compiled kernel takes every argument positionally)."""
    return tuple(inspect.signature(fn.fn).parameters)


def _specialisation(args: tuple) -> tuple:
    """What Triton specialises a compiled kernel on, for each runtime argument: a tensor's dtype and 16-byte
    alignment, an int's width and whether it is 1 or a multiple of 16 (a conservative superset of Triton's key)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63))
        else:
            key.append(type(a))
    return tuple(key)


class Launches:
    """Launches of one Triton kernel that skip the JIT's per-call work once a specialisation is compiled.

    ``kernel[grid](...)`` inspects every argument, builds a cache key and looks the compiled kernel up on each call:
    tens of microseconds, several times the launch itself, and at a 7B model's 224 blocks a batch a large part of what
    the host does per batch. The first call of each specialisation goes through the JIT and keeps the compiled kernel
    it returns; later calls with the same constants, the same device (the first argument's) and the same
    :func:`_specialisation` of their arguments launch it directly. Where the JIT returns no compiled kernel (Triton's
    interpreter), every call goes through the JIT."""

    def __init__(self, fn):
        self.fn = fn
        self.names = _tail_names(fn)
        self.kept: dict = {}

    def __call__(self, grid: tuple, args: tuple, constants, options: tuple, spec: Optional[tuple] = None) -> None:
        """Launch on ``grid`` with runtime ``args`` (the kernel's leading parameters) and ``constants`` (its
        constexpr parameters by name and launch options such as ``num_warps``, or a callable returning them, called
        only where the JIT compiles or looks up); ``options``: a hashable summary of ``constants`` that identifies
        them among this object's launches. ``spec``: :func:`_specialisation` of ``args`` where the caller knows it
        (in any hashable form that differs wherever that would: a caller whose fixed arguments are the same tensors
        call after call works theirs out once)."""
        # (a compiled kernel is loaded on one device: the first argument's, current while it launches)
        key = (options, args[0].device, _specialisation(args) if spec is None else spec)
        kept = self.kept.get(key)
        if kept is not None:
            compiled, tail = kept
            compiled[grid if len(grid) == 3 else (*grid, 1, 1)[:3]](*args, *tail)  # (its launcher takes 3 axes)
            return
        constants = constants() if callable(constants) else constants
        compiled = self.fn[grid](*args, **constants)
        if compiled is not None and hasattr(compiled, "__getitem__") and len(self.kept) < 4096:
            self.kept[key] = (compiled, tuple(constants[name] for name in self.names[len(args):]))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def launch_shape(rows: int, width: int, bands: int, tiles: int, programs: int, sms: int,
                 tiles_per_step: Optional[int] = None, chunks: Optional[int] = None) -> tuple[int, int]:
    """``(tiles a step, column chunks)`` of the sjlt side kernel where not given: two tiles a step below 512 entries a
    step, else one, and about sixteen programs per SM, at least 8 tiles each (``benchmarks/sjlt_tune.py --modules``:
    1.2-1.5x faster than 4096 elements a step and four programs per SM on every Llama-7B module shape at batch 2; one
    tile of 2 x 256 a step 3-9% faster than two, ``--steps``). ``programs`` are the launch's (head block, row block)
    pairs."""
    step = tiles_per_step or max(1, min(2, 512 // (rows * width * bands)))
    return step, chunks or max(1, min(tiles // 8, -(-16 * sms // programs)))


def sketch_heads(g: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, size: int, cols: int, row_stride: int,
                 k: int, s: int, **options):
    """sjlt sketches of H head blocks of ``g`` (CUDA, one launch): ``(sketch [n, H, k], ‖ṽ‖² [n, H], cross [n, H],
    own [n, H], dots [n, H, m] or None)``; :class:`SketchHeads` with these arguments, called on ``g`` (a caller that
    sketches blocks of the same geometry and preparation batch after batch keeps the :class:`SketchHeads`)."""
    return SketchHeads(keys, offsets, size, cols, row_stride, k, s, device=g.device, **options)(g)


class SketchHeads:
    """The sjlt side kernel of H head blocks set up once, launched for each batch's per-sample gradient.

    Called on ``g``, it returns ``(sketch [n, H, k], ‖ṽ‖² [n, H], cross [n, H], own [n, H], dots [n, H, m] or
    None)``, views of one fp32 tensor ``[n, H, k + 3 + m]`` (their ``_base``) that the kernel writes row by row.
    ``g`` is ``[n, ...]`` with rows ``g[r]`` at stride ``g.stride(0)``; head block ``h`` has ``size`` entries,
    flattened row-major over a rectangle of ``cols`` columns whose rows are ``row_stride`` elements apart, starting at
    element ``offsets[h]`` of ``g[r]``. ``keys [H, 2]`` are the blocks' hash keys. The sketched vector is
    ``ṽ = transform(g)·weight − centre`` (each optional; ``weight``, ``centre``, ``other`` are ``[H, size]``, fp32,
    bf16 or fp8 codes, read as they are); cross is
    ``Σ transform(g)·weight·other``. The sketch is scaled by 1/√s and returned in fp32. ``own`` is ``Σ ṽ·centre``
    (zero without a centre: what scaled centring needs,
    :func:`sketchfisher.compress.sketch_scores.scale_centring`). ``conflict [m, H, size]`` (m ≤ 2, any float
    dtype): the raw gradient's inner products with each of its m vectors, ``dots[r, h, i] = Σ g_h[r]·conflict[i,
    h]`` (the conflict test's per-sample scalars, read in the same pass). ``scales``: for values kept in one byte,
    ``{"weight" | "centre" | "other": [H] , "conflict": [m, H]}`` fp32, one scale per head block: the kernel reads
    fp8 codes and multiplies each by its block's scale in fp32 (the conflict scalars are scaled after their sum).
    ``centring = (R c [H, k], ‖c‖² [H])`` fp32, the sketched centre and its squared norm: the sketches and norms
    come back scaled-centred, ``ṽ − γ c`` with ``γ = own / ‖c‖²`` (what
    :func:`~sketchfisher.compress.sketch_scores.scale_centring` does after the torch path), and the fourth output
    is γ instead of ``own``. Two launches a call: the sketch, then one that adds the column chunks' partial sums
    and finishes each row.

    ``tiled=True`` rearranges ``weight``, ``centre``, ``other`` and ``conflict`` in place (:func:`tile_order`: the
    caller's own tensors where they are contiguous on ``device``) so that the kernel reads them contiguously rather
    than rotated, for the same outputs bitwise; :meth:`untile` puts them back, and nothing else may read them in
    between. It applies where the map has one band and every tile is whole (``s == 1``, ``size`` a multiple of
    ``k``; :attr:`tiled` says whether it did). ``prefetch`` (default :data:`PREFETCH`): each step of the kernel issues
    the next step's loads before its own arithmetic, for the same outputs bitwise.

    Everything but ``g`` is checked, converted and placed on ``device`` here, once: at a 7B model's 224 blocks a
    batch, the host's per-block work between launches is what a pass's batch costs where the host is the slower
    side (``benchmarks/gpu_profile.py --timers``).
    """

    def __init__(self, keys: torch.Tensor, offsets: torch.Tensor, size: int, cols: int, row_stride: int, k: int,
                 s: int, *, device: torch.device, transform: str = "identity",
                 weight: Optional[torch.Tensor] = None, centre: Optional[torch.Tensor] = None,
                 other: Optional[torch.Tensor] = None, conflict: Optional[torch.Tensor] = None,
                 scales: Optional[dict] = None, centring: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 chunks: Optional[int] = None, block_rows: Optional[int] = None,
                 tiles_per_step: Optional[int] = None, num_warps: int = 4, tiled: bool = False,
                 prefetch: Optional[bool] = None):
        scales = scales or {}
        if size >= 2**31:
            raise ValueError(f"sketch_heads indexes a head block with int32; {size} entries is too many")
        H = keys.shape[0]
        mu = 0 if conflict is None else conflict.shape[0]
        if conflict is not None and (conflict.ndim != 3 or conflict.shape[1:] != (H, size) or not 1 <= mu <= 2):
            raise ValueError(f"conflict weights must be [1 or 2, {H}, {size}], got {list(conflict.shape)}")
        self.device, self.H, self.mu, self.k, self.s, self.size = device, H, mu, k, s, size
        self.m = k // s
        self.BM = _next_pow2(self.m)
        self.tiles = -(-size // self.m)
        self.options = (chunks, block_rows, tiles_per_step)
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        dummy = self.dummy = torch.empty(1, dtype=torch.float32, device=device)
        names = ("weight", "centre", "other")
        given = dict(zip(names, (weight, centre, other)))
        prep = [dummy if t is None else to_device(t, device).contiguous() for t in given.values()]  # (their dtypes)
        prep.append(dummy if conflict is None else to_device(conflict, device).contiguous())  # (fp8 at 7B)
        sc = [to_device(scales[name], device).to(torch.float32).contiguous() if name in scales else dummy
              for name in names]  # [H] each
        self.args = (*prep, *sc, to_device(keys.to(torch.int64).contiguous(), device),
                     to_device(offsets.to(torch.int64).contiguous(), device))
        self._tiled = _distinct(t for t in prep if t is not dummy) if tiled and s == 1 and size % self.m == 0 else None
        for t in self._tiled or ():
            tile_order(t.view(-1, H, size), self.args[-2], self.m)
        self._spent = False
        self.constants = dict(COLS=cols, CONTIG=cols == size or row_stride == cols, M=self.m, BM=self.BM, S=s,
                              SP=_next_pow2(s), WORDS=-(-self.m // 32), BW=max(1, self.BM // 32),
                              F=TRANSFORMS[transform], HAS_W=weight is not None, HAS_C=centre is not None,
                              HAS_O=other is not None, MU=mu, TWEAK=SHIFT_TWEAK, W_SC="weight" in scales,
                              C_SC="centre" in scales, O_SC="other" in scales, O_IS_C=centre is not None and other
                              is not None and _same(prep[1], prep[2]) and scales.get("centre") is scales.get("other"),
                              TILED=self.tiled, PREFETCH=PREFETCH if prefetch is None else prefetch,
                              num_warps=num_warps)
        self.row_stride = row_stride
        rc, c2 = centring if centring is not None else (dummy, dummy)
        self.centring = centring is not None
        u_sc = (to_device(scales["conflict"], device).to(torch.float32).contiguous() if "conflict" in scales and mu
                else None)
        self.finish_args = (to_device(rc, device), to_device(c2, device), dummy if u_sc is None else u_sc)
        self.finish_constants = dict(M=self.m, BM=self.BM, S=s, SP=_next_pow2(s), MU=mu, CENTRING=self.centring,
                                     U_SC=u_sc is not None)
        self.allowance = torch.finfo(torch.float32).eps * size ** 0.5
        self._shapes: dict = {}  # batch size -> (row block, row blocks, tiles a step, chunks, tiles a chunk)
        self._plans: dict = {}  # batch size -> what its two launches need besides g (_Plan)
        self._kept: Optional[tuple[Launches, Launches]] = None  # (made on first use: Triton is imported then)
        # what Triton specialises on in the arguments that are the same tensors and numbers call after call
        self._fixed_spec = (_specialisation(self.args), _specialisation((H, size, self.tiles, row_stride)),
                            _specialisation(self.finish_args))

    @property
    def tiled(self) -> bool:
        """Whether the preparations are kept in the kernel's tile order (until :meth:`untile`)."""
        return bool(self._tiled)

    def untile(self) -> None:
        """Put the preparations back in their own order (a no-op where they were not rearranged). The set-up is spent
        then: its kernel reads the tile order, so a later call raises."""
        for t in self._tiled or ():
            tile_order(t.view(-1, self.H, self.size), self.args[-2], self.m, inverse=True)
        self._tiled, self._spent = None, True

    @property
    def _launches(self) -> tuple["Launches", "Launches"]:
        """This set-up's two kernels, each with its compiled specialisations (the constants are this object's)."""
        if self._kept is None:
            sketch_kernel, _, finish_kernel, _ = _kernels()
            self._kept = (Launches(sketch_kernel), Launches(finish_kernel))
        return self._kept

    def _shape(self, n: int) -> tuple[int, int, int, int, int]:
        if n not in self._shapes:
            chunks, block_rows, tiles_per_step = self.options
            BR = block_rows or min(_next_pow2(n), 4)
            row_blocks = -(-n // BR)
            TT, chunks = launch_shape(BR, self.BM, _next_pow2(self.s), self.tiles, self.H * row_blocks, self.sms,
                                      tiles_per_step, chunks)
            per = -(-self.tiles // chunks)
            self._shapes[n] = (BR, row_blocks, TT, -(-self.tiles // per), per)
        return self._shapes[n]

    def _finish_step(self, chunks: int) -> int:
        """Column chunks the finishing launch adds per step: up to 16, at most 4096 partial sums in a step."""
        return max(1, min(16, _next_pow2(chunks), 4096 // (_next_pow2(self.s) * self.BM)))

    def _plan(self, n: int) -> "_Plan":
        plan = self._plans.get(n)
        if plan is None:
            BR, row_blocks, TT, chunks, per = self._shape(n)
            constants = dict(TT=TT, BR=BR, **self.constants)
            finish_constants = dict(CH=self._finish_step(chunks), **self.finish_constants)
            plan = self._plans[n] = _Plan(
                part=(chunks, n, self.H, self.s * self.BM + 3 + self.mu), chunks=chunks, per=per,
                grid=(chunks, self.H, row_blocks), constants=constants, options=(TT, BR),
                finish_grid=(n * self.H, 1, 1), finish_constants=finish_constants, finish_options=(chunks,),
                finish_spec=(self._fixed_spec[2], chunks, n))
        return plan

    def __call__(self, g: torch.Tensor):
        return self.split(self.run(g))

    def split(self, res: torch.Tensor):
        """The five outputs (views) of :meth:`run`'s tensor."""
        k, mu = self.k, self.mu
        return res[..., :k], res[..., k], res[..., k + 1], res[..., k + 2], res[..., k + 3:] if mu else None

    def width(self) -> int:
        """The last dimension of :meth:`run`'s tensor: ``k + 3 + m``."""
        return self.k + 3 + self.mu

    def run(self, g: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The launches on ``g``: one fp32 tensor ``[n, H, k + 3 + m]`` (sketch, ‖ṽ‖², cross, γ or own, dots), written
        into ``out`` where given (contiguous, of that shape and dtype on this device)."""
        if self._spent:
            raise RuntimeError("this sketch set-up was spent by untile(): its preparations are no longer where it reads")
        if g.dtype not in DTYPES:
            raise TypeError(f"sketch_heads takes {DTYPES}, got {g.dtype}")
        dev = self.device
        if g.device != dev:
            raise ValueError(f"this sketch was set up on {dev}; the gradient is on {g.device}")
        n, H, mu = g.shape[0], self.H, self.mu
        if n == 0:
            return torch.zeros(0, H, self.k + 3 + mu, dtype=torch.float32, device=dev)
        if g.ndim > 1 and not g.is_contiguous() and not g[0].is_contiguous():
            g = g.contiguous()  # rows may be strided (stride(0)), each row must be dense (a recording copies too)
        sketch, finish = self._kept or self._launches
        plan = self._plan(n)
        part = torch.empty(plan.part, dtype=torch.float32, device=dev)
        k = self.k
        if out is None:
            res = torch.empty(n, H, k + 3 + mu, dtype=torch.float32, device=dev)  # (one tensor: one to screen, one alloc)
        elif out.shape != (n, H, k + 3 + mu) or out.dtype != torch.float32 or out.device != dev or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous fp32 tensor {[n, H, k + 3 + mu]} on {dev}, got "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        else:
            res = out
        stride = g.stride(0)
        # (what Triton specialises on: the fixed arguments' once, here the gradient's, the scratch's and the stride's)
        spec = (self._fixed_spec[:2], g.dtype, g.data_ptr() % 16 == 0, part.data_ptr() % 16 == 0,
                _specialisation((n, stride, plan.per)))
        with _on(dev):  # Triton launches on the current device: make it the tensors' (layers on several cards)
            sketch(plan.grid, (g, *self.args, part, n, H, self.size, self.tiles, stride, self.row_stride, plan.per,
                               self.s ** -0.5), plan.constants, plan.options, spec)
            finish(plan.finish_grid, (part, *self.finish_args, res, plan.chunks, n, H, self.allowance),
                   plan.finish_constants, plan.finish_options,
                   (plan.finish_spec, part.data_ptr() % 16 == 0, res.data_ptr() % 16 == 0))
        return res


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # (moved as bits, whatever the dtype)


def tile_order(x: torch.Tensor, keys: torch.Tensor, m: int, inverse: bool = False) -> None:
    """Rearrange ``x [H, size]`` or ``[L, H, size]`` (contiguous, ``size`` a multiple of ``m``) in place, tile by tile,
    into the order in which the side kernel's rotated tiles read it: ``stored[h, t·m + j] = x[h, t·m + (j − c_{h,t})
    mod m]`` with ``c`` band 0's shifts of head block ``h``'s key (``keys [H, 2]``, :mod:`.hashing`); ``inverse``
    puts it back. One launch on any dtype (its bits are moved); Triton's interpreter on the CPU."""
    H, size = x.shape[-2:]
    if size % m or not x.is_contiguous() or keys.shape != (H, 2):
        raise ValueError(f"tile_order needs a contiguous [..., {keys.shape[0]}, size] tensor with size a multiple of "
                         f"{m}; got {list(x.shape)} (contiguous: {x.is_contiguous()})")
    if x.numel() == 0:
        return
    tiles, BM = size // m, _next_pow2(m)
    TP = max(1, min(_next_pow2(tiles), 4096 // BM))  # tiles a program
    rows = x.numel() // (H * size)
    kernel = _kernels()[3]
    with _on(x.device):
        kernel[(-(-tiles // TP), H, rows)](x.view(_BITS[x.element_size()]), to_device(keys.to(torch.int64), x.device),
                                            size, tiles, M=m, BM=BM, TP=TP, TWEAK=SHIFT_TWEAK, INVERSE=inverse)


def _distinct(tensors) -> Optional[list[torch.Tensor]]:
    """Each tensor once (one read serves two that are :func:`_same`), or None where two others share memory (the
    rearrangement of one would move the other's entries)."""
    out: list[torch.Tensor] = []
    for t in tensors:
        if any(_same(t, u) for u in out):
            continue
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if any(lo < u.data_ptr() + u.numel() * u.element_size() and u.data_ptr() < hi for u in out):
            return None
        out.append(t)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same numbers in the same place (one read serves both)."""
    return (a is b or (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
                       and a.stride() == b.stride()))


class _Plan(NamedTuple):
    """What :class:`SketchHeads`'s two launches for one batch size need besides the gradient."""

    part: tuple  # the partial sums' shape
    chunks: int
    per: int  # tiles a column chunk
    grid: tuple
    constants: dict
    options: tuple
    finish_grid: tuple
    finish_constants: dict
    finish_options: tuple
    finish_spec: tuple


_NO_SWITCH = contextlib.nullcontext()


def _on(device: torch.device):
    """Make ``device`` current for Triton's launches where it is not already (a no-op context on one card)."""
    if device.type != "cuda" or device.index is None or _one_card() or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=1)
def _one_card() -> bool:
    """Whether this process sees one CUDA device (every CUDA tensor is on the current device then)."""
    return torch.cuda.device_count() == 1


def sjlt(x: torch.Tensor, key: tuple[int, int], k: int, s: int) -> torch.Tensor:
    """sjlt of one head block ``x [n, size]`` (CUDA); ``[n, k]`` in x's dtype."""
    x = x.contiguous()
    keys = torch.tensor([key], dtype=torch.int64)
    sk, *_ = sketch_heads(x, keys, torch.zeros(1, dtype=torch.int64), x.shape[1], x.shape[1], x.shape[1], k, s)
    return sk[:, 0].to(x.dtype)


# the statistics kernel (it builds on Launches and _on above)
from .welford import _welford, update_counts, welford_update  # noqa: E402
