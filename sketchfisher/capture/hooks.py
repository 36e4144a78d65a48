"""Batched capture of per-sample gradient factors with forward hooks.

For a linear map ``y = x Wᵀ`` applied to tokens, sample i's weight gradient is
``g_i = D_iᵀ A_i`` with ``A_i = x`` (inputs, ``[T, in]``) and ``D_i = ∂loss_i/∂y`` (``[T, out]``).
One ordinary batched forward pass records every hooked module's inputs and outputs; one
``torch.autograd.grad`` of ``Σ_b loss_b`` with respect to those outputs gives every sample's
``D_i`` at once (samples are independent, so ∂(Σ_b loss_b)/∂y_i = ∂loss_i/∂y_i). No parameter
``.grad`` is written and no weight gradient is formed.

Assumption: a hooked weight reaches the loss only through its module's forward (possibly called
several times). A loss that also uses the weight directly (a penalty on W, a weight tied to an
embedding) has gradient terms that factors do not see; tied LM heads are therefore excluded from
:func:`linear_modules`, and the exact oracle (``sf.Exact()``) remains the reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import CaptureUnsupported, GradientError, InputError
from .oracle import LossFn, batch_size_of, check_losses


def _conv1d_type() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return ()
    return (Conv1D,)


def is_transposed(module: nn.Module) -> bool:
    """True for HF ``Conv1D``, which stores ``Wᵀ`` (``[in, out]``)."""
    return isinstance(module, _conv1d_type())


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and HF ``Conv1D`` of the model, by module name.

    A module whose weight is tied to another parameter (an LM head sharing the input embedding)
    is left out: its gradient is not the module's factor product alone.
    """
    kinds = (nn.Linear, *_conv1d_type())
    owned = dict(model.named_parameters())
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kinds) and owned.get(name + ".weight") is m.weight}


@dataclass
class BatchFactors:
    """Factors of one batch: per module ``A [B, T, in]`` and ``D [B, T, out]`` (padded rows zero), in fp32, or in
    the model's own bf16/fp16 where its activations are (they are exact there, and half the bytes of a batch in
    flight: 4.7 GiB at a 7B model's batch of 2 x 512 tokens with MLP units)."""

    losses: torch.Tensor
    A: dict[str, torch.Tensor]
    D: dict[str, torch.Tensor]
    lengths: torch.Tensor  # real tokens per sample, [B]
    transposed: dict[str, bool]

    @property
    def batch_size(self) -> int:
        return int(self.losses.shape[0])

    source_dtype: dict[str, torch.dtype] = field(default_factory=dict)  # the model's activation dtype
    batch_grads: list = field(default_factory=list)  # whole-batch gradients of FactorCapture.run's ``check``
    screen: Optional["Screen"] = None  # whether the losses and factors are finite (FactorCapture.run)

    def settle(self) -> None:
        """Raise :class:`GradientError` if the batch's losses or factors are not finite (:class:`Screen`)."""
        if self.screen is not None:
            self.screen.settle()

    def grad(self, module: str, low: bool = False, into: Optional[dict] = None) -> torch.Tensor:
        """Per-sample weight gradients of one module in the weight's storage orientation ``[B, *weight.shape]``, fp32.

        On CUDA, factors that came from a bf16/fp16 model are exactly representable in that dtype, so
        they are multiplied on tensor cores in it with fp32 accumulation and an fp32 result (the same
        numbers as an fp32 product up to summation order, several times faster).

        ``low=True`` asks for the bf16 product where the factors are a bf16 model's on CUDA: the same fp32
        accumulation, rounded once to bf16 (relative error at most 2⁻⁹ per entry, the factors' own precision),
        half the bytes to write and to read again. The collection's statistics and sketches read it (each sums
        over many entries, where independent roundings average out); stored exact gradients (``sf.Exact``) do
        not. fp16 models keep fp32: fp16's range would flush small per-sample gradients to zero.

        ``into``: buffers by shape that the bf16 product is written into and kept in, so that a pass's gradients of
        one shape lie at one place batch after batch (what :mod:`sketchfisher.kernels.graphs` replays need); a
        product written there is valid until the next one of its shape.
        """
        a, d = self.A[module], self.D[module]
        left, right = (a, d) if self.transposed[module] else (d, a)
        low_dtype = self.source_dtype.get(module)
        if left.is_cuda and low_dtype in (torch.bfloat16, torch.float16):
            left = left.transpose(1, 2)
            left, right = (t if t.dtype == low_dtype else t.to(low_dtype) for t in (left, right))
            if low and low_dtype == torch.bfloat16:  # (self.rounds(module): a bf16 model's, on CUDA)
                out = None
                if into is not None:
                    shape = (left.shape[0], left.shape[1], right.shape[2])
                    out = into.get((shape, left.device))
                    if out is None:
                        out = into[(shape, left.device)] = torch.empty(shape, dtype=low_dtype, device=left.device)
                with fp32_reductions():
                    return torch.bmm(left, right, out=out)
            try:
                return torch.bmm(left, right, out_dtype=torch.float32)
            except TypeError:  # torch without bmm(out_dtype=): the fp32 product below
                pass
        return torch.bmm(left.transpose(1, 2).float(), right.float())

    def rounds(self, module: str) -> bool:
        """Whether ``grad(module, low=True)`` is rounded to bf16 (:func:`forms_bf16_gradients`)."""
        return forms_bf16_gradients(self.source_dtype.get(module), self.A[module].is_cuda)


