"""Test configuration: hypothesis runs derandomized, so every run checks the same examples."""

from hypothesis import settings

settings.register_profile("sketchfisher", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("sketchfisher")
