"""The CUDA C++ backend: the four launches of docs/kernel_contract.md on fusedopt._C.

Same functions and signatures as fusedopt.triton_kernels, so the engine switches backend by
module. Each function checks its tensors (dtype, shape, contiguity, one CUDA device; errors name
the argument), then passes raw pointers, sizes, dtype codes, the device index and the device's
current stream to the compiled module, which launches on that stream and never synchronizes
(CUDA-graph capturable, like the Triton kernels). Params and grads are not arguments: the kernels
reach them through the addresses in the tensor table, which the engine fills and checks.

The update takes the low-precision tier as the Triton kernel does: fp32 or bf16 state (stored
rounded stochastically, fusedopt/engine/stochastic.py), 8-bit state (uint8 codes beside one
scale byte per group of 32 elements, fusedopt/engine/int8.py) and master weights for bf16 params
(a remainder beside the state, fusedopt/engine/master.py).

fusedopt._C is imported on first use, so importing this module needs neither the extension nor
a GPU. It is built by `pip install -e .` when nvcc is found (see setup.py).
"""
from __future__ import annotations

import functools
import importlib
import operator

import torch

from fusedopt.engine import int8, layout, master

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The update's state buffers: fp32, or bf16 rounded stochastically; or, with their group scale
# bytes (scale1, scale2), the uint8 codes of 8-bit state.
STATE_DTYPES = (torch.float32, torch.bfloat16)
# Storage dtype codes of csrc/launchers.h (fusedopt::Dtype), and the state's (StateDtype).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_STATE_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, int8.CODES_DTYPE: 3}

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


def schema() -> dict:
    """The schema numbers the kernels were compiled with (fusedopt._C.schema(); see
    tests/test_schema.py, which compares them with fusedopt.engine.layout)."""
    return _load().schema()


@functools.lru_cache(maxsize=None)
def _compiled_algorithms(module) -> dict:
    """{name: {"code", "hyper", "states", "stats", "stat_ops"}} of a loaded extension."""
    return module.schema()["algorithms"]


def _check(name, tensor, dtypes, ndim, *, optional=False, contiguous=False):
    """Type, dtype, rank and layout of one tensor argument; returns it (or None if optional).

    A 2-D table may be a row view (row stride >= its length) unless `contiguous`: the tensor
    table and the hyper table are addressed with their row length as the row stride."""
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
    if ndim == 1 or contiguous:
        dense = tensor.is_contiguous()
    else:
        rows, length = tensor.shape
        dense = ((tensor.stride(1) == 1 or length <= 1)
                 and (rows <= 1 or tensor.stride(0) >= length))
    if not dense:
        rule = "contiguous" if ndim == 1 or contiguous else (
            "contiguous (stride 1 along its last dimension, rows apart)")
        raise ValueError(f"{name} must be {rule}, got shape {tuple(tensor.shape)} and strides "
                         f"{tensor.stride()}")
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


def _storage_dtype(dtype):
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return _DTYPE_CODES[dtype]


def _tensor_table(tensor_table):
    """Checks the tensor table int64 [TABLE_ROWS, T] (contiguous); returns T."""
    _check("tensor_table", tensor_table, (torch.int64,), 2, contiguous=True)
    if tensor_table.shape[0] != layout.TABLE_ROWS:
        raise ValueError(f"tensor_table must have shape ({layout.TABLE_ROWS}, T), got "
                         f"{tuple(tensor_table.shape)}")
    return tensor_table.shape[1]


def _host_int(name, value):
    """A size the host knows, as a Python int; a tensor is refused (reading it would sync)."""
    if isinstance(value, torch.Tensor) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return operator.index(value)