class Screen:
    """Whether a batch's losses and factors are all finite, read on the host when asked.

    Each distinct factor tensor (q, k and v read one input) is reduced to its largest magnitude, all of a device's in
    one multi-tensor operation (a NaN or inf anywhere makes it non-finite; finite values cannot overflow a maximum,
    so there is nothing to re-check). The flags, the losses' per sample first, are copied to page-locked host memory
    without waiting, and :meth:`settle` reads them: at once for a CPU batch, after the device has reached this point
    for a CUDA one. Only a flagged tensor is looked at sample by sample, to name the batch positions (the factors are
    still alive then). ``context``: a callable returning a context manager that :meth:`settle` raises inside (a pass
    names its batch and samples there)."""

    def __init__(self, losses: torch.Tensor, A: dict[str, torch.Tensor], D: dict[str, torch.Tensor]):
        here = losses.device
        distinct: dict = {}  # storage key -> (row, tensor)

        def row(t: torch.Tensor) -> int:
            return distinct.setdefault(_storage_key(t), (len(distinct), t))[0]

        self.rows = {name: (row(A[name]), row(D[name])) for name in A}  # module -> rows of its A and D
        self.tensors = [t for _, t in distinct.values()]
        by_device: dict = {}
        for i, t in enumerate(self.tensors):
            if t.numel():  # (an empty tensor is finite)
                by_device.setdefault(t.device, []).append(i)
        peaks, order = [], []
        for rows in by_device.values():  # (stack promotes mixed dtypes)
            most = torch._foreach_norm([self.tensors[i] for i in rows], ord=float("inf"))
            peaks.append(torch.stack(most).float().to(here))
            order += rows
        self.flag_of = {i: losses.shape[0] + k for k, i in enumerate(order)}  # tensor -> its flag's position
        flags = torch.cat([losses.float().isfinite(), *(p.isfinite() for p in peaks)])
        self.batch = losses.shape[0]
        self.event = None
        if flags.is_cuda:
            self.flags = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            self.flags.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flags.device))
        else:
            self.flags = flags
        self.context: Callable[[], Any] = nullcontext
        self.settled = False

    def settle(self) -> None:
        """Raise :class:`GradientError` naming the first non-finite row's batch positions (losses first, then the
        modules in order); every call raises again until the batch is found finite."""
        if self.settled:
            return
        if self.event is not None:
            self.event.synchronize()
        if bool(self.flags.all()):
            self.settled, self.tensors = True, []  # (the factors need not be kept alive for an error any more)
            return
        flags, B = self.flags.cpu(), self.batch
        with self.context():
            bad = (~flags[:B]).nonzero().flatten().tolist()
            if bad:
                raise GradientError(f"loss_fn returned non-finite losses for batch positions {bad} (FactorCapture.run)",
                                    bad)
            for name, (a, d) in self.rows.items():
                if all(i not in self.flag_of or flags[self.flag_of[i]] for i in (a, d)):
                    continue
                ok = torch.ones(B, dtype=torch.bool)
                for i in (a, d):
                    t = self.tensors[i]
                    ok &= torch.linalg.vector_norm(t, float("inf"), dim=tuple(range(1, t.ndim)),
                                                   dtype=torch.float32).isfinite().cpu()
                bad = (~ok).nonzero().flatten().tolist()
                raise GradientError(f"non-finite factors in {name!r} for batch positions {bad}", bad)


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with this key are the same numbers (views of one storage with one geometry)."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def forms_bf16_gradients(dtype: Optional[torch.dtype], cuda: bool) -> bool:
    """Whether per-sample gradients asked for in low precision (``BatchFactors.grad(low=True)``) are formed in bf16:
    a bf16 model's, on CUDA (fp16 keeps fp32 for its range; the CPU keeps fp32). The planner counts them by this
    rule."""
    return cuda and dtype == torch.bfloat16


