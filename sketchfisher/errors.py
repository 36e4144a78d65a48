"""Exceptions raised by sketchfisher. Every one is a ``ValueError`` so callers can catch bad input."""


class SketchfisherError(ValueError):
    """Base class: bad input or an inconsistent artifact. The message names what was expected and found."""


class LayoutError(SketchfisherError):
    """A model's attention weights do not match any declared QK-OV layout."""


class InputError(SketchfisherError):
    """A user-supplied argument, batch or loss has the wrong shape, dtype or value."""


class GradientError(SketchfisherError):
    """A per-sample gradient (or loss) is NaN or infinite. ``positions`` are the offending samples'
    positions in their batch (when known), so that a caller that knows the batch can name the samples.

    A collection checks each batch without stopping the device after its backward pass: the error comes once
    the pass has queued its work on the bad batch, before the next batch runs and before anything holding that
    batch is written to a store."""

    def __init__(self, message: str, positions: list[int] | None = None):
        super().__init__(message)
        self.positions = positions


class CaptureUnsupported(InputError):
    """Batched factor capture cannot attribute a module's use to samples (a call on batch-shared inputs, or on
    a routed subset of tokens); per-sample autograd can."""

