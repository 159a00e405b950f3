"""bf16 optimizer state with stochastic rounding: the rounding and its random bits, specified.

A bf16 moment loses every update smaller than half its ulp when rounded to nearest (v with
beta2 = 0.999 changes by 0.1% a step, under bf16's 2^-9 relative half-ulp), so the stored value
would stall. Rounded stochastically, up with probability equal to the discarded fraction, it
is unbiased: E[stored] = the fp32 value, and the moments track their fp32 counterparts with an
error that averages out over steps.

The random bits are a hash of (step, element index in the segment's state buffer) rather than a
generator's stream: the same inputs give the same bits on every backend and every run, nothing
is kept between steps, and a CUDA graph replays correctly (the step count is read on the
device). The hash is Chris Wellons' lowbias32 (a 32-bit integer finalizer), all arithmetic mod
2^32:
  h = (index * 0x9E3779B1) ^ (step * 0x85EBCA77)
  h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16
One hash serves both states of an element: the first state (stream 1) takes h's low 16 bits,
the second (stream 2) its high 16. The kernels are bound by integer issue, not memory, in these
modes, and a second hash per element cost ~10 integer operations of ~100. For bf16 state the
16 bits are added to the fp32 value's bits and the low half is dropped (on the magnitude: the
same in both directions for negative values); 8-bit state (fusedopt/engine/int8.py) adds them
at the top of the bits it drops (a rounding biased by at most 2^-16 of a code step).

This module is the specification; triton_kernels/update.py (_hash32, _stochastic_bf16) does
the same integer operations.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def hash32(step: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 0..2^32-1) per element index for one step."""
    h = (index & MASK32) * 0x9E3779B1 & MASK32
    h = h ^ ((step * 0x85EBCA77) & MASK32)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D & MASK32
    h = h ^ (h >> 15)
    h = h * 0x846CA68B & MASK32
    return h ^ (h >> 16)


STREAMS = (1, 2)


def random16(step: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """16 random bits (int64 0..0xFFFF) per element index for one step and state stream: the low
    (stream 1) or high (stream 2) half of the element's hash."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream}")
    h = hash32(step, index)
    return h & 0xFFFF if stream == 1 else h >> 16


def to_bf16(value: torch.Tensor, step: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """value (fp32) rounded stochastically to bf16, with the random bits of (step, index,
    stream)."""
    bits = value.float().contiguous().view(torch.int32).to(torch.int64) & MASK32
    bits = ((bits + random16(step, index.reshape(value.shape), stream)) >> 16) & 0xFFFF
    bits = bits - ((bits >> 15) << 16)  # two's complement of the 16 bits, for int16
    return bits.to(torch.int16).view(torch.bfloat16)
