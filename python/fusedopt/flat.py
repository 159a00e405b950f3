"""The flat-buffer layout every backend works on (docs/kernel_contract.md).

Parameters of one (device, dtype) are re-homed into one flat buffer: `p.data` becomes a view of
it, and `p.grad` a view of a flat gradient buffer of the same shape, so one kernel launch covers
every tensor and `zero_grad` is one memset. Each tensor starts at a multiple of BLOCK elements,
so no kernel block spans two tensors and per-tensor figures come from per-block partials
reduced in a fixed order (bit-identical run to run, no float atomics).

Padding costs at most BLOCK - 1 elements per tensor: 1200 tensors * 4095 * 4 B = 20 MB of
memory in the worst case, and no traffic, since the kernels mask loads at the tensor end.
"""
from __future__ import annotations

import torch

# 4096 elements: 16 KB of fp32 per block, enough work per program/thread block to keep
# 16-byte loads in flight, and few enough blocks that the per-block partials stay small
# (1.1B params -> 270K blocks -> 1 MB per partial column).
BLOCK = 4096

# Columns of the per-group hyperparameter table `hyper` [G, 10].
LR, MAX_LR, WEIGHT_DECAY, BETA1, BETA2, EPS, MOMENTUM, DAMPENING, CORRECTED, NESTEROV = range(10)
HYPER_COLUMNS = 10

# Slots of the per-device `globals` array [8].
GRAD_NORM, CLIP_COEF, FOUND_INF, INV_SCALE, SKIPPED_STEPS, SCALE = range(6)
GLOBAL_SLOTS = 8

# Reduction ops of tensor_reduce, per column.
OP_SUM, OP_MIN, OP_MAX = 0, 1, 2

# Per-block statistics partials written by the update kernel, in column order.
ADAM_STAT_COLUMNS = ("weight_sumsq", "update_sumsq", "vhat_min", "vhat_max", "vhat_sum",
                     "v_decrease_count")
ADAM_STAT_OPS = (OP_SUM, OP_SUM, OP_MIN, OP_MAX, OP_SUM, OP_SUM)
SGD_STAT_COLUMNS = ("weight_sumsq", "update_sumsq", "momentum_sumsq")
SGD_STAT_OPS = (OP_SUM, OP_SUM, OP_SUM)
GRAD_SUM_OPS = (OP_SUM, OP_MAX)  # sum of g^2, non-finite flag


def padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


class FlatBuffer:
    """The params of one (device, dtype), their gradients and the block/tensor tables.

    `tensor_offset` is the device-local index of this buffer's first tensor: block_tensor
    holds device-local indices so that all buffers of a device share one tensor table.
    """

    def __init__(self, params, device, dtype, tensor_offset, moment_names):
        self.params = list(params)
        self.device = device
        self.dtype = dtype
        self.tensor_offset = tensor_offset
        self.starts, ends, block_start = [], [], [0]
        total = 0
        for p in self.params:
            self.starts.append(total)
            ends.append(total + p.numel())
            total += padded(p.numel())
            block_start.append(total // BLOCK)
        self.numel = total
        self.num_blocks = total // BLOCK
        self.param = torch.zeros(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        self.moments = {name: torch.zeros(total, dtype=_moment_dtype(dtype), device=device)
                        for name in moment_names}
        block_tensor = torch.empty(self.num_blocks, dtype=torch.int32)
        for i in range(len(self.params)):
            block_tensor[block_start[i]:block_start[i + 1]] = tensor_offset + i
        self.block_tensor = block_tensor.to(device)
        self.tensor_end = torch.tensor(ends, dtype=torch.int64)  # host copy; device table is shared
        self.tensor_block_start = torch.tensor(block_start, dtype=torch.int32, device=device)
        self.block_sums = torch.zeros(2, self.num_blocks, dtype=torch.float32, device=device)
        self.grad_views = [self.view(self.grad, i) for i in range(len(self.params))]
        for i in range(len(self.params)):
            self.rehome(i)
        # Where each param's storage must start: checked every step, so kept as plain ints
        # (building a view to ask would cost ~5 us a param: 6 ms a step at 1200 tensors).
        self.param_ptrs = [p.data_ptr() for p in self.params]

    def view(self, flat, i):
        p = self.params[i]
        return flat[self.starts[i]:self.starts[i] + p.numel()].view(p.shape)

    def rehome(self, i):
        """Move param i's values into the flat buffer (if they are elsewhere) and make p.data a
        view of it. Called at construction and whenever something replaced p.data."""
        p = self.params[i]
        target = self.view(self.param, i)
        if p.data_ptr() != target.data_ptr():
            with torch.no_grad():
                target.copy_(p.data)
            p.data = target


def _moment_dtype(dtype):
    # Moments are fp32 for half params (a bf16 second moment loses the small updates that
    # beta2 = 0.999 makes: 1 - 0.999 is below bf16's 2^-8 relative step), and float64 stays
    # float64 for the high-precision reference.
    return torch.float64 if dtype == torch.float64 else torch.float32
