"""Per-algorithm Triton math, one module each (the same names as fusedopt.algorithms):
NUM_STATES, NUM_STATS, STATE_CODES, uses_state(row), coefficients(row, step) (the step's
scalars, a tuple formed once per block), update(p, g, state1, state2, coefficients, ...) and
observe(...). The traversal kernel in update.py takes them as constexpr functions; REGISTRY is
the one place an algorithm is added."""
from . import adamw, lion, sgd

REGISTRY = {"adamw": adamw, "sgd": sgd, "lion": lion}