def _segment(tensor_block_start, num_blocks, tensor_offset, tensor_table):
    """Checks a segment against the device's tensor table: tensor i of the segment owns blocks
    tensor_block_start[i] .. tensor_block_start[i + 1] - 1 (int32 [S + 1], its last entry
    num_blocks) and is the table's column tensor_offset + i. The entries stay on the device, so
    their consistency with num_blocks is the caller's to keep. Returns (S, B, tensor_offset, T)."""
    _check("tensor_block_start", tensor_block_start, (torch.int32,), 1)
    num_segment_tensors = tensor_block_start.numel() - 1
    if num_segment_tensors < 0:
        raise ValueError("tensor_block_start must hold S + 1 entries for the segment's S tensors, "
                         "got 0")
    num_tensors = _tensor_table(tensor_table)
    num_blocks = _host_int("num_blocks", num_blocks)
    tensor_offset = _host_int("tensor_offset", tensor_offset)
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if num_blocks and not num_segment_tensors:
        raise ValueError(f"tensor_block_start holds no tensors (1 entry), but num_blocks is "
                         f"{num_blocks}")
    if tensor_offset < 0 or tensor_offset + num_segment_tensors > num_tensors:
        raise ValueError(f"tensor_offset {tensor_offset} + {num_segment_tensors} tensors exceeds "
                         f"tensor_table's {num_tensors} columns")
    return num_segment_tensors, num_blocks, tensor_offset, num_tensors


def grad_norm(dtype, tensor_block_start, num_blocks, tensor_offset, tensor_table, scale,
              block_sums) -> None:
    """block_sums[0, b] = sum of (grad / scale)^2 over block b (fp32), block_sums[1, b] = 1.0 if
    any such value is inf/NaN, for the num_blocks blocks of one segment whose grads (at the
    table's GRAD_ADDR) have storage dtype `dtype`; the segment's tensors are tensor_block_start's
    (see _segment). scale None means 1; skipped tensors give 0, 0."""
    c = _load()
    code = _storage_dtype(dtype)
    num_segment_tensors, num_blocks, tensor_offset, num_tensors = _segment(
        tensor_block_start, num_blocks, tensor_offset, tensor_table)
    _check("scale", scale, (torch.float32,), 1, optional=True)
    _shape("scale", scale, (1,))
    _check("block_sums", block_sums, (torch.float32,), 2)
    _shape("block_sums", block_sums, (2, num_blocks))
    device = _device(tensor_block_start=tensor_block_start, tensor_table=tensor_table,
                     scale=scale, block_sums=block_sums)
    index, stream = _launch_context(device)
    c.grad_norm(dtype=code, tensor_block_start=tensor_block_start.data_ptr(),
                num_segment_tensors=num_segment_tensors, num_blocks=num_blocks,
                tensor_offset=tensor_offset, tensor_table=tensor_table.data_ptr(),
                num_tensors=num_tensors, scale=_ptr(scale), block_sums=block_sums.data_ptr(),
                block_sums_stride=_row_stride(block_sums), device=index, stream=stream)


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
    if any(op not in (layout.OP_SUM, layout.OP_MIN, layout.OP_MAX) for op in ops):
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


