// Device helpers shared by the four kernels: storage-dtype conversion, the per-thread element
// mapping of a BLOCK (vectorized or masked), tensor-table access, fixed-order block reductions and
// launch checks; and the low-precision tier's integer encodings (master weights of bf16 params,
// bf16 state rounded stochastically, 8-bit state's codes and group scales), which the update
// kernel loads and stores with.
//
// Determinism: every reduction here has a fixed shape. A thread folds its own elements in slot
// order, a warp combines lanes with a xor-shuffle butterfly, and warp 0 combines the per-warp
// results in warp order. There are no atomics, so the same inputs give bit-identical outputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace fusedopt {

// 256 threads x 16 elements = one 4096-element BLOCK per thread block: each thread holds 16
// elements of every array in registers, i.e. four (fp32) or two (bf16/fp16) 16-byte loads per
// array, enough bytes in flight to cover DRAM latency at 2-4 resident blocks per SM.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = kBlock / kThreads;
static_assert(kPerThread * kThreads == kBlock, "BLOCK must split evenly over the threads");

// Conversion between a storage dtype and the fp32 the math runs in. Values travel as raw bits so
// that 16-byte vectors can be unpacked with memcpy (no type punning through unions).
template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float x) { return __float_as_uint(x); }
};

template <>
struct Storage<__nv_bfloat16> {
  using Bits = uint16_t;
  // bf16 is the top half of an fp32: widening is a shift, exact.
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <>
struct Storage<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// The master weights' remainders (see Master below) are integers: they travel as their own bits
// and have no float value.
template <>
struct Storage<uint16_t> {
  using Bits = uint16_t;
};

template <>
struct Storage<uint8_t> {
  using Bits = uint8_t;
};

template <typename S>
using BitsOf = typename Storage<S>::Bits;

// Elements of T in one 16-byte vector: 4 for fp32, 8 for bf16/fp16.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// The value x becomes once stored as T (identity for fp32); statistics use stored values.
template <typename T>
__device__ __forceinline__ float round_to_storage(float x) {
  return Storage<T>::to_float(Storage<T>::from_float(x));
}

// A thread's kPerThread elements of one array as the full path's raw vectors (its loads before
// conversion), in slot order, a group of Slots<W>'s W consecutive elements at a time: 16-byte
// vectors where a group fills them (a thread's fp32 slots take 4, its bf16/fp16 or int16 slots
// 2), else one 8-byte vector a group (the uint8 remainder and 8-bit state's codes at W = 8: 2),
// or one 4-byte word (8-bit state's codes at W = 4: 4).
template <typename S, int W>
struct RawSlots {
  static constexpr int kGroupBytes = W * int(sizeof(S));
  using Vector = std::conditional_t<kGroupBytes >= 16, uint4, std::conditional_t<kGroupBytes >= 8, uint2, uint32_t>>;
  static_assert(kGroupBytes % int(sizeof(Vector)) == 0, "a group of W elements fills whole vectors");
  static constexpr int kPerGroup = kGroupBytes / int(sizeof(Vector));  // vectors per group
  Vector v[kPerThread / W * kPerGroup];
};

// The largest v over each aligned run of LANES lanes of the warp, in every lane of the run: a
// xor-shuffle butterfly. Every lane of the warp must call it.
template <int LANES>
__device__ __forceinline__ uint32_t lanes_max(uint32_t v) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Element mapping of one BLOCK onto a thread's kPerThread slots. Every array is addressed from a
// base pointer at the block's first element: params and grads at the tensor's element
// b * kBlock - BLOCK_START (pointer arithmetic in 64 bits), states (and remainders) at STATE_START
// plus that element; offsets inside a block stay below kBlock.
// Full path (the block lies entirely inside the tensor and every base pointer is 16-byte aligned):
//   slot k * W + j <-> element (k * kThreads + tid) * W + j, so each thread moves W consecutive
//   elements of every array in vectors (RawSlots). W is the larger kVec of the param and the
//   state dtypes (the update kernel picks it): 4 for fp32 params with fp32 state, 8 with bf16/fp16
//   params or bf16 state. The narrower of the two takes one 16-byte vector per W elements and a
//   warp covers 512 contiguous bytes of it per load; fp32 arrays at W = 8 take two. The uint8
//   remainder (24-bit masters, W = 8) moves in 8-byte vectors: a warp still covers 256
//   contiguous bytes per load, while W = 16 for its sake would give the fp32 states 64 bytes a
//   lane (12% slower, update.cu's measures). 8-bit state's codes move at the param's W for the
//   same reason: 4 or 8 bytes a lane (a warp covers 128 or 256 contiguous bytes per load) rather
//   than W = 16, which would give fp32 params and grads 64 bytes a lane.
// Tail path (the tensor ends inside the block, or a pointer is unaligned):
//   slot i <-> element i * kThreads + tid, scalar loads masked by the element count.
// 8-bit state's groups of kInt8Group consecutive elements (one scale byte each) lie within one
// warp on both paths: the block's first element starts a group (STATE_START and BLOCK are
// multiples of kInt8Group), so on the full path a lane's W consecutive elements of a slot group
// lie in one group, shared by kInt8Group / W consecutive lanes (those with the same
// tid / (kInt8Group / W): 4 lanes at W = 8, 8 at W = 4), and on the tail path slot i of a warp's
// 32 lanes holds 32 consecutive elements, one whole group. A group's maximum is then a
// xor-shuffle butterfly over those lanes (group_max): no shared memory, and the same comparisons
// in every run.
// Which path a block takes depends only on the layout and the addresses of its one tensor and of
// the state buffers (torch's caching allocator hands out 512-byte aligned blocks), so the
// summation order is fixed.
template <int W>
struct Slots {
  static_assert(kPerThread % W == 0, "vector width must divide the elements per thread");
  static_assert(kInt8Group % W == 0 && kInt8Group == 32,
                "a lane's W elements lie in one group; a tail slot's group is one warp's 32 lanes");
  int count;  // elements of the block inside the tensor: min(NUMEL - first element, kBlock)
  bool full;

