"""Test setup: without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors.

The variable must be set before triton is imported, hence here. No CUDA query runs at import
time beyond torch.cuda.is_available(), which is safe without a driver.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusedopt.engine import backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_backends():
    """The kernel backends this machine can run: Triton everywhere (interpreted on CPU), CUDA
    where the extension is built and a GPU is present."""
    names = []
    if backends.available("triton"):
        names.append("triton")
    if DEVICE == "cuda" and backends.available("cuda"):
        names.append("cuda")
    return names


@pytest.fixture(params=kernel_backends() or [pytest.param("triton", marks=pytest.mark.skip(
    reason="triton is not installed"))])
def kernel_backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE
