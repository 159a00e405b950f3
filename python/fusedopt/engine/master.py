"""Master weights for bf16 params without an fp32 copy: the master's bits, split in two.

The fp32 master value m of a bf16 param is kept as the param itself plus a remainder the
optimizer owns:

- master_weight_bits=32: m exactly. The remainder is m's low 16 bits (int16, 2 B/param).
- master_weight_bits=24: m rounded to 24 bits, i.e. a 16-bit significand instead of fp32's 24.
  The remainder is bits 8-15 (uint8, 1 B/param).

The param is m rounded to bf16 to nearest, **ties away from zero**. torch's cast
(`m.to(torch.bfloat16)`) rounds ties to even; the two differ only when m's low 16 bits are
exactly 0x8000 and the bf16 truncation is even (one value in 2^17). Ties to even cannot be
decoded: for an even bf16 value p, both p + half an ulp (rounded down) and p - half an ulp
(rounded up from the odd value below) leave the same 16 low bits, so 16 bits of remainder could
not tell them apart. With ties away from zero, low bits >= 0x8000 always mean "rounded up", and
p and the remainder give m back bit for bit.

Bit layout (on the magnitude, sign-magnitude like the floats themselves):
  low  = m_bits & 0xFFFF               (24 bits: m rounded at bit 8 first, ties away from zero)
  p    = sign | ((m_bits & 0x7FFF0000) + (low >= 0x8000 ? 0x10000 : 0)), as bf16
  back = sign | ((p_bits & 0x7FFF0000) - (low >= 0x8000 ? 0x10000 : 0) + low)

This module is the specification: the reference step uses it, and the Triton kernel does the
same integer operations (triton_kernels/update.py, _combine_master / _split_master).
"""
from __future__ import annotations

import torch

BITS = (24, 32)
# The remainder's storage: the low 16 bits as int16 (two's complement of the same 16 bits), or
# bits 8-15 as uint8.
REMAINDER_DTYPES = {32: torch.int16, 24: torch.uint8}

_SIGN = -0x80000000  # 0x80000000 as an int32
_MAGNITUDE = 0x7FFFFFFF
_HIGH = 0x7FFF0000
_HALF = 0x8000


def _low16(remainder, bits):
    """The master's low 16 bits (int32, 0..0xFFFF) from a stored remainder."""
    low = remainder.to(torch.int32)
    if bits == 32:
        return low & 0xFFFF
    return low << 8


def combine(param, remainder, bits):
    """The fp32 master value of a bf16 param and its remainder."""
    p_bits = param.float().view(torch.int32)
    low = _low16(remainder, bits)
    carry = (low >= _HALF).to(torch.int32) << 16
    master = (p_bits & _SIGN) | (((p_bits & _HIGH) - carry) + low)
    return master.view(torch.float32)


def split(master, bits):
    """(bf16 param, remainder) of an fp32 master value; for 24 bits the master is first rounded
    to 24 bits (nearest, ties away from zero)."""
    m_bits = master.float().contiguous().view(torch.int32)
    sign, magnitude = m_bits & _SIGN, m_bits & _MAGNITUDE
    if bits == 24:
        magnitude = (magnitude + 0x80) & ~0xFF
    low = magnitude & 0xFFFF
    carry = (low >= _HALF).to(torch.int32) << 16
    param = (sign | ((magnitude & _HIGH) + carry)).view(torch.float32).to(torch.bfloat16)
    if bits == 32:
        remainder = (low - ((low >> 15) << 16)).to(torch.int16)
    else:
        remainder = (low >> 8).to(torch.uint8)
    return param, remainder

