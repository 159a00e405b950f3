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

// A segment of num_blocks blocks over num_segment_tensors tensors, the device's tensors
// tensor_offset .. tensor_offset + num_segment_tensors - 1: tensor i of the segment covers blocks
// tensor_block_start[i] .. tensor_block_start[i + 1] - 1 (int32 [num_segment_tensors + 1],
// tensor_block_start[0] = 0, tensor_block_start[num_segment_tensors] = num_blocks; an empty tensor
// has no blocks) and sits in column tensor_offset + i of the tensor table.

// block_sums[0, b] = sum of (grad * inv_scale)^2 over block b, block_sums[1, b] = 1 if any such
// value is non-finite, grads read through the tensor table. scale may be null (scale 1).
void launch_grad_norm(Dtype dtype, const int32_t* tensor_block_start, int32_t num_segment_tensors, int64_t num_blocks,
                      int64_t tensor_offset, const int64_t* tensor_table, int64_t num_tensors, const float* scale,
                      float* block_sums, int64_t block_sums_stride, cudaStream_t stream);

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

// The update kernel's parameter, passed by value: at most 120 bytes, so the block count is the
// launch's (launch_update) and tensor_offset 32 bits (bindings.cpp keeps tensor_offset +
// num_segment_tensors <= num_tensors <= INT32_MAX). nvcc (CUDA 13.0, sm_90) reads the arrays
// through the read-only path (ld.global.nc) only up to that size: at 128 bytes 120 loads of the
// 90 update kernels' PTX lost it, tensor_step's among them; at 136 (with num_blocks) ptxas also
// fits 11 kernels fewer blocks per SM, two of them 1 (134 registers).
struct UpdateArgs {
  const int32_t* tensor_block_start;  // [num_segment_tensors + 1], the segment's (see above)
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
  // scale2 for a one-state algorithm.
  uint8_t* scale1;
  uint8_t* scale2;
  // The 4-byte fields last and side by side: a padding hole in the middle of this struct keeps
  // nvcc from reading tensor_step through the read-only path (ld.global.nc) in the STATS kernels.
  int32_t num_segment_tensors;  // tensor_block_start's entries - 1
  int32_t tensor_offset;        // the device-local index of the segment's first tensor
  int master_bits;              // 0, 32 (int16 remainder) or 24 (uint8 remainder)
  StateDtype state_dtype;       // kFloat32, kBFloat16 (stored rounded stochastically) or kUInt8
};
static_assert(sizeof(UpdateArgs) <= 120, "past 120 bytes nvcc drops ld.global.nc in the update kernels");

// One thread block per block of the segment: num_blocks of them.
void launch_update(Algorithm algorithm, Dtype dtype, int64_t num_blocks, const UpdateArgs& args,
                   cudaStream_t stream);

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
