"""The CUDA backend (fusedopt.cuda_backend over fusedopt._C), launch by launch.

CPU (CI): the wrapper imports without the extension or a GPU, says how to build a missing
extension, names the bad argument, passes pointers/sizes/strides to the binding under the
binding's own argument names, and the compiled module's own checks reject bad raw values.

GPU (marked gpu): each launch against plain torch on a segment whose params and grads sit where
owners put them (docs/kernel_contract.md): own allocations, a channels_last 4-D param, views into
one shared buffer at offsets that are not 16-byte aligned (scalar path) and at aligned ones (vector
path), an aligned param with an unaligned grad, a tensor without a gradient (GRAD_ADDR 0, skipped)
and a tensor of another segment in the same table; and a segment with empty tensors (no blocks)
among its others, behind two tensors of another segment. The expected update is the contract's
element math in fp32 torch ops in the kernels' order, so params and states must match bit for
bit; the statistics partials are checked against sums over the kernel's own outputs. Also:
found_inf (no byte written), bitwise repeats of the whole step, and a tensor above 2^31 elements
(memory-gated).
"""
import bisect
import importlib
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from fusedopt import cuda_backend
from fusedopt.engine import layout

BLOCK = layout.BLOCK
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUNCTIONS = ("grad_norm", "tensor_reduce", "finalize", "update")
# States and statistics columns per algorithm, as docs/kernel_contract.md lists them.
CONTRACT = {"adamw": dict(states=2, stats=6), "sgd": dict(states=1, stats=3),
            "lion": dict(states=1, stats=3)}


def _extension():
    """The compiled module itself (not cuda_backend's cached handle, which tests replace)."""
    try:
        return importlib.import_module("fusedopt._C")
    except ImportError:
        return None


@pytest.fixture
def cuda():
    """The CUDA device, or a skip saying what is missing (queried only when a test runs)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if _extension() is None:
        pytest.skip("fusedopt._C is not built (pip install -e . with nvcc on PATH)")
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------
# CPU: the Python wrapper and the binding's own checks
# ---------------------------------------------------------------------------------------------

class RecordingExtension:
    """Stands in for fusedopt._C: records each launch's keyword arguments; its schema holds the
    contract's state and statistics counts."""

    def __init__(self):
        self.calls = []

    def schema(self):
        return {"algorithms": {name: dict(counts) for name, counts in CONTRACT.items()}}

    def __getattr__(self, name):
        if name not in FUNCTIONS:
            raise AttributeError(name)
        return lambda **kwargs: self.calls.append((name, kwargs))


@pytest.fixture
def recorder(monkeypatch):
    """The wrapper on CPU tensors: a recording extension, a fake launch context (device 0,
    stream handle 1234) and a device check that accepts CPU tensors."""
    fake = RecordingExtension()
    monkeypatch.setattr(cuda_backend, "_module", fake)
    monkeypatch.setattr(cuda_backend, "_device", lambda **tensors: torch.device("cpu"))
    monkeypatch.setattr(cuda_backend, "_launch_context", lambda device: (0, 1234))
    return fake


def block_starts(sizes):
    """tensor_block_start of a segment of tensors of `sizes` elements: each tensor's first block
    (an empty tensor has none: its entry repeats the next one's), then the block count."""
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // BLOCK))
    return starts


def owner_of(starts, b):
    """The segment's tensor that block b belongs to: the largest i < S with starts[i] <= b."""
    return bisect.bisect_right(starts, b) - 1


def cpu_layout(sizes=(1, 5000), tensor_offset=0):
    """The per-segment and per-device arrays of a segment of `sizes`, on CPU (no params: the
    wrapper never sees them); the table holds tensor_offset other tensors before the segment's."""
    starts = block_starts(sizes)
    nb, num_tensors = starts[-1], tensor_offset + len(sizes)
    table = torch.zeros(layout.TABLE_ROWS, num_tensors, dtype=torch.int64)
    table[layout.NUMEL, tensor_offset:] = torch.tensor(sizes)
    # Each tensor's state at its first block's element, as in the padded layouts these tests
    # were written for; the engine's tests run the packed layout (STATE_ALIGN) on the GPU.
    table[layout.STATE_START, tensor_offset:] = torch.tensor(starts[:-1]) * BLOCK
    return SimpleNamespace(
        num_blocks=nb, tensor_offset=tensor_offset, table=table,
        tensor_block_start=torch.tensor(starts, dtype=torch.int32),
        state1=torch.zeros(nb * BLOCK), state2=torch.zeros(nb * BLOCK),
        step=torch.ones(num_tensors), hyper=torch.zeros(2, layout.HYPER_COLUMNS),
        globals=torch.zeros(layout.GLOBAL_SLOTS), block_sums=torch.zeros(2, nb))


def call_grad_norm(lay, dtype=torch.float32, **changes):
    args = dict(dtype=dtype, tensor_block_start=lay.tensor_block_start,
                num_blocks=lay.num_blocks, tensor_offset=lay.tensor_offset,
                tensor_table=lay.table, scale=None, block_sums=lay.block_sums)
    args.update(changes)
    cuda_backend.grad_norm(**args)


def call_update(lay, algorithm="adamw", dtype=torch.float32, **changes):
    args = dict(algorithm=algorithm, dtype=dtype, tensor_block_start=lay.tensor_block_start,
                num_blocks=lay.num_blocks, tensor_offset=lay.tensor_offset,
                tensor_table=lay.table, state1=lay.state1,
                state2=lay.state2 if CONTRACT[algorithm]["states"] == 2 else None,
                tensor_step=lay.step, hyper=lay.hyper, globals_=lay.globals, stats_partials=None)
    args.update(changes)
    cuda_backend.update(**args)


def call_finalize(lay, **changes):
    args = dict(tensor_sums=torch.zeros(2, 2), tensor_table=lay.table, tensor_step=lay.step,
                globals_=lay.globals, scale=None, growth_tracker=None, found_inf_in=None,
                max_grad_norm=0.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                update_scale=False)
    args.update(changes)
    cuda_backend.finalize(**args)


def test_import_needs_neither_extension_nor_gpu():
    for name in FUNCTIONS + ("is_available", "schema"):
        assert callable(getattr(cuda_backend, name))
    if not torch.cuda.is_available():
        assert cuda_backend.is_available() is False


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_module", None)
    monkeypatch.setitem(sys.modules, "fusedopt._C", None)  # makes the import fail
    assert cuda_backend.is_available() is False
    lay = cpu_layout()
    calls = {
        "grad_norm": lambda: call_grad_norm(lay),
        "tensor_reduce": lambda: cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start,
                                                            (0, 2), torch.zeros(2, 2), 0),
        "finalize": lambda: call_finalize(lay),
        "update": lambda: call_update(lay),
        "schema": cuda_backend.schema,
    }
    for name, call in calls.items():
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert "fusedopt._C" in message and "pip install -e ." in message, name
        assert "FUSEDOPT_CUDA_ARCHS" in message and "nvcc" in message, name


