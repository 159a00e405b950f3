// Lion / LionC, element by element (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", arXiv 2302.06675, Algorithm 2; fusedopt/algorithms/lion.py):
//   c = b1*m + (1-b1)*g; p = p * (1 - LR*WD*k) - LR*sign(c); m = b2*m + (1-b2)*g
// with k = LR / MAX_LR for LionC (Defazio 2025, arXiv 2506.02285), else 1, and sign(0) = 0 as
// torch.sign. State: exp_avg (m). Statistics: sum p_new^2, sum (p_new - p_old)^2, sum m_new^2.
//
// Napkin math, bytes per element (read + write), for fp32 | bf16/fp16 params:
//   p, g, m read + p, m written = 12 + 8 = 20 B | 8 + 6 = 14 B
// plus grad_norm's read of g (4 | 2 B): 24 B/param in fp32, 3/4 of AdamW's 32 B (one state).
// The low-precision tier: bf16 state moves m in 2 B (4 B less: 16 | 10 B); master weights add
// the remainder's read + write to bf16 params, 4 B for 32 bits, 2 B for 24: fp32 state 18 | 16 B,
// bf16 state 14 | 12 B (32 | 24 bits). 8-bit state moves m in 1 B plus 1/32 B of group scale,
// read and written (2.06 B): 14.06 | 8.06 B, 12.06 | 10.06 B with 32 | 24-bit masters.
#pragma once

#include "../common.cuh"

namespace fusedopt {

struct Lion {
  static constexpr const char* kName = "lion";
  enum Column : int { kBeta1 = kFirstAlgorithmColumn, kBeta2 };
  static constexpr HyperColumn kHyper[] = {{"beta1", kBeta1}, {"beta2", kBeta2}};
  static constexpr int kStates = 1;  // exp_avg
  static constexpr StateCode kCodes[kStates] = {StateCode::kSigned};  // 8-bit format (engine/int8.py)
  static constexpr int kStats = 3;

  // sum p_new^2, sum (p_new - p_old)^2, sum m^2
  static constexpr __host__ __device__ Reduce stat_op(int) { return Reduce::kSum; }

  struct Coeffs {
    GradScale unscale;
    float decay;  // 1 - LR*WD*k
    float lr;
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
  };

  // Scalars are combined in fp64 and rounded once, as torch does with Python floats
  // (param.mul_(1 - lr * weight_decay), exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)).
  static __device__ Coeffs make_coeffs(const float* __restrict__ row, float, const float* __restrict__ globals) {
    Coeffs c;
    c.unscale = GradScale::of(globals);
    const double b1 = row[kBeta1];
    const double b2 = row[kBeta2];
    c.decay = decoupled_decay(row);
    c.lr = row[kLr];
    c.beta1 = float(b1);
    c.one_minus_beta1 = float(1.0 - b1);
    c.beta2 = float(b2);
    c.one_minus_beta2 = float(1.0 - b2);
    return c;
  }

  static __device__ __forceinline__ bool uses_state(const float* __restrict__) { return true; }

  // (x > 0) - (x < 0), as torch.sign: 0 for +-0 and NaN.
  static __device__ __forceinline__ float sign(float x) { return float(int(x > 0.f) - int(x < 0.f)); }

  // p: the stored param widened to fp32 (or the fp32 master), returned updated (the kernel rounds or
  // splits it when storing); T: the type the statistics see the new param in (the param's storage
  // dtype, float for a master); g: the unscaled, clipped gradient; m: exp_avg in fp32. The decay
  // and the signed step round separately, in that order, as param.mul_(decay).add_(sign,
  // alpha=-lr).
  // INT8_STATE: 8-bit state takes the same form.
  template <typename T, bool STATS, bool INT8_STATE>
  static __device__ __forceinline__ void step_element(const Coeffs& c, float& p, float g, float& m, float&,
                                                      float (&stats)[kStats]) {
    const float p_old = p;
    const float direction = sign(c.beta1 * m + c.one_minus_beta1 * g);
    p = p * c.decay;
    p = p - c.lr * direction;
    m = c.beta2 * m + c.one_minus_beta2 * g;
    if constexpr (STATS) {
      const float p_new = round_to_storage<T>(p);
      const float dp = p_new - p_old;
      stats[0] += p_new * p_new;
      stats[1] += dp * dp;
      stats[2] += m * m;
    }
  }

  // A skipped step's statistics: the unchanged param and exp_avg, no update.
  static __device__ __forceinline__ void observe_element(const Coeffs&, float p, float m, float,
                                                         float (&stats)[kStats]) {
    stats[0] += p * p;
    stats[2] += m * m;
  }
};

}  // namespace fusedopt
