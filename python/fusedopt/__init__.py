"""fusedopt: fused GPU optimizer steps for LLM training.

One step = loss-scale unscaling + inf/NaN skip + global gradient-norm clipping + the update
(AdamW/AdamC, SGD/SGDC, Lion/LionC) + the dynamic loss-scale update + optional statistics, in a
gradient reduction, a tiny finalize and one update kernel, with no host sync. Parameters and
gradients stay where their owners put them; the optimizer owns only its state.
"""
from fusedopt import blocks, diagnostics
from fusedopt.algorithms.adamw import AdamC, AdamW
from fusedopt.algorithms.lion import Lion, LionC
from fusedopt.algorithms.sgd import SGD, SGDC
from fusedopt.blocks import classify, param_groups
from fusedopt.precision import to_bf16
from fusedopt.scaler import GradScaler
from fusedopt.stats import StepStats
from fusedopt.tensorboard import log_stats

__all__ = ["AdamW", "AdamC", "SGD", "SGDC", "Lion", "LionC", "GradScaler", "StepStats", "blocks",
           "classify", "param_groups", "diagnostics", "log_stats", "to_bf16"]
__version__ = "0.2.0"
