"""The one progress-bar helper (tqdm), switchable off globally with SKETCHFISHER_PROGRESS=0."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled or os.environ.get("SKETCHFISHER_PROGRESS", "1") == "0":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False)
