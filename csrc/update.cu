// update: launch 4 of the fused step (docs/kernel_contract.md). One thread block per BLOCK of a
// segment applies an algorithm's step to its elements: block b belongs to the segment's tensor i
// (block_owner, a binary search over tensor_block_start), column t = tensor_offset + i of the
// tensor table, its param and grad (storage dtype, where their owners put them) at
// PARAM_ADDR[t] / GRAD_ADDR[t] + e with e = (b - tensor_block_start[i]) * BLOCK + j, its state at
// STATE_START[t] + e of state1 / state2. g = (grad * INV_SCALE) * CLIP_COEF; the element math, the
// per-block scalars (fp64, rounded once) and the statistics are the algorithm's
// (csrc/algorithms/<name>.cuh); this file is the one traversal, templated on the algorithm, the
// storage dtype, the state dtype, the master-weight bits and the STATS flag. Adding an algorithm:
// its code in layout.h (Algorithm), its header, one include and one case in with_algorithm below.
// FOUND_INF != 0 branches out (a skip factor would turn 0 * NaN into NaN); with STATS the block
// then reports its unchanged state (the algorithm's observe_element). Blocks of skipped tensors
// (group -1) only write neutral partials (sums 0, min +inf, max -inf).
// The low-precision tier (the Triton kernel's, bit for bit in its integer parts):
// - master weights (bf16 params, MASTER_BITS 32 | 24): the remainder (int16 | uint8) sits at
//   STATE_START[t] + e like the state; param + remainder give the fp32 master (Master in
//   common.cuh), the update runs on it in fp32 without rounding to bf16, and the result is split
//   back into both.
// - bf16 state: loaded and widened to fp32, stored rounded stochastically (StochasticBf16) with 16
//   random bits of one hash per element (StateRandom: of the step count after this step and the
//   element's index in the state buffer), its low half for state1, its high half for state2.
// - 8-bit state (fusedopt/engine/int8.py): uint8 codes at STATE_START[t] + e and one scale byte
//   per group of 32 state elements in scale1 / scale2 at (STATE_START[t] + e) / 32, each state in
//   its algorithm's format (A::kCodes). Loaded codes are decoded with their group's byte
//   (Int8Code: the code's bits in an fp32's place times 2^(s - 7), two FMULs); stored values are
//   quantized: each group's scale from the largest coded magnitude over its elements in the tensor
//   (a xor-shuffle butterfly over the lanes that hold the group, Slots::group_max), the codes
//   rounded stochastically with the same 16 random bits as bf16 state.
// The statistics see what the Triton kernel's see: the fp32 master (old and new) and the fp32
// state before rounding; a skipped step's, the combined master and the widened or decoded state.
//
// Napkin math, bytes per element: the algorithm's (28 | 22 B for AdamW, 20 | 14 B for SGD with
// momentum and Lion, fp32 | bf16/fp16 params with fp32 state; the low-precision modes in each
// header), plus per block of 4096 elements 40 B of table column, the group's 32 B hyper row and 4 B
// of step (0.02 B/element); block_owner's loads of tensor_block_start hit in L1. Statistics add no
// per-element traffic (4 B of partials per column per block). 8-bit state moves 1 B of code and
// 1/32 B of scale per element and moment, each read and written: 2.06 B a moment against 8 in fp32.
// The tier adds integer work, which bounds these modes (the GPU issues integer ALU operations at
// half the fp32 rate); per element on the full path (sm_90 SASS of AdamW with bf16 params): the
// hash, 9 operations for both states; the master's combine, 2 (32 bits) or ~3 (24), and split, an
// add per stored array and its share of the PRMTs packing the vectors (1/2 a bf16, 3/4 a byte); a
// bf16 state value's rounding, an add and 1/2 PRMT; an 8-bit state value's decode, 2 ("sqrt") or 3
// ("signed") integer operations and 2 FMULs, and encode, 4 and 2 FMULs (and an IEEE sqrt for
// "sqrt") and 3/4 PRMT, plus its magnitude and share of the group's maximum, ~2, and per group a
// 2-3 step shuffle butterfly on the full path (5 on the tail path).
// Measured (H200, one 2^28-element tensor, AdamW without statistics, medians of 25 launches):
// fp32 | bf16 params with fp32 state 2.04 | 1.77 ms, as before the tier (the same SASS); bf16
// params with 32 | 24-bit masters 1.91 | 1.94 ms with fp32 state (3.6 | 3.3 TB/s of napkin
// bytes), 1.74 | 1.70 ms with bf16 state, bf16 state alone 1.54 ms (2.4-2.8 TB/s); the Triton
// kernel 2.21 | 2.32, 1.95 | 2.00 and 1.71 ms. The 24-bit remainder in 8-byte vectors at W = 8
// (Slots): 1.94 ms against 2.21 ms with W = 16 and 16-byte remainder vectors. 8-bit state: not
// measured yet.
#include <type_traits>

