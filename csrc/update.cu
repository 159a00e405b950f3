// update: launch 4 of the fused step (docs/kernel_contract.md). One thread block per BLOCK of a
// segment applies an algorithm's step to its elements: the block's tensor t = block_tensor[b]
// comes from the tensor table, its param and grad (storage dtype, where their owners put them) at
// PARAM_ADDR[t] / GRAD_ADDR[t] + e with e = b * BLOCK + j - BLOCK_START[t], its state at
// STATE_START[t] + e of state1 / state2. g = (grad * INV_SCALE) * CLIP_COEF; the element math, the
// per-block scalars (fp64, rounded once) and the statistics are the algorithm's
// (csrc/algorithms/<name>.cuh); this file is the one traversal, templated on the algorithm, the
// storage dtype and the STATS flag. Adding an algorithm: its code in layout.h (Algorithm), its
// header, one include and one case in with_algorithm below.
// FOUND_INF != 0 branches out (a skip factor would turn 0 * NaN into NaN); with STATS the block
// then reports its unchanged state (the algorithm's observe_element). Blocks of skipped tensors
// (group -1) only write neutral partials (sums 0, min +inf, max -inf).
//
// Napkin math, bytes per element: the algorithm's (28 | 22 B for AdamW, 20 | 14 B for SGD with
// momentum and Lion, fp32 | bf16/fp16 params; see each header), plus per block of 4096 elements
// 4 B of block_tensor, 40 B of table column, the group's 32 B hyper row and 4 B of step
// (0.02 B/element). Statistics add no per-element traffic (4 B of partials per column per block).
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

template <class A, typename T, bool STATS>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateArgs a, bool states_aligned) {
  static_assert(A::kStates >= 1 && A::kStates <= kMaxStates, "update takes state1 and state2");
  static_assert(A::kStats <= kMaxColumns, "tensor_reduce folds at most kMaxColumns columns");
  using Coeffs = typename A::Coeffs;
  constexpr bool kTwoStates = A::kStates == 2;
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
    float* state1 = a.state1 + state_element;
    float* state2 = kTwoStates ? a.state2 + state_element : nullptr;
    const Slots<kVec<T>> slots =
        Slots<kVec<T>>::of(tensor[kNumel] - first, states_aligned && is_aligned16(param) && is_aligned16(grad));
    float p[kPerThread], s1[kPerThread], s2[kPerThread];
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
        // Every array's 16-byte loads are issued before any of them is converted (see
        // Slots::load_raw): one DRAM round trip per block, also for 2-byte storage types.
        RawSlots<T> raw_p, raw_g;
        RawSlots<float> raw_s1, raw_s2;
        slots.load_raw(param, raw_p);
        slots.load_raw(grad, raw_g);
        if (uses_state) slots.load_raw(state1, raw_s1);
        if (kTwoStates && uses_state) slots.load_raw(state2, raw_s2);
        c = block_coeffs();
        slots.unpack(raw_p, p);
        slots.unpack(raw_g, g);
        if (uses_state) slots.unpack(raw_s1, s1);
        if (kTwoStates && uses_state) slots.unpack(raw_s2, s2);
      } else {
        slots.load_tail(param, p);
        slots.load_tail(grad, g);
        if (uses_state) slots.load_tail(state1, s1);
        if (kTwoStates && uses_state) slots.load_tail(state2, s2);
        c = block_coeffs();
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) A::template step_element<T, STATS>(c, p[i], c.unscale(g[i]), s1[i], s2[i], stats);
      slots.store(param, p);
      if (uses_state) slots.store(state1, s1);
      if (kTwoStates && uses_state) slots.store(state2, s2);
    } else if constexpr (STATS) {
      slots.load(param, p);
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

template <class A, typename T>
void launch(const UpdateArgs& a, cudaStream_t stream) {
  // Params and grads are checked per block from the table; the state buffers once, here.
  const bool states_aligned = is_aligned16(a.state1) && (a.state2 == nullptr || is_aligned16(a.state2));
  const unsigned grid = unsigned(a.num_blocks);
  if (a.stats_partials != nullptr)
    update_kernel<A, T, true><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  else
    update_kernel<A, T, false><<<grid, kThreads, 0, stream>>>(a, states_aligned);
  check_launch((std::string("update (") + A::kName + ")").c_str());
}

template <class A>
void launch_dtype(Dtype dtype, const UpdateArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch<A, float>(a, stream);
    case Dtype::kBFloat16: return launch<A, __nv_bfloat16>(a, stream);
    case Dtype::kFloat16: return launch<A, __half>(a, stream);
  }
  throw std::invalid_argument("update: unknown dtype code " + std::to_string(int(dtype)));
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
