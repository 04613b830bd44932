"""Test-wide set-up.

Without CUDA the Triton kernels run under the interpreter; this must be decided before
anything imports triton, hence here and at import time.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