#include "algorithms/adamw.cuh"
#include "algorithms/lion.cuh"
#include "algorithms/sgd.cuh"
#include "common.cuh"

namespace fusedopt {
namespace {

// Calls f(A{}) with the struct of algorithm `code`; false for a code nothing is registered under.
template <typename F>
bool with_algorithm(Algorithm code, F&& f) {
  switch (code) {
    case Algorithm::kAdamW: f(AdamW{}); return true;
    case Algorithm::kSgd: f(Sgd{}); return true;
    case Algorithm::kLion: f(Lion{}); return true;
  }
  return false;
}

// 8-bit state is stored as S = uint8_t, its codes, beside one scale byte per group (`scales`, the
// block's first group's byte): each state's format CODE is its algorithm's (A::kCodes).
template <typename S>
constexpr bool kInt8State = std::is_same_v<S, uint8_t>;

// 8-bit state's loads before decoding: its codes and its group scale bytes as loaded
// (Slots::load_group_bytes).
template <int W>
struct Int8Raw {
  uint8_t codes[kPerThread];
  uint32_t bytes[kPerThread / W];
};

// A state's loads before conversion to fp32: its raw vectors (fp32, bf16), or Int8Raw.
template <typename S, int W>
using RawState = std::conditional_t<kInt8State<S>, Int8Raw<W>, RawSlots<S, W>>;

// Issues a state's loads: its vectors on the full path, or 8-bit state's codes and scale bytes
// on either path.
template <typename S, int W>
__device__ __forceinline__ void load_raw_state(const Slots<W>& slots, const S* __restrict__ base,
                                               const uint8_t* __restrict__ scales, RawState<S, W>& raw) {
  if constexpr (kInt8State<S>) {
    slots.load_bits(base, raw.codes);
    slots.load_group_bytes(scales, raw.bytes);
  } else {
    slots.load_raw(base, raw);
  }
}

// A state's slots in fp32 from its loads: widened, or decoded in format CODE (masked slots, code
// 0, decode to 0).
template <StateCode CODE, typename S, int W>
__device__ __forceinline__ void unpack_state(const Slots<W>& slots, const RawState<S, W>& raw,
                                             float (&out)[kPerThread]) {
  if constexpr (kInt8State<S>) {
    static_assert(kPerThread % 4 == 0, "whole words of codes");
    uint32_t codes[kPerThread / 4];  // 4 to a word, as the full path loads them
    memcpy(codes, raw.codes, sizeof(codes));
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const typename Int8Code<CODE>::Decoder group(slots.group_byte(raw.bytes, i));
      out[i] = group(codes[i / 4], i % 4);
    }
  } else {
    slots.unpack(raw, out);
  }
}

// The state's storage S: fp32 as it is, bf16 rounded stochastically, or 8-bit codes in format CODE
// rounded stochastically (int8.quantize): each group's scale from the largest coded magnitude of
// its elements in the tensor (a shuffle butterfly over the lanes holding it, Slots::group_max),
// then the codes and the scale bytes. The random bits are state STREAM's 16 of each slot's hash
// (StateRandom::bits16), as the Triton kernel's and the reference's, so that all three store an
// fp32 value the same way. Every thread of the block must call it for 8-bit state.
template <StateCode CODE, int STREAM, typename S, int W>
__device__ __forceinline__ void store_state(const Slots<W>& slots, S* __restrict__ base, uint8_t* __restrict__ scales,
                                            const float (&in)[kPerThread], const uint32_t (&hash)[kPerThread]) {
  if constexpr (std::is_same_v<S, float>) {
    slots.store(base, in);
  } else if constexpr (kInt8State<S>) {
    using Code = Int8Code<CODE>;
    float x[kPerThread];
    uint32_t scale[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      x[i] = Code::coded(in[i]);
      scale[i] = slots.valid(i) ? Code::magnitude(x[i]) : 0u;
    }
    slots.group_max(scale);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) scale[i] = Code::scale_of(scale[i]);
    slots.template store_shifted<0>(base, x, [&](float value, int slot) {
      const typename Code::Encoder group(scale[slot]);
      return group(value, StateRandom::bits16<STREAM>(hash[slot]));
    });
    slots.store_groups(scales, scale);
  } else {
    static_assert(std::is_same_v<S, __nv_bfloat16>, "state is fp32, bf16 or 8-bit codes");
    slots.template store_shifted<StochasticBf16::kShift>(
        base, in, [&](float x, int slot) { return StochasticBf16::word(x, StateRandom::bits16<STREAM>(hash[slot])); });
  }
}