  // remaining: elements of the tensor from the block's first one on (>= 1 for a block the
  // layout gives the tensor).
  static __device__ __forceinline__ Slots of(int64_t remaining, bool aligned) {
    const int count = remaining < kBlock ? int(remaining) : kBlock;
    return Slots{count, aligned && count == kBlock};
  }

  __device__ __forceinline__ bool valid(int slot) const {
    return full || slot * kThreads + int(threadIdx.x) < count;
  }

  // Full path only: the raw 16-byte vectors of one array's slots, issued back to back and not yet
  // converted. A kernel that reads several arrays loads all of them raw first and unpacks after:
  // converting a 2-byte type is real work (shift/PRMT), and done inside the per-array full/tail
  // branch it would make each array's loads wait for the previous array's data (one DRAM round
  // trip per array instead of one per block). For fp32 the unpack is a register rename.
  template <typename S>
  __device__ __forceinline__ void load_raw(const S* __restrict__ base, RawSlots<S, W>& raw) const {
    using Vector = typename RawSlots<S, W>::Vector;
    constexpr int kLoads = RawSlots<S, W>::kPerGroup;
#pragma unroll
    for (int k = 0; k < kPerThread / W; ++k) {
      const S* src = base + (k * kThreads + int(threadIdx.x)) * W;
#pragma unroll
      for (int l = 0; l < kLoads; ++l) raw.v[k * kLoads + l] = reinterpret_cast<const Vector*>(src)[l];
    }
  }

  template <typename S>
  static __device__ __forceinline__ void unpack(const RawSlots<S, W>& raw, float (&out)[kPerThread]) {
    using Bits = BitsOf<S>;
    constexpr int kLoads = RawSlots<S, W>::kPerGroup;
#pragma unroll
    for (int k = 0; k < kPerThread / W; ++k) {
      Bits bits[W];
      memcpy(bits, &raw.v[k * kLoads], sizeof(bits));
#pragma unroll
      for (int j = 0; j < W; ++j) out[k * W + j] = Storage<S>::to_float(bits[j]);
    }
  }

