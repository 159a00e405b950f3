"""Per-algorithm Triton math, one module each (the same names as fusedopt.algorithms): NUM_STATES,
NUM_STATS, STATE_CODES, uses_state(row), coefficients(row, step) (the step's scalars, a tuple
formed once per block), update(p, g, state1, state2, coefficients, ...) (the new values and the
statistics' per-element operands), reduce_statistics(...) (a block's statistics from their
per-element running values, compiled; the interpreter reduces column by column) and observe(...)
(a skipped step's per-element operands: the state as it stands; lanes past the tensor's end hold
zeros, loaded as such). The traversal kernel in update.py takes them as constexpr functions;
REGISTRY is the one place an algorithm is added."""
from . import adamw, lion, sgd

REGISTRY = {"adamw": adamw, "sgd": sgd, "lion": lion}
