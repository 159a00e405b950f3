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

Bit layout: the master's fp32 bits x as an int32 word (sign bit on top). Adding to the word
adds to the magnitude, whatever the sign, as long as the magnitude neither crosses 0 nor
reaches the sign bit; the operations below never do for finite values.
  split:    x24  = (x + 0x80) & ~0xFF                 (24 bits: rounded at bit 8, ties away)
            p    = (x + 0x8000) >> 16                 (bf16 bits, ties away from zero)
            rem  = x & 0xFFFF as int16 (32) | (x24 >> 8) & 0xFF as uint8 (24)
  combine:  x    = (p << 16) + rem                    (rem sign-extended: int16, or the uint8
                                                       read as int8, shifted left by 8)
The remainder is x's low bits taken as a signed offset from p: a param that was rounded up has
low bits >= 0x8000, i.e. a negative remainder, and p - |rem| is the master again.

This module is the specification: the reference step uses it, and the Triton kernel does the
same integer operations (triton_kernels/update.py, _combine_master / _split_master).
"""
from __future__ import annotations

import torch

BITS = (24, 32)
# The remainder's storage: the low 16 bits as int16 (two's complement of the same 16 bits), or
# bits 8-15 as uint8.
REMAINDER_DTYPES = {32: torch.int16, 24: torch.uint8}

_HALF = 0x8000


def _offset(remainder, bits):
    """The master's signed offset from its param (int32): the remainder sign-extended."""
    if bits == 32:
        return remainder.view(torch.int16).to(torch.int32)
    return remainder.view(torch.int8).to(torch.int32) << 8


def combine(param, remainder, bits):
    """The fp32 master value of a bf16 param and its remainder."""
    return (param.float().view(torch.int32) + _offset(remainder, bits)).view(torch.float32)


def split(master, bits):
    """(bf16 param, remainder) of an fp32 master value; for 24 bits the master is first rounded
    to 24 bits (nearest, ties away from zero)."""
    x = master.float().contiguous().view(torch.int32)
    if bits == 24:
        x = (x + 0x80) & ~0xFF
    high = (x + _HALF) >> 16
    param = (high << 16).view(torch.float32).to(torch.bfloat16)
    if bits == 32:
        remainder = x.to(torch.int16)
    else:
        remainder = (x >> 8).to(torch.uint8)
    return param, remainder