  // The slots' bits as they are (the master weights' remainders): the raw vectors hold the slots
  // in order.
  template <typename S>
  static __device__ __forceinline__ void unpack_bits(const RawSlots<S, W>& raw, BitsOf<S> (&out)[kPerThread]) {
    static_assert(sizeof(out) == sizeof(raw.v), "one element of S per slot");
    memcpy(out, raw.v, sizeof(out));
  }

  // Tail path: scalar loads masked by the count; masked slots read as 0. (Written apart from
  // load_tail_bits: sharing it changed the fp32 kernels' code.)
  template <typename S>
  __device__ __forceinline__ void load_tail(const S* __restrict__ base, float (&out)[kPerThread]) const {
    const BitsOf<S>* src = reinterpret_cast<const BitsOf<S>*>(base);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = i * kThreads + int(threadIdx.x);
      out[i] = e < count ? Storage<S>::to_float(src[e]) : 0.f;
    }
  }

  template <typename S>
  __device__ __forceinline__ void load_tail_bits(const S* __restrict__ base, BitsOf<S> (&out)[kPerThread]) const {
    const BitsOf<S>* src = reinterpret_cast<const BitsOf<S>*>(base);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = i * kThreads + int(threadIdx.x);
      out[i] = e < count ? src[e] : BitsOf<S>(0);
    }
  }

  template <typename S>
  __device__ __forceinline__ void load_bits(const S* __restrict__ base, BitsOf<S> (&out)[kPerThread]) const {
    if (full) {
      RawSlots<S, W> raw;
      load_raw(base, raw);
      unpack_bits(raw, out);
    } else {
      load_tail_bits(base, out);
    }
  }

  template <typename S>
  __device__ __forceinline__ void load(const S* __restrict__ base, float (&out)[kPerThread]) const {
    if (full) {
      RawSlots<S, W> raw;
      load_raw(base, raw);
      unpack(raw, out);
    } else {
      load_tail(base, out);
    }
  }

  // Stores one array's slots, slot value x as the bits to_bits(x, e), e its element in the block
  // (the random bits of a stochastically rounded state depend on it).
  template <typename S, typename ToBits>
  __device__ __forceinline__ void store(S* __restrict__ base, const float (&in)[kPerThread], ToBits to_bits) const {
    using Bits = BitsOf<S>;
    if (full) {
      using Vector = typename RawSlots<S, W>::Vector;
      constexpr int kStores = RawSlots<S, W>::kPerGroup;
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        const int first = (k * kThreads + int(threadIdx.x)) * W;
        Bits bits[W];
#pragma unroll
        for (int j = 0; j < W; ++j) bits[j] = to_bits(in[k * W + j], first + j);
        Vector raw[kStores];
        memcpy(raw, bits, sizeof(raw));
#pragma unroll
        for (int l = 0; l < kStores; ++l) reinterpret_cast<Vector*>(base + first)[l] = raw[l];
      }
    } else {
      Bits* dst = reinterpret_cast<Bits*>(base);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = i * kThreads + int(threadIdx.x);
        if (e < count) dst[e] = to_bits(in[i], e);
      }
    }
  }

  // Stores the values rounded to nearest even into S.
  template <typename S>
  __device__ __forceinline__ void store(S* __restrict__ base, const float (&in)[kPerThread]) const {
    store(base, in, [](float x, int) { return Storage<S>::from_float(x); });
  }

  // Stores one array's slots as the bits given (8-bit state's codes), in store's vectors and
  // masks.
  template <typename S>
  __device__ __forceinline__ void store_bits(S* __restrict__ base, const BitsOf<S> (&in)[kPerThread]) const {
    if (full) {
      using Vector = typename RawSlots<S, W>::Vector;
      constexpr int kStores = RawSlots<S, W>::kPerGroup;
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        const int first = (k * kThreads + int(threadIdx.x)) * W;
        Vector raw[kStores];
        memcpy(raw, &in[k * W], sizeof(raw));
#pragma unroll
        for (int l = 0; l < kStores; ++l) reinterpret_cast<Vector*>(base + first)[l] = raw[l];
      }
    } else {
      BitsOf<S>* dst = reinterpret_cast<BitsOf<S>*>(base);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = i * kThreads + int(threadIdx.x);
        if (e < count) dst[e] = in[i];
      }
    }
  }

  // The block element of slot `slot`.
  __device__ __forceinline__ int element(int slot) const {
    return full ? (slot / W * kThreads + int(threadIdx.x)) * W + slot % W : slot * kThreads + int(threadIdx.x);
  }

  // 8-bit state: the group scale bytes a lane loads from `scales` (at the block's first group),
  // before group_byte hands each slot its own. Full path: one per slot group, the group of its W
  // elements (the lanes sharing it read the same byte). Tail path: lane l < kPerThread reads the
  // byte of slot l's group, which is the whole warp's (0 for a group past the tensor's end), so a
  // lane holds one byte until decoding instead of kPerThread.
  __device__ __forceinline__ void load_group_bytes(const uint8_t* __restrict__ scales,
                                                   uint32_t (&bytes)[kPerThread / W]) const {
    if (full) {
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) bytes[k] = scales[(k * kThreads + int(threadIdx.x)) * W / kInt8Group];
    } else {
      const int lane = int(threadIdx.x) % 32;
      const int first = lane * kThreads + int(threadIdx.x) - lane;  // slot `lane`'s element in lane 0
      bytes[0] = lane < kPerThread && first < count ? uint32_t(scales[first / kInt8Group]) : 0u;
    }
  }

  // The scale byte of slot `slot`'s group, from load_group_bytes' bytes: on the tail path a
  // shuffle from lane `slot` (every lane of the warp must call it).
  __device__ __forceinline__ uint32_t group_byte(const uint32_t (&bytes)[kPerThread / W], int slot) const {
    return full ? bytes[slot / W] : __shfl_sync(0xffffffffu, bytes[0], slot);
  }

  // bits[slot] becomes the largest bits over the slot's group, in every lane holding part of
  // it; masked slots must hold 0 (a group partly past the tensor's end takes the maximum of its
  // elements). Every thread of the block must call it (shuffles over the whole warp).
  __device__ __forceinline__ void group_max(uint32_t (&bits)[kPerThread]) const {
    if (full) {
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        uint32_t largest = bits[k * W];
#pragma unroll
        for (int j = 1; j < W; ++j) largest = max(largest, bits[k * W + j]);
        largest = lanes_max<kInt8Group / W>(largest);
#pragma unroll
        for (int j = 0; j < W; ++j) bits[k * W + j] = largest;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) bits[i] = lanes_max<32>(bits[i]);
    }
  }

  // Stores each group's scale byte (any of its slots' scale[slot]) from the group's first lane:
  // every group on the full path; on the tail path each group with an element in the tensor (a
  // group partly past its end is the tensor's own: its state spans STATE_ALIGN multiples), and
  // none past the end, which may belong to the next tensor.
  __device__ __forceinline__ void store_groups(uint8_t* __restrict__ scales,
                                               const uint32_t (&scale)[kPerThread]) const {
    if (full) {
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        const int first = (k * kThreads + int(threadIdx.x)) * W;
        if (first % kInt8Group == 0) scales[first / kInt8Group] = uint8_t(scale[k * W]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = i * kThreads + int(threadIdx.x);
        if (e % kInt8Group == 0 && e < count) scales[e / kInt8Group] = uint8_t(scale[i]);
      }
    }
  }
};

