// Host interface of the fusedopt CUDA kernels: the contract's four launches
// (docs/kernel_contract.md) as plain C++ functions over raw device pointers.
//
// This header is shared by the kernels (compiled by nvcc) and csrc/bindings.cpp (compiled by the
// host compiler), so it holds no device code and no torch types: the extension builds without a
// CUDA build of torch and does not depend on torch's C++ ABI. Every launcher runs on the stream it
// is given, never synchronizes, and throws std::runtime_error naming the kernel when the launch
// fails (cudaGetLastError right after it).
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace fusedopt {

// Elements per thread block; every tensor starts at a multiple of it in its flat buffer.
constexpr int kBlock = 4096;

// Storage dtype codes passed from Python (cuda_backend._DTYPE_CODES).
enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Slots of the per-device globals float32[8].
enum Global : int {
  kGradNorm = 0,
  kClipCoef = 1,
  kFoundInf = 2,
  kInvScale = 3,
  kSkippedSteps = 4,
  kScale = 5,
  kNumGlobals = 8,
};

// Columns of hyper float32[G, 10], one row per param group.
enum Hyper : int {
  kLr = 0,
  kMaxLr = 1,
  kWeightDecay = 2,
  kBeta1 = 3,
  kBeta2 = 4,
  kEps = 5,
  kMomentum = 6,
  kDampening = 7,
  kCorrected = 8,
  kNesterov = 9,
  kNumHyper = 10,
};

// Per-column reductions of tensor_reduce.
enum class Reduce : int { kSum = 0, kMin = 1, kMax = 2 };

// tensor_reduce takes at most this many columns (Adam statistics use 6).
constexpr int kMaxColumns = 8;

enum class Optimizer : int { kAdam = 0, kSgd = 1 };

// Rows of stats_partials per optimizer (kernel contract, "Stats partials").
constexpr int kAdamStats = 6;
constexpr int kSgdStats = 3;

// 2-D arrays ([rows, columns] float32) are passed as a pointer and a row stride in elements
// (torch's stride(0); the column stride is 1), so row views of larger tables work as they are.

// block_sums[0, b] = sum of (grad * inv_scale)^2 over block b, block_sums[1, b] = 1 if any such
// value is non-finite. scale may be null (scale 1).
void launch_grad_norm(const void* grad, Dtype dtype, int64_t num_blocks, const int32_t* block_tensor,
                      const int64_t* tensor_end, const int32_t* tensor_group, const float* scale,
                      float* block_sums, int64_t block_sums_stride, cudaStream_t stream);

// out[c, tensor_offset + t] = ops[c]-reduction of block_values[c, tensor_block_start[t] ..
// tensor_block_start[t + 1]) for t < num_tensors.
void launch_tensor_reduce(const float* block_values, int64_t values_stride, const int32_t* tensor_block_start,
                          int64_t num_tensors, const std::vector<Reduce>& ops, float* out, int64_t out_stride,
                          int64_t tensor_offset, cudaStream_t stream);

struct FinalizeArgs {
  const float* tensor_sums;    // [2, num_tensors_all], rows sums_stride apart
  int64_t sums_stride;
  int64_t num_tensors_all;
  const int32_t* tensor_group;  // [num_tensors_dev]
  float* tensor_step;           // [num_tensors_dev]
  int64_t num_tensors_dev;
  float* globals;               // [kNumGlobals]
  float* scale;                 // [1] or null (no scaler)
  int32_t* growth_tracker;      // [1] or null (no scaler)
  const float* found_inf_in;    // [1] or null
  float max_grad_norm;          // <= 0: no clipping
  double growth_factor;
  double backoff_factor;
  int32_t growth_interval;
  bool update_scale;
};

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream);

struct UpdateArgs {
  void* param;                  // [num_blocks * kBlock], storage dtype
  const void* grad;             // same dtype and length as param
  float* moment1;               // exp_avg (Adam) or momentum_buffer (SGD)
  float* moment2;               // exp_avg_sq (Adam) or null (SGD)
  int64_t num_blocks;
  const int32_t* block_tensor;  // [num_blocks]
  const int64_t* tensor_end;    // [num_tensors_dev]
  const int32_t* tensor_group;  // [num_tensors_dev]
  const float* tensor_step;     // [num_tensors_dev]
  const float* hyper;           // [num_groups, kNumHyper]
  const float* globals;         // [kNumGlobals]
  float* stats_partials;        // [kAdamStats or kSgdStats, num_blocks] or null (no statistics)
  int64_t stats_stride;         // row stride of stats_partials
};

void launch_update(Optimizer optimizer, Dtype dtype, const UpdateArgs& args, cudaStream_t stream);

}  // namespace fusedopt
