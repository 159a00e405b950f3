"""The one schema every layer shares: block size, tensor-table rows, hyperparameter columns,
global slots, reduction ops and the algorithms' codes, state and statistics columns.

The Triton kernels read it through fusedopt.triton_kernels.layout (constexpr copies of these
numbers); the CUDA kernels declare the same numbers in csrc/layout.h and export them from the
compiled module (fusedopt._C.schema()); tests/test_schema.py compares both with this module name
by name, so the backends cannot drift apart without a CPU test failing.
"""
from __future__ import annotations

# 4096 elements: 16 KB of fp32 per block, enough work per program/thread block to keep 16-byte
# loads in flight, and few enough blocks that the per-block partials stay small (1.1B params ->
# 270K blocks -> 1 MB per partial column).
BLOCK = 4096

# Rows of the per-device tensor table, int64 [TABLE_ROWS, T]: where each tensor lives this step.
# Params and grads stay where their owners put them; the kernels reach them through these
# addresses. A tensor's state starts at element STATE_START of the segment's flat state buffers,
# a multiple of STATE_ALIGN. Which tensor a kernel block covers (no block spans two) comes from
# the segment's tensor_block_start, each tensor's first block (docs/kernel_contract.md).
TABLE_ROWS_NAMES = ("param_addr", "grad_addr", "group", "numel", "state_start")
PARAM_ADDR, GRAD_ADDR, GROUP, NUMEL, STATE_START = range(len(TABLE_ROWS_NAMES))
TABLE_ROWS = len(TABLE_ROWS_NAMES)

# Each tensor's state starts on a 128-byte line of fp32: the kernels' 16-byte vector loads stay
# aligned, and no line holds two tensors' state. Rounding each tensor up to STATE_ALIGN rather
# than to BLOCK saves about BLOCK / 2 elements per tensor and state: 3.3 MB at LLaMA-1B's 201
# tensors with Adam's two fp32 moments, up to 39 MB at 1200 tensors.
STATE_ALIGN = 32

# Columns of the per-group hyperparameter table, float32 [G, HYPER_COLUMNS]: four common to every
# algorithm, then each algorithm's own (algorithms/<name>.py, HYPER) from FIRST_ALGORITHM_COLUMN.
COMMON_HYPER = ("lr", "max_lr", "weight_decay", "corrected")
LR, MAX_LR, WEIGHT_DECAY, CORRECTED = range(len(COMMON_HYPER))
FIRST_ALGORITHM_COLUMN = len(COMMON_HYPER)
HYPER_COLUMNS = 8

# Slots of the per-device globals array, float32 [GLOBAL_SLOTS].
GLOBALS = ("grad_norm", "clip_coef", "found_inf", "inv_scale", "skipped_steps", "scale")
GRAD_NORM, CLIP_COEF, FOUND_INF, INV_SCALE, SKIPPED_STEPS, SCALE = range(len(GLOBALS))
GLOBAL_SLOTS = 8

# Reduction ops of tensor_reduce, per column.
OPS = ("sum", "min", "max")
OP_SUM, OP_MIN, OP_MAX = range(len(OPS))
# The gradient pass's two per-block figures: sum of g^2 and the non-finite flag.
GRAD_SUM_OPS = (OP_SUM, OP_MAX)

# Kernel codes of the algorithms, in registration order (csrc/layout.h, Algorithm).
ALGORITHMS = ("adamw", "sgd", "lion")

# Most statistic columns an algorithm may declare (csrc/layout.h, kMaxColumns).
MAX_STAT_COLUMNS = 8
# Most state buffers an algorithm may own (the kernels take state1, state2).
MAX_STATES = 2


def blocks_of(numel: int) -> int:
    """The blocks a tensor of numel elements takes in its segment."""
    return -(-numel // BLOCK)


def state_span(numel: int) -> int:
    """numel rounded up to STATE_ALIGN: the span a tensor takes in its segment's state."""
    return -(-numel // STATE_ALIGN) * STATE_ALIGN


def hyper_columns(algorithm_hyper) -> dict:
    """{name: column} of every hyperparameter of an algorithm, common ones first."""
    names = COMMON_HYPER + tuple(algorithm_hyper)
    if len(names) > HYPER_COLUMNS:
        raise ValueError(f"{len(names)} hyperparameter columns exceed the table's {HYPER_COLUMNS}")
    return {name: column for column, name in enumerate(names)}

# The first statistics columns of every algorithm: sum of p_new^2 and of (p_new - p_old)^2.
COMMON_STATS = (("weight_sumsq", OP_SUM), ("update_sumsq", OP_SUM))
