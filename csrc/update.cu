// update: launch 4 of the fused step (docs/kernel_contract.md). One thread block per BLOCK applies
// the optimizer step to its elements, with g = (grad * INV_SCALE) * CLIP_COEF (torch's unscale_
// then clip_grad_norm_'s multiply, in that order) and k = LR / MAX_LR if CORRECTED else 1:
//   Adam (torch.optim.AdamW's form): p *= 1 - LR*WD*k; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
//        p -= (LR / (1 - b1^t)) * (m / (sqrt(v) / sqrt(1 - b2^t) + EPS))
//   SGD (torch.optim.SGD): d = g + WD*k*p; with momentum: buf = d at t == 1, else
//        MOMENTUM*buf + (1-DAMPENING)*d; d = d + MOMENTUM*buf (nesterov) or buf; p -= LR*d
// The math runs in fp32 and is written once (step_element), templated on the optimizer, the
// storage dtype and the STATS flag. Per-block constants (bias corrections in fp64, decay factor)
// are computed once per block by thread 0, not per element.
// FOUND_INF != 0 branches out (a skip factor would turn 0 * NaN into NaN); with STATS the block
// then reports its unchanged state (update norm 0, decrease count 0). Blocks of skipped tensors
// (group -1) only write neutral partials (sums 0, min +inf, max -inf).
//
// Napkin math, bytes per element (read + write), for fp32 | bf16/fp16 storage:
//   Adam:             p, g, m, v read + p, m, v written = 16 + 12 = 28 B | 12 + 10 = 22 B
//   SGD with momentum: p, g, buf read + p, buf written  = 12 + 8  = 20 B | 8 + 6    = 14 B
//   SGD, momentum 0:  p, g read + p written (the buffer is not touched) = 12 B | 6 B
// plus grad_norm's read of g (4 | 2 B): the fused Adam step moves 32 B/param in fp32, the floor
// the issue measures against. Statistics add no per-element traffic (24 B of partials per block).
// At 1.1B fp32 params the Adam update is 30.8 GB: ~9.6 ms at 3.2 TB/s (H100 SXM copy bandwidth).
#include "common.cuh"

namespace fusedopt {
namespace {

// Per-block constants of the step, computed once by thread 0 from the tensor's group and step.
template <Optimizer OPT>
struct Coeffs;

template <>
struct Coeffs<Optimizer::kAdam> {
  float inv_scale, clip;
  float decay;  // 1 - LR*WD*k
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;  // LR / (1 - b1^t)
  float bc2_sqrt;   // sqrt(1 - b2^t)
  float bc2;        // 1 - b2^t, for v-hat
  float eps;
};

template <>
struct Coeffs<Optimizer::kSgd> {
  float inv_scale, clip;
  float lr, weight_decay;  // weight_decay = WD*k
  float momentum, one_minus_dampening;
  bool has_weight_decay, has_momentum, first_step, nesterov;
};

// Scalars are combined in fp64 and rounded once, as torch.optim does with Python floats
// (e.g. param.mul_(1 - lr * weight_decay), step_size = lr / bias_correction1).
template <Optimizer OPT>
__device__ Coeffs<OPT> make_coeffs(const float* __restrict__ row, float step, const float* __restrict__ globals) {
  Coeffs<OPT> c;
  c.inv_scale = globals[kInvScale];
  c.clip = globals[kClipCoef];
  const double lr = row[kLr];
  const double k = row[kCorrected] != 0.f ? lr / double(row[kMaxLr]) : 1.0;
  const double wd = row[kWeightDecay];
  if constexpr (OPT == Optimizer::kAdam) {
    const double b1 = row[kBeta1];
    const double b2 = row[kBeta2];
    const double t = step;
    // t == 0 only when the very first step was skipped and the statistics report the untouched
    // state: no bias correction then (as python/fusedopt/reference.py).
    const double bc1 = t > 0 ? 1.0 - pow(b1, t) : 1.0;
    const double bc2 = t > 0 ? 1.0 - pow(b2, t) : 1.0;
    c.decay = float(1.0 - lr * wd * k);
    c.beta1 = float(b1);
    c.one_minus_beta1 = float(1.0 - b1);
    c.beta2 = float(b2);
    c.one_minus_beta2 = float(1.0 - b2);
    c.step_size = float(lr / bc1);
    c.bc2_sqrt = float(sqrt(bc2));
    c.bc2 = float(bc2);
    c.eps = row[kEps];
  } else {
    c.lr = row[kLr];
    c.has_weight_decay = wd != 0.0;
    c.weight_decay = float(wd * k);
    c.momentum = row[kMomentum];
    c.has_momentum = row[kMomentum] != 0.f;
    c.one_minus_dampening = float(1.0 - double(row[kDampening]));
    c.first_step = step == 1.f;
    c.nesterov = row[kNesterov] != 0.f;
  }
  return c;
}

// Per-thread statistics, folded over the block by block_reduce.
template <Optimizer OPT>
struct Stats;

template <>
struct Stats<Optimizer::kAdam> {
  static constexpr int kColumns = kAdamStats;
  // sum p_new^2, sum (p_new - p_old)^2, min v-hat, max v-hat, sum v-hat, count(g^2 < v_prev)
  float v[kColumns] = {0.f, 0.f, INFINITY, -INFINITY, 0.f, 0.f};

