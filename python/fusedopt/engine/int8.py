"""8-bit optimizer state (state_dtype="int8"): the codes, the group scales and the rounding,
specified.

Each state element is one byte; each group of GROUP = 32 consecutive elements of a segment's
state buffer has one more byte, its scale s: the fp32 exponent field of the group's largest
magnitude, rounded up at the code's precision (so the largest element can round up into the
next octave instead of being held below it). 32 divides STATE_ALIGN, so no group spans two
tensors. Resident state per param and moment: 1 + 1/32 B.

A code is a tiny float relative to 2^(s - 127): an exponent field e of 3 bits, whose top value
7 is the octave [1, 2) * 2^(s - 127), and M mantissa bits f; below e = 1 a linear
("subnormal") range down to 0, so small values round to 0 or the smallest code rather than
flushing:
  e >= 1: (1 + f / 2^M) * 2^(e - 7) * 2^(s - 127)
  e == 0: (f / 2^M)     * 2^(1 - 7) * 2^(s - 127)
Two formats, by what the state holds (each algorithm names its states' formats, STATE_CODES):
- "signed" (first moments, momentum): sign bit + e + 4 mantissa bits: 7 octaves at a relative
  step of 1/16 to 1/32, then linear steps of 2^-10 of the group's top.
- "sqrt" (Adam's second moment v): e + 5 mantissa bits on u = sqrt(v): 7 octaves of u (14 of v)
  at a relative step of 1/32 to 1/64 of u, then linear steps of 2^-11 of the group's top u.
  v spans many more decades than m within a group, and the update divides by sqrt(v): a
  linear code of v would round the small v of a group with one large element to 0 and blow
  their updates up (m / eps). Coding sqrt(v) on a log-like scale keeps each element's own
  relative precision over 14 octaves of v, and a nonzero v never rounds to 0 (at worst it
  takes the smallest code: a smaller update, never a larger one). The extra mantissa bit goes
  to v because v is a slow average (beta2 = 0.999): each step's rounding error decays only by
  beta2, so it accumulates over ~1000 steps (simulated stationary RMS error of v: 21% with 4
  bits, 14% with 5), while m's (beta1 = 0.9) fades within ~10 steps.
A group whose maximum is below 2^(MIN_SCALE - 127) (about 2.5e-29) is stored as zeros (s = 0).

Rounding is stochastic, as for bf16 state (fusedopt/engine/stochastic.py, the same hash of
(step, element index, state)): random bits are added below the kept bits before they are
dropped, which makes each stored value an unbiased estimate of the fp32 value; round to nearest
would hold every moment whose per-step change is under half a code step (v's 0.1% a step with
beta2 = 0.999, against steps of 3-6%). Loading a checkpoint rounds to nearest (nearest()).
Values that are codes already encode to themselves, so decoded state saved and loaded again
decodes to the same values bit for bit (the scale byte may come out one lower when the group's
largest element had rounded down: the same values, coded one octave lower).

Everything is integer arithmetic on the fp32 bits and an exact multiply by a power of two, so
every backend gives the same bytes for the same fp32 values. This module is the specification:
the reference step uses it, and triton_kernels/update.py (_encode8 / _decode8) does the same
operations.
"""
from __future__ import annotations

import torch

GROUP = 32
EXPONENT_BITS = 3
TOP_EXPONENT = (1 << EXPONENT_BITS) - 1
MANTISSA_BITS = {"signed": 4, "sqrt": 5}
SIGN_BIT = 0x80
MIN_SCALE = 32


def round_bits(code):
    """The fp32 mantissa bits below the kept ones: how many random bits a rounding takes."""
    return 23 - MANTISSA_BITS[code]


def nearest(code):
    """The rounding offset of round-to-nearest (ties up): half the dropped range."""
    return 1 << (round_bits(code) - 1)


def top_code(code):
    """The largest magnitude code: every bit of the exponent field and the mantissa set."""
    return (1 << (EXPONENT_BITS + MANTISSA_BITS[code])) - 1


def _magnitude_bits(value):
    """|value|'s fp32 bits (int64) and its sign (0 or 1)."""
    bits = value.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return bits & 0x7FFFFFFF, bits >> 31


def coded(value, code):
    """The quantity a format codes: sqrt(v) for "sqrt", the value itself for "signed"."""
    return value.float().sqrt() if code == "sqrt" else value.float()


def group_scale(magnitude_max, code):
    """The scale byte of groups whose largest |coded value| has fp32 bits magnitude_max: its
    exponent field rounded up at the kept precision; 0 for groups below MIN_SCALE."""
    scale = (magnitude_max + (1 << round_bits(code)) - 1) >> 23
    return torch.where(scale >= MIN_SCALE, scale, 0)


def encode(magnitude, sign, scale, random, code):
    """Codes (uint8) of the coded values with fp32 magnitude bits `magnitude` and signs `sign`
    (_magnitude_bits) in groups of scale bytes `scale` (int64, one per element: its group's),
    rounded with `random` (int64 in [0, 2^round_bits(code)) per element, or nearest(code))."""
    mantissa, dropped = MANTISSA_BITS[code], round_bits(code)
    exponent = magnitude >> 23
    normal = (exponent >= 1) & (exponent - scale + TOP_EXPONENT >= 1)
    in_normal = ((magnitude + random) >> dropped) - ((scale - TOP_EXPONENT) << mantissa)
    significand = (magnitude & 0x7FFFFF) | torch.where(exponent > 0, 0x800000, 0)
    shift = (scale - TOP_EXPONENT + 1 - exponent.clamp(min=1)).clamp(0, 31)
    in_linear = ((significand >> shift) + random) >> dropped
    result = torch.where(normal, in_normal, in_linear)
    if code == "sqrt":
        result = torch.where(magnitude > 0, result.clamp(min=1), 0)
    result = torch.where(scale == 0, 0, result)
    if code == "signed":
        result = result | torch.where(result > 0, sign << 7, 0)
    return result.to(torch.uint8)


def decode(codes, scale, code):
    """fp32 values of codes (uint8) with their groups' scale bytes (int64 per element)."""
    mantissa = MANTISSA_BITS[code]
    c = codes.to(torch.int64)
    magnitude_code = c & ~SIGN_BIT if code == "signed" else c
    e = magnitude_code >> mantissa
    f = magnitude_code & ((1 << mantissa) - 1)
    significand = torch.where(e >= 1, f + (1 << mantissa), f)
    # The weight of the significand's unit, built from its exponent field (>= 21 for a group
    # above MIN_SCALE; 0, the float 0, for a group stored as zeros).
    unit_field = (e.clamp(min=1) - TOP_EXPONENT - mantissa + scale).clamp(min=0)
    unit = (unit_field << 23).to(torch.int32).view(torch.float32)
    value = significand.to(torch.float32) * unit
    if code == "sqrt":
        return value * value
    return torch.where((c & SIGN_BIT) != 0, -value, value)


def quantize(value, group, num_groups, random, code):
    """(codes, scales) of fp32 values whose elements belong to groups `group` (int64 per
    element, 0 <= group < num_groups): the scales from each group's largest magnitude, then
    encode. Groups without elements get scale 0."""
    magnitude, sign = _magnitude_bits(coded(value, code))
    largest = torch.zeros(num_groups, dtype=torch.int64, device=value.device)
    largest.scatter_reduce_(0, group.reshape(-1), magnitude.reshape(-1), "amax")
    scales = group_scale(largest, code)
    return encode(magnitude, sign, scales[group], random, code), scales.to(torch.uint8)