@contextmanager
def fp32_reductions() -> Iterator[None]:
    """bf16 matrix products on CUDA that reduce in fp32 throughout (cuBLAS may otherwise split a long inner
    dimension and add the partial products in bf16), so that a bf16 result is rounded once."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    if not before:  # (already so: a caller that forms many products sets it once around them)
        yield
        return
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before


def token_mask_of(batch: Any) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` (``[B, T]``) when it is a mapping that has one."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


class FactorCapture:
    """Context manager that hooks ``modules`` and yields per-sample factors for each batch.

    Entering puts the model in eval mode and makes the hooked weights require grad; leaving
    removes every hook and restores modes and ``requires_grad`` flags. It cannot be entered twice.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str]):
        self.model = model
        named = dict(model.named_modules())
        self.names = list(modules)
        missing = [n for n in self.names if n not in named]
        if missing:
            raise InputError(f"modules {missing[:3]} not found in {type(model).__name__}")
        self.modules = {n: named[n] for n in self.names}
        self.transposed = {n: is_transposed(m) for n, m in self.modules.items()}
        bad = [n for n, m in self.modules.items() if getattr(m, "weight", None) is None or m.weight.ndim != 2]
        if bad:
            raise InputError(f"modules {bad[:3]} have no 2-D weight; only linear maps have gradient factors")
        self._handles: list[Any] = []
        self._active = False
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> "FactorCapture":
        if self._active:
            raise RuntimeError("FactorCapture is already active; it cannot be entered twice")
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._flags = [(m.weight, m.weight.requires_grad) for m in self.modules.values()]
        try:
            self.model.eval()
            for weight, _ in self._flags:
                weight.requires_grad_(True)
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, training in getattr(self, "_modes", []):
            module.training = training
        for weight, flag in getattr(self, "_flags", []):
            weight.requires_grad_(flag)
        self._records.clear()
        self._active = False

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():
                self._records.setdefault(name, []).append((args[0].detach(), output))
        return hook

    def run(self, loss_fn: LossFn, batch: Any, token_mask: Optional[torch.Tensor] = None,
            check: Sequence[torch.Tensor] = (), defer_screen: bool = False) -> BatchFactors:
        """Forward and backward one batch; return every sample's factors for every hooked module.

        Non-finite losses or factors raise :class:`GradientError` naming the batch positions. Reading that
        verdict stops the host until the device has finished the batch's backward pass; ``defer_screen=True``
        leaves it to :meth:`BatchFactors.settle`, which the caller runs once it has queued its own work on the
        batch (:func:`sketchfisher.collect.factor_pass` does, so that the host prepares the next batch while the
        device works on this one).

        ``check``: weights whose whole-batch gradient is also computed (``BatchFactors.batch_grads``), so
        that a caller can verify that the per-sample gradients formed from the factors sum to it (they do
        not when the loss reaches a weight other than through its module's output)."""
        if not self._active:
            raise RuntimeError("FactorCapture.run must be called inside 'with FactorCapture(...)'")
        self._records.clear()
        try:
            losses = check_losses(loss_fn(self.model, batch), "FactorCapture.run", batch_size_of(batch), finite=False)
            B = losses.shape[0]
            calls = [(name, x, y) for name in self.names for x, y in self._records.get(name, [])]
            absent = [n for n in self.names if n not in self._records]
            if absent:
                raise InputError(f"modules {absent[:3]} were not called by loss_fn's forward pass")
            grads = torch.autograd.grad(losses.sum(), [y for _, _, y in calls] + list(check), allow_unused=True)
            batch_grads = list(grads[len(calls):])
            grads = grads[:len(calls)]
            # the outputs themselves are not needed again (only what a zero gradient in their place would be)
            calls = [(name, x, (y.shape, y.dtype, y.device)) for name, x, y in calls]
        finally:
            self._records.clear()
        mask = token_mask if token_mask is not None else token_mask_of(batch)
        A: dict[str, list[torch.Tensor]] = {}
        D: dict[str, list[torch.Tensor]] = {}
        grads, masked = list(grads), {}  # masked: one masked copy per distinct input (q, k and v share theirs)
        seq_len = mask.shape[1] if mask is not None else batch_geometry_len(batch)
        for i, (name, x, y) in enumerate(calls):
            dy, grads[i] = grads[i], None  # (each output's gradient is let go once its factor is formed)
            dy = torch.zeros(y[0], dtype=y[1], device=y[2]) if dy is None else dy
            a, d = _tokens(x, B, name, seq_len), _tokens(dy, B, name, seq_len)  # (not part of any graph)
            if mask is not None and a.shape[1] == mask.shape[1]:
                keep = mask.to(device=a.device, dtype=a.dtype)[:, :, None]
                # inputs read by several modules are views of one tensor (each alive in ``calls`` through the loop)
                key = _storage_key(x)
                if key not in masked:
                    masked[key] = a * keep
                a, d = masked[key], d * keep
            A.setdefault(name, []).append(a)
            D.setdefault(name, []).append(d)
        del masked
        out_a = {n: v[0] if len(v) == 1 else torch.cat(v, dim=1) for n, v in A.items()}  # several calls: more tokens
        out_d = {n: v[0] if len(v) == 1 else torch.cat(v, dim=1) for n, v in D.items()}
        screen = Screen(losses.detach(), out_a, out_d)
        if not defer_screen:
            screen.settle()
        # real tokens per sample (left on the device: reading them here would stop the host)
        lengths = (mask.sum(1).to(torch.long) if mask is not None
                   else torch.full((B,), next(iter(out_a.values())).shape[1], dtype=torch.long))
        return BatchFactors(losses=losses.detach(), A=out_a, D=out_d, lengths=lengths,
                            transposed=self.transposed,
                            source_dtype={name: y[1] for name, _, y in calls}, batch_grads=batch_grads,
                            screen=screen)


