"""Contribution stores: safetensors shards plus a JSON manifest, resumable, reopened without the model."""

from .files import StoreError, StoreMismatchError
from .reader import Store, open_store
from .writer import collect_to_store

__all__ = ["Store", "StoreError", "StoreMismatchError", "collect_to_store", "open_store"]
