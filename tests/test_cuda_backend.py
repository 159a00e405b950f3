"""The CUDA backend (fusedopt.cuda_backend over fusedopt._C), op by op.

CPU (CI): the wrapper imports without the extension or a GPU, says how to build a missing
extension, names the bad argument, passes pointers/sizes/strides to the binding under the
binding's own argument names, and the compiled module's own checks reject bad raw values.

GPU (marked gpu): each of the four launches against plain torch computations on hand-built flat
layouts (tensor sizes 1, 127, 5000, 278011, each padded to BLOCK = 4096), fp32/bf16/fp16, a
skipped tensor, sentinels in the padding (never read or written), the found_inf branch
(bit-identical state, statistics of the unchanged state), bitwise reproducibility over two runs,
and a tensor above 2^31 elements (memory-gated). The optimizer-level tests (tests/test_update.py)
run the whole step against the reference on this backend as well.
"""
import importlib
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from fusedopt import cuda_backend
from fusedopt import flat
from fusedopt.reference import adam_reference, sgd_reference
from tolerances import TOLERANCE

BLOCK = cuda_backend.BLOCK
SIZES = (1, 127, 5000, 278011)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUNCTIONS = ("grad_norm", "tensor_reduce", "finalize", "update")


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
    """Stands in for fusedopt._C: records each call's keyword arguments."""

    BLOCK = BLOCK

    def __init__(self):
        self.calls = []

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


def cpu_layout(sizes=(1, 5000), dtype=torch.float32):
    ends, blocks, block_start, start = [], [], [0], 0
    for t, n in enumerate(sizes):
        nb = -(-n // BLOCK)
        ends.append(start + n)
        blocks += [t] * nb
        start += nb * BLOCK
        block_start.append(start // BLOCK)
    nb = start // BLOCK
    return SimpleNamespace(
        num_blocks=nb, param=torch.zeros(nb * BLOCK, dtype=dtype),
        grad=torch.zeros(nb * BLOCK, dtype=dtype), m=torch.zeros(nb * BLOCK),
        v=torch.zeros(nb * BLOCK), block_tensor=torch.tensor(blocks, dtype=torch.int32),
        tensor_end=torch.tensor(ends, dtype=torch.int64),
        tensor_block_start=torch.tensor(block_start, dtype=torch.int32),
        tensor_group=torch.zeros(len(sizes), dtype=torch.int32),
        tensor_step=torch.ones(len(sizes)), hyper=torch.zeros(2, 10), globals=torch.zeros(8),
        block_sums=torch.zeros(2, nb))


def test_import_needs_neither_extension_nor_gpu():
    for name in FUNCTIONS + ("is_available",):
        assert callable(getattr(cuda_backend, name))
    if not torch.cuda.is_available():
        assert cuda_backend.is_available() is False


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_module", None)
    monkeypatch.setitem(sys.modules, "fusedopt._C", None)  # makes the import fail
    assert cuda_backend.is_available() is False
    lay = cpu_layout()
    calls = {
        "grad_norm": lambda: cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end,
                                                    lay.tensor_group, None, lay.block_sums),
        "tensor_reduce": lambda: cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start,
                                                            (0, 2), torch.zeros(2, 2), 0),
        "finalize": lambda: cuda_backend.finalize(torch.zeros(2, 2), lay.tensor_group,
                                                  lay.tensor_step, lay.globals, None, None, None,
                                                  0.0, 2.0, 0.5, 2000, False),
        "update": lambda: cuda_backend.update("adam", lay.param, lay.grad, lay.m, lay.v,
                                              lay.block_tensor, lay.tensor_end, lay.tensor_group,
                                              lay.tensor_step, lay.hyper, lay.globals, None),
    }
    for name, call in calls.items():
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert "fusedopt._C" in message and "pip install -e ." in message, name
        assert "FUSEDOPT_CUDA_ARCHS" in message and "nvcc" in message, name


