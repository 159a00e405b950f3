// finalize: launch 3 of the fused step (docs/kernel_contract.md). One thread block turns the
// per-tensor gradient sums of all of the optimizer's segments into the step's globals:
//   found_inf = any non-finite flag in tensor_sums[1, :] or external_found_inf != 0
//   N         = sqrt(sum of tensor_sums[0, :]) in fp64, in a fixed order
//   clip      = min(1, max_grad_norm / (N + 1e-6)) when max_grad_norm > 0, else 1
//   tensor_step[t] += 1 for active tensors (GROUP[t] >= 0 in the tensor table) when not found_inf
//   SKIPPED_STEPS += found_inf; the loss scale follows torch._amp_update_scale_.
// Skipped tensors need no mask in the sums: grad_norm writes 0, 0 for them, so summing every
// column of tensor_sums (which may span several devices' tensors, T_all >= T_dev) is exact.
//
// Napkin math: reads 20 B per tensor (two sums, GROUP, step) and writes 4 B per tensor: a few
// microseconds of launch latency, independent of the parameter count; it exists so that nothing is
// read on the host.
#include "common.cuh"

namespace fusedopt {
namespace {

__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinalizeArgs a) {
  double sums[1] = {0.0};
  int nonfinite = 0;
  for (int64_t t = threadIdx.x; t < a.num_tensors_all; t += kThreads) {
    sums[0] += double(a.tensor_sums[t]);
    // > 0, not != 0: a tensor with no elements (an empty shard) has no blocks, and the max over
    // no blocks is tensor_reduce's identity, -inf.
    nonfinite |= a.tensor_sums[a.sums_stride + t] > 0.f;
  }
  const bool external_inf = a.found_inf_in != nullptr && *a.found_inf_in != 0.f;
  // __syncthreads_or hands the flag to every thread, which the step increment below needs.
  const bool found_inf = __syncthreads_or(nonfinite) != 0 || external_inf;
  const Reduce ops[1] = {Reduce::kSum};
  block_reduce(sums, ops);

  if (!found_inf) {
    for (int64_t t = threadIdx.x; t < a.num_tensors_dev; t += kThreads)
      if (a.tensor_table[kGroup * a.num_tensors_dev + t] >= 0) a.tensor_step[t] += 1.f;
  }
  if (threadIdx.x != 0) return;

  const float scale = a.scale != nullptr ? *a.scale : 1.f;
  const float norm = float(sqrt(sums[0]));
  // torch.nn.utils.clip_grad_norm_ in fp32: max_norm / (total_norm + 1e-6), where a Python
  // scalar divided by a tensor is tensor.reciprocal() * scalar, then clamp(max=1).
  const float clip = a.max_grad_norm > 0.f ? fminf(1.f, (1.f / (norm + 1e-6f)) * a.max_grad_norm) : 1.f;
  float* g = a.globals;
  g[kGradNorm] = norm;
  g[kClipCoef] = clip;
  g[kFoundInf] = found_inf ? 1.f : 0.f;
  g[kInvScale] = inv_scale_of(scale);
  g[kSkippedSteps] += found_inf ? 1.f : 0.f;

  // torch._amp_update_scale_ (aten/src/ATen/native/cuda/AmpKernels.cu): the factors are doubles,
  // the product is rounded to fp32, and a growth that overflows to inf is not applied.
  float next_scale = scale;
  if (a.scale != nullptr && a.update_scale) {
    if (found_inf) {
      next_scale = float(double(scale) * a.backoff_factor);
      *a.growth_tracker = 0;
    } else {
      const int32_t successful = *a.growth_tracker + 1;
      if (successful == a.growth_interval) {
        const float grown = float(double(scale) * a.growth_factor);
        if (isfinite(grown)) next_scale = grown;
        *a.growth_tracker = 0;
      } else {
        *a.growth_tracker = successful;
      }
    }
    *a.scale = next_scale;
  }
  // The scale after this step's update, what GradScaler.get_scale() reports next (as the Triton
  // backend); INV_SCALE keeps the reciprocal of the scale this step's gradients carried.
  g[kScale] = next_scale;
}

}  // namespace

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  finalize_kernel<<<1, kThreads, 0, stream>>>(args);
  check_launch("finalize");
}

}  // namespace fusedopt
