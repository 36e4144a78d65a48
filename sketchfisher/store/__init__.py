"""Contribution stores: safetensors shards plus a JSON manifest, resumable, reopened without the model."""

from .files import StoreError, StoreMismatchError
from .reader import StoreReader
from .writer import collect_to_store, stored_passes

__all__ = ["StoreError", "StoreMismatchError", "StoreReader", "collect_to_store", "stored_passes"]