// Master weights for bf16 params (fusedopt/engine/master.py, the specification; the Triton kernel's
// _combine_master / _split_master): the fp32 master is the bf16 param plus a remainder of its low
// bits, laid out like the state. BITS 32 keeps the low 16 bits (int16, handled as uint16_t: the
// same 16 bits), 24 keeps bits 8-15 (uint8) of the master rounded to 24 bits. The param is the
// master rounded to nearest with ties away from zero, so that low bits >= 0x8000 always mean
// "rounded up" and can be undone: integer operations only, as __float2bfloat16_rn rounds ties to
// even, which the remainder could not be decoded against. Unsigned arithmetic gives the bits of
// the specification's int32 arithmetic (two's complement, wrapping).
template <int BITS>
struct Master {
  static_assert(BITS == 24 || BITS == 32, "master weights keep 24 or 32 bits");
  using Remainder = std::conditional_t<BITS == 32, uint16_t, uint8_t>;

  // The fp32 master of a bf16 param (widened to fp32, exact) and its remainder.
  static __device__ __forceinline__ float combine(float param, Remainder remainder) {
    const uint32_t p = __float_as_uint(param);
    const uint32_t low = BITS == 32 ? uint32_t(remainder) : uint32_t(remainder) << 8;
    const uint32_t carry = low >= 0x8000u ? 0x10000u : 0u;
    return __uint_as_float((p & 0x80000000u) | (((p & 0x7FFF0000u) - carry) + low));
  }

