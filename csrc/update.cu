// update: launch 4 of the fused step (docs/kernel_contract.md). One thread block per BLOCK of a
// segment applies an algorithm's step to its elements: the block's tensor t = block_tensor[b]
// comes from the tensor table, its param and grad (storage dtype, where their owners put them) at
// PARAM_ADDR[t] / GRAD_ADDR[t] + e with e = b * BLOCK + j - BLOCK_START[t], its state at
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
// - bf16 state: loaded and widened to fp32, stored rounded stochastically (StochasticBf16), the
//   random bits a hash of the step count after this step, the element's index in the state buffer
//   and the state (stream 1, 2).
// The statistics see what the Triton kernel's see: the fp32 master (old and new) and the fp32
// state before rounding; a skipped step's, the combined master and the widened state.
//
// Napkin math, bytes per element: the algorithm's (28 | 22 B for AdamW, 20 | 14 B for SGD with
// momentum and Lion, fp32 | bf16/fp16 params with fp32 state; the low-precision modes in each
// header), plus per block of 4096 elements 4 B of block_tensor, 40 B of table column, the group's
// 32 B hyper row and 4 B of step (0.02 B/element). Statistics add no per-element traffic (4 B of
// partials per column per block). The tier adds integer work per element: a few ops for the
// master split, a 32-bit hash per bf16 state value.
// Measured (H200, one 2^28-element tensor, AdamW without statistics, medians of 25 launches):
// fp32 | bf16 params with fp32 state 2.04 | 1.77 ms, as before the tier (the same SASS); bf16
// params with 32 | 24-bit masters 1.91 | 1.94 ms with fp32 state (3.6 | 3.3 TB/s of napkin
// bytes), 1.74 | 1.70 ms with bf16 state, bf16 state alone 1.54 ms (2.4-2.8 TB/s); the Triton
// kernel 2.21 | 2.32, 1.95 | 2.00 and 1.71 ms. The 24-bit remainder in 8-byte vectors at W = 8
// (Slots): 1.94 ms against 2.21 ms with W = 16 and 16-byte remainder vectors.
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

// The state's storage S: fp32 as it is, bf16 rounded stochastically with the random bits of (step,
// element index in the state buffer, stream), the Triton kernel's and the reference's, so that
// all three store an fp32 value the same way. `index` is the state buffer's element under the
// block's first one; only its low 32 bits enter the hash (stochastic.py wraps it mod 2^32).
template <typename S, int W>
__device__ __forceinline__ void store_state(const Slots<W>& slots, S* __restrict__ base, const float (&in)[kPerThread],
                                            uint32_t step, uint32_t stream, uint32_t index) {
  if constexpr (std::is_same_v<S, float>) {
    slots.store(base, in);
  } else {
    static_assert(std::is_same_v<S, __nv_bfloat16>, "state is fp32 or bf16");
    const StochasticBf16 round(step, stream);
    slots.store(base, in, [&](float x, int e) { return round(x, index + uint32_t(e)); });
  }
}

// The masters of a block of bf16 params (widened in p) and their remainders r, in place in p.
template <int MASTER_BITS, typename R>
__device__ __forceinline__ void combine_masters(float (&p)[kPerThread], const R (&r)[kPerThread]) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) p[i] = Master<MASTER_BITS>::combine(p[i], r[i]);
}