def test_wrong_dtype_is_named(recorder):
    lay = cpu_layout()
    with pytest.raises(TypeError, match=r"dtype must be float32, bfloat16 or float16, got torch.float64"):
        call_grad_norm(lay, torch.float64)
    with pytest.raises(TypeError, match=r"tensor_table must have dtype int64, got int32"):
        call_grad_norm(lay, tensor_table=lay.table.int())
    with pytest.raises(TypeError, match=r"tensor_block_start must have dtype int32, got int64"):
        call_grad_norm(lay, torch.bfloat16, tensor_block_start=lay.tensor_block_start.long())
    with pytest.raises(TypeError, match=r"tensor_block_start must have dtype int32, got int64"):
        call_update(lay, tensor_block_start=lay.tensor_block_start.long())
    with pytest.raises(TypeError, match=r"num_blocks must be an int, got Tensor"):
        call_grad_norm(lay, num_blocks=lay.tensor_block_start[-1])
    with pytest.raises(TypeError, match=r"tensor_offset must be an int, got float"):
        call_update(lay, tensor_offset=0.0)
    with pytest.raises(TypeError, match=r"state1 must have dtype float32, bfloat16, got float16"):
        call_update(lay, "sgd", state1=lay.state1.half())
    with pytest.raises(TypeError, match=r"state2 must have dtype float32, bfloat16, got float64"):
        call_update(lay, "adamw", state2=lay.state2.double())
    with pytest.raises(TypeError, match=r"dtype must be float32, bfloat16 or float16, got torch.int8"):
        call_update(lay, "lion", dtype=torch.int8)
    with pytest.raises(TypeError, match=r"tensor_step must have dtype float32, got int32"):
        call_update(lay, tensor_step=lay.step.int())
    with pytest.raises(TypeError, match=r"growth_tracker must have dtype int32, got int64"):
        call_finalize(lay, scale=torch.ones(1), growth_tracker=torch.zeros(1, dtype=torch.int64),
                      update_scale=True)
    with pytest.raises(TypeError, match=r"hyper is required, got None"):
        call_update(lay, hyper=None)
    assert recorder.calls == []


def test_wrong_shapes_and_values_are_named(recorder):
    lay = cpu_layout()
    nb = lay.num_blocks
    with pytest.raises(ValueError, match=r"block_sums must have shape \(2, 3\), got \(3, 3\)"):
        call_grad_norm(lay, block_sums=torch.zeros(3, nb))
    with pytest.raises(ValueError, match=r"block_sums must have shape \(2, 4\), got \(2, 3\)"):
        call_grad_norm(lay, num_blocks=nb + 1)
    with pytest.raises(ValueError, match=r"tensor_table must have shape \(5, T\), got \(4, 2\)"):
        call_grad_norm(lay, tensor_table=lay.table[:4])
    with pytest.raises(ValueError, match=r"tensor_table must be contiguous"):
        call_grad_norm(lay, tensor_table=torch.zeros(layout.TABLE_ROWS, 4, dtype=torch.int64)[:, ::2])
    with pytest.raises(ValueError, match=r"scale must have shape \(1,\)"):
        call_grad_norm(lay, scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"ops must be 0 \(sum\), 1 \(min\) or 2 \(max\)"):
        cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start, (0, 3),
                                   torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match=r"tensor_offset 1 \+ 2 tensors exceeds out's 2 columns"):
        cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start, (0, 2),
                                   torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match=r"algorithm must be one of 'adamw', 'sgd', 'lion', got 'adam'"):
        cuda_backend.update("adam", torch.float32, lay.tensor_block_start, nb, 0, lay.table,
                            lay.state1, lay.state2, lay.step, lay.hyper, lay.globals, None)
    with pytest.raises(ValueError, match=r"state2 must be None for algorithm 'sgd'"):
        call_update(lay, "sgd", state2=lay.state2)
    with pytest.raises(ValueError, match=r"state2 must be None for algorithm 'lion'"):
        call_update(lay, "lion", state2=lay.state2)
    with pytest.raises(TypeError, match=r"state2 is required, got None"):
        call_update(lay, "adamw", state2=None)
    with pytest.raises(ValueError, match=r"state2 must have shape \(12288,\), got \(12287,\)"):
        call_update(lay, "adamw", state2=lay.state2[:-1])
    with pytest.raises(ValueError, match=r"state1 must be contiguous"):
        call_update(lay, "lion", state1=torch.zeros(2 * nb * BLOCK)[::2])
    for algorithm, counts in CONTRACT.items():
        wrong = 9 - counts["stats"]
        with pytest.raises(ValueError, match=rf"stats_partials must have shape \({counts['stats']}, "
                                             rf"3\), got \({wrong}, 3\)"):
            call_update(lay, algorithm, stats_partials=torch.zeros(wrong, nb))
    with pytest.raises(ValueError, match=r"hyper must have shape \(G, 8\) with G >= 1, got \(2, 9\)"):
        call_update(lay, hyper=torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"hyper must have shape \(G, 8\) with G >= 1, got \(0, 8\)"):
        call_update(lay, hyper=torch.zeros(0, 8))
    with pytest.raises(ValueError, match=r"hyper must be contiguous"):
        call_update(lay, hyper=torch.zeros(8, 2).t())
    with pytest.raises(ValueError, match=r"tensor_step must have shape \(2,\), got \(3,\)"):
        call_update(lay, tensor_step=torch.ones(3))
    with pytest.raises(ValueError, match=r"globals_ must have shape \(8,\), got \(6,\)"):
        call_update(lay, globals_=torch.zeros(6))
    with pytest.raises(ValueError, match=r"tensor_step must have shape \(2,\), got \(1,\)"):
        call_finalize(lay, tensor_step=torch.ones(1))
    with pytest.raises(ValueError, match=r"tensor_sums must have shape \(2, T\), got \(3, 2\)"):
        call_finalize(lay, tensor_sums=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"growth_tracker is required"):
        call_finalize(lay, scale=torch.ones(1), update_scale=True)
    assert recorder.calls == []


def test_segment_is_checked_against_the_table(recorder):
    """The segment's tensors are the table's columns tensor_offset .. tensor_offset + S - 1,
    S = tensor_block_start's entries - 1 (int32, at least one entry); blocks need a tensor."""
    lay = cpu_layout()  # S = 2 tensors, 3 blocks, a table of 2 columns
    wide = cpu_layout(tensor_offset=3)  # the same segment behind 3 other tensors
    no_columns = torch.zeros(layout.TABLE_ROWS, 0, dtype=torch.int64)
    refused = [
        (r"tensor_offset 1 \+ 2 tensors exceeds tensor_table's 2 columns", dict(tensor_offset=1)),
        (r"tensor_offset -1 \+ 2 tensors exceeds tensor_table's 2 columns",
         dict(tensor_offset=-1)),
        (r"tensor_offset 4 \+ 2 tensors exceeds tensor_table's 5 columns",
         dict(tensor_offset=4, tensor_table=wide.table)),
        (r"tensor_offset 0 \+ 2 tensors exceeds tensor_table's 0 columns",
         dict(tensor_table=no_columns)),
        (r"tensor_block_start must hold S \+ 1 entries for the segment's S tensors, got 0",
         dict(tensor_block_start=torch.zeros(0, dtype=torch.int32))),
        (r"tensor_block_start must be 1-D, got shape \(1, 3\)",
         dict(tensor_block_start=lay.tensor_block_start[None])),
        (r"tensor_block_start must be contiguous",
         dict(tensor_block_start=torch.zeros(6, dtype=torch.int32)[::2])),
        (r"num_blocks must be >= 0, got -1", dict(num_blocks=-1)),
        (r"tensor_block_start holds no tensors \(1 entry\), but num_blocks is 3",
         dict(tensor_block_start=torch.zeros(1, dtype=torch.int32))),
    ]
    for message, changes in refused:
        with pytest.raises(ValueError, match=message):
            call_grad_norm(lay, **changes)
        with pytest.raises(ValueError, match=message):
            call_update(lay, **changes)
    assert recorder.calls == []
    # Accepted: the last tensors of the table; a segment of empty tensors (no blocks); no tensors.
    call_grad_norm(wide)
    call_update(wide)
    empty = dict(tensor_block_start=torch.zeros(3, dtype=torch.int32), num_blocks=0,
                 block_sums=torch.zeros(2, 0))
    call_grad_norm(lay, **empty)
    call_grad_norm(lay, **{**empty, "tensor_block_start": torch.zeros(1, dtype=torch.int32),
                           "tensor_offset": 2})
    got = [(kw["num_segment_tensors"], kw["num_blocks"], kw["tensor_offset"], kw["num_tensors"])
           for _, kw in recorder.calls]
    assert got == [(2, 3, 3, 5), (2, 3, 3, 5), (2, 0, 0, 2), (0, 0, 2, 2)]


