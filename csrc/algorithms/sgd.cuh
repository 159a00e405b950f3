// SGD / SGDC, element by element (torch.optim.SGD; fusedopt/algorithms/sgd.py):
//   d = g + WD*k*p; with momentum: buf = d at t == 1, else MOMENTUM*buf + (1-DAMPENING)*d;
//   d = d + MOMENTUM*buf (nesterov) or buf; p -= LR*d
// with k = LR / MAX_LR for SGDC (Defazio 2025, arXiv 2506.02285), else 1. State: momentum_buffer,
// neither read nor written without momentum (torch keeps it None). Statistics: sum p_new^2,
// sum (p_new - p_old)^2, sum buf^2 (0 without momentum).
//
// Napkin math, bytes per element (read + write), for fp32 | bf16/fp16 params:
//   with momentum: p, g, buf read + p, buf written = 12 + 8 = 20 B | 8 + 6 = 14 B
//   momentum 0:    p, g read + p written            = 8 + 4  = 12 B | 4 + 2 = 6 B
// plus grad_norm's read of g (4 | 2 B). The low-precision tier: a bf16 buffer moves in 2 B (4 B
// less with momentum: 16 | 10 B); master weights add the remainder's read + write to bf16 params,
// 4 B for 32 bits, 2 B for 24: with momentum 18 | 16 B (fp32 buffer), 14 | 12 B (bf16 buffer),
// momentum 0 10 | 8 B (32 | 24 bits). An 8-bit buffer moves 1 B plus 1/32 B of group scale,
// read and written (2.06 B): 14.06 | 8.06 B with momentum, 12.06 | 10.06 B with 32 | 24-bit
// masters.
#pragma once

#include "../common.cuh"

namespace fusedopt {

struct Sgd {
  static constexpr const char* kName = "sgd";
  enum Column : int { kMomentum = kFirstAlgorithmColumn, kDampening, kNesterov };
  static constexpr HyperColumn kHyper[] = {{"momentum", kMomentum}, {"dampening", kDampening}, {"nesterov", kNesterov}};
  static constexpr int kStates = 1;  // momentum_buffer
  static constexpr StateCode kCodes[kStates] = {StateCode::kSigned};  // 8-bit format (engine/int8.py)
  static constexpr int kStats = 3;

  // sum p_new^2, sum (p_new - p_old)^2, sum buf^2
  static constexpr __host__ __device__ Reduce stat_op(int) { return Reduce::kSum; }

  struct Coeffs {
    GradScale unscale;
    float lr, weight_decay;  // weight_decay = WD*k
    float momentum, one_minus_dampening;
    bool has_weight_decay, has_momentum, first_step, nesterov;
  };

  // Scalars are combined in fp64 and rounded once, as torch.optim does with Python floats.
  static __device__ Coeffs make_coeffs(const float* __restrict__ row, float step, const float* __restrict__ globals) {
    Coeffs c;
    c.unscale = GradScale::of(globals);
    const double wd = row[kWeightDecay];
    c.lr = row[kLr];
    c.has_weight_decay = wd != 0.0;
    c.weight_decay = float(wd * decay_multiplier(row));
    c.momentum = row[kMomentum];
    c.has_momentum = row[kMomentum] != 0.f;
    c.one_minus_dampening = float(1.0 - double(row[kDampening]));
    c.first_step = step == 1.f;
    c.nesterov = row[kNesterov] != 0.f;
    return c;
  }

  // Without momentum the buffer is not touched: 8 B/element less, and its statistic is 0.
  static __device__ __forceinline__ bool uses_state(const float* __restrict__ row) { return row[kMomentum] != 0.f; }

  // p: the stored param widened to fp32 (or the fp32 master), returned updated (the kernel rounds or
  // splits it when storing); T: the type the statistics see the new param in (the param's storage
  // dtype, float for a master); g: the unscaled, clipped gradient; buf: momentum_buffer in fp32.
  // INT8_STATE: 8-bit state takes the same form.
  template <typename T, bool STATS, bool INT8_STATE>
  static __device__ __forceinline__ void step_element(const Coeffs& c, float& p, float g, float& buf, float&,
                                                      float (&stats)[kStats]) {
    const float p_old = p;
    float d = g;
    if (c.has_weight_decay) d = d + c.weight_decay * p;
    if (c.has_momentum) {
      buf = c.first_step ? d : c.momentum * buf + c.one_minus_dampening * d;
      d = c.nesterov ? d + c.momentum * buf : buf;
    }
    p = p - c.lr * d;
    if constexpr (STATS) {
      const float p_new = round_to_storage<T>(p);
      const float dp = p_new - p_old;
      stats[0] += p_new * p_new;
      stats[1] += dp * dp;
      if (c.has_momentum) stats[2] += buf * buf;
    }
  }

  // A skipped step's statistics: the unchanged param and buffer, no update.
  static __device__ __forceinline__ void observe_element(const Coeffs& c, float p, float buf, float,
                                                         float (&stats)[kStats]) {
    stats[0] += p * p;
    if (c.has_momentum) stats[2] += buf * buf;
  }
};

}  // namespace fusedopt