// The masters of a block of bf16 params (widened in p) and their remainders r, in place in p.
template <int MASTER_BITS, typename R>
__device__ __forceinline__ void combine_masters(float (&p)[kPerThread], const R (&r)[kPerThread]) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) p[i] = Master<MASTER_BITS>::combine(p[i], r[i]);
}

// T: the params' storage dtype; S: the states' (float, __nv_bfloat16 rounded stochastically, or
// uint8_t, the codes of 8-bit state beside their group scale bytes); MASTER_BITS: 0, or 24 / 32 for
// bf16 params with master weights, whose update runs on the fp32 master (param + remainder) and is
// split back into both. ptxas (CUDA 13.0) keeps them at 128 or 80 registers or below, 2 or 3 blocks
// per SM, and spills 4-20 bytes in a few: on sm_90 Lion (fp16 params, bf16 state, STATS), SGD (bf16
// params and state, STATS; bf16 params, fp32 state, 24-bit masters) and AdamW (bf16 params and
// state, 32-bit masters, STATS); on sm_80 the last two and SGD (fp32, STATS). Which ones spill, and
// which fit 3 blocks, shifts with any change to the kernel or to UpdateArgs (launchers.h). Without
// that target (__launch_bounds__(kThreads, 1)) the AdamW 8-bit ones take up to 144 registers (fp32
// params, STATS), 1 block per SM.
template <class A, typename T, typename S, int MASTER_BITS, bool STATS>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateArgs a, bool states_aligned) {
  static_assert(A::kStates >= 1 && A::kStates <= kMaxStates, "update takes state1 and state2");
  static_assert(A::kStats <= kMaxColumns, "tensor_reduce folds at most kMaxColumns columns");
  static_assert(MASTER_BITS == 0 || std::is_same_v<T, __nv_bfloat16>, "master weights are for bf16 params");
  using Coeffs = typename A::Coeffs;
  constexpr bool kTwoStates = A::kStates == 2;
  constexpr bool kMaster = MASTER_BITS != 0;
  // The remainder's storage, Master<MASTER_BITS>::Remainder (a placeholder without masters).
  using R = std::conditional_t<MASTER_BITS == 24, uint8_t, uint16_t>;
  // The type the statistics see the new param in: the stored param, or with master weights the
  // fp32 update before the split (as the Triton kernel, which rounds to fp32 then).
  using Rounded = std::conditional_t<kMaster, float, T>;
  // Slots of the param's or the state's 16-byte vector, whichever holds more elements; 8-bit
  // state's codes at the param's (see Slots).
  constexpr bool kInt8 = kInt8State<S>;
  constexpr int kW = kInt8 ? kVec<T> : (kVec<S> > kVec<T> ? kVec<S> : kVec<T>);
  // Each state's 8-bit format (state2's only with two states).
  constexpr StateCode kCode1 = A::kCodes[0];
  constexpr StateCode kCode2 = A::kCodes[A::kStates - 1];
  __shared__ Coeffs shared_coeffs;
  const int64_t block = blockIdx.x;
  const BlockOwner owner = block_owner(a.tensor_block_start, a.num_segment_tensors, block);
  const int32_t tensor_index = a.tensor_offset + owner.index;
  const TableColumn tensor(a.tensor_table, a.num_tensors, tensor_index);
  const int64_t group = tensor[kGroup];
  float stats[A::kStats];
  Reduce ops[A::kStats];
#pragma unroll
  for (int c = 0; c < A::kStats; ++c) {
    ops[c] = A::stat_op(c);
    stats[c] = reduce_identity<float>(ops[c]);
  }
  if (group >= 0) {
    const bool found_inf = a.globals[kFoundInf] != 0.f;
    if (!STATS && found_inf) return;
    const float* row = a.hyper + group * kNumHyper;
    const bool uses_state = A::uses_state(row);
    const int64_t first = owner.first_element(block);
    T* param = tensor.address<T>(kParamAddr, first);
    const T* grad = tensor.address<const T>(kGradAddr, first);
    const int64_t state_element = tensor[kStateStart] + first;
    S* state1 = static_cast<S*>(a.state1) + state_element;
    S* state2 = kTwoStates ? static_cast<S*>(a.state2) + state_element : nullptr;
    R* remainder = kMaster ? static_cast<R*>(a.remainder) + state_element : nullptr;
    // 8-bit state's scale bytes from the block's first group on (state_element is a multiple of
    // kInt8Group: STATE_START is one of kStateAlign, the block's first element one of kBlock; and
    // >= 0, so an unsigned division, a shift).
    uint8_t* scale1 = kInt8 ? a.scale1 + uint64_t(state_element) / kInt8Group : nullptr;
    uint8_t* scale2 = kInt8 && kTwoStates ? a.scale2 + uint64_t(state_element) / kInt8Group : nullptr;
    const Slots<kW> slots =
        Slots<kW>::of(tensor[kNumel] - first, states_aligned && is_aligned16(param) && is_aligned16(grad));
    float p[kPerThread], s1[kPerThread], s2[kPerThread];
    R r[kPerThread];
    // The block's constants, computed by thread 0 while the loads are in flight.
    const auto block_coeffs = [&]() {
      if (threadIdx.x == 0) shared_coeffs = A::make_coeffs(row, a.tensor_step[tensor_index], a.globals);
      __syncthreads();
      return shared_coeffs;
    };
    if (!found_inf) {
      float g[kPerThread];
      Coeffs c;
      if (slots.full) {
        // Every array's vector loads are issued before any of them is converted (see
        // Slots::load_raw): one DRAM round trip per block, also for 2-byte storage types.
        RawSlots<T, kW> raw_p, raw_g;
        RawSlots<R, kW> raw_r;
        RawState<S, kW> raw_s1, raw_s2;
        slots.load_raw(param, raw_p);
        if constexpr (kMaster) slots.load_raw(remainder, raw_r);
        slots.load_raw(grad, raw_g);
        if (uses_state) load_raw_state(slots, state1, scale1, raw_s1);
        if (kTwoStates && uses_state) load_raw_state(slots, state2, scale2, raw_s2);
        c = block_coeffs();
        slots.unpack(raw_p, p);
        if constexpr (kMaster) slots.unpack_bits(raw_r, r);
        slots.unpack(raw_g, g);
        if (uses_state) unpack_state<kCode1, S>(slots, raw_s1, s1);
        if (kTwoStates && uses_state) unpack_state<kCode2, S>(slots, raw_s2, s2);
      } else if constexpr (kInt8) {
        // 8-bit state's codes and scale bytes are loaded once the block's constants are there
        // (a second round trip, on tail blocks only): loaded before, 16 code bytes a state were
        // held beside the param's and grad's values across make_coeffs' calls (pow, fp64
        // division), and the AdamW kernels spilled.
        RawState<S, kW> raw_s1, raw_s2;
        slots.load_tail(param, p);
        if constexpr (kMaster) slots.load_tail_bits(remainder, r);
        slots.load_tail(grad, g);
        c = block_coeffs();
        if (uses_state) load_raw_state(slots, state1, scale1, raw_s1);
        if (kTwoStates && uses_state) load_raw_state(slots, state2, scale2, raw_s2);
        if (uses_state) unpack_state<kCode1, S>(slots, raw_s1, s1);
        if (kTwoStates && uses_state) unpack_state<kCode2, S>(slots, raw_s2, s2);
      } else {
        slots.load_tail(param, p);
        if constexpr (kMaster) slots.load_tail_bits(remainder, r);
        slots.load_tail(grad, g);
        if (uses_state) slots.load_tail(state1, s1);
        if (kTwoStates && uses_state) slots.load_tail(state2, s2);
        c = block_coeffs();
      }
      if constexpr (kMaster) combine_masters<MASTER_BITS>(p, r);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) A::template step_element<Rounded, STATS, kInt8>(c, p[i], c.unscale(g[i]), s1[i], s2[i], stats);
      if constexpr (kMaster) {
        using M = Master<MASTER_BITS>;
        slots.template store_shifted<M::kParamShift>(param, p, [](float master, int) { return M::param_word(master); });
        slots.template store_shifted<M::kRemainderShift>(remainder, p,
                                                         [](float master, int) { return M::remainder_word(master); });
      } else {
        slots.store(param, p);
      }
      if (uses_state) {
        // Each slot's random bits for stochastically rounded state, one hash for both states: of
        // the step count after this step, as an integer (finalize has counted this step), and the
        // slot's element in the state buffer, of which only the low 32 bits enter the hash
        // (stochastic.py wraps it mod 2^32).
        uint32_t hash[kPerThread];
        if constexpr (!std::is_same_v<S, float>) {
          const StateRandom random(uint32_t(int32_t(a.tensor_step[tensor_index])));
#pragma unroll
          for (int i = 0; i < kPerThread; ++i) hash[i] = random(uint32_t(state_element) + uint32_t(slots.element(i)));
        }
        store_state<kCode1, 1>(slots, state1, scale1, s1, hash);
        if (kTwoStates) store_state<kCode2, 2>(slots, state2, scale2, s2, hash);
      }
    } else if constexpr (STATS && kInt8) {
      // A skipped step's statistics, 8-bit state decoded after the block's constants (decoded
      // before, its values were held across make_coeffs' calls).
      RawState<S, kW> raw_s1, raw_s2;
      slots.load(param, p);
      if constexpr (kMaster) {
        slots.load_bits(remainder, r);
        combine_masters<MASTER_BITS>(p, r);
      }
      if (uses_state) load_raw_state(slots, state1, scale1, raw_s1);
      if (kTwoStates && uses_state) load_raw_state(slots, state2, scale2, raw_s2);
      const Coeffs c = block_coeffs();
      if (uses_state) unpack_state<kCode1, S>(slots, raw_s1, s1);
      if (kTwoStates && uses_state) unpack_state<kCode2, S>(slots, raw_s2, s2);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) A::observe_element(c, p[i], s1[i], s2[i], stats);
    } else if constexpr (STATS) {
      slots.load(param, p);
      if constexpr (kMaster) {
        slots.load_bits(remainder, r);
        combine_masters<MASTER_BITS>(p, r);
      }
      if (uses_state) slots.load(state1, s1);
      if (kTwoStates && uses_state) slots.load(state2, s2);
      const Coeffs c = block_coeffs();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) A::observe_element(c, p[i], s1[i], s2[i], stats);
    }
  }
  if constexpr (STATS) {
    block_reduce(stats, ops);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < A::kStats; ++c) a.stats_partials[c * a.stats_stride + block] = stats[c];
  }
}

