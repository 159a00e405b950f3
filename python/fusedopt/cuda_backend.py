"""The CUDA C++ backend: the four launches of docs/kernel_contract.md on fusedopt._C.

Same functions and signatures as fusedopt.triton_kernels, so the optimizer switches backend by
module. Each function checks its tensors (dtype, shape, contiguity, one CUDA device; errors name
the argument), then passes raw pointers, sizes, dtype codes, the device index and the device's
current stream to the compiled module, which launches on that stream and never synchronizes
(CUDA-graph capturable, like the Triton kernels).

fusedopt._C is imported on first use, so importing this module needs neither the extension nor
a GPU. It is built by `pip install -e .` when nvcc is found (see setup.py).
"""
from __future__ import annotations

import importlib

import torch

from fusedopt import flat
from fusedopt.flat import BLOCK

NUM_GLOBALS = flat.GLOBAL_SLOTS
NUM_HYPER = flat.HYPER_COLUMNS
STAT_COLUMNS = {"adam": len(flat.ADAM_STAT_COLUMNS), "sgd": len(flat.SGD_STAT_COLUMNS)}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Storage dtype codes of csrc/launchers.h (fusedopt::Dtype).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

BUILD_HINT = (
    "the CUDA backend needs the compiled extension fusedopt._C, which is not built. Build it with "
    "a CUDA toolkit (nvcc on PATH, or CUDACXX / CUDA_HOME set) and cmake: `pip install -e .` "
    "(offline: `pip install --no-build-isolation --no-deps -e .`). FUSEDOPT_CUDA_ARCHS picks the "
    "GPU architectures (default '80;90'), MAX_JOBS the parallel compile jobs. Or use "
    "backend='triton'.")

_module = None