  __device__ __forceinline__ void write(float* __restrict__ partials, int64_t block, int64_t stride) {
    const Reduce ops[kColumns] = {Reduce::kSum, Reduce::kSum, Reduce::kMin,
                                  Reduce::kMax, Reduce::kSum, Reduce::kSum};
    block_reduce(v, ops);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < kColumns; ++c) partials[c * stride + block] = v[c];
  }
};

template <>
struct Stats<Optimizer::kSgd> {
  static constexpr int kColumns = kSgdStats;
  // sum p_new^2, sum (p_new - p_old)^2, sum buf^2
  float v[kColumns] = {0.f, 0.f, 0.f};

  __device__ __forceinline__ void write(float* __restrict__ partials, int64_t block, int64_t stride) {
    const Reduce ops[kColumns] = {Reduce::kSum, Reduce::kSum, Reduce::kSum};
    block_reduce(v, ops);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < kColumns; ++c) partials[c * stride + block] = v[c];
  }
};

__device__ __forceinline__ void add_vhat(Stats<Optimizer::kAdam>& s, float vhat) {
  s.v[2] = fminf(s.v[2], vhat);
  s.v[3] = fmaxf(s.v[3], vhat);
  s.v[4] += vhat;
}

// The step of one element: the only place the optimizer math is written. p is the stored param
// widened to fp32 and comes back updated (rounded to T by the store); grad is the stored (still
// loss-scaled) gradient; m, v the fp32 moments (v unused by SGD).
template <Optimizer OPT, typename T, bool STATS>
__device__ __forceinline__ void step_element(const Coeffs<OPT>& c, float& p, float grad, float& m, float& v,
                                             Stats<OPT>& s) {
  const float g = (grad * c.inv_scale) * c.clip;
  const float p_old = p;
  if constexpr (OPT == Optimizer::kAdam) {
    const float v_prev = v;
    p = p * c.decay;
    m = c.beta1 * m + c.one_minus_beta1 * g;
    v = c.beta2 * v + c.one_minus_beta2 * (g * g);
    p = p - c.step_size * (m / (sqrtf(v) / c.bc2_sqrt + c.eps));
    if constexpr (STATS) {
      const float p_new = round_to_storage<T>(p);
      const float dp = p_new - p_old;
      s.v[0] += p_new * p_new;
      s.v[1] += dp * dp;
      add_vhat(s, v / c.bc2);
      s.v[5] += g * g < v_prev ? 1.f : 0.f;
    }
  } else {
    float d = g;
    if (c.has_weight_decay) d = d + c.weight_decay * p;
    if (c.has_momentum) {
      m = c.first_step ? d : c.momentum * m + c.one_minus_dampening * d;
      d = c.nesterov ? d + c.momentum * m : m;
    }
    p = p - c.lr * d;
    if constexpr (STATS) {
      const float p_new = round_to_storage<T>(p);
      const float dp = p_new - p_old;
      s.v[0] += p_new * p_new;
      s.v[1] += dp * dp;
      if (c.has_momentum) s.v[2] += m * m;
    }
  }
}

// Statistics of an element the skipped step leaves as it is: update 0, no decrease. moment is
// v for Adam (v-hat statistics) and the momentum buffer for SGD.
template <Optimizer OPT>
__device__ __forceinline__ void observe_element(const Coeffs<OPT>& c, float p, float moment, Stats<OPT>& s) {
  s.v[0] += p * p;
  if constexpr (OPT == Optimizer::kAdam)
    add_vhat(s, moment / c.bc2);
  else
    s.v[2] += moment * moment;
}