def finalize(tensor_sums, tensor_table, tensor_step, globals_, scale, growth_tracker, found_inf_in,
             max_grad_norm, growth_factor, backoff_factor, growth_interval, update_scale) -> None:
    """Global norm, clip coefficient, found_inf, step counts (tensors with GROUP >= 0), skipped
    steps and loss scale into globals_ (see the contract). tensor_sums may hold more columns than
    the table has tensors (every device's). max_grad_norm <= 0: no clipping. update_scale False:
    scale is read (INV_SCALE) but scale and growth_tracker are left as they are."""
    c = _load()
    _check("tensor_sums", tensor_sums, (torch.float32,), 2)
    if tensor_sums.shape[0] != 2:
        raise ValueError(f"tensor_sums must have shape (2, T), got {tuple(tensor_sums.shape)}")
    num_tensors = _tensor_table(tensor_table)
    _check("tensor_step", tensor_step, (torch.float32,), 1)
    _shape("tensor_step", tensor_step, (num_tensors,))
    _check("globals_", globals_, (torch.float32,), 1)
    _shape("globals_", globals_, (layout.GLOBAL_SLOTS,))
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
    device = _device(tensor_sums=tensor_sums, tensor_table=tensor_table, tensor_step=tensor_step,
                     globals_=globals_, scale=scale, growth_tracker=growth_tracker,
                     found_inf_in=found_inf_in)
    index, stream = _launch_context(device)
    c.finalize(tensor_sums=tensor_sums.data_ptr(), sums_stride=_row_stride(tensor_sums),
               num_tensors_all=tensor_sums.shape[1], tensor_table=tensor_table.data_ptr(),
               tensor_step=tensor_step.data_ptr(), num_tensors_dev=num_tensors,
               globals=globals_.data_ptr(), scale=_ptr(scale),
               growth_tracker=_ptr(growth_tracker) if update_scale else 0,
               found_inf_in=_ptr(found_inf_in), max_grad_norm=float(max_grad_norm),
               growth_factor=float(growth_factor), backoff_factor=float(backoff_factor),
               growth_interval=int(growth_interval), update_scale=update_scale, device=index,
               stream=stream)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _check_master(dtype, remainder, master_bits, state1):
    """The master-weight arguments of update: remainder None with master_bits 0, or a remainder of
    state1's shape (int16 for 32 bits, uint8 for 24) beside bfloat16 params."""
    if master_bits not in (0,) + master.BITS:
        raise ValueError(f"master_bits must be 0, 24 or 32, got {master_bits!r}")
    if remainder is None:
        if master_bits:
            raise ValueError(f"remainder is required with master_bits {master_bits} (the masters' "
                             "low bits), got None")
        return
    if not master_bits:
        raise ValueError("remainder must be None when master_bits is 0 (no master weights)")
    if dtype != torch.bfloat16:
        raise ValueError(f"remainder: master weights are kept for bfloat16 params, got dtype "
                         f"{_dtype_name(dtype)}")
    expected = master.REMAINDER_DTYPES[master_bits]
    if isinstance(remainder, torch.Tensor) and remainder.dtype != expected:
        raise ValueError(f"remainder must have dtype {_dtype_name(expected)} for master_bits "
                         f"{master_bits}, got {_dtype_name(remainder.dtype)}")
    _check("remainder", remainder, (expected,), 1)
    _shape("remainder", remainder, tuple(state1.shape))