def _load():
    """fusedopt._C, imported once; an ImportError that says how to build it if missing."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("fusedopt._C")
        except ImportError as err:
            raise ImportError(f"{BUILD_HINT} (import failed: {err})") from err
    return _module


def is_available() -> bool:
    """True when fusedopt._C is built and a CUDA device is present (no device is initialized)."""
    try:
        _load()
    except ImportError:
        return False
    return torch.cuda.is_available()


def _check(name, tensor, dtypes, ndim, *, optional=False):
    """Type, dtype, rank and layout of one tensor argument; returns it (or None if optional)."""
    if tensor is None:
        if optional:
            return None
        raise TypeError(f"{name} is required, got None")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {str(tensor.dtype).replace('torch.', '')}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    # Rows of a 2-D table may be views with a larger row stride; elements within a row are dense
    # and rows do not overlap.
    if ndim == 1:
        dense = tensor.is_contiguous()
    else:
        rows, length = tensor.shape
        dense = ((tensor.stride(1) == 1 or length <= 1)
                 and (rows <= 1 or tensor.stride(0) >= length))
    if not dense:
        raise ValueError(f"{name} must be contiguous (stride 1 along its last dimension, rows "
                         f"apart), got shape {tuple(tensor.shape)} and strides {tensor.stride()}")
    return tensor


def _shape(name, tensor, expected):
    if tensor is not None and tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def _row_stride(tensor):
    """Elements between the rows of a 2-D table (a single row's stride is meaningless)."""
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


def _device(**tensors):
    """The one CUDA device all given tensors (None skipped) are on; an error naming the first
    tensor that is elsewhere."""
    device = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got device {tensor.device}")
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, but the other tensors are on {device}")
    return device


def _launch_context(device):
    """(device index, current stream handle) for launching on `device`."""
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _ptr(tensor):
    return 0 if tensor is None else tensor.data_ptr()


def _num_blocks(name, tensor):
    if tensor.numel() % BLOCK:
        raise ValueError(f"{name} must hold a whole number of {BLOCK}-element blocks, "
                         f"got {tensor.numel()} elements")
    return tensor.numel() // BLOCK


def _layout(block_tensor, tensor_end, tensor_group, num_blocks):
    _check("block_tensor", block_tensor, (torch.int32,), 1)
    _shape("block_tensor", block_tensor, (num_blocks,))
    _check("tensor_end", tensor_end, (torch.int64,), 1)
    _check("tensor_group", tensor_group, (torch.int32,), 1)
    _shape("tensor_group", tensor_group, tensor_end.shape)


def grad_norm(grad, block_tensor, tensor_end, tensor_group, scale, block_sums) -> None:
    """block_sums[0, b] = sum of (grad / scale)^2 over block b (fp32), block_sums[1, b] = 1.0 if
    any such value is inf/NaN. scale None means 1; skipped tensors (group -1) give 0, 0."""
    c = _load()
    _check("grad", grad, KERNEL_DTYPES, 1)
    num_blocks = _num_blocks("grad", grad)
    _layout(block_tensor, tensor_end, tensor_group, num_blocks)
    _check("scale", scale, (torch.float32,), 1, optional=True)
    _shape("scale", scale, (1,))
    _check("block_sums", block_sums, (torch.float32,), 2)
    _shape("block_sums", block_sums, (2, num_blocks))
    device = _device(grad=grad, block_tensor=block_tensor, tensor_end=tensor_end,
                     tensor_group=tensor_group, scale=scale, block_sums=block_sums)
    index, stream = _launch_context(device)
    c.grad_norm(grad=grad.data_ptr(), dtype=_DTYPE_CODES[grad.dtype], num_blocks=num_blocks,
                block_tensor=block_tensor.data_ptr(), tensor_end=tensor_end.data_ptr(),
                tensor_group=tensor_group.data_ptr(), scale=_ptr(scale),
                block_sums=block_sums.data_ptr(), block_sums_stride=_row_stride(block_sums),
                device=index, stream=stream)


def tensor_reduce(block_values, tensor_block_start, ops, out, tensor_offset) -> None:
    """out[c, tensor_offset + t] = ops[c] (0 sum in fp64, 1 min, 2 max) over block_values[c, :]
    of tensor t's blocks tensor_block_start[t] .. tensor_block_start[t + 1] - 1."""
    c = _load()
    _check("block_values", block_values, (torch.float32,), 2)
    _check("tensor_block_start", tensor_block_start, (torch.int32,), 1)
    ops = tuple(int(op) for op in ops)
    if len(ops) != block_values.shape[0]:
        raise ValueError(f"ops must have one entry per row of block_values ({block_values.shape[0]}), "
                         f"got {len(ops)}")
    if any(op not in (0, 1, 2) for op in ops):
        raise ValueError(f"ops must be 0 (sum), 1 (min) or 2 (max), got {ops}")
    _check("out", out, (torch.float32,), 2)
    if out.shape[0] != len(ops):
        raise ValueError(f"out must have {len(ops)} rows (one per op), got shape {tuple(out.shape)}")
    num_tensors = tensor_block_start.numel() - 1
    if num_tensors < 0:
        raise ValueError("tensor_block_start must hold num_tensors + 1 entries, got 0")
    tensor_offset = int(tensor_offset)
    if tensor_offset < 0 or tensor_offset + num_tensors > out.shape[1]:
        raise ValueError(f"tensor_offset {tensor_offset} + {num_tensors} tensors exceeds out's "
                         f"{out.shape[1]} columns")
    device = _device(block_values=block_values, tensor_block_start=tensor_block_start, out=out)
    index, stream = _launch_context(device)
    c.tensor_reduce(block_values=block_values.data_ptr(), values_stride=_row_stride(block_values),
                    tensor_block_start=tensor_block_start.data_ptr(), num_tensors=num_tensors,
                    ops=list(ops), out=out.data_ptr(), out_stride=_row_stride(out),
                    tensor_offset=tensor_offset, device=index, stream=stream)


def finalize(tensor_sums, tensor_group, tensor_step, globals_, scale, growth_tracker, found_inf_in,
             max_grad_norm, growth_factor, backoff_factor, growth_interval, update_scale) -> None:
    """Global norm, clip coefficient, found_inf, step counts, skipped steps and loss scale into
    globals_ (see the contract). max_grad_norm <= 0: no clipping. update_scale False: scale is
    read (INV_SCALE) but scale and growth_tracker are left as they are."""
    c = _load()
    _check("tensor_sums", tensor_sums, (torch.float32,), 2)
    if tensor_sums.shape[0] != 2:
        raise ValueError(f"tensor_sums must have shape (2, T), got {tuple(tensor_sums.shape)}")
    _check("tensor_group", tensor_group, (torch.int32,), 1)
    _check("tensor_step", tensor_step, (torch.float32,), 1)
    _shape("tensor_step", tensor_step, tensor_group.shape)
    _check("globals_", globals_, (torch.float32,), 1)
    _shape("globals_", globals_, (NUM_GLOBALS,))
    _check("scale", scale, (torch.float32,), 1, optional=True)
    _shape("scale", scale, (1,))
    _check("growth_tracker", growth_tracker, (torch.int32,), 1, optional=True)
    _shape("growth_tracker", growth_tracker, (1,))
    _check("found_inf_in", found_inf_in, (torch.float32,), 1, optional=True)
    _shape("found_inf_in", found_inf_in, (1,))
    update_scale = bool(update_scale) and scale is not None
    if update_scale and growth_tracker is None:
        raise ValueError("growth_tracker is required when update_scale is True and scale is given")
    if update_scale and int(growth_interval) < 1:
        raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
    device = _device(tensor_sums=tensor_sums, tensor_group=tensor_group, tensor_step=tensor_step,
                     globals_=globals_, scale=scale, growth_tracker=growth_tracker,
                     found_inf_in=found_inf_in)
    index, stream = _launch_context(device)
    c.finalize(tensor_sums=tensor_sums.data_ptr(), sums_stride=_row_stride(tensor_sums),
               num_tensors_all=tensor_sums.shape[1], tensor_group=tensor_group.data_ptr(),
               tensor_step=tensor_step.data_ptr(), num_tensors_dev=tensor_group.numel(),
               globals=globals_.data_ptr(), scale=_ptr(scale),
               growth_tracker=_ptr(growth_tracker) if update_scale else 0,
               found_inf_in=_ptr(found_inf_in), max_grad_norm=float(max_grad_norm),
               growth_factor=float(growth_factor), backoff_factor=float(backoff_factor),
               growth_interval=int(growth_interval), update_scale=update_scale, device=index,
               stream=stream)


def update(optimizer, param, grad, moment1, moment2, block_tensor, tensor_end, tensor_group,
           tensor_step, hyper, globals_, stats_partials) -> None:
    """One Adam ("adam") or SGD ("sgd") step over a flat buffer (see the contract); moment1 is
    exp_avg / momentum_buffer, moment2 exp_avg_sq (Adam) or None (SGD). stats_partials, if
    given, receives the per-block statistics partials (6 rows for Adam, 3 for SGD)."""
    c = _load()
    if optimizer not in STAT_COLUMNS:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    adam = optimizer == "adam"
    _check("param", param, KERNEL_DTYPES, 1)
    num_blocks = _num_blocks("param", param)
    _check("grad", grad, (param.dtype,), 1)
    _shape("grad", grad, param.shape)
    _check("moment1", moment1, (torch.float32,), 1)
    _shape("moment1", moment1, param.shape)
    if adam:
        _check("moment2", moment2, (torch.float32,), 1)
        _shape("moment2", moment2, param.shape)
    elif moment2 is not None:
        raise ValueError("moment2 must be None for optimizer 'sgd'")
    _layout(block_tensor, tensor_end, tensor_group, num_blocks)
    _check("tensor_step", tensor_step, (torch.float32,), 1)
    _shape("tensor_step", tensor_step, tensor_group.shape)
    _check("hyper", hyper, (torch.float32,), 2)
    if hyper.shape[1] != NUM_HYPER or not hyper.is_contiguous():
        raise ValueError(f"hyper must be a contiguous (G, {NUM_HYPER}) table, got shape "
                         f"{tuple(hyper.shape)} and strides {hyper.stride()}")
    _check("globals_", globals_, (torch.float32,), 1)
    _shape("globals_", globals_, (NUM_GLOBALS,))
    _check("stats_partials", stats_partials, (torch.float32,), 2, optional=True)
    _shape("stats_partials", stats_partials, (STAT_COLUMNS[optimizer], num_blocks))
    device = _device(param=param, grad=grad, moment1=moment1, moment2=moment2,
                     block_tensor=block_tensor, tensor_end=tensor_end, tensor_group=tensor_group,
                     tensor_step=tensor_step, hyper=hyper, globals_=globals_,
                     stats_partials=stats_partials)
    index, stream = _launch_context(device)
    c.update(optimizer=optimizer, param=param.data_ptr(), grad=grad.data_ptr(),
             dtype=_DTYPE_CODES[param.dtype], moment1=moment1.data_ptr(), moment2=_ptr(moment2),
             num_blocks=num_blocks, block_tensor=block_tensor.data_ptr(),
             tensor_end=tensor_end.data_ptr(), tensor_group=tensor_group.data_ptr(),
             tensor_step=tensor_step.data_ptr(), hyper=hyper.data_ptr(),
             globals=globals_.data_ptr(),
             stats_partials=_ptr(stats_partials),
             stats_stride=_row_stride(stats_partials) if stats_partials is not None else 0,
             device=index, stream=stream)
