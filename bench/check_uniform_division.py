"""Evidence for triton_kernels/math.py, divide_by_uniform: over many fp32 dividends and divisors,
RN(q + RN(x - q*d) * r) with r = RN(1/d), q = RN(x * r) equals RN(x / d) (Markstein 1990).
CPU only, numpy and exact rationals; about 10 minutes with the defaults.

    python bench/check_uniform_division.py [--per-divisor N]

fp32 operations are emulated exactly in fp64: x * r and q * d are exact there (24 + 24 bits),
and x - q * d is exact (Sterbenz: x and q * d are within a factor of 2). The two roundings to
fp32 of a value rounded first to fp64 are resolved with exact rationals wherever the fp64 value
sits on an fp32 tie, the only place where double rounding can differ from one rounding.
"""
import argparse
from fractions import Fraction

import numpy as np


def on_fp32_tie(v64):
    return (v64.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)


def round_exact(value: Fraction) -> np.float32:
    """The fp32 nearest to an exact rational (normal range), ties to even."""
    near = np.float32(float(value))
    candidates = [np.nextafter(near, np.float32(-np.inf)), near,
                  np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value),
                                          int(np.array(c).view(np.uint32)) & 1))


def round_fp32(v64, exact):
    """v64 rounded to fp32, the fp32 ties of v64 resolved from exact(i)."""
    out = v64.astype(np.float32)
    for i in np.nonzero(on_fp32_tie(v64))[0]:
        out[i] = round_exact(exact(i))
    return out


def divisors(rng):
    """sqrt(1 - beta2^t) as AdamW forms it, random divisors, and all-ones significands."""
    found = set()
    for beta2 in (0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999):
        for t in list(range(1, 200)) + [int(t) for t in rng.integers(200, 200000, 200)]:
            found.add(float(np.float32(np.sqrt(1.0 - beta2 ** t))))
    found.update(float(d) for d in rng.uniform(1e-3, 1.0, 300).astype(np.float32))
    found.update(float(np.float32(d))
                 for d in (1.0, 1 - 2 ** -24, 2 - 2 ** -23, 2 ** -9 * (2 - 2 ** -23), 0.75, 1 / 3))
    return sorted(d for d in found if d > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-divisor", type=int, default=200_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ds = divisors(rng)
    mismatches = 0
    for d in ds:
        d32 = np.float32(d)
        r = round_exact(Fraction(1) / Fraction(d))
        # Dividends over the range sqrt(v) takes (2^-75 .. 2^64), all-ones and zero significands.
        exponent = rng.integers(-75, 64, args.per_divisor)
        significand = rng.integers(0, 1 << 23, args.per_divisor)
        significand[:1000] = (1 << 23) - 1
        significand[1000:2000] = 0
        bits = ((exponent + 127).astype(np.uint32) << 23) | significand.astype(np.uint32)
        x = bits.view(np.float32)
        x64 = x.astype(np.float64)
        q = (x64 * np.float64(r)).astype(np.float32)
        residual = (x64 - q.astype(np.float64) * np.float64(d32)).astype(np.float32)
        corrected = round_fp32(
            q.astype(np.float64) + residual.astype(np.float64) * np.float64(r),
            lambda i: Fraction(float(q[i])) + Fraction(float(residual[i])) * Fraction(float(r)))
        expected = round_fp32(x64 / np.float64(d32),
                              lambda i: Fraction(float(x[i])) / Fraction(d))
        bad = np.nonzero(corrected.view(np.uint32) != expected.view(np.uint32))[0]
        mismatches += len(bad)
        for i in bad[:3]:
            print(f"mismatch: x {x[i]!r} / d {d32!r}: corrected {corrected[i]!r}, "
                  f"IEEE {expected[i]!r}")
    print(f"{len(ds)} divisors x {args.per_divisor} dividends: {mismatches} mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
