"""fusedopt: fused GPU optimizer steps for LLM training.

One step = loss-scale unscaling + inf/NaN skip + global gradient-norm clipping + the AdamW/AdamC
or SGD/SGDC update + the dynamic loss-scale update + optional statistics, in a gradient
reduction, a tiny finalize and one update kernel, with no host sync.
"""
from fusedopt import blocks, diagnostics
from fusedopt.adam import AdamC, AdamW
from fusedopt.blocks import classify, param_groups
from fusedopt.scaler import GradScaler
from fusedopt.sgd import SGD, SGDC
from fusedopt.stats import StepStats
from fusedopt.tensorboard import log_stats

__all__ = ["AdamW", "AdamC", "SGD", "SGDC", "GradScaler", "StepStats", "blocks", "classify",
           "param_groups", "diagnostics", "log_stats"]
__version__ = "0.1.0"