template <class A, typename T, typename S, int MASTER_BITS>
void launch(int64_t num_blocks, const UpdateArgs& a, cudaStream_t stream) {
  // Params and grads are checked per block from the table; the state buffers and the remainder
  // once, here.
  const bool states_aligned = is_aligned16(a.state1) && (a.state2 == nullptr || is_aligned16(a.state2)) &&
                              (a.remainder == nullptr || is_aligned16(a.remainder));
  const unsigned grid = unsigned(num_blocks);
  if (a.stats_partials != nullptr)
    update_kernel<A, T, S, MASTER_BITS, true><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  else
    update_kernel<A, T, S, MASTER_BITS, false><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  check_launch((std::string("update (") + A::kName + ")").c_str());
}

template <class A, typename S>
void launch_params(Dtype dtype, int64_t num_blocks, const UpdateArgs& a, cudaStream_t stream) {
  if (a.master_bits != 0 && dtype != Dtype::kBFloat16)
    throw std::invalid_argument("update: master weights (master_bits " + std::to_string(a.master_bits) +
                                ") are for bfloat16 params, got dtype code " + std::to_string(int(dtype)));
  switch (dtype) {
    case Dtype::kFloat32: return launch<A, float, S, 0>(num_blocks, a, stream);
    case Dtype::kFloat16: return launch<A, __half, S, 0>(num_blocks, a, stream);
    case Dtype::kBFloat16:
      switch (a.master_bits) {
        case 0: return launch<A, __nv_bfloat16, S, 0>(num_blocks, a, stream);
        case 24: return launch<A, __nv_bfloat16, S, 24>(num_blocks, a, stream);
        case 32: return launch<A, __nv_bfloat16, S, 32>(num_blocks, a, stream);
      }
      throw std::invalid_argument("update: master_bits must be 0, 24 or 32, got " + std::to_string(a.master_bits));
  }
  throw std::invalid_argument("update: unknown dtype code " + std::to_string(int(dtype)));
}

