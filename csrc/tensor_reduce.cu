// tensor_reduce: launch 2 of the fused step (docs/kernel_contract.md). Folds per-block partials
// into per-tensor values:
//   out[c, tensor_offset + t] = ops[c] over block_values[c, tensor_block_start[t] .. tensor_block_start[t+1])
// with ops 0 sum (fp64 accumulation, rounded to fp32 once), 1 min, 2 max. Used for the gradient
// sums (C=2: sum of g^2, non-finite flag) and, with statistics, for the update partials (C=6/3).
//
// One thread block per (tensor, column). Thread i folds blocks first+i, first+i+256, ... in block
// order, then the block combines the 256 partial results in a fixed tree (common.cuh): a fixed
// order, so results are bit-identical run to run. One thread per tensor would be too slow for
// large tensors: the 65M-element embedding of LLaMA 1.1B has 16k blocks, and one thread keeps only
// a few loads in flight (16k loads x ~0.5 us DRAM latency / a few = milliseconds); strided over
// 256 threads it is 63 loads per thread.
//
// Napkin math: reads 4 B per block and column (1/1024 B per parameter per column), writes 4 B per
// tensor and column: negligible next to the 16-32 B/parameter of the update.
#include "common.cuh"

namespace fusedopt {
namespace {

struct ColumnOps {
  Reduce op[kMaxColumns];
};

__global__ void __launch_bounds__(kThreads)
    tensor_reduce_kernel(const float* __restrict__ block_values, int64_t values_stride,
                         const int32_t* __restrict__ tensor_block_start, ColumnOps ops, float* __restrict__ out,
                         int64_t out_stride, int64_t tensor_offset) {
  const int64_t tensor = blockIdx.x;
  const int column = blockIdx.y;
  const Reduce op = ops.op[column];
  const float* values = block_values + column * values_stride;
  const int64_t first = tensor_block_start[tensor];
  const int64_t last = tensor_block_start[tensor + 1];
  float result;
  if (op == Reduce::kSum) {
    double acc[1] = {0.0};
    for (int64_t b = first + threadIdx.x; b < last; b += kThreads) acc[0] += double(values[b]);
    const Reduce ops1[1] = {Reduce::kSum};
    block_reduce(acc, ops1);
    result = float(acc[0]);
  } else {
    float acc[1] = {reduce_identity<float>(op)};
    for (int64_t b = first + threadIdx.x; b < last; b += kThreads) acc[0] = reduce_combine(op, acc[0], values[b]);
    const Reduce ops1[1] = {op};
    block_reduce(acc, ops1);
    result = acc[0];
  }
  if (threadIdx.x == 0) out[column * out_stride + tensor_offset + tensor] = result;
}

}  // namespace

void launch_tensor_reduce(const float* block_values, int64_t values_stride, const int32_t* tensor_block_start,
                          int64_t num_tensors, const std::vector<Reduce>& ops, float* out, int64_t out_stride,
                          int64_t tensor_offset, cudaStream_t stream) {
  if (num_tensors == 0 || ops.empty()) return;
  if (ops.size() > size_t(kMaxColumns))
    throw std::invalid_argument("tensor_reduce: at most " + std::to_string(kMaxColumns) + " columns, got " +
                                std::to_string(ops.size()));
  ColumnOps column_ops{};
  for (size_t c = 0; c < ops.size(); ++c) column_ops.op[c] = ops[c];
  const dim3 grid(unsigned(num_tensors), unsigned(ops.size()));
  tensor_reduce_kernel<<<grid, kThreads, 0, stream>>>(block_values, values_stride, tensor_block_start,
                                                      column_ops, out, out_stride, tensor_offset);
  check_launch("tensor_reduce");
}

}  // namespace fusedopt
