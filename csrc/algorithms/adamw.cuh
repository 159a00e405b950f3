// AdamW / AdamC, element by element (torch.optim.AdamW's form; fusedopt/algorithms/adamw.py):
//   p *= 1 - LR*WD*k; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
//   p -= (LR / (1 - b1^t)) * (m / (sqrt(v) / sqrt(1 - b2^t) + EPS))
// and with 8-bit state, whose update instruction issue bounds (no division by sqrt(1 - b2^t) per
// element; fusedopt/algorithms/adamw.py, reference_update):
//   p -= (LR / (1 - b1^t) * sqrt(1 - b2^t)) * (m / (sqrt(v) + EPS * sqrt(1 - b2^t)))
// with k = LR / MAX_LR for AdamC (Defazio 2025, arXiv 2506.02285), else 1. State: exp_avg (m),
// exp_avg_sq (v). Statistics: sum p_new^2, sum (p_new - p_old)^2, min/max/sum of
// v-hat = v / (1 - b2^t), count(g^2 < v_prev) (the beta2-decay regime that precedes Adam loss
// spikes, Bai et al. 2025).
//
// Napkin math, bytes per element (read + write), for fp32 | bf16/fp16 params:
//   p, g, m, v read + p, m, v written = 16 + 12 = 28 B | 12 + 10 = 22 B
// plus grad_norm's read of g (4 | 2 B): 32 B/param in fp32, the floor of a fused AdamW step.
// At 1.1B fp32 params the update is 30.8 GB: ~9.6 ms at 3.2 TB/s (H100 SXM copy bandwidth).
// The low-precision tier: bf16 state moves m and v in 2 B each (8 B less: 20 | 14 B); master
// weights add the remainder's read + write to bf16 params, 4 B for 32 bits (int16), 2 B for 24
// (uint8): fp32 state 26 | 24 B, bf16 state 18 | 16 B (32 | 24 bits). With grad_norm's 2 B,
// bf16 params with 32-bit masters follow an fp32 run's params bit for bit for 28 B/param against
// its 32, and with bf16 state as well for 20 B. 8-bit state moves m and v in 1 B each plus 1/32 B
// of group scale each, read and written (4.125 B: 16.125 | 10.125 B; with masters 14.125 |
// 12.125 B for 32 | 24 bits): bf16 params with 24-bit masters and 8-bit moments, 14.1 B/param
// with grad_norm's 2 B.
#pragma once

#include "../common.cuh"

namespace fusedopt {

struct AdamW {
  static constexpr const char* kName = "adamw";
  enum Column : int { kBeta1 = kFirstAlgorithmColumn, kBeta2, kEps };
  static constexpr HyperColumn kHyper[] = {{"beta1", kBeta1}, {"beta2", kBeta2}, {"eps", kEps}};
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  // 8-bit formats (fusedopt/engine/int8.py): m signed; v on sqrt(v), whose log-like code keeps the
  // small v of a group with one large element from rounding to 0 (an m / eps update).
  static constexpr StateCode kCodes[kStates] = {StateCode::kSigned, StateCode::kSqrt};
  static constexpr int kStats = 6;

  // sum p_new^2, sum (p_new - p_old)^2, min v-hat, max v-hat, sum v-hat, count(g^2 < v_prev)
  static constexpr __host__ __device__ Reduce stat_op(int column) {
    constexpr Reduce kOps[kStats] = {Reduce::kSum, Reduce::kSum, Reduce::kMin,
                                     Reduce::kMax, Reduce::kSum, Reduce::kSum};
    return kOps[column];
  }

  struct Coeffs {
    GradScale unscale;
    float decay;  // 1 - LR*WD*k
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float step_size;  // LR / (1 - b1^t)
    float bc2_sqrt;   // sqrt(1 - b2^t)
    float bc2;        // 1 - b2^t, for v-hat
    float eps;
    float step_size_int8;  // LR / (1 - b1^t) * sqrt(1 - b2^t)
    float eps_int8;        // EPS * sqrt(1 - b2^t)
  };

  // Scalars are combined in fp64 and rounded once, as torch.optim does with Python floats
  // (param.mul_(1 - lr * weight_decay), step_size = lr / bias_correction1).
  static __device__ Coeffs make_coeffs(const float* __restrict__ row, float step, const float* __restrict__ globals) {
    Coeffs c;
    c.unscale = GradScale::of(globals);
    const double lr = row[kLr];
    const double b1 = row[kBeta1];
    const double b2 = row[kBeta2];
    const double t = step;
    // t == 0 only when the very first step was skipped and the statistics report the untouched
    // state: no bias correction then (as fusedopt/algorithms/adamw.py reference_stats).
    const double bc1 = t > 0 ? 1.0 - pow(b1, t) : 1.0;
    const double bc2 = t > 0 ? 1.0 - pow(b2, t) : 1.0;
    c.decay = decoupled_decay(row);
    c.beta1 = float(b1);
    c.one_minus_beta1 = float(1.0 - b1);
    c.beta2 = float(b2);
    c.one_minus_beta2 = float(1.0 - b2);
    const double bc2_sqrt = sqrt(bc2);
    c.step_size = float(lr / bc1);
    c.bc2_sqrt = float(bc2_sqrt);
    c.bc2 = float(bc2);
    c.eps = row[kEps];
    c.step_size_int8 = float(lr / bc1 * bc2_sqrt);
    c.eps_int8 = float(double(c.eps) * bc2_sqrt);
    return c;
  }

  static __device__ __forceinline__ bool uses_state(const float* __restrict__) { return true; }

  static __device__ __forceinline__ void add_vhat(const Coeffs& c, float v, float (&stats)[kStats]) {
    const float vhat = v / c.bc2;
    stats[2] = fminf(stats[2], vhat);
    stats[3] = fmaxf(stats[3], vhat);
    stats[4] += vhat;
  }

  // p: the stored param widened to fp32 (or the fp32 master), returned updated (the kernel rounds or
  // splits it when storing); T: the type the statistics see the new param in (the param's storage
  // dtype, float for a master); g: the unscaled, clipped gradient; m, v: exp_avg, exp_avg_sq in
  // fp32 (the statistics see them before a bf16 state is rounded).
  template <typename T, bool STATS, bool INT8_STATE>
  static __device__ __forceinline__ void step_element(const Coeffs& c, float& p, float g, float& m, float& v,
                                                      float (&stats)[kStats]) {
    const float p_old = p;
    const float v_prev = v;
    p = p * c.decay;
    m = c.beta1 * m + c.one_minus_beta1 * g;
    v = c.beta2 * v + c.one_minus_beta2 * (g * g);
    if constexpr (INT8_STATE) {
      p = p - c.step_size_int8 * (m / (sqrtf(v) + c.eps_int8));
    } else {
      p = p - c.step_size * (m / (sqrtf(v) / c.bc2_sqrt + c.eps));
    }
    if constexpr (STATS) {
      const float p_new = round_to_storage<T>(p);
      const float dp = p_new - p_old;
      stats[0] += p_new * p_new;
      stats[1] += dp * dp;
      add_vhat(c, v, stats);
      stats[5] += g * g < v_prev ? 1.f : 0.f;
    }
  }

  // A skipped step's statistics: the unchanged param and v-hat, no update, no decrease.
  static __device__ __forceinline__ void observe_element(const Coeffs& c, float p, float, float v,
                                                         float (&stats)[kStats]) {
    stats[0] += p * p;
    add_vhat(c, v, stats);
  }
};

}  // namespace fusedopt