  // The bf16 bits of the param the master splits into.
  static __device__ __forceinline__ uint16_t param_bits(float master) {
    const uint32_t bits = __float_as_uint(master);
    const uint32_t magnitude = kept_magnitude(bits);
    const uint32_t carry = (magnitude & 0xFFFFu) >= 0x8000u ? 0x10000u : 0u;
    return uint16_t(((bits & 0x80000000u) | ((magnitude & 0x7FFF0000u) + carry)) >> 16);
  }

  // The remainder the master splits into: its kept low bits.
  static __device__ __forceinline__ Remainder remainder(float master) {
    const uint32_t low = kept_magnitude(__float_as_uint(master)) & 0xFFFFu;
    return Remainder(BITS == 32 ? low : low >> 8);
  }

 private:
  // The master's magnitude bits; for 24 bits rounded at bit 8 (ties away from zero) first.
  static __device__ __forceinline__ uint32_t kept_magnitude(uint32_t bits) {
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    return BITS == 32 ? magnitude : (magnitude + 0x80u) & ~0xFFu;
  }
};

// The random bits of stochastically rounded state (fusedopt/engine/stochastic.py, hash32, the
// specification; the Triton kernel's _hash32): the lowbias32 hash of (step, element index in the
// segment's state buffer, stream: 1 for state1, 2 for state2), uint32 arithmetic wrapping mod
// 2^32, so every backend and every run (and a CUDA graph replay, the step being read on the
// device) gets the same ones.
class StateRandom {
 public:
  // step: the tensor's step count after this step (tensor_step, truncated to an integer).
  __device__ __forceinline__ StateRandom(uint32_t step, uint32_t stream)
      : key_(step * 0x85EBCA77u + stream * 0xC2B2AE3Du) {}

  __device__ __forceinline__ uint32_t operator()(uint32_t index) const {
    uint32_t h = (index * 0x9E3779B1u) ^ key_;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
  }

 private:
  uint32_t key_;  // the step's and stream's part of the hash, the same for the whole block
};

// fp32 -> bf16 rounded stochastically (fusedopt/engine/stochastic.py, to_bf16; the Triton
// kernel's _stochastic_bf16): 16 random bits are added to the fp32 bits and the low half dropped,
// an integer operation (no __float2bfloat16 rounding), so the value rounds up with probability
// equal to the dropped fraction.
class StochasticBf16 {
 public:
  __device__ __forceinline__ StochasticBf16(uint32_t step, uint32_t stream) : random_(step, stream) {}

  __device__ __forceinline__ uint16_t operator()(float x, uint32_t index) const {
    return uint16_t((__float_as_uint(x) + (random_(index) & 0xFFFFu)) >> 16);
  }

 private:
  StateRandom random_;
};

// 8-bit state's codes in format CODE (fusedopt/engine/int8.py, the specification; the Triton
// kernel's _decode8 / _encode8), integer operations on the fp32 bits and exact multiplies by
// powers of two, so that every backend stores the same bytes for the same fp32 values. A code is
// a tiny float relative to 2^(scale - 127): exponent field e (3 bits, 7 the octave of the scale),
// M mantissa bits f, below e = 1 a linear range down to 0; kSigned adds a sign bit (0x80), kSqrt
// codes u = sqrt(v). Unsigned arithmetic gives the specification's int64 values wherever they
// are kept (magnitude + random < 2^32: no wrap).
template <StateCode CODE>
struct Int8Code {
  static constexpr bool kSqrt = CODE == StateCode::kSqrt;
  static constexpr int kMantissa = int8_mantissa_bits(CODE);
  static constexpr int kDropped = 23 - kMantissa;  // fp32 mantissa bits below the kept ones
  static constexpr int kTop = (1 << kInt8ExponentBits) - 1;  // e of the scale's own octave
  static constexpr uint32_t kRandomMask = (1u << kDropped) - 1;  // the random bits a rounding takes