def test_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_module", RecordingExtension())
    lay = cpu_layout()
    with pytest.raises(ValueError, match=r"tensor_block_start must be a CUDA tensor, got device cpu"):
        call_grad_norm(lay)
    with pytest.raises(ValueError, match=r"tensor_block_start must be a CUDA tensor, got device cpu"):
        call_update(lay, "lion")


def test_stale_extension_without_the_algorithm_says_so(recorder, monkeypatch):
    lay = cpu_layout()
    older = {"algorithms": {"adamw": CONTRACT["adamw"], "sgd": CONTRACT["sgd"]}}
    monkeypatch.setattr(recorder, "schema", lambda: older, raising=False)
    cuda_backend._compiled_algorithms.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"'lion' is not in the built fusedopt._C .*pip install -e"):
            call_update(lay, "lion")
    finally:
        cuda_backend._compiled_algorithms.cache_clear()
    assert recorder.calls == []


def _documented_arguments(function):
    """Argument names from a pybind11 signature line: 'name(a: int, b: str) -> None'."""
    signature = function.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", signature[signature.index("("):])


def test_wrapper_passes_what_the_binding_expects(recorder):
    """Pointers, sizes, strides and codes reach the binding under its own argument names (the
    real module's, when it is built)."""
    lay = cpu_layout(tensor_offset=1)
    nb = lay.num_blocks
    scale = torch.ones(1)
    cuda_backend.grad_norm(torch.bfloat16, lay.tensor_block_start, nb, 1, lay.table, scale,
                           lay.block_sums)
    values = torch.zeros(6, nb + 5)[:, :nb]  # a view with row stride nb + 5
    out = torch.zeros(6, 7)
    cuda_backend.tensor_reduce(values, lay.tensor_block_start, (0, 0, 1, 2, 0, 0), out, 3)
    sums, tracker = torch.zeros(2, 9), torch.zeros(1, dtype=torch.int32)
    cuda_backend.finalize(sums, lay.table, lay.step, lay.globals, scale, tracker, None, 1.0, 2.0,
                          0.5, 100, True)
    partials = torch.zeros(6, nb + 2)[:, :nb]
    cuda_backend.update("adamw", torch.float16, lay.tensor_block_start, nb, 1, lay.table,
                        lay.state1, lay.state2, lay.step, lay.hyper, lay.globals, partials)
    cuda_backend.update("lion", torch.float32, lay.tensor_block_start, nb, 1, lay.table,
                        lay.state1, None, lay.step, lay.hyper, lay.globals, None)
    calls = recorder.calls
    assert [name for name, _ in calls] == ["grad_norm", "tensor_reduce", "finalize", "update",
                                           "update"]
    assert calls[0][1] == dict(
        dtype=1, tensor_block_start=lay.tensor_block_start.data_ptr(), num_segment_tensors=2,
        num_blocks=nb, tensor_offset=1, tensor_table=lay.table.data_ptr(), num_tensors=3,
        scale=scale.data_ptr(), block_sums=lay.block_sums.data_ptr(), block_sums_stride=nb,
        device=0, stream=1234)
    assert calls[1][1] == dict(
        block_values=values.data_ptr(), values_stride=nb + 5,
        tensor_block_start=lay.tensor_block_start.data_ptr(), num_tensors=2,
        ops=[0, 0, 1, 2, 0, 0], out=out.data_ptr(), out_stride=7, tensor_offset=3, device=0,
        stream=1234)
    assert calls[2][1] == dict(
        tensor_sums=sums.data_ptr(), sums_stride=9, num_tensors_all=9,
        tensor_table=lay.table.data_ptr(), tensor_step=lay.step.data_ptr(), num_tensors_dev=3,
        globals=lay.globals.data_ptr(), scale=scale.data_ptr(), growth_tracker=tracker.data_ptr(),
        found_inf_in=0, max_grad_norm=1.0, growth_factor=2.0, backoff_factor=0.5,
        growth_interval=100, update_scale=True, device=0, stream=1234)
    common = dict(tensor_block_start=lay.tensor_block_start.data_ptr(), num_segment_tensors=2,
                  num_blocks=nb, tensor_offset=1, tensor_table=lay.table.data_ptr(),
                  num_tensors=3, state1=lay.state1.data_ptr(),
                  state_dtype=0, tensor_step=lay.step.data_ptr(), hyper=lay.hyper.data_ptr(),
                  globals=lay.globals.data_ptr(), remainder=0, master_bits=0, scale1=0,
                  scale2=0, device=0, stream=1234)
    assert calls[3][1] == dict(common, algorithm="adamw", dtype=2, state2=lay.state2.data_ptr(),
                               stats_partials=partials.data_ptr(), stats_stride=nb + 2)
    assert calls[4][1] == dict(common, algorithm="lion", dtype=0, state2=0, stats_partials=0,
                               stats_stride=0)
    real = _extension()
    if real is not None:
        for name, kwargs in calls:
            assert _documented_arguments(getattr(real, name)) == list(kwargs), name


def test_compiled_module_checks_raw_arguments():
    """The binding's checks run before any CUDA call, so they need no GPU."""
    c = _extension()
    if c is None:
        pytest.skip("fusedopt._C is not built (pip install -e . with nvcc on PATH)")
    gn = dict(dtype=0, tensor_block_start=16, num_segment_tensors=1, num_blocks=1,
              tensor_offset=0, tensor_table=16, num_tensors=1, scale=0, block_sums=16,
              block_sums_stride=1, device=0, stream=0)
    with pytest.raises(ValueError, match=r"grad_norm: tensor_table must be a non-null device pointer"):
        c.grad_norm(**{**gn, "tensor_table": 0})
    with pytest.raises(ValueError, match=r"grad_norm: tensor_block_start must be a non-null device "
                                         r"pointer"):
        c.grad_norm(**{**gn, "tensor_block_start": 0})
    with pytest.raises(ValueError, match=r"grad_norm: dtype must be 0 \(float32\)"):
        c.grad_norm(**{**gn, "dtype": 3})
    with pytest.raises(ValueError, match=r"grad_norm: num_blocks must be in \[0, 2147483647\]"):
        c.grad_norm(**{**gn, "num_blocks": -1})
    with pytest.raises(ValueError, match=r"grad_norm: num_segment_tensors must be in \[0, "
                                         r"2147483647\], got -1"):
        c.grad_norm(**{**gn, "num_segment_tensors": -1})
    with pytest.raises(ValueError, match=r"grad_norm: num_segment_tensors must be >= 1 when "
                                         r"num_blocks > 0"):
        c.grad_norm(**{**gn, "num_segment_tensors": 0})
    for offset, segment, tensors in ((1, 1, 1), (-1, 1, 1), (0, 2, 1), (3, 2, 4), (0, 1, 0)):
        with pytest.raises(ValueError, match=rf"grad_norm: tensor_offset \+ num_segment_tensors "
                                             rf"must lie within the tensor table's num_tensors "
                                             rf"columns, got tensor_offset {offset}, "
                                             rf"num_segment_tensors {segment}, "
                                             rf"num_tensors {tensors}"):
            c.grad_norm(**{**gn, "tensor_offset": offset, "num_segment_tensors": segment,
                           "num_tensors": tensors})
    with pytest.raises(ValueError, match=r"grad_norm: block_sums_stride must be >= 5"):
        c.grad_norm(**{**gn, "num_blocks": 5, "block_sums_stride": 4})
    tr = dict(block_values=16, values_stride=1, tensor_block_start=16, num_tensors=1, ops=[0],
              out=16, out_stride=1, tensor_offset=0, device=0, stream=0)
    with pytest.raises(ValueError, match=r"tensor_reduce: ops\[1\] must be 0 \(sum\), 1 \(min\) or 2"):
        c.tensor_reduce(**{**tr, "ops": [0, 7]})
    with pytest.raises(ValueError, match=r"tensor_reduce: ops must have 1 to 8 entries, got 9"):
        c.tensor_reduce(**{**tr, "ops": [0] * 9})
    with pytest.raises(ValueError, match=r"tensor_reduce: tensor_offset \+ num_tensors"):
        c.tensor_reduce(**{**tr, "tensor_offset": 1})
    fin = dict(tensor_sums=16, sums_stride=1, num_tensors_all=1, tensor_table=16, tensor_step=16,
               num_tensors_dev=1, globals=16, scale=16, growth_tracker=16, found_inf_in=0,
               max_grad_norm=0.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=0,
               update_scale=True, device=0, stream=0)
    with pytest.raises(ValueError, match=r"finalize: growth_interval must be >= 1, got 0"):
        c.finalize(**fin)
    with pytest.raises(ValueError, match=r"finalize: growth_tracker must be a non-null"):
        c.finalize(**{**fin, "growth_tracker": 0, "growth_interval": 10})
    with pytest.raises(ValueError, match=r"finalize: tensor_table must be a non-null"):
        c.finalize(**{**fin, "tensor_table": 0, "growth_interval": 10})
    up = dict(algorithm="adamw", dtype=0, tensor_block_start=16, num_segment_tensors=1,
              num_blocks=1, tensor_offset=0, tensor_table=16, num_tensors=1, state1=16, state2=16,
              state_dtype=0, tensor_step=16, hyper=16, globals=16, stats_partials=0,
              stats_stride=0, remainder=0, master_bits=0, scale1=0, scale2=0, device=0, stream=0)
    with pytest.raises(ValueError, match=r"update: algorithm must be one of 'adamw', 'sgd', "
                                         r"'lion', got 'adam'"):
        c.update(**{**up, "algorithm": "adam"})
    with pytest.raises(ValueError, match=r"update: state2 must be a non-null device pointer"):
        c.update(**{**up, "state2": 0})
    for one_state in ("sgd", "lion"):
        with pytest.raises(ValueError, match=rf"update: state2 must be null \(0\) for {one_state}"):
            c.update(**{**up, "algorithm": one_state})
    with pytest.raises(ValueError, match=r"update: stats_stride must be >= 1, got 0"):
        c.update(**{**up, "stats_partials": 16})
    with pytest.raises(ValueError, match=r"update: tensor_block_start must be a non-null"):
        c.update(**{**up, "tensor_block_start": 0})
    with pytest.raises(ValueError, match=r"update: num_segment_tensors must be >= 1 when "
                                         r"num_blocks > 0"):
        c.update(**{**up, "num_segment_tensors": 0})
    with pytest.raises(ValueError, match=r"update: tensor_offset \+ num_segment_tensors must lie "
                                         r"within .*got tensor_offset 2, num_segment_tensors 2, "
                                         r"num_tensors 3"):
        c.update(**{**up, "tensor_offset": 2, "num_segment_tensors": 2, "num_tensors": 3})
    # An empty segment launches nothing: its (empty) tensors may have null data pointers, and a
    # segment without blocks may have no tensors.
    for segment in (0, 2):
        c.update(**{**up, "num_blocks": 0, "tensor_block_start": 0, "num_segment_tensors": segment,
                    "num_tensors": 2, "state1": 0, "state2": 0, "stream": 0})
        c.grad_norm(**{**gn, "num_blocks": 0, "tensor_block_start": 0,
                       "num_segment_tensors": segment, "num_tensors": 2, "block_sums": 0,
                       "block_sums_stride": 0})


# ---------------------------------------------------------------------------------------------
# GPU: each launch against plain torch computations
# ---------------------------------------------------------------------------------------------

PAD = 7.0  # sentinel around views and in the state padding: never read (it would show) nor written

# The device's tensors, as owners place them. param_view / grad_view: the tensor is a view into one
# shared buffer (as DDP's gradient buckets) at that many elements past a 64-element boundary, so 0
# is 16-byte aligned and 1, 3, 5 are not; absent: its own allocation (512-byte aligned).
TENSORS = (
    dict(shape=(300,), group=0, segment=False),  # another segment's tensor in the same table
    dict(shape=(1,), group=0),
    dict(shape=(8, 64, 9, 9), group=1, channels_last=True),  # 41472 = 10 blocks + 512
    dict(shape=(5000,), group=0, grad=False),  # no gradient this step: skipped
    dict(shape=(127, 41), group=1, param_view=1, grad_view=3),  # unaligned: scalar path
    dict(shape=(3 * BLOCK,), group=0, grad_view=5),  # aligned param, unaligned grad
    dict(shape=(278011,), group=0),
    dict(shape=(2 * BLOCK,), group=1, param_view=0, grad_view=0),  # aligned views: vector path
)
STEPS = (4, 3, 1, 0, 7, 2, 1, 5)  # as finalize leaves them; t = 1 initialises the SGD buffer

# Hyper rows (two groups) per configuration, by column name; absent columns are 0.
CONFIGS = {
    "adamw": ("adamw", [dict(lr=1e-2, max_lr=2e-2, weight_decay=0.1, corrected=1.0, beta1=0.9,
                             beta2=0.999, eps=1e-8),
                        dict(lr=3e-3, max_lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.99,
                             eps=1e-6)]),
    "sgd": ("sgd", [dict(lr=1e-2, max_lr=4e-2, weight_decay=0.01, corrected=1.0, momentum=0.9,
                         dampening=0.1),
                    dict(lr=2e-2, max_lr=2e-2, weight_decay=0.1)]),  # momentum 0: no buffer
    "sgd_nesterov": ("sgd", [dict(lr=5e-3, max_lr=5e-3, momentum=0.5, nesterov=1.0),
                             dict(lr=1e-2, max_lr=1e-2, weight_decay=0.02, momentum=0.9)]),
    "lion": ("lion", [dict(lr=1e-3, max_lr=3e-3, weight_decay=0.5, corrected=1.0, beta1=0.9,
                           beta2=0.99),
                      dict(lr=2e-4, max_lr=2e-4, weight_decay=0.0, beta1=0.95, beta2=0.98)]),
}
INV_SCALE, CLIP = 1 / 512, 0.7  # written to globals (CLIP rounds to fp32 there)


def memory_order(tensor):
    """A dense tensor's elements in memory order (a view): the order the kernels visit them."""
    return tensor.as_strided((tensor.numel(),), (1,))


def algorithm_module(algorithm):
    return importlib.import_module(f"fusedopt.algorithms.{algorithm}")


class Segment:
    """`specs` (TENSORS) on `device`: params and grads where their owners put them, the device's
    tensor table, and one segment (the tensors not marked segment=False, consecutive in the
    table) with its state buffers."""

    def __init__(self, device, dtype, *, algorithm="adamw", seed=0, steps=STEPS, specs=TENSORS):
        gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype, self.algorithm = device, dtype, algorithm
        self.specs = specs
        # One shared buffer each for the params and the grads that are views.
        cursor = {"param": 0, "grad": 0}
        offsets = []
        for spec in self.specs:
            at = {}
            for kind in ("param", "grad"):
                if f"{kind}_view" in spec:
                    at[kind] = -(-(cursor[kind] + 3) // 64) * 64 + spec[f"{kind}_view"]
                    cursor[kind] = at[kind] + math.prod(spec["shape"])
            offsets.append(at)
        self.shared = {kind: torch.full((cursor[kind] + 64,), PAD, dtype=dtype, device=device)
                       for kind in cursor}
        self.params, self.grads = [], []
        for spec, at in zip(self.specs, offsets):
            numel = math.prod(spec["shape"])
            for kind, values in (("param", torch.randn(numel, generator=gen)),
                                 ("grad", torch.randn(numel, generator=gen) * 512)):
                if kind == "grad" and not spec.get("grad", True):
                    self.grads.append(None)
                    continue
                if kind in at:
                    tensor = self.shared[kind][at[kind]:at[kind] + numel].view(spec["shape"])
                else:
                    memory_format = (torch.channels_last if spec.get("channels_last")
                                     else torch.contiguous_format)
                    tensor = torch.empty(spec["shape"], dtype=dtype, device=device,
                                         memory_format=memory_format)
                memory_order(tensor).copy_(values)
                (self.params if kind == "param" else self.grads).append(tensor)
        # The segment: consecutive tensors of the table from tensor_offset on, each starting at a
        # multiple of BLOCK (an empty tensor has no blocks).
        self.members = [t for t, spec in enumerate(self.specs) if spec.get("segment", True)]
        self.tensor_offset = self.members[0]
        assert self.members == list(range(self.tensor_offset, self.members[-1] + 1))
        self.block_start = block_starts([self.params[t].numel() for t in self.members])
        self.num_blocks = self.block_start[-1]
        self.state_start = [0] * len(self.specs)
        for i, t in enumerate(self.members):
            self.state_start[t] = self.block_start[i] * BLOCK
        table = torch.zeros(layout.TABLE_ROWS, len(self.specs), dtype=torch.int64)
        for t, spec in enumerate(self.specs):
            grad = self.grads[t]
            table[layout.PARAM_ADDR, t] = self.params[t].data_ptr()
            table[layout.GRAD_ADDR, t] = 0 if grad is None else grad.data_ptr()
            table[layout.GROUP, t] = -1 if grad is None else spec["group"]
            table[layout.NUMEL, t] = self.params[t].numel()
            table[layout.STATE_START, t] = self.state_start[t]
        self.table = table.to(device)
        self.groups = table[layout.GROUP].tolist()
        self.tensor_block_start = torch.tensor(self.block_start, dtype=torch.int32, device=device)
        self.step = torch.tensor(steps, dtype=torch.float32, device=device)
        # State: random where a tensor has elements, PAD in the padding of its last block.
        self.states = []
        for _ in range(len(algorithm_module(algorithm).STATE)):
            state = torch.full((self.num_blocks * BLOCK,), PAD, device=device)
            for t in self.members:
                n, start = self.params[t].numel(), self.state_start[t]
                state[start:start + n] = torch.rand(n, generator=gen) * 1e-3
            self.states.append(state)
        self.globals = torch.zeros(layout.GLOBAL_SLOTS, device=device)
        self.globals[layout.INV_SCALE] = INV_SCALE
        self.globals[layout.CLIP_COEF] = CLIP
        self.columns = layout.hyper_columns(algorithm_module(algorithm).HYPER)

    def hyper_table(self, rows):
        """hyper float32 [G, HYPER_COLUMNS] on the device from rows of {column name: value}."""
        table = torch.zeros(len(rows), layout.HYPER_COLUMNS)
        for g, row in enumerate(rows):
            for name, value in row.items():
                table[g, self.columns[name]] = value
        return table.to(self.device)

    def snapshot(self):
        """Copies of every array the update reads or writes, and of the shared buffers' gaps."""
        return SimpleNamespace(
            params=[memory_order(p).clone() for p in self.params],
            grads=[None if g is None else memory_order(g).clone() for g in self.grads],
            shared={kind: buffer.clone() for kind, buffer in self.shared.items()},
            states=[s.clone() for s in self.states], step=self.step.clone(),
            globals=self.globals.clone())

    def state_of(self, t, states):
        start, n = self.state_start[t], self.params[t].numel()
        return [s[start:start + n] for s in states]

    def segment_args(self):
        """grad_norm's and update's arguments from tensor_block_start to tensor_table."""
        return self.tensor_block_start, self.num_blocks, self.tensor_offset, self.table

    def block_span(self, b):
        """(tensor, first element in the tensor, element count) of segment block b."""
        i = owner_of(self.block_start, b)
        t = self.tensor_offset + i
        first = (b - self.block_start[i]) * BLOCK
        return t, first, min(self.params[t].numel() - first, BLOCK)

    def unscaled_grad(self, t):
        """(grad * INV_SCALE) * CLIP_COEF in fp32 on CPU, memory order (the kernels' g)."""
        inv_scale = self.globals[layout.INV_SCALE].cpu()
        clip = self.globals[layout.CLIP_COEF].cpu()
        return (memory_order(self.grads[t]).float().cpu() * inv_scale) * clip

    def run_update(self, hyper, stats):
        rows = len(algorithm_module(self.algorithm).STATS)
        partials = (torch.full((rows, self.num_blocks), -5.0, device=self.device) if stats
                    else None)
        cuda_backend.update(self.algorithm, self.dtype, *self.segment_args(), self.states[0],
                            self.states[1] if len(self.states) > 1 else None, self.step, hyper,
                            self.globals, partials)
        return partials


def f32(x):
    """A scalar formed in Python doubles, rounded once to fp32 (as the kernels' scalars)."""
    return torch.tensor(x, dtype=torch.float32)


def expected_step(algorithm, p, g, states, h, step, int8_state=False):
    """The contract's element math (docs/kernel_contract.md, update) in fp32 torch ops on CPU, one
    rounding per product, quotient, sum and sqrt in the kernels' order; `int8_state`: the form
    8-bit state takes. Returns the new (p, states)."""
    lr, wd = h["lr"], h["weight_decay"]
    k = lr / h["max_lr"] if h["corrected"] else 1.0
    if algorithm == "adamw":
        m, v = states
        b1, b2 = h["beta1"], h["beta2"]
        p = p * f32(1 - lr * wd * k)
        m = f32(b1) * m + f32(1 - b1) * g
        v = f32(b2) * v + f32(1 - b2) * (g * g)
        step_size = f32(lr / (1 - b1 ** step))
        # sqrt through fp64 rounds to the nearest fp32 (an fp64 sqrt rounded once is the correctly
        # rounded fp32 one); torch's CPU sqrt was 1 ulp off for 1 in ~6000 values on the H100
        # host (torch 2.11), where the kernel's sqrtf is IEEE.
        sqrt_v = v.double().sqrt().float()
        if int8_state:
            correction2_sqrt = math.sqrt(1 - b2 ** step)
            eps = f32(h["eps"] * correction2_sqrt)
            p = p - f32(lr / (1 - b1 ** step) * correction2_sqrt) * (m / (sqrt_v + eps))
        else:
            p = p - step_size * (m / (sqrt_v / f32(math.sqrt(1 - b2 ** step)) + f32(h["eps"])))
        return p, [m, v]
    if algorithm == "sgd":
        (buf,) = states
        d = g
        if wd != 0:
            d = d + f32(wd * k) * p
        if h["momentum"] != 0:
            buf = d if step == 1 else f32(h["momentum"]) * buf + f32(1 - h["dampening"]) * d
            d = d + f32(h["momentum"]) * buf if h["nesterov"] else buf
        return p - f32(lr) * d, [buf]
    assert algorithm == "lion"
    (m,) = states
    b1, b2 = h["beta1"], h["beta2"]
    direction = torch.sign(f32(b1) * m + f32(1 - b1) * g)
    p = p * f32(1 - lr * wd * k)
    p = p - f32(lr) * direction
    m = f32(b2) * m + f32(1 - b2) * g
    return p, [m]


def assert_same_bits(a, b, msg=""):
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    same = a.view(torch.uint8) == b.view(torch.uint8)
    assert bool(same.all()), f"{msg}: {int((~same).sum())} bytes differ"


def hyper_of(seg, hyper, t):
    """The group's row by column name, as Python floats of the stored fp32 values."""
    row = hyper[seg.groups[t]].tolist()
    return {name: row[column] for name, column in seg.columns.items()}


def check_grads_and_gaps(seg, before):
    """The grads, and the gaps around the views in the shared param and grad buffers, as they
    were: the update writes neither."""
    for t, grad in enumerate(seg.grads):
        if grad is not None:
            assert_same_bits(memory_order(grad), before.grads[t], f"grad {t}")
    for kind, buffer in seg.shared.items():
        gaps = torch.ones(buffer.numel(), dtype=torch.bool, device=buffer.device)
        for tensor in seg.params if kind == "param" else seg.grads:
            offset = 0 if tensor is None else tensor.data_ptr() - buffer.data_ptr()
            if tensor is not None and 0 <= offset < buffer.numel() * buffer.element_size():
                start = offset // buffer.element_size()
                gaps[start:start + tensor.numel()] = False
        assert_same_bits(buffer[gaps], before.shared[kind][gaps], f"gaps of the shared {kind}s")


def expected_partials(seg, hyper, t, span, p_old, p_new, states, v_prev, *, found_inf):
    """float64 [len(STATS)]: the statistics of elements `span` of tensor t from the values the
    kernel sees (params old and new, the states after the step and v before it, each already
    sliced to the span) in float64 sums."""
    h = hyper_of(seg, hyper, t)
    exp = [p_new.square().sum(), 0.0 if found_inf else (p_new - p_old).square().sum()]
    if seg.algorithm == "adamw":
        step = seg.step[t].item()
        vhat = (states[1] / f32(1 - h["beta2"] ** step if step > 0 else 1.0)).double()
        g = seg.unscaled_grad(t)[span]
        decreased = 0 if found_inf else int((g * g < v_prev).sum())
        exp += [vhat.min(), vhat.max(), vhat.sum(), decreased]
    elif seg.algorithm == "sgd" and h["momentum"] == 0:
        exp.append(0.0)  # the buffer is not touched, its statistic is 0
    else:
        exp.append(states[0].double().square().sum())
    return torch.tensor([float(x) for x in exp], dtype=torch.float64)


def check_update(seg, hyper, before, partials, *, found_inf):
    """Params and states against expected_step bit for bit; unchanged where nothing may be
    written (found_inf, skipped tensors, the other segment's tensor, grads, the gaps around the
    views, the state padding, steps and globals). Then the partials."""
    for t in range(len(seg.specs)):
        p_after = memory_order(seg.params[t])
        if t not in seg.members:
            assert_same_bits(p_after, before.params[t], f"param {t} (another segment)")
            continue
        s_before = seg.state_of(t, before.states)
        s_after = seg.state_of(t, seg.states)
        if found_inf or seg.groups[t] < 0:
            expected, states = before.params[t], s_before
        else:
            p, states = expected_step(seg.algorithm, before.params[t].float().cpu(),
                                      seg.unscaled_grad(t), [s.cpu() for s in s_before],
                                      hyper_of(seg, hyper, t), seg.step[t].item())
            expected = p.to(seg.dtype)
        assert_same_bits(p_after.cpu(), expected.cpu(), f"param {t}")
        for i, (ours, exp) in enumerate(zip(s_after, states)):
            assert_same_bits(ours.cpu(), exp.cpu(), f"state{i + 1} of tensor {t}")
    check_grads_and_gaps(seg, before)
    padding = torch.ones(seg.num_blocks * BLOCK, dtype=torch.bool, device=seg.device)
    for t in seg.members:
        padding[seg.state_start[t]:seg.state_start[t] + seg.params[t].numel()] = False
    for i, (ours, orig) in enumerate(zip(seg.states, before.states)):
        assert_same_bits(ours[padding], orig[padding], f"padding of state{i + 1}")
    assert_same_bits(seg.step, before.step, "tensor_step")
    assert_same_bits(seg.globals, before.globals, "globals")
    if partials is not None:
        check_partials(seg, hyper, before, partials, found_inf=found_inf)


def check_partials(seg, hyper, before, partials, *, found_inf):
    """Each block's statistics against float64 sums over the kernel's stored outputs (the
    outputs themselves are checked separately); blocks of skipped tensors are neutral."""
    ops = [op for _, op in algorithm_module(seg.algorithm).STATS]
    neutral = [{layout.OP_SUM: 0.0, layout.OP_MIN: math.inf, layout.OP_MAX: -math.inf}[op]
               for op in ops]
    got = partials.cpu().double()
    for b in range(seg.num_blocks):
        t, first, count = seg.block_span(b)
        column = got[:, b]
        if seg.groups[t] < 0:
            assert column.tolist() == neutral, f"block {b}"
            continue
        span = slice(first, first + count)
        p_old = before.params[t][span].cpu().double()
        p_new = memory_order(seg.params[t])[span].cpu().double()
        states = [s[span].cpu() for s in seg.state_of(t, seg.states)]
        prev = seg.state_of(t, before.states)
        v_prev = prev[1][span].cpu() if len(prev) > 1 else None
        exp = expected_partials(seg, hyper, t, span, p_old, p_new, states, v_prev,
                                found_inf=found_inf)
        if found_inf:
            assert column[1].item() == 0.0, f"block {b}: a skipped step has no update"
        torch.testing.assert_close(column, exp, rtol=1e-5, atol=1e-30, msg=f"block {b}")


def check_block_sums(seg, block_sums, loss_scale):
    """grad_norm's output against float64 sums of each block's (grad / loss_scale)^2 and its
    non-finite flag; blocks of skipped tensors give 0, 0."""
    expected = torch.zeros(2, seg.num_blocks, dtype=torch.float64)
    for b in range(seg.num_blocks):
        t, first, count = seg.block_span(b)
        if seg.groups[t] < 0:
            continue
        g = memory_order(seg.grads[t])[first:first + count].float() * (1.0 / loss_scale)
        expected[0, b] = g.double().square().sum()
        expected[1, b] = float(not torch.isfinite(g).all())
    torch.testing.assert_close(block_sums.double().cpu(), expected, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["no_scale", "scale"])
def test_grad_norm(cuda, dtype, scaled):
    seg = Segment(cuda, dtype, seed=1)
    loss_scale = 1024.0 if scaled else 1.0
    scale = torch.tensor([loss_scale], device=cuda) if scaled else None
    block_sums = torch.full((2, seg.num_blocks), -1.0, device=cuda)
    cuda_backend.grad_norm(dtype, *seg.segment_args(), scale, block_sums)
    check_block_sums(seg, block_sums, loss_scale)

    # Non-finite values set the flag of their own block only; the other segment's tensor (0)
    # is not read.
    memory_order(seg.grads[6])[5 * BLOCK + 3] = float("nan")
    memory_order(seg.grads[4])[126] = float("-inf")
    memory_order(seg.grads[0])[0] = float("inf")
    cuda_backend.grad_norm(dtype, *seg.segment_args(), scale, block_sums)
    flagged = torch.nonzero(block_sums[1].cpu()).flatten().tolist()
    first_block = {t: seg.state_start[t] // BLOCK for t in seg.members}
    assert flagged == [first_block[4], first_block[6] + 5]


@pytest.mark.gpu
def test_grad_norm_flags_overflow_of_the_unscaled_value(cuda):
    """The flag is about grad * (1/scale): a finite fp16 grad can overflow once unscaled."""
    grad = torch.full((10,), 60000.0, dtype=torch.float16, device=cuda)
    table = torch.tensor([[grad.data_ptr()], [grad.data_ptr()], [0], [10], [0]], device=cuda)
    block_sums = torch.zeros(2, 1, device=cuda)
    starts = torch.tensor([0, 1], dtype=torch.int32, device=cuda)
    cuda_backend.grad_norm(torch.float16, starts, 1, 0, table,
                           torch.tensor([2.0**-120], device=cuda), block_sums)
    assert block_sums[1, 0].item() == 1.0


@pytest.mark.gpu
def test_tensor_reduce(cuda):
    gen = torch.Generator().manual_seed(2)
    block_start = [0, 1, 2, 4, 72]
    nb, num_tensors = block_start[-1], len(block_start) - 1
    table = torch.randn(3, nb + 11, generator=gen).to(cuda)
    values = table[:, :nb]  # a row view: row stride nb + 11
    out = torch.full((3, num_tensors + 5), -9.0, device=cuda)
    starts = torch.tensor(block_start, dtype=torch.int32, device=cuda)
    cuda_backend.tensor_reduce(values, starts, (0, 1, 2), out, 2)
    expected = torch.full((3, num_tensors + 5), -9.0, dtype=torch.float64)
    v = values.double().cpu()
    for t in range(num_tensors):
        seg = v[:, block_start[t]:block_start[t + 1]]
        expected[0, 2 + t] = seg[0].sum()
        expected[1, 2 + t] = seg[1].min()
        expected[2, 2 + t] = seg[2].max()
    # Sums accumulate in fp64 and round once: within one fp32 rounding of the exact sum.
    torch.testing.assert_close(out.double().cpu(), expected.float().double(), rtol=2.5e-7,
                               atol=1e-12)
    assert torch.equal(out[:, :2].cpu(), torch.full((3, 2), -9.0))
    assert torch.equal(out[:, 2 + num_tensors:].cpu(), torch.full((3, 3), -9.0))


def run_finalize(cuda, sums, groups, steps, *, scale=None, tracker=None, found_inf_in=None,
                 max_grad_norm=0.0, growth_interval=3, update_scale=True, skipped=0.0):
    table = torch.zeros(layout.TABLE_ROWS, len(groups), dtype=torch.int64)
    table[layout.GROUP] = torch.tensor(groups)
    state = SimpleNamespace(
        sums=sums.to(cuda), table=table.to(cuda),
        step=torch.tensor(steps, dtype=torch.float32, device=cuda),
        globals=torch.zeros(layout.GLOBAL_SLOTS, device=cuda),
        scale=None if scale is None else torch.tensor([scale], device=cuda),
        tracker=None if tracker is None else torch.tensor([tracker], dtype=torch.int32, device=cuda),
        found_in=None if found_inf_in is None else torch.tensor([found_inf_in], device=cuda))
    state.globals[layout.SKIPPED_STEPS] = skipped
    cuda_backend.finalize(state.sums, state.table, state.step, state.globals, state.scale,
                          state.tracker, state.found_in, max_grad_norm, 2.0, 0.5, growth_interval,
                          update_scale)
    return state


def expected_norm_and_clip(sums, max_grad_norm):
    norm = torch.tensor(math.sqrt(sums[0].double().sum().item()), dtype=torch.float32)
    if max_grad_norm <= 0:
        return norm.item(), 1.0
    clip = torch.clamp(torch.reciprocal(norm + 1e-6) * max_grad_norm, max=1.0)
    return norm.item(), clip.item()


@pytest.mark.gpu
def test_finalize_clean_step_with_scaler_and_clipping(cuda):
    gen = torch.Generator().manual_seed(3)
    sums = torch.zeros(2, 7)
    sums[0] = torch.rand(7, generator=gen) * 100  # 7 columns: 5 local tensors + 2 of another device
    state = run_finalize(cuda, sums, [0, 1, -1, 0, 1], [0, 4, 9, 2, 0], scale=256.0, tracker=1,
                         max_grad_norm=1.0, growth_interval=3, skipped=2.0)
    norm, clip = expected_norm_and_clip(sums, 1.0)
    g = state.globals.cpu()
    assert g[layout.GRAD_NORM].item() == pytest.approx(norm, rel=1e-6)
    assert g[layout.CLIP_COEF].item() == pytest.approx(clip, rel=1e-6)
    assert g[layout.FOUND_INF].item() == 0.0
    assert g[layout.INV_SCALE].item() == 1 / 256
    assert g[layout.SKIPPED_STEPS].item() == 2.0
    assert state.step.tolist() == [1, 5, 9, 3, 1]  # the skipped tensor (group -1) keeps its step
    assert state.tracker.item() == 2 and state.scale.item() == 256.0
    assert g[layout.SCALE].item() == 256.0
    # The next clean step reaches growth_interval: the scale doubles and the tracker resets.
    cuda_backend.finalize(state.sums, state.table, state.step, state.globals, state.scale,
                          state.tracker, None, 1.0, 2.0, 0.5, 3, True)
    assert state.tracker.item() == 0 and state.scale.item() == 512.0
    assert state.globals[layout.SCALE].item() == 512.0
    assert state.globals[layout.INV_SCALE].item() == 1 / 256  # this step's grads carried 256


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["nonfinite_flag", "external"])
def test_finalize_found_inf(cuda, source):
    sums = torch.ones(2, 4)
    sums[1] = 0.0
    if source == "nonfinite_flag":
        sums[1, 3] = 1.0
    state = run_finalize(cuda, sums, [0, 0, 1, -1], [3, 3, 1, 0], scale=1024.0, tracker=5,
                         found_inf_in=1.0 if source == "external" else 0.0, max_grad_norm=0.0,
                         growth_interval=6, skipped=4.0)
    g = state.globals.cpu()
    assert g[layout.FOUND_INF].item() == 1.0
    assert g[layout.SKIPPED_STEPS].item() == 5.0
    assert g[layout.CLIP_COEF].item() == 1.0
    assert g[layout.INV_SCALE].item() == 1 / 1024
    assert state.step.tolist() == [3, 3, 1, 0]
    assert state.scale.item() == 512.0 and state.tracker.item() == 0
    assert g[layout.SCALE].item() == 512.0


@pytest.mark.gpu
def test_finalize_without_scaler_and_without_scale_update(cuda):
    sums = torch.tensor([[4.0, 5.0], [0.0, 0.0]])
    state = run_finalize(cuda, sums, [0, 0], [0, 0], max_grad_norm=0.5)
    g = state.globals.cpu()
    norm, clip = expected_norm_and_clip(sums, 0.5)
    assert g[layout.GRAD_NORM].item() == pytest.approx(3.0, rel=1e-7)
    assert g[layout.CLIP_COEF].item() == pytest.approx(clip, rel=1e-6)
    assert g[layout.INV_SCALE].item() == 1.0 and g[layout.SCALE].item() == 1.0
    assert state.step.tolist() == [1, 1]
    # update_scale=False (torch.amp.GradScaler owns the scale): read it, change nothing.
    state = run_finalize(cuda, sums, [0, 0], [0, 0], scale=64.0, tracker=None, update_scale=False)
    assert state.scale.item() == 64.0
    assert state.globals[layout.INV_SCALE].item() == 1 / 64
    assert state.globals[layout.SCALE].item() == 64.0


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_update(cuda, config, dtype, stats):
    algorithm, rows = CONFIGS[config]
    seg = Segment(cuda, dtype, algorithm=algorithm, seed=4)
    hyper = seg.hyper_table(rows)
    before = seg.snapshot()
    partials = seg.run_update(hyper, stats)
    check_update(seg, hyper, before, partials, found_inf=False)


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_found_inf_writes_nothing(cuda, config, dtype, stats):
    # Step 0 for tensor 1: a skipped very first step reports v-hat without bias correction.
    algorithm, rows = CONFIGS[config]
    seg = Segment(cuda, dtype, algorithm=algorithm, seed=5, steps=(4, 0) + STEPS[2:])
    memory_order(seg.grads[6])[10] = float("nan")
    memory_order(seg.grads[1])[0] = float("inf")
    seg.globals[layout.FOUND_INF] = 1.0
    hyper = seg.hyper_table(rows)
    before = seg.snapshot()
    partials = seg.run_update(hyper, stats)
    check_update(seg, hyper, before, partials, found_inf=True)


# A segment with empty tensors before, between and after non-empty ones (equal consecutive
# tensor_block_start entries), behind two tensors of another segment (tensor_offset 2).
EMPTY_TENSORS = (
    dict(shape=(300,), group=0, segment=False),
    dict(shape=(4097,), group=1, segment=False),
    dict(shape=(0,), group=0),
    dict(shape=(5000,), group=1),  # blocks 0-1
    dict(shape=(0,), group=1),
    dict(shape=(0, 7), group=0),
    dict(shape=(2 * BLOCK,), group=0, param_view=0, grad_view=0),  # blocks 2-3, vector path
    dict(shape=(0,), group=0, grad=False),
    dict(shape=(127, 41), group=1, param_view=1, grad_view=3),  # blocks 4-5, scalar path
    dict(shape=(1,), group=0),  # block 6
    dict(shape=(0,), group=1),
)
EMPTY_STEPS = (4, 2, 3, 1, 5, 2, 3, 0, 7, 1, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_with_empty_tensors(cuda, dtype):
    """grad_norm and update find each block's tensor past the empty ones and at column
    tensor_offset + i of the table; nothing of the other segment's tensors is read or written."""
    seg = Segment(cuda, dtype, seed=6, steps=EMPTY_STEPS, specs=EMPTY_TENSORS)
    assert seg.tensor_offset == 2
    assert seg.block_start == [0, 0, 2, 2, 2, 4, 4, 6, 7, 7]
    assert [seg.block_span(b)[0] for b in range(seg.num_blocks)] == [3, 3, 6, 6, 8, 8, 9]
    memory_order(seg.grads[1])[0] = float("inf")  # the other segment's: would set a flag if read
    block_sums = torch.full((2, seg.num_blocks), -1.0, device=cuda)
    cuda_backend.grad_norm(dtype, *seg.segment_args(), torch.tensor([512.0], device=cuda),
                           block_sums)
    check_block_sums(seg, block_sums, 512.0)
    hyper = seg.hyper_table(CONFIGS["adamw"][1])
    before = seg.snapshot()
    partials = seg.run_update(hyper, stats=True)
    check_update(seg, hyper, before, partials, found_inf=False)


def run_full_step(device, dtype, algorithm, seed):
    """grad_norm -> tensor_reduce -> finalize -> update (with statistics) -> tensor_reduce."""
    seg = Segment(device, dtype, algorithm=algorithm, seed=seed, steps=(0,) * len(TENSORS))
    hyper = seg.hyper_table(CONFIGS[algorithm][1])
    block_sums = torch.empty(2, seg.num_blocks, device=device)
    tensor_sums = torch.zeros(2, len(TENSORS), device=device)
    scale = torch.tensor([512.0], device=device)
    tracker = torch.zeros(1, dtype=torch.int32, device=device)
    cuda_backend.grad_norm(dtype, *seg.segment_args(), scale, block_sums)
    cuda_backend.tensor_reduce(block_sums, seg.tensor_block_start, layout.GRAD_SUM_OPS,
                               tensor_sums, seg.tensor_offset)
    cuda_backend.finalize(tensor_sums, seg.table, seg.step, seg.globals, scale, tracker, None, 1.0,
                          2.0, 0.5, 2000, True)
    partials = seg.run_update(hyper, stats=True)
    stats = algorithm_module(algorithm).STATS
    stat_values = torch.empty(len(stats), len(TENSORS), device=device)
    cuda_backend.tensor_reduce(partials, seg.tensor_block_start, [op for _, op in stats],
                               stat_values, seg.tensor_offset)
    after = seg.snapshot()
    return seg, after.params + after.states + [after.step, after.globals, block_sums,
                                               tensor_sums, scale, tracker, partials,
                                               stat_values[:, seg.tensor_offset:]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", layout.ALGORITHMS)
def test_two_runs_are_bit_identical(cuda, algorithm, dtype):
    seg, first = run_full_step(cuda, dtype, algorithm, seed=5)
    _, second = run_full_step(cuda, dtype, algorithm, seed=5)
    for i, (a, b) in enumerate(zip(first, second)):
        assert_same_bits(a, b, f"output {i}")
    g = seg.globals.cpu()
    assert g[layout.FOUND_INF].item() == 0.0
    assert 0 < g[layout.CLIP_COEF].item() < 1  # max_grad_norm 1.0 clips these gradients
    # The step counts finalize wrote: 1 where the tensor had a gradient.
    assert seg.step.tolist() == [float(group >= 0) for group in seg.groups]


@pytest.mark.gpu
def test_update_beyond_2_31_elements(cuda):
    """64-bit indexing: one bf16 tensor of 2^31 + 5 elements (AdamW, ~26 GB with its state)."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info(cuda)
    if free < 32 * 2**30:
        pytest.skip(f"needs 32 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    num_blocks = -(-n // BLOCK)
    param = torch.empty(n, dtype=torch.bfloat16, device=cuda).normal_()
    grad = torch.empty(n, dtype=torch.bfloat16, device=cuda).normal_()
    m = torch.zeros(num_blocks * BLOCK, device=cuda)
    v = torch.zeros(num_blocks * BLOCK, device=cuda)
    table = torch.tensor([[param.data_ptr()], [grad.data_ptr()], [0], [n], [0]], device=cuda)
    starts = torch.tensor([0, num_blocks], dtype=torch.int32, device=cuda)
    h = dict(lr=1e-2, max_lr=1e-2, weight_decay=0.1, corrected=0.0, beta1=0.9, beta2=0.999,
             eps=1e-8)
    columns = layout.hyper_columns(algorithm_module("adamw").HYPER)
    hyper = torch.zeros(1, layout.HYPER_COLUMNS)
    for name, value in h.items():
        hyper[0, columns[name]] = value
    h = {name: hyper[0, column].item() for name, column in columns.items()}
    globals_ = torch.zeros(layout.GLOBAL_SLOTS, device=cuda)
    globals_[layout.INV_SCALE] = 1.0
    globals_[layout.CLIP_COEF] = 1.0
    step = torch.ones(1, device=cuda)
    block_sums = torch.empty(2, num_blocks, device=cuda)
    cuda_backend.grad_norm(torch.bfloat16, starts, num_blocks, 0, table, None, block_sums)
    last = num_blocks - 1
    tail = grad[last * BLOCK:].float()
    assert block_sums[0, last].item() == pytest.approx(tail.double().square().sum().item(), rel=1e-5)
    spans = {"head": slice(0, BLOCK), "end": slice(n - 3 * BLOCK, n)}  # past 2^31, and the tail
    expect = {}
    for name, sl in spans.items():
        zeros = torch.zeros(sl.stop - sl.start)
        p, _ = expected_step("adamw", param[sl].float().cpu(), grad[sl].float().cpu(),
                             [zeros, zeros], h, 1)
        expect[name] = p.to(torch.bfloat16)
    cuda_backend.update("adamw", torch.bfloat16, starts, num_blocks, 0, table, m, v, step,
                        hyper.to(cuda), globals_, None)
    for name, sl in spans.items():
        assert_same_bits(param[sl].cpu(), expect[name], name)
    assert v[n - 1].item() > 0 and v[n].item() == 0.0  # the last element updated, padding not
