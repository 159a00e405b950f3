"""Element helpers of the Triton kernels (triton_kernels/math.py) that must round exactly as the
operation they replace. On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py), whose
tl.fma rounds once as the GPU's does."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fusedopt.triton_kernels.math import divide_by_uniform  # noqa: E402


@triton.jit
def divide_kernel(x_ptr, out_ptr, divisor, reciprocal, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, divide_by_uniform(x, divisor, reciprocal), mask=mask)


def test_division_by_a_shared_divisor_rounds_as_ieee_division(device):
    """AdamW's sqrt(v) / sqrt(1 - beta2^t) comes from the divisor's reciprocal and one
    correction: it must equal IEEE division bit for bit over the range sqrt(v) takes (2^-75 to
    2^64, zero, inf, NaN), on bias corrections and divisors of every significand."""
    gen = torch.Generator().manual_seed(7)
    n = 1 << 16
    exponent = torch.randint(-75, 65, (n,), generator=gen)
    significand = torch.randint(0, 1 << 23, (n,), generator=gen)
    significand[:512] = (1 << 23) - 1
    significand[512:1024] = 0
    x = (((exponent + 127) << 23) | significand).to(torch.int32).view(torch.float32)
    x[:4] = torch.tensor([0.0, float("inf"), float("nan"), 1.0])
    corrections = [1.0 - 0.999 ** t for t in (1, 2, 10, 1000, 100000)] + [1 - 0.95, 1 - 0.99999]
    divisors = torch.tensor([c ** 0.5 for c in corrections] + [1.0, 1 - 2 ** -24, 0.75],
                            dtype=torch.float32)
    divisors = torch.cat([divisors, torch.rand(8, generator=gen) * 0.999 + 0.001])
    x = x.to(device)
    for divisor in divisors:
        reciprocal = torch.tensor(1.0) / divisor
        out = torch.empty_like(x)
        divide_kernel[(triton.cdiv(n, 1024),)](x, out, float(divisor), float(reciprocal), n,
                                              BLOCK=1024)
        expected = x / divisor.to(device)
        # NaN in, NaN out (payloads and signs of NaN differ between devices, as in torch).
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan), float(divisor)
        assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32)), (
            float(divisor))