template <Optimizer OPT, typename T, bool STATS>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateArgs a, bool aligned) {
  constexpr bool kAdam = OPT == Optimizer::kAdam;
  __shared__ Coeffs<OPT> shared_coeffs;
  const int64_t block = blockIdx.x;
  const int32_t tensor = a.block_tensor[block];
  const int32_t group = a.tensor_group[tensor];
  Stats<OPT> stats;
  if (group >= 0) {
    const bool found_inf = a.globals[kFoundInf] != 0.f;
    if (!STATS && found_inf) return;
    const float* row = a.hyper + int64_t(group) * kNumHyper;
    // SGD without momentum neither reads nor writes its buffer (torch keeps it None): 8 B/element
    // less, and its statistic (buffer norm) is 0.
    const bool uses_moment1 = kAdam || row[kMomentum] != 0.f;
    const Slots<kVec<T>> slots = block_slots<kVec<T>>(block, a.tensor_end[tensor], aligned);
    T* param = static_cast<T*>(a.param);
    float p[kPerThread], m[kPerThread], v[kPerThread];
    // The block's constants, computed by thread 0 while the loads are in flight.
    const auto block_coeffs = [&]() {
      if (threadIdx.x == 0) shared_coeffs = make_coeffs<OPT>(row, a.tensor_step[tensor], a.globals);
      __syncthreads();
      return shared_coeffs;
    };
    if (!found_inf) {
      float g[kPerThread];
      Coeffs<OPT> c;
      if (slots.full) {
        // Every array's 16-byte loads are issued before any of them is converted (see
        // Slots::load_raw): one DRAM round trip per block, also for 2-byte storage types.
        RawSlots<T> raw_p, raw_g;
        RawSlots<float> raw_m, raw_v;
        slots.load_raw(param, raw_p);
        slots.load_raw(static_cast<const T*>(a.grad), raw_g);
        if (uses_moment1) slots.load_raw(a.moment1, raw_m);
        if constexpr (kAdam) slots.load_raw(a.moment2, raw_v);
        c = block_coeffs();
        slots.unpack(raw_p, p);
        slots.unpack(raw_g, g);
        if (uses_moment1) slots.unpack(raw_m, m);
        if constexpr (kAdam) slots.unpack(raw_v, v);
      } else {
        slots.load_tail(param, p);
        slots.load_tail(static_cast<const T*>(a.grad), g);
        if (uses_moment1) slots.load_tail(a.moment1, m);
        if constexpr (kAdam) slots.load_tail(a.moment2, v);
        c = block_coeffs();
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) step_element<OPT, T, STATS>(c, p[i], g[i], m[i], v[i], stats);
      slots.store(param, p);
      if (uses_moment1) slots.store(a.moment1, m);
      if constexpr (kAdam) slots.store(a.moment2, v);
    } else if constexpr (STATS) {
      // The state a skipped step reports: Adam needs v (v-hat), SGD its buffer.
      slots.load(param, p);
      if constexpr (kAdam)
        slots.load(a.moment2, v);
      else
        slots.load(a.moment1, m);
      const Coeffs<OPT> c = block_coeffs();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (slots.valid(i)) observe_element<OPT>(c, p[i], kAdam ? v[i] : m[i], stats);
    }
  }
  if constexpr (STATS) stats.write(a.stats_partials, block, a.stats_stride);
}

template <Optimizer OPT, typename T>
void launch(const UpdateArgs& a, cudaStream_t stream) {
  const bool aligned = is_aligned16(a.param) && is_aligned16(a.grad) && is_aligned16(a.moment1) &&
                       (a.moment2 == nullptr || is_aligned16(a.moment2));
  const unsigned grid = unsigned(a.num_blocks);
  if (a.stats_partials != nullptr)
    update_kernel<OPT, T, true><<<grid, kThreads, 0, stream>>>(a, aligned);
  else
    update_kernel<OPT, T, false><<<grid, kThreads, 0, stream>>>(a, aligned);
  check_launch(OPT == Optimizer::kAdam ? "update (adam)" : "update (sgd)");
}

template <Optimizer OPT>
void launch_dtype(Dtype dtype, const UpdateArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch<OPT, float>(a, stream);
    case Dtype::kBFloat16: return launch<OPT, __nv_bfloat16>(a, stream);
    case Dtype::kFloat16: return launch<OPT, __half>(a, stream);
  }
  throw std::invalid_argument("update: unknown dtype code " + std::to_string(int(dtype)));
}

}  // namespace

void launch_update(Optimizer optimizer, Dtype dtype, const UpdateArgs& args, cudaStream_t stream) {
  if (args.num_blocks == 0) return;
  switch (optimizer) {
    case Optimizer::kAdam: return launch_dtype<Optimizer::kAdam>(dtype, args, stream);
    case Optimizer::kSgd: return launch_dtype<Optimizer::kSgd>(dtype, args, stream);
  }
  throw std::invalid_argument("update: unknown optimizer code " + std::to_string(int(optimizer)));
}

}  // namespace fusedopt
