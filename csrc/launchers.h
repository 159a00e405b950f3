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
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "layout.h"

namespace fusedopt {

// Storage dtype codes passed from Python (cuda_backend._DTYPE_CODES), for params and grads.
enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The update's state storage codes (cuda_backend._STATE_DTYPE_CODES): fp32, bf16 (stored rounded
// stochastically) or uint8, the codes of 8-bit state (python/fusedopt/engine/int8.py) beside
// their group scale bytes. fp32 and bf16 keep their Dtype codes.
enum class StateDtype : int { kFloat32 = 0, kBFloat16 = 1, kUInt8 = 3 };

// 2-D float arrays ([rows, columns]) are passed as a pointer and a row stride in elements
// (torch's stride(0); the column stride is 1), so row views of larger tables work as they are.
// The tensor table is contiguous: its row stride is num_tensors.

// block_sums[0, b] = sum of (grad * inv_scale)^2 over block b, block_sums[1, b] = 1 if any such
// value is non-finite, grads read through the tensor table. scale may be null (scale 1).
void launch_grad_norm(Dtype dtype, const int32_t* block_tensor, int64_t num_blocks, const int64_t* tensor_table,
                      int64_t num_tensors, const float* scale, float* block_sums, int64_t block_sums_stride,
                      cudaStream_t stream);

// out[c, tensor_offset + t] = ops[c]-reduction of block_values[c, tensor_block_start[t] ..
// tensor_block_start[t + 1]) for t < num_tensors.
void launch_tensor_reduce(const float* block_values, int64_t values_stride, const int32_t* tensor_block_start,
                          int64_t num_tensors, const std::vector<Reduce>& ops, float* out, int64_t out_stride,
                          int64_t tensor_offset, cudaStream_t stream);

struct FinalizeArgs {
  const float* tensor_sums;     // [2, num_tensors_all], rows sums_stride apart
  int64_t sums_stride;
  int64_t num_tensors_all;
  const int64_t* tensor_table;  // [kTableRows, num_tensors_dev]
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
  const int32_t* block_tensor;  // [num_blocks]
  int64_t num_blocks;
  const int64_t* tensor_table;  // [kTableRows, num_tensors]
  int64_t num_tensors;
  // The state buffers hold state_dtype elements (the kernel picks its instantiation by it, hence
  // untyped here), each tensor's from STATE_START on.
  void* state1;                 // the algorithm's first state
  void* state2;                 // its second, or null for a one-state algorithm
  const float* tensor_step;     // [num_tensors]
  const float* hyper;           // [num_groups, kNumHyper]
  const float* globals;         // [kNumGlobals]
  float* stats_partials;        // [the algorithm's kStats, num_blocks] or null (no statistics)
  int64_t stats_stride;         // row stride of stats_partials
  // Master weights of bf16 params (fusedopt/engine/master.py): the remainders, laid out like the
  // state; null with master_bits 0.
  void* remainder;
  // 8-bit state (state_dtype kUInt8): the group scale bytes of state1 and state2, one per
  // kInt8Group elements of the state buffer (element e's at e / kInt8Group); null otherwise, and
  // scale2 for a one-state algorithm. After the fields the kernels had before them, so those keep
  // their parameter offsets.
  uint8_t* scale1;
  uint8_t* scale2;
  // The two 4-byte fields last and side by side: with a padding hole after state_dtype in the
  // middle of this (kernel parameter) struct, nvcc stopped reading block_tensor and tensor_step
  // through the read-only path (ld.global.nc) in the STATS kernels.
  int master_bits;              // 0, 32 (int16 remainder) or 24 (uint8 remainder)
  StateDtype state_dtype;       // kFloat32, kBFloat16 (stored rounded stochastically) or kUInt8
};

void launch_update(Algorithm algorithm, Dtype dtype, const UpdateArgs& args, cudaStream_t stream);

// What an algorithm's struct (csrc/algorithms/<name>.cuh) declares, for argument checks and
// fusedopt._C.schema().
struct AlgorithmSchema {
  std::string name;
  Algorithm code;
  std::vector<HyperColumn> hyper;
  int states;
  std::vector<Reduce> stat_ops;
  std::vector<StateCode> state_codes;  // each state's 8-bit format
};

// Every registered algorithm, in code order.
const std::vector<AlgorithmSchema>& algorithm_schemas();

}  // namespace fusedopt