template <class A>
void launch_dtype(Dtype dtype, int64_t num_blocks, const UpdateArgs& a, cudaStream_t stream) {
  switch (a.state_dtype) {
    case StateDtype::kFloat32: return launch_params<A, float>(dtype, num_blocks, a, stream);
    case StateDtype::kBFloat16: return launch_params<A, __nv_bfloat16>(dtype, num_blocks, a, stream);
    case StateDtype::kUInt8: return launch_params<A, uint8_t>(dtype, num_blocks, a, stream);
  }
  throw std::invalid_argument("update: state dtype code must be 0 (float32), 1 (bfloat16) or 3 (uint8), got " +
                              std::to_string(int(a.state_dtype)));
}

template <class A>
AlgorithmSchema schema_of(Algorithm code) {
  AlgorithmSchema s{A::kName, code, {std::begin(A::kHyper), std::end(A::kHyper)}, A::kStates, {}, {}};
  for (int c = 0; c < A::kStats; ++c) s.stat_ops.push_back(A::stat_op(c));
  s.state_codes.assign(std::begin(A::kCodes), std::end(A::kCodes));
  return s;
}

}  // namespace

void launch_update(Algorithm algorithm, Dtype dtype, int64_t num_blocks, const UpdateArgs& args,
                   cudaStream_t stream) {
  const bool known = with_algorithm(algorithm, [&](auto a) {
    if (num_blocks > 0) launch_dtype<decltype(a)>(dtype, num_blocks, args, stream);
  });
  if (!known) throw std::invalid_argument("update: unknown algorithm code " + std::to_string(int(algorithm)));
}

const std::vector<AlgorithmSchema>& algorithm_schemas() {
  static const std::vector<AlgorithmSchema> schemas = [] {
    std::vector<AlgorithmSchema> out;
    for (int code = 0;; ++code) {
      const bool known =
          with_algorithm(Algorithm(code), [&](auto a) { out.push_back(schema_of<decltype(a)>(Algorithm(code))); });
      if (!known) return out;
    }
  }();
  return schemas;
}

}  // namespace fusedopt