def test_wrong_dtype_is_named(recorder):
    lay = cpu_layout()
    with pytest.raises(TypeError, match=r"grad must have dtype .*got int32"):
        cuda_backend.grad_norm(lay.grad.int(), lay.block_tensor, lay.tensor_end, lay.tensor_group,
                               None, lay.block_sums)
    with pytest.raises(TypeError, match=r"tensor_end must have dtype int64, got int32"):
        cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end.int(), lay.tensor_group,
                               None, lay.block_sums)
    with pytest.raises(TypeError, match=r"grad must have dtype bfloat16, got float32"):
        cuda_backend.update("sgd", lay.param.bfloat16(), lay.grad, lay.m, None, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper,
                            lay.globals, None)
    with pytest.raises(TypeError, match=r"moment1 must have dtype float32, got float64"):
        cuda_backend.update("sgd", lay.param, lay.grad, lay.m.double(), None, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper,
                            lay.globals, None)
    with pytest.raises(TypeError, match=r"growth_tracker must have dtype int32, got int64"):
        cuda_backend.finalize(torch.zeros(2, 2), lay.tensor_group, lay.tensor_step, lay.globals,
                              torch.ones(1), torch.zeros(1, dtype=torch.int64), None, 0.0, 2.0,
                              0.5, 2000, True)
    with pytest.raises(TypeError, match=r"param must have dtype float32, bfloat16, float16, got float64"):
        cuda_backend.update("adam", lay.param.double(), lay.grad.double(), lay.m, lay.v,
                            lay.block_tensor, lay.tensor_end, lay.tensor_group, lay.tensor_step,
                            lay.hyper, lay.globals, None)
    assert recorder.calls == []


def test_wrong_shapes_and_values_are_named(recorder):
    lay = cpu_layout()
    nb = lay.num_blocks
    with pytest.raises(ValueError, match=r"block_sums must have shape \(2, 3\), got \(3, 3\)"):
        cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, None,
                               torch.zeros(3, nb))
    with pytest.raises(ValueError, match=r"grad must hold a whole number of 4096-element blocks"):
        cuda_backend.grad_norm(lay.grad[:-1], lay.block_tensor, lay.tensor_end, lay.tensor_group,
                               None, lay.block_sums)
    with pytest.raises(ValueError, match=r"scale must have shape \(1,\)"):
        cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end, lay.tensor_group,
                               torch.ones(2), lay.block_sums)
    with pytest.raises(ValueError, match=r"ops must be 0 \(sum\), 1 \(min\) or 2 \(max\)"):
        cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start, (0, 3),
                                   torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match=r"tensor_offset 1 \+ 2 tensors exceeds out's 2 columns"):
        cuda_backend.tensor_reduce(lay.block_sums, lay.tensor_block_start, (0, 2),
                                   torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match=r"moment2 must be None for optimizer 'sgd'"):
        cuda_backend.update("sgd", lay.param, lay.grad, lay.m, lay.v, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper,
                            lay.globals, None)
    with pytest.raises(ValueError, match=r"optimizer must be 'adam' or 'sgd', got 'adamw'"):
        cuda_backend.update("adamw", lay.param, lay.grad, lay.m, lay.v, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper,
                            lay.globals, None)
    with pytest.raises(ValueError, match=r"stats_partials must have shape \(6, 3\), got \(3, 3\)"):
        cuda_backend.update("adam", lay.param, lay.grad, lay.m, lay.v, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper,
                            lay.globals, torch.zeros(3, nb))
    with pytest.raises(ValueError, match=r"hyper must be a contiguous \(G, 10\) table"):
        cuda_backend.update("adam", lay.param, lay.grad, lay.m, lay.v, lay.block_tensor,
                            lay.tensor_end, lay.tensor_group, lay.tensor_step, torch.zeros(2, 9),
                            lay.globals, None)
    with pytest.raises(ValueError, match=r"param must be contiguous"):
        strided = torch.zeros(2 * nb * BLOCK)[::2]
        cuda_backend.update("sgd", strided, strided, lay.m, None, lay.block_tensor, lay.tensor_end,
                            lay.tensor_group, lay.tensor_step, lay.hyper, lay.globals, None)
    with pytest.raises(ValueError, match=r"growth_tracker is required"):
        cuda_backend.finalize(torch.zeros(2, 2), lay.tensor_group, lay.tensor_step, lay.globals,
                              torch.ones(1), None, None, 0.0, 2.0, 0.5, 2000, True)
    assert recorder.calls == []


def test_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_module", RecordingExtension())
    lay = cpu_layout()
    with pytest.raises(ValueError, match=r"grad must be a CUDA tensor, got device cpu"):
        cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, None,
                               lay.block_sums)


