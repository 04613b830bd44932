"""Tests of the backend selection every kernel shares (elastic_fx.kernels._dispatch).

No kernel runs here: ``use_triton`` only reads the device type, the backend name, the
``ELASTIC_FX_FORCE_TRITON`` variable and whether Triton's interpreter is on.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from elastic_fx.kernels import _dispatch  # noqa: E402
from elastic_fx.kernels._dispatch import BACKENDS, FORCE_TRITON_ENV, use_triton  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("interpreted", [False, True])
def test_torch_backend_and_auto_on_cpu_pick_the_reference(monkeypatch, interpreted):
    monkeypatch.setattr(_dispatch, "_INTERPRETED", interpreted)
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    for device in (CPU, CUDA):
        assert use_triton(device, "torch") is False
    assert use_triton(CPU, "auto") is False


def test_compiled_mode(monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRETED", False)
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    assert use_triton(CUDA, "auto") and use_triton(CUDA, "triton")
    assert use_triton(CUDA, "auto", interpreter_cpu_only=True)
    with pytest.raises(ValueError, match=r"myop: the Triton backend got cpu tensors.*TRITON_INTERPRET=1"):
        use_triton(CPU, "triton", op="myop")
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton(CPU, "auto")


def test_interpreted_mode(monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRETED", True)
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    assert use_triton(CPU, "triton")
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    assert use_triton(CPU, "auto")
    # kernels that address memory by raw host offsets run interpreted on CPU tensors only
    assert use_triton(CUDA, "auto") and not use_triton(CUDA, "auto", interpreter_cpu_only=True)
    with pytest.raises(ValueError, match=r"sqgrad: backend='triton' got CUDA tensors while TRITON_INTERPRET=1"):
        use_triton(CUDA, "triton", op="sqgrad", interpreter_cpu_only=True)


def test_unknown_backend_names_the_choices():
    assert BACKENDS == ("auto", "triton", "torch")
    with pytest.raises(ValueError, match=r"myop: backend must be one of .*got backend='cuda'"):
        use_triton(CPU, "cuda", op="myop")
