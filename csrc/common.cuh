// Device helpers shared by the four kernels: storage-dtype conversion, the per-thread element
// mapping of a BLOCK (vectorized or masked), tensor-table access, fixed-order block reductions and
// launch checks; and the low-precision tier's integer encodings (master weights of bf16 params,
// bf16 state rounded stochastically), which the update kernel stores with.
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
// 2), else one 8-byte vector a group (the uint8 remainder at W = 8: 2).
template <typename S, int W>
struct RawSlots {
  static constexpr int kGroupBytes = W * int(sizeof(S));
  using Vector = std::conditional_t<kGroupBytes >= 16, uint4, uint2>;
  static_assert(kGroupBytes % int(sizeof(Vector)) == 0, "a group of W elements fills whole vectors");
  static constexpr int kPerGroup = kGroupBytes / int(sizeof(Vector));  // vectors per group
  Vector v[kPerThread / W * kPerGroup];
};

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
//   lane (12% slower, update.cu's measures).
// Tail path (the tensor ends inside the block, or a pointer is unaligned):
//   slot i <-> element i * kThreads + tid, scalar loads masked by the element count.
// Which path a block takes depends only on the layout and the addresses of its one tensor and of
// the state buffers (torch's caching allocator hands out 512-byte aligned blocks), so the
// summation order is fixed.
template <int W>
struct Slots {
  static_assert(kPerThread % W == 0, "vector width must divide the elements per thread");
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

// fp32 -> bf16 rounded stochastically (fusedopt/engine/stochastic.py, the specification; the
// Triton kernel's _random16 / _stochastic_bf16): 16 random bits are added to the fp32 bits and
// the low half dropped, an integer operation (no __float2bfloat16 rounding), so the value rounds
// up with probability equal to the dropped fraction. The bits are the lowbias32 hash of (step,
// element index in the segment's state buffer, stream: 1 for state1, 2 for state2), uint32
// arithmetic wrapping mod 2^32, so every backend and every run (and a CUDA graph replay, the step
// being read on the device) gets the same ones.
class StochasticBf16 {
 public:
  // step: the tensor's step count after this step (tensor_step, truncated to an integer).
  __device__ __forceinline__ StochasticBf16(uint32_t step, uint32_t stream)
      : key_(step * 0x85EBCA77u + stream * 0xC2B2AE3Du) {}

  __device__ __forceinline__ uint16_t operator()(float x, uint32_t index) const {
    uint32_t h = (index * 0x9E3779B1u) ^ key_;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return uint16_t((__float_as_uint(x) + (h & 0xFFFFu)) >> 16);
  }

 private:
  uint32_t key_;  // the step's and stream's part of the hash, the same for the whole block
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
