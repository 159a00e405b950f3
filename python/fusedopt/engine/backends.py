"""Backend selection: which implementation of docs/kernel_contract.md runs a device's step.

"reference" is the per-tensor PyTorch math of fusedopt.engine.reference (any device, any float dtype,
syncs); "triton" and "cuda" are the fused kernels (CUDA tensors, fp32/bf16/fp16, no sync).
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# backend="auto" on CUDA tensors tries these in order. Triton comes first: on an H200, one run
# (bench/results/step_h200_bb14aa9.md, step_small_h200_ec60458.md), its pipelined chunks take
# less GPU time than the CUDA kernel's one pass a block at every shape and dtype timed (1.1B
# fp32 8.31 against 9.30 ms, bf16 6.55 against 7.87; GPT-2 fp32 0.98 against 1.09; 1200 tensors
# under CUDA graphs 0.75 against 0.95), statistics add 0.4% on Triton and 31% on CUDA, and the
# low-precision tier is faster on Triton in every mode. Only the eager 1200-tensor step, bound
# by the host, came out faster on CUDA (1.40 against 1.51 ms). CUDA runs where Triton is not
# installed.
AUTO_GPU_ORDER = ("triton", "cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(name: str) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return importlib.util.find_spec("triton") is not None
    if name == "cuda":
        from fusedopt import cuda_backend
        return cuda_backend.is_available()
    return False


# The low-precision tier's options, by the backends that implement them: master weights for
# bf16 params (fusedopt/engine/master.py), bf16 state with stochastic rounding
# (fusedopt/engine/stochastic.py) and 8-bit state (fusedopt/engine/int8.py) are in every
# backend, the kernels doing the specifications' operations (the Triton update,
# csrc/update.cu). 'auto' skips a backend missing from a feature's entry, and an explicit one is
# refused by name (check_features).
FEATURE_BACKENDS = {"master_weight_bits": ("reference", "triton", "cuda"),
                    "state_dtype='bf16'": ("reference", "triton", "cuda"),
                    "state_dtype='int8'": ("reference", "triton", "cuda")}


def check_features(name: str, needs) -> None:
    """Refuse an explicit backend that lacks a feature the optimizer was asked for."""
    for feature in needs:
        if name != "auto" and name not in FEATURE_BACKENDS[feature]:
            raise ValueError(f"{feature}: backend={name!r} does not implement it; use one of "
                             f"{FEATURE_BACKENDS[feature]} or 'auto'")


def resolve(name: str, device: torch.device, dtypes, needs=()) -> str:
    """The concrete backend for the tensors of one device; a clear error if it cannot run them.
    `needs`: FEATURE_BACKENDS keys this device's tensors use; 'auto' picks a backend that has
    them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    check_features(name, needs)
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        for candidate in AUTO_GPU_ORDER:
            if any(candidate not in FEATURE_BACKENDS[feature] for feature in needs):
                continue
            if available(candidate):
                name = candidate
                break
        else:
            return "reference"
    if name == "reference":
        return name
    for dtype in dtypes:
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"params: backend={name!r} supports float32, bfloat16 and float16 "
                            f"parameters, got {dtype}; use backend='reference' for {dtype}")
    if name == "triton":
        if not available("triton"):
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(f"backend='triton' runs on CUDA tensors; params are on {device}. "
                               "(CPU tensors run only under TRITON_INTERPRET=1, for tests.)")
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' runs on CUDA tensors; params are on {device}")
        if not available("cuda"):
            raise RuntimeError("backend='cuda' needs the compiled extension fusedopt._C, which "
                               "is not built: reinstall with nvcc on PATH and without "
                               "FUSEDOPT_SKIP_CUDA_BUILD (pip install -e .; `python -m fusedopt "
                               "info` shows what is installed), or use backend='triton'")
    return name


def kernels(name: str):
    """The module holding grad_norm, tensor_reduce, finalize and update for a kernel backend."""
    if name == "triton":
        return importlib.import_module("fusedopt.triton_kernels")
    if name == "cuda":
        return importlib.import_module("fusedopt.cuda_backend")
    raise ValueError(f"{name!r} is not a kernel backend")
