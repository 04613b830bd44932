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
    # The test models are tiny: one thread avoids oversubscription overhead on small CPUs.
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def traced():
    """traced(name) -> (model, inputs, gm, smap) for a zoo entry, built and traced once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            import elastic_fx as efx
            from zoo import build

            model, inputs = build(name)
            gm = efx.trace(model, inputs)
            cache[name] = (model, inputs, gm, efx.discover(gm))
        return cache[name]

    return get
