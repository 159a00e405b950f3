"""Triton kernels of the fused step (installed as fusedopt.triton_kernels).

The four launches of docs/kernel_contract.md, each a module with its kernel and launcher:
grad_norm (read-only reduction over the gradients), tensor_reduce (per-tensor sums of per-block
partials, fixed order), finalize (global norm, clip, found_inf, step counts, loss scale) and
update (one traversal kernel; each algorithm's element math in algorithms/<name>.py).
"""
from .finalize import finalize
from .grad_norm import grad_norm
from .tensor_reduce import tensor_reduce
from .update import update

__all__ = ["grad_norm", "tensor_reduce", "finalize", "update"]
