// grad_norm: launch 1 of the fused step (docs/kernel_contract.md). One thread block per BLOCK of a
// segment reads its tensor's gradient through the tensor table: block b belongs to the segment's
// tensor i (block_owner, a binary search over tensor_block_start), the table's column
// t = tensor_offset + i, and holds its elements e = (b - tensor_block_start[i]) * BLOCK + j, at
// GRAD_ADDR[t] + e. It writes
//   block_sums[0, b] = sum over the block of (grad * inv_scale)^2, accumulated in fp32,
//   block_sums[1, b] = 1 if any grad * inv_scale in the block is inf/NaN, else 0,
// with inv_scale = 1/scale (1 without a scaler). Blocks of skipped tensors (group -1) write 0, 0
// and read no gradient (GRAD_ADDR may be 0). Read-only over the gradients; tensor_reduce then
// folds the blocks per tensor.
//
// Napkin math: each element is read once and nothing per element is written: 4 B/element (fp32)
// or 2 B/element (bf16/fp16), plus 8 B of output and 24 B of table column per 4096 elements
// (0.01 B/element); block_owner's loads of tensor_block_start (S + 1 entries a segment) hit in
// L1. At 1.1B fp32 params: 4.4 GB, ~1.4 ms at 3.2 TB/s (H100 SXM copy bandwidth).
#include "common.cuh"

namespace fusedopt {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_norm_kernel(const int32_t* __restrict__ tensor_block_start, int32_t num_segment_tensors,
                     int64_t tensor_offset, const int64_t* __restrict__ tensor_table, int64_t num_tensors,
                     const float* __restrict__ scale, float* __restrict__ block_sums, int64_t block_sums_stride) {
  const int64_t block = blockIdx.x;
  const BlockOwner owner = block_owner(tensor_block_start, num_segment_tensors, block);
  const TableColumn tensor(tensor_table, num_tensors, tensor_offset + owner.index);
  float vals[2] = {0.f, 0.f};  // sum of g^2, non-finite flag
  if (tensor[kGroup] >= 0) {
    const int64_t first = owner.first_element(block);
    const T* grad = tensor.address<const T>(kGradAddr, first);
    const Slots<kVec<T>> slots = Slots<kVec<T>>::of(tensor[kNumel] - first, is_aligned16(grad));
    float g[kPerThread];
    slots.load(grad, g);
    const float inv_scale = scale != nullptr ? inv_scale_of(*scale) : 1.f;
    bool nonfinite = false;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      // Masked slots were loaded as 0 and add nothing.
      const float x = g[i] * inv_scale;
      vals[0] += x * x;
      nonfinite |= !isfinite(x);
    }
    vals[1] = nonfinite ? 1.f : 0.f;
  }
  const Reduce ops[2] = {kGradSquaresOp, kNonfiniteOp};
  block_reduce(vals, ops);
  if (threadIdx.x == 0) {
    block_sums[block] = vals[0];
    block_sums[block_sums_stride + block] = vals[1];
  }
}

template <typename T>
void launch(const int32_t* tensor_block_start, int32_t num_segment_tensors, int64_t num_blocks, int64_t tensor_offset,
            const int64_t* tensor_table, int64_t num_tensors, const float* scale, float* block_sums,
            int64_t block_sums_stride, cudaStream_t stream) {
  grad_norm_kernel<T><<<unsigned(num_blocks), kThreads, 0, stream>>>(
      tensor_block_start, num_segment_tensors, tensor_offset, tensor_table, num_tensors, scale, block_sums,
      block_sums_stride);
  check_launch("grad_norm");
}

}  // namespace

void launch_grad_norm(Dtype dtype, const int32_t* tensor_block_start, int32_t num_segment_tensors, int64_t num_blocks,
                      int64_t tensor_offset, const int64_t* tensor_table, int64_t num_tensors, const float* scale,
                      float* block_sums, int64_t block_sums_stride, cudaStream_t stream) {
  if (num_blocks == 0) return;
  switch (dtype) {
    case Dtype::kFloat32:
      return launch<float>(tensor_block_start, num_segment_tensors, num_blocks, tensor_offset, tensor_table,
                           num_tensors, scale, block_sums, block_sums_stride, stream);
    case Dtype::kBFloat16:
      return launch<__nv_bfloat16>(tensor_block_start, num_segment_tensors, num_blocks, tensor_offset, tensor_table,
                                   num_tensors, scale, block_sums, block_sums_stride, stream);
    case Dtype::kFloat16:
      return launch<__half>(tensor_block_start, num_segment_tensors, num_blocks, tensor_offset, tensor_table,
                            num_tensors, scale, block_sums, block_sums_stride, stream);
  }
  throw std::invalid_argument("grad_norm: unknown dtype code " + std::to_string(int(dtype)));
}

}  // namespace fusedopt