def _check_scales(algorithm, states, state1, scale1, scale2):
    """The 8-bit state's arguments of update: with uint8 state (codes), each state's group scale
    bytes, uint8 [state1.numel() // int8.GROUP] (scale2 None for a one-state algorithm); None for
    fp32 and bf16 state. Returns whether the state is 8-bit."""
    codes = isinstance(state1, torch.Tensor) and state1.dtype == int8.CODES_DTYPE
    if codes and state1.dim() == 1 and state1.numel() % int8.GROUP:
        raise ValueError(f"state1 of 8-bit state must hold whole groups of {int8.GROUP} codes, "
                         f"got {state1.numel()} elements")
    for name, scale, needed in (("scale1", scale1, True), ("scale2", scale2, states == 2)):
        if scale is None:
            if codes and needed:
                raise ValueError(f"{name} is required with uint8 state (8-bit codes, "
                                 f"fusedopt/engine/int8.py): one scale byte per {int8.GROUP} "
                                 "elements, got None")
            continue
        if not needed:
            raise ValueError(f"{name} must be None for algorithm {algorithm!r} (one state buffer)")
        if not codes:
            got = _dtype_name(state1.dtype) if isinstance(state1, torch.Tensor) else "no tensor"
            raise ValueError(f"{name} must be None unless the state is uint8 (8-bit codes), got "
                             f"state1 of {got}")
        _check(name, scale, (int8.CODES_DTYPE,), 1)
        _shape(name, scale, (state1.numel() // int8.GROUP,))
    return codes


def update(algorithm, dtype, tensor_block_start, num_blocks, tensor_offset, tensor_table, state1,
           state2, tensor_step, hyper, globals_, stats_partials, remainder=None, master_bits=0,
           scale1=None, scale2=None) -> None:
    """One step of `algorithm` (a name of layout.ALGORITHMS) over the num_blocks blocks of one
    segment (tensor_block_start, tensor_offset: see _segment) whose params and grads (at the
    table's addresses) have storage dtype `dtype`. state1, state2: the algorithm's state buffers
    in declaration order, float32, bfloat16 (bf16 state, stored rounded stochastically) or uint8
    (8-bit state's codes, with scale1 / scale2), one shape and dtype, holding each tensor's state
    from the table's STATE_START on (state2 None for a one-state algorithm); their size against
    the table is the caller's to keep, as the table lives on the device. stats_partials, if
    given, float32 [C, num_blocks] receives the per-block statistics partials (C = the
    algorithm's statistics columns). remainder, master_bits: master
    weights for bfloat16 params (fusedopt/engine/master.py), the masters' low bits laid out like
    the state, int16 for master_bits 32 and uint8 for 24; None and 0 without them. scale1,
    scale2: 8-bit state's group scale bytes (fusedopt/engine/int8.py), uint8, one per
    int8.GROUP state elements (element e's at e // int8.GROUP); None for fp32 / bf16 state."""
    c = _load()
    if algorithm not in layout.ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, layout.ALGORITHMS))}, "
                         f"got {algorithm!r}")
    compiled = _compiled_algorithms(c)
    if algorithm not in compiled:
        raise ValueError(f"algorithm {algorithm!r} is not in the built fusedopt._C (it has "
                         f"{', '.join(map(repr, compiled))}): rebuild it with `pip install -e .`")
    states, stats = compiled[algorithm]["states"], compiled[algorithm]["stats"]
    code = _storage_dtype(dtype)
    num_segment_tensors, num_blocks, tensor_offset, num_tensors = _segment(
        tensor_block_start, num_blocks, tensor_offset, tensor_table)
    int8_state = _check_scales(algorithm, states, state1, scale1, scale2)
    state_dtypes = (int8.CODES_DTYPE,) if int8_state else STATE_DTYPES
    _check("state1", state1, state_dtypes, 1)
    if states == 2:
        _check("state2", state2, state_dtypes, 1)
        _shape("state2", state2, tuple(state1.shape))
        if state2.dtype != state1.dtype:
            raise ValueError(f"state2 must have state1's dtype ({_dtype_name(state1.dtype)}), got "
                             f"{_dtype_name(state2.dtype)}")
    elif state2 is not None:
        raise ValueError(f"state2 must be None for algorithm {algorithm!r} (one state buffer)")
    _check_master(dtype, remainder, master_bits, state1)
    _check("tensor_step", tensor_step, (torch.float32,), 1)
    _shape("tensor_step", tensor_step, (num_tensors,))
    _check("hyper", hyper, (torch.float32,), 2, contiguous=True)
    if hyper.shape[1] != layout.HYPER_COLUMNS or (num_blocks and not hyper.shape[0]):
        raise ValueError(f"hyper must have shape (G, {layout.HYPER_COLUMNS}) with G >= 1, got "
                         f"{tuple(hyper.shape)}")
    _check("globals_", globals_, (torch.float32,), 1)
    _shape("globals_", globals_, (layout.GLOBAL_SLOTS,))
    _check("stats_partials", stats_partials, (torch.float32,), 2, optional=True)
    _shape("stats_partials", stats_partials, (stats, num_blocks))
    device = _device(tensor_block_start=tensor_block_start, tensor_table=tensor_table,
                     state1=state1, state2=state2, remainder=remainder, scale1=scale1,
                     scale2=scale2, tensor_step=tensor_step, hyper=hyper, globals_=globals_,
                     stats_partials=stats_partials)
    index, stream = _launch_context(device)
    c.update(algorithm=algorithm, dtype=code, tensor_block_start=tensor_block_start.data_ptr(),
             num_segment_tensors=num_segment_tensors, num_blocks=num_blocks,
             tensor_offset=tensor_offset, tensor_table=tensor_table.data_ptr(),
             num_tensors=num_tensors, state1=state1.data_ptr(), state2=_ptr(state2),
             state_dtype=_STATE_DTYPE_CODES[state1.dtype], tensor_step=tensor_step.data_ptr(),
             hyper=hyper.data_ptr(), globals=globals_.data_ptr(),
             stats_partials=_ptr(stats_partials),
             stats_stride=_row_stride(stats_partials) if stats_partials is not None else 0,
             remainder=_ptr(remainder), master_bits=int(master_bits), scale1=_ptr(scale1),
             scale2=_ptr(scale2), device=index, stream=stream)