  // The quantity the format codes: sqrt(v) correctly rounded (IEEE, as the Triton kernel's
  // sqrt_rn), or the value.
  static __device__ __forceinline__ float coded(float value) { return kSqrt ? __fsqrt_rn(value) : value; }

  // |x|'s fp32 bits: a group's scale comes from the largest of its coded values'.
  static __device__ __forceinline__ uint32_t magnitude(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

  // The scale byte of a group whose largest magnitude has bits `largest`: its exponent field
  // rounded up at the kept precision, so the largest element can round up into the next octave;
  // 0 (stored as zeros) below kInt8MinScale.
  static __device__ __forceinline__ uint32_t scale_of(uint32_t largest) {
    const uint32_t scale = (largest + kRandomMask) >> 23;
    return scale >= uint32_t(kInt8MinScale) ? scale : 0u;
  }

  // The fp32 value of a code in a group of scale byte `scale`: the significand (f, plus the
  // implicit 2^M for e >= 1) times its unit, a power of two built from its exponent field (0,
  // the float 0, for a group stored as zeros), both exact.
  static __device__ __forceinline__ float decode(uint32_t code, uint32_t scale) {
    const int magnitude = kSqrt ? int(code) : int(code & 0x7Fu);
    const int e = magnitude >> kMantissa;
    const int f = magnitude & ((1 << kMantissa) - 1);
    const int significand = e >= 1 ? f + (1 << kMantissa) : f;
    const int unit_field = max(max(e, 1) - kTop - kMantissa + int(scale), 0);
    const float value = float(significand) * __int_as_float(unit_field << 23);
    if (kSqrt) return value * value;
    return (code & 0x80u) != 0 ? -value : value;
  }

  // The code of coded value x (coded()) in a group of scale byte `scale`, rounded with `random`
  // (kDropped random bits added below the kept ones before they are dropped). In the top kTop
  // octaves the code is x's own exponent and mantissa bits shifted down; below, the significand
  // shifted to the linear range's unit. A nonzero sqrt(v) takes at least the smallest code.
  static __device__ __forceinline__ uint8_t encode(float x, uint32_t scale, uint32_t random) {
    const uint32_t bits = __float_as_uint(x);
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    const int exponent = int(magnitude >> 23);
    const int s = int(scale);
    const bool normal = exponent >= 1 && exponent - s + kTop >= 1;
    // Wraps (unsigned) only where it is not taken: a normal x has exponent >= s - 6.
    const uint32_t in_normal = ((magnitude + random) >> kDropped) - (uint32_t(s - kTop) << kMantissa);
    const uint32_t significand = (magnitude & 0x7FFFFFu) | (exponent > 0 ? 0x800000u : 0u);
    const int shift = min(max(s - kTop + 1 - max(exponent, 1), 0), 31);
    const uint32_t in_linear = ((significand >> shift) + random) >> kDropped;
    uint32_t code = normal ? in_normal : in_linear;
    if (kSqrt) code = magnitude > 0 ? max(code, 1u) : 0u;
    if (s == 0) code = 0;
    if (!kSqrt && code > 0 && (bits >> 31) != 0) code |= 0x80u;
    return uint8_t(code);
  }
};

// Column `tensor` of the tensor table, int64 [kTableRows, num_tensors] (layout.h, TableRow).
class TableColumn {
 public:
  __device__ __forceinline__ TableColumn(const int64_t* __restrict__ table, int64_t num_tensors, int32_t tensor)
      : column_(table + tensor), stride_(num_tensors) {}

  __device__ __forceinline__ int64_t operator[](int row) const { return column_[row * stride_]; }