def _documented_arguments(function):
    """Argument names from a pybind11 signature line: 'name(a: int, b: str) -> None'."""
    signature = function.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", signature[signature.index("("):])


def test_wrapper_passes_what_the_binding_expects(recorder):
    """Pointers, sizes, strides and codes reach the binding under its own argument names (the
    real module's, when it is built)."""
    lay = cpu_layout(dtype=torch.bfloat16)
    nb = lay.num_blocks
    scale = torch.ones(1)
    cuda_backend.grad_norm(lay.grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, scale,
                           lay.block_sums)
    values = torch.zeros(6, nb + 5)[:, :nb]  # a view with row stride nb + 5
    out = torch.zeros(6, 7)
    cuda_backend.tensor_reduce(values, lay.tensor_block_start, flat.ADAM_STAT_OPS, out, 3)
    sums, tracker = torch.zeros(2, 9), torch.zeros(1, dtype=torch.int32)
    cuda_backend.finalize(sums, lay.tensor_group, lay.tensor_step, lay.globals, scale, tracker,
                          None, 1.0, 2.0, 0.5, 100, True)
    partials = torch.zeros(6, nb)
    cuda_backend.update("adam", lay.param, lay.grad, lay.m, lay.v, lay.block_tensor,
                        lay.tensor_end, lay.tensor_group, lay.tensor_step, lay.hyper, lay.globals,
                        partials)
    calls = dict(recorder.calls)
    assert calls["grad_norm"] == dict(
        grad=lay.grad.data_ptr(), dtype=1, num_blocks=nb, block_tensor=lay.block_tensor.data_ptr(),
        tensor_end=lay.tensor_end.data_ptr(), tensor_group=lay.tensor_group.data_ptr(),
        scale=scale.data_ptr(), block_sums=lay.block_sums.data_ptr(), block_sums_stride=nb,
        device=0, stream=1234)
    assert calls["tensor_reduce"] == dict(
        block_values=values.data_ptr(), values_stride=nb + 5,
        tensor_block_start=lay.tensor_block_start.data_ptr(), num_tensors=2,
        ops=list(flat.ADAM_STAT_OPS), out=out.data_ptr(), out_stride=7, tensor_offset=3, device=0,
        stream=1234)
    assert calls["finalize"] == dict(
        tensor_sums=sums.data_ptr(), sums_stride=9, num_tensors_all=9,
        tensor_group=lay.tensor_group.data_ptr(), tensor_step=lay.tensor_step.data_ptr(),
        num_tensors_dev=2, globals=lay.globals.data_ptr(), scale=scale.data_ptr(),
        growth_tracker=tracker.data_ptr(), found_inf_in=0, max_grad_norm=1.0, growth_factor=2.0,
        backoff_factor=0.5, growth_interval=100, update_scale=True, device=0, stream=1234)
    assert calls["update"] == dict(
        optimizer="adam", param=lay.param.data_ptr(), grad=lay.grad.data_ptr(), dtype=1,
        moment1=lay.m.data_ptr(), moment2=lay.v.data_ptr(), num_blocks=nb,
        block_tensor=lay.block_tensor.data_ptr(), tensor_end=lay.tensor_end.data_ptr(),
        tensor_group=lay.tensor_group.data_ptr(), tensor_step=lay.tensor_step.data_ptr(),
        hyper=lay.hyper.data_ptr(), globals=lay.globals.data_ptr(),
        stats_partials=partials.data_ptr(), stats_stride=nb, device=0, stream=1234)
    real = _extension()
    if real is not None:
        for name, kwargs in calls.items():
            assert _documented_arguments(getattr(real, name)) == list(kwargs), name


def test_compiled_module_checks_raw_arguments():
    """The binding's checks run before any CUDA call, so they need no GPU."""
    c = _extension()
    if c is None:
        pytest.skip("fusedopt._C is not built (pip install -e . with nvcc on PATH)")
    assert c.BLOCK == BLOCK and c.NUM_GLOBALS == flat.GLOBAL_SLOTS
    assert c.NUM_HYPER == flat.HYPER_COLUMNS
    gn = dict(grad=16, dtype=0, num_blocks=1, block_tensor=16, tensor_end=16, tensor_group=16,
              scale=0, block_sums=16, block_sums_stride=1, device=0, stream=0)
    with pytest.raises(ValueError, match=r"grad_norm: grad must be a non-null device pointer"):
        c.grad_norm(**{**gn, "grad": 0})
    with pytest.raises(ValueError, match=r"grad_norm: dtype must be 0 \(float32\)"):
        c.grad_norm(**{**gn, "dtype": 3})
    with pytest.raises(ValueError, match=r"grad_norm: num_blocks must be in \[0, 2147483647\]"):
        c.grad_norm(**{**gn, "num_blocks": -1})
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
    fin = dict(tensor_sums=16, sums_stride=1, num_tensors_all=1, tensor_group=16, tensor_step=16,
               num_tensors_dev=1, globals=16, scale=16, growth_tracker=16, found_inf_in=0,
               max_grad_norm=0.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=0,
               update_scale=True, device=0, stream=0)
    with pytest.raises(ValueError, match=r"finalize: growth_interval must be >= 1, got 0"):
        c.finalize(**fin)
    with pytest.raises(ValueError, match=r"finalize: growth_tracker must be a non-null"):
        c.finalize(**{**fin, "growth_tracker": 0, "growth_interval": 10})
    up = dict(optimizer="adam", param=16, grad=16, dtype=0, moment1=16, moment2=16, num_blocks=1,
              block_tensor=16, tensor_end=16, tensor_group=16, tensor_step=16, hyper=16,
              globals=16, stats_partials=0, stats_stride=0, device=0, stream=0)
    with pytest.raises(ValueError, match=r"update: optimizer must be 'adam' or 'sgd', got 'lion'"):
        c.update(**{**up, "optimizer": "lion"})
    with pytest.raises(ValueError, match=r"update: moment2 must be a non-null device pointer"):
        c.update(**{**up, "moment2": 0})
    with pytest.raises(ValueError, match=r"update: moment2 must be null \(0\) for sgd"):
        c.update(**{**up, "optimizer": "sgd"})
    with pytest.raises(ValueError, match=r"update: stats_stride must be >= 1, got 0"):
        c.update(**{**up, "stats_partials": 16})


# ---------------------------------------------------------------------------------------------
# GPU: each launch against plain torch computations
# ---------------------------------------------------------------------------------------------

PAD = 7.0  # sentinel in the padding after each tensor: never read (it would show) nor written


class Layout:
    """A flat buffer by hand: tensors of `sizes`, each starting at a multiple of BLOCK."""

    def __init__(self, sizes, groups, device):
        self.sizes, self.groups = list(sizes), list(groups)
        self.starts, ends, blocks, block_start, start = [], [], [], [0], 0
        for t, n in enumerate(sizes):
            nb = -(-n // BLOCK)
            self.starts.append(start)
            ends.append(start + n)
            blocks += [t] * nb
            start += nb * BLOCK
            block_start.append(start // BLOCK)
        self.numel, self.num_blocks = start, start // BLOCK
        self.ends = ends
        self.block_start = block_start
        self.block_tensor = torch.tensor(blocks, dtype=torch.int32, device=device)
        self.tensor_end = torch.tensor(ends, dtype=torch.int64, device=device)
        self.tensor_block_start = torch.tensor(block_start, dtype=torch.int32, device=device)
        self.tensor_group = torch.tensor(groups, dtype=torch.int32, device=device)
        self.device = device

    def valid(self):
        """Mask of the elements that belong to a tensor (not padding)."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        for s, e in zip(self.starts, self.ends):
            mask[s:e] = True
        return mask

    def flat(self, values, dtype, device):
        """A flat buffer holding `values` (one tensor per size) and PAD in the padding."""
        out = torch.full((self.numel,), PAD, dtype=dtype, device=device)
        for s, v in zip(self.starts, values):
            out[s:s + v.numel()] = v.to(dtype)
        return out

    def part(self, flat_tensor, t):
        return flat_tensor[self.starts[t]:self.ends[t]]

    def block_range(self, b, tensor_of_block):
        start = b * BLOCK
        return start, min(self.ends[tensor_of_block], start + BLOCK)


def randn(n, gen, scale=1.0):
    return torch.randn(n, generator=gen) * scale


def tensor_of_blocks(lay):
    return lay.block_tensor.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["no_scale", "scale"])
def test_grad_norm(cuda, dtype, scaled):
    gen = torch.Generator().manual_seed(1)
    lay = Layout(SIZES, [0, 1, -1, 0], cuda)
    loss_scale = 1024.0 if scaled else 1.0
    grads = [randn(n, gen, loss_scale) for n in SIZES]
    grads[2][17] = float("inf")  # in the skipped tensor: must not count
    grad = lay.flat(grads, dtype, cuda)
    scale = torch.tensor([loss_scale], device=cuda) if scaled else None
    block_sums = torch.full((2, lay.num_blocks), -1.0, device=cuda)
    cuda_backend.grad_norm(grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, scale,
                           block_sums)
    expected = torch.zeros(2, lay.num_blocks, dtype=torch.float64)
    for b, t in enumerate(tensor_of_blocks(lay)):
        if lay.groups[t] < 0:
            continue
        s, e = lay.block_range(b, t)
        g = grad[s:e].float() * (1.0 / loss_scale)
        expected[0, b] = g.double().square().sum()
        expected[1, b] = float(not torch.isfinite(g).all())
    torch.testing.assert_close(block_sums.double().cpu(), expected, rtol=1e-5, atol=0)

    # Non-finite values set the flag of their own block only.
    bad = grad.clone()
    bad[lay.starts[3] + 5 * BLOCK + 3] = float("nan")
    bad[lay.starts[1] + 126] = float("-inf")
    cuda_backend.grad_norm(bad, lay.block_tensor, lay.tensor_end, lay.tensor_group, scale,
                           block_sums)
    flagged = torch.nonzero(block_sums[1].cpu()).flatten().tolist()
    assert flagged == [lay.block_start[1], lay.block_start[3] + 5]


@pytest.mark.gpu
def test_grad_norm_flags_overflow_of_the_unscaled_value(cuda):
    """The flag is about grad * (1/scale): a finite fp16 grad can overflow once unscaled."""
    lay = Layout([10], [0], cuda)
    grad = lay.flat([torch.full((10,), 60000.0)], torch.float16, cuda)
    block_sums = torch.zeros(2, 1, device=cuda)
    cuda_backend.grad_norm(grad, lay.block_tensor, lay.tensor_end, lay.tensor_group,
                           torch.tensor([2.0**-120], device=cuda), block_sums)
    assert block_sums[1, 0].item() == 1.0


@pytest.mark.gpu
def test_tensor_reduce(cuda):
    gen = torch.Generator().manual_seed(2)
    lay = Layout(SIZES, [0, 0, 0, 0], cuda)
    nb, num_tensors = lay.num_blocks, len(SIZES)
    table = torch.randn(3, nb + 11, generator=gen).to(cuda)
    values = table[:, :nb]  # a row view: row stride nb + 11
    out = torch.full((3, num_tensors + 5), -9.0, device=cuda)
    cuda_backend.tensor_reduce(values, lay.tensor_block_start, (0, 1, 2), out, 2)
    expected = torch.full((3, num_tensors + 5), -9.0, dtype=torch.float64)
    v = values.double().cpu()
    for t in range(num_tensors):
        seg = v[:, lay.block_start[t]:lay.block_start[t + 1]]
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
    state = SimpleNamespace(
        sums=sums.to(cuda), group=torch.tensor(groups, dtype=torch.int32, device=cuda),
        step=torch.tensor(steps, dtype=torch.float32, device=cuda),
        globals=torch.zeros(8, device=cuda),
        scale=None if scale is None else torch.tensor([scale], device=cuda),
        tracker=None if tracker is None else torch.tensor([tracker], dtype=torch.int32, device=cuda),
        found_in=None if found_inf_in is None else torch.tensor([found_inf_in], device=cuda))
    state.globals[flat.SKIPPED_STEPS] = skipped
    cuda_backend.finalize(state.sums, state.group, state.step, state.globals, state.scale,
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
    assert g[flat.GRAD_NORM].item() == pytest.approx(norm, rel=1e-6)
    assert g[flat.CLIP_COEF].item() == pytest.approx(clip, rel=1e-6)
    assert g[flat.FOUND_INF].item() == 0.0
    assert g[flat.INV_SCALE].item() == 1 / 256
    assert g[flat.SKIPPED_STEPS].item() == 2.0
    assert state.step.tolist() == [1, 5, 9, 3, 1]  # the skipped tensor (group -1) keeps its step
    assert state.tracker.item() == 2 and state.scale.item() == 256.0
    assert g[flat.SCALE].item() == 256.0
    # The next clean step reaches growth_interval: the scale doubles and the tracker resets.
    cuda_backend.finalize(state.sums, state.group, state.step, state.globals, state.scale,
                          state.tracker, None, 1.0, 2.0, 0.5, 3, True)
    assert state.tracker.item() == 0 and state.scale.item() == 512.0
    assert state.globals[flat.SCALE].item() == 512.0
    assert state.globals[flat.INV_SCALE].item() == 1 / 256  # this step's grads carried 256


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
    assert g[flat.FOUND_INF].item() == 1.0
    assert g[flat.SKIPPED_STEPS].item() == 5.0
    assert g[flat.CLIP_COEF].item() == 1.0
    assert g[flat.INV_SCALE].item() == 1 / 1024
    assert state.step.tolist() == [3, 3, 1, 0]
    assert state.scale.item() == 512.0 and state.tracker.item() == 0
    assert g[flat.SCALE].item() == 512.0


@pytest.mark.gpu
def test_finalize_without_scaler_and_without_scale_update(cuda):
    sums = torch.tensor([[4.0, 5.0], [0.0, 0.0]])
    state = run_finalize(cuda, sums, [0, 0], [0, 0], max_grad_norm=0.5)
    g = state.globals.cpu()
    norm, clip = expected_norm_and_clip(sums, 0.5)
    assert g[flat.GRAD_NORM].item() == pytest.approx(3.0, rel=1e-7)
    assert g[flat.CLIP_COEF].item() == pytest.approx(clip, rel=1e-6)
    assert g[flat.INV_SCALE].item() == 1.0 and g[flat.SCALE].item() == 1.0
    assert state.step.tolist() == [1, 1]
    # update_scale=False (torch.amp.GradScaler owns the scale): read it, change nothing.
    state = run_finalize(cuda, sums, [0, 0], [0, 0], scale=64.0, tracker=None, update_scale=False)
    assert state.scale.item() == 64.0
    assert state.globals[flat.INV_SCALE].item() == 1 / 64
    assert state.globals[flat.SCALE].item() == 64.0


# The update: configurations of hyper rows (two groups) per optimizer.
CONFIGS = {
    "adam": [dict(lr=1e-2, max_lr=2e-2, weight_decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                  corrected=1.0),
             dict(lr=3e-3, max_lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.99, eps=1e-6,
                  corrected=0.0)],
    "sgd_momentum": [dict(lr=1e-2, max_lr=4e-2, weight_decay=0.01, momentum=0.9, dampening=0.1,
                          corrected=1.0),
                     dict(lr=5e-3, max_lr=5e-3, weight_decay=0.0, momentum=0.5, nesterov=1.0)],
    "sgd_plain": [dict(lr=1e-2, max_lr=1e-2, weight_decay=0.1),
                  dict(lr=2e-2, max_lr=2e-2, weight_decay=0.0)],
}
COLUMNS = ("lr", "max_lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "dampening",
           "corrected", "nesterov")
INV_SCALE, CLIP = 1 / 512, 0.7  # written to globals (CLIP rounds to fp32 there)


class UpdateCase:
    """Inputs of one update launch on SIZES: groups [0, 1, -1, 0] (tensor 2 skipped), steps
    [3, 1, 0, 7] (as finalize leaves them; t = 1 initialises the SGD buffer), loss-scaled grads."""

    def __init__(self, config, dtype, device, *, seed=4, steps=(3, 1, 0, 7)):
        gen = torch.Generator().manual_seed(seed)
        self.optimizer = "adam" if config == "adam" else "sgd"
        self.rows = CONFIGS[config]
        self.dtype = dtype
        self.lay = lay = Layout(SIZES, [0, 1, -1, 0], device)
        self.param = lay.flat([randn(n, gen) for n in SIZES], dtype, device)
        self.grad = lay.flat([randn(n, gen, 512.0) for n in SIZES], dtype, device)
        self.m = lay.flat([randn(n, gen, 0.1) for n in SIZES], torch.float32, device)
        self.v = (lay.flat([torch.rand(n, generator=gen) * 1e-3 for n in SIZES], torch.float32,
                           device) if self.optimizer == "adam" else None)
        self.step = torch.tensor(steps, dtype=torch.float32, device=device)
        self.hyper = torch.tensor([[row.get(c, 0.0) for c in COLUMNS] for row in self.rows],
                                  dtype=torch.float32, device=device)
        self.globals = torch.zeros(8, device=device)
        self.globals[flat.INV_SCALE] = INV_SCALE
        self.globals[flat.CLIP_COEF] = CLIP
        self.device = device

    def state(self):
        return [x.clone() for x in (self.param, self.m, self.v) if x is not None]

    def run(self, stats):
        rows = 6 if self.optimizer == "adam" else 3
        partials = torch.full((rows, self.lay.num_blocks), -5.0, device=self.device) if stats else None
        cuda_backend.update(self.optimizer, self.param, self.grad, self.m, self.v,
                            self.lay.block_tensor, self.lay.tensor_end, self.lay.tensor_group,
                            self.step, self.hyper, self.globals, partials)
        return partials

    def unscaled_grad(self, sl):
        """(grad * INV_SCALE) * CLIP_COEF in fp32, the kernel's two multiplies on the same values."""
        inv_scale, clip = self.globals[flat.INV_SCALE].item(), self.globals[flat.CLIP_COEF].item()
        return (self.grad[sl].float() * inv_scale) * clip

    def hyper_of(self, t):
        """The group's row as Python floats of the stored fp32 values (what the kernel reads)."""
        row = self.hyper[self.lay.groups[t]].tolist()
        return dict(zip(COLUMNS, row))

    def reference(self, before):
        """Expected param/m/v after the step: fusedopt.reference per tensor, fp32 math."""
        param, m = before[0].float().clone(), before[1].clone()
        v = before[2].clone() if self.optimizer == "adam" else None
        for t in range(len(SIZES)):
            if self.lay.groups[t] < 0:
                continue
            h = self.hyper_of(t)
            sl = slice(self.lay.starts[t], self.lay.ends[t])
            g = self.unscaled_grad(sl)
            k = h["lr"] / h["max_lr"] if h["corrected"] else 1.0
            step = int(self.step[t].item())
            if self.optimizer == "adam":
                adam_reference(param[sl], g, m[sl], v[sl], step=step, lr=h["lr"],
                               beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
                               weight_decay=h["weight_decay"], decay_multiplier=k)
            else:
                sgd_reference(param[sl], g, m[sl], step=step, lr=h["lr"], momentum=h["momentum"],
                              dampening=h["dampening"], weight_decay=h["weight_decay"],
                              nesterov=bool(h["nesterov"]), decay_multiplier=k)
        return [param.to(self.dtype), m] + ([v] if v is not None else [])


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_update(cuda, config, dtype, stats):
    case = UpdateCase(config, dtype, cuda)
    before = case.state()
    partials = case.run(stats)
    after = case.state()
    expected = case.reference(before)
    lay = case.lay
    for name, ours, ref, orig in zip(("param", "moment1", "moment2"), after, expected, before):
        valid = lay.valid()
        tol = TOLERANCE[dtype] if name == "param" else TOLERANCE[torch.float32]
        torch.testing.assert_close(ours[valid].float(), ref[valid].float(), **tol, msg=name)
        # Padding and the skipped tensor (group -1) are left exactly as they were.
        untouched = ~valid
        untouched[lay.starts[2]:lay.ends[2]] = True
        assert_same_bits(ours[untouched], orig[untouched])
    if config == "sgd_plain":
        assert_same_bits(after[1], before[1])  # momentum 0: the buffer is not touched
    if stats:
        assert_partials(case, before, after, partials, found_inf=False)


def assert_partials(case, before, after, partials, *, found_inf):
    """Per-block statistics against sums over the kernel's own stored outputs (the outputs
    themselves are checked against the reference separately)."""
    lay, adam = case.lay, case.optimizer == "adam"
    p_old, p_new, m_new = before[0].float(), after[0].float(), after[1]
    got = partials.cpu().double()
    for b, t in enumerate(tensor_of_blocks(lay)):
        column = got[:, b]
        if lay.groups[t] < 0:
            neutral = [0, 0, math.inf, -math.inf, 0, 0] if adam else [0, 0, 0]
            assert column.tolist() == neutral, f"block {b}"
            continue
        s, e = lay.block_range(b, t)
        h = case.hyper_of(t)
        exp = [p_new[s:e].double().square().sum(), (p_new[s:e] - p_old[s:e]).double().square().sum()]
        if adam:
            step = case.step[t].item()
            bc2 = torch.tensor(1 - h["beta2"] ** step if step > 0 else 1.0, dtype=torch.float32)
            vhat = after[2][s:e] / bc2.to(case.device)
            g = case.unscaled_grad(slice(s, e))
            decreased = 0 if found_inf else (g * g < before[2][s:e]).sum().item()
            exp += [vhat.min(), vhat.max(), vhat.double().sum(), decreased]
        else:
            exp.append(m_new[s:e].double().square().sum() if h["momentum"] != 0 else 0.0)
        exp = torch.tensor([float(x) for x in exp], dtype=torch.float64)
        if found_inf:
            assert column[1].item() == 0.0, f"block {b}: a skipped step has no update"
        torch.testing.assert_close(column, exp, rtol=1e-5, atol=1e-30, msg=f"block {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["adam", "sgd_momentum"])
def test_update_found_inf_changes_nothing(cuda, config, dtype, stats):
    # Step 0 for tensor 0: a skipped very first step reports v-hat without bias correction.
    case = UpdateCase(config, dtype, cuda, steps=(0, 1, 0, 7))
    case.grad[case.lay.starts[3] + 10] = float("nan")
    case.grad[case.lay.starts[0]] = float("inf")
    case.globals[flat.FOUND_INF] = 1.0
    before = case.state()
    partials = case.run(stats)
    for ours, orig in zip(case.state(), before):
        assert_same_bits(ours, orig)
    if stats:
        assert_partials(case, before, case.state(), partials, found_inf=True)


def run_full_step(device, dtype, seed):
    """grad_norm -> tensor_reduce -> finalize -> update (Adam, stats) -> tensor_reduce."""
    case = UpdateCase("adam", dtype, device, seed=seed)
    lay = case.lay
    block_sums = torch.empty(2, lay.num_blocks, device=device)
    tensor_sums = torch.empty(2, len(SIZES), device=device)
    scale = torch.tensor([512.0], device=device)
    tracker = torch.zeros(1, dtype=torch.int32, device=device)
    cuda_backend.grad_norm(case.grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, scale,
                           block_sums)
    cuda_backend.tensor_reduce(block_sums, lay.tensor_block_start, flat.GRAD_SUM_OPS, tensor_sums, 0)
    cuda_backend.finalize(tensor_sums, lay.tensor_group, case.step, case.globals, scale, tracker,
                          None, 1.0, 2.0, 0.5, 2000, True)
    partials = case.run(stats=True)
    stat_values = torch.empty(6, len(SIZES), device=device)
    cuda_backend.tensor_reduce(partials, lay.tensor_block_start, flat.ADAM_STAT_OPS, stat_values, 0)
    return case.state() + [block_sums, tensor_sums, case.globals, case.step, scale, tracker,
                           partials, stat_values]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_runs_are_bit_identical(cuda, dtype):
    first = run_full_step(cuda, dtype, seed=5)
    second = run_full_step(cuda, dtype, seed=5)
    for a, b in zip(first, second):
        assert_same_bits(a, b)
    globals_ = first[-6].cpu()
    assert globals_[flat.FOUND_INF].item() == 0.0
    assert 0 < globals_[flat.CLIP_COEF].item() < 1  # max_grad_norm 1.0 clips these gradients


@pytest.mark.gpu
def test_update_beyond_2_31_elements(cuda):
    """64-bit indexing: one bf16 tensor of 2^31 + 5 elements (Adam, ~26 GB with its moments)."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info(cuda)
    if free < 32 * 2**30:
        pytest.skip(f"needs 32 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    lay = Layout([n], [0], cuda)
    param = torch.empty(lay.numel, dtype=torch.bfloat16, device=cuda).normal_()
    grad = torch.empty(lay.numel, dtype=torch.bfloat16, device=cuda).normal_()
    m = torch.zeros(lay.numel, device=cuda)
    v = torch.zeros(lay.numel, device=cuda)
    hyper = torch.tensor([[1e-2, 1e-2, 0.1, 0.9, 0.999, 1e-8, 0, 0, 0, 0]], device=cuda)
    globals_ = torch.zeros(8, device=cuda)
    globals_[flat.INV_SCALE] = 1.0
    globals_[flat.CLIP_COEF] = 1.0
    step = torch.ones(1, device=cuda)
    block_sums = torch.empty(2, lay.num_blocks, device=cuda)
    cuda_backend.grad_norm(grad, lay.block_tensor, lay.tensor_end, lay.tensor_group, None,
                           block_sums)
    last = lay.num_blocks - 1
    tail = grad[last * BLOCK:n].float()
    assert block_sums[0, last].item() == pytest.approx(tail.double().square().sum().item(), rel=1e-5)
    head = slice(0, BLOCK)
    end = slice(n - 3 * BLOCK, n)  # blocks past 2^31 elements, and the 5-element tail block
    expect = {}
    for name, sl in (("head", head), ("end", end)):
        p = param[sl].float().clone()
        adam_reference(p, grad[sl].float(), torch.zeros_like(p), torch.zeros_like(p), step=1,
                       lr=hyper[0, 0].item(), beta1=hyper[0, 3].item(), beta2=hyper[0, 4].item(),
                       eps=hyper[0, 5].item(), weight_decay=hyper[0, 2].item())
        expect[name] = p.to(torch.bfloat16)
    cuda_backend.update("adam", param, grad, m, v, lay.block_tensor, lay.tensor_end,
                        lay.tensor_group, step, hyper, globals_, None)
    torch.testing.assert_close(param[head].float(), expect["head"].float(),
                               **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(param[end].float(), expect["end"].float(),
                               **TOLERANCE[torch.bfloat16])
    assert v[n - 1].item() > 0 and v[n].item() == 0.0  # the last element updated, padding not