// T: the params' storage dtype; S: the states' (float, or __nv_bfloat16 rounded stochastically);
// MASTER_BITS: 0, or 24 / 32 for bf16 params with master weights, whose update runs on the fp32
// master (param + remainder) and is split back into both. With S = float and MASTER_BITS 0 an
// instantiation compiles to the SASS of the kernel before the tier (sm_90, compared).
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
  // Slots of the param's or the state's 16-byte vector, whichever holds more elements (see Slots).
  constexpr int kW = kVec<S> > kVec<T> ? kVec<S> : kVec<T>;
  __shared__ Coeffs shared_coeffs;
  const int64_t block = blockIdx.x;
  const int32_t tensor_index = a.block_tensor[block];
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
    const int64_t first = tensor.first_element(block);
    T* param = tensor.address<T>(kParamAddr, first);
    const T* grad = tensor.address<const T>(kGradAddr, first);
    const int64_t state_element = tensor[kStateStart] + first;
    S* state1 = static_cast<S*>(a.state1) + state_element;
    S* state2 = kTwoStates ? static_cast<S*>(a.state2) + state_element : nullptr;
    R* remainder = kMaster ? static_cast<R*>(a.remainder) + state_element : nullptr;
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
        RawSlots<S, kW> raw_s1, raw_s2;
        slots.load_raw(param, raw_p);
        if constexpr (kMaster) slots.load_raw(remainder, raw_r);
        slots.load_raw(grad, raw_g);
        if (uses_state) slots.load_raw(state1, raw_s1);
        if (kTwoStates && uses_state) slots.load_raw(state2, raw_s2);
        c = block_coeffs();
        slots.unpack(raw_p, p);
        if constexpr (kMaster) slots.unpack_bits(raw_r, r);
        slots.unpack(raw_g, g);
        if (uses_state) slots.unpack(raw_s1, s1);
        if (kTwoStates && uses_state) slots.unpack(raw_s2, s2);
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
        if (slots.valid(i)) A::template step_element<Rounded, STATS>(c, p[i], c.unscale(g[i]), s1[i], s2[i], stats);
      if constexpr (kMaster) {
        slots.store(param, p, [](float master, int) { return Master<MASTER_BITS>::param_bits(master); });
        slots.store(remainder, p, [](float master, int) { return Master<MASTER_BITS>::remainder(master); });
      } else {
        slots.store(param, p);
      }
      if (uses_state) {
        // The step count after this step, as an integer (finalize has counted this step).
        const uint32_t step = uint32_t(int32_t(a.tensor_step[tensor_index]));
        store_state(slots, state1, s1, step, 1, uint32_t(state_element));
        if (kTwoStates) store_state(slots, state2, s2, step, 2, uint32_t(state_element));
      }
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
void launch(const UpdateArgs& a, cudaStream_t stream) {
  // Params and grads are checked per block from the table; the state buffers and the remainder
  // once, here.
  const bool states_aligned = is_aligned16(a.state1) && (a.state2 == nullptr || is_aligned16(a.state2)) &&
                              (a.remainder == nullptr || is_aligned16(a.remainder));
  const unsigned grid = unsigned(a.num_blocks);
  if (a.stats_partials != nullptr)
    update_kernel<A, T, S, MASTER_BITS, true><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  else
    update_kernel<A, T, S, MASTER_BITS, false><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  check_launch((std::string("update (") + A::kName + ")").c_str());
}

template <class A, typename S>
void launch_params(Dtype dtype, const UpdateArgs& a, cudaStream_t stream) {
  if (a.master_bits != 0 && dtype != Dtype::kBFloat16)
    throw std::invalid_argument("update: master weights (master_bits " + std::to_string(a.master_bits) +
                                ") are for bfloat16 params, got dtype code " + std::to_string(int(dtype)));
  switch (dtype) {
    case Dtype::kFloat32: return launch<A, float, S, 0>(a, stream);
    case Dtype::kFloat16: return launch<A, __half, S, 0>(a, stream);
    case Dtype::kBFloat16:
      switch (a.master_bits) {
        case 0: return launch<A, __nv_bfloat16, S, 0>(a, stream);
        case 24: return launch<A, __nv_bfloat16, S, 24>(a, stream);
        case 32: return launch<A, __nv_bfloat16, S, 32>(a, stream);
      }
      throw std::invalid_argument("update: master_bits must be 0, 24 or 32, got " + std::to_string(a.master_bits));
  }
  throw std::invalid_argument("update: unknown dtype code " + std::to_string(int(dtype)));
}

template <class A>
void launch_dtype(Dtype dtype, const UpdateArgs& a, cudaStream_t stream) {
  switch (a.state_dtype) {
    case Dtype::kFloat32: return launch_params<A, float>(dtype, a, stream);
    case Dtype::kBFloat16: return launch_params<A, __nv_bfloat16>(dtype, a, stream);
    case Dtype::kFloat16: break;
  }
  throw std::invalid_argument("update: state dtype code must be 0 (float32) or 1 (bfloat16), got " +
                              std::to_string(int(a.state_dtype)));
}

template <class A>
AlgorithmSchema schema_of(Algorithm code) {
  AlgorithmSchema s{A::kName, code, {std::begin(A::kHyper), std::end(A::kHyper)}, A::kStates, {}};
  for (int c = 0; c < A::kStats; ++c) s.stat_ops.push_back(A::stat_op(c));
  return s;
}

}  // namespace

void launch_update(Algorithm algorithm, Dtype dtype, const UpdateArgs& args, cudaStream_t stream) {
  const bool known = with_algorithm(algorithm, [&](auto a) {
    if (args.num_blocks > 0) launch_dtype<decltype(a)>(dtype, args, stream);
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
