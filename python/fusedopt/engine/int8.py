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

The code's bits are an fp32's: a code's value divided by 2^(s - 7) is a tiny fp32 whose
exponent field is e and whose mantissa starts with f, and the linear range is fp32's own
subnormal range. So decoding shifts the code's bits into an fp32's place and multiplies by
2^(s - 7); encoding multiplies by 2^(7 - s) and keeps the top bits. Both multiplies are exact
(by powers of two, and no result leaves the normal range except the encoded elements below the
code's smallest step, which round to 0 either way); 2^(s - 7) spans more than fp32's exponent
range, so each is taken as two factors, 2^SPLIT and the group's own. Every backend does these
IEEE multiplies and integer operations, so all store the same bytes for the same fp32 values.
The kernels are bound by instruction issue in this mode, and this way a code costs two fp32
multiplies and a few integer operations each way.

Rounding is stochastic, as for bf16 state (fusedopt/engine/stochastic.py, the same 16 random
bits of (step, element index, state)): the random bits are added at the top of the bits a code
drops, before they are dropped, which makes each stored value an unbiased estimate of the fp32
value (to 2^-16 of a code step); round to nearest would hold every moment whose per-step change
is under half a code step (v's 0.1% a step with beta2 = 0.999, against steps of 3-6%). A
negative first moment that rounds to 0 keeps its sign (code 0x80, decoded as -0.0): the sign
bit is the value's, whatever the magnitude code. Loading a checkpoint rounds to nearest
(nearest()). Values that are codes already encode to themselves, so decoded state saved and
loaded again decodes to the same values bit for bit (the scale byte may come out one lower when
the group's largest element had rounded down: the same values, coded one octave lower).

This module is the specification: the reference step uses it, and triton_kernels/update.py
(_encode8 / _decode8) and csrc/common.cuh (Int8Code) do the same operations.
"""
from __future__ import annotations

import torch

GROUP = 32
# The storage of the codes, one byte per element.
CODES_DTYPE = torch.uint8
EXPONENT_BITS = 3
TOP_EXPONENT = (1 << EXPONENT_BITS) - 1
MANTISSA_BITS = {"signed": 4, "sqrt": 5}
SIGN_BIT = 0x80
MIN_SCALE = 32
# 2^(s - 7) = 2^SPLIT * 2^(s - 7 - SPLIT): with s in [MIN_SCALE, 255] both factors of either
# direction (2^(s - 131), 2^(131 - s), 2^+-124) are normal fp32 numbers.
SPLIT = 124


def round_bits(code):
    """The fp32 mantissa bits below the kept ones: how many random bits a rounding takes."""
    return 23 - MANTISSA_BITS[code]


def nearest(code):
    """The rounding offset of round-to-nearest (ties up): half the dropped range."""
    return 1 << (round_bits(code) - 1)


def coded(value, code):
    """The quantity a format codes: sqrt(v) for "sqrt", the value itself for "signed"."""
    return value.float().sqrt() if code == "sqrt" else value.float()


def group_scale(magnitude_max, code):
    """The scale byte of groups whose largest |coded value| has fp32 bits magnitude_max: its
    exponent field rounded up at the kept precision; 0 for groups below MIN_SCALE."""
    scale = (magnitude_max + (1 << round_bits(code)) - 1) >> 23
    return torch.where(scale >= MIN_SCALE, scale, 0)


def random_offsets(random16, code):
    """The offsets stochastic rounding adds: 16 random bits per element (stochastic.random16)
    at the top of the round_bits(code) bits a code drops."""
    return random16 << (round_bits(code) - 16)


def _power_of_two(exponent, scale):
    """fp32 2^exponent (int64 per element, normal range) where scale != 0, else 0."""
    bits = ((exponent + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where(scale != 0, bits, 0.0)


def encode(value, scale, random, code):
    """Codes (uint8) of fp32 coded values (coded()) in groups of scale bytes `scale` (int64, one
    per element: its group's), rounded with `random` (int64 in [0, 2^round_bits(code)) per
    element: random_offsets, or nearest(code)): value * 2^(7 - s) in fp32, whose bits less
    the dropped ones are the code."""
    tiny = (value.float() * _power_of_two(TOP_EXPONENT + SPLIT - scale, scale)) * 2.0 ** -SPLIT
    bits = tiny.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    result = ((bits & 0x7FFFFFFF) + random) >> round_bits(code)
    if code == "sqrt":
        # sqrt(v) >= 2^-75 for any nonzero fp32 v, so its group has a scale (>= 52): the
        # smallest code, not 0.
        return torch.maximum(result, (value != 0).long()).to(torch.uint8)
    return (result | ((bits >> 31) << 7)).to(torch.uint8)


def decode(codes, scale, code):
    """fp32 values of codes (uint8) with their groups' scale bytes (int64 per element): the code's
    bits in an fp32's place, times 2^(s - 7); 0 in a group stored as zeros (scale 0)."""
    mantissa = MANTISSA_BITS[code]
    c = codes.to(torch.int64)
    if code == "signed":
        bits = ((c & SIGN_BIT) << 24) | ((c & ~SIGN_BIT) << (23 - mantissa))
    else:
        bits = c << (23 - mantissa)
    tiny = bits.to(torch.int32).view(torch.float32)
    value = (tiny * 2.0 ** SPLIT) * _power_of_two(scale - TOP_EXPONENT - SPLIT, scale)
    return value * value if code == "sqrt" else value


def quantize(value, group, num_groups, random, code):
    """(codes, scales) of fp32 values whose elements belong to groups `group` (int64 per
    element, 0 <= group < num_groups): the scales from each group's largest magnitude, then
    encode. Groups without elements get scale 0."""
    x = coded(value, code)
    magnitude = x.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    largest = torch.zeros(num_groups, dtype=torch.int64, device=value.device)
    largest.scatter_reduce_(0, group.reshape(-1), magnitude.reshape(-1), "amax")
    scales = group_scale(largest, code)
    return encode(x, scales[group], random, code), scales.to(torch.uint8)
