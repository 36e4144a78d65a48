"""Test configuration: hypothesis runs derandomized, so every run checks the same examples.

Without a CUDA device, Triton kernels run in Triton's interpreter (``tests/test_kernels.py``); the
switch is read when triton is first imported, so it is set here, before anything imports it.
"""

import os
import shutil

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("sketchfisher", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("sketchfisher")
