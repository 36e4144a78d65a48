"""Exceptions raised by sketchfisher. Every one is a ``ValueError`` so callers can catch bad input."""


class SketchfisherError(ValueError):
    """Base class: bad input or an inconsistent artifact. The message names what was expected and found."""


class LayoutError(SketchfisherError):
    """A model's attention weights do not match any declared QK-OV layout."""


class InputError(SketchfisherError):
    """A user-supplied argument, batch or loss has the wrong shape, dtype or value."""


class GradientError(SketchfisherError):
    """A per-sample gradient (or loss) is NaN or infinite."""