def batch_geometry_len(batch: Any) -> Optional[int]:
    """The sequence length of a batch of token ids (``input_ids [B, T]``), when it has one."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None


def _tokens(t: torch.Tensor, batch_size: int, name: str, seq_len: Optional[int] = None) -> torch.Tensor:
    """Reshape a module input/output-grad to ``[B, T, features]`` (``[B, f]`` becomes T = 1), in fp32 or, where it
    is bf16/fp16, in its own dtype (:class:`BatchFactors`).

    Modules that see the batch's tokens flattened, ``[B·T, f]`` (OPT's MLP, MoE shared experts), are
    unflattened with the batch's sequence length ``seq_len``. A module that sees another number of
    tokens (routed experts: a varying subset) cannot be attributed to samples and is refused."""
    if t.ndim == 2 and seq_len is not None and t.shape[0] == batch_size * seq_len and seq_len > 1:
        return _kept(t.reshape(batch_size, seq_len, t.shape[-1]))
    if t.ndim >= 2 and t.shape[0] == 1 and batch_size > 1:
        raise CaptureUnsupported(f"module {name!r} was also called on an input shared by the whole batch (shape "
                         f"{tuple(t.shape)}; e.g. DeBERTa's relative-position embeddings through query_proj/key_proj): "
                         "batched per-sample factors cannot separate it; use sf.Exact() for this model")
    if t.ndim < 2 or t.shape[0] != batch_size:
        raise CaptureUnsupported(
            f"module {name!r} saw a tensor of shape {tuple(t.shape)}; expected batch-first [B={batch_size}, ..., "
            f"features] or the batch's tokens flattened [B·T={batch_size}·{seq_len}, features]; a module that sees "
            "a routed subset of tokens (MoE experts) cannot be attributed to samples: collect modules='attention'"
        )
    return _kept(t.reshape(batch_size, -1, t.shape[-1]))


def _kept(t: torch.Tensor) -> torch.Tensor:
    """Factors in the dtype they are kept in: half precision as it is, anything else in fp32."""
    return t if t.dtype in (torch.bfloat16, torch.float16) else t.float()
