"""fusedopt.flat's table columns and globals slots as Triton constexprs.

@triton.jit functions may read no module global that is not a constexpr, so the kernels take
the layout's constants from here rather than from fusedopt.flat directly.
"""
import triton.language as tl

from fusedopt import flat

# Columns of the per-group hyperparameter table.
LR = tl.constexpr(flat.LR)
MAX_LR = tl.constexpr(flat.MAX_LR)
WEIGHT_DECAY = tl.constexpr(flat.WEIGHT_DECAY)
BETA1 = tl.constexpr(flat.BETA1)
BETA2 = tl.constexpr(flat.BETA2)
EPS = tl.constexpr(flat.EPS)
MOMENTUM = tl.constexpr(flat.MOMENTUM)
DAMPENING = tl.constexpr(flat.DAMPENING)
CORRECTED = tl.constexpr(flat.CORRECTED)
NESTEROV = tl.constexpr(flat.NESTEROV)
HYPER_COLUMNS = tl.constexpr(flat.HYPER_COLUMNS)

# Slots of the per-device globals array.
GRAD_NORM = tl.constexpr(flat.GRAD_NORM)
CLIP_COEF = tl.constexpr(flat.CLIP_COEF)
FOUND_INF = tl.constexpr(flat.FOUND_INF)
INV_SCALE = tl.constexpr(flat.INV_SCALE)
SKIPPED_STEPS = tl.constexpr(flat.SKIPPED_STEPS)
SCALE = tl.constexpr(flat.SCALE)
