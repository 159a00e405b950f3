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
// (b - tensor_block_start[i]) * kBlock (BlockOwner; pointer arithmetic in 64 bits), states (and
// remainders) at STATE_START plus that element; offsets inside a block stay below kBlock.
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
  // Full path: the groups from slot group k of a lane to slot group k + 1 (kThreads * W elements).
  static constexpr int kGroupsPerSlotGroup = kThreads * W / kInt8Group;
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

  // Full path: writes slot group k of one array, its W values given as their bits
  // (W * sizeof(BitsOf<S>) bytes), as the group's vector stores.
  template <typename S>
  __device__ __forceinline__ void store_vectors(S* __restrict__ base, int k, const void* bits) const {
    using Vector = typename RawSlots<S, W>::Vector;
    constexpr int kStores = RawSlots<S, W>::kPerGroup;
    const int first = (k * kThreads + int(threadIdx.x)) * W;
    Vector raw[kStores];
    memcpy(raw, bits, sizeof(raw));
#pragma unroll
    for (int l = 0; l < kStores; ++l) reinterpret_cast<Vector*>(base + first)[l] = raw[l];
  }

  // Tail path: writes slot i's bits bits_of(i) where its element is inside the tensor.
  template <typename S, typename SlotBits>
  __device__ __forceinline__ void store_tail(S* __restrict__ base, SlotBits bits_of) const {
    BitsOf<S>* dst = reinterpret_cast<BitsOf<S>*>(base);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = i * kThreads + int(threadIdx.x);
      if (e < count) dst[e] = bits_of(i);
    }
  }

  // Stores the values rounded to nearest even into S.
  template <typename S>
  __device__ __forceinline__ void store(S* __restrict__ base, const float (&in)[kPerThread]) const {
    if (full) {
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        BitsOf<S> bits[W];
#pragma unroll
        for (int j = 0; j < W; ++j) bits[j] = Storage<S>::from_float(in[k * W + j]);
        store_vectors(base, k, bits);
      }
    } else {
      store_tail(base, [&](int i) { return Storage<S>::from_float(in[i]); });
    }
  }

  // Stores one array's 1- or 2-byte slots, slot i's value x as the bits of S from bit SHIFT of the
  // 32-bit word to_word(x, i) (bits above them are dropped): the integer roundings (the master
  // split, stochastically rounded bf16, 8-bit codes) leave their result there, and the full path
  // packs the vectors with PRMTs that pick those bytes out of two (four) words at once, in place
  // of a shift and a mask per slot before the packing. The words are computed before the path's
  // branch, so both paths share that code.
  template <int SHIFT, typename S, typename ToWord>
  __device__ __forceinline__ void store_shifted(S* __restrict__ base, const float (&in)[kPerThread],
                                                ToWord to_word) const {
    using Bits = BitsOf<S>;
    constexpr int kBytes = int(sizeof(Bits));
    static_assert(kBytes <= 2 && SHIFT % 8 == 0 && SHIFT / 8 + kBytes <= 4, "whole bytes of the word");
    constexpr unsigned kByte = SHIFT / 8;  // the first byte taken, in __byte_perm's numbering
    uint32_t words[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) words[i] = to_word(in[i], i);
    if (full) {
      constexpr int kPerWord = 4 / kBytes;
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) {
        uint32_t packed[W / kPerWord];
#pragma unroll
        for (int w = 0; w < W / kPerWord; ++w) {
          const uint32_t* word = &words[k * W + w * kPerWord];
          if constexpr (kBytes == 2) {
            packed[w] = __byte_perm(word[0], word[1], kByte | (kByte + 1) << 4 | (kByte + 4) << 8 | (kByte + 5) << 12);
          } else {
            constexpr unsigned kPair = kByte | (kByte + 4) << 4;
            packed[w] = __byte_perm(__byte_perm(word[0], word[1], kPair), __byte_perm(word[2], word[3], kPair), 0x5410);
          }
        }
        store_vectors(base, k, packed);
      }
    } else {
      store_tail(base, [&](int i) { return Bits(words[i] >> SHIFT); });
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
  // lane holds one byte until decoding instead of kPerThread. (Element indices here are unsigned:
  // they are >= 0, and an unsigned division by kInt8Group is one shift.)
  __device__ __forceinline__ void load_group_bytes(const uint8_t* __restrict__ scales,
                                                   uint32_t (&bytes)[kPerThread / W]) const {
    if (full) {
      const uint8_t* lane_scales = scales + threadIdx.x * W / kInt8Group;
#pragma unroll
      for (int k = 0; k < kPerThread / W; ++k) bytes[k] = lane_scales[k * kGroupsPerSlotGroup];
    } else {
      const int lane = int(threadIdx.x) % 32;
      const int first = lane * kThreads + int(threadIdx.x) - lane;  // slot `lane`'s element in lane 0
      bytes[0] = lane < kPerThread && first < count ? uint32_t(scales[unsigned(first) / kInt8Group]) : 0u;
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
      // Slot group k's first element (k * kThreads + tid) * W starts a group when tid * W does.
      if (threadIdx.x * W % kInt8Group == 0) {
        uint8_t* lane_scales = scales + threadIdx.x * W / kInt8Group;
#pragma unroll
        for (int k = 0; k < kPerThread / W; ++k) lane_scales[k * kGroupsPerSlotGroup] = uint8_t(scale[k * W]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = i * kThreads + int(threadIdx.x);
        if (unsigned(e) % kInt8Group == 0 && e < count) scales[unsigned(e) / kInt8Group] = uint8_t(scale[i]);
      }
    }
  }
};

// Master weights for bf16 params (fusedopt/engine/master.py, the specification; the Triton kernel's
// _combine_master / _split_master): the fp32 master is the bf16 param plus a remainder, laid out
// like the state. The param is the master rounded to nearest with ties away from zero, so the
// remainder is a signed offset from it: low bits >= 0x8000 mean "rounded up", a negative offset
// (__float2bfloat16_rn rounds ties to even, which no 16-bit remainder could be decoded against).
// Everything is an add or a shift on the master's fp32 bits x taken as one 32-bit word: adding to
// the word adds to the magnitude whatever the sign, and no finite value's rounding here makes the
// magnitude cross 0 or reach the sign bit. BITS 32 keeps x's low 16 bits (int16, handled as
// uint16_t: the same 16 bits), 24 keeps bits 8-15 (uint8) of x rounded at bit 8. Unsigned
// arithmetic gives the bits of the specification's int32 arithmetic (two's complement, wrapping).
template <int BITS>
struct Master {
  static_assert(BITS == 24 || BITS == 32, "master weights keep 24 or 32 bits");
  using Remainder = std::conditional_t<BITS == 32, uint16_t, uint8_t>;

  // The fp32 master of a bf16 param (widened to fp32, exact: bits p << 16) and its remainder:
  // x = (p << 16) + the remainder sign-extended (int16, or the uint8 read as int8, times 2^8).
  static __device__ __forceinline__ float combine(float param, Remainder remainder) {
    const int32_t offset = BITS == 32 ? int32_t(int16_t(remainder)) : int32_t(int8_t(remainder)) * 256;
    return __uint_as_float(__float_as_uint(param) + uint32_t(offset));
  }

  // The param and the remainder the master splits into, each as bits kParamShift /
  // kRemainderShift and up of a word (Slots::store_shifted): the bf16 bits (x + 0x8000) >> 16, ties
  // away from zero; x's low 16 bits, or bits 8-15 of x rounded at bit 8, (x + 0x80) & ~0xFF. The
  // mask changes no bit above 7 of a sum with 0x8000 (whose low byte is 0), so for 24 bits the two
  // roundings of the param are one add of 0x8080.
  static constexpr int kParamShift = 16;
  static constexpr int kRemainderShift = BITS == 32 ? 0 : 8;

  static __device__ __forceinline__ uint32_t param_word(float master) {
    return __float_as_uint(master) + (BITS == 32 ? 0x8000u : 0x8080u);
  }

  static __device__ __forceinline__ uint32_t remainder_word(float master) {
    return __float_as_uint(master) + (BITS == 32 ? 0u : 0x80u);
  }
};

// The random bits of stochastically rounded state (fusedopt/engine/stochastic.py, hash32 and
// random16, the specification; the Triton kernel's _hash32): the lowbias32 hash of (step, element
// index in the segment's state buffer), uint32 arithmetic wrapping mod 2^32, so every backend and
// every run (and a CUDA graph replay, the step being read on the device) gets the same bits. One
// hash serves both states of an element: state1 rounds with its low 16 bits, state2 with its high
// 16 (bits16); these modes are bound by integer issue, and the hash is 9 integer operations.
class StateRandom {
 public:
  // step: the tensor's step count after this step (tensor_step, truncated to an integer).
  __device__ __forceinline__ explicit StateRandom(uint32_t step) : key_(fold(step * 0x85EBCA77u)) {}

  __device__ __forceinline__ uint32_t operator()(uint32_t index) const {
    // The specification's first round, h = index * 0x9E3779B1 ^ key; h ^= h >> 16: the shift
    // distributes over the xor, so with the key's share folded once per block (key_) it is one
    // shift and one 3-input xor (LOP3).
    uint32_t h = index * 0x9E3779B1u;
    h ^= (h >> 16) ^ key_;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    return h ^ (h >> 16);
  }

  // The 16 random bits of state STREAM (1: state1, 2: state2) in an element's hash.
  template <int STREAM>
  static __device__ __forceinline__ uint32_t bits16(uint32_t hash) {
    static_assert(STREAM == 1 || STREAM == 2, "the update has state1 and state2");
    return STREAM == 1 ? hash & 0xFFFFu : hash >> 16;
  }

 private:
  static __device__ __forceinline__ uint32_t fold(uint32_t key) { return key ^ (key >> 16); }

  uint32_t key_;  // key ^ (key >> 16), key = step * 0x85EBCA77: the same for the whole block
};

// fp32 -> bf16 rounded stochastically (fusedopt/engine/stochastic.py, to_bf16; the Triton kernel's
// _stochastic_bf16): 16 random bits (StateRandom::bits16) are added to the fp32 bits and the low
// half dropped, an integer add (no __float2bfloat16 rounding), so the value rounds up with
// probability equal to the dropped fraction. The sum, whose high half kShift and up is the bf16, is
// what Slots::store_shifted takes.
struct StochasticBf16 {
  static constexpr int kShift = 16;
  static __device__ __forceinline__ uint32_t word(float x, uint32_t random16) { return __float_as_uint(x) + random16; }
};

// 8-bit state's codes in format CODE (fusedopt/engine/int8.py, the specification; the Triton
// kernel's _decode8 / _encode8). A code is a tiny float relative to 2^(s - 127), s its group's
// scale byte: exponent field e (3 bits, kTop = 7 the scale's own octave), M mantissa bits f, below
// e = 1 a linear range down to 0; kSigned adds a sign bit (0x80), kSqrt codes u = sqrt(v). A
// code's bits in an fp32's place (the sign at bit 31, e and f from bit 23 - M up) are the fp32
// bits of its value times 2^(7 - s), and the linear range is fp32's own subnormal range: decoding
// is the code's bits times 2^(s - 7), encoding x times 2^(7 - s), whose magnitude bits less the
// dropped ones are the code. Both are two IEEE multiplies, by 2^kSplit and by the group's factor
// (2^(s - 7) spans more than fp32's exponent range), in place of the integer field arithmetic
// these kernels are bound by, and every backend does the same ones, so all store the same bytes
// for the same fp32 values and decode them to the same values. A group's factor is built per slot
// from its scale byte (Decoder, Encoder; on the full path a lane's W slots of a group share the
// byte, and the compiler builds it once) and is 0 for a group stored as zeros (s = 0). Unsigned
// arithmetic gives the specification's int64 values in the bits that are kept.
template <StateCode CODE>
struct Int8Code {
  static constexpr bool kSqrt = CODE == StateCode::kSqrt;
  static constexpr int kMantissa = int8_mantissa_bits(CODE);
  static constexpr int kDropped = 23 - kMantissa;  // fp32 mantissa bits below the kept ones
  static constexpr int kTop = (1 << kInt8ExponentBits) - 1;  // e of the scale's own octave
  // Stochastic rounding's 16 random bits go at the top of the kDropped bits a code drops
  // (int8.random_offsets): a rounding biased by at most 2^-16 of a code step.
  static constexpr int kRandomShift = kDropped - 16;
  static_assert(kRandomShift >= 0, "16 random bits fit in the dropped bits");
  // int8.SPLIT: 2^(s - 7) = 2^kSplit * 2^(s - 7 - kSplit), both factors of either direction
  // normal fp32 numbers for s in [kInt8MinScale, 255].
  static constexpr int kSplit = 124;
  static_assert(kSplit == 124, "the literals 0x1p124f and 0x1p-124f below are 2^kSplit and 2^-kSplit");

  // The quantity the format codes: sqrt(v) correctly rounded (IEEE, as the Triton kernel's
  // sqrt_rn), or the value.
  static __device__ __forceinline__ float coded(float value) { return kSqrt ? __fsqrt_rn(value) : value; }

  // |x|'s fp32 bits: a group's scale comes from the largest of its coded values'.
  static __device__ __forceinline__ uint32_t magnitude(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

  // The scale byte of a group whose largest magnitude has bits `largest`: its exponent field
  // rounded up at the kept precision, so the largest element can round up into the next octave;
  // 0 (stored as zeros) below kInt8MinScale.
  static __device__ __forceinline__ uint32_t scale_of(uint32_t largest) {
    const uint32_t scale = (largest + (1u << kDropped) - 1) >> 23;
    return scale >= uint32_t(kInt8MinScale) ? scale : 0u;
  }

  // 2^exponent as an fp32 (exponent in the normal range), or 0 for a group stored as zeros.
  static __device__ __forceinline__ float group_factor(uint32_t scale, int exponent) {
    return scale != 0 ? __uint_as_float(uint32_t(exponent + 127) << 23) : 0.f;
  }

  // Decoding in a group of scale byte s: (the code's bits as an fp32 * 2^kSplit) * 2^(s - 7 - kSplit),
  // both exact but where the value is 2^128 or more (the top octave of s = 255), which overflows
  // to inf as in the specification; +-0 for s = 0.
  class Decoder {
   public:
    __device__ __forceinline__ explicit Decoder(uint32_t scale) : factor_(group_factor(scale, int(scale) - kTop - kSplit)) {}

    // The value of the code in byte `byte` (0-3) of `codes`, the codes as loaded 4 to a word.
    __device__ __forceinline__ float operator()(uint32_t codes, int byte) const {
      uint32_t bits;
      if (kSqrt) {
        bits = ((codes >> (8 * byte)) & 0xFFu) << (23 - kMantissa);
      } else {
        // The byte sign-extended and shifted into place (its sign bit in bits 31 down to 30 - M),
        // then the sign bit and the 7 magnitude bits kept: 2-3 operations from the word.
        const uint32_t shifted = uint32_t(int32_t(codes << (24 - 8 * byte)) >> (1 + kMantissa));
        bits = shifted & (0x80000000u | (0x7Fu << (23 - kMantissa)));
      }
      const float value = __fmul_rn(__fmul_rn(__uint_as_float(bits), 0x1p124f), factor_);
      return kSqrt ? __fmul_rn(value, value) : value;
    }

   private:
    float factor_;  // 2^(s - 7 - kSplit); 0 for s = 0
  };

  // Encoding in a group of scale byte s, with 16 random bits r: t, the fp32 bits of
  // (x * 2^(7 + kSplit - s)) * 2^-kSplit (exact in the top kTop octaves; the linear range rounds
  // to nearest at fp32's subnormal step, 2^-kDropped of a code step, as the specification's
  // multiply does), then the code (|t| + (r << kRandomShift)) >> kDropped. A group stored as zeros
  // (s = 0) has the factor 0: code 0.
  // - signed: the sign bit is t's, whatever the magnitude code (a negative value that rounds to 0
  //   keeps it: 0x80, decoded -0.0). t's sign bit is not masked off before the add: it moves the
  //   sum by 2^31 mod 2^32, the code by 2^12 mod 2^13, and only the code's low byte is stored.
  // - sqrt: |x| in the multiply (no sign bit); a nonzero sqrt(v) takes at least code 1 (a
  //   smaller update, never m / eps): it is at least 2^-75, so its magnitude bits m are far above
  //   2^kDropped and min(m, 2^kDropped) is 2^kDropped exactly when x != 0 (which also puts its
  //   group's scale at 52 or more).
  class Encoder {
   public:
    __device__ __forceinline__ explicit Encoder(uint32_t scale) : inverse_(group_factor(scale, kTop + kSplit - int(scale))) {}

    // The code of x, in the low byte of the result (Slots::store_shifted keeps that byte; the
    // bits above are not the code's).
    __device__ __forceinline__ uint32_t operator()(float x, uint32_t random16) const {
      const uint32_t m = magnitude(x);
      const uint32_t t = __float_as_uint(__fmul_rn(__fmul_rn(kSqrt ? __uint_as_float(m) : x, inverse_), 0x1p-124f));
      const uint32_t sum = t + (random16 << kRandomShift);
      if (kSqrt) return max(sum, min(m, 1u << kDropped)) >> kDropped;
      return (sum >> kDropped) | ((t >> 24) & 0x80u);
    }

   private:
    float inverse_;  // 2^(7 + kSplit - s); 0 for s = 0
  };
};

// The segment's tensor that segment block `block` belongs to: the largest i < count with
// starts[i] <= block, where starts is the segment's tensor_block_start ([count + 1], starts[0] = 0
// <= block < starts[count], non-decreasing), so empty tensors (equal consecutive entries) are
// passed over. A binary search rather than an array of each block's tensor, which would take 4 B
// a block, 1 MB at 1.1B params, resident through the training iteration's memory peak. It costs
// ceil(log2(count)) dependent 4-byte loads, 8 for LLaMA 1.1B's ~200 tensors, of an array under
// 1 KB that stays in L1; every thread of the block loads the same addresses (one broadcast
// transaction a warp).
struct BlockOwner {
  int32_t index;        // i, the tensor's column in the tensor table less tensor_offset
  int32_t first_block;  // starts[i]

  // The tensor's element under the first slot of segment block `block`.
  __device__ __forceinline__ int64_t first_element(int64_t block) const { return (block - first_block) * kBlock; }
};

__device__ __forceinline__ BlockOwner block_owner(const int32_t* __restrict__ starts, int32_t count, int64_t block) {
  int32_t lo = 0, hi = count, lo_start = 0;  // lo_start = starts[lo] <= block < starts[hi]
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    const int32_t start = starts[mid];
    if (start <= block) {
      lo = mid;
      lo_start = start;
    } else {
      hi = mid;
    }
  }
  return {lo, lo_start};
}

// Column `tensor` of the tensor table, int64 [kTableRows, num_tensors] (layout.h, TableRow).
class TableColumn {
 public:
  __device__ __forceinline__ TableColumn(const int64_t* __restrict__ table, int64_t num_tensors, int64_t tensor)
      : column_(table + tensor), stride_(num_tensors) {}

  __device__ __forceinline__ int64_t operator[](int row) const { return column_[row * stride_]; }

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