  // The tensor's element under the first slot of segment block `block`: b * kBlock - BLOCK_START.
  __device__ __forceinline__ int64_t first_element(int64_t block) const {
    return block * kBlock - (*this)[kBlockStart];
  }

  // The param (kParamAddr) or grad (kGradAddr) storage at element `element` of the tensor.
  template <typename T>
  __device__ __forceinline__ T* address(int row, int64_t element) const {
    return reinterpret_cast<T*>((*this)[row]) + element;
  }

 private:
  const int64_t* __restrict__ column_;
  int64_t stride_;
};

// 1/scale as torch.amp.GradScaler computes it (scale.double().reciprocal().float()), so the
// unscaled gradients match torch's unscale_ bit for bit for any scale, not only powers of two.
__device__ __forceinline__ float inv_scale_of(float scale) { return float(1.0 / double(scale)); }

// k of the decay lr * wd * k: lr / max_lr for corrected groups (AdamC / SGDC / LionC, Defazio
// 2025, arXiv 2506.02285), else 1. max_lr 0 (the default for a group built with lr = 0) gives
// k = 0, not a division by zero. In fp64, as python/fusedopt/engine/reference.py decay_multiplier.
__device__ __forceinline__ double decay_multiplier(const float* __restrict__ row) {
  if (row[kCorrected] == 0.f) return 1.0;
  const double max_lr = row[kMaxLr];
  return max_lr > 0.0 ? double(row[kLr]) / max_lr : 0.0;
}

// 1 - LR * WD * k in fp64, rounded once: the decoupled decay factor of AdamW and Lion (torch's
// param.mul_(1 - lr * weight_decay) with Python floats).
__device__ __forceinline__ float decoupled_decay(const float* __restrict__ row) {
  return float(1.0 - double(row[kLr]) * double(row[kWeightDecay]) * decay_multiplier(row));
}

// The gradient the update uses, g = (grad * INV_SCALE) * CLIP_COEF: torch's unscale_, then
// clip_grad_norm_'s multiply, in that order. Every algorithm's Coeffs carries one (member
// `unscale`, filled from the globals by its make_coeffs); the update kernel applies it.
struct GradScale {
  float inv_scale, clip;

  static __device__ __forceinline__ GradScale of(const float* __restrict__ globals) {
    return GradScale{globals[kInvScale], globals[kClipCoef]};
  }
  __device__ __forceinline__ float operator()(float grad) const { return (grad * inv_scale) * clip; }
};

template <typename V>
__device__ __forceinline__ V reduce_identity(Reduce op) {
  switch (op) {
    case Reduce::kMin: return V(INFINITY);
    case Reduce::kMax: return V(-INFINITY);
    default: return V(0);
  }
}

// fmin/fmax drop a NaN operand; the non-finite flag, not min/max, reports NaN gradients.
template <typename V>
__device__ __forceinline__ V reduce_combine(Reduce op, V a, V b) {
  switch (op) {
    case Reduce::kMin: return fmin(a, b);
    case Reduce::kMax: return fmax(a, b);
    default: return a + b;
  }
}

// Reduces vals[i] over the block with ops[i]; the results are valid in thread 0 only. Called at
// most once per kernel (its shared memory is not re-synchronized for reuse); every thread of the
// block must call it.
template <typename V, int N>
__device__ __forceinline__ void block_reduce(V (&vals)[N], const Reduce (&ops)[N]) {
  __shared__ V partial[N][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      vals[i] = reduce_combine(ops[i], vals[i], __shfl_xor_sync(0xffffffffu, vals[i], offset));
    if (lane == 0) partial[i][warp] = vals[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      vals[i] = lane < kWarps ? partial[i][lane] : reduce_identity<V>(ops[i]);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        vals[i] = reduce_combine(ops[i], vals[i], __shfl_xor_sync(0xffffffffu, vals[i], offset));
    }
  }
}

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Raises with the kernel's name if the launch just made failed (bad configuration, no device,
// or an earlier asynchronous error surfacing here).
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt._C: launch of ") + kernel + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace fusedopt
